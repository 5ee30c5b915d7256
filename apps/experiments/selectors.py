"""Reads of experiments: the config version serving polls, and the snapshot it serves from."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from django.db.models import Prefetch, QuerySet

from apps.experiments.attribution import ATTRIBUTED, FEEDBACK
from apps.experiments.bucketing import ExperimentSnapshot, ExperimentsSnapshot, VariantSnapshot
from apps.experiments.choices import ExperimentStatus
from apps.experiments.models import ConfigVersion, Experiment, OnlineEvaluationReport, Variant
from apps.experiments.online import Counts
from apps.experiments.params import ParamsError, VariantParams, parse_params

logger = logging.getLogger(__name__)

CONFIG_VERSION_PK = 1


def experiments_config_version() -> int:
    """The experiments config counter (0 before any change): one primary-key read, cheap
    enough for every worker to poll every few seconds."""
    version = (
        ConfigVersion.objects.filter(pk=CONFIG_VERSION_PK).values_list("version", flat=True).first()
    )
    return int(version or 0)


def experiments_with_variants(names: Iterable[str] | None = None) -> QuerySet[Experiment]:
    """Experiments (all, or those named) with their variants prefetched in bucket order."""
    queryset = Experiment.objects.prefetch_related(
        Prefetch("variants", queryset=Variant.objects.order_by("position", "name"))
    ).order_by("name")
    if names is not None:
        queryset = queryset.filter(name__in=list(names))
    return queryset


def _params(variant: Variant) -> VariantParams:
    try:
        return parse_params(variant.params)
    except ParamsError:
        # Every writer validates; a row edited by hand serves the defaults rather than fail.
        logger.warning("invalid params on variant %s; serving defaults", variant.pk)
        return VariantParams()


def experiments_snapshot() -> ExperimentsSnapshot:
    """Every running experiment with its variants, as an immutable snapshot (three queries:
    the version, the experiments, their variants).

    The version is read first: a change committed in between is then picked up at the next
    poll, whereas reading it last could label old data with the new version forever.
    """
    version = experiments_config_version()
    experiments = tuple(
        ExperimentSnapshot(
            name=e.name,
            scene=e.scene,
            salt=e.salt,
            variants=tuple(
                VariantSnapshot(name=v.name, allocation=v.allocation, params=_params(v))
                for v in e.variants.all()
            ),
            starts_at=e.starts_at,
            ends_at=e.ends_at,
        )
        for e in experiments_with_variants().filter(status=ExperimentStatus.RUNNING)
    )
    return ExperimentsSnapshot(version=version, experiments=experiments)


# --- online evaluation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantResult:
    """One variant's online counts and metrics (``apps.experiments.online.Counts.metrics``).

    ``allocation`` is None for a label found in the logs that is no longer a variant."""

    name: str
    allocation: int | None
    counts: Counts
    metrics: dict[str, Any]


@dataclass(frozen=True)
class ExperimentResults:
    """An experiment's online results: the latest daily report with its traffic, and the sum
    of every daily report of its run (``days`` of them). ``*_rows`` count client feedback;
    ``attributed_*_rows`` the site's own interactions credited by last touch
    (``apps.experiments.attribution``; empty in reports computed before it existed)."""

    experiment: Experiment
    latest: OnlineEvaluationReport | None
    latest_rows: list[VariantResult]
    total_rows: list[VariantResult]
    days: int
    attributed_latest_rows: list[VariantResult] = field(default_factory=list)
    attributed_total_rows: list[VariantResult] = field(default_factory=list)


def _variant_counts(
    report: OnlineEvaluationReport, prefix: str, basis: str = FEEDBACK
) -> dict[str, Counts]:
    results = report.results or {}
    if basis == FEEDBACK:
        groups = results.get("by_variant") or {}
    else:
        groups = ((results.get("breakdown") or {}).get(basis) or {}).get("variant") or {}
    return {
        label[len(prefix) :]: Counts.from_dict(group.get("counts") or {})
        for label, group in groups.items()
        if label.startswith(prefix)
    }


def _rows(variants: list[Variant], counts: dict[str, Counts]) -> list[VariantResult]:
    names = [v.name for v in variants] + sorted(set(counts) - {v.name for v in variants})
    allocation = {v.name: v.allocation for v in variants}
    rows = []
    for name in names:
        found = counts.get(name, Counts())
        rows.append(VariantResult(name, allocation.get(name), found, found.metrics()))
    return rows


def experiment_results(*, experiment: Experiment) -> ExperimentResults:
    """Read the daily reports that cover the experiment's run (two queries)."""
    variants = list(experiment.variants.order_by("position", "name"))
    reports = OnlineEvaluationReport.objects.order_by("date")
    if experiment.starts_at is not None:
        reports = reports.filter(date__gte=experiment.starts_at.date())
    if experiment.ends_at is not None:
        reports = reports.filter(date__lte=experiment.ends_at.date())
    prefix = f"{experiment.name}:"
    total: dict[str, Counts] = {}
    attributed_total: dict[str, Counts] = {}
    latest: OnlineEvaluationReport | None = None
    latest_counts: dict[str, Counts] = {}
    attributed_latest: dict[str, Counts] = {}
    days = 0
    for report in reports:
        counts = _variant_counts(report, prefix)
        if not counts:
            continue
        days += 1
        attributed = _variant_counts(report, prefix, ATTRIBUTED)
        latest, latest_counts, attributed_latest = report, counts, attributed
        for name, found in counts.items():
            total.setdefault(name, Counts()).merge(found)
        for name, found in attributed.items():
            attributed_total.setdefault(name, Counts()).merge(found)
    return ExperimentResults(
        experiment=experiment,
        latest=latest,
        latest_rows=_rows(variants, latest_counts),
        total_rows=_rows(variants, total),
        days=days,
        attributed_latest_rows=_rows(variants, attributed_latest) if attributed_latest else [],
        attributed_total_rows=_rows(variants, attributed_total) if attributed_total else [],
    )


def online_report_latest() -> OnlineEvaluationReport | None:
    """The most recent daily online evaluation, if any."""
    return OnlineEvaluationReport.objects.order_by("-date").first()


def online_reports_trend(*, day: date, days: int = 14) -> list[OnlineEvaluationReport]:
    """The daily reports of the ``days`` days ending with ``day``, oldest first (one query)."""
    reports = OnlineEvaluationReport.objects.filter(
        date__lte=day, date__gt=day - timedelta(days=days)
    ).order_by("date")
    return list(reports)
