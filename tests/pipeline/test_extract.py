"""Incremental extraction against SQLite source files, with an in-memory store and lock.

Time is controlled explicitly through ``now``; the MariaDB suite (test_extract_mariadb.py)
runs the same extractor against real concurrent transactions.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
from collections.abc import Iterator

import pandas as pd
import pytest
import sqlalchemy as sa

from apps.pipeline.extract import (
    ExtractionAlreadyRunning,
    ExtractionError,
    InMemoryLockManager,
    InMemoryWatermarkStore,
    SourceExtractionFailed,
    WatermarkConflict,
    extract_source,
    extract_table,
    lock_name,
    naive_extract_table,
    reconcile_deletes,
)
from apps.pipeline.lake import Lake
from apps.pipeline.sources.contract import CursorSpec, SourceSpec, TableSpec
from apps.pipeline.sources.db import make_engine

NOW = dt.datetime.fromisoformat("2024-05-01 12:00:00")

EVENTS = TableSpec(
    source="biz",
    name="event_row",
    physical="event_row",
    primary_key=("id",),
    cursor=CursorSpec(column="updated_at", kind="timestamp", lag_seconds=5, lookback_seconds=60),
    columns={"id": "integer", "payload": "string", "updated_at": "datetime"},
    deletes="reconcile",
)

ACTIONS = TableSpec(
    source="matomo",
    name="log_link_visit_action",
    physical="matomo_log_link_visit_action",
    primary_key=("idlink_va",),
    cursor=CursorSpec(column="idlink_va", kind="id", lookback_rows=10),
    columns={"idlink_va": "integer", "idvisit": "integer"},
)

CONVERSIONS = TableSpec(
    source="matomo",
    name="log_conversion",
    physical="matomo_log_conversion",
    primary_key=("idvisit", "idgoal", "buster"),
    cursor=CursorSpec(column="server_time", kind="timestamp", lag_seconds=5, lookback_seconds=60),
    columns={
        "idvisit": "integer",
        "idgoal": "integer",
        "buster": "integer",
        "idorder": "string",
        "revenue": "float",
        "server_time": "datetime",
    },
    replace_by="idvisit",
    deletes="reconcile",
)


def ago(seconds: float) -> dt.datetime:
    return NOW - dt.timedelta(seconds=seconds)


def sql_ts(value: dt.datetime) -> str:
    return value.isoformat(sep=" ")


@pytest.fixture
def engine(tmp_path) -> Iterator[sa.Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'source.sqlite3'}")
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE event_row (id INTEGER PRIMARY KEY, payload TEXT,"
                " updated_at DATETIME NOT NULL)"
            )
        )
        conn.execute(sa.text("CREATE INDEX idx_event_updated ON event_row (updated_at, id)"))
        conn.execute(
            sa.text(
                "CREATE TABLE matomo_log_link_visit_action"
                " (idlink_va INTEGER PRIMARY KEY, idvisit INTEGER NOT NULL)"
            )
        )
        conn.execute(
            sa.text(
                "CREATE TABLE matomo_log_conversion (idvisit INTEGER NOT NULL,"
                " idgoal INTEGER NOT NULL, buster INTEGER NOT NULL, idorder TEXT,"
                " revenue REAL, server_time DATETIME NOT NULL,"
                " PRIMARY KEY (idvisit, idgoal, buster))"
            )
        )
    yield engine
    engine.dispose()


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(tmp_path / "raw")


@pytest.fixture
def store() -> InMemoryWatermarkStore:
    return InMemoryWatermarkStore()


def put(engine: sa.Engine, id_: int, payload: str, when: dt.datetime) -> None:
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT OR REPLACE INTO event_row VALUES (:id, :payload, :ts)"),
            {"id": id_, "payload": payload, "ts": sql_ts(when)},
        )


def execute(engine: sa.Engine, sql: str, **params: object) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(sql), params)


def lake_rows(lake: Lake, spec: TableSpec = EVENTS) -> dict[int, tuple[str, pd.Timestamp]]:
    frame = lake.read_table(spec.source, spec.name)
    return {int(r.id): (r.payload, r.updated_at) for r in frame.itertuples()}


def source_rows(engine: sa.Engine) -> dict[int, tuple[str, pd.Timestamp]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, payload, updated_at FROM event_row")).fetchall()
    return {r[0]: (r[1], pd.Timestamp(r[2])) for r in rows}


def run(engine, lake, store, spec=EVENTS, *, now=NOW, token=1, batch_rows=1000, **kw):
    return extract_table(
        engine, spec, lake, store, fence_token=token, batch_rows=batch_rows, now=now, **kw
    )


# --- timestamp cursor ---------------------------------------------------------------------


def test_rows_that_tie_on_the_cursor_are_all_read_across_page_boundaries(engine, lake, store):
    # given ten rows with the same updated_at and pages of three rows
    for i in range(1, 11):
        put(engine, i, f"p{i}", ago(30))

    # when extracted
    result = run(engine, lake, store, batch_rows=3)

    # then all ten are in the lake, read in four pages
    assert sorted(lake_rows(lake)) == list(range(1, 11))
    assert result.batches == 4
    assert result.rows_total == 10


def test_the_naive_extractor_loses_rows_that_tie_at_a_page_boundary(engine, lake, store):
    # given the same ties: the control must fail where the real extractor succeeds
    for i in range(1, 11):
        put(engine, i, f"p{i}", ago(30))

    naive_extract_table(engine, EVENTS, lake, store, batch_rows=3)

    assert len(lake_rows(lake)) == 3


def test_rows_newer_than_now_minus_lag_wait_for_a_later_run(engine, lake, store):
    # given one row well in the past and one inside the lag (5 s)
    put(engine, 1, "old", ago(10))
    put(engine, 2, "fresh", ago(2))

    # when extracted now, then only the old row is read and the watermark is now - lag
    first = run(engine, lake, store)
    assert sorted(lake_rows(lake)) == [1]
    assert first.watermark_to == {"kind": "timestamp", "ts": ago(5).isoformat()}
    assert first.upper_bound == ago(5).isoformat()

    # when extracted ten seconds later, then the fresh row is read too
    run(engine, lake, store, now=NOW + dt.timedelta(seconds=10))
    assert sorted(lake_rows(lake)) == [1, 2]


def test_the_upper_bound_is_floored_to_whole_seconds(engine, lake, store):
    put(engine, 1, "a", ago(5))

    result = run(engine, lake, store, now=NOW + dt.timedelta(microseconds=700_000))

    assert result.watermark_to == {"kind": "timestamp", "ts": ago(5).isoformat()}
    assert sorted(lake_rows(lake)) == [1]


def test_a_late_commit_inside_the_lookback_is_read_and_one_older_than_it_is_not(
    engine, lake, store
):
    # given a first run that moved the watermark to NOW - 5 s
    put(engine, 1, "a", ago(10))
    run(engine, lake, store)

    # when a transaction that started 30 s ago commits now (inside the 60 s lookback), and
    # one that started 200 s ago commits too (beyond any sane transaction, and the lookback)
    put(engine, 2, "late", ago(30))
    put(engine, 3, "ancient", ago(200))
    run(engine, lake, store, now=NOW + dt.timedelta(seconds=1))

    # then the late row is read; the ancient one is outside the contract's promise
    assert sorted(lake_rows(lake)) == [1, 2]


def test_an_update_replaces_the_row_in_the_lake(engine, lake, store):
    put(engine, 1, "v1", ago(100))
    run(engine, lake, store)

    put(engine, 1, "v2", ago(3))
    run(engine, lake, store, now=NOW + dt.timedelta(seconds=10))

    assert lake_rows(lake) == source_rows(engine)
    assert lake_rows(lake)[1][0] == "v2"


def test_a_crash_while_reading_leaves_the_watermark_and_the_next_run_converges(engine, lake, store):
    # given five rows and a progress callback that dies after the first page
    for i in range(1, 6):
        put(engine, i, f"p{i}", ago(20 + i))
    before = store.get("biz", "event_row")

    def crash(rows: int) -> None:
        raise RuntimeError("worker killed")

    # when the run crashes mid-read
    with pytest.raises(RuntimeError, match="worker killed"):
        run(engine, lake, store, batch_rows=2, progress=crash)

    # then the watermark did not move, though the first page is already in the lake
    assert store.get("biz", "event_row") == before
    assert len(lake_rows(lake)) == 2

    # and the next run finishes the job
    run(engine, lake, store, batch_rows=2)
    assert lake_rows(lake) == source_rows(engine)


class CrashBeforeCas(InMemoryWatermarkStore):
    """The process dies after the lake batch is durable, before the compare-and-set."""

    def compare_and_set(self, *args, **kwargs):
        raise RuntimeError("killed before CAS")


def test_a_crash_after_the_lake_write_leaves_the_watermark_unchanged(engine, lake):
    store = CrashBeforeCas()
    put(engine, 1, "a", ago(20))

    with pytest.raises(RuntimeError, match="before CAS"):
        run(engine, lake, store)

    assert store.get("biz", "event_row") == (None, 0)
    assert sorted(lake_rows(lake)) == [1]


class RacingStore(InMemoryWatermarkStore):
    """Another run moves the watermark between this run's read and its compare-and-set."""

    def get(self, source, table):
        value, version = super().get(source, table)
        super().compare_and_set(source, table, version, {"kind": "timestamp", "ts": "x"}, 1, 0)
        return value, version


def test_a_lost_compare_and_set_raises_and_keeps_the_winner(engine, lake):
    store = RacingStore()
    put(engine, 1, "a", ago(20))

    with pytest.raises(WatermarkConflict, match="compare-and-set lost"):
        run(engine, lake, store)

    assert InMemoryWatermarkStore.get(store, "biz", "event_row")[0] == {
        "kind": "timestamp",
        "ts": "x",
    }


def test_a_stale_fencing_token_cannot_move_the_watermark(engine, lake, store):
    # given a watermark last written by the holder of token 5
    assert store.compare_and_set("biz", "event_row", 0, None, 5, 0)
    put(engine, 1, "a", ago(20))

    # when a run holding the older token 4 finishes
    with pytest.raises(WatermarkConflict):
        run(engine, lake, store, token=4)

    # then the watermark is untouched
    assert store.get("biz", "event_row") == (None, 1)


def test_a_watermark_of_another_cursor_kind_is_refused(engine, lake, store):
    store.compare_and_set("biz", "event_row", 0, {"kind": "id", "id": 3}, 1, 0)

    with pytest.raises(ExtractionError, match="reset this table's watermark"):
        run(engine, lake, store)


def test_an_empty_source_table_becomes_an_empty_lake_table_with_its_columns(engine, lake, store):
    result = run(engine, lake, store)

    frame = lake.read_table("biz", "event_row")
    assert frame.empty
    assert list(frame.columns) == ["id", "payload", "updated_at"]
    assert result.rows_total == 0
    assert store.get("biz", "event_row")[1] == 1


# --- id cursor ----------------------------------------------------------------------------


def test_an_id_committed_after_a_larger_one_is_read_through_lookback_rows(engine, lake, store):
    # given ids 1, 2, 4 visible; id 3 was allocated but its transaction has not committed
    for i in (1, 2, 4):
        execute(engine, "INSERT INTO matomo_log_link_visit_action VALUES (:i, 7)", i=i)
    first = run(engine, lake, store, ACTIONS)
    assert first.watermark_to == {"kind": "id", "id": 4}

    # when id 3 commits
    execute(engine, "INSERT INTO matomo_log_link_visit_action VALUES (3, 7)")
    run(engine, lake, store, ACTIONS)

    # then it is read although it is below the watermark
    assert lake.keys("matomo", "log_link_visit_action")["idlink_va"].tolist() == [1, 2, 3, 4]


def test_without_lookback_rows_the_late_id_is_lost(engine, lake, store):
    # the control for the test above: the same sequence with lookback_rows = 0
    no_lookback = dataclasses.replace(
        ACTIONS, cursor=dataclasses.replace(ACTIONS.cursor, lookback_rows=0)
    )
    for i in (1, 2, 4):
        execute(engine, "INSERT INTO matomo_log_link_visit_action VALUES (:i, 7)", i=i)
    run(engine, lake, store, no_lookback)
    execute(engine, "INSERT INTO matomo_log_link_visit_action VALUES (3, 7)")
    run(engine, lake, store, no_lookback)

    assert lake.keys("matomo", "log_link_visit_action")["idlink_va"].tolist() == [1, 2, 4]


def test_id_pages_resume_after_the_last_id(engine, lake, store):
    for i in range(1, 8):
        execute(engine, "INSERT INTO matomo_log_link_visit_action VALUES (:i, 1)", i=i)

    result = run(engine, lake, store, ACTIONS, batch_rows=3)

    assert result.batches == 3
    assert lake.row_count("matomo", "log_link_visit_action") == 7


# --- replace_by ---------------------------------------------------------------------------


def conversion_rows(lake: Lake) -> list[tuple[int, int, int]]:
    frame = lake.read_table("matomo", "log_conversion")
    return sorted(map(tuple, frame[["idvisit", "idgoal", "buster"]].astype(int).values.tolist()))


def test_a_cart_turned_into_an_order_replaces_the_visits_rows(engine, lake, store):
    # given visit 1 with a cart (idgoal -1) and visit 2 with an abandoned cart
    execute(
        engine,
        "INSERT INTO matomo_log_conversion VALUES (1, -1, 0, NULL, 30, :t), (2, -1, 0, NULL, 5, :t)",
        t=sql_ts(ago(100)),
    )
    run(engine, lake, store, CONVERSIONS)
    assert conversion_rows(lake) == [(1, -1, 0), (2, -1, 0)]

    # when visit 1 orders: Matomo rewrites the cart row into the order row (its key changes)
    execute(
        engine,
        "UPDATE matomo_log_conversion SET idgoal = 0, buster = 777, idorder = 'A1',"
        " server_time = :t WHERE idvisit = 1",
        t=sql_ts(ago(3)),
    )
    run(engine, lake, store, CONVERSIONS, now=NOW + dt.timedelta(seconds=10))

    # then the lake holds exactly the source rows: the order, not the stale cart
    assert conversion_rows(lake) == [(1, 0, 777), (2, -1, 0)]
    frame = lake.read_table("matomo", "log_conversion")
    assert frame.loc[frame["idvisit"] == 1, "idorder"].tolist() == ["A1"]


def test_upserting_a_replace_by_table_by_key_would_keep_the_stale_cart(engine, lake, store):
    # the control: the same sequence treated as a plain upsert table leaves a ghost cart
    by_key = dataclasses.replace(CONVERSIONS, replace_by=None)
    execute(
        engine,
        "INSERT INTO matomo_log_conversion VALUES (1, -1, 0, NULL, 30, :t)",
        t=sql_ts(ago(100)),
    )
    run(engine, lake, store, by_key)
    execute(
        engine,
        "UPDATE matomo_log_conversion SET idgoal = 0, buster = 777, server_time = :t",
        t=sql_ts(ago(3)),
    )
    run(engine, lake, store, by_key, now=NOW + dt.timedelta(seconds=10))

    assert conversion_rows(lake) == [(1, -1, 0), (1, 0, 777)]


def test_groups_are_batched_and_all_rows_of_a_touched_group_are_read(engine, lake, store):
    # given 7 visits, visit 3 with an old row and a row inside the window
    for visit in range(1, 8):
        execute(
            engine,
            "INSERT INTO matomo_log_conversion VALUES (:v, -1, 0, NULL, 1, :t)",
            v=visit,
            t=sql_ts(ago(30)),
        )
    execute(
        engine,
        "INSERT INTO matomo_log_conversion VALUES (3, 4, 9, NULL, 1, :t)",
        t=sql_ts(ago(9000)),
    )

    result = run(engine, lake, store, CONVERSIONS, batch_rows=3)

    assert len(conversion_rows(lake)) == 8
    assert result.rows_read == 8
    assert result.batches >= 1


# --- deletes, locks, the whole source -----------------------------------------------------


def test_reconcile_tombstones_rows_deleted_at_the_source(engine, lake, store):
    for i in range(1, 6):
        put(engine, i, f"p{i}", ago(30))
    run(engine, lake, store)

    execute(engine, "DELETE FROM event_row WHERE id IN (2, 4)")
    deleted = reconcile_deletes(engine, EVENTS, lake, fence_token=1, batch_rows=2)

    assert deleted == 2
    assert lake_rows(lake) == source_rows(engine)
    assert reconcile_deletes(engine, EVENTS, lake, fence_token=1) == 0


def source_of(*tables: TableSpec) -> SourceSpec:
    return SourceSpec(
        name=tables[0].source,
        url_setting="X",
        table_prefix="",
        tables={t.name: t for t in tables},
    )


def test_extract_source_reconciles_and_reports_each_table(engine, lake, store):
    for i in range(1, 4):
        put(engine, i, f"p{i}", ago(30))
    locks = InMemoryLockManager()
    extract_source(engine, source_of(EVENTS), lake, store, locks, holder="t", now=NOW)
    execute(engine, "DELETE FROM event_row WHERE id = 2")

    result = extract_source(
        engine, source_of(EVENTS), lake, store, locks, holder="t", reconcile=True, now=NOW
    )

    assert result.ok
    assert result.token == 2
    (table,) = result.tables
    assert (table.rows_deleted, table.rows_total, table.reconciled) == (1, 2, True)
    assert sorted(lake_rows(lake)) == [1, 3]


def test_a_second_extraction_of_a_source_is_refused_while_the_first_runs(engine, lake, store):
    # given a first run paused in the middle of reading (after its first page)
    for i in range(1, 6):
        put(engine, i, f"p{i}", ago(30))
    locks = InMemoryLockManager()
    paused, resume = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def hold(rows: int) -> None:
        paused.set()
        resume.wait(10)

    def first() -> None:
        outcome["result"] = extract_source(
            engine,
            source_of(EVENTS),
            lake,
            store,
            locks,
            holder="A",
            batch_rows=2,
            progress=hold,
            now=NOW,
        )

    thread = threading.Thread(target=first)
    thread.start()
    assert paused.wait(10)

    # when a second run of the same source starts, then it is refused
    try:
        with pytest.raises(ExtractionAlreadyRunning, match="already running"):
            extract_source(engine, source_of(EVENTS), lake, store, locks, holder="B", now=NOW)
    finally:
        resume.set()
        thread.join(10)

    # and the first run completes; afterwards a new run gets a newer token
    assert outcome["result"].ok
    again = extract_source(engine, source_of(EVENTS), lake, store, locks, holder="B", now=NOW)
    assert again.token == outcome["result"].token + 1


def test_a_failing_table_is_reported_the_others_run_and_the_lock_is_released(engine, lake, store):
    put(engine, 1, "a", ago(30))
    missing = dataclasses.replace(EVENTS, name="ghost", physical="no_such_table")
    locks = InMemoryLockManager()

    with pytest.raises(SourceExtractionFailed, match="ghost") as failed:
        extract_source(engine, source_of(missing, EVENTS), lake, store, locks, holder="t", now=NOW)

    result = failed.value.result
    assert [t.table for t in result.tables] == ["event_row"]
    assert [f.table for f in result.failures] == ["ghost"]
    assert store.get("biz", "ghost") == (None, 0)
    assert locks.acquire(lock_name("biz"), "next", 60) is not None


def test_a_run_compacts_the_table_once_it_has_too_many_files(engine, lake, store):
    locks = InMemoryLockManager()
    for i in range(1, 10):
        put(engine, i, f"p{i}", ago(30))
        extract_source(
            engine,
            source_of(EVENTS),
            lake,
            store,
            locks,
            holder="t",
            batch_rows=2,
            compact_after_files=3,
            now=NOW,
        )
        assert lake.file_count("biz", "event_row") <= 4

    assert lake_rows(lake) == source_rows(engine)


def test_an_expired_lease_is_taken_over_with_a_higher_token():
    clock = [0.0]
    locks = InMemoryLockManager(clock=lambda: clock[0])
    first = locks.acquire("extract:biz", "A", 10)

    assert locks.acquire("extract:biz", "B", 10) is None
    clock[0] = 11.0
    second = locks.acquire("extract:biz", "B", 10)

    assert first is not None
    assert second is not None
    assert second > first
    locks.release("extract:biz", first)  # the stale holder frees nothing
    assert locks.acquire("extract:biz", "C", 10) is None
