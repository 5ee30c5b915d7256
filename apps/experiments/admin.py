"""Admin screens of experiments: experiments with their variants inline, lifecycle actions, YAML
export, online results per variant, and the daily online evaluation reports with their HTML
page (every dimension, inline SVG charts, the before/after comparison of a promotion) and JSON.

Allocations are edited and shown in percent (stored in basis points). The change form checks
what the services check: valid variant parameters and allocations of at most 100% in total;
status only changes through the Start / Pause / Stop actions, which call the services and
report with ``message_user``. Every save and delete bumps the config version serving polls.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, QuerySet, Sum
from django.forms.models import BaseInlineFormSet
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from apps.experiments import services
from apps.experiments.attribution import ATTRIBUTED, DIMENSIONS, FEEDBACK, dimension_order
from apps.experiments.bucketing import BUCKETS
from apps.experiments.choices import ExperimentStatus
from apps.experiments.models import Experiment, OnlineEvaluationReport, Variant
from apps.experiments.online import Counts
from apps.experiments.params import ParamsError, clean_params
from apps.experiments.selectors import (
    experiment_results,
    experiments_with_variants,
    online_reports_trend,
)
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


def _result_rows(rows: Sequence[Any]) -> list[dict[str, Any]]:
    """``online_rows`` of ``selectors.VariantResult`` objects."""
    return online_rows([(r.name, r.allocation, r.counts, r.metrics) for r in rows])


# --- the daily report page -----------------------------------------------------------------------

BASIS_TITLES = {
    ATTRIBUTED: "site behaviour (attributed, last touch)",
    FEEDBACK: "client feedback (joined by request id)",
}
DIMENSION_TITLES = {
    "day": "day (UTC)",
    "scene": "scene",
    "channel": "recall channel",
    "position": "position in the list",
    "variant": "variant",
    "model_version": "model version",
}
COMPARED_METRICS = (
    ("ctr", "CTR", True),
    ("request_ctr", "request CTR", True),
    ("cvr_click", "CVR per click", True),
    ("cvr_exposure", "CVR per exposure", True),
    ("gmv_per_exposure", "GMV (revenue) per exposure", False),
)


def svg_rate_bars(
    rows: Sequence[tuple[str, Mapping[str, Any] | None]], *, label: str
) -> SafeString:
    """A horizontal bar per row (a rate ``{"value", "low", "high"}`` or None) with its 95%
    interval as a whisker; the axis runs to the highest upper bound, so small rates show."""
    # About 7 px a character at 12 px: room for the longest label, within bounds.
    longest = max((len(name) for name, _ in rows), default=0)
    label_w, bar_w, row_h = min(300, max(60, 7 * longest + 14)), 360, 22
    top = max(
        (float(m.get("high") if m.get("high") is not None else m["value"]) for _, m in rows if m),
        default=0.0,
    )
    scale = top if top > 0 else 1.0
    parts = []
    for i, (name, metric) in enumerate(rows):
        y = 4 + i * row_h
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 15}" font-size="12" text-anchor="end">'
            f"{html.escape(name)}</text>"
            f'<rect x="{label_w}" y="{y + 4}" width="{bar_w}" height="{row_h - 8}" fill="#eef1f4"/>'
        )
        if not metric:
            parts.append(f'<text x="{label_w + 6}" y="{y + 15}" font-size="11">-</text>')
            continue
        value = float(metric["value"])
        parts.append(
            f'<rect class="bar" x="{label_w}" y="{y + 4}" width="{bar_w * value / scale:.1f}" '
            f'height="{row_h - 8}" fill="#2f6fb0"><title>{html.escape(name)}: '
            f"{value * 100:.2f}%</title></rect>"
        )
        if metric.get("low") is not None and metric.get("high") is not None:
            x0 = label_w + bar_w * float(metric["low"]) / scale
            x1 = label_w + bar_w * float(metric["high"]) / scale
            mid = y + row_h / 2
            parts.append(
                f'<path d="M{x0:.1f},{mid:.1f} H{x1:.1f} M{x0:.1f},{mid - 5:.1f} V{mid + 5:.1f} '
                f'M{x1:.1f},{mid - 5:.1f} V{mid + 5:.1f}" stroke="#1f2933" stroke-width="1.2"/>'
            )
        parts.append(
            f'<text x="{label_w + bar_w + 8}" y="{y + 15}" font-size="12">{value * 100:.2f}%</text>'
        )
    width, height = label_w + bar_w + 70, row_h * len(rows) + 8
    # Every text above is escaped; the numbers are formatted floats.
    return mark_safe(
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(label)}">{"".join(parts)}</svg>'
    )


def _group_rows(groups: Mapping[str, Any], dimension: str) -> list[dict[str, Any]]:
    return online_rows(
        [
            (label, None, Counts.from_dict(groups[label]["counts"]), groups[label]["metrics"])
            for label in dimension_order(dimension, groups)
        ]
    )


def _difference(metric: Mapping[str, Any] | None, *, percent: bool) -> dict[str, str]:
    """A difference as signed text: percentage points for rates."""
    if not metric:
        return {"value": "-", "interval": ""}

    def show(x: float) -> str:
        return f"{x * 100:+.2f} pp" if percent else f"{x:+,.2f}"

    return {
        "value": show(metric["value"]),
        "interval": f"{show(metric['low'])} to {show(metric['high'])}",
    }


def _when(value: Any) -> str:
    """An ISO timestamp as ``YYYY-MM-DD HH:MM UTC`` (the stored form keeps microseconds)."""
    try:
        return datetime.fromisoformat(str(value)).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return str(value)


def _promotion_display(promotion: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not promotion:
        return None
    out: dict[str, Any] = {**promotion, "bases": []}
    for name in ("promoted_at", "ready_at"):
        if name in promotion:
            out[name] = _when(promotion[name])
    if promotion.get("status") != "ready":
        return out
    out["windows"] = {
        side: f"{_when(promotion[side]['start'])} to {_when(promotion[side]['end'])}"
        for side in ("before", "after")
    }
    for basis in (ATTRIBUTED, FEEDBACK):
        before = promotion["before"]["totals"][basis]
        after = promotion["after"]["totals"][basis]
        rows = [
            {
                "metric": title,
                "before": _with_interval(before["metrics"].get(name), percent=percent),
                "after": _with_interval(after["metrics"].get(name), percent=percent),
                "difference": _difference(
                    promotion["difference"][basis].get(name), percent=percent
                ),
            }
            for name, title, percent in COMPARED_METRICS
        ]
        out["bases"].append(
            {
                "name": basis,
                "title": BASIS_TITLES[basis],
                "rows": rows,
                "before_counts": before["counts"],
                "after_counts": after["counts"],
                "models_before": ", ".join(
                    promotion["before"]["breakdown"][basis]["model_version"]
                ),
                "models_after": ", ".join(promotion["after"]["breakdown"][basis]["model_version"]),
            }
        )
    return out


def online_report_display(
    report: OnlineEvaluationReport, trend: Sequence[OnlineEvaluationReport]
) -> dict[str, Any]:
    """Everything the daily report page shows, formatted: totals, each dimension per basis
    (with an SVG of the attributed CTR), the before/after comparison and the trend."""
    results = report.results or {}
    totals = results.get("totals") or {}
    breakdown = results.get("breakdown") or {}
    dimensions = []
    for dimension in DIMENSIONS:
        attributed = (breakdown.get(ATTRIBUTED) or {}).get(dimension)
        feedback = (breakdown.get(FEEDBACK) or {}).get(dimension)
        if attributed is None and feedback is None:
            continue
        order = dimension_order(dimension, attributed or feedback or {})
        dimensions.append(
            {
                "name": dimension,
                "title": DIMENSION_TITLES[dimension],
                "attributed": _group_rows(attributed or {}, dimension),
                "feedback": _group_rows(feedback or {}, dimension),
                "svg": svg_rate_bars(
                    [(label, (attributed or {})[label]["metrics"]["ctr"]) for label in order],
                    label=f"Attributed CTR by {dimension} with 95% intervals",
                )
                if attributed
                else "",
            }
        )
    trend_rows = []
    for day in trend:
        day_totals = (day.results or {}).get("totals") or {}
        attributed = day_totals.get(ATTRIBUTED)
        feedback = day_totals.get(FEEDBACK)
        trend_rows.append(
            {
                "report": day,
                "current": day.pk == report.pk,
                "requests": attributed["counts"]["requests"] if attributed else None,
                "impressions": attributed["counts"]["impressions"] if attributed else None,
                "ctr": _with_interval(
                    attributed["metrics"]["ctr"] if attributed else None, percent=True
                ),
                "cvr": _with_interval(
                    attributed["metrics"]["cvr_exposure"] if attributed else None, percent=True
                ),
                "gmv": _with_interval(
                    attributed["metrics"]["gmv_per_exposure"] if attributed else None, percent=False
                ),
                "feedback_ctr": _with_interval(
                    feedback["metrics"]["ctr"] if feedback else None, percent=True
                ),
                "metric": attributed["metrics"]["ctr"] if attributed else None,
            }
        )
    return {
        "has_breakdown": bool(breakdown),
        "totals": online_rows(
            [
                (BASIS_TITLES[b], None, Counts.from_dict(totals[b]["counts"]), totals[b]["metrics"])
                for b in (ATTRIBUTED, FEEDBACK)
                if b in totals
            ]
        ),
        "dimensions": dimensions,
        "attribution": (report.summary or {}).get("attribution") or {},
        "feedback": (report.summary or {}).get("feedback") or {},
        "promotion": _promotion_display(results.get("promotion")),
        "trend": trend_rows,
        "trend_svg": svg_rate_bars(
            [(r["report"].date.isoformat(), r["metric"]) for r in trend_rows],
            label="Attributed CTR per day with 95% intervals",
        )
        if any(r["metric"] for r in trend_rows)
        else "",
    }


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
            "attributed_latest_rows": _result_rows(results.attributed_latest_rows),
            "attributed_total_rows": _result_rows(results.attributed_total_rows),
            "can_compute": self.has_change_permission(request, experiment),
        }
        return TemplateResponse(request, "admin/experiments/experiment/results.html", context)

    def _compute_now(self, request: HttpRequest, experiment: Experiment) -> None:
        """Recompute today's report: on the broker when there is one, else here.

        The evaluation streams the day's exposures and the next day's (they compete for the
        last touch) at about 20 us per request of 10 items (measured: one day of 100,000
        requests, the next day's 100,000 and 100,000 interactions in 4.0 s), too slow for a
        request on a busy site, so a worker does it there; the embedded setup (no broker) has
        small logs.
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

    list_display = (
        "date",
        "requests",
        "attributed_ctr",
        "attribution_status",
        "variant_labels",
        "computed_at",
        "triggered_by",
        "seconds",
        "daily_report",
    )
    date_hierarchy = "date"
    readonly_fields = (
        "date",
        "daily_report",
        "window_start",
        "window_end",
        "computed_at",
        "triggered_by",
        "seconds",
        "attribution_summary",
        "variants_table",
        "feedback_summary",
    )
    exclude = ("results", "summary")

    def get_urls(self) -> list[Any]:
        custom = [
            path(
                "<int:object_id>/report/",
                self.admin_site.admin_view(self.report_view),
                name="experiments_onlineevaluationreport_report",
            ),
            path(
                "<int:object_id>/report.json",
                self.admin_site.admin_view(self.json_view),
                name="experiments_onlineevaluationreport_json",
            ),
        ]
        return custom + super().get_urls()

    def _viewable(self, request: HttpRequest, object_id: int) -> OnlineEvaluationReport:
        report = get_object_or_404(OnlineEvaluationReport, pk=object_id)
        if not self.has_view_permission(request, report):
            raise PermissionDenied
        return report

    def report_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        """The daily report as an HTML page: totals, every dimension per basis with inline SVG
        charts, the before/after comparison around the primary's promotion, the last 14 days."""
        report = self._viewable(request, object_id)
        context = {
            **self.admin_site.each_context(request),
            "title": f"Online evaluation of {report.date.isoformat()}",
            "opts": self.model._meta,
            "original": report,
            **online_report_display(report, online_reports_trend(day=report.date)),
        }
        return TemplateResponse(
            request, "admin/experiments/onlineevaluationreport/report.html", context
        )

    def json_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        """The JSON the computation wrote to DATA_DIR/evaluation/online-<date>.json."""
        report = self._viewable(request, object_id)
        file = services.online_report_json_path(report.date)
        if not file.is_file():
            raise Http404("The JSON file is missing; recompute the day (manage.py online_report).")
        return FileResponse(file.open("rb"), content_type="application/json")

    @admin.display(description="daily report")
    def daily_report(self, obj: OnlineEvaluationReport) -> str:
        return format_html(
            '<a href="{}" class="daily-report-link">HTML</a> · <a href="{}">JSON</a>',
            reverse("admin:experiments_onlineevaluationreport_report", args=[obj.pk]),
            reverse("admin:experiments_onlineevaluationreport_json", args=[obj.pk]),
        )

    @admin.display(description="attributed CTR")
    def attributed_ctr(self, obj: OnlineEvaluationReport) -> str:
        total = ((obj.results or {}).get("totals") or {}).get(ATTRIBUTED)
        ctr = total["metrics"]["ctr"] if total else None
        return _with_interval(ctr, percent=True)["value"]

    @admin.display(description="attribution window")
    def attribution_status(self, obj: OnlineEvaluationReport) -> str:
        found = (obj.summary or {}).get("attribution")
        if not found:
            return "-"
        return "complete" if found.get("complete") else "open"

    @admin.display(description="attribution")
    def attribution_summary(self, obj: OnlineEvaluationReport) -> str:
        found = (obj.summary or {}).get("attribution")
        if not found:
            return "Computed before attribution existed; recompute the day."
        status = (
            "complete"
            if found.get("complete")
            else f"open: recompute after {found.get('complete_after')} once the pipeline ran"
        )
        return (
            f"{found.get('credited_total', 0)} of {found.get('interactions', 0)} interactions "
            f"credited (last touch within {found.get('window_hours', 0):g} h): "
            f"{found.get('credited', {})}; {found.get('no_exposure', 0)} without an earlier "
            f"exposure, {found.get('expired', 0)} past the window, "
            f"{found.get('later_exposure', 0)} belonging to the next day; clean interactions as "
            f"of {found.get('interactions_as_of') or 'never'} ({status})."
        )

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
