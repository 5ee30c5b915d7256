"""Prometheus gauges of the platform's database state, read at scrape time.

A collector (rather than gauges set by the stages and services) keeps the values right in
every web process and under a multi-process server: each scrape reads the latest rows.

What it exports, and why each label set stays small:

- data quality: the latest report's score and pass/fail state (no labels);
- pipeline stages: the last finished run of each stage, its duration and its status
  (``stage`` and ``status`` come from the ``Stage`` and ``RunStatus`` choices);
- pipeline runs: seconds since the last successful run of each kind (``kind`` is the
  operator's label, ``incremental`` and ``full`` from the schedules; capped at ``MAX_KINDS``);
- model registry: the primary, shadow and canary versions (three rows at most), their traffic
  share and age, and the primary's offline metrics (``metric`` capped at ``MAX_OFFLINE_METRICS``);
- experiments: the running experiments' variant allocations and channel weights
  (``channel`` is checked against the fixed channel list; one running experiment per scene).

No label ever carries a user, item or request id. Each section runs one cheap query (five
in all) and is guarded on its own: a failing query drops that section's
samples and sets ``recoplatform_collector_section_up{section}`` to 0, but never fails the
scrape.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from django.utils import timezone
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# Statuses after which a stage run has a result worth reporting ("pending"/"running" do not).
FINISHED_STATUSES: tuple[str, ...] = ("succeeded", "failed", "skipped")
# Registry statuses that serve or score traffic; archived/rejected/candidate rows are history.
LIVE_MODEL_STATUSES: tuple[str, ...] = ("primary", "canary", "shadow")
# `kind` is free text on `run_pipeline --kind`; the cap keeps a typo-happy operator from
# growing the series without bound (the schedules use two kinds).
MAX_KINDS = 20
# The trainer writes about a dozen metrics; the cap guards against a bundle with hundreds.
MAX_OFFLINE_METRICS = 50

SECTIONS: tuple[str, ...] = ("quality", "stages", "runs", "models", "experiments")


def _families() -> dict[str, GaugeMetricFamily]:
    """A fresh, empty family for every metric the collector exports (also its description)."""
    # Names are string literals on purpose: tests/ops/test_dashboard.py finds the exported
    # names by reading the code's metric definitions.
    families = [
        GaugeMetricFamily("recoplatform_data_quality_score", "Latest data-quality score (0-100)."),
        GaugeMetricFamily(
            "recoplatform_data_quality_passed",
            "1 if the latest data-quality report passes the gate.",
        ),
        GaugeMetricFamily(
            "recoplatform_pipeline_stage_last_duration_seconds",
            "Duration of the last finished run of each pipeline stage.",
            labels=["stage"],
        ),
        GaugeMetricFamily(
            "recoplatform_pipeline_stage_last_status",
            "1 for the status of the last finished run of each stage, 0 for the others.",
            labels=["stage", "status"],
        ),
        GaugeMetricFamily(
            "recoplatform_pipeline_stage_last_finished_timestamp_seconds",
            "Unix time the last finished run of each stage ended.",
            labels=["stage"],
        ),
        GaugeMetricFamily(
            "recoplatform_pipeline_seconds_since_last_success",
            "Seconds since the last successful pipeline run of each kind "
            "(+Inf when runs of that kind exist but none succeeded).",
            labels=["kind"],
        ),
        GaugeMetricFamily(
            "recoplatform_model_version_info",
            "1 for each model version that is primary, canary or shadow.",
            labels=["version", "status"],
        ),
        GaugeMetricFamily(
            "recoplatform_model_traffic_share",
            "Share of user traffic (0-1) each live model version serves.",
            labels=["version", "status"],
        ),
        GaugeMetricFamily(
            "recoplatform_model_age_seconds",
            "Seconds since each live model version was registered (trained).",
            labels=["version", "status"],
        ),
        GaugeMetricFamily(
            "recoplatform_model_offline_metric",
            "Offline evaluation metrics of the primary model (ndcg@10, recall@10, auc, ...).",
            labels=["version", "metric"],
        ),
        GaugeMetricFamily(
            "recoplatform_experiment_variant_allocation_ratio",
            "Share of units (0-1) bucketed into each variant of each running experiment.",
            labels=["experiment", "scene", "variant"],
        ),
        GaugeMetricFamily(
            "recoplatform_experiment_channel_weight",
            "Recall channel weights each variant of a running experiment overrides.",
            labels=["experiment", "variant", "channel"],
        ),
        GaugeMetricFamily(
            "recoplatform_collector_section_up",
            "1 if this section of the database-backed collector was read at this scrape.",
            labels=["section"],
        ),
    ]
    return {family.name: family for family in families}


def _seconds(later: datetime, earlier: datetime) -> float:
    return max(0.0, (later - earlier).total_seconds())


class PipelineCollector(Collector):
    """Exports data quality, pipeline stages and runs, live model versions and experiment
    allocations from the database; ``clock`` is injectable so tests control "now"."""

    def __init__(self, clock: Callable[[], datetime] = timezone.now) -> None:
        self.clock = clock

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Without describe(), registering calls collect() and touches the database at start-up.
        yield from _families().values()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = _families()
        now = self.clock()
        readers: dict[str, Callable[[dict[str, GaugeMetricFamily], datetime], None]] = {
            "quality": _read_quality,
            "stages": _read_stages,
            "runs": _read_runs,
            "models": _read_models,
            "experiments": _read_experiments,
        }
        up = families["recoplatform_collector_section_up"]
        for section, read in readers.items():
            # Each section fills fresh families, copied over only once it is complete, so a
            # failure half-way never exports half a section.
            scratch = _families()
            try:
                read(scratch, now)
            except Exception as exc:  # a scrape must never fail because the database is away
                logger.warning("metrics collector: %s section failed: %s", section, exc)
                up.add_metric([section], 0.0)
                continue
            for name, family in scratch.items():
                families[name].samples.extend(family.samples)
            up.add_metric([section], 1.0)
        yield from families.values()


def _read_quality(families: dict[str, GaugeMetricFamily], now: datetime) -> None:
    from apps.pipeline.models import DataQualityReport

    report = DataQualityReport.objects.order_by("-created_at").only("score", "passed").first()
    if report is not None:
        families["recoplatform_data_quality_score"].add_metric([], report.score)
        families["recoplatform_data_quality_passed"].add_metric([], 1.0 if report.passed else 0.0)


def _read_stages(families: dict[str, GaugeMetricFamily], now: datetime) -> None:
    from django.db.models import Max

    from apps.pipeline.models import RunStatus, Stage, StageRun

    # The newest finished run per stage: a GROUP BY over the (stage, status) index as a
    # subquery, so one round trip returns six rows at most.
    last_ids = (
        StageRun.objects.filter(status__in=FINISHED_STATUSES)
        .order_by()
        .values("stage")
        .annotate(last_id=Max("id"))
        .values_list("last_id", flat=True)
    )
    rows = StageRun.objects.filter(id__in=last_ids).only(
        "stage", "status", "started_at", "finished_at"
    )
    known_stages = set(Stage.values)
    duration = families["recoplatform_pipeline_stage_last_duration_seconds"]
    status = families["recoplatform_pipeline_stage_last_status"]
    finished = families["recoplatform_pipeline_stage_last_finished_timestamp_seconds"]
    for row in sorted(rows, key=lambda r: r.stage):
        if row.stage not in known_stages:  # a stage removed from the code since
            continue
        if row.duration_seconds is not None:
            duration.add_metric([row.stage], row.duration_seconds)
        if row.finished_at is not None:
            finished.add_metric([row.stage], row.finished_at.timestamp())
        # Every status gets a sample (1 or 0), so `== 1` alerts and stat panels need no
        # absent() and a status change shows as a flip rather than a vanished series.
        for value in RunStatus.values:
            status.add_metric([row.stage, value], 1.0 if row.status == value else 0.0)


def _read_runs(families: dict[str, GaugeMetricFamily], now: datetime) -> None:
    from django.db.models import Max, Q

    from apps.pipeline.models import PipelineRun, RunStatus

    kinds = (
        PipelineRun.objects.order_by()
        .values("kind")
        .annotate(
            last_success=Max("finished_at", filter=Q(status=RunStatus.SUCCEEDED)),
            latest=Max("created_at"),
        )
        .order_by("-latest")[:MAX_KINDS]
    )
    since = families["recoplatform_pipeline_seconds_since_last_success"]
    for row in sorted(kinds, key=lambda r: r["kind"]):
        last = row["last_success"]
        # Runs that never succeeded are infinitely stale: the staleness alert must fire for a
        # kind whose every run fails, not go quiet because there is no timestamp.
        since.add_metric([row["kind"]], _seconds(now, last) if last is not None else math.inf)


def _read_models(families: dict[str, GaugeMetricFamily], now: datetime) -> None:
    from apps.models.models import ModelVersion

    rows = ModelVersion.objects.filter(status__in=LIVE_MODEL_STATUSES).only(
        "version", "status", "traffic_share", "created_at", "metrics"
    )
    info = families["recoplatform_model_version_info"]
    share = families["recoplatform_model_traffic_share"]
    age = families["recoplatform_model_age_seconds"]
    offline = families["recoplatform_model_offline_metric"]
    for row in sorted(rows, key=lambda r: (r.status, r.version)):
        labels = [row.version, row.status]
        info.add_metric(labels, 1.0)
        share.add_metric(labels, float(row.traffic_share))
        age.add_metric(labels, _seconds(now, row.created_at))
        if row.status == "primary":
            for metric, value in _numeric_metrics(row.metrics):
                offline.add_metric([row.version, metric], value)


def _numeric_metrics(metrics: Any) -> list[tuple[str, float]]:
    """The flat, finite numbers of a ``metrics`` JSON (nested values and booleans skipped)."""
    if not isinstance(metrics, dict):
        return []
    numbers = [
        (str(key), float(value))
        for key, value in metrics.items()
        if isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    ]
    return sorted(numbers)[:MAX_OFFLINE_METRICS]


def _read_experiments(families: dict[str, GaugeMetricFamily], now: datetime) -> None:
    from apps.experiments.bucketing import BUCKETS
    from apps.experiments.choices import ExperimentStatus
    from apps.experiments.models import Variant
    from apps.experiments.params import CHANNELS

    variants = (
        Variant.objects.filter(experiment__status=ExperimentStatus.RUNNING)
        .select_related("experiment")
        .only("name", "allocation", "params", "experiment__name", "experiment__scene")
        .order_by("experiment__name", "position", "name")
    )
    allocation = families["recoplatform_experiment_variant_allocation_ratio"]
    weight = families["recoplatform_experiment_channel_weight"]
    for variant in variants:
        experiment = variant.experiment
        allocation.add_metric(
            [experiment.name, experiment.scene, variant.name], variant.allocation / BUCKETS
        )
        weights = (
            variant.params.get("channel_weights") if isinstance(variant.params, dict) else None
        )
        if not isinstance(weights, dict):
            continue
        for channel, value in sorted(weights.items()):
            # Params are validated on write; the check keeps a hand-edited row from adding
            # arbitrary label values.
            if channel in CHANNELS and isinstance(value, int | float) and math.isfinite(value):
                weight.add_metric([experiment.name, variant.name, channel], float(value))


_registered = False


def register_collector() -> None:
    """Register the collector once per process (Django may call ready() more than once)."""
    global _registered
    if not _registered:
        REGISTRY.register(PipelineCollector())
        _registered = True
