"""Feature stores: Parquet, read-only SQLite, and versioned Redis keys with a pointer flip."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

import numpy as np
import pandas as pd
import pytest
import redis

from apps.pipeline import feature_store as fs
from apps.pipeline.features import FeatureBuilder, FeatureTables, default_vector, feature_names
from tests.pipeline.test_features import PAST, T, frames_for

CLOSED_PORT_URL = "redis://127.0.0.1:1/15"


@pytest.fixture(scope="module")
def tables() -> FeatureTables:
    return FeatureBuilder(cutoff=T).fit(frames_for(PAST)).tables()


def shifted(tables: FeatureTables, by: float) -> FeatureTables:
    """The same tables with every value moved by ``by``: a recognisably different version."""
    return FeatureTables(user=tables.user + by, item=tables.item + by, cutoff=tables.cutoff)


@pytest.fixture
def client(redis_url):
    c = fs.make_redis_client(redis_url, timeout=1.0)
    yield c
    c.close()


class FailingClient:
    """A Redis client that loses the connection on the ``fail_at``-th MSET."""

    def __init__(self, inner: redis.Redis, fail_at: int) -> None:
        self._inner = inner
        self.fail_at = fail_at
        self.msets = 0

    def mset(self, mapping: dict[str, Any]) -> Any:
        self.msets += 1
        if self.msets == self.fail_at:
            raise redis.ConnectionError("connection lost mid-sync")
        return self._inner.mset(mapping)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# --- Parquet ------------------------------------------------------------------------------------


def test_parquet_tables_round_trip(tables, tmp_path):
    paths = fs.write_parquet(tmp_path / "features", tables)
    assert set(paths) == {"user_features", "item_features", "features_meta"}
    back = fs.read_parquet(tmp_path / "features")
    pd.testing.assert_frame_equal(back.user, tables.user)
    pd.testing.assert_frame_equal(back.item, tables.item)
    assert back.cutoff == tables.cutoff


# --- SQLite -------------------------------------------------------------------------------------


def test_sqlite_store_returns_rows_in_request_order_with_defaults_for_unknown_ids(tables, tmp_path):
    path = fs.write_sqlite(tmp_path / "features.sqlite3", tables, version="v1")
    store = fs.SQLiteFeatureStore(path)
    try:
        # When users 2, 999 (unknown) and 1 are requested
        rows = store.get_user([2, 999, 1])
        # Then known rows equal the table, in request order, and the unknown one is the default
        assert rows.found.tolist() == [True, False, True]
        assert rows.columns == tuple(feature_names("user"))
        np.testing.assert_array_equal(rows.values[0], tables.user.loc[2].to_numpy(np.float32))
        np.testing.assert_array_equal(rows.values[1], default_vector("user"))
        np.testing.assert_array_equal(rows.values[2], tables.user.loc[1].to_numpy(np.float32))
        assert rows.version == "v1"
        items = store.get_item(np.array([21, 10]))
        np.testing.assert_array_equal(items.values[1], tables.item.loc[10].to_numpy(np.float32))
        assert store.get_item([]).values.shape == (0, len(feature_names("item")))
    finally:
        store.close()


def test_sqlite_store_answers_large_id_lists(tables, tmp_path):
    path = fs.write_sqlite(tmp_path / "features.sqlite3", tables, version="v1")
    store = fs.SQLiteFeatureStore(path)
    try:
        ids = np.arange(-1500, 1500)  # three IN (...) batches, nearly all unknown
        rows = store.get_user(ids)
        assert rows.found.sum() == len(tables.user)
    finally:
        store.close()


def test_sqlite_store_is_read_only_and_replaced_atomically(tables, tmp_path):
    path = fs.write_sqlite(tmp_path / "features.sqlite3", tables, version="v1")
    store = fs.SQLiteFeatureStore(path)
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store._conn.execute("DELETE FROM user_features")
    finally:
        store.close()
    # When a new version is written over it, readers opening afterwards see only the new one
    fs.write_sqlite(path, shifted(tables, 1.0), version="v2")
    store = fs.SQLiteFeatureStore(path)
    try:
        assert store.version == "v2"
        np.testing.assert_array_equal(
            store.get_user([1]).values[0], tables.user.loc[1].to_numpy(np.float32) + 1
        )
    finally:
        store.close()
    assert [p.name for p in tmp_path.iterdir()] == ["features.sqlite3"]


# --- Redis --------------------------------------------------------------------------------------


@pytest.mark.redis
def test_a_sync_writes_every_row_then_points_readers_at_it(tables, client):
    # When the tables are synced as v1
    result = fs.sync_to_redis(client, tables, "v1", batch_size=2)
    # Then every row was written and the pointer names v1
    assert result.status == "synced"
    assert result.keys_written == len(tables.user) + len(tables.item)
    assert fs.current_version(client) == "v1"
    # and a reader gets the same float32 rows, defaults for unknown ids
    rows = fs.read_from_redis(client, "user", [1, 999, 3])
    assert rows is not None
    assert rows.version == "v1"
    assert rows.found.tolist() == [True, False, True]
    np.testing.assert_array_equal(rows.values[0], tables.user.loc[1].to_numpy(np.float32))
    np.testing.assert_array_equal(rows.values[1], default_vector("user"))
    items = fs.read_from_redis(client, "item", [20])
    assert items is not None
    np.testing.assert_array_equal(items.values[0], tables.item.loc[20].to_numpy(np.float32))


@pytest.mark.redis
def test_keys_are_versioned_and_hold_float32_bytes(tables, client):
    fs.sync_to_redis(client, tables, "v1")
    raw = client.get("reco:feat:v1:user:1")
    assert isinstance(raw, bytes)
    assert len(raw) == 4 * len(feature_names("user"))
    np.testing.assert_array_equal(
        np.frombuffer(raw, dtype="<f4"), tables.user.loc[1].to_numpy(np.float32)
    )


@pytest.mark.redis
def test_a_new_version_flips_the_pointer_and_the_old_one_expires(tables, client):
    fs.sync_to_redis(client, tables, "v1")
    # When v2 is synced with a grace period
    result = fs.sync_to_redis(client, shifted(tables, 1.0), "v2", grace_seconds=120)
    # Then readers see v2, and v1's keys are on their way out
    assert result.previous_version == "v1"
    assert result.retired_versions == ("v1",)
    rows = fs.read_from_redis(client, "user", [1])
    assert rows is not None
    assert rows.version == "v2"
    assert rows.values[0, 0] == tables.user.loc[1].iloc[0] + 1
    assert 0 < client.ttl("reco:feat:v1:user:1") <= 120
    assert client.ttl("reco:feat:v2:user:1") == -1  # the live version never expires
    # and a reader that fetched the old pointer just before the flip still finds its keys
    old = fs.read_from_redis(client, "user", [1], version="v1")
    assert old is not None
    assert old.found.all()
    # When v3 is synced with no grace, v2's keys are deleted at once
    fs.sync_to_redis(client, tables, "v3", grace_seconds=0)
    assert client.exists("reco:feat:v2:user:1") == 0
    assert {v.decode() for v in client.smembers(fs.VERSIONS_KEY)} == {"v3"}


@pytest.mark.redis
def test_a_sync_failing_half_way_leaves_readers_on_the_old_version(tables, client, caplog):
    fs.sync_to_redis(client, tables, "v1")
    # Given a connection that drops on the second batch of v2
    failing = FailingClient(client, fail_at=2)
    # When v2 is synced through it
    with caplog.at_level(logging.WARNING, logger="apps.pipeline.feature_store"):
        result = fs.sync_to_redis(failing, shifted(tables, 1.0), "v2", batch_size=1)  # type: ignore[arg-type]
    # Then the sync reports skipped after the one batch that got through, without raising
    assert result.status == "skipped"
    assert result.keys_written == 1
    assert "ConnectionError" in result.reason
    assert "skipped" in caplog.text
    # and readers still see v1, complete, although some v2 keys exist
    assert fs.current_version(client) == "v1"
    assert client.exists("reco:feat:v2:user:1") == 1
    rows = fs.read_from_redis(client, "user", [1, 2, 3])
    assert rows is not None
    assert rows.version == "v1"
    np.testing.assert_array_equal(rows.values, tables.user.loc[[1, 2, 3]].to_numpy(np.float32))
    # When the next sync succeeds, the half-written v2 is retired with the old v1
    result = fs.sync_to_redis(client, tables, "v3", grace_seconds=0)
    assert set(result.retired_versions) == {"v1", "v2"}
    assert client.keys("reco:feat:v2:*") == []


@pytest.mark.redis
def test_syncing_the_live_version_again_is_a_no_op(tables, client):
    fs.sync_to_redis(client, tables, "v1")
    again = fs.sync_to_redis(client, shifted(tables, 5.0), "v1")
    assert again.status == "synced"
    assert again.keys_written == 0
    rows = fs.read_from_redis(client, "user", [1])
    assert rows is not None
    np.testing.assert_array_equal(rows.values[0], tables.user.loc[1].to_numpy(np.float32))


@pytest.mark.redis
def test_reading_an_empty_redis_returns_none(client):
    assert fs.read_from_redis(client, "user", [1]) is None


def test_with_redis_down_the_sync_is_skipped_and_sqlite_serves(tables, tmp_path, caplog):
    # Given a client pointed at a closed port, and a SQLite store
    down = fs.make_redis_client(CLOSED_PORT_URL)
    store = fs.SQLiteFeatureStore(fs.write_sqlite(tmp_path / "f.sqlite3", tables, version="v1"))
    try:
        # When the sync runs, then it reports skipped with a warning and does not raise
        with caplog.at_level(logging.WARNING, logger="apps.pipeline.feature_store"):
            result = fs.sync_to_redis(down, tables, "v1")
        assert result.status == "skipped"
        assert result.keys_written == 0
        assert "ConnectionError" in result.reason
        assert any(r.levelno == logging.WARNING for r in caplog.records)
        # and a read falls back to SQLite with the same values
        rows, source = fs.read_with_fallback("user", [1, 2], client=down, store=store)
        assert source == "sqlite"
        np.testing.assert_array_equal(rows.values, tables.user.loc[[1, 2]].to_numpy(np.float32))
    finally:
        store.close()
        down.close()


@pytest.mark.redis
def test_the_fallback_reader_prefers_redis_when_it_answers(tables, client, tmp_path):
    store = fs.SQLiteFeatureStore(
        fs.write_sqlite(tmp_path / "f.sqlite3", shifted(tables, 1.0), version="old")
    )
    try:
        fs.sync_to_redis(client, tables, "v1")
        rows, source = fs.read_with_fallback("item", [10], client=client, store=store)
        assert source == "redis"
        np.testing.assert_array_equal(rows.values[0], tables.item.loc[10].to_numpy(np.float32))
    finally:
        store.close()


def test_versions_that_could_clash_with_keys_or_patterns_are_refused(tables, tmp_path):
    for bad in ("", "current", "v*", "a:b", "x" * 65):
        with pytest.raises(ValueError, match="invalid feature version"):
            fs.write_sqlite(tmp_path / "f.sqlite3", tables, version=bad)
