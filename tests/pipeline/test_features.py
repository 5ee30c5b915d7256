"""FeatureBuilder and the feature catalogue, on synthetic data with a known answer."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apps.pipeline import demo, schema
from apps.pipeline.features import (
    FEATURE_NAMES,
    MISSING_RANK,
    NEVER_DAYS,
    PRICE_STD_FLOOR,
    RECALL_CHANNELS,
    SCENE_CODES,
    FeatureBuilder,
    catalogue,
    catalogue_frame,
    default_vector,
    feature_names,
    feature_schema,
    feature_schema_hash,
    spec_default,
)
from apps.pipeline.train.base import TrainingSet
from tests.demo_frames import demo_clean_frames
from tests.pipeline.test_clean import canonical_dataset

REPO = Path(__file__).resolve().parents[2]
# Sunday 2024-06-30 12:00 UTC.
T = pd.Timestamp("2024-06-30 12:00", tz="UTC")
H = pd.Timedelta(hours=1)
D = pd.Timedelta(days=1)


def frames_for(events: list[tuple]) -> dict[str, pd.DataFrame]:
    """Canonical frames of the fixed users and items plus ``events``.

    Each event is (user_id | None, visitor_id | None, item_id, event, ts, value, session_id).
    """
    users = pd.DataFrame(
        {
            "user_id": [1, 2, 3],
            "industry": ["Finance", "Retail", None],
            "created_at": [T - 100 * D, T - 50 * D, T - 10 * D],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": [10, 11, 20, 21],
            "title": ["Bank loans", "Bank rates", "Shops", "Coupons"],
            "description": ["loans by bank", "", "shop list", "coupon list"],
            "tags": ["bank,loan", "bank", "shop", "shop,coupon"],
            "category": ["finance", "finance", "retail", "retail"],
            "price": [100.0, 200.0, 10.0, 20.0],
            "company": ["A", "A", "B", "B"],
            "created_at": [T - 60 * D] * 4,
            "updated_at": [T - 5 * D, T - 5 * D, T - 2 * D, T - 2 * D],
            "is_active": [True, True, True, False],
        }
    )
    rows = pd.DataFrame(
        events,
        columns=["user_id", "visitor_id", "item_id", "event", "ts", "value", "session_id"],
    )
    rows["user_id"] = rows["user_id"].astype("Int64")
    rows["item_id"] = rows["item_id"].astype("Int64")
    rows = rows.assign(
        quantity=1,
        source=np.where(rows["visitor_id"].isna(), "business", "matomo"),
        ref=[f"r{k}" for k in range(len(rows))],
    )
    return {
        "users": schema.conform(users, schema.USERS),
        "items": schema.conform(items, schema.ITEMS),
        "interactions": schema.conform(rows, schema.INTERACTIONS),
    }


# User 1 only ever touches finance items (10, 11), user 2 only retail (20, 21); a visitor
# links items 20 and 10 in one session. The ``FUTURE`` events happen at or after T.
PAST = [
    (1, None, 10, "purchase", T - 2 * H, 100.0, "s1"),
    (1, None, 10, "detail_view", T - 3 * D, 0.0, "s2"),
    (1, None, 11, "detail_view", T - 3 * D + 10 * pd.Timedelta(minutes=1), 0.0, "s2"),
    (1, None, 11, "add_to_cart", T - 10 * D, 0.0, "s3"),
    (1, None, 11, "purchase", T - 40 * D, 200.0, None),
    (2, None, 20, "detail_view", T - 20 * H, 0.0, "s4"),
    (2, None, 21, "detail_view", T - 20 * H + pd.Timedelta(minutes=5), 0.0, "s4"),
    (2, None, 20, "purchase", T - 5 * D, 10.0, "s5"),
    (None, "aaaaaaaaaaaaaaaa", 20, "view", T - 6 * H, 0.0, "s6"),
    (None, "aaaaaaaaaaaaaaaa", 10, "view", T - 6 * H + pd.Timedelta(minutes=1), 0.0, "s6"),
]
FUTURE = [
    (1, None, 20, "purchase", T, 10.0, "s7"),
    (1, None, 21, "detail_view", T + H, 0.0, "s7"),
    (3, None, 10, "detail_view", T + 2 * D, 0.0, "s8"),
    (None, "bbbbbbbbbbbbbbbb", 11, "view", T + 3 * H, 0.0, "s9"),
]


@pytest.fixture(scope="module")
def builder() -> FeatureBuilder:
    return FeatureBuilder(cutoff=T).fit(frames_for(PAST + FUTURE))


def features_of(builder: FeatureBuilder, pairs: list[tuple[int, int]], **kw) -> pd.DataFrame:
    frame = pd.DataFrame(pairs, columns=["user_id", "item_id"])
    matrix, names = builder.transform_pairs(frame, **kw)
    return pd.DataFrame(matrix, columns=names)


# --- catalogue ----------------------------------------------------------------------------------


def test_the_catalogue_documents_at_least_70_unique_features():
    specs = catalogue()
    names = [s.name for s in specs]
    # Then there are 70+ features, no duplicate names, every one defined and typed
    assert len(names) >= 70
    assert len(set(names)) == len(names)
    assert all(len(s.definition) > 15 for s in specs)
    assert {s.entity for s in specs} == {"user", "item", "user_item", "context"}
    assert {s.dtype for s in specs} <= {"float32", "int32"}
    # and the admin table shows the same rows in the same order
    frame = catalogue_frame()
    assert frame["name"].tolist() == names
    assert {"entity", "definition", "dtype", "default"} <= set(frame.columns)


def test_the_catalogue_declares_recall_columns_for_every_channel():
    names = set(FEATURE_NAMES)
    for channel in RECALL_CHANNELS:
        assert f"recall_score_{channel}" in names
        assert f"recall_rank_{channel}" in names
    assert len(RECALL_CHANNELS) == 11
    # and an absent channel reads as "not recalled"
    assert spec_default("recall_score_itemcf") == 0.0
    assert spec_default("recall_rank_itemcf") == MISSING_RANK


def test_matrix_columns_are_the_catalogue_in_order(builder):
    # When a matrix is built
    matrix, names = builder.transform_pairs(pd.DataFrame({"user_id": [1], "item_id": [10]}))
    # Then its columns are exactly the catalogue, and the schema lists them in that order
    assert names == [s.name for s in catalogue()]
    assert matrix.shape == (1, len(names))
    assert matrix.dtype == np.float32
    assert [c["name"] for c in feature_schema()] == names
    # and the entity blocks are contiguous, in the order user, item, user_item, context
    entities = [s.entity for s in catalogue()]
    assert entities == sorted(entities, key=["user", "item", "user_item", "context"].index)


def test_the_schema_hash_is_stable_and_json_round_trips():
    import json

    assert json.loads(json.dumps(feature_schema())) == feature_schema()
    assert feature_schema_hash() == feature_schema_hash()
    assert len(feature_schema_hash()) == 64


# --- user features ------------------------------------------------------------------------------


def test_user_counts_per_event_group_and_window_are_exact(builder):
    user = builder.user_features_.loc[1]
    # user 1: purchase 2h ago, two detail views 3d ago, a cart 10d ago, a purchase 40d ago
    assert user["user_events_1d"] == 1
    assert user["user_purchases_1d"] == 1
    assert user["user_events_7d"] == 3
    assert user["user_views_7d"] == 2
    assert user["user_events_30d"] == 4
    assert user["user_carts_30d"] == 1
    assert user["user_purchases_30d"] == 1
    assert user["user_events_all"] == 5
    assert user["user_purchases_all"] == 2
    assert user["user_searches_all"] == 0
    # and user 3, whose only event is two days after the cutoff, has none
    assert builder.user_features_.loc[3, "user_events_all"] == 0


def test_user_recency_frequency_sessions_and_spend(builder):
    user = builder.user_features_.loc[1]
    assert user["user_days_since_last_event"] == pytest.approx(2 / 24, rel=1e-5)
    assert user["user_days_since_last_purchase"] == pytest.approx(2 / 24, rel=1e-5)
    assert user["user_days_since_first_event"] == pytest.approx(40, rel=1e-6)
    # four UTC days: today, 3 days ago (both views), 10 and 40 days ago
    assert user["user_active_days_all"] == 4
    # s1, s2, s3, and the session-less business purchase counted as its own user-day
    assert user["user_sessions_all"] == 4
    assert user["user_events_per_session"] == pytest.approx(5 / 4)
    assert user["user_purchase_value_sum"] == 300
    assert user["user_purchase_value_mean"] == 150
    assert user["user_purchase_value_max"] == 200
    assert user["user_purchase_view_ratio"] == pytest.approx(2 / 2)
    assert user["user_cart_view_ratio"] == pytest.approx(1 / 2)
    assert user["user_days_since_signup"] == pytest.approx(100)
    # user 3 never acted before the cutoff: never-values, zero counts
    quiet = builder.user_features_.loc[3]
    assert quiet["user_days_since_last_event"] == NEVER_DAYS
    assert quiet["user_events_all"] == 0


def test_user_price_preferences_are_weighted_by_event_strength(builder):
    user = builder.user_features_.loc[1]
    # strengths 1 + weight: purchase 6, detail_view 2, add_to_cart 4
    # item 10 (100): purchase 6 + view 2 = 8; item 11 (200): view 2 + cart 4 + purchase 6 = 12
    mean = (8 * 100 + 12 * 200) / 20
    assert user["user_price_mean"] == pytest.approx(mean)
    assert user["user_price_std"] == pytest.approx(
        math.sqrt((8 * (100 - mean) ** 2 + 12 * (200 - mean) ** 2) / 20)
    )
    # the weighted median: 8/20 of the weight is at 100, so half is reached at 200
    assert user["user_price_median"] == pytest.approx(200)
    log_mean = (8 * math.log1p(100) + 12 * math.log1p(200)) / 20
    assert user["user_log_price_mean"] == pytest.approx(log_mean, rel=1e-6)


def test_a_user_who_only_touched_finance_has_all_their_affinity_there(builder):
    user = builder.user_features_.loc[1]
    assert user["user_distinct_categories"] == 1
    assert user["user_top_category_share"] == pytest.approx(1.0)
    assert user["user_category_entropy"] == pytest.approx(0.0)
    assert user["user_distinct_items"] == 2
    assert user["user_repeat_ratio"] == pytest.approx(1 - 2 / 5)
    # tags: bank on both items (weight 8 + 12), loan on item 10 only (8)
    p_bank, p_loan = 20 / 28, 8 / 28
    assert user["user_distinct_tags"] == 2
    assert user["user_tag_entropy"] == pytest.approx(
        -(p_bank * math.log(p_bank) + p_loan * math.log(p_loan)), rel=1e-5
    )


# --- item features ------------------------------------------------------------------------------


def test_item_popularity_counts_visitors_and_distinct_actors(builder):
    item = builder.item_features_.loc[20]
    # item 20: user 2 viewed 20h ago and bought 5d ago, a visitor viewed 6h ago
    assert item["item_events_1d"] == 2
    assert item["item_users_1d"] == 2
    assert item["item_events_7d"] == 3
    assert item["item_users_7d"] == 2
    assert item["item_purchases_all"] == 1
    assert item["item_revenue_all"] == 10
    assert item["item_days_since_last_event"] == pytest.approx(0.25, rel=1e-5)
    # trend: 3 events in the last 7 days, none in the 7 before
    assert item["item_trend_7d"] == pytest.approx(math.log(4 / 1))


def test_item_attributes_price_band_text_and_codes(builder):
    items = builder.item_features_
    assert items.loc[10, "item_price"] == 100
    assert items.loc[10, "item_log_price"] == pytest.approx(math.log1p(100), rel=1e-6)
    # bands are price quantiles: the dearest item is in a higher band than the cheapest
    assert items.loc[11, "item_price_band"] > items.loc[20, "item_price_band"]
    assert items.loc[10, "item_title_length"] == len("Bank loans")
    assert items.loc[11, "item_description_length"] == 0
    assert items.loc[21, "item_tag_count"] == 2
    # categories are coded by sorted name, 1-based: finance 1, retail 2
    assert items.loc[10, "item_category_code"] == 1
    assert items.loc[20, "item_category_code"] == 2
    assert items.loc[21, "item_is_active"] == 0
    assert items.loc[20, "item_age_days"] == pytest.approx(60)
    assert items.loc[20, "item_days_since_update"] == pytest.approx(2)
    # finance median log price is between 100 and 200, so item 10 is below it
    assert (
        items.loc[10, "item_log_price_vs_category"]
        < 0
        < items.loc[11, "item_log_price_vs_category"]
    )


def test_conversion_rates_are_smoothed_towards_the_global_rate():
    # Given 10 views and 4 carts on item 10, 10 views and no cart on item 20
    events = [
        (1, None, it, "detail_view", T - k * H, 0.0, "s") for k in range(1, 11) for it in (10, 20)
    ]
    events += [(1, None, 10, "add_to_cart", T - k * H, 0.0, "s") for k in range(1, 5)]
    builder = FeatureBuilder(cutoff=T, smoothing=5.0).fit(frames_for(events))
    items = builder.item_features_
    # Then the rate is (carts + a*p) / (views + a), with p the global rate 4/20
    assert items.loc[10, "item_view_to_cart_rate"] == pytest.approx((4 + 5 * 0.2) / (10 + 5))
    assert items.loc[20, "item_view_to_cart_rate"] == pytest.approx((0 + 5 * 0.2) / (10 + 5))
    # and an item with no views gets the global rate itself
    assert items.loc[11, "item_view_to_cart_rate"] == pytest.approx(0.2)


# --- user x item --------------------------------------------------------------------------------


def test_cross_affinity_is_high_for_a_finance_item_and_zero_for_a_retail_one(builder):
    rows = features_of(builder, [(1, 11), (1, 21)])
    finance, retail = rows.iloc[0], rows.iloc[1]
    assert finance["ui_category_affinity"] == pytest.approx(1.0)
    assert retail["ui_category_affinity"] == 0.0
    assert finance["ui_industry_match"] == 1
    assert retail["ui_industry_match"] == 0
    assert finance["ui_company_affinity"] == pytest.approx(1.0)
    assert retail["ui_company_affinity"] == 0.0


def test_tag_overlap_jaccard_and_weighted_affinity(builder):
    rows = features_of(builder, [(1, 11), (1, 10), (1, 21)])
    # user 1's profile: bank 20/28, loan 8/28
    one_tag, both_tags, none = rows.iloc[0], rows.iloc[1], rows.iloc[2]
    assert one_tag["ui_tag_overlap"] == 1
    assert one_tag["ui_tag_jaccard"] == pytest.approx(1 / 2)
    assert one_tag["ui_tag_affinity"] == pytest.approx(20 / 28, rel=1e-5)
    assert both_tags["ui_tag_jaccard"] == pytest.approx(1.0)
    assert both_tags["ui_tag_affinity"] == pytest.approx(1.0, rel=1e-5)
    assert none["ui_tag_overlap"] == 0
    assert none["ui_tag_jaccard"] == 0


def test_price_distance_is_measured_in_the_users_log_price_spread(builder):
    user = builder.user_features_.loc[1]
    rows = features_of(builder, [(1, 20)])
    diff = math.log1p(10) - user["user_log_price_mean"]
    spread = max(user["user_log_price_std"], PRICE_STD_FLOOR)
    assert rows.loc[0, "ui_log_price_diff"] == pytest.approx(diff, rel=1e-5)
    assert rows.loc[0, "ui_price_distance"] == pytest.approx(abs(diff) / spread, rel=1e-5)


def test_repeat_signals_count_the_users_past_events_on_the_item(builder):
    rows = features_of(builder, [(1, 11), (1, 20)])
    seen, unseen = rows.iloc[0], rows.iloc[1]
    # item 11: a view 3d ago, a cart 10d ago, a purchase 40d ago
    assert seen["ui_past_interactions"] == 3
    assert seen["ui_past_weight"] == 2 + 4 + 6
    assert seen["ui_past_purchases"] == 1
    assert seen["ui_days_since_last_interaction"] == pytest.approx(3 - 10 / 1440, rel=1e-5)
    assert unseen["ui_past_interactions"] == 0
    assert unseen["ui_days_since_last_interaction"] == NEVER_DAYS


def test_covisitation_scores_items_that_share_sessions_with_recent_items(builder):
    # sessions per item: 10 in s1, s2, s6; 11 in s2, s3, a user-day; 20 in s4, s5, s6; 21 in s4
    rows = features_of(builder, [(2, 10), (2, 11), (1, 20)])
    # user 2's recent items are 20 and 21; 20 and 10 share one session (the visitor's)
    assert rows.loc[0, "ui_covisit_score"] == pytest.approx(1 / math.sqrt(3 * 3), rel=1e-5)
    assert rows.loc[0, "ui_covisit_max"] == pytest.approx(1 / 3, rel=1e-5)
    # nothing links 11 with 20 or 21
    assert rows.loc[1, "ui_covisit_score"] == 0
    # user 1's recent items 10 and 11: only 10 shares a session with 20
    assert rows.loc[2, "ui_covisit_score"] == pytest.approx(1 / 3, rel=1e-5)


def test_recall_columns_are_taken_from_the_caller_with_safe_defaults(builder):
    pairs = pd.DataFrame(
        {
            "user_id": [1, 1, 1],
            "item_id": [10, 11, 20],
            "recall_score_itemcf": [0.9, np.nan, np.inf],
            "recall_rank_itemcf": [1, np.nan, 3],
            "recall_score_popular": [0.0, 0.5, 0.0],
            "recall_rank_popular": [np.nan, 7, -1],
        }
    )
    matrix, names = builder.transform_pairs(pairs)
    rows = pd.DataFrame(matrix, columns=names)
    assert rows["recall_score_itemcf"].tolist() == pytest.approx([0.9, 0.0, 0.0])
    assert rows["recall_rank_itemcf"].tolist() == [1, MISSING_RANK, 3]
    assert rows["recall_rank_popular"].tolist() == [MISSING_RANK, 7, MISSING_RANK]
    # channels the caller did not pass read as "not recalled"
    assert (rows["recall_score_ease"] == 0).all()
    assert (rows["recall_rank_ease"] == MISSING_RANK).all()
    assert rows["recall_channels_hit"].tolist() == [1, 1, 1]
    assert rows["recall_best_rank"].tolist() == [1, 7, 3]
    assert np.isfinite(matrix).all()


def test_normalised_recall_scores_are_per_user_and_the_fused_rank_is_carried(builder):
    pairs = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 2, 2],
            "item_id": [10, 11, 20, 10, 11],
            # user 2's scores are ten times user 1's: a model fitted on more history
            "recall_score_ease": [0.5, 0.25, 0.0, 5.0, 2.5],
            "recall_rank_ease": [1, 2, np.nan, 1, 2],
            "fused_rank": [1, 2, 3, 1, np.nan],
        }
    )
    matrix, names = builder.transform_pairs(pairs)
    rows = pd.DataFrame(matrix, columns=names)
    assert rows["recall_norm_ease"].tolist() == pytest.approx([1.0, 0.5, 0.0, 1.0, 0.5])
    # a channel nobody passed has no scores to normalise
    assert (rows["recall_norm_itemcf"] == 0).all()
    assert rows["recall_fused_rank"].tolist() == [1, 2, 3, 1, MISSING_RANK]
    # without a fused_rank column the catalogue default applies
    alone, _ = builder.transform_pairs(pairs.drop(columns="fused_rank"))
    assert (alone[:, names.index("recall_fused_rank")] == MISSING_RANK).all()


# --- context and time ---------------------------------------------------------------------------


def test_context_features_come_from_the_request_time_and_scene(builder):
    # Given a request on Monday 2024-07-01 09:30 UTC in the for_you scene
    now = pd.Timestamp("2024-07-01 09:30", tz="UTC")
    rows = features_of(builder, [(1, 10)], now=now, scene="for_you")
    assert rows.loc[0, "ctx_hour"] == 9
    assert rows.loc[0, "ctx_day_of_week"] == 0
    assert rows.loc[0, "ctx_is_weekend"] == 0
    assert rows.loc[0, "ctx_scene_code"] == SCENE_CODES["for_you"]


def test_per_pair_request_times_and_a_timezone_drive_the_context():
    # Given a builder for Shanghai time and two training pairs with their own request times
    builder = FeatureBuilder(cutoff=T, timezone="Asia/Shanghai").fit(frames_for(PAST))
    pairs = pd.DataFrame(
        {
            "user_id": [1, 2],
            "item_id": [10, 20],
            "ts": pd.to_datetime(["2024-06-30 20:00", "2024-07-01 01:00"], utc=True),
            "scene": ["detail", "nonsense"],
        }
    )
    matrix, names = builder.transform_pairs(pairs)
    rows = pd.DataFrame(matrix, columns=names)
    # 20:00 UTC Sunday is 04:00 Monday in Shanghai
    assert rows["ctx_hour"].tolist() == [4, 9]
    assert rows["ctx_day_of_week"].tolist() == [0, 0]
    assert rows["ctx_scene_code"].tolist() == [SCENE_CODES["detail"], 0]


def test_days_since_features_advance_to_the_request_time_and_counts_do_not(builder):
    at_cutoff = features_of(builder, [(1, 11), (99, 11)])
    later = features_of(builder, [(1, 11), (99, 11)], now=T + 2 * D)
    for name in ("user_days_since_last_event", "item_age_days", "ui_days_since_last_interaction"):
        assert later.loc[0, name] == pytest.approx(at_cutoff.loc[0, name] + 2, rel=1e-5)
    assert later.loc[0, "user_events_7d"] == at_cutoff.loc[0, "user_events_7d"]
    # an unknown user's "never" stays never
    assert later.loc[1, "user_days_since_last_event"] == NEVER_DAYS


def test_a_request_time_before_the_cutoff_is_refused(builder):
    with pytest.raises(ValueError, match="before the cutoff"):
        features_of(builder, [(1, 10)], now=T - H)


# --- point in time ------------------------------------------------------------------------------


def test_events_at_or_after_the_cutoff_never_change_any_feature():
    # Given the same history with and without events at and after the cutoff
    past_only = FeatureBuilder(cutoff=T).fit(frames_for(PAST))
    with_future = FeatureBuilder(cutoff=T).fit(frames_for(PAST + FUTURE))
    # Then every user and item table value is identical
    pd.testing.assert_frame_equal(
        past_only.user_features_, with_future.user_features_.loc[past_only.user_ids_]
    )
    pd.testing.assert_frame_equal(past_only.item_features_, with_future.item_features_)
    # and so is every matrix cell, for every pair, now and later
    pairs = pd.DataFrame(
        [(u, i) for u in (1, 2, 3) for i in (10, 11, 20, 21)], columns=["user_id", "item_id"]
    )
    for now in (T, T + 3 * D):
        np.testing.assert_array_equal(
            past_only.transform_pairs(pairs, now)[0], with_future.transform_pairs(pairs, now)[0]
        )


def test_one_more_event_before_the_cutoff_does_change_features():
    # Guards the test above: the comparison is sensitive to a single event
    base = FeatureBuilder(cutoff=T).fit(frames_for(PAST))
    more = FeatureBuilder(cutoff=T).fit(
        frames_for([*PAST, (1, None, 20, "detail_view", T - pd.Timedelta(seconds=1), 0.0, "s9")])
    )
    pairs = pd.DataFrame({"user_id": [1], "item_id": [20]})
    assert not np.array_equal(base.transform_pairs(pairs)[0], more.transform_pairs(pairs)[0])


def test_point_in_time_holds_on_a_realistic_dataset():
    # Given a realistic clean dataset and a cutoff in the middle of it
    data = canonical_dataset(n_users=80, n_items=40, n_interactions=3000)
    cutoff = data["interactions"]["ts"].quantile(0.6)
    inter = data["interactions"]
    cut = {**data, "interactions": inter[inter["ts"] < cutoff]}
    full = FeatureBuilder(cutoff=cutoff).fit(data)
    only_past = FeatureBuilder(cutoff=cutoff).fit(cut)
    pairs = pd.DataFrame(
        {"user_id": np.repeat(np.arange(1, 81), 5), "item_id": np.tile(np.arange(1, 6), 80)}
    )
    np.testing.assert_array_equal(
        full.transform_pairs(pairs)[0], only_past.transform_pairs(pairs)[0]
    )


def test_a_training_set_gives_its_cutoff_and_a_later_cutoff_is_refused():
    frames = frames_for(PAST + FUTURE)
    training = TrainingSet.from_frames(frames, cutoff=T)
    builder = FeatureBuilder().fit(training)
    assert builder.cutoff_ == T
    # user features match a fit on the raw frames (only anonymous rows differ, for items)
    direct = FeatureBuilder(cutoff=T).fit(frames)
    pd.testing.assert_frame_equal(builder.user_features_, direct.user_features_)
    with pytest.raises(ValueError, match="after the training set's cutoff"):
        FeatureBuilder(cutoff=T + D).fit(training)


# --- robustness ---------------------------------------------------------------------------------


def test_unknown_users_and_items_get_the_catalogue_defaults(builder):
    pairs = pd.DataFrame(
        {"user_id": pd.array([999, None, 1], dtype="Int64"), "item_id": [10, 10, 999]}
    )
    matrix, names = builder.transform_pairs(pairs, T + D)
    user_cols = [names.index(n) for n in feature_names("user")]
    item_cols = [names.index(n) for n in feature_names("item")]
    np.testing.assert_array_equal(matrix[0, user_cols], default_vector("user"))
    np.testing.assert_array_equal(matrix[1, user_cols], default_vector("user"))
    np.testing.assert_array_equal(matrix[2, item_cols], default_vector("item"))
    cross = [names.index(n) for n in feature_names("user_item")]
    np.testing.assert_array_equal(matrix[2, cross], default_vector("user_item"))
    assert np.isfinite(matrix).all()


def test_an_empty_history_fits_and_yields_defaults_only():
    builder = FeatureBuilder(cutoff=T).fit(frames_for([]))
    matrix, names = builder.transform_pairs(pd.DataFrame({"user_id": [1], "item_id": [10]}))
    assert np.isfinite(matrix).all()
    row = dict(zip(names, matrix[0], strict=True))
    assert row["user_events_all"] == 0
    assert row["user_days_since_last_event"] == NEVER_DAYS
    assert row["item_price"] == 100
    assert row["ui_covisit_score"] == 0


def test_invalid_parameters_are_rejected_at_fit():
    with pytest.raises(ValueError, match="recent_n"):
        FeatureBuilder(cutoff=T, recent_n=0).fit(frames_for(PAST))
    with pytest.raises(RuntimeError, match="not fitted"):
        FeatureBuilder().transform_pairs(pd.DataFrame({"user_id": [1], "item_id": [1]}))


def test_save_and_load_round_trip_without_pickle(builder, tmp_path):
    # When the learned state is saved and loaded again
    builder.save(tmp_path / "features")
    loaded = FeatureBuilder.load(tmp_path / "features")
    # Then the matrices are identical, and no file needs pickle to read
    pairs = pd.DataFrame(
        [(u, i) for u in (1, 2, 3, 7) for i in (10, 11, 20, 21, 99)], columns=["user_id", "item_id"]
    )
    for now in (T, T + 5 * H):
        np.testing.assert_array_equal(
            builder.transform_pairs(pairs, now)[0], loaded.transform_pairs(pairs, now)[0]
        )
    with np.load(tmp_path / "features" / "features.npz", allow_pickle=False) as npz:
        assert all(npz[key].dtype != object for key in npz.files)


# --- realistic data -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_frames(tmp_path_factory) -> dict[str, pd.DataFrame]:
    """Clean canonical frames of a tiny demo marketplace (demo -> extract -> canonical -> clean)."""
    end = dt.datetime(2025, 3, 31, 12, 0, 0, tzinfo=dt.UTC)
    config = demo.DemoConfig(users=60, items=30, actions=3000, days=15, seed=5, end=end)
    return demo_clean_frames(tmp_path_factory.mktemp("demo"), config)


def test_features_on_demo_data_are_finite_and_informative(demo_frames):
    # Given a cutoff three days before the end of the demo data
    cutoff = demo_frames["interactions"]["ts"].max() - pd.Timedelta(days=3)
    builder = FeatureBuilder(cutoff=cutoff).fit(demo_frames)
    users = builder.user_ids_[:20]
    items = builder.item_ids_
    pairs = pd.DataFrame(
        {"user_id": np.repeat(users, len(items)), "item_id": np.tile(items, len(users))}
    )
    matrix, names = builder.transform_pairs(pairs, cutoff + pd.Timedelta(hours=6))
    # Then the matrix is finite, and the behavioural features carry signal
    assert np.isfinite(matrix).all()
    rows = pd.DataFrame(matrix, columns=names)
    for name in (
        "user_events_all",
        "item_events_7d",
        "ui_category_affinity",
        "ui_tag_jaccard",
        "ui_covisit_score",
    ):
        assert rows[name].std() > 0, name
    # and users who touched items have a top category holding a share in (0, 1]
    users_table = builder.user_features_
    active = users_table["user_distinct_items"] > 0
    assert active.sum() >= 10
    shares = users_table.loc[active, "user_top_category_share"]
    assert ((shares > 0) & (shares <= 1)).all()


def test_one_user_s_rows_equal_the_same_rows_computed_among_other_users(demo_frames):
    # Given a builder on demo data, and each of 15 users with every item, recall columns
    # (NaN, inf, repeats) and a repeated item: a request's shape
    builder = FeatureBuilder(cutoff=demo_frames["interactions"]["ts"].max()).fit(demo_frames)
    items = np.concatenate([builder.item_ids_, builder.item_ids_[:3], [999_999]])
    rng = np.random.default_rng(3)
    other = int(builder.user_ids_[-1])
    for user in builder.user_ids_[:15]:
        n = len(items)
        score = rng.random(n)
        score[rng.random(n) < 0.1] = np.nan
        score[rng.random(n) < 0.05] = np.inf
        rank = rng.integers(-1, 300, n).astype(np.float64)
        single = {
            "user_id": np.full(n, user),
            "item_id": items,
            "recall_score_itemcf": score,
            "recall_rank_itemcf": rank,
            "recall_score_ease": rng.random(n) * 3,
            "fused_rank": np.arange(1, n + 1, dtype=np.float64),
        }
        # When the same rows are built alone (the one-user paths) and below another user's
        # rows (the general paths)
        alone, _ = builder.transform_pairs(single)
        mixed = {key: np.concatenate([value[:5], value]) for key, value in single.items()}
        mixed["user_id"] = np.concatenate([np.full(5, other), single["user_id"]])
        together, _ = builder.transform_pairs(mixed)
        # Then every feature is bit-identical (the other user's rows change nothing here)
        np.testing.assert_array_equal(alone, together[5:])
    assert (alone[:, list(FEATURE_NAMES).index("ui_covisit_score")] > 0).any()
