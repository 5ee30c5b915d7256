"""Admin screens for what the pipeline did: runs, stages, watermarks, extractions, quality."""

from __future__ import annotations

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponseRedirect
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from apps.pipeline import services, tasks
from apps.pipeline.models import (
    DataQualityReport,
    ExtractionLock,
    ExtractionRun,
    PipelineRun,
    StageRun,
    Watermark,
)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} s"


class RecordAdmin(admin.ModelAdmin):
    """Pipeline rows are records of what happened: the pipeline writes them, nobody adds them."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


class RecordInline(admin.TabularInline):
    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


class StageRunInline(RecordInline):
    model = StageRun
    fields = ("stage", "status", "started_at", "duration", "rows_in", "rows_out", "error_line")
    readonly_fields = fields
    ordering = ("id",)

    @admin.display(description="duration")
    def duration(self, obj: StageRun) -> str:
        return _seconds(obj.duration_seconds)

    @admin.display(description="error")
    def error_line(self, obj: StageRun) -> str:
        return obj.error.splitlines()[0] if obj.error else ""


@admin.register(PipelineRun)
class PipelineRunAdmin(RecordAdmin):
    list_display = (
        "id",
        "kind",
        "status",
        "triggered_by",
        "created_at",
        "duration",
        "stage_count",
        "error_line",
    )
    list_filter = ("status", "kind")
    readonly_fields = (
        "kind",
        "status",
        "triggered_by",
        "created_at",
        "started_at",
        "finished_at",
        "error",
    )
    inlines = [StageRunInline]
    actions = ["run_pipeline_now"]
    change_list_template = "admin/pipeline/pipelinerun/change_list.html"

    def get_urls(self):
        custom = [
            path(
                "run-now/",
                self.admin_site.admin_view(self.run_now_view),
                name="pipeline_pipelinerun_run_now",
            )
        ]
        return custom + super().get_urls()

    def run_now_view(self, request: HttpRequest) -> HttpResponseRedirect:
        """POST-only button on the changelist: queue a full pipeline run."""
        if request.method != "POST":
            return HttpResponseRedirect(reverse("admin:pipeline_pipelinerun_changelist"))
        if not self.has_change_permission(request):
            raise PermissionDenied
        self._queue_run(request)
        return HttpResponseRedirect(reverse("admin:pipeline_pipelinerun_changelist"))

    def _queue_run(self, request: HttpRequest) -> None:
        run = services.pipeline_run_trigger(kind="manual", triggered_by=f"admin:{request.user}")
        if run is None:  # a double click, or two operators at once: one run
            active = services.pipeline_run_active(kind="manual")
            self.message_user(
                request,
                f"Pipeline run #{active.pk if active else '?'} is already pending or running; "
                "nothing was queued.",
                messages.WARNING,
            )
            return
        how = tasks.enqueue_pipeline_run(run.pk)
        self.message_user(request, f"Pipeline run #{run.pk} {how}.", messages.SUCCESS)

    def get_queryset(self, request: HttpRequest) -> QuerySet[PipelineRun]:
        return super().get_queryset(request).annotate(_stages=Count("stages"))

    @admin.display(description="stages", ordering="_stages")
    def stage_count(self, obj: PipelineRun) -> int:
        return obj._stages

    @admin.display(description="duration")
    def duration(self, obj: PipelineRun) -> str:
        return _seconds(obj.duration_seconds)

    @admin.display(description="error")
    def error_line(self, obj: PipelineRun) -> str:
        return obj.error.splitlines()[0] if obj.error else ""

    @admin.action(description="Run pipeline now")
    def run_pipeline_now(self, request: HttpRequest, queryset: QuerySet[PipelineRun]) -> None:
        self._queue_run(request)


class ExtractionRunInline(RecordInline):
    model = ExtractionRun
    fields = (
        "source",
        "table",
        "status",
        "rows_read",
        "rows_written",
        "rows_deleted",
        "watermark_from",
        "watermark_to",
        "seconds",
    )
    readonly_fields = fields


@admin.register(StageRun)
class StageRunAdmin(RecordAdmin):
    list_display = (
        "id",
        "stage",
        "status",
        "pipeline_run",
        "started_at",
        "duration",
        "rows_in",
        "rows_out",
    )
    list_filter = ("stage", "status")
    list_select_related = ("pipeline_run",)
    raw_id_fields = ("pipeline_run",)
    readonly_fields = (
        "pipeline_run",
        "stage",
        "status",
        "started_at",
        "finished_at",
        "rows_in",
        "rows_out",
        "detail",
        "error",
    )
    inlines = [ExtractionRunInline]

    @admin.display(description="duration")
    def duration(self, obj: StageRun) -> str:
        return _seconds(obj.duration_seconds)


@admin.register(Watermark)
class WatermarkAdmin(RecordAdmin):
    list_display = (
        "source",
        "table",
        "value",
        "version",
        "fence_token",
        "rows_total",
        "updated_at",
        "last_reconciled_at",
    )
    list_filter = ("source",)
    readonly_fields = (
        "source",
        "table",
        "value",
        "version",
        "fence_token",
        "rows_total",
        "updated_at",
        "last_reconciled_at",
    )


@admin.register(ExtractionLock)
class ExtractionLockAdmin(RecordAdmin):
    list_display = ("name", "holder", "token", "acquired_at", "expires_at")
    readonly_fields = ("name", "holder", "token", "acquired_at", "expires_at")


@admin.register(ExtractionRun)
class ExtractionRunAdmin(RecordAdmin):
    list_display = (
        "id",
        "source",
        "table",
        "status",
        "rows_read",
        "rows_written",
        "rows_deleted",
        "seconds",
        "created_at",
    )
    list_filter = ("source", "status", "table")
    raw_id_fields = ("stage_run",)
    readonly_fields = [f.name for f in ExtractionRun._meta.fields]


@admin.register(DataQualityReport)
class DataQualityReportAdmin(RecordAdmin):
    list_display = (
        "id",
        "created_at",
        "score_badge",
        "threshold",
        "passed",
        "failing_checks",
        "report_link",
    )
    list_filter = ("passed",)
    raw_id_fields = ("stage_run",)
    readonly_fields = (
        "created_at",
        "score",
        "threshold",
        "passed",
        "report_link",
        "checks_table",
        "summary",
    )
    exclude = ("checks", "html_path", "json_path")

    @admin.display(description="score", ordering="score")
    def score_badge(self, obj: DataQualityReport) -> str:
        colour = "#1a7f37" if obj.passed else "#cf222e"
        return format_html('<b style="color:{}">{}</b>', colour, f"{obj.score:.1f}")

    @admin.display(description="failing checks")
    def failing_checks(self, obj: DataQualityReport) -> str:
        return ", ".join(c["name"] for c in obj.checks if c.get("status") == "fail") or "-"

    @admin.display(description="report")
    def report_link(self, obj: DataQualityReport) -> str:
        if not obj.html_path:
            return "-"
        return format_html(
            '<a href="{}" target="_blank">HTML report</a> · <a href="{}">JSON</a>',
            reverse("pipeline:quality-report", args=[obj.pk]),
            reverse("pipeline:quality-report-json", args=[obj.pk]),
        )

    @admin.display(description="checks")
    def checks_table(self, obj: DataQualityReport) -> str:
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (c.get("name"), c.get("status"), c.get("observed"), c.get("message"))
                for c in obj.checks
            ),
        )
        return format_html(
            "<table><thead><tr><th>check</th><th>status</th><th>observed</th><th>message</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            rows,
        )
