"""Admin screens of experiments: experiments with their variants inline, lifecycle actions, and
YAML export.

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
from django.contrib import admin, messages
from django.db.models import Count, QuerySet, Sum
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponse
from django.utils.html import format_html

from apps.experiments import services
from apps.experiments.bucketing import BUCKETS
from apps.experiments.choices import ExperimentStatus
from apps.experiments.models import Experiment, Variant
from apps.experiments.params import ParamsError, clean_params
from apps.experiments.selectors import experiments_with_variants
from apps.experiments.yaml_io import dump_experiments_yaml

STATUS_COLOURS = {
    ExperimentStatus.DRAFT: "#6e7781",
    ExperimentStatus.RUNNING: "#1a7f37",
    ExperimentStatus.PAUSED: "#bf8700",
    ExperimentStatus.STOPPED: "#57606a",
}


def _percent(points: int | None) -> str:
    return f"{(points or 0) / 100:g}%"


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
