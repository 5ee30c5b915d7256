"""Admin screens of experiments: experiments with their variants inline, lifecycle actions, YAML
export, online results per variant, and the daily online evaluation reports.

Allocations are edited and shown in percent (stored in basis points). The change form checks
what the services check: valid variant parameters and allocations of at most 100% in total;
status only changes through the Start / Pause / Stop actions, which call the services and
report with ``message_user``. Every save and delete bumps the config version serving polls.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, QuerySet, Sum
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from apps.experiments import services
from apps.experiments.bucketing import BUCKETS
from apps.experiments.choices import ExperimentStatus
from apps.experiments.models import Experiment, OnlineEvaluationReport, Variant
from apps.experiments.online import Counts
from apps.experiments.params import ParamsError, clean_params
from apps.experiments.selectors import experiment_results, experiments_with_variants
from apps.experiments.yaml_io import dump_experiments_yaml

STATUS_COLOURS = {
    ExperimentStatus.DRAFT: "#6e7781",
    ExperimentStatus.RUNNING: "#1a7f37",
    ExperimentStatus.PAUSED: "#bf8700",
    ExperimentStatus.STOPPED: "#57606a",
}


def _percent(points: int | None) -> str:
    return f"{(points or 0) / 100:g}%"


def _with_interval(metric: dict[str, Any] | None, *, percent: bool) -> dict[str, str]:
    """A metric as ``{"value", "interval"}`` strings ("-" when it has no denominator)."""
    if not metric:
        return {"value": "-", "interval": ""}

    def show(x: float | None) -> str:
        if x is None:
            return "?"
        return f"{x * 100:.2f}%" if percent else f"{x:,.2f}"

    interval = ""
    if metric.get("low") is not None and metric.get("high") is not None:
        interval = f"{show(metric['low'])} to {show(metric['high'])}"
    return {"value": show(metric["value"]), "interval": interval}


def online_rows(rows: list[tuple[str, int | None, Counts, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Display rows of the online tables: ``(name, allocation or None, counts, metrics)`` in,
    counts and formatted metrics with their 95% intervals out."""
    out = []
    for name, allocation, counts, metrics in rows:
        out.append(
            {
                "name": name,
                "allocation": _percent(allocation) if allocation is not None else "-",
                "counts": counts,
                "ctr": _with_interval(metrics.get("ctr"), percent=True),
                "request_ctr": _with_interval(metrics.get("request_ctr"), percent=True),
                "cvr_click": _with_interval(metrics.get("cvr_click"), percent=True),
                "cvr_exposure": _with_interval(metrics.get("cvr_exposure"), percent=True),
                "gmv": _with_interval(metrics.get("gmv_per_exposure"), percent=False),
            }
        )
    return out


class VariantForm(forms.ModelForm):
    """A variant with its allocation in percent (two decimals: one basis point)."""

    percent = forms.DecimalField(
        label="allocation (%)",
        min_value=Decimal(0),
        max_value=Decimal(100),
        max_digits=5,
        decimal_places=2,
        help_text="Share of units; 25 = 25%.",
    )
    params = forms.JSONField(
        required=False,
        initial=dict,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        help_text='e.g. {"channel_weights": {"ease": 2.0}, "ranker": true, '
        '"diversity": {"method": "mmr", "lambda": 0.7}}',
    )

    class Meta:
        model = Variant
        fields = ("name", "position", "params")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None:
            self.fields["percent"].initial = Decimal(self.instance.allocation) / 100

    def clean_params(self) -> dict[str, Any]:
        try:
            return clean_params(self.cleaned_data.get("params"))
        except ParamsError as exc:
            raise forms.ValidationError(exc.problems) from exc

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        percent = cleaned.get("percent")
        if percent is not None:
            # Set before the model validation runs, so its range check sees the value.
            self.instance.allocation = int(percent * 100)
        return cleaned


class VariantFormSet(BaseInlineFormSet):
    """Checks the experiment's allocations together: at most 100% in total."""

    def clean(self) -> None:
        super().clean()
        total = 0
        for form in self.forms:
            if not getattr(form, "cleaned_data", None) or self._should_delete_form(form):
                continue
            percent = form.cleaned_data.get("percent")
            total += int(percent * 100) if percent is not None else 0
        if total > BUCKETS:
            raise forms.ValidationError(
                f"The allocations add up to {_percent(total)}; together they must not exceed 100%."
            )


class VariantInline(admin.TabularInline):
    model = Variant
    form = VariantForm
    formset = VariantFormSet
    fields = ("name", "percent", "position", "params")
    extra = 0
    ordering = ("position", "name")


class ExperimentForm(forms.ModelForm):
    class Meta:
        model = Experiment
        fields = ("name", "scene", "salt", "starts_at", "ends_at", "description")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "salt" in self.fields:
            self.fields["salt"].required = False
            self.fields["salt"].help_text = "Defaults to the name. Fixed once started."

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if "salt" in self.fields and not cleaned.get("salt") and cleaned.get("name"):
            cleaned["salt"] = cleaned["name"]
        starts, ends = cleaned.get("starts_at"), cleaned.get("ends_at")
        if starts and ends and ends <= starts:
            self.add_error("ends_at", "The end must be after the start.")
        return cleaned


@admin.register(Experiment)
class ExperimentAdmin(admin.ModelAdmin):
    form = ExperimentForm
    list_display = (
        "name",
        "scene",
        "status_badge",
        "allocation_total",
        "variant_count",
        "starts_at",
        "ends_at",
        "updated_at",
    )
    list_filter = ("status", "scene")
    search_fields = ("name", "description")
    inlines = [VariantInline]
    actions = ["start_experiments", "pause_experiments", "stop_experiments", "export_yaml"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Experiment]:
        # One join for both annotations: each variant row counts once in each.
        return (
            super()
            .get_queryset(request)
            .annotate(allocation_sum=Sum("variants__allocation"), variants_n=Count("variants"))
        )

    def get_readonly_fields(self, request: HttpRequest, obj: Experiment | None = None) -> Any:
        fields = ["status", "created_at", "updated_at"]
        if obj is not None and obj.status != ExperimentStatus.DRAFT:
            # Changing these once units were bucketed would reshuffle or move them.
            fields = ["name", "scene", "salt", *fields]
        return fields

    def get_fields(self, request: HttpRequest, obj: Experiment | None = None) -> Any:
        return (
            "name",
            "scene",
            "status",
            "salt",
            "starts_at",
            "ends_at",
            "description",
            "created_at",
            "updated_at",
        )

    # --- columns --------------------------------------------------------------------------

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Experiment) -> str:
        return format_html(
            '<b style="color:#fff;background:{};padding:1px 6px;border-radius:8px">{}</b>',
            STATUS_COLOURS.get(obj.status, "#6e7781"),
            obj.get_status_display(),
        )

    @admin.display(description="allocated", ordering="allocation_sum")
    def allocation_total(self, obj: Experiment) -> str:
        return _percent(obj.allocation_sum)

    @admin.display(description="variants", ordering="variants_n")
    def variant_count(self, obj: Experiment) -> int:
        return obj.variants_n

    # --- saving: every change reaches serving -----------------------------------------------

    def save_related(self, request: HttpRequest, form: Any, formsets: Any, change: bool) -> None:
        super().save_related(request, form, formsets, change)
        if not change or form.has_changed() or any(fs.has_changed() for fs in formsets):
            services.experiments_config_bump(event="admin-edit", names=[form.instance.name])

    def delete_model(self, request: HttpRequest, obj: Experiment) -> None:
        name = obj.name
        super().delete_model(request, obj)
        services.experiments_config_bump(event="delete", names=[name])

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Experiment]) -> None:
        names = list(queryset.values_list("name", flat=True))
        super().delete_queryset(request, queryset)
        services.experiments_config_bump(event="delete", names=names)

    # --- actions --------------------------------------------------------------------------

    def _each(
        self,
        request: HttpRequest,
        queryset: QuerySet[Experiment],
        verb: str,
        done_label: str,
        call: Callable[[int], Experiment],
    ) -> None:
        """Call a service per selected experiment; report successes and each refusal."""
        done: list[str] = []
        for experiment in queryset.order_by("name"):
            try:
                call(experiment.pk)
            except services.ExperimentError as exc:
                text = f"Could not {verb} {experiment.name}: {'; '.join(exc.problems)}"
                self.message_user(request, text, messages.ERROR)
                continue
            done.append(experiment.name)
            self.log_change(request, experiment, f"{done_label} (admin action).")
        if done:
            count = len(done)
            noun = "experiment" if count == 1 else "experiments"
            self.message_user(
                request, f"{done_label}: {count} {noun} ({', '.join(done)}).", messages.SUCCESS
            )

    @admin.action(description="Start selected experiments", permissions=["change"])
    def start_experiments(self, request: HttpRequest, queryset: QuerySet[Experiment]) -> None:
        self._each(
            request,
            queryset,
            "start",
            "Started",
            lambda pk: services.experiment_start(experiment_id=pk),
        )

    @admin.action(description="Pause selected experiments", permissions=["change"])
    def pause_experiments(self, request: HttpRequest, queryset: QuerySet[Experiment]) -> None:
        self._each(
            request,
            queryset,
            "pause",
            "Paused",
            lambda pk: services.experiment_pause(experiment_id=pk),
        )

    @admin.action(description="Stop selected experiments", permissions=["change"])
    def stop_experiments(self, request: HttpRequest, queryset: QuerySet[Experiment]) -> None:
        self._each(
            request,
            queryset,
            "stop",
            "Stopped",
            lambda pk: services.experiment_stop(experiment_id=pk),
        )

    @admin.action(description="Export selected as YAML", permissions=["view"])
    def export_yaml(self, request: HttpRequest, queryset: QuerySet[Experiment]) -> HttpResponse:
        names = queryset.values_list("name", flat=True)
        text = dump_experiments_yaml(experiments_with_variants(names))
        response = HttpResponse(text, content_type="application/yaml; charset=utf-8")
        response["Content-Disposition"] = 'attachment; filename="experiments.yaml"'
        return response

    # --- online results ---------------------------------------------------------------------

    def get_urls(self) -> list[Any]:
        custom = [
            path(
                "<int:object_id>/results/",
                self.admin_site.admin_view(self.results_view),
                name="experiments_experiment_results",
            )
        ]
        return custom + super().get_urls()

    def results_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        """Per variant: exposures, CTR, CVR and GMV per exposure with 95% intervals, from the
        latest daily report and summed over the run. POST ("compute now") recomputes today."""
        experiment = get_object_or_404(Experiment, pk=object_id)
        if not self.has_view_permission(request, experiment):
            raise PermissionDenied
        url = reverse("admin:experiments_experiment_results", args=[experiment.pk])
        if request.method == "POST":
            if not self.has_change_permission(request, experiment):
                raise PermissionDenied
            self._compute_now(request, experiment)
            return HttpResponseRedirect(url)
        results = experiment_results(experiment=experiment)
        context = {
            **self.admin_site.each_context(request),
            "title": f"Online results of {experiment.name}",
            "opts": self.model._meta,
            "original": experiment,
            "results": results,
            "latest_rows": online_rows(
                [(r.name, r.allocation, r.counts, r.metrics) for r in results.latest_rows]
            ),
            "total_rows": online_rows(
                [(r.name, r.allocation, r.counts, r.metrics) for r in results.total_rows]
            ),
            "can_compute": self.has_change_permission(request, experiment),
        }
        return TemplateResponse(request, "admin/experiments/experiment/results.html", context)

    def _compute_now(self, request: HttpRequest, experiment: Experiment) -> None:
        """Recompute today's report: on the broker when there is one, else here.

        The evaluation streams the day's logs at about 12 us per request served (measured:
        200,000 requests of 10 items, 146 MB, in 2.3 s), too slow for a request on a busy
        site, so a worker does it there; the embedded setup (no broker) has small logs.
        """
        today = timezone.now().date()
        who = f"admin:{request.user.get_username()}"[:64]
        if not settings.CELERY_TASK_ALWAYS_EAGER:
            from apps.experiments.tasks import online_report_compute_task

            online_report_compute_task.delay(today.isoformat(), triggered_by=who)
            text = (
                f"Queued the online evaluation of {today.isoformat()} on the broker; "
                "reload this page in a minute."
            )
            self.log_change(request, experiment, f"{text} (admin: compute now)")
            self.message_user(request, text, messages.SUCCESS)
            return
        try:
            report = services.online_report_compute(day=today, triggered_by=who)
        except services.ExperimentError as exc:
            self.message_user(request, f"Could not compute: {exc}", messages.ERROR)
            return
        requests = sum(
            g["counts"]["requests"] for g in report.results.get("by_variant", {}).values()
        )
        text = (
            f"Computed the online evaluation of {today.isoformat()} up to "
            f"{report.window_end:%H:%M} UTC: {requests} requests ({report.seconds:.2f} s)."
        )
        self.log_change(request, report, f"{text} (admin: compute now)")
        self.message_user(request, text, messages.SUCCESS)


@admin.register(OnlineEvaluationReport)
class OnlineEvaluationReportAdmin(admin.ModelAdmin):
    """Daily online evaluations: written by the beat task, the command or "compute now"."""

    list_display = ("date", "requests", "variant_labels", "computed_at", "triggered_by", "seconds")
    date_hierarchy = "date"
    readonly_fields = (
        "date",
        "window_start",
        "window_end",
        "computed_at",
        "triggered_by",
        "seconds",
        "variants_table",
        "feedback_summary",
    )
    exclude = ("results", "summary")

    def _groups(self, obj: OnlineEvaluationReport) -> dict[str, Any]:
        return (obj.results or {}).get("by_variant") or {}

    @admin.display(description="requests")
    def requests(self, obj: OnlineEvaluationReport) -> int:
        return sum(int(g["counts"]["requests"]) for g in self._groups(obj).values())

    @admin.display(description="variants")
    def variant_labels(self, obj: OnlineEvaluationReport) -> str:
        return ", ".join(sorted(self._groups(obj))) or "-"

    @admin.display(description="per variant")
    def variants_table(self, obj: OnlineEvaluationReport) -> str:
        rows = online_rows(
            [
                (label, None, Counts.from_dict(g["counts"]), g["metrics"])
                for label, g in sorted(self._groups(obj).items())
            ]
        )
        return render_to_string(
            "admin/experiments/_online_table.html", {"rows": rows, "show_allocation": False}
        )

    @admin.display(description="feedback join")
    def feedback_summary(self, obj: OnlineEvaluationReport) -> str:
        feedback = (obj.summary or {}).get("feedback") or {}
        return (
            f"{feedback.get('matched', 0)} items with feedback joined, {feedback.get('unmatched', 0)} without an "
            f"exposure in the window, {feedback.get('not_shown', 0)} on items not shown; "
            f"events read: {feedback.get('events', {})}"
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
