"""Admin screens of the model registry: versions and their lifecycle actions, audit, evaluations.

Every lifecycle action calls one service and reports what happened with ``message_user``
(error level for a refusal, with the reasons). The service writes the ``ModelAudit`` row;
the admin also writes Django's ``LogEntry`` so the object's history page shows it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.db.models import QuerySet
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from apps.models import services
from apps.models.bundle import read_manifest
from apps.models.choices import AuditOutcome, ModelStatus
from apps.models.models import EvaluationReport, ModelAudit, ModelVersion
from apps.pipeline import tasks as pipeline_tasks

STATUS_COLOURS = {
    ModelStatus.CANDIDATE: "#6e7781",
    ModelStatus.SHADOW: "#8250df",
    ModelStatus.CANARY: "#bf8700",
    ModelStatus.PRIMARY: "#1a7f37",
    ModelStatus.ARCHIVED: "#57606a",
    ModelStatus.REJECTED: "#cf222e",
}
KEY_METRICS = ("ndcg@10", "recall@10", "auc")
ACTION_FORM_TEMPLATE = "admin/registry/modelversion/action_form.html"
# "Republish to Redis" waits this long for the sync (no broker) so the message can give its
# result; a slower sync carries on in the background and records its result in the history.
REDIS_SYNC_WAIT_SECONDS = 5.0


def _metric(metrics: dict[str, Any] | None, key: str) -> str:
    value = (metrics or {}).get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value:.4f}"


def _metric_column(key: str, *, field: str = "metrics") -> Callable[[Any, Any], str]:
    @admin.display(description=key)
    def column(self: Any, obj: Any) -> str:
        return _metric(getattr(obj, field), key)

    return column


def _json_block(value: Any) -> str:
    return format_html("<pre style='margin:0'>{}</pre>", json.dumps(value, indent=2, default=str))


def _actor(request: HttpRequest) -> str:
    return request.user.get_username() or "admin"


def _address(request: HttpRequest) -> str | None:
    return request.META.get("REMOTE_ADDR")


class CanaryShareForm(forms.Form):
    share = forms.FloatField(
        initial=0.1,
        min_value=0.0,
        max_value=services.MAX_CANARY_SHARE,
        help_text=f"Share of users sent to this version: above 0, at most {services.MAX_CANARY_SHARE}.",
    )
    reason = forms.CharField(required=False, max_length=500)

    def clean_share(self) -> float:
        share = self.cleaned_data["share"]
        if share <= 0:
            raise forms.ValidationError("The share must be above 0.")
        return share


class RejectForm(forms.Form):
    reason = forms.CharField(widget=forms.Textarea(attrs={"rows": 3, "cols": 60}), max_length=2000)


class ModelAuditInline(admin.TabularInline):
    model = ModelAudit
    extra = 0
    can_delete = False
    fields = ("created_at", "action", "outcome", "actor", "from_status", "to_status", "reason")
    readonly_fields = fields
    ordering = ("-created_at", "-id")
    verbose_name_plural = "audit trail"

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = (
        "version",
        "status_badge",
        "ndcg_at_10",
        "recall_at_10",
        "auc",
        "traffic",
        "quality_score",
        "created_at",
        "promoted_at",
    )
    list_filter = ("status",)
    search_fields = ("version", "mlflow_run_id")
    list_select_related = ("quality_report",)
    raw_id_fields = ("quality_report",)
    fieldsets = (
        (None, {"fields": ("version", "status", "traffic_share", "notes")}),
        ("Timeline", {"fields": ("created_at", "promoted_at", "archived_at")}),
        (
            "Training",
            {"fields": ("quality_report", "mlflow_run_id", "metrics_table", "schema_table")},
        ),
        ("Bundle", {"fields": ("bundle_path", "manifest_sha256", "manifest_summary")}),
    )
    readonly_fields = (
        "version",
        "status",
        "traffic_share",
        "created_at",
        "promoted_at",
        "archived_at",
        "quality_report",
        "mlflow_run_id",
        "metrics_table",
        "schema_table",
        "bundle_path",
        "manifest_sha256",
        "manifest_summary",
    )
    inlines = [ModelAuditInline]
    actions = [
        "promote_to_primary",
        "start_shadow",
        "set_canary_share",
        "roll_back",
        "reject",
        "republish_to_redis",
    ]

    ndcg_at_10 = _metric_column("ndcg@10")
    recall_at_10 = _metric_column("recall@10")
    auc = _metric_column("auc")

    # --- columns --------------------------------------------------------------------------

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: ModelVersion) -> str:
        return format_html(
            '<b style="color:#fff;background:{};padding:1px 6px;border-radius:8px">{}</b>',
            STATUS_COLOURS.get(obj.status, "#6e7781"),
            obj.get_status_display(),
        )

    @admin.display(description="traffic", ordering="traffic_share")
    def traffic(self, obj: ModelVersion) -> str:
        return f"{obj.traffic_share:.0%}" if obj.traffic_share else "-"

    @admin.display(description="data quality", ordering="quality_report__score")
    def quality_score(self, obj: ModelVersion) -> str:
        report = obj.quality_report
        if report is None:
            return "-"
        colour = "#1a7f37" if report.passed else "#cf222e"
        return format_html('<span style="color:{}">{}</span>', colour, f"{report.score:.1f}")

    @admin.display(description="metrics")
    def metrics_table(self, obj: ModelVersion) -> str:
        if not obj.metrics:
            return "-"
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td></tr>", ((k, v) for k, v in sorted(obj.metrics.items()))
        )
        return format_html("<table><tbody>{}</tbody></table>", rows)

    @admin.display(description="feature schema")
    def schema_table(self, obj: ModelVersion) -> str:
        if not obj.feature_schema:
            return "-"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (i, f.get("name"), f.get("dtype") or "")
                for i, f in enumerate(obj.feature_schema)
                if isinstance(f, dict)
            ),
        )
        return format_html(
            "<table><thead><tr><th>#</th><th>name</th><th>dtype</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            rows,
        )

    @admin.display(description="manifest")
    def manifest_summary(self, obj: ModelVersion) -> str:
        try:
            manifest = read_manifest(obj.bundle_path)
        except (OSError, ValueError) as exc:
            return f"unreadable: {exc}"
        summary = {
            "version": manifest.get("version"),
            "created_at": manifest.get("created_at"),
            "data_snapshot": manifest.get("data_snapshot"),
            "params": manifest.get("params"),
            "files": sorted(manifest["files"]),
        }
        return _json_block(summary)

    # --- actions --------------------------------------------------------------------------

    def _single(
        self, request: HttpRequest, queryset: QuerySet[ModelVersion], verb: str
    ) -> ModelVersion | None:
        versions = list(queryset[:2])
        if len(versions) != 1:
            self.message_user(request, f"{verb}: select exactly one version.", messages.WARNING)
            return None
        return versions[0]

    def _apply(
        self,
        request: HttpRequest,
        version: ModelVersion,
        verb: str,
        call: Callable[[], services.Transition],
        done: Callable[[services.Transition], str],
    ) -> bool:
        """Call a service; report and log the change, or the refusal and its reasons."""
        try:
            transition = call()
        except services.ModelActionRefused as exc:
            reasons = "; ".join(exc.reasons)
            self.message_user(
                request, f"{verb} {version.version} refused: {reasons}", messages.ERROR
            )
            self.log_change(request, version, f"{verb} refused: {reasons}")
            return False
        text = done(transition)
        skipped = [f"{r.name} ({r.reason})" for r in transition.results if r.skipped]
        if transition.results:
            count = len(transition.results)
            text += f" {count} gate{'s' if count != 1 else ''} passed"
            text += f"; skipped: {', '.join(skipped)}." if skipped else "."
        self.message_user(request, text, messages.SUCCESS)
        self.log_change(request, transition.version, text)
        if transition.replaced is not None:
            self.log_change(
                request,
                transition.replaced,
                f"Archived: {transition.version.version} became the primary ({verb.lower()}).",
            )
        return True

    def _form_page(
        self,
        request: HttpRequest,
        queryset: QuerySet[ModelVersion],
        *,
        action: str,
        title: str,
        form: forms.Form,
        submit: str,
    ) -> TemplateResponse:
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.model._meta,
            "objects": list(queryset),
            "form": form,
            "action": action,
            "submit": submit,
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, ACTION_FORM_TEMPLATE, context)

    @admin.action(description="Promote to primary", permissions=["change"])
    def promote_to_primary(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> None:
        version = self._single(request, queryset, "Promote")
        if version is None:
            return

        def done(t: services.Transition) -> str:
            archived = f" ({t.replaced.version} archived)" if t.replaced else ""
            return f"Promoted {t.version.version} to primary{archived}."

        self._apply(
            request,
            version,
            "Promotion of",
            lambda: services.model_version_promote(
                version_id=version.pk, actor=_actor(request), address=_address(request)
            ),
            done,
        )

    @admin.action(description="Start shadow", permissions=["change"])
    def start_shadow(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> None:
        version = self._single(request, queryset, "Start shadow")
        if version is None:
            return
        self._apply(
            request,
            version,
            "Shadow start of",
            lambda: services.model_version_start_shadow(
                version_id=version.pk, actor=_actor(request), address=_address(request)
            ),
            lambda t: (
                f"{t.version.version} now runs in shadow (scored in the background, never shown)."
            ),
        )

    @admin.action(description="Set canary share", permissions=["change"])
    def set_canary_share(
        self, request: HttpRequest, queryset: QuerySet[ModelVersion]
    ) -> TemplateResponse | None:
        version = self._single(request, queryset, "Set canary share")
        if version is None:
            return None
        if "apply" in request.POST:
            form = CanaryShareForm(request.POST)
            if form.is_valid():
                share = form.cleaned_data["share"]
                self._apply(
                    request,
                    version,
                    "Canary of",
                    lambda: services.model_version_set_canary(
                        version_id=version.pk,
                        share=share,
                        actor=_actor(request),
                        address=_address(request),
                        reason=form.cleaned_data["reason"],
                    ),
                    lambda t: (
                        f"{t.version.version} is the canary at {t.version.traffic_share:.0%} of traffic."
                    ),
                )
                return None
        else:
            form = CanaryShareForm()
        return self._form_page(
            request,
            queryset,
            action="set_canary_share",
            title=f"Set the canary share of {version.version}",
            form=form,
            submit="Set canary share",
        )

    @admin.action(description="Roll back the primary", permissions=["change"])
    def roll_back(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> None:
        # The selection names the primary being rolled back: if another operator changed the
        # primary since this page was loaded, the rollback is refused instead of undoing that.
        primary = queryset.filter(status=ModelStatus.PRIMARY).first()
        if primary is None:
            self.message_user(
                request, "Roll back: select the current primary to roll it back.", messages.WARNING
            )
            return

        def done(t: services.Transition) -> str:
            return f"Rolled back: {t.version.version} is the primary again ({t.replaced.version} archived)."

        self._apply(
            request,
            primary,
            "Rollback of",
            lambda: services.model_version_rollback(
                actor=_actor(request),
                address=_address(request),
                expected_primary_id=primary.pk,
            ),
            done,
        )

    @admin.action(description="Reject", permissions=["change"])
    def reject(
        self, request: HttpRequest, queryset: QuerySet[ModelVersion]
    ) -> TemplateResponse | None:
        if "apply" in request.POST:
            form = RejectForm(request.POST)
            if form.is_valid():
                for version in queryset.order_by("pk"):
                    self._apply(
                        request,
                        version,
                        "Rejection of",
                        lambda v=version: services.model_version_reject(
                            version_id=v.pk,
                            actor=_actor(request),
                            address=_address(request),
                            reason=form.cleaned_data["reason"],
                        ),
                        lambda t: f"Rejected {t.version.version}.",
                    )
                return None
        else:
            form = RejectForm()
        return self._form_page(
            request,
            queryset,
            action="reject",
            title="Reject model versions",
            form=form,
            submit="Reject",
        )

    @admin.action(description="Republish to Redis (sync only)", permissions=["change"])
    def republish_to_redis(self, request: HttpRequest, queryset: QuerySet[ModelVersion]) -> None:
        """``manage.py sync_redis`` from the admin: the primary's lists and features, no training."""
        # As for a rollback, the selection names the primary, so a stale page cannot publish
        # a version that stopped being the primary since it was loaded.
        primary = queryset.filter(status=ModelStatus.PRIMARY).first()
        if primary is None:
            self.message_user(
                request, "Republish to Redis: select the current primary.", messages.WARNING
            )
            return
        self.log_change(request, primary, "Republish to Redis requested.")
        how, result = pipeline_tasks.enqueue_primary_sync_to_redis(
            version_id=primary.pk, user_id=request.user.pk, wait_seconds=REDIS_SYNC_WAIT_SECONDS
        )
        if result is None:
            self.message_user(
                request,
                f"Republish of {primary.version} to Redis {how}; its history will show the result.",
                messages.INFO,
            )
            return
        succeeded, text = result
        self.message_user(request, text, messages.SUCCESS if succeeded else messages.ERROR)

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Versions are registered by the training pipeline (model_version_register).
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # The audit trail references every version; archive or reject instead.
        return False


@admin.register(ModelAudit)
class ModelAuditAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "action",
        "version",
        "outcome_badge",
        "actor",
        "address",
        "transition",
        "reason_line",
    )
    list_filter = ("action", "outcome")
    search_fields = ("version", "actor", "reason")
    date_hierarchy = "created_at"
    readonly_fields = (
        "created_at",
        "model_version",
        "version",
        "action",
        "outcome",
        "actor",
        "address",
        "from_status",
        "to_status",
        "reason",
        "gates_table",
    )
    exclude = ("gates",)

    @admin.display(description="outcome", ordering="outcome")
    def outcome_badge(self, obj: ModelAudit) -> str:
        colour = "#1a7f37" if obj.outcome == AuditOutcome.APPLIED else "#cf222e"
        return format_html('<b style="color:{}">{}</b>', colour, obj.get_outcome_display())

    @admin.display(description="from -> to")
    def transition(self, obj: ModelAudit) -> str:
        return f"{obj.from_status or '-'} -> {obj.to_status or '-'}"

    @admin.display(description="reason")
    def reason_line(self, obj: ModelAudit) -> str:
        return obj.reason if len(obj.reason) <= 120 else obj.reason[:117] + "..."

    @admin.display(description="gates")
    def gates_table(self, obj: ModelAudit) -> str:
        if not obj.gates:
            return "-"
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    g.get("name"),
                    "skipped" if g.get("skipped") else ("pass" if g.get("passed") else "FAIL"),
                    g.get("reason"),
                )
                for g in obj.gates
            ),
        )
        return format_html(
            "<table><thead><tr><th>gate</th><th>result</th><th>reason</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            rows,
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _report_file(value: str) -> Path:
    file = Path(value) if value else None
    if file is None or not file.is_file():
        raise Http404("The report file is missing; re-run the evaluation.")
    return file


@admin.register(EvaluationReport)
class EvaluationReportAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "created_at",
        "model_version",
        "protocol",
        "dataset",
        "k",
        "ndcg_at_10",
        "recall_at_10",
        "auc",
        "popular_ndcg_at_10",
        "compared_to",
        "report_link",
    )
    list_filter = ("protocol",)
    search_fields = ("model_version__version", "dataset")
    list_select_related = ("model_version", "compared_to")
    raw_id_fields = ("model_version", "compared_to")
    readonly_fields = (
        "model_version",
        "compared_to",
        "protocol",
        "dataset",
        "k",
        "created_at",
        "report_link",
        "metrics_block",
        "per_channel_block",
        "baseline_block",
    )
    exclude = ("metrics", "per_channel", "baseline", "html_path", "json_path")

    ndcg_at_10 = _metric_column("ndcg@10")
    recall_at_10 = _metric_column("recall@10")
    auc = _metric_column("auc")

    @admin.display(description="popular ndcg@10")
    def popular_ndcg_at_10(self, obj: EvaluationReport) -> str:
        baseline = obj.baseline.get("popular") if isinstance(obj.baseline, dict) else None
        return _metric(baseline if isinstance(baseline, dict) else None, "ndcg@10")

    @admin.display(description="report")
    def report_link(self, obj: EvaluationReport) -> str:
        links = []
        if obj.html_path:
            url = reverse("admin:registry_evaluationreport_file", args=[obj.pk, "html"])
            links.append(format_html('<a href="{}" target="_blank">HTML report</a>', url))
        if obj.json_path:
            url = reverse("admin:registry_evaluationreport_file", args=[obj.pk, "json"])
            links.append(format_html('<a href="{}">JSON</a>', url))
        return format_html_join(" · ", "{}", ((link,) for link in links)) if links else "-"

    @admin.display(description="metrics")
    def metrics_block(self, obj: EvaluationReport) -> str:
        return _json_block(obj.metrics)

    @admin.display(description="per channel")
    def per_channel_block(self, obj: EvaluationReport) -> str:
        return _json_block(obj.per_channel)

    @admin.display(description="baselines")
    def baseline_block(self, obj: EvaluationReport) -> str:
        return _json_block(obj.baseline)

    def get_urls(self):
        custom = [
            path(
                "<int:pk>/report.<str:kind>",
                self.admin_site.admin_view(self.report_file_view),
                name="registry_evaluationreport_file",
            )
        ]
        return custom + super().get_urls()

    def report_file_view(self, request: HttpRequest, pk: int, kind: str) -> HttpResponse:
        """The evaluation's HTML or JSON file, as written by the evaluation step."""
        if not self.has_view_permission(request) or kind not in ("html", "json"):
            raise Http404
        report = get_object_or_404(EvaluationReport, pk=pk)
        file = _report_file(report.html_path if kind == "html" else report.json_path)
        content_type = "text/html" if kind == "html" else "application/json"
        return FileResponse(file.open("rb"), content_type=content_type)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
