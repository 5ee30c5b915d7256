"""Attribution of clean interactions to exposures (last touch) and the grouped online evaluation.

Hand-made logs and interactions; window 2026-01-10 UTC, attribution window 24 h.

Exposures (user 7 unless said otherwise):

    request  when        scene    variant  model  items (item, position, channel, price)
    r1       10 08:00    for_you  exp:a    v1     101 p1 itemcf 10 · 102 p2 content 20 · 103 p4 itemcf -
    r5       10 09:00    for_you  default  v1     106 p1 popular      (no user, no visitor)
    r2       10 12:00    similar  exp:b    v2     101 p3 tag 10 · 104 p11 popular 5
    r3       10 20:00    for_you  default  v1     105 p6 itemcf 50    (visitor ABCDEF0123456789 only)
    r4       11 06:00    for_you  exp:a    v1     102 p1 content 20   (after the window: competes only)

Interactions (the clean frame) and where each goes:

    i1   u7   101 detail_view   10 09:00           -> r1/101 click
    i2   u7   101 purchase 15   10 13:00           -> r2/101 (last touch: r2 is later than r1)
    i3   u7   102 purchase      11 07:00           -> r4, after the window: not counted here
    i4   u7   102 detail_view   10 10:00           -> r1/102 click
    i5   u7   103 detail_view   11 08:00 exactly   -> r1 + 24 h: expired (the window is half-open)
    i6   u7   103 add_to_cart   11 07:59:59        -> r1/103 cart (just inside)
    i7   u7   103 purchase      11 07:59 no value  -> r1/103 purchase, unpriced (no price shown)
    i8   u99 / visitor abcdef0123456789, 105 search_click  10 20:00 exactly  -> r3/105 click
         (matched on the visitor id, case-insensitively; an event at the exposure's instant counts)
    i9   visitor abcdef0123456789, 105 purchase value 0 x2  10 21:00 -> r3/105, valued 2 x 50 = 100
    i10  u7   104 detail_view   10 11:00           -> no exposure before it (r2 is later)
    i11  u8   101 detail_view   10 09:00           -> no exposure to user 8
    i12  u7   101 favorite      10 09:30           -> not an outcome event: ignored
    i13  u7   101 detail_view   09 23:00           -> before the window: not read

Feedback (client-reported): r1 click on 102; r2 purchase of 104 without a value (exposure price 5).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from apps.experiments import attribution
from apps.experiments.attribution import (
    ATTRIBUTED,
    FEEDBACK,
    Interaction,
    LastTouch,
    compare_promotion,
    evaluate_grouped,
    interactions_from_frame,
    position_bucket,
    rate_difference,
)
from apps.experiments.online import Counts, evaluate_online
from tests.experiments.test_online import feedback, write

START = datetime(2026, 1, 10, tzinfo=UTC)
END = START + timedelta(days=1)
WINDOW = timedelta(hours=24)


def t(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, 1, day, hour, minute, second, tzinfo=UTC)


def shown(
    rid: str,
    when: datetime,
    items: list[tuple[int, int, str, float | None]],
    *,
    user: int | None = 7,
    visitor: str | None = None,
    scene: str = "for_you",
    variant: str = "exp:a",
    model: str = "v1",
) -> dict:
    """An exposure line as apps.serving.api.log_exposure writes it."""
    return {
        "ts": when.isoformat(),
        "request_id": rid,
        "user_id": user,
        "visitor_id": visitor,
        "scene": scene,
        "variant": variant,
        "model_version": model,
        "degraded": False,
        "degrade_reason": None,
        "source": "redis",
        "latency_ms": 2.0,
        "items": [
            {"item_id": i, "position": p, "channel": c, "price": price} for i, p, c, price in items
        ],
    }


def frame(rows: list[tuple]) -> pd.DataFrame:
    """A clean interactions frame from (user, visitor, item, event, ts, value, quantity)."""
    users, visitors, items, events, stamps, values, quantities = zip(*rows, strict=True)
    return pd.DataFrame(
        {
            "user_id": pd.array(users, dtype="Int64"),
            "visitor_id": pd.array(visitors, dtype="string"),
            "item_id": pd.array(items, dtype="Int64"),
            "event": pd.array(events, dtype="string"),
            "ts": pd.to_datetime(list(stamps), utc=True),
            "value": pd.array(values, dtype="float64"),
            "quantity": pd.array(quantities, dtype="int64"),
        }
    )


VISITOR = "abcdef0123456789"
INTERACTIONS = frame(
    [
        (7, None, 101, "detail_view", t(10, 9), 0.0, 1),  # i1
        (7, None, 101, "purchase", t(10, 13), 15.0, 1),  # i2
        (7, None, 102, "purchase", t(11, 7), 20.0, 1),  # i3
        (7, None, 102, "detail_view", t(10, 10), 0.0, 1),  # i4
        (7, None, 103, "detail_view", t(11, 8), 0.0, 1),  # i5
        (7, None, 103, "add_to_cart", t(11, 7, 59, 59), 0.0, 1),  # i6
        (7, None, 103, "purchase", t(11, 7, 59), float("nan"), 1),  # i7
        (99, VISITOR, 105, "search_click", t(10, 20), 0.0, 1),  # i8
        (None, VISITOR, 105, "purchase", t(10, 21), 0.0, 2),  # i9
        (7, None, 104, "detail_view", t(10, 11), 0.0, 1),  # i10
        (8, None, 101, "detail_view", t(10, 9), 0.0, 1),  # i11
        (7, None, 101, "favorite", t(10, 9, 30), 0.0, 1),  # i12
        (7, None, 101, "detail_view", t(9, 23), 0.0, 1),  # i13
    ]
)


def write_logs(directory: Path) -> Path:
    """Write the exposure and feedback logs of the module docstring; the exposure log's path."""
    write(
        directory / "exposures.jsonl",
        [
            shown(
                "r1",
                t(10, 8),
                [(101, 1, "itemcf", 10.0), (102, 2, "content", 20.0), (103, 4, "itemcf", None)],
            ),
            shown("r5", t(10, 9), [(106, 1, "popular", 3.0)], user=None, variant="default"),
            shown(
                "r2",
                t(10, 12),
                [(101, 3, "tag", 10.0), (104, 11, "popular", 5.0)],
                scene="similar",
                variant="exp:b",
                model="v2",
            ),
            shown(
                "r3",
                t(10, 20),
                [(105, 6, "itemcf", 50.0)],
                user=None,
                visitor="ABCDEF0123456789",
                variant="default",
            ),
            shown("r4", t(11, 6), [(102, 1, "content", 20.0)]),
        ],
    )
    write(
        directory / "feedback.jsonl",
        [
            feedback("r1", "click", 102, t(10, 8, 1).isoformat()),
            feedback("r2", "purchase", 104, t(10, 12, 30).isoformat()),
        ],
    )
    return directory / "exposures.jsonl"


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return write_logs(tmp_path / "exposures")


def interactions(since: datetime = START, until: datetime = END + WINDOW) -> list[Interaction]:
    return interactions_from_frame(INTERACTIONS, since=since, until=until)


def evaluate(log: Path, **kwargs):
    kwargs.setdefault("interactions", interactions())
    kwargs.setdefault("window", WINDOW)
    return evaluate_grouped(log, start=START, end=END, **kwargs)


def counts(c: Counts, *names: str) -> tuple:
    return tuple(getattr(c, n) for n in names)


# --- pieces -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("position", "bucket"),
    [
        (1, "1"),
        (2, "2"),
        (3, "3"),
        (4, "4-5"),
        (5, "4-5"),
        (6, "6-10"),
        (10, "6-10"),
        (11, "11+"),
        (250, "11+"),
        (0, "unknown"),
        (None, "unknown"),
        ("x", "unknown"),
    ],
)
def test_positions_fall_in_their_buckets(position, bucket):
    assert position_bucket(position) == bucket


def test_the_frame_keeps_outcome_events_in_range_with_an_item_and_an_identity():
    found = interactions()
    # i12 (favorite) and i13 (before the window) are left out; the rest are oldest first
    assert len(found) == 11
    assert [i.ts for i in found] == sorted(i.ts for i in found)
    by_time = {(i.item_id, i.ts): i for i in found}
    assert by_time[(101, t(10, 9))].kind == "click"
    assert by_time[(105, t(10, 20))].keys == ("u:99", f"v:{VISITOR}")
    # a purchase without a value (0 or NaN) carries None, and its quantity
    assert by_time[(105, t(10, 21))].value is None
    assert by_time[(105, t(10, 21))].quantity == 2
    assert by_time[(101, t(10, 13))].value == 15.0


def test_the_latest_earlier_exposure_takes_the_credit_and_the_window_is_half_open():
    touch = LastTouch(
        [
            Interaction(t(10, 13), ("u:1",), 5, "click"),  # after both exposures: the later
            Interaction(t(10, 11), ("u:1",), 5, "click"),  # between them: the earlier
            Interaction(t(11, 12), ("u:1",), 5, "click"),  # exactly 24 h after the later one
            Interaction(t(10, 9), ("u:1",), 5, "click"),  # before any exposure
        ],
        WINDOW,
    )
    assert touch.add(("u:1",), 5, t(10, 10), 0)
    assert touch.add(("u:1",), 5, t(10, 12), 1)
    assert not touch.add(("u:2",), 5, t(10, 12), 2)  # no interaction of user 2: not kept
    credited, stats = touch.resolve()
    assert {slot: [i.ts for i in found] for slot, found in credited.items()} == {
        0: [t(10, 11)],
        1: [t(10, 13)],
    }
    assert (stats.expired, stats.no_exposure, stats.credited["click"]) == (1, 1, 2)


def test_the_attribution_window_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        LastTouch([], timedelta(0))


def test_newcombe_interval_of_a_difference_matches_the_published_example():
    # Newcombe (1998), Statistics in Medicine 17:873, table II: 56/70 - 48/80, method 10
    difference = rate_difference((48, 80), (56, 70))
    assert difference["value"] == pytest.approx(0.2)
    assert (difference["low"], difference["high"]) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    assert rate_difference((1, 10), (0, 0)) is None


# --- the grouped evaluation ---------------------------------------------------------------------


def test_attributed_totals_are_the_ones_worked_out_by_hand(log):
    total = evaluate(log).totals[ATTRIBUTED]
    # 4 responses (r1, r5, r2, r3), 7 items; clicks r1/101, r1/102, r3/105; cart r1/103;
    # purchases r1/103 (unpriced), r2/101 (15), r3/105 (2 x 50)
    assert total.to_dict() == {
        "requests": 4,
        "impressions": 7,
        "degraded_requests": 0,
        "requests_clicked": 2,
        "clicks": 3,
        "add_to_carts": 1,
        "purchases": 3,
        "clicked_purchases": 1,
        "purchases_unpriced": 1,
        "gmv": 115.0,
        "gmv_sq": 15.0**2 + 100.0**2,
    }
    metrics = total.metrics()
    assert metrics["ctr"]["value"] == pytest.approx(3 / 7)
    assert metrics["cvr_exposure"]["value"] == pytest.approx(3 / 7)
    assert metrics["gmv_per_exposure"]["value"] == pytest.approx(115 / 7)


def test_every_interaction_is_accounted_for(log):
    stats = evaluate(log).attribution.to_dict()
    assert stats == {
        "interactions": 11,
        "credited": {"add_to_cart": 1, "click": 3, "purchase": 3},
        "credited_total": 7,
        "no_exposure": 2,  # i10 (its only exposure is later), i11 (user 8 never saw 101)
        "expired": 1,  # i5, exactly 24 h after r1
        "later_exposure": 1,  # i3 belongs to r4, tomorrow
        "impressions_without_identity": 1,  # r5
    }


def test_the_purchase_goes_to_the_last_touch_not_the_first(log):
    result = evaluate(log)
    by_variant = result.groups[ATTRIBUTED]["variant"]
    # i2 (101 bought at 13:00) was shown in r1 (exp:a, 08:00) and r2 (exp:b, 12:00): r2 wins
    assert counts(by_variant["exp:b"], "purchases", "gmv") == (1, 15.0)
    assert counts(by_variant["exp:a"], "clicks", "add_to_carts", "purchases", "gmv") == (
        2,
        1,
        1,
        0.0,
    )
    assert by_variant["exp:a"].purchases_unpriced == 1
    assert counts(by_variant["default"], "requests", "impressions", "clicks", "gmv") == (
        2,
        2,
        1,
        100.0,
    )


def test_positions_are_bucketed_and_add_up_to_the_total(log):
    by_position = evaluate(log).groups[ATTRIBUTED]["position"]
    got = {
        label: counts(c, "impressions", "clicks", "purchases", "gmv")
        for label, c in by_position.items()
    }
    assert got == {
        "1": (2, 1, 0, 0.0),  # r1/101 clicked, r5/106
        "2": (1, 1, 0, 0.0),  # r1/102
        "3": (1, 0, 1, 15.0),  # r2/101
        "4-5": (1, 0, 1, 0.0),  # r1/103, bought without a price
        "6-10": (1, 1, 1, 100.0),  # r3/105
        "11+": (1, 0, 0, 0.0),  # r2/104
    }
    # a response counts in each bucket it showed an item in
    assert (by_position["1"].requests, by_position["1"].requests_clicked) == (2, 1)
    assert list(evaluate(log).to_dict()["breakdown"][ATTRIBUTED]["position"]) == [
        "1",
        "2",
        "3",
        "4-5",
        "6-10",
        "11+",
    ]


def test_channels_scenes_models_and_days_are_grouped(log):
    groups = evaluate(log).groups[ATTRIBUTED]
    channel = {
        k: counts(c, "requests", "impressions", "clicks", "purchases")
        for k, c in groups["channel"].items()
    }
    assert channel == {
        "itemcf": (2, 3, 2, 2),
        "content": (1, 1, 1, 0),
        "tag": (1, 1, 0, 1),
        "popular": (2, 2, 0, 0),
    }
    assert counts(groups["scene"]["similar"], "requests", "impressions", "gmv") == (1, 2, 15.0)
    assert counts(groups["scene"]["for_you"], "requests", "impressions", "gmv") == (3, 5, 100.0)
    assert counts(groups["model_version"]["v2"], "requests", "purchases") == (1, 1)
    assert set(groups["day"]) == {"2026-01-10"}
    assert groups["day"]["2026-01-10"].impressions == 7


def test_the_feedback_basis_is_the_existing_join_and_values_with_the_shown_price(log):
    result = evaluate(log)
    total = result.totals[FEEDBACK]
    # r1/102 clicked; r2/104 bought without a value: the price shown with it, 5
    assert counts(total, "clicks", "purchases", "gmv", "requests_clicked") == (1, 1, 5.0, 1)
    assert result.feedback_matched == 2
    # the per-variant groups are what evaluate_online computes
    plain = evaluate_online(log, start=START, end=END)
    for label, c in plain.by_variant.items():
        assert result.groups[FEEDBACK]["variant"][label] == c
    assert result.groups[FEEDBACK]["model_version"] == plain.by_model_version


def test_without_interactions_nothing_is_attributed_and_later_exposures_are_not_read(log):
    result = evaluate(log, interactions=[])
    assert result.totals[ATTRIBUTED].clicks == 0
    assert result.totals[ATTRIBUTED].impressions == 7
    assert result.attribution.interactions == 0


def test_a_later_day_credits_what_belongs_to_it_and_nothing_twice(log):
    # i3 (102 bought at 11 07:00) belongs to r4 (11 06:00): counted on the 11th only
    day2 = evaluate_grouped(
        log,
        start=END,
        end=END + timedelta(days=1),
        interactions=interactions(END, END + timedelta(days=1) + WINDOW),
        window=WINDOW,
    )
    assert counts(day2.totals[ATTRIBUTED], "impressions", "purchases", "gmv") == (1, 1, 20.0)
    day1 = evaluate(log)
    credited = day1.attribution.to_dict()["credited_total"]
    credited += day2.attribution.to_dict()["credited_total"]
    assert credited == 8  # 7 on the 10th + i3 on the 11th: each interaction at most once


def test_a_shorter_window_credits_less(log):
    result = evaluate(log, window=timedelta(hours=2))
    total = result.totals[ATTRIBUTED]
    # within 2 h: i1 (1 h after r1), i4 (2 h after r1: no, the window is half-open),
    # i2 (1 h after r2), i8 (at r3), i9 (1 h after r3)
    assert counts(total, "clicks", "purchases", "gmv") == (2, 2, 115.0)


def test_the_stored_form_is_json_ready_and_has_every_dimension(log):
    import json

    data = evaluate(log).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["dimensions"] == list(attribution.DIMENSIONS)
    assert set(data["breakdown"]) == {FEEDBACK, ATTRIBUTED}
    assert data["window_hours"] == 24.0
    group = data["breakdown"][ATTRIBUTED]["channel"]["itemcf"]
    assert Counts.from_dict(group["counts"]).metrics() == group["metrics"]


# --- before / after a promotion -----------------------------------------------------------------


def test_the_comparison_splits_equal_windows_at_the_promotion(log):
    # Given v2 promoted at 12:00 on the 10th, compared over 6 hours, two days later
    promoted = t(10, 12)
    result = compare_promotion(
        log,
        promoted_at=promoted,
        now=t(12, 0),
        span=timedelta(hours=6),
        interactions=interactions(promoted - timedelta(hours=6), t(12, 0)),
        window=WINDOW,
        model_version="v2",
    )
    assert result["status"] == "ready"
    assert result["hours"] == 6.0
    # before = [06:00, 12:00): r1 and r5; after = [12:00, 18:00): r2 (r3 at 20:00 is out)
    before = result["before"]["totals"][ATTRIBUTED]["counts"]
    after = result["after"]["totals"][ATTRIBUTED]["counts"]
    assert (before["requests"], before["impressions"], before["clicks"]) == (2, 4, 2)
    # i2 bought 101 after r2 showed it: credited after the promotion, not before
    assert (before["purchases"], before["gmv"]) == (1, 0.0)
    assert (after["requests"], after["impressions"], after["purchases"], after["gmv"]) == (
        1,
        2,
        1,
        15.0,
    )
    assert set(result["before"]["breakdown"][ATTRIBUTED]["model_version"]) == {"v1"}
    assert set(result["after"]["breakdown"][ATTRIBUTED]["model_version"]) == {"v2"}
    ctr = result["difference"][ATTRIBUTED]["ctr"]
    assert ctr["value"] == pytest.approx(0 / 2 - 2 / 4)
    assert ctr["low"] < ctr["value"] < ctr["high"]


def test_the_after_window_waits_until_its_outcomes_are_in(log):
    promoted = t(10, 12)
    # 30 hours after: only 6 hours of "after" exposures have had their 24 hours
    short = compare_promotion(
        log, promoted_at=promoted, now=promoted + timedelta(hours=30), span=timedelta(days=7)
    )
    assert (short["status"], short["hours"]) == ("ready", 6.0)
    assert short["before"]["start"] == (promoted - timedelta(hours=6)).isoformat()
    pending = compare_promotion(
        log, promoted_at=promoted, now=promoted + timedelta(hours=20), span=timedelta(days=7)
    )
    assert pending["status"] == "pending"
    assert pending["ready_at"] == (promoted + timedelta(hours=25)).isoformat()
