"""The pure serving core: snapshot loading, the recommend functions and the Redis publisher,
over a tiny bundle with a known answer."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
import redis

from apps.serving.engine.breaker import CircuitBreaker
from apps.serving.engine.publish import publish_from_bundle, read_bundle_lists
from apps.serving.engine.recommend import Stores, for_you, popular, similar
from apps.serving.engine.redis_store import RedisCandidateStore, current_version
from apps.serving.engine.snapshot import SnapshotError, load_snapshot
from apps.serving.engine.sources import Reason, Source

# The same DDL as apps.pipeline.train.trainer._write_local_store.
STORE_DDL = (
    "CREATE TABLE user_recs (user_id INTEGER PRIMARY KEY, items TEXT NOT NULL);"
    "CREATE TABLE similar_items (item_id INTEGER, channel_items TEXT NOT NULL);"
    "CREATE INDEX similar_items_item ON similar_items (item_id);"
    "CREATE TABLE popular (rank INTEGER PRIMARY KEY, item_id INTEGER NOT NULL, score REAL NOT NULL);"
)

# Ranked lists (seen items already removed, as the trainer writes them).
USER_RECS = {
    1: [[10, 0.9, "itemcf"], [11, 0.8, "usercf"], [12, 0.7, "itemcf"], [13, 0.6, "content"]],
    2: [[13, 0.5, "content"]],
}
SIMILAR = {10: {"itemcf": [[11, 0.6], [12, 0.5]], "content": [[13, 0.55]]}}
POPULAR = [(20, 100.0), (21, 90.0), (22, 80.0), (10, 70.0)]
ITEMS = {
    10: ("Ten", 10.0, "books"),
    11: ("Eleven", 11.0, "books"),
    12: ("Twelve", 12.0, "music"),
    13: ("Thirteen", 13.0, "music"),
    20: ("Twenty", 20.0, "books"),
    21: ("Twenty-one", 21.0, "music"),
    22: ("Twenty-two", 22.0, "books"),
}


def make_bundle(directory: Path, *, user_recs: dict[int, list[list[object]]] | None = None) -> Path:
    """A bundle directory with store.sqlite3 and items.parquet (the known answer above)."""
    directory.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(directory / "store.sqlite3")
    conn.executescript(STORE_DDL)
    conn.executemany(
        "INSERT INTO user_recs VALUES (?, ?)",
        [(u, json.dumps(items)) for u, items in (user_recs or USER_RECS).items()],
    )
    conn.executemany(
        "INSERT INTO similar_items VALUES (?, ?)",
        [
            (i, json.dumps({"channel": c, "items": pairs}))
            for i, by_channel in SIMILAR.items()
            for c, pairs in by_channel.items()
        ],
    )
    conn.executemany(
        "INSERT INTO popular VALUES (?, ?, ?)",
        [(rank, i, s) for rank, (i, s) in enumerate(POPULAR, 1)],
    )
    conn.commit()
    conn.close()
    pd.DataFrame(
        [{"item_id": i, "title": t, "price": p, "category": c} for i, (t, p, c) in ITEMS.items()]
    ).to_parquet(directory / "items.parquet", index=False)
    return directory


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "v1")


def ids(outcome) -> list[int]:  # type: ignore[no-untyped-def]
    return [item.item_id for item in outcome.items]


def test_load_snapshot_reads_popular_channels_and_catalogue(bundle: Path) -> None:
    # When the bundle is loaded
    snap = load_snapshot(bundle, "v1")
    # Then the popular list, channels and item attributes are in memory
    assert snap.model_version == "v1"
    assert snap.popular == tuple(POPULAR)
    assert snap.channels == ("content", "itemcf", "usercf")
    info = snap.catalogue.get(12)
    assert info is not None
    assert (info.title, info.price, info.category) == ("Twelve", 12.0, "music")
    assert snap.catalogue.get(999) is None


def test_load_snapshot_refuses_a_bundle_without_a_store(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError):
        load_snapshot(tmp_path, "v0")


def test_load_snapshot_falls_back_to_feature_tables_for_the_catalogue(tmp_path: Path) -> None:
    # Given a bundle without items.parquet but with the feature builder's item table
    bundle = make_bundle(tmp_path / "v2")
    (bundle / "items.parquet").unlink()
    (bundle / "features").mkdir()
    pd.DataFrame(
        {"item_id": [10, 11], "item_price": [5.0, 6.0], "item_category_code": [1, 0]}
    ).to_parquet(bundle / "features" / "item_features.parquet", index=False)
    (bundle / "features" / "features.json").write_text(json.dumps({"categories": ["a", "b"]}))
    # When it is loaded, then prices and category names come from the features
    info = load_snapshot(bundle, "v2").catalogue.get(10)
    assert info is not None
    assert (info.title, info.price, info.category) == ("", 5.0, "b")


def test_for_you_serves_the_ranked_list_from_the_local_store(bundle: Path) -> None:
    outcome = for_you(load_snapshot(bundle, "v1"), Stores(), 1, 3)
    assert ids(outcome) == [10, 11, 12]
    assert outcome.source is Source.LOCAL_STORE
    assert not outcome.degraded
    first = outcome.items[0]
    assert (first.title, first.price, first.channel) == ("Ten", 10.0, "itemcf")
    assert first.reason


def test_for_you_drops_excluded_items(bundle: Path) -> None:
    outcome = for_you(load_snapshot(bundle, "v1"), Stores(), 1, 10, exclude={11})
    assert ids(outcome) == [10, 12, 13]


def test_an_unknown_user_gets_popular_without_being_degraded(bundle: Path) -> None:
    outcome = for_you(load_snapshot(bundle, "v1"), Stores(), 424242, 2)
    assert ids(outcome) == [20, 21]
    assert outcome.source is Source.POPULAR
    assert outcome.reason is Reason.EMPTY
    assert not outcome.degraded


def test_similar_merges_channels_by_score_and_skips_the_item_itself(bundle: Path) -> None:
    snap = load_snapshot(bundle, "v1")
    outcome = similar(snap, Stores(), 10, 10)
    assert ids(outcome) == [11, 13, 12]
    assert outcome.items[0].reason == "Similar to item 10"
    # an unknown item gets popular, without the item itself
    assert ids(similar(snap, Stores(), 20, 2)) == [21, 22]


def test_popular_filters_by_category(bundle: Path) -> None:
    snap = load_snapshot(bundle, "v1")
    assert ids(popular(snap, 10, "books")) == [20, 22, 10]
    assert ids(popular(snap, 10, "nope")) == []
    assert not popular(snap, 1).degraded


def test_a_broken_local_store_falls_back_to_popular_and_says_so(bundle: Path) -> None:
    # Given a loaded snapshot whose store file then becomes garbage
    snap = load_snapshot(bundle, "v1")
    snap.local_store.close()
    (bundle / "store.sqlite3").write_bytes(b"not a database" * 100)
    # When a user asks, then the in-memory popular list answers, marked degraded
    outcome = for_you(snap, Stores(), 1, 2)
    assert ids(outcome) == [20, 21]
    assert outcome.source is Source.POPULAR
    assert outcome.reason is Reason.LOCAL_STORE_UNAVAILABLE


def test_read_bundle_lists_splits_user_lists_by_channel(bundle: Path) -> None:
    users, sim, pop = read_bundle_lists(bundle / "store.sqlite3")
    assert users[1] == {
        "itemcf": [(10, 0.9), (12, 0.7)],
        "usercf": [(11, 0.8)],
        "content": [(13, 0.6)],
    }
    assert sim[10]["content"] == [(13, 0.55)]
    assert pop == POPULAR


def test_published_lists_are_served_from_redis_in_ranked_order(bundle: Path, private_redis) -> None:  # type: ignore[no-untyped-def]
    # Given the bundle published to a private Redis
    offline = redis.Redis.from_url(private_redis.url)
    written = publish_from_bundle(offline, bundle, "v1")
    assert written == 4  # two users, one similar item, popular
    assert current_version(offline) == "v1"
    snap = load_snapshot(bundle, "v1")
    store = RedisCandidateStore(offline, CircuitBreaker("test"), "v1")
    # When users ask with Redis configured
    outcome = for_you(snap, Stores(redis=store), 1, 10)
    # Then Redis answers with the local store's exact ranking
    assert outcome.source is Source.REDIS
    assert ids(outcome) == [10, 11, 12, 13]
    assert ids(similar(snap, Stores(redis=store), 10, 10)) == [11, 13, 12]


def test_an_unpublished_version_is_treated_as_redis_unavailable(bundle: Path) -> None:
    # Given Redis configured but without this version (no round trip is made)
    snap = load_snapshot(bundle, "v1")
    client = redis.Redis.from_url("redis://127.0.0.1:1/0")
    store = RedisCandidateStore(client, CircuitBreaker("test"), "v1")
    outcome = for_you(snap, Stores(redis=store, redis_published=False), 1, 2)
    # Then the local store answers, and the response is marked degraded
    assert outcome.source is Source.LOCAL_STORE
    assert outcome.degraded
    assert ids(outcome) == [10, 11]
