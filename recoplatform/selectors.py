"""Reads behind the operator dashboard (``recoplatform.dashboard``): one function per panel.

Each panel is a bounded number of queries whatever the data size: the latest run per kind (two
queries with its stages), the latest stand-alone stage runs (one), the live model versions
(one), the running experiments (two), the latest quality and online reports (one each).
Serving health reads the exposure log's last hour from its end, so its cost follows the hour's
traffic, not the size of the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Max, Prefetch, QuerySet
from django.utils import timezone

from apps.experiments.choices import ExperimentStatus
from apps.experiments.models import Experiment, OnlineEvaluationReport
from apps.experiments.online import DEFAULT_HEALTH_MAX_RECORDS as HEALTH_MAX_RECORDS
from apps.experiments.online import ServingHealth, serving_health
from apps.experiments.selectors import experiments_with_variants, online_report_latest
from apps.models.choices import ModelStatus
from apps.models.models import ModelVersion
from apps.pipeline.models import DataQualityReport, PipelineRun, StageRun

LIVE_STATUSES = (ModelStatus.PRIMARY, ModelStatus.CANARY, ModelStatus.SHADOW)
HEALTH_WINDOW = timedelta(hours=1)


def pipeline_latest_runs() -> list[PipelineRun]:
    """The most recent run of each kind (incremental, full, manual, ...) with its stages in
    run order, kinds in name order."""
    # order_by(): the default ordering would otherwise join the GROUP BY.
    latest = PipelineRun.objects.order_by().values("kind").annotate(last=Max("id")).values("last")
    return list(
        PipelineRun.objects.filter(id__in=latest)
        .prefetch_related(Prefetch("stages", queryset=StageRun.objects.order_by("id")))
        .order_by("kind")
    )


def stage_runs_standalone_latest() -> list[StageRun]:
    """The most recent stand-alone run of each stage (scheduled or run by hand outside a
    pipeline run, like the quarter-hourly quality snapshot), stages in name order."""
    latest = (
        StageRun.objects.filter(pipeline_run__isnull=True)
        .order_by()
        .values("stage")
        .annotate(last=Max("id"))
        .values("last")
    )
    return list(StageRun.objects.filter(id__in=latest).order_by("stage"))


def model_versions_live() -> list[ModelVersion]:
    """The primary, canary and shadow versions (those that exist), in that order."""
    rows = ModelVersion.objects.filter(status__in=LIVE_STATUSES).select_related("quality_report")
    rank = {status: i for i, status in enumerate(LIVE_STATUSES)}
    return sorted(rows, key=lambda v: rank[v.status])


def experiments_running() -> QuerySet[Experiment]:
    """Running experiments with their variants (bucket order) prefetched."""
    return experiments_with_variants().filter(status=ExperimentStatus.RUNNING)


def quality_report_latest() -> DataQualityReport | None:
    """The most recent data-quality report."""
    return DataQualityReport.objects.order_by("-created_at", "-id").first()


def serving_health_recent(*, now: datetime | None = None) -> ServingHealth:
    """What the exposure log says about the last hour (its newest ``RECO
    ["DASHBOARD_HEALTH_MAX_RECORDS"]`` requests at most, default 100,000: about a second)."""
    from apps.serving.exposure import default_path

    now = now or timezone.now()
    cap = getattr(settings, "RECO", {}).get("DASHBOARD_HEALTH_MAX_RECORDS", HEALTH_MAX_RECORDS)
    return serving_health(default_path(), since=now - HEALTH_WINDOW, until=now, max_records=cap)


@dataclass(frozen=True)
class Dashboard:
    """Everything the operator dashboard shows."""

    now: datetime
    runs: list[PipelineRun]
    standalone: list[StageRun]
    models: list[ModelVersion]
    experiments: list[Experiment]
    quality: DataQualityReport | None
    online: OnlineEvaluationReport | None
    health: ServingHealth


def dashboard_read(*, now: datetime | None = None) -> Dashboard:
    """Read every panel of the dashboard."""
    now = now or timezone.now()
    return Dashboard(
        now=now,
        runs=pipeline_latest_runs(),
        standalone=stage_runs_standalone_latest(),
        models=model_versions_live(),
        experiments=list(experiments_running()),
        quality=quality_report_latest(),
        online=online_report_latest(),
        health=serving_health_recent(now=now),
    )
