"""Stable bucketing of units into experiment variants, and the snapshot serving reads (pure).

A unit (a user id, or a visitor id string for anonymous traffic) falls in bucket
``sha256(f"{salt}:{unit_id}") mod 10000``. Variants take consecutive bucket ranges in their
order: with allocations ``[("control", 5000), ("b", 3000)]`` buckets 0-4999 are control,
5000-7999 are b, and 8000-9999 are not in the experiment. The same unit always gets the same
variant, in any process; a different salt gives an independent split.

Logged-in users are bucketed on their user id and anonymous ones on their visitor id, so the
two share one bucket space (a visitor id equal to a user id lands in the same bucket).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from apps.experiments.params import VariantParams

BUCKETS = 10_000  # basis points: an allocation of 2500 is 25% of units


def bucket(salt: str, unit_id: str | int) -> int:
    """The unit's bucket, 0..9999, under ``salt``."""
    digest = hashlib.sha256(f"{salt}:{unit_id}".encode()).hexdigest()
    return int(digest, 16) % BUCKETS


def check_allocations(allocations: Sequence[tuple[str, int]]) -> None:
    """Raise ``ValueError`` unless every allocation is 0..10000 and they sum to at most 10000."""
    total = 0
    for name, points in allocations:
        if isinstance(points, bool) or not isinstance(points, int) or not 0 <= points <= BUCKETS:
            raise ValueError(
                f"allocation of {name!r} must be 0..{BUCKETS} basis points: {points!r}"
            )
        total += points
    if total > BUCKETS:
        raise ValueError(f"allocations sum to {total} basis points, more than {BUCKETS}")


def assign(salt: str, unit_id: str | int, allocations: Sequence[tuple[str, int]]) -> str | None:
    """The variant name the unit falls in, or None when it is outside the allocated buckets."""
    check_allocations(allocations)
    position = bucket(salt, unit_id)
    edge = 0
    for name, points in allocations:
        edge += points
        if position < edge:
            return name
    return None


@dataclass(frozen=True)
class VariantSnapshot:
    """A variant as serving sees it: name, basis points and parsed parameters."""

    name: str
    allocation: int
    params: VariantParams


@dataclass(frozen=True)
class ExperimentSnapshot:
    """A running experiment as serving sees it; variants are in bucket-range order."""

    name: str
    scene: str
    salt: str
    variants: tuple[VariantSnapshot, ...]
    starts_at: datetime | None = None
    ends_at: datetime | None = None

    def is_active(self, now: datetime) -> bool:
        """Whether ``now`` is inside the experiment's window (an open end never ends)."""
        started = self.starts_at is None or self.starts_at <= now
        return started and (self.ends_at is None or now < self.ends_at)

    def assign(self, unit_id: str | int) -> VariantSnapshot | None:
        """The unit's variant, or None when the unit is not in the experiment."""
        position = bucket(self.salt, unit_id)
        edge = 0
        for variant in self.variants:
            edge += variant.allocation
            if position < edge:
                return variant
        return None


@dataclass(frozen=True)
class Assignment:
    """The experiment and variant a request falls in; ``label`` is what exposure logs record."""

    experiment: ExperimentSnapshot
    variant: VariantSnapshot

    @property
    def label(self) -> str:
        return f"{self.experiment.name}:{self.variant.name}"


@dataclass(frozen=True)
class ExperimentsSnapshot:
    """Every running experiment at config ``version``; built once, swapped by reference."""

    version: int
    experiments: tuple[ExperimentSnapshot, ...] = ()

    def for_scene(self, scene: str) -> ExperimentSnapshot | None:
        """The running experiment on ``scene`` (at most one runs per scene)."""
        return next((e for e in self.experiments if e.scene == scene), None)

    def assign(self, scene: str, unit_id: str | int, *, now: datetime) -> Assignment | None:
        """The unit's assignment on ``scene`` at ``now``, or None (no active experiment, or the
        unit is outside its allocations)."""
        experiment = self.for_scene(scene)
        if experiment is None or not experiment.is_active(now):
            return None
        variant = experiment.assign(unit_id)
        return Assignment(experiment, variant) if variant is not None else None
