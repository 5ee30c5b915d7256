"""Data-quality checks and score: clean data scores high, each defect alone fails the gate."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apps.pipeline.quality import (
    QualityConfig,
    QualityResult,
    assess_quality,
    quality_prometheus_text,
    render_quality_html,
)
from tests.pipeline.test_clean import NOW, canonical_dataset

Frames = dict[str, pd.DataFrame]


@pytest.fixture(scope="module")
def clean_data() -> Frames:
    return canonical_dataset()


@pytest.fixture
def data(clean_data: Frames) -> Frames:
    return {name: frame.copy() for name, frame in clean_data.items()}


@pytest.fixture(scope="module")
def previous(clean_data: Frames) -> dict:
    """The summary of a previous run over the same clean data."""
    return assess_quality(clean_data, now=NOW - pd.Timedelta(hours=1)).summary


def check(result: QualityResult, name: str) -> dict:
    return next(c for c in result.checks if c["name"] == name)


def null_out(frame: pd.DataFrame, column: str, share: float) -> pd.DataFrame:
    rows = np.random.default_rng(1).choice(len(frame), int(len(frame) * share), replace=False)
    frame.loc[frame.index[rows], column] = None
    return frame


def null_events(data: Frames) -> Frames:
    return {**data, "interactions": null_out(data["interactions"], "event", 0.10)}


def null_titles(data: Frames) -> Frames:
    return {**data, "items": null_out(data["items"], "title", 0.10)}


def duplicate_item_ids(data: Frames) -> Frames:
    items = data["items"]
    return {**data, "items": pd.concat([items, items.sample(5, random_state=1)])}


def orphan_interactions(data: Frames) -> Frames:
    interactions = data["interactions"]
    with_item = interactions.index[interactions["item_id"].notna()]
    rows = with_item[: int(len(interactions) * 0.10)]
    interactions.loc[rows, "item_id"] = interactions.loc[rows, "item_id"] + 10_000
    return {**data, "interactions": interactions}


def stale_source(data: Frames) -> Frames:
    interactions = data["interactions"]
    newest = interactions["ts"].max()
    interactions["ts"] = interactions["ts"] - (newest - (NOW - pd.Timedelta(days=10)))
    return {**data, "interactions": interactions}


def volume_collapse(data: Frames) -> Frames:
    interactions = data["interactions"]
    # Keep the newest 10% so that only the volume, not the freshness, is wrong.
    kept = interactions.sort_values("ts").tail(len(interactions) // 10)
    return {**data, "interactions": kept}


def test_clean_data_scores_at_least_97_and_passes(clean_data, previous):
    # Given clean data and a previous run of the same size
    # When it is assessed
    result = assess_quality(clean_data, now=NOW, previous=previous)
    # Then it scores high, passes the gate and no check fails or warns
    assert result.score >= 97
    assert result.passed
    assert result.failing == []
    assert result.summary["status_counts"] == {"pass": len(result.checks), "warn": 0, "fail": 0}


def test_a_first_run_without_a_previous_report_still_scores_at_least_97(clean_data):
    # Given no previous run / When assessed
    result = assess_quality(clean_data, now=NOW)
    # Then the volume checks pass unmeasured
    assert result.score >= 97
    assert check(result, "interactions.volume.rows")["observed"] is None


@pytest.mark.parametrize(
    ("defect", "failing_check"),
    [
        (null_events, "interactions.null_rate.event"),
        (null_titles, "items.null_rate.title"),
        (duplicate_item_ids, "items.duplicate_keys.item_id"),
        (orphan_interactions, "interactions.referential_integrity.item_id"),
        (stale_source, "interactions.freshness.ts"),
        (volume_collapse, "interactions.volume.rows"),
    ],
    ids=["null-events", "null-titles", "duplicate-keys", "orphans", "stale", "volume-collapse"],
)
def test_each_defect_alone_drops_the_score_below_the_gate_and_names_the_check(
    data: Frames, previous: dict, defect: Callable[[Frames], Frames], failing_check: str
):
    # Given clean data with one defect injected
    dirty = defect(data)
    # When assessed against the previous (clean) run
    result = assess_quality(dirty, now=NOW, previous=previous, thresholds=QualityConfig())
    # Then the score is below the default gate of 90 and the report names the failed check
    assert result.score < 90
    assert not result.passed
    assert failing_check in result.failing
    assert failing_check in result.summary["failed_checks"]
    assert failing_check in check(result, failing_check)["name"]
    assert check(result, failing_check)["message"].endswith(".")
    assert failing_check in render_quality_html(result, created_at=NOW.to_pydatetime())


def test_a_small_violation_warns_and_costs_little(data, previous):
    # Given 0.2% of interactions without an event
    dirty = {**data, "interactions": null_out(data["interactions"], "event", 0.002)}
    # When assessed
    result = assess_quality(dirty, now=NOW, previous=previous)
    # Then the check warns, keeps most of its weight, and the score stays high
    events = check(result, "interactions.null_rate.event")
    assert events["status"] == "warn"
    assert events["score"] == pytest.approx(1 - 0.002 / 0.05)
    assert result.score >= 97


def test_the_score_is_the_documented_weighted_mean_when_no_critical_check_fails(data, previous):
    # Given 20% of interactions' users unknown: a non-critical check (users may lag)
    interactions = data["interactions"]
    known = interactions.index[interactions["user_id"].notna()]
    interactions.loc[known[: len(interactions) // 5], "user_id"] = 99_999
    # When assessed
    result = assess_quality(data, now=NOW, previous=previous)
    # Then that check fails but does not cap, and the score is 100 * sum(w*s) / sum(w)
    users = check(result, "interactions.referential_integrity.user_id")
    assert users["status"] == "fail"
    assert not users["critical"]
    weights = sum(c["weight"] for c in result.checks)
    expected = 100 * sum(c["weight"] * c["score"] for c in result.checks) / weights
    assert result.score == pytest.approx(expected, abs=0.01)
    assert result.passed


def test_a_failed_critical_check_caps_the_score_below_the_gate(data, previous):
    # Given only 6% of item titles missing (one check among 26)
    dirty = {**data, "items": null_out(data["items"], "title", 0.06)}
    # When assessed with a gate of 90 and a cap margin of 10
    result = assess_quality(
        dirty, now=NOW, previous=previous, thresholds=QualityConfig(gate=90, fail_cap_margin=10)
    )
    # Then the weighted mean alone would pass, but the cap holds the score at 80
    weights = sum(c["weight"] for c in result.checks)
    uncapped = 100 * sum(c["weight"] * c["score"] for c in result.checks) / weights
    assert uncapped > 90
    assert result.score == 80


def test_a_missing_required_column_fails_the_schema_check(data, previous):
    # Given items without a price column
    dirty = {**data, "items": data["items"].drop(columns=["price"])}
    # When assessed
    result = assess_quality(dirty, now=NOW, previous=previous)
    # Then the schema check fails and names the column
    schema_check = check(result, "items.schema")
    assert schema_check["status"] == "fail"
    assert "price" in schema_check["message"]
    assert result.score < 90


def test_numbers_delivered_as_text_are_a_compatible_dtype(data, previous):
    # Given prices as numeric strings and timestamps as ISO strings
    items = data["items"].astype({"price": object, "created_at": object})
    items["price"] = items["price"].map("{:.2f}".format)
    items["created_at"] = data["items"]["created_at"].map(lambda t: t.isoformat())
    # When assessed
    result = assess_quality({**data, "items": items}, now=NOW, previous=previous)
    # Then the schema check passes and the values are still range-checked
    assert check(result, "items.schema")["status"] == "pass"
    assert check(result, "items.range.price")["observed"] == 0.0
    assert result.score >= 97


def test_future_and_pre_2000_timestamps_fail_the_range_check(data, previous):
    # Given 3% of interactions stamped in 2030 or 1970
    interactions = data["interactions"]
    interactions.loc[:74, "ts"] = pd.Timestamp("2030-01-01", tz="UTC")
    interactions.loc[75:149, "ts"] = pd.Timestamp("1970-01-01", tz="UTC")
    # When assessed
    result = assess_quality(data, now=NOW, previous=previous)
    # Then the range check fails with the observed share, and freshness ignores the future rows
    ts_range = check(result, "interactions.range.ts")
    assert ts_range["status"] == "fail"
    assert ts_range["observed"] == pytest.approx(150 / 5000)
    assert check(result, "interactions.freshness.ts")["status"] == "pass"


def test_the_summary_feeds_the_next_runs_volume_check_and_is_json(clean_data):
    # Given a run whose full to_dict() is stored as JSON (as the report row does)
    first = assess_quality(clean_data, now=NOW)
    stored = json.loads(json.dumps(first.to_dict()))
    # When the next run sees half the interactions
    half = {**clean_data, "interactions": clean_data["interactions"].iloc[::2]}
    second = assess_quality(half, now=NOW, previous=stored)
    # Then the drop is measured against the stored row counts
    assert check(second, "interactions.volume.rows")["observed"] == pytest.approx(0.5)
    assert stored["summary"]["rows"] == {"users": 200, "items": 100, "interactions": 5000}
    window_start = NOW.floor("D") - pd.Timedelta(days=29)
    in_window = int((clean_data["interactions"]["ts"] >= window_start).sum())
    daily = stored["summary"]["daily_interactions"]
    assert len(daily) == 30
    assert daily[-1]["date"] == "2024-06-30"
    assert sum(d["count"] for d in daily) == in_window


def test_the_html_report_is_self_contained_and_shows_the_score_and_every_check(data, previous):
    # Given an assessment with a failure and a warning
    dirty = orphan_interactions(data)
    result = assess_quality(dirty, now=NOW, previous=previous)
    # When rendered
    page = render_quality_html(result, title="Quality <nightly>", created_at=NOW.to_pydatetime())
    # Then the score, the verdict, every check and the charts are there, with nothing external
    assert f"{result.score:.2f}" in page
    assert "BLOCKED" in page
    for c in result.checks:
        assert c["name"] in page
    assert page.count("<svg") >= 5  # gauge, check bars, daily volume, a null chart per table
    assert "Quality &lt;nightly&gt;" in page
    assert "<script" not in page
    assert "http://" not in page
    assert "https://" not in page


def test_the_prometheus_text_parses_and_labels_only_the_fixed_check_names(data, previous):
    # Given an assessment
    result = assess_quality(stale_source(data), now=NOW, previous=previous)
    # When rendered as Prometheus text and parsed back
    families = {f.name: f for f in text_string_to_metric_families(quality_prometheus_text(result))}
    # Then the score and each check's status are there, with status 2 for the failed check
    score = families["recoplatform_data_quality_score"].samples[0].value
    assert score == pytest.approx(result.score)
    statuses = {
        s.labels["check"]: s.value
        for s in families["recoplatform_data_quality_check_status"].samples
    }
    assert set(statuses) == {c["name"] for c in result.checks}
    assert statuses["interactions.freshness.ts"] == 2
    assert families["recoplatform_data_quality_passed"].samples[0].value == 0


def test_a_naive_now_is_rejected(clean_data):
    # Given a naive now / When assessing / Then it refuses rather than guess the zone
    with pytest.raises(ValueError, match="timezone-aware"):
        assess_quality(clean_data, now=pd.Timestamp("2024-06-30 12:00"))


def test_a_maximum_age_from_settings_alone_is_valid_and_warns_at_half_of_it(data):
    # Given only the maximum age set, shorter than the default warn age, and a source 8 h old
    config = QualityConfig(gate=90, freshness_max_age_hours=12)
    interactions = data["interactions"]
    interactions["ts"] = interactions["ts"] - (
        interactions["ts"].max() - (NOW - pd.Timedelta(hours=8))
    )
    # When assessed
    result = assess_quality(data, now=NOW, thresholds=config)
    # Then freshness warns (8 h is past half of 12 h) without failing
    freshness = check(result, "interactions.freshness.ts")
    assert freshness["status"] == "warn"
    assert freshness["warn_threshold"] == 6
