"""Stable bucketing and the serving snapshot: pure functions, no database."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from apps.experiments.bucketing import (
    BUCKETS,
    ExperimentSnapshot,
    ExperimentsSnapshot,
    VariantSnapshot,
    assign,
    bucket,
)
from apps.experiments.params import VariantParams

UNITS = 100_000
ALLOCATIONS = [("control", 5000), ("b", 3000), ("c", 1000)]  # 10% of units are outside
NOW = datetime(2025, 6, 1, tzinfo=UTC)


def test_the_bucket_is_sha256_of_salt_and_unit_mod_10000():
    expected = int(hashlib.sha256(b"home-weights:42").hexdigest(), 16) % 10000
    assert bucket("home-weights", 42) == expected
    assert bucket("home-weights", "42") == expected  # a user id and its string agree


def test_the_same_unit_gets_the_same_variant_on_every_call():
    first = [assign("s", f"u{i}", ALLOCATIONS) for i in range(1000)]
    again = [assign("s", f"u{i}", ALLOCATIONS) for i in range(1000)]
    assert first == again


def test_the_same_unit_gets_the_same_variant_in_another_process():
    # Given a process with a different hash seed (str hashes differ between processes)
    code = (
        "from apps.experiments.bucketing import assign;"
        "print(','.join(str(assign('s', f'u{i}', [('a', 5000), ('b', 5000)])) for i in range(200)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    # Then it assigns exactly as this process does
    here = ",".join(str(assign("s", f"u{i}", [("a", 5000), ("b", 5000)])) for i in range(200))
    assert out == here


def test_100k_units_split_within_one_percent_of_the_allocations():
    counts = Counter(assign("home-weights", f"user-{i}", ALLOCATIONS) for i in range(UNITS))
    expected = {"control": 0.50, "b": 0.30, "c": 0.10, None: 0.10}
    for name, share in expected.items():
        assert abs(counts[name] / UNITS - share) < 0.01, (name, counts[name])


def test_different_salts_split_units_independently():
    # Given a 50/50 split under two salts
    halves = [("a", 5000), ("b", 5000)]
    pairs = Counter(
        (assign("exp-one", i, halves), assign("exp-two", i, halves)) for i in range(UNITS)
    )
    # Then being in "a" for one says nothing about the other: each pair is about a quarter
    for pair in [("a", "a"), ("a", "b"), ("b", "a"), ("b", "b")]:
        assert abs(pairs[pair] / UNITS - 0.25) < 0.01, pair


def test_anonymous_visitors_are_bucketed_on_their_visitor_id_string():
    visitor = "v-3f9c2a7e-5b1d-4c8e-9a0f-1e2d3c4b5a69"
    variant = assign("home-weights", visitor, [("a", 5000), ("b", 5000)])
    assert variant in {"a", "b"}
    assert all(
        assign("home-weights", visitor, [("a", 5000), ("b", 5000)]) == variant for _ in range(5)
    )
    visitors = Counter(assign("s", f"visitor-{i:08x}", [("a", 5000)]) for i in range(20_000))
    assert abs(visitors["a"] / 20_000 - 0.5) < 0.02


def test_units_past_the_allocated_total_are_not_in_the_experiment():
    assert {assign("s", i, [("a", 0)]) for i in range(500)} == {None}
    assert {assign("s", i, [("a", BUCKETS)]) for i in range(500)} == {"a"}


@pytest.mark.parametrize(
    "allocations",
    [[("a", 6000), ("b", 5000)], [("a", -1)], [("a", 10001)], [("a", True)], [("a", 5.5)]],
)
def test_assign_rejects_invalid_allocations(allocations):
    with pytest.raises(ValueError, match="allocation"):
        assign("s", 1, allocations)


def _snapshot(**overrides) -> ExperimentSnapshot:
    fields = {
        "name": "home-weights",
        "scene": "for_you",
        "salt": "home-weights",
        "variants": (
            VariantSnapshot("control", 5000, VariantParams()),
            VariantSnapshot("more-ease", 5000, VariantParams(ranker=False)),
        ),
        "starts_at": NOW - timedelta(days=1),
        "ends_at": NOW + timedelta(days=1),
    }
    return ExperimentSnapshot(**{**fields, **overrides})


def test_a_snapshot_assigns_as_the_bucketing_function_does():
    experiment = _snapshot()
    for unit in range(300):
        variant = experiment.assign(unit)
        assert variant is not None
        assert variant.name == assign(
            "home-weights", unit, [("control", 5000), ("more-ease", 5000)]
        )


def test_a_snapshot_only_assigns_on_its_scene_inside_its_window():
    snapshot = ExperimentsSnapshot(version=3, experiments=(_snapshot(),))
    assignment = snapshot.assign("for_you", "u1", now=NOW)
    assert assignment is not None
    assert assignment.label.startswith("home-weights:")
    assert snapshot.assign("similar", "u1", now=NOW) is None
    assert snapshot.assign("for_you", "u1", now=NOW + timedelta(days=2)) is None  # ended
    assert snapshot.assign("for_you", "u1", now=NOW - timedelta(days=2)) is None  # not started


def test_an_open_ended_experiment_is_active_once_started():
    experiment = _snapshot(starts_at=None, ends_at=None)
    assert experiment.is_active(NOW)
    assert experiment.is_active(NOW + timedelta(days=3650))


def test_snapshots_are_immutable():
    snapshot = ExperimentsSnapshot(version=1, experiments=(_snapshot(),))
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.version = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.experiments[0].salt = "other"  # type: ignore[misc]
