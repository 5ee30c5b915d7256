"""DataCleaner: each rule's count and effect on synthetic data with a known answer."""

from __future__ import annotations

import json
from datetime import timedelta

import numpy as np
import pandas as pd
import pytest

from apps.pipeline import schema
from apps.pipeline.clean import DROP_RULES, CleanResult, DataCleaner

NOW = pd.Timestamp("2024-06-30 12:00:00", tz="UTC")

_EVENT_SHARES = {
    "view": 0.35,
    "detail_view": 0.30,
    "search": 0.05,
    "search_click": 0.08,
    "favorite": 0.05,
    "sample_download": 0.04,
    "add_to_cart": 0.05,
    "task": 0.04,
    "purchase": 0.04,
}


def canonical_dataset(
    now: pd.Timestamp = NOW,
    *,
    seed: int = 7,
    n_users: int = 200,
    n_items: int = 100,
    n_interactions: int = 5000,
) -> dict[str, pd.DataFrame]:
    """A clean canonical dataset with a known answer: every row valid, keys unique, every
    interaction's item known, interactions spread over the 30 days up to ``now``.

    Business rows (purchase, task) carry a user and no visitor; Matomo rows carry a visitor,
    a session and, for 70% of them, a user. Search events have a query and no item.
    """
    rng = np.random.default_rng(seed)
    day_s = 86_400

    def before_now(low_days: float, high_days: float, n: int) -> pd.DatetimeIndex:
        ago = np.round(rng.uniform(low_days, high_days, n) * day_s)
        return now - pd.to_timedelta(ago, unit="s")

    user_ids = np.arange(1, n_users + 1)
    users = pd.DataFrame(
        {
            "user_id": user_ids,
            "username": [f"user{i}" for i in user_ids],
            "company": [f"Company {i % 17}" for i in user_ids],
            "industry": rng.choice(["finance", "retail", "energy", "health"], n_users),
            "province": rng.choice(["Zhejiang", "Jiangsu", "Guangdong"], n_users),
            "city": rng.choice(["Hangzhou", "Nanjing", "Shenzhen"], n_users),
            "created_at": before_now(60, 400, n_users),
        }
    )

    item_ids = np.arange(1, n_items + 1)
    created = before_now(40, 400, n_items)
    updated = (created + (now - pd.Timedelta(days=1) - created) * rng.uniform(0, 1, n_items)).floor(
        "s"
    )
    prices = np.round(rng.lognormal(mean=5.0, sigma=1.0, size=n_items), 2)
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "title": [f"Dataset {i}" for i in item_ids],
            "description": [f"Description of dataset {i}." for i in item_ids],
            "tags": rng.choice(["finance,credit", "retail", "energy,grid", "health"], n_items),
            "category": rng.choice(["finance", "retail", "energy", "health"], n_items),
            "price": prices,
            "company": [f"Vendor {i % 9}" for i in item_ids],
            "created_at": created,
            "updated_at": updated,
            "is_active": rng.uniform(0, 1, n_items) < 0.95,
        }
    )

    n = n_interactions
    event = rng.choice(list(_EVENT_SHARES), n, p=list(_EVENT_SHARES.values()))
    business = np.isin(event, ["purchase", "task"])
    anonymous = ~business & (rng.uniform(0, 1, n) < 0.3)
    item = rng.integers(1, n_items + 1, n)
    quantity = np.where(event == "purchase", rng.integers(1, 4, n), 1)
    seq = pd.Series(np.arange(1, n + 1)).astype(str)
    table = np.select(
        [event == "purchase", event == "task"],
        ["business.api_order:", "business.task:"],
        "matomo.log_link_visit_action:",
    )
    interactions = pd.DataFrame(
        {
            "user_id": pd.array(rng.integers(1, n_users + 1, n), dtype="Int64"),
            "visitor_id": pd.Series(rng.integers(0, 2**62, n)).map("{:016x}".format),
            "item_id": pd.array(item, dtype="Int64"),
            "event": event,
            "ts": before_now(0, 30, n),
            "value": np.where(event == "purchase", prices[item - 1] * quantity, 0.0),
            "quantity": quantity,
            "source": np.where(business, "business", "matomo"),
            "session_id": "m" + pd.Series(rng.integers(1, n // 3 + 2, n)).astype(str),
            "order_id": "ORD-" + seq,
            "query": "credit data",
            "ref": pd.Series(table) + seq,
        }
    )
    interactions.loc[anonymous, "user_id"] = pd.NA
    interactions.loc[business, ["visitor_id", "session_id"]] = None
    interactions.loc[event != "purchase", "order_id"] = None
    interactions.loc[event != "search", "query"] = None
    interactions.loc[event == "search", "item_id"] = pd.NA
    return {
        "users": schema.conform(users, schema.USERS),
        "items": schema.conform(items, schema.ITEMS),
        "interactions": schema.conform(interactions, schema.INTERACTIONS),
    }


def clean(frames: dict[str, pd.DataFrame], **params: object) -> CleanResult:
    return DataCleaner(now=NOW, **params).clean(frames)  # type: ignore[arg-type]


def nonzero(result: CleanResult, entity: str) -> dict[str, int]:
    return {rule: n for rule, n in result.report.rules[entity].items() if n}


def assert_canonical(result: CleanResult) -> None:
    for entity, columns in schema.ENTITIES.items():
        frame = result.frames[entity]
        assert list(frame.columns) == list(columns)
        assert {name: str(dtype) for name, dtype in frame.dtypes.items()} == dict(columns)


def drops(result: CleanResult, entity: str) -> int:
    rules = result.report.rules[entity]
    return sum(n for rule, n in rules.items() if rule in DROP_RULES) + sum(
        n for rule, n in rules.items() if rule.startswith("missing_required.")
    )


@pytest.fixture
def data() -> dict[str, pd.DataFrame]:
    return canonical_dataset()


def test_clean_data_passes_through_unchanged_with_every_count_zero(data):
    # Given a clean canonical dataset
    # When it is cleaned
    result = clean(data)
    # Then every rule counted zero and the frames are exactly the input
    for entity in ("users", "items", "interactions"):
        assert nonzero(result, entity) == {}
        pd.testing.assert_frame_equal(result.frames[entity], data[entity])
    assert (
        result.report.rows_in
        == result.report.rows_out
        == {
            "users": 200,
            "items": 100,
            "interactions": 5000,
        }
    )


def test_the_report_always_has_the_same_rule_keys_and_serialises_to_json(data):
    # Given a clean and a dirty run
    dirty = {**data, "items": pd.concat([data["items"], data["items"].head(3)])}
    # When both are cleaned
    a, b = clean(data).report, clean(dirty).report
    # Then the rule vocabulary is identical and the report survives a JSON round trip
    assert {e: list(r) for e, r in a.rules.items()} == {e: list(r) for e, r in b.rules.items()}
    assert json.loads(json.dumps(b.to_dict()))["rules"]["items"]["duplicate_rows"] == 3


def test_numeric_strings_are_coerced_and_garbage_becomes_null_and_is_counted(data):
    # Given items whose prices arrive as strings, one of them not a number, and interactions
    # whose user ids are strings with one id that is not an integer
    items = data["items"].astype({"price": object})
    items["price"] = [f" {p:.2f} " for p in data["items"]["price"]]
    items.loc[4, "price"] = "call us"
    items.loc[5, "price"] = "NULL"
    interactions = data["interactions"].astype({"user_id": object})
    interactions["user_id"] = interactions["user_id"].map(lambda v: None if v is pd.NA else str(v))
    first_user_row = interactions["user_id"].first_valid_index()
    interactions.loc[first_user_row, "user_id"] = "12.5"
    # When cleaned
    result = clean({**data, "items": items, "interactions": interactions})
    # Then the numbers are typed, the two bad prices are missing (one a failed coercion, one a
    # textual null), the fractional id is counted and nulled without dropping its interaction
    assert result.report.rules["items"]["coerce_failed.price"] == 1
    assert result.report.rules["items"]["missing_required.price"] == 2
    assert set(result.items["item_id"]) == set(range(1, 101)) - {5, 6}
    assert result.report.rules["interactions"]["coerce_failed.user_id"] == 1
    users = result.interactions.set_index("ref")["user_id"]
    garbled = interactions.loc[first_user_row, "ref"]
    assert pd.isna(users[garbled])
    expected = data["interactions"].set_index("ref")["user_id"].reindex(users.index)
    assert users.drop(index=garbled).equals(expected.drop(index=garbled))
    assert_canonical(result)


def test_booleans_arrive_as_text_and_a_non_boolean_is_counted(data):
    # Given is_active spelled as text, one value meaningless
    items = data["items"].astype({"is_active": object})
    items["is_active"] = ["yes", "0", "True", "1.0", "maybe"] + ["1"] * 95
    # When cleaned
    result = clean({**data, "items": items})
    # Then the spellings are read, and the meaningless one counts and reads as inactive
    assert result.items["is_active"].head(5).tolist() == [True, False, True, True, False]
    assert result.report.rules["items"]["coerce_failed.is_active"] == 1


def test_naive_timestamps_are_read_in_the_source_time_zone(data):
    # Given business timestamps written as naive Shanghai wall-clock strings and Matomo
    # timestamps as naive UTC datetimes
    interactions = data["interactions"].copy()
    business = interactions["source"] == "business"
    shanghai = interactions["ts"].dt.tz_convert("Asia/Shanghai").dt.tz_localize(None)
    utc_wall = interactions["ts"].dt.tz_localize(None)
    interactions["ts"] = shanghai.dt.strftime("%Y-%m-%d %H:%M:%S").where(
        business, utc_wall.astype(object)
    )
    # When cleaned with Shanghai as the business zone
    result = clean(
        {**data, "interactions": interactions}, source_timezones={"business": "Asia/Shanghai"}
    )
    # Then every instant is restored exactly in UTC and every naive value is counted
    pd.testing.assert_series_equal(result.interactions["ts"], data["interactions"]["ts"])
    assert result.report.rules["interactions"]["ts_localised.ts"] == 5000


def test_offset_strings_keep_their_offset_and_are_not_counted_as_naive(data):
    # Given ISO strings with explicit offsets, a "Z" suffix and a non-ISO spelling
    items = data["items"].copy()
    created = items["created_at"]
    items["created_at"] = pd.Series(
        created.dt.tz_convert("Asia/Tokyo").map(lambda t: t.isoformat()), dtype=object
    )
    items.loc[0, "created_at"] = created[0].strftime("%Y-%m-%dT%H:%M:%SZ")
    items.loc[1, "created_at"] = created[1].strftime("%m/%d/%Y %H:%M:%S")
    # When cleaned
    result = clean({**data, "items": items})
    # Then the instants are unchanged and only the non-ISO (naive) one was localised
    pd.testing.assert_series_equal(result.items["created_at"], data["items"]["created_at"])
    assert result.report.rules["items"]["ts_localised.created_at"] == 1
    assert result.report.rules["items"]["coerce_failed.created_at"] == 0


def test_zero_and_pre_2000_dates_fall_back_or_drop_and_are_counted(data):
    # Given an item with a zero created_at (recoverable from updated_at), an item whose
    # timestamps are both epoch zero, a user with a zero created_at who has interactions, and
    # an interaction stamped 1970-01-01
    items = data["items"].astype({"created_at": object, "updated_at": object})
    items.loc[0, "created_at"] = "0000-00-00 00:00:00"
    items.loc[1, ["created_at", "updated_at"]] = "1970-01-01 00:00:00"
    users = data["users"].astype({"created_at": object})
    user_id = int(data["interactions"]["user_id"].dropna().iloc[0])
    users.loc[users["user_id"] == user_id, "created_at"] = "0000-00-00 00:00:00"
    interactions = data["interactions"].copy()
    interactions.loc[10, "ts"] = pd.Timestamp("1970-01-01", tz="UTC")
    # When cleaned
    result = clean({"users": users, "items": items, "interactions": interactions})
    # Then item 1 takes its updated_at, item 2 is dropped, the user takes their first
    # interaction and the 1970 interaction is dropped for a missing ts
    rules = result.report.rules
    assert rules["items"]["ts_invalid.created_at"] == 2
    assert rules["items"]["ts_invalid.updated_at"] == 1
    assert rules["items"]["ts_fallback.created_at"] == 1
    assert rules["items"]["missing_required.created_at"] == 1
    first = result.items.set_index("item_id").loc[1]
    assert first["created_at"] == data["items"]["updated_at"][0]
    assert 2 not in set(result.items["item_id"])
    assert rules["users"]["ts_fallback.created_at"] == 1
    user = result.users.set_index("user_id").loc[user_id]
    first_seen = interactions.loc[interactions["user_id"] == user_id, "ts"].min()
    assert user["created_at"] == first_seen
    assert rules["interactions"]["ts_invalid.ts"] == 1
    assert rules["interactions"]["missing_required.ts"] == 1
    assert_canonical(result)


def test_future_timestamps_beyond_the_skew_are_clipped_to_now(data):
    # Given one interaction a minute ahead (within the skew) and two hours and a year ahead
    interactions = data["interactions"].copy()
    interactions.loc[0, "ts"] = NOW + pd.Timedelta(minutes=1)
    interactions.loc[1, "ts"] = NOW + pd.Timedelta(hours=2)
    interactions.loc[2, "ts"] = NOW + pd.Timedelta(days=365)
    # When cleaned with a five-minute skew
    result = clean({**data, "interactions": interactions}, max_future_skew=timedelta(minutes=5))
    # Then only the two far ones are clipped, to now
    assert result.report.rules["interactions"]["ts_future_clipped.ts"] == 2
    assert result.interactions["ts"][:3].tolist() == [
        NOW + pd.Timedelta(minutes=1),
        NOW,
        NOW,
    ]


def test_strings_tags_and_events_are_normalised(data):
    # Given padded and oddly cased strings, messy tags, events spelled like labels, an
    # upper-case visitor id delivered as raw bytes and a title that is only blanks
    items = data["items"].copy()
    items.loc[0, "title"] = "  Credit   risk\tscores "
    items.loc[1, "tags"] = " Finance ;CREDIT\uff0cfinance|  Risk  Model "  # full-width comma
    items.loc[2, "title"] = "   "
    interactions = data["interactions"].astype({"visitor_id": object})
    interactions.loc[0, "event"] = " Detail View "
    interactions.loc[1, "event"] = "SEARCH-CLICK"
    interactions.loc[2, "source"] = " Matomo"
    interactions.loc[3, "visitor_id"] = bytes.fromhex("ABCDEF0123456789")
    # When cleaned
    result = clean({**data, "items": items, "interactions": interactions})
    # Then each value is in canonical form, counted, and the blank title drops its item
    by_id = result.items.set_index("item_id")
    assert by_id.loc[1, "title"] == "Credit risk scores"
    assert by_id.loc[2, "tags"] == "finance,credit,risk model"
    assert 3 not in by_id.index
    rules = result.report.rules
    assert rules["items"]["strings_normalised.title"] == 2
    assert rules["items"]["strings_normalised.tags"] == 1
    assert rules["items"]["missing_required.title"] == 1
    assert result.interactions["event"][:2].tolist() == ["detail_view", "search_click"]
    assert result.interactions.loc[2, "source"] == "matomo"
    assert result.interactions.loc[3, "visitor_id"] == "abcdef0123456789"
    assert rules["interactions"]["strings_normalised.event"] == 2
    assert rules["interactions"]["strings_normalised.visitor_id"] == 1


def test_duplicate_rows_and_keys_keep_the_latest_version(data):
    # Given three exact duplicate users, and item 7 delivered again with a newer title and a
    # newer updated_at ahead of the original in the batch
    users = pd.concat([data["users"], data["users"].iloc[[0, 1, 2]]], ignore_index=True)
    newer = (
        data["items"]
        .iloc[[6]]
        .assign(
            title="Dataset 7 (v2)",
            updated_at=data["items"]["updated_at"][6] + pd.Timedelta(hours=1),
        )
    )
    items = pd.concat([newer, data["items"]], ignore_index=True)
    # When cleaned
    result = clean({**data, "users": users, "items": items})
    # Then the copies are gone, counted by kind, and item 7 is the newer version
    assert result.report.rules["users"]["duplicate_rows"] == 3
    assert result.report.rules["users"]["duplicate_keys"] == 0
    assert result.report.rules["items"]["duplicate_rows"] == 0
    assert result.report.rules["items"]["duplicate_keys"] == 1
    assert len(result.users) == 200
    assert result.items.set_index("item_id").loc[7, "title"] == "Dataset 7 (v2)"


def test_duplicate_interactions_and_purchases_from_both_sources_are_dropped(data):
    # Given one event re-recorded under a new ref (a double-fired tracker), one interaction
    # delivered twice (same ref), and every business purchase also recorded by Matomo
    interactions = data["interactions"]
    refired = interactions.iloc[[100]].assign(ref="matomo.log_link_visit_action:999999")
    redelivered = interactions.iloc[[200]]
    purchases = interactions[interactions["event"] == "purchase"]
    matomo_copies = purchases.assign(
        source="matomo",
        ts=purchases["ts"] + pd.Timedelta(seconds=3),
        session_id="m1",
        ref="matomo.log_conversion_item:" + purchases["order_id"],
    )
    dirty = pd.concat([interactions, refired, redelivered, matomo_copies], ignore_index=True)
    # When cleaned
    result = clean({**data, "interactions": dirty})
    # Then each kind of copy is counted and what remains is the original data
    rules = result.report.rules["interactions"]
    assert rules["duplicate_events"] == 1
    assert rules["duplicate_rows"] == 1
    assert rules["duplicate_purchases"] == len(purchases) > 0
    pd.testing.assert_frame_equal(result.interactions, interactions)


def test_prices_values_and_quantities_are_repaired_and_counted(data):
    # Given a negative price, a price a thousand times the others, a negative and an absurd
    # purchase value, a missing value and a zero quantity
    items = data["items"].copy()
    items.loc[0, "price"] = -5.0
    items.loc[1, "price"] = 1e9
    interactions = data["interactions"].copy()
    purchase = interactions.index[interactions["event"] == "purchase"]
    interactions.loc[purchase[0], "value"] = -100.0
    interactions.loc[purchase[1], "value"] = 5e10
    interactions.loc[purchase[2], "value"] = np.nan
    interactions.loc[purchase[3], "quantity"] = 0
    # When cleaned
    result = clean({**data, "items": items, "interactions": interactions})
    # Then the negative price is missing (its item dropped), the absurd one clipped to ten
    # times the 99th percentile, values repaired and the quantity set to one
    rules = result.report.rules
    prices = data["items"]["price"].drop(index=[0, 1])
    bound = 10 * pd.concat([prices, pd.Series([1e9])]).quantile(0.99)
    assert rules["items"]["price_negative"] == 1
    assert rules["items"]["missing_required.price"] == 1
    assert rules["items"]["price_clipped"] == 1
    assert result.items.set_index("item_id").loc[2, "price"] == pytest.approx(bound)
    assert prices.max() < bound  # the clean prices were not touched
    assert (rules["interactions"]["value_negative"], rules["interactions"]["value_clipped"]) == (
        1,
        1,
    )
    assert rules["interactions"]["value_null_filled"] == 1
    assert rules["interactions"]["quantity_fixed"] == 1
    values = result.interactions.set_index("ref")["value"]
    refs = interactions["ref"]
    assert values[refs[purchase[0]]] == 0.0
    assert values[refs[purchase[2]]] == 0.0
    assert values[refs[purchase[1]]] < 5e10
    assert result.interactions.set_index("ref").loc[refs[purchase[3]], "quantity"] == 1


def test_a_negative_price_can_be_kept_as_free(data):
    # Given a negative price
    items = data["items"].copy()
    items.loc[0, "price"] = -5.0
    # When cleaned with negative prices read as zero
    result = clean({**data, "items": items}, negative_price="zero")
    # Then the item stays, free
    assert result.report.rules["items"]["price_negative"] == 1
    assert result.items.set_index("item_id").loc[1, "price"] == 0.0


def test_rows_missing_required_columns_unknown_events_and_orphans_are_dropped_and_counted(data):
    # Given interactions with no event, no source, an unknown event, and 50 pointing at
    # items that do not exist; plus a search (no item) that must survive
    interactions = data["interactions"].copy()
    interactions.loc[0, "event"] = None
    interactions.loc[1, ["event", "source"]] = [None, None]
    interactions.loc[2, "source"] = None
    interactions.loc[3, "event"] = "hover"
    orphan_rows = interactions.index[interactions["item_id"].notna()][10:60]
    interactions.loc[orphan_rows, "item_id"] = 10_000
    # When cleaned
    result = clean({**data, "interactions": interactions})
    # Then each dropped row is counted once, under its first missing column
    rules = result.report.rules["interactions"]
    assert rules["missing_required.event"] == 2
    assert rules["missing_required.source"] == 1
    assert rules["unknown_event"] == 1
    assert rules["orphan_item"] == 50
    assert len(result.interactions) == 5000 - 54
    assert (result.interactions["event"] == "search").sum() == (
        data["interactions"]["event"] == "search"
    ).sum()


def test_rows_out_equals_rows_in_minus_every_counted_drop(data):
    # Given a dataset with many defects at once
    items = pd.concat([data["items"], data["items"].head(5)], ignore_index=True)
    items.loc[10, "title"] = None
    interactions = pd.concat(
        [data["interactions"], data["interactions"].head(20)], ignore_index=True
    )
    interactions.loc[5, "event"] = "unknown"
    interactions.loc[interactions["item_id"] == 1, "ts"] = pd.NaT
    # When cleaned
    result = clean({**data, "items": items, "interactions": interactions})
    # Then no row disappeared without a count, and the output is canonical
    for entity in ("users", "items", "interactions"):
        assert result.report.rows_out[entity] == result.report.rows_in[entity] - drops(
            result, entity
        )
        assert result.report.dropped(entity) == drops(result, entity)
    assert drops(result, "items") == 6
    assert_canonical(result)


def test_missing_frames_and_columns_become_empty_canonical_output():
    # Given only a users frame, missing optional columns
    users = pd.DataFrame({"user_id": ["1", "2"], "created_at": ["2024-01-01", "2024-02-01"]})
    # When cleaned
    result = clean({"users": users})
    # Then the output is canonical and empty where nothing came in
    assert_canonical(result)
    assert result.users["user_id"].tolist() == [1, 2]
    assert len(result.items) == len(result.interactions) == 0


def test_a_naive_now_is_rejected():
    # Given a cleaner configured with a naive now
    cleaner = DataCleaner(now=pd.Timestamp("2024-06-30 12:00"))
    # When cleaning / Then it refuses rather than guess the zone
    with pytest.raises(ValueError, match="timezone-aware"):
        cleaner.clean({})
