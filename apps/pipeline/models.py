"""Pipeline records: runs and their stages, extraction watermarks and locks, quality reports.

These rows are what operators read in the admin to see what happened. They hold no logic:
services.py writes them, the pure core never sees them.
"""

from __future__ import annotations

from django.db import models


class RunStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    SKIPPED = "skipped", "Skipped"


class Stage(models.TextChoices):
    EXTRACT_BUSINESS = "extract_business", "Extract business DB"
    EXTRACT_MATOMO = "extract_matomo", "Extract Matomo DB"
    CANONICALIZE = "canonicalize", "Map to canonical entities"
    QUALITY = "quality", "Data quality"
    CLEAN = "clean", "Clean"
    TRAIN = "train", "Train and register a model"
    EVALUATE = "evaluate", "Evaluate (stratified protocol)"


class PipelineRun(models.Model):
    """One run of the offline pipeline (or of a single stage), like a NetBox Job."""

    kind = models.CharField(max_length=32, default="incremental")
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.PENDING)
    triggered_by = models.CharField(max_length=64, default="manual")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["status", "kind"])]

    def __str__(self) -> str:
        return f"Run #{self.pk} ({self.kind}, {self.status})"

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None


class PipelineTriggerLock(models.Model):
    """The row every trigger of one pipeline kind locks while it decides whether to start a run.

    ``services.pipeline_run_trigger`` updates this row first inside its transaction (a row lock
    on MariaDB/PostgreSQL, the database's write lock on SQLite), then looks for a pending or
    running run of the kind and creates one only if there is none: concurrent triggers (two
    beats, a redelivered task, an operator) queue on the row and the later ones find the run.
    """

    kind = models.CharField(max_length=32, unique=True)
    triggered_at = models.DateTimeField(null=True, blank=True)
    last_run_id = models.BigIntegerField(null=True, blank=True)
    # The trigger (a Celery task id) that created the last run: delivered again, it gets its
    # run back instead of being skipped because of it.
    last_trigger_id = models.CharField(max_length=255, blank=True, default="")
    triggers = models.PositiveIntegerField(default=0)
    skipped = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"trigger lock {self.kind} (last run #{self.last_run_id})"


class StageRun(models.Model):
    """One stage of a pipeline run: status, timings, row counts, details and error text.

    A pipeline run has at most one row per stage, reused by every attempt (retries, a
    redelivered task taking over from a dead worker). ``owner`` names the process running it
    and ``heartbeat_at`` shows it is alive; both are only claimed with conditional UPDATEs.
    """

    pipeline_run = models.ForeignKey(
        PipelineRun, on_delete=models.CASCADE, related_name="stages", null=True, blank=True
    )
    stage = models.CharField(max_length=32, choices=Stage.choices)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.PENDING)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    rows_in = models.BigIntegerField(default=0)
    rows_out = models.BigIntegerField(default=0)
    detail = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True, default="")
    # "host:pid:task" of the attempt that holds the stage; empty when nobody does.
    owner = models.CharField(max_length=255, blank=True, default="")
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["stage", "status"])]
        constraints = [
            # Stand-alone stage runs (no pipeline run) are not limited: NULLs never collide.
            models.UniqueConstraint(fields=["pipeline_run", "stage"], name="uniq_stage_per_run")
        ]

    def __str__(self) -> str:
        return f"{self.get_stage_display()} #{self.pk} ({self.status})"

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at and self.finished_at:
            return (self.finished_at - self.started_at).total_seconds()
        return None


class Watermark(models.Model):
    """How far a source table has been extracted.

    ``value`` is the cursor position: ``{"kind": "timestamp", "ts": ...}`` (the upper bound of
    the last window read) or ``{"kind": "id", "id": n}``; ``kind`` lets the extractor refuse a
    watermark left over from a different cursor type.
    It is only ever changed with a compare-and-set on ``version`` by a holder whose fencing
    token is not older than ``fence_token``, so a stale or concurrent run cannot move it.
    """

    source = models.CharField(max_length=64)
    table = models.CharField(max_length=128)
    value = models.JSONField(null=True, blank=True)
    version = models.BigIntegerField(default=0)
    fence_token = models.BigIntegerField(default=0)
    rows_total = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)
    last_reconciled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["source", "table"], name="uniq_watermark")]
        ordering = ["source", "table"]

    def __str__(self) -> str:
        return f"{self.source}.{self.table} @ {self.value}"


class ExtractionLock(models.Model):
    """A lease with a fencing token: two extractions of one source never overlap.

    Taking the lock is one conditional UPDATE (free or expired), which also increments
    ``token``; the token travels with the run and fences its watermark writes.
    """

    name = models.CharField(max_length=128, unique=True)
    holder = models.CharField(max_length=128, blank=True, default="")
    token = models.BigIntegerField(default=0)
    acquired_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.holder or 'free'})"


class ExtractionRun(models.Model):
    """What one extraction of one table read, wrote and where it moved the watermark."""

    stage_run = models.ForeignKey(StageRun, on_delete=models.CASCADE, related_name="extractions")
    source = models.CharField(max_length=64)
    table = models.CharField(max_length=128)
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.RUNNING)
    rows_read = models.BigIntegerField(default=0)
    rows_written = models.BigIntegerField(default=0)
    rows_deleted = models.BigIntegerField(default=0)
    watermark_from = models.JSONField(null=True, blank=True)
    watermark_to = models.JSONField(null=True, blank=True)
    upper_bound = models.CharField(max_length=64, blank=True, default="")
    seconds = models.FloatField(default=0.0)
    error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.source}.{self.table} ({self.status})"


class DataQualityReport(models.Model):
    """A data-quality score (0-100) with its checks; below the threshold it blocks training."""

    stage_run = models.ForeignKey(
        StageRun, on_delete=models.SET_NULL, null=True, blank=True, related_name="quality_reports"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    score = models.FloatField()
    threshold = models.FloatField()
    passed = models.BooleanField()
    checks = models.JSONField(default=list)
    summary = models.JSONField(default=dict)
    html_path = models.CharField(max_length=500, blank=True, default="")
    json_path = models.CharField(max_length=500, blank=True, default="")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"Quality {self.score:.1f} ({'pass' if self.passed else 'fail'}) #{self.pk}"
