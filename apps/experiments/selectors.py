"""Reads of experiments: the config version serving polls, and the snapshot it serves from."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from django.db.models import Prefetch, QuerySet

from apps.experiments.bucketing import ExperimentSnapshot, ExperimentsSnapshot, VariantSnapshot
from apps.experiments.choices import ExperimentStatus
from apps.experiments.models import ConfigVersion, Experiment, Variant
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
