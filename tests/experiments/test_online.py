"""Online evaluation core: hand-made exposure and feedback logs with answers worked out by hand.

The logs below (window 2026-01-10, UTC):

    request  variant   model  items shown   feedback
    r1       exp:a     v1     1 2 3 4       item 1 clicked twice, bought twice (value 30, a retry)
                                            item 2 added to cart and clicked; item 3 "exposure" ping
    r2       exp:a     v1     1 2           item 1 bought without a value (catalogue price 12.5)
    r3       exp:b     v1     5 6 7 8 9     item 5 clicked; item 6 clicked, bought for 100 after
             (degraded: redis_timeout)      midnight (inside the grace); item 7 clicked two days
                                            later (past the grace: ignored)
    r4       exp:b     v2     1 2 3         item 3 bought, no value, no price; item 99 clicked
                                            (not shown)
    r5       default   v2     10            the day before: outside the window (its click at
                                            00:01 is unmatched)
    r6       exp:a     v1     3             exactly at the window's end: outside
    rX       -         -      -             a click on a request never exposed: unmatched
"""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from apps.experiments import online
from apps.experiments.online import Counts, evaluate_online, serving_health, wilson_interval

START = datetime(2026, 1, 10, tzinfo=UTC)
END = START + timedelta(days=1)
PRICES = {1: 12.5}


def at(day: int, hour: int, minute: int = 0) -> str:
    return datetime(2026, 1, day, hour, minute, tzinfo=UTC).isoformat()


def exposure(rid: str, variant: str, model: str, items: list[int], ts: str, **extra) -> dict:
    return {
        "ts": ts,
        "request_id": rid,
        "variant": variant,
        "model_version": model,
        "degraded": False,
        "degrade_reason": None,
        "source": "redis",
        "latency_ms": 3.0,
        "items": [{"item_id": i, "position": p, "channel": "itemcf"} for p, i in enumerate(items)],
        **extra,
    }


def feedback(rid: str, event: str, item: int, ts: str, **extra) -> dict:
    return {"ts": ts, "request_id": rid, "event": event, "item_id": item, **extra}


def write(path: Path, records: list[dict | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    """The logs of the module docstring; exposures split over a rotated file and the current one."""
    directory = tmp_path / "exposures"
    write(
        directory / "exposures.jsonl.1",
        [
            exposure("r5", "default", "v2", [10], at(9, 23, 59)),
            exposure("r1", "exp:a", "v1", [1, 2, 3, 4], at(10, 8)),
            exposure("r2", "exp:a", "v1", [1, 2], at(10, 9)),
        ],
    )
    write(
        directory / "exposures.jsonl",
        [
            "not json at all",
            json.dumps({"request_id": "no-ts", "items": []}),
            exposure(
                "r3",
                "exp:b",
                "v1",
                [5, 6, 7, 8, 9],
                at(10, 10),
                degraded=True,
                degrade_reason="redis_timeout",
            ),
            exposure("r4", "exp:b", "v2", [1, 2, 3], at(10, 11)),
            exposure("r6", "exp:a", "v1", [3], at(11, 0)),
        ],
    )
    write(
        directory / "feedback.jsonl",
        [
            feedback("r5", "click", 10, at(10, 0, 1)),
            feedback("r1", "click", 1, at(10, 8, 1)),
            feedback("r1", "click", 1, at(10, 8, 2)),
            feedback("r1", "purchase", 1, at(10, 8, 5), value=30.0),
            feedback("r1", "purchase", 1, at(10, 8, 6), value=30.0),
            feedback("r1", "add_to_cart", 2, at(10, 8, 7)),
            feedback("r1", "click", 2, at(10, 8, 8)),
            feedback("r1", "exposure", 3, at(10, 8, 9)),
            feedback("r2", "purchase", 1, at(10, 9, 30)),
            feedback("r3", "click", 5, at(10, 10, 1)),
            feedback("r3", "click", 6, at(10, 10, 2)),
            feedback("r4", "purchase", 3, at(10, 11, 5)),
            feedback("r4", "click", 99, at(10, 11, 6)),
            feedback("rX", "click", 1, at(10, 12)),
            feedback("r3", "purchase", 6, at(11, 2), value=100.0),
            feedback("r3", "click", 7, at(12, 1)),
        ],
    )
    return directory / "exposures.jsonl"


def evaluate(path: Path, **kwargs):
    return evaluate_online(path, start=START, end=END, prices=PRICES, **kwargs)


# --- statistics -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("successes", "trials", "low", "high"),
    [
        # Reference values of the Wilson score interval at 95%.
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (2, 6, 0.0968, 0.7000),
    ],
)
def test_the_wilson_interval_matches_reference_values(successes, trials, low, high):
    interval = wilson_interval(successes, trials)
    assert interval == pytest.approx((low, high), abs=1e-4)


def test_a_rate_without_trials_has_no_interval_and_impossible_counts_are_refused():
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)


# --- the join -----------------------------------------------------------------------------------


def test_each_variant_gets_the_counts_worked_out_by_hand(logs):
    result = evaluate(logs)
    assert set(result.by_variant) == {"exp:a", "exp:b"}
    a, b = result.by_variant["exp:a"], result.by_variant["exp:b"]
    # exp:a: r1 (4 shown) + r2 (2 shown); r1 item 1 clicked and bought (30, the retry counted
    # once); r1 item 2 clicked and carted; r2 item 1 bought at the catalogue price 12.5
    assert a.to_dict() == {
        "requests": 2,
        "impressions": 6,
        "degraded_requests": 0,
        "requests_clicked": 1,
        "clicks": 2,
        "add_to_carts": 1,
        "purchases": 2,
        "clicked_purchases": 1,
        "purchases_unpriced": 0,
        "gmv": 42.5,
        "gmv_sq": 30.0**2 + 12.5**2,
    }
    # exp:b: r3 (5 shown, degraded) + r4 (3 shown); r3 item 6 bought after midnight counts;
    # r4 item 3 bought with no value and no price: counted, worth 0, flagged unpriced
    assert b.to_dict() == {
        "requests": 2,
        "impressions": 8,
        "degraded_requests": 1,
        "requests_clicked": 1,
        "clicks": 2,
        "add_to_carts": 0,
        "purchases": 2,
        "clicked_purchases": 1,
        "purchases_unpriced": 1,
        "gmv": 100.0,
        "gmv_sq": 10_000.0,
    }


def test_model_versions_are_counted_across_variants(logs):
    result = evaluate(logs)
    v1, v2 = result.by_model_version["v1"], result.by_model_version["v2"]
    assert (v1.requests, v1.impressions, v1.clicks, v1.purchases, v1.gmv) == (3, 11, 4, 3, 142.5)
    assert (v2.requests, v2.impressions, v2.clicks, v2.purchases, v2.gmv) == (1, 3, 0, 1, 0.0)


def test_feedback_that_cannot_be_joined_is_counted_not_attributed(logs):
    result = evaluate(logs)
    # joined: r1 items 1 and 2, r2 item 1, r3 items 5 and 6, r4 item 3
    assert result.feedback_matched == 6
    # r4 item 99 was never shown in r4
    assert result.feedback_not_shown == 1
    # rX was never exposed, r5 was exposed the day before
    assert result.feedback_unmatched == 2
    # events read in [start, end + grace): the click two days later is not among them
    assert result.feedback_events == {"click": 8, "add_to_cart": 1, "purchase": 5}
    # the two unreadable exposure lines are counted
    assert result.exposure_read.bad_lines == 2


def test_the_metrics_are_the_hand_computed_rates_with_their_intervals(logs):
    metrics = evaluate(logs).by_variant["exp:a"].metrics()
    assert metrics["ctr"]["value"] == pytest.approx(2 / 6)
    assert (metrics["ctr"]["low"], metrics["ctr"]["high"]) == pytest.approx(
        (0.0968, 0.7000), abs=1e-4
    )
    assert metrics["request_ctr"]["value"] == pytest.approx(1 / 2)
    assert metrics["add_to_cart_rate"]["value"] == pytest.approx(1 / 6)
    assert metrics["cvr_click"]["value"] == pytest.approx(1 / 2)
    assert metrics["cvr_exposure"]["value"] == pytest.approx(2 / 6)
    assert metrics["degraded_share"]["value"] == 0.0
    # GMV per exposure: values (30, 12.5, 0, 0, 0, 0); mean 42.5/6, sample variance
    # (30^2 + 12.5^2 - 6 * mean^2) / 5, half-width 1.96 * sqrt(variance / 6)
    mean = 42.5 / 6
    half = 1.959964 * math.sqrt((1056.25 - 6 * mean**2) / 5 / 6)
    gmv = metrics["gmv_per_exposure"]
    assert gmv["value"] == pytest.approx(mean)
    assert (gmv["low"], gmv["high"]) == pytest.approx((mean - half, mean + half), rel=1e-5)
    assert (gmv["low"], gmv["high"]) == pytest.approx((-2.7505, 16.9172), abs=1e-3)


def test_a_group_without_clicks_has_no_click_conversion_rate(logs):
    metrics = evaluate(logs).by_model_version["v2"].metrics()
    assert metrics["cvr_click"] is None
    assert metrics["ctr"]["value"] == 0.0
    assert metrics["ctr"]["low"] == 0.0
    assert metrics["ctr"]["high"] > 0.0


def test_without_a_price_catalogue_a_valueless_purchase_is_worth_nothing(logs):
    a = evaluate_online(logs, start=START, end=END).by_variant["exp:a"]
    assert (a.gmv, a.purchases, a.purchases_unpriced) == (30.0, 2, 1)


def test_a_shorter_grace_drops_the_purchase_after_midnight(logs):
    b = evaluate(logs, grace=timedelta(hours=1)).by_variant["exp:b"]
    assert (b.purchases, b.gmv) == (1, 0.0)


def test_daily_counts_add_up_to_the_two_day_evaluation(logs):
    # Given a second day with one more request of exp:a
    with (logs.parent / "exposures.jsonl").open("a") as handle:
        handle.write(json.dumps(exposure("r7", "exp:a", "v1", [1, 2], at(11, 9))) + "\n")
    with (logs.parent / "feedback.jsonl").open("a") as handle:
        handle.write(json.dumps(feedback("r7", "click", 2, at(11, 9, 1))) + "\n")
    # When each day is evaluated alone and the counts merged
    day2 = evaluate_online(logs, start=END, end=END + timedelta(days=1), prices=PRICES)
    merged = Counts.from_dict(evaluate(logs).by_variant["exp:a"].to_dict())
    merged.merge(day2.by_variant["exp:a"])
    # Then they equal one evaluation over both days
    both = evaluate_online(logs, start=START, end=END + timedelta(days=1), prices=PRICES)
    assert merged == both.by_variant["exp:a"]
    assert (merged.requests, merged.clicks) == (4, 3)


def test_a_rotated_file_last_written_before_the_window_is_not_opened(logs):
    # Given an older rotated file whose modification time is before the window (its content
    # claims to be inside the window, so reading it would change the counts)
    old = write(
        logs.parent / "exposures.jsonl.2",
        [exposure("r9", "exp:a", "v1", [1], at(10, 7))],
    )
    stamp = (START - timedelta(hours=1)).timestamp()
    os.utime(old, (stamp, stamp))
    # When evaluating
    result = evaluate(logs)
    # Then it was skipped, and the rotated files were read oldest first
    assert result.exposure_read.files_skipped == 1
    assert result.by_variant["exp:a"].requests == 2
    assert [Path(p).name for p in result.exposure_read.files_read] == [
        "exposures.jsonl.1",
        "exposures.jsonl",
    ]


def test_log_files_are_listed_oldest_first_and_ignore_other_names(tmp_path):
    for name in ("x.jsonl", "x.jsonl.1", "x.jsonl.10", "x.jsonl.2", "x.jsonl.bak", "y.jsonl.1"):
        (tmp_path / name).write_text("")
    names = [p.name for p in online.log_files(tmp_path / "x.jsonl")]
    assert names == ["x.jsonl.10", "x.jsonl.2", "x.jsonl.1", "x.jsonl"]


def test_missing_logs_give_an_empty_evaluation(tmp_path):
    result = evaluate(tmp_path / "nothing" / "exposures.jsonl")
    assert result.by_variant == {}
    assert result.to_dict()["feedback"]["unmatched"] == 0


def test_the_window_must_be_aware_and_forward(logs):
    with pytest.raises(ValueError, match="timezone-aware"):
        evaluate_online(logs, start=START.replace(tzinfo=None), end=END)
    with pytest.raises(ValueError, match="after"):
        evaluate_online(logs, start=END, end=START)


def test_the_stored_form_round_trips_through_counts(logs):
    data = evaluate(logs).to_dict()
    group = data["by_variant"]["exp:b"]
    assert Counts.from_dict(group["counts"]).metrics() == group["metrics"]
    assert data["logs"]["exposure_lines"] == 8  # 5 in the current file, 3 in the rotated one
    assert json.loads(json.dumps(data)) == data  # JSON-ready as stored


# --- serving health -----------------------------------------------------------------------------


NOW = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)


def health_record(minutes_ago: float, latency: float | None, reason: str | None = None) -> dict:
    record = {
        "ts": (NOW - timedelta(minutes=minutes_ago)).isoformat(),
        "request_id": f"h{minutes_ago}",
        "degraded": reason is not None,
        "degrade_reason": reason,
        "source": "local_store" if reason else "redis",
        "items": [],
    }
    if latency is not None:
        record["latency_ms"] = latency
    return record


def test_serving_health_counts_the_last_hour_by_degrade_reason_with_latency_quantiles(tmp_path):
    # Given 100 requests in the last hour (latencies 1..100 ms; 6 redis timeouts and 4 open
    # breakers), and 50 older ones in the same file and in a rotated file
    path = tmp_path / "exposures.jsonl"
    write(path.with_name("exposures.jsonl.1"), [health_record(300, 5.0) for _ in range(30)])
    reasons = ["redis_timeout"] * 6 + ["breaker_open"] * 4 + [None] * 90
    records = [health_record(120, 500.0, "redis_timeout") for _ in range(20)]
    records += [health_record(59 - i * 0.5, i + 1.0, reasons[i]) for i in range(100)]
    write(path, records)
    # When the last hour is summarised
    health = serving_health(path, since=NOW - timedelta(hours=1), until=NOW)
    # Then only the hour counts
    assert health.requests == 100
    assert health.degraded == 10
    assert health.degraded_by_reason == {"redis_timeout": 6, "breaker_open": 4}
    assert health.reasons()[0] == ("redis_timeout", 6, 0.06)
    assert health.by_source == {"local_store": 10, "redis": 90}
    assert health.degraded_share == pytest.approx(0.10)
    # and quantiles are within the histogram's 1% of the exact ones (p99 of 1..100 is 99)
    assert health.latency_recorded == 100
    assert 99.0 <= health.p99_ms <= 99.0 * 1.01
    assert 50.0 <= health.p50_ms <= 50.0 * 1.01
    # and reading stopped at the first record older than the hour: the rotated file, all
    # before the window, was never opened
    assert health.files_read == 1


def test_serving_health_says_when_latency_is_not_recorded(tmp_path):
    path = write(tmp_path / "exposures.jsonl", [health_record(5, None) for _ in range(3)])
    health = serving_health(path, since=NOW - timedelta(hours=1), until=NOW)
    assert health.requests == 3
    assert health.latency_recorded == 0
    assert health.p99_ms is None


def test_serving_health_of_an_empty_or_missing_log_is_zero(tmp_path):
    health = serving_health(tmp_path / "none.jsonl", since=NOW - timedelta(hours=1), until=NOW)
    assert (health.requests, health.degraded_share, health.p99_ms) == (0, None, None)


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_reading_a_file_backwards_yields_every_line_whatever_the_block_size(tmp_path, block):
    lines = [f'{{"n": {i}, "pad": "{"x" * (i % 13)}"}}' for i in range(40)]
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(lines) + "\n")
    got = [line.decode() for line in online._reverse_lines(path, block=block) if line]
    assert got == list(reversed(lines))


def test_a_file_rotated_away_while_reading_is_skipped_not_an_error(tmp_path):
    stats = online.ReadStats()
    present = write(tmp_path / "a.jsonl", [exposure("r1", "default", "v1", [1], at(10, 1))])
    records = list(online.iter_records([tmp_path / "gone.jsonl.1", present], stats))
    assert [r["request_id"] for _, r in records] == ["r1"]
    assert stats.files_skipped == 1
    assert list(online._reverse_lines(tmp_path / "gone.jsonl")) == []


def test_serving_health_summarises_only_the_newest_records_past_its_cap(tmp_path):
    # Given 30 requests in the last hour, one a minute, the newest 10 of them degraded
    records = [health_record(30 - i, 1.0, "redis_timeout" if i >= 20 else None) for i in range(30)]
    path = write(tmp_path / "exposures.jsonl", records)
    # When at most 10 records may be read
    health = serving_health(path, since=NOW - timedelta(hours=1), until=NOW, max_records=10)
    # Then the newest 10 are summarised and the result says from when
    assert (health.requests, health.degraded) == (10, 10)
    assert health.truncated
    assert health.covered_from == NOW - timedelta(minutes=11)
    assert not serving_health(path, since=NOW - timedelta(hours=1), until=NOW).truncated
