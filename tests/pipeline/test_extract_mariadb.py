"""Incremental extraction is exactly-once in effect against a real, busy MariaDB.

The heart of this module is a workload that produces every hazard of cursor-based extraction
at once: many rows tying on a one-second DATETIME, a session whose clock is behind, long
transactions whose ``updated_at = NOW()`` is the *start* of the transaction while they commit
seconds later (after rows with later timestamps were committed and extracted), and deletes.
The real extractor runs many times while the writers write, with crashes injected, and must
end with the source's rows exactly. Two controls run on the same workload and must lose rows:
the naive ``updated_at > watermark`` extractor and the real extractor without its lookback.
If they did not, the workload would not be exercising the hazards and the test would prove
nothing, so that fails the test too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import MySQLdb
import pandas as pd
import pytest
import sqlalchemy as sa

from apps.pipeline.extract import (
    ExtractionAlreadyRunning,
    InMemoryLockManager,
    InMemoryWatermarkStore,
    SourceExtractionFailed,
    extract_source,
    extract_table,
    naive_extract_table,
)
from apps.pipeline.lake import Lake, rows_to_arrow, to_frame
from apps.pipeline.sources.contract import CursorSpec, SourceSpec, TableSpec, load_contract
from apps.pipeline.sources.db import make_engine

pytestmark = pytest.mark.mariadb

ROOT = Path(__file__).resolve().parents[2]
LAG_S = 2
LOOKBACK_S = 6
# Long transactions stay open this long: well past the lag, so rows with later timestamps are
# committed and extracted before they commit, and within lag + lookback, the contract's bound.
LONG_TXN_S = 4.0
SKEW_S = 1.5
WORKLOAD_S = 14.0
MIN_ITERATIONS = 25
PAGE_ROWS = 20

EVENTS = TableSpec(
    source="biz",
    name="event_row",
    physical="event_row",
    primary_key=("id",),
    cursor=CursorSpec(
        column="updated_at", kind="timestamp", lag_seconds=LAG_S, lookback_seconds=LOOKBACK_S
    ),
    columns={"id": "integer", "payload": "string", "updated_at": "datetime"},
    deletes="reconcile",
)
NO_LOOKBACK = dataclasses.replace(
    EVENTS, cursor=dataclasses.replace(EVENTS.cursor, lookback_seconds=0)
)
BIZ = SourceSpec(name="biz", url_setting="X", table_prefix="", tables={"event_row": EVENTS})
RESERVED = 20  # ids 1..20 are touched only by the long transactions


def connect(url: str) -> MySQLdb.Connection:
    parts = sa.engine.make_url(url)
    conn = MySQLdb.connect(
        host=parts.host,
        port=parts.port or 3306,
        user=parts.username,
        passwd=parts.password or "",
        db=parts.database,
        charset="utf8mb4",
    )
    conn.autocommit(False)
    # Source DATETIMEs are naive UTC.
    conn.cursor().execute("SET time_zone = '+00:00'")
    return conn


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


@pytest.fixture
def engine(mariadb_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(mariadb_url)
    yield engine
    engine.dispose()


# --- the workload -------------------------------------------------------------------------


@dataclasses.dataclass
class LongCommit:
    row_id: int
    started: dt.datetime  # updated_at the transaction wrote (NOW() at its statement start)
    committed: dt.datetime
    real_watermark: str | None  # the real extractor's watermark when the commit landed


class Workload:
    """Writers with ties, a skewed clock, long late-committing transactions and deletes."""

    def __init__(self, url: str, watermark: Callable[[], str | None]) -> None:
        self.url = url
        self.watermark = watermark
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ids: list[int] = []
        self.deleted: set[int] = set()
        self.long_commits: list[LongCommit] = []
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._guard, args=(fn,), name=fn.__name__)
            for fn in (self.ties, self.skewed, self.long_transactions, self.deletes)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self.threads)

    def _guard(self, body: Callable[[MySQLdb.Connection, random.Random], None]) -> None:
        conn = connect(self.url)
        try:
            body(conn, random.Random(body.__name__))
        except BaseException as exc:
            self.errors.append(exc)
        finally:
            conn.close()

    def _pick(self, rng: random.Random) -> int | None:
        with self.lock:
            return rng.choice(self.ids) if self.ids else None

    def _insert(self, cur: Any, n: int, label: str) -> list[int]:
        values = ", ".join(["(%s, NOW())"] * n)
        cur.execute(f"INSERT INTO event_row (payload, updated_at) VALUES {values}", [label] * n)
        # innodb_autoinc_lock_mode 1: a multi-row INSERT gets consecutive ids.
        return list(range(cur.lastrowid, cur.lastrowid + n))

    def ties(self, conn: MySQLdb.Connection, rng: random.Random) -> None:
        """Many small transactions: dozens of rows share each second of updated_at."""
        cur = conn.cursor()
        n = 0
        while not self.stop.is_set():
            n += 1
            new = self._insert(cur, 3, f"tie-{n}")
            for _ in range(2):
                target = self._pick(rng)
                if target is not None:
                    cur.execute(
                        "UPDATE event_row SET payload = %s, updated_at = NOW() WHERE id = %s",
                        (f"tie-upd-{n}", target),
                    )
            conn.commit()
            with self.lock:
                self.ids.extend(new)
            time.sleep(rng.uniform(0.01, 0.05))

    def skewed(self, conn: MySQLdb.Connection, rng: random.Random) -> None:
        """A session whose clock is SKEW_S behind: its NOW() lands in the past."""
        cur = conn.cursor()
        n = 0
        while not self.stop.is_set():
            n += 1
            cur.execute("SET timestamp = %s", (time.time() - SKEW_S,))
            new = self._insert(cur, 2, f"skew-{n}")
            target = self._pick(rng)
            if target is not None:
                cur.execute(
                    "UPDATE event_row SET payload = %s, updated_at = NOW() WHERE id = %s",
                    (f"skew-upd-{n}", target),
                )
            conn.commit()
            cur.execute("SET timestamp = DEFAULT")
            with self.lock:
                self.ids.extend(new)
            time.sleep(rng.uniform(0.05, 0.15))

    def long_transactions(self, conn: MySQLdb.Connection, rng: random.Random) -> None:
        """Open, write updated_at = NOW(), stay open LONG_TXN_S, then commit."""
        cur = conn.cursor()
        n = 0
        while not self.stop.is_set():
            n += 1
            (row_id,) = self._insert(cur, 1, f"long-{n}")
            for target in rng.sample(range(1, RESERVED + 1), 2):
                cur.execute(
                    "UPDATE event_row SET payload = %s, updated_at = NOW() WHERE id = %s",
                    (f"long-upd-{n}", target),
                )
            cur.execute("SELECT updated_at FROM event_row WHERE id = %s", (row_id,))
            (started,) = cur.fetchone()
            time.sleep(LONG_TXN_S)  # later rows commit and get extracted meanwhile
            conn.commit()
            committed = utcnow()
            self.long_commits.append(LongCommit(row_id, started, committed, self.watermark()))
            time.sleep(0.3)

    def deletes(self, conn: MySQLdb.Connection, rng: random.Random) -> None:
        cur = conn.cursor()
        while not self.stop.wait(0.3):
            with self.lock:
                if len(self.ids) < 10:
                    continue
                target = self.ids.pop(rng.randrange(len(self.ids)))
            cur.execute("DELETE FROM event_row WHERE id = %s", (target,))
            conn.commit()
            with self.lock:
                self.deleted.add(target)


# --- fault injection ----------------------------------------------------------------------


class CrashBeforeCas:
    """The store of a process that dies after the lake batch is durable, before the CAS."""

    def __init__(self, inner: InMemoryWatermarkStore) -> None:
        self.inner = inner

    def get(self, source: str, table: str) -> tuple[dict[str, Any] | None, int]:
        return self.inner.get(source, table)

    def compare_and_set(self, *args: Any) -> bool:
        raise RuntimeError("injected: killed between the lake write and the watermark CAS")


class CrashAfterLakeWrite(Lake):
    """A lake whose first write lands durably, then the process dies."""

    def append_upsert(self, *args: Any, **kwargs: Any) -> Any:
        super().append_upsert(*args, **kwargs)
        raise RuntimeError("injected: killed right after a durable lake write")


def crash_mid_read(rows: int) -> None:
    raise RuntimeError("injected: killed while reading (after the first page)")


# --- comparison ---------------------------------------------------------------------------


def source_frame(engine: sa.Engine, spec: TableSpec) -> pd.DataFrame:
    columns = list(spec.columns)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT {', '.join(columns)} FROM {spec.physical}")).fetchall()
    return to_frame(rows_to_arrow(rows, columns, spec.columns), spec.columns)


@dataclasses.dataclass(frozen=True)
class Diff:
    missing: list[int]
    extra: list[int]
    stale: list[int]


def _counts(d: Diff) -> str:
    return f"missing={len(d.missing)} extra={len(d.extra)} stale={len(d.stale)}"


def diff(source: pd.DataFrame, lake: pd.DataFrame) -> Diff:
    joined = source.merge(lake, on="id", how="outer", suffixes=("_src", "_lake"), indicator=True)
    both = joined[joined["_merge"] == "both"]
    stale = both[
        (both["payload_src"] != both["payload_lake"])
        | (both["updated_at_src"] != both["updated_at_lake"])
    ]
    return Diff(
        missing=sorted(joined.loc[joined["_merge"] == "left_only", "id"].astype(int)),
        extra=sorted(joined.loc[joined["_merge"] == "right_only", "id"].astype(int)),
        stale=sorted(stale["id"].astype(int)),
    )


# --- the correctness test -----------------------------------------------------------------


def test_the_extractor_ends_with_exactly_the_source_rows_under_a_hostile_workload(
    engine, mariadb_url, tmp_path
):
    # Given an event table with reserved rows for the long transactions
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE event_row (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,"
                " payload VARCHAR(64) NOT NULL, updated_at DATETIME NOT NULL,"
                " KEY idx_updated (updated_at, id)) ENGINE=InnoDB"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO event_row (payload, updated_at)"
                " SELECT CONCAT('seed-', seq), UTC_TIMESTAMP() - INTERVAL 1 HOUR FROM seq_1_to_60"
            )
        )
    store, locks = InMemoryWatermarkStore(), InMemoryLockManager()
    lake = Lake(tmp_path / "real")
    naive_lake, naive_store = Lake(tmp_path / "naive"), InMemoryWatermarkStore()
    nolb_lake, nolb_store = Lake(tmp_path / "no-lookback"), InMemoryWatermarkStore()

    def real_watermark() -> str | None:
        value = store.get("biz", "event_row")[0]
        return value["ts"] if value else None

    workload = Workload(mariadb_url, real_watermark)
    with workload.lock:
        workload.ids.extend(range(RESERVED + 1, 61))
    crashes = ["before_cas", "mid_read", "after_lake_write", "before_cas"]
    pending = list(crashes)
    crashed: list[str] = []
    runs = reconciled = 0

    def run_real(i: int, *, reconcile: bool, mode: str | None = None) -> None:
        nonlocal runs, reconciled
        before = store.get("biz", "event_row")
        batches_before = (
            lake.file_count("biz", "event_row") if lake.exists("biz", "event_row") else 0
        )
        failure: SourceExtractionFailed | None = None
        try:
            result = extract_source(
                engine,
                BIZ,
                CrashAfterLakeWrite(lake.root) if mode == "after_lake_write" else lake,
                CrashBeforeCas(store) if mode == "before_cas" else store,
                locks,
                holder=f"run-{i}",
                batch_rows=PAGE_ROWS,
                reconcile=reconcile,
                compact_after_files=40,
                progress=crash_mid_read if mode == "mid_read" else None,
            )
        except SourceExtractionFailed as exc:
            failure = exc
        if failure is not None:
            assert mode is not None, f"run {i} failed without an injected crash: {failure}"
            assert "injected" in str(failure)
            # A crash NEVER advances the watermark...
            assert store.get("biz", "event_row") == before
            # ...although the crashed run did land rows in the lake first.
            assert lake.file_count("biz", "event_row") > batches_before
            crashed.append(mode)
            return
        assert mode is None, f"run {i} should have crashed ({mode})"
        runs += 1
        reconciled += result.tables[0].rows_deleted

    # When the writers write for a while and every extractor runs again and again
    workload.start()
    started = time.monotonic()
    i = 0
    # A slow machine runs longer rather than fewer times.
    while time.monotonic() - started < WORKLOAD_S or i < MIN_ITERATIONS or pending:
        # Crash every third run once the window holds rows, so a crashing run has written
        # batches before it dies.
        armed = pending and time.monotonic() - started > LAG_S + 1.5 and i % 3 == 0
        run_real(i, reconcile=i % 5 == 4, mode=pending.pop(0) if armed else None)
        naive_extract_table(engine, EVENTS, naive_lake, naive_store, batch_rows=PAGE_ROWS)
        extract_table(
            engine, NO_LOOKBACK, nolb_lake, nolb_store, fence_token=1, batch_rows=PAGE_ROWS
        )
        i += 1
        time.sleep(0.2)
    workload.join()
    assert not workload.errors, workload.errors
    # ...and once more after the writers stopped and the lag has passed.
    time.sleep(LAG_S + 1.5)
    run_real(10_000, reconcile=True)
    naive_extract_table(engine, EVENTS, naive_lake, naive_store, batch_rows=PAGE_ROWS)
    extract_table(engine, NO_LOOKBACK, nolb_lake, nolb_store, fence_token=1, batch_rows=PAGE_ROWS)

    source = source_frame(engine, EVENTS)
    real = diff(source, lake.read_table("biz", "event_row"))
    naive = diff(source, naive_lake.read_table("biz", "event_row"))
    no_lookback = diff(source, nolb_lake.read_table("biz", "event_row"))
    ties = source.groupby("updated_at").size()
    summary = (
        f"runs={runs} crashed={crashed} rows={len(source)} deleted={len(workload.deleted)} "
        f"reconciled={reconciled} max_tie={ties.max()} long={workload.long_commits} "
        f"naive={_counts(naive)} no_lookback={_counts(no_lookback)}"
    )

    # Then the workload really exercised every hazard:
    assert crashed == crashes, summary
    assert runs >= MIN_ITERATIONS - len(crashes), summary
    assert ties.max() > PAGE_ROWS, f"no tie spans a page boundary: {summary}"
    late = [
        c
        for c in workload.long_commits
        if c.real_watermark and c.started.isoformat() < c.real_watermark
    ]
    assert late, f"no long transaction committed below the watermark: {summary}"
    assert workload.deleted, summary
    # and the controls lost rows on it (the naive one is required to; without lookback the
    # late commits are lost)
    assert naive.missing, f"the naive extractor lost nothing: the workload is too kind ({summary})"
    assert set(no_lookback.missing) & {c.row_id for c in late}, summary

    # and the real extractor has exactly the source's rows: none missing, extra or stale.
    assert real == Diff(missing=[], extra=[], stale=[]), summary
    assert not workload.deleted & set(lake.keys("biz", "event_row")["id"].astype(int)), summary
    assert reconciled > 0, summary
    pd.testing.assert_frame_equal(
        lake.read_table("biz", "event_row").sort_values("id").reset_index(drop=True),
        source.sort_values("id").reset_index(drop=True),
    )


# --- Matomo tables, through the real contract and DDL -------------------------------------


def matomo_ddl(table: str) -> str:
    text = (ROOT / "apps/pipeline/sources/ddl/matomo_schema.sql").read_text(encoding="utf-8")
    match = re.search(rf"CREATE TABLE `{table}` \(.*?\) ENGINE=[^;]*;", text, re.DOTALL)
    assert match, table
    return match.group(0)


def contract_spec(name: str, **cursor: int) -> TableSpec:
    spec = load_contract(ROOT / "config/sources.yaml").table(f"matomo.{name}")
    return dataclasses.replace(spec, cursor=dataclasses.replace(spec.cursor, **cursor))


def test_an_auto_increment_id_committed_out_of_order_is_not_lost(engine, mariadb_url, tmp_path):
    # Given the real Matomo action table and the contract's id cursor (lookback_rows 20000)
    with engine.begin() as conn:
        conn.execute(sa.text(matomo_ddl("matomo_log_link_visit_action")))
    spec = contract_spec("log_link_visit_action")
    control = contract_spec("log_link_visit_action", lookback_rows=0)
    lake, store = Lake(tmp_path / "real"), InMemoryWatermarkStore()
    control_lake, control_store = Lake(tmp_path / "control"), InMemoryWatermarkStore()
    insert = (
        "INSERT INTO matomo_log_link_visit_action (idsite, idvisitor, idvisit, server_time)"
        " VALUES (1, %s, %s, UTC_TIMESTAMP())"
    )
    early, late = connect(mariadb_url), connect(mariadb_url)

    def extract_both() -> None:
        extract_table(engine, spec, lake, store, fence_token=1, batch_rows=2)
        extract_table(engine, control, control_lake, control_store, fence_token=1, batch_rows=2)

    try:
        late.cursor().execute(insert, (b"\x01" * 8, 1))
        late.commit()
        # When a transaction takes id N and stays open...
        cur = early.cursor()
        cur.execute(insert, (b"\x02" * 8, 2))
        held = cur.lastrowid
        # ...while id N+1 commits and is extracted
        cur = late.cursor()
        cur.execute(insert, (b"\x03" * 8, 3))
        late.commit()
        after = cur.lastrowid
        assert after == held + 1
        extract_both()
        assert store.get("matomo", "log_link_visit_action")[0] == {"kind": "id", "id": after}
        assert held not in set(lake.keys("matomo", "log_link_visit_action")["idlink_va"])
        # and only then N commits
        early.commit()
        extract_both()
    finally:
        early.close()
        late.close()

    # Then the real extractor has it (lookback_rows), the control lost it
    assert sorted(lake.keys("matomo", "log_link_visit_action")["idlink_va"]) == [1, held, after]
    assert held not in set(control_lake.keys("matomo", "log_link_visit_action")["idlink_va"])
    frame = lake.read_table("matomo", "log_link_visit_action")
    assert frame.loc[frame["idlink_va"] == held, "idvisitor"].item() == b"\x02" * 8


def test_a_visit_whose_cart_becomes_an_order_ends_with_exactly_the_source_rows(engine, tmp_path):
    # Given Matomo's conversion tables and the contract's replace_by specs
    with engine.begin() as conn:
        conn.execute(sa.text(matomo_ddl("matomo_log_conversion")))
        conn.execute(sa.text(matomo_ddl("matomo_log_conversion_item")))
    specs = [contract_spec("log_conversion"), contract_spec("log_conversion_item")]
    by_key = [dataclasses.replace(s, replace_by=None) for s in specs]
    lake, store = Lake(tmp_path / "real"), InMemoryWatermarkStore()
    control_lake, control_store = Lake(tmp_path / "by-key"), InMemoryWatermarkStore()
    t0 = dt.datetime.fromisoformat("2024-03-01 10:00:00")

    def at(seconds: int) -> str:
        return (t0 + dt.timedelta(seconds=seconds)).isoformat(sep=" ")

    def sql(statement: str, **params: Any) -> None:
        with engine.begin() as conn:
            conn.execute(sa.text(statement), params)

    def extract(seconds: int) -> None:
        now = t0 + dt.timedelta(seconds=seconds)
        for spec, control in zip(specs, by_key, strict=True):
            extract_table(engine, spec, lake, store, fence_token=1, batch_rows=3, now=now)
            extract_table(
                engine, control, control_lake, control_store, fence_token=1, batch_rows=3, now=now
            )

    conversion = (
        "INSERT INTO matomo_log_conversion (idvisit, idsite, idvisitor, server_time, idgoal,"
        " buster, idorder, items, url, revenue) VALUES (:v, 1, :who, :t, :goal, :buster,"
        " :ord, :items, 'https://shop/', :revenue)"
    )
    item = (
        "INSERT INTO matomo_log_conversion_item (idsite, idvisitor, server_time, idvisit,"
        " idorder, idaction_sku, idaction_name, idaction_category, idaction_category2,"
        " idaction_category3, idaction_category4, idaction_category5, price, quantity, deleted)"
        " VALUES (1, :who, :t, :v, :ord, :sku, 0, 0, 0, 0, 0, 0, :price, :qty, 0)"
    )
    # visit 1 puts two products in its cart; visit 2 abandons a cart
    for v, who, items, revenue in ((1, b"visitor1", 2, 30.0), (2, b"visitor2", 1, 5.0)):
        sql(
            conversion,
            v=v,
            who=who,
            t=at(0),
            goal=-1,
            buster=0,
            ord=None,
            items=items,
            revenue=revenue,
        )
    sql(item, who=b"visitor1", t=at(0), v=1, ord="0", sku=11, price=10.0, qty=1)
    sql(item, who=b"visitor1", t=at(0), v=1, ord="0", sku=12, price=20.0, qty=1)
    sql(item, who=b"visitor2", t=at(0), v=2, ord="0", sku=13, price=5.0, qty=1)
    extract(60)

    # When visit 1 orders only SKU 11 (twice): Matomo rewrites the cart row into the order row
    # (idgoal, buster, idorder change: a new primary key), re-tags the item row with the
    # order id (a new key too) and flags the item no longer in the cart as deleted
    sql(
        "UPDATE matomo_log_conversion SET idgoal = 0, buster = 4242, idorder = 'ord-1',"
        " items = 2, revenue = 20.0, server_time = :t WHERE idvisit = 1 AND idgoal = -1",
        t=at(70),
    )
    sql(
        "UPDATE matomo_log_conversion_item SET idorder = 'ord-1', quantity = 2, server_time = :t"
        " WHERE idvisit = 1 AND idaction_sku = 11",
        t=at(70),
    )
    sql(
        "UPDATE matomo_log_conversion_item SET deleted = 1, server_time = :t"
        " WHERE idvisit = 1 AND idaction_sku = 12",
        t=at(70),
    )
    extract(120)

    # Then the lake holds exactly the source rows of both tables, every column equal
    for spec in specs:
        pk = list(spec.primary_key)
        expected = source_frame(engine, spec).sort_values(pk).reset_index(drop=True)
        got = lake.read_table(spec.source, spec.name).sort_values(pk).reset_index(drop=True)
        pd.testing.assert_frame_equal(got, expected)
    orders = lake.read_table("matomo", "log_conversion")
    assert orders.loc[orders["idvisit"] == 1, "idgoal"].tolist() == [0]
    # while upserting by key (the control) keeps the ghost cart rows of visit 1
    ghost = control_lake.read_table("matomo", "log_conversion")
    assert sorted(ghost.loc[ghost["idvisit"] == 1, "idgoal"].tolist()) == [-1, 0]
    ghost_items = control_lake.read_table("matomo", "log_conversion_item")
    assert len(ghost_items) == len(source_frame(engine, specs[1])) + 1


def test_a_second_extraction_of_a_busy_source_is_refused(engine, tmp_path):
    # Given a first extraction paused after its first page
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE event_row (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,"
                " payload VARCHAR(64) NOT NULL, updated_at DATETIME NOT NULL)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO event_row (payload, updated_at)"
                " SELECT 'x', UTC_TIMESTAMP() - INTERVAL 1 HOUR FROM seq_1_to_10"
            )
        )
    lake, store, locks = Lake(tmp_path / "lake"), InMemoryWatermarkStore(), InMemoryLockManager()
    paused, resume = threading.Event(), threading.Event()
    results: list[Any] = []

    def hold(rows: int) -> None:
        paused.set()
        resume.wait(10)

    first = threading.Thread(
        target=lambda: results.append(
            extract_source(engine, BIZ, lake, store, locks, holder="A", batch_rows=3, progress=hold)
        )
    )
    first.start()
    assert paused.wait(10)
    try:
        # When a second one starts, then it is refused and writes nothing
        files = lake.file_count("biz", "event_row")
        with pytest.raises(ExtractionAlreadyRunning):
            extract_source(engine, BIZ, lake, store, locks, holder="B")
        assert lake.file_count("biz", "event_row") == files
    finally:
        resume.set()
        first.join(10)
    assert len(results) == 1
    assert results[0].ok
    assert lake.row_count("biz", "event_row") == 10
