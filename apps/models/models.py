"""Registry records: model versions, their audit trail, and offline evaluation reports.

These rows hold no logic. ``services.py`` is the only writer of lifecycle fields (status,
traffic share, promotion and archive times) and writes a ``ModelAudit`` row for every request,
applied or refused.
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q

from apps.models.choices import AuditAction, AuditOutcome, EvaluationProtocol, ModelStatus


class ModelVersion(models.Model):
    """One trained model bundle and where it is in its lifecycle.

    ``feature_schema`` is the ordered list of ``{"name": ..., "dtype": ...}`` the ranker
    expects; ``metrics`` are its offline metrics (``ndcg@10``, ``recall@10``, ``auc``, ...);
    ``manifest_sha256`` fingerprints the bundle's manifest at registration, so a manifest
    rewritten later (with fresh checksums) is still detected.
    """

    version = models.CharField(max_length=64, unique=True)
    status = models.CharField(
        max_length=16, choices=ModelStatus.choices, default=ModelStatus.CANDIDATE, db_index=True
    )
    created_at = models.DateTimeField(auto_now_add=True)
    bundle_path = models.CharField(max_length=500)
    mlflow_run_id = models.CharField(max_length=64, blank=True, default="")
    metrics = models.JSONField(default=dict, blank=True)
    quality_report = models.ForeignKey(
        "pipeline.DataQualityReport",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="model_versions",
        help_text="The data-quality report the training data passed.",
    )
    traffic_share = models.FloatField(
        default=0.0, help_text="Share of user traffic served (1.0 for the primary)."
    )
    feature_schema = models.JSONField(default=list, blank=True)
    manifest_sha256 = models.CharField(max_length=64, blank=True, default="")
    promoted_at = models.DateTimeField(
        null=True, blank=True, help_text="When it last became primary."
    )
    archived_at = models.DateTimeField(
        null=True, blank=True, help_text="When it last stopped being primary (rollback order)."
    )
    notes = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            # Partial unique indexes: enforced by SQLite and PostgreSQL. MySQL/MariaDB have no
            # partial indexes (Django skips these there, check models.W036); the services also
            # lock the rows they change, which covers every case except two concurrent first
            # promotions on MySQL.
            models.UniqueConstraint(
                fields=["status"],
                condition=Q(status=ModelStatus.PRIMARY),
                name="registry_one_primary",
            ),
            models.UniqueConstraint(
                fields=["status"],
                condition=Q(status=ModelStatus.CANARY),
                name="registry_one_canary",
            ),
            models.UniqueConstraint(
                fields=["status"],
                condition=Q(status=ModelStatus.SHADOW),
                name="registry_one_shadow",
            ),
            models.CheckConstraint(
                condition=Q(traffic_share__gte=0.0) & Q(traffic_share__lte=1.0),
                name="registry_traffic_share_0_1",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.version} ({self.status})"

    @property
    def feature_names(self) -> list[str]:
        return [str(f["name"]) if isinstance(f, dict) else str(f) for f in self.feature_schema]


class ModelAudit(models.Model):
    """One lifecycle request against the registry: who asked, from where, and what happened.

    Written for refusals too, so the table answers "who tried to promote what, and why was it
    refused" as well as "what changed". The admin's LogEntry only sees admin actions; this
    table also sees tasks, commands and the API.
    """

    model_version = models.ForeignKey(
        ModelVersion,
        # A version with history cannot be deleted: archive or reject it instead.
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="audits",
    )
    # The version string at the time, so a row stays readable on its own.
    version = models.CharField(max_length=64, blank=True, default="")
    action = models.CharField(max_length=16, choices=AuditAction.choices)
    actor = models.CharField(max_length=150, default="system")
    address = models.GenericIPAddressField(null=True, blank=True)
    from_status = models.CharField(max_length=16, blank=True, default="")
    to_status = models.CharField(max_length=16, blank=True, default="")
    outcome = models.CharField(max_length=16, choices=AuditOutcome.choices)
    reason = models.TextField(blank=True, default="")
    gates = models.JSONField(default=list, blank=True, help_text="Gate results, when gates ran.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["action", "outcome"])]

    def __str__(self) -> str:
        return f"{self.action} {self.version or '-'} by {self.actor}: {self.outcome}"


class EvaluationReport(models.Model):
    """An offline evaluation of a model version, with baselines and the primary it was compared to."""

    model_version = models.ForeignKey(
        ModelVersion,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="evaluations",
    )
    protocol = models.CharField(
        max_length=16, choices=EvaluationProtocol.choices, default=EvaluationProtocol.TIME
    )
    dataset = models.CharField(max_length=200, blank=True, default="")
    k = models.PositiveIntegerField(default=10)
    metrics = models.JSONField(default=dict, blank=True)
    per_channel = models.JSONField(default=dict, blank=True)
    baseline = models.JSONField(
        default=dict, blank=True, help_text="Popularity and other baselines."
    )
    compared_to = models.ForeignKey(
        ModelVersion,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="The primary at the time of the evaluation.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    html_path = models.CharField(max_length=500, blank=True, default="")
    json_path = models.CharField(max_length=500, blank=True, default="")

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        target = self.model_version.version if self.model_version_id else "-"
        return f"Evaluation #{self.pk} of {target} ({self.protocol}, k={self.k})"
