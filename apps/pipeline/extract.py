"""Incremental extraction of source tables into the lake, exactly-once in effect.

Pure core: no Django. Reads are at-least-once (a window that overlaps the previous one);
writes are idempotent (upsert by primary key, or replace a whole group); so re-reading a row
is harmless and the only thing to avoid is *not* reading one. The rules that guarantee it:

* Timestamp cursors read ``lower <= cursor <= upper`` where ``upper = source NOW() - lag``
  and ``lower = watermark - lookback``, paging on the composite key ``(cursor, pk)`` so ties on
  the cursor are never split between pages. See ``_timestamp_window`` for why the watermark is
  the upper bound.
* Id cursors read ``id > watermark - lookback_rows`` because AUTO_INCREMENT ids are handed out
  before commit: a smaller id can become visible after a larger one was extracted.
* ``replace_by`` tables: the window only says which groups changed; all current rows of those
  groups are then read and replace the lake's rows of the group (keys change in place).
* The watermark moves only after the lake batch is durable, by a compare-and-set on its
  version fenced by the lock token. Any failure leaves it where it was; rows already written
  to the lake are re-written by the next run, which is harmless.
* Deletes are invisible to a cursor: ``reconcile_deletes`` compares keys and writes tombstones.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import pyarrow as pa
import sqlalchemy as sa

from apps.pipeline.lake import Lake, StaleFenceToken, rows_to_arrow, to_frame
from apps.pipeline.sources.contract import SourceSpec, TableSpec
from apps.pipeline.sources.db import is_connect_failure, source_now

logger = logging.getLogger(__name__)

Progress = Callable[[int], None]
WatermarkValue = dict[str, Any]

# Group values per ``IN (...)`` query of a replace_by table. SQLite builds before 3.32 allow
# 999 bound parameters; 500 keeps each statement small on every backend.
GROUP_CHUNK = 500


class WatermarkStore(Protocol):
    """Where watermarks live; the only write is a fenced compare-and-set."""

    def get(self, source: str, table: str) -> tuple[WatermarkValue | None, int]:
        """The current value (None before the first run) and its version (0 before)."""
        ...

    def compare_and_set(
        self,
        source: str,
        table: str,
        expected_version: int,
        new_value: WatermarkValue | None,
        fence_token: int,
        rows_total: int,
    ) -> bool:
        """Store ``new_value`` if the version is still ``expected_version`` and no newer
        fencing token has written it; return whether it was stored."""
        ...


class LockManager(Protocol):
    """Leases with fencing tokens: one holder per name until release or expiry."""

    def acquire(self, name: str, holder: str, ttl_seconds: int) -> int | None:
        """A fencing token larger than every earlier one, or None if someone holds the lease."""
        ...

    def release(self, name: str, token: int) -> None:
        """Free the lease if ``token`` still holds it (a stale holder frees nothing)."""
        ...


class ExtractionError(Exception):
    """An extraction could not complete; its watermark did not move."""


class ExtractionAlreadyRunning(ExtractionError):
    """Another run holds the source's lock."""


class WatermarkConflict(ExtractionError):
    """The compare-and-set lost: another run moved the watermark or holds a newer token."""


class SourceExtractionFailed(ExtractionError):
    """At least one table of a source failed; ``result`` says which and what the others did."""

    def __init__(self, result: SourceResult) -> None:
        self.result = result
        names = ", ".join(f"{f.table} ({f.error_type}: {f.error})" for f in result.failures)
        super().__init__(f"extraction of source {result.source!r} failed for: {names}")


@dataclass(frozen=True)
class TableResult:
    """What one successful extraction of one table did."""

    source: str
    table: str
    rows_read: int
    rows_written: int
    batches: int
    watermark_from: WatermarkValue | None
    watermark_to: WatermarkValue | None
    upper_bound: str
    rows_total: int
    seconds: float
    rows_deleted: int = 0
    reconciled: bool = False


@dataclass(frozen=True)
class TableFailure:
    """A table whose extraction failed; its watermark is still ``watermark``."""

    source: str
    table: str
    error_type: str
    error: str
    watermark: WatermarkValue | None


@dataclass(frozen=True)
class SourceResult:
    """One locked run over the tables of a source."""

    source: str
    token: int
    tables: tuple[TableResult, ...] = ()
    failures: tuple[TableFailure, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every table succeeded."""
        return not self.failures


@dataclass(frozen=True)
class _Window:
    rows_read: int
    batches: int
    value: WatermarkValue | None
    upper_bound: str


def lock_name(source: str) -> str:
    """The lock that serialises extractions (and compactions) of one source."""
    return f"extract:{source}"


# --- public entry points ------------------------------------------------------------------


def extract_table(
    engine: sa.Engine,
    spec: TableSpec,
    lake: Lake,
    store: WatermarkStore,
    *,
    fence_token: int,
    batch_rows: int = 50_000,
    progress: Progress | None = None,
    now: dt.datetime | None = None,
) -> TableResult:
    """Extract what changed in one table since its watermark, then advance the watermark.

    ``now`` replaces the source's clock (naive UTC) in tests. Raises ``WatermarkConflict``
    when the compare-and-set loses; any exception leaves the watermark unchanged.
    """
    if batch_rows < 1:
        raise ValueError("batch_rows must be at least 1")
    started = time.monotonic()
    value, version = store.get(spec.source, spec.name)
    _check_kind(spec, value)
    with engine.connect() as conn:
        if spec.cursor.kind == "id":
            window = _extract_ids(conn, spec, lake, value, fence_token, batch_rows, progress)
        elif spec.replace_by is not None:
            window = _extract_groups(
                conn, spec, lake, value, fence_token, batch_rows, progress, now
            )
        else:
            window = _extract_timestamps(
                conn, spec, lake, value, fence_token, batch_rows, progress, now
            )
    if not lake.exists(spec.source, spec.name):
        # An empty source table still gets an (empty) file so readers know its columns.
        lake.append_upsert(spec, _empty(spec), token=fence_token)
    rows_total = lake.row_count(spec.source, spec.name)
    # Only now is every row of the window durable in the lake: the watermark may move.
    if not store.compare_and_set(
        spec.source, spec.name, version, window.value, fence_token, rows_total
    ):
        raise WatermarkConflict(
            f"{spec.key}: watermark compare-and-set lost (expected version {version}, token "
            f"{fence_token}); another extraction moved it or holds a newer lock token. This run's "
            "rows are in the lake but its watermark was not advanced."
        )
    result = TableResult(
        source=spec.source,
        table=spec.name,
        rows_read=window.rows_read,
        rows_written=window.rows_read,
        batches=window.batches,
        watermark_from=value,
        watermark_to=window.value,
        upper_bound=window.upper_bound,
        rows_total=rows_total,
        seconds=time.monotonic() - started,
    )
    logger.info(
        "extracted %s: %d rows in %d batches, watermark %s -> %s",
        spec.key,
        result.rows_read,
        result.batches,
        value,
        window.value,
    )
    return result


def reconcile_deletes(
    engine: sa.Engine,
    spec: TableSpec,
    lake: Lake,
    *,
    fence_token: int,
    batch_rows: int = 50_000,
) -> int:
    """Tombstone lake rows whose key no longer exists at the source; return how many."""
    if not lake.exists(spec.source, spec.name):
        return 0
    pk = list(spec.primary_key)
    pk_types = {c: spec.columns[c] for c in pk}
    # The lake is read BEFORE the source: a key in the lake then absent from the source was
    # deleted there. The other order could tombstone a row inserted and extracted in between.
    lake_keys = lake.keys(spec.source, spec.name)
    with engine.connect() as conn:
        pages = [
            rows_to_arrow(rows, pk, pk_types)
            for rows in _keyset_pages(conn, spec, pk, pk, [], {}, batch_rows)
        ]
    source_keys = to_frame(
        pa.concat_tables(pages) if pages else rows_to_arrow([], pk, pk_types), pk_types
    )
    joined = lake_keys.merge(source_keys, on=pk, how="left", indicator=True)
    gone = joined.loc[joined["_merge"] == "left_only", pk]
    if gone.empty:
        return 0
    lake.append_tombstones(spec, gone, token=fence_token)
    logger.info("reconciled %s: %d rows deleted at the source", spec.key, len(gone))
    return len(gone)


def extract_source(
    engine: sa.Engine,
    source: SourceSpec,
    lake: Lake,
    store: WatermarkStore,
    locks: LockManager,
    *,
    holder: str,
    lock_ttl_seconds: int = 3600,
    batch_rows: int = 50_000,
    tables: Sequence[str] | None = None,
    reconcile: bool = False,
    compact_after_files: int | None = 64,
    progress: Progress | None = None,
    now: dt.datetime | None = None,
) -> SourceResult:
    """Extract the tables of one source under its lock.

    Raises ``ExtractionAlreadyRunning`` if another run holds the lock. A failing table does
    not stop the others, with two exceptions: a lost lock (every later write would be refused)
    and a source that cannot be connected to (its remaining tables are recorded as failed with
    the same error instead of each waiting out the connect timeout). Once all have run and the
    lock is released, ``SourceExtractionFailed`` is raised carrying the ``SourceResult`` with
    both the successes and the failures. ``reconcile`` also tombstones deleted rows of tables
    with ``deletes: reconcile``.
    """
    name = lock_name(source.name)
    token = locks.acquire(name, holder, lock_ttl_seconds)
    if token is None:
        raise ExtractionAlreadyRunning(
            f"extraction of source {source.name!r} is already running (lock {name!r} is held); "
            "it was not started again"
        )
    results: list[TableResult] = []
    failures: list[TableFailure] = []
    names = list(tables) if tables is not None else list(source.tables)
    try:
        for position, table_name in enumerate(names):
            spec = source.tables[table_name]
            try:
                result = extract_table(
                    engine,
                    spec,
                    lake,
                    store,
                    fence_token=token,
                    batch_rows=batch_rows,
                    progress=progress,
                    now=now,
                )
                if reconcile and spec.deletes == "reconcile":
                    deleted = reconcile_deletes(
                        engine, spec, lake, fence_token=token, batch_rows=batch_rows
                    )
                    result = replace(
                        result,
                        rows_deleted=deleted,
                        rows_total=result.rows_total - deleted,
                        reconciled=True,
                    )
                if (
                    compact_after_files is not None
                    and lake.file_count(spec.source, spec.name) > compact_after_files
                ):
                    lake.compact(spec.source, spec.name, token=token)
                results.append(result)
            except Exception as exc:
                logger.exception("extraction of %s failed", spec.key)
                failures.append(
                    TableFailure(
                        source=spec.source,
                        table=spec.name,
                        error_type=type(exc).__name__,
                        error=str(exc),
                        watermark=store.get(spec.source, spec.name)[0],
                    )
                )
                if isinstance(exc, (StaleFenceToken, WatermarkConflict)):
                    break  # the lease was lost: every later write would be refused too
                if is_connect_failure(exc):
                    # The source cannot be reached at all: each remaining table would wait
                    # out the same connect timeout and fail the same way. Record them as
                    # failed with the same error (so the stage is classified as this one
                    # is) and let the stage retry them all together.
                    failures.extend(
                        _not_attempted(source.tables[rest], exc, store)
                        for rest in names[position + 1 :]
                    )
                    break
    finally:
        locks.release(name, token)
    outcome = SourceResult(
        source=source.name, token=token, tables=tuple(results), failures=tuple(failures)
    )
    if failures:
        raise SourceExtractionFailed(outcome)
    return outcome


def naive_extract_table(
    engine: sa.Engine,
    spec: TableSpec,
    lake: Lake,
    store: WatermarkStore,
    *,
    fence_token: int = 0,
    batch_rows: int = 50_000,
) -> TableResult:
    """The classic ``cursor > watermark`` extractor. A CONTROL FOR TESTS ONLY: it loses rows.

    No upper bound, no lookback, pages on the cursor alone, watermark = max cursor seen.
    The correctness tests run it on the same workload and require it to lose rows, which
    proves the workload exercises the hazards the real extractor survives.
    """
    started = time.monotonic()
    value, version = store.get(spec.source, spec.name)
    last = value["ts"] if value else None
    column = spec.cursor.column
    columns = list(spec.columns)
    position = columns.index(column)
    read = batches = 0
    with engine.connect() as conn:
        q = conn.dialect.identifier_preparer.quote
        select = f"SELECT {', '.join(q(c) for c in columns)} FROM {q(spec.physical)}"
        while True:
            where = f" WHERE {q(column)} > :last" if last is not None else ""
            sql = f"{select}{where} ORDER BY {q(column)} LIMIT {batch_rows}"
            rows = conn.execute(sa.text(sql), {"last": last}).fetchall()
            conn.rollback()
            if rows:
                lake.append_upsert(
                    spec, rows_to_arrow(rows, columns, spec.columns), token=fence_token
                )
                read += len(rows)
                batches += 1
                last = _json_scalar(rows[-1][position])
            if len(rows) < batch_rows:
                break
    new_value = {"kind": "naive", "ts": last} if last is not None else None
    if not store.compare_and_set(spec.source, spec.name, version, new_value, fence_token, read):
        raise WatermarkConflict(f"{spec.key}: naive watermark compare-and-set lost")
    return TableResult(
        source=spec.source,
        table=spec.name,
        rows_read=read,
        rows_written=read,
        batches=batches,
        watermark_from=value,
        watermark_to=new_value,
        upper_bound="",
        rows_total=read,
        seconds=time.monotonic() - started,
    )


# --- in-memory implementations (tests, benchmarks, one-off scripts) ------------------------


class InMemoryWatermarkStore:
    """A thread-safe ``WatermarkStore`` in a dict, with the same CAS rules as the database."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], tuple[WatermarkValue | None, int, int, int]] = {}
        self._lock = threading.Lock()

    def get(self, source: str, table: str) -> tuple[WatermarkValue | None, int]:
        """See ``WatermarkStore.get``."""
        with self._lock:
            value, version, _, _ = self._rows.get((source, table), (None, 0, 0, 0))
            return copy.deepcopy(value), version

    def compare_and_set(
        self,
        source: str,
        table: str,
        expected_version: int,
        new_value: WatermarkValue | None,
        fence_token: int,
        rows_total: int,
    ) -> bool:
        """See ``WatermarkStore.compare_and_set``."""
        with self._lock:
            _, version, fence, _ = self._rows.get((source, table), (None, 0, 0, 0))
            if version != expected_version or fence > fence_token:
                return False
            self._rows[(source, table)] = (
                copy.deepcopy(new_value),
                version + 1,
                fence_token,
                rows_total,
            )
            return True

    def rows_total(self, source: str, table: str) -> int:
        """The row count recorded by the last successful run."""
        with self._lock:
            return self._rows.get((source, table), (None, 0, 0, 0))[3]


@dataclass
class _Lease:
    holder: str = ""
    token: int = 0
    expires_at: float = 0.0


@dataclass
class InMemoryLockManager:
    """A thread-safe ``LockManager`` for one process; ``clock`` is injectable for tests."""

    clock: Callable[[], float] = time.monotonic
    _leases: dict[str, _Lease] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self, name: str, holder: str, ttl_seconds: int) -> int | None:
        """See ``LockManager.acquire``."""
        with self._lock:
            lease = self._leases.setdefault(name, _Lease())
            now = self.clock()
            if lease.holder and lease.expires_at > now:
                return None
            lease.holder, lease.token, lease.expires_at = holder, lease.token + 1, now + ttl_seconds
            return lease.token

    def release(self, name: str, token: int) -> None:
        """See ``LockManager.release``."""
        with self._lock:
            lease = self._leases.get(name)
            if lease is not None and lease.token == token:
                lease.holder, lease.expires_at = "", 0.0


# --- reading windows ----------------------------------------------------------------------


def _extract_timestamps(
    conn: sa.Connection,
    spec: TableSpec,
    lake: Lake,
    value: WatermarkValue | None,
    token: int,
    batch_rows: int,
    progress: Progress | None,
    now: dt.datetime | None,
) -> _Window:
    where, params, new_value, upper = _timestamp_window(conn, spec, value, now)
    columns = list(spec.columns)
    sort = list(dict.fromkeys([spec.cursor.column, *spec.primary_key]))
    read = batches = 0
    for rows in _keyset_pages(conn, spec, columns, sort, where, params, batch_rows):
        lake.append_upsert(spec, rows_to_arrow(rows, columns, spec.columns), token=token)
        read += len(rows)
        batches += 1
        if progress is not None:
            progress(len(rows))
    return _Window(read, batches, new_value, upper.isoformat())


def _extract_groups(
    conn: sa.Connection,
    spec: TableSpec,
    lake: Lake,
    value: WatermarkValue | None,
    token: int,
    batch_rows: int,
    progress: Progress | None,
    now: dt.datetime | None,
) -> _Window:
    assert spec.replace_by is not None
    where, params, new_value, upper = _timestamp_window(conn, spec, value, now)
    q = conn.dialect.identifier_preparer.quote
    group = q(spec.replace_by)
    touched = conn.execute(
        sa.text(f"SELECT DISTINCT {group} FROM {q(spec.physical)} WHERE {' AND '.join(where)}"),
        params,
    ).scalars()
    groups = sorted(g for g in touched if g is not None)
    conn.rollback()
    columns = list(spec.columns)
    # The whole group, whatever its rows' cursor values: the lake replaces it as a unit.
    select = sa.text(
        f"SELECT {', '.join(q(c) for c in columns)} FROM {q(spec.physical)} WHERE {group} IN :groups"
    ).bindparams(sa.bindparam("groups", expanding=True))
    read = batches = 0
    pending_rows: list[Sequence[Any]] = []
    pending_groups: list[Any] = []
    for start in range(0, len(groups), GROUP_CHUNK):
        chunk = groups[start : start + GROUP_CHUNK]
        # One statement per chunk: each group's rows come from one consistent snapshot.
        pending_rows.extend(conn.execute(select, {"groups": chunk}).fetchall())
        conn.rollback()
        pending_groups.extend(chunk)
        last_chunk = start + GROUP_CHUNK >= len(groups)
        if len(pending_rows) >= batch_rows or last_chunk:
            table = rows_to_arrow(pending_rows, columns, spec.columns)
            lake.append_replace(spec, table, pending_groups, token=token)
            read += len(pending_rows)
            batches += 1
            if progress is not None:
                progress(len(pending_rows))
            pending_rows, pending_groups = [], []
    return _Window(read, batches, new_value, upper.isoformat())


def _extract_ids(
    conn: sa.Connection,
    spec: TableSpec,
    lake: Lake,
    value: WatermarkValue | None,
    token: int,
    batch_rows: int,
    progress: Progress | None,
) -> _Window:
    q = conn.dialect.identifier_preparer.quote
    column = spec.cursor.column
    upper = conn.execute(sa.text(f"SELECT MAX({q(column)}) FROM {q(spec.physical)}")).scalar()
    conn.rollback()
    previous: int | None = value["id"] if value else None
    if upper is None:
        return _Window(0, 0, value or {"kind": "id", "id": None}, "")
    where = [f"{q(column)} <= :hi"]
    params: dict[str, Any] = {"hi": upper}
    if previous is not None:
        # Ids are allocated before commit: re-read the last lookback_rows ids, which may
        # have committed after a larger id was extracted.
        where.append(f"{q(column)} > :lo")
        params["lo"] = previous - spec.cursor.lookback_rows
    columns = list(spec.columns)
    sort = list(dict.fromkeys([column, *spec.primary_key]))
    position = columns.index(column)
    highest = previous
    read = batches = 0
    for rows in _keyset_pages(conn, spec, columns, sort, where, params, batch_rows):
        lake.append_upsert(spec, rows_to_arrow(rows, columns, spec.columns), token=token)
        last_id = int(rows[-1][position])
        highest = last_id if highest is None else max(highest, last_id)
        read += len(rows)
        batches += 1
        if progress is not None:
            progress(len(rows))
    # The largest id actually read: every committed row at or below it was visible to this
    # run and read (ids still uncommitted are covered by the next run's lookback).
    return _Window(read, batches, {"kind": "id", "id": highest}, str(upper))


def _timestamp_window(
    conn: sa.Connection,
    spec: TableSpec,
    value: WatermarkValue | None,
    now: dt.datetime | None,
) -> tuple[list[str], dict[str, Any], WatermarkValue, dt.datetime]:
    """WHERE clauses and parameters for ``lower <= cursor <= upper``, and the next watermark.

    The next watermark is ``upper`` (source NOW() - lag), not the largest cursor value read.
    The watermark means "every row with cursor <= W that had committed when it was read is in
    the lake"; ``upper`` is exactly the bound the window proved complete, so it is the strongest
    claim that is true. It is taken from the source's clock, never the extractor's, so host
    clock skew cannot move it. Safety then rests on one assumption, the same for both choices:
    a row becomes visible at most ``lag + lookback`` seconds after its cursor value (a
    transaction that sets ``updated_at = NOW()`` commits within that time; a writer's clock is
    behind by less). The next run starts at ``upper - lookback``, so such a row is either
    visible now (and read, since it is <= upper) or has a cursor >= the next lower bound.
    The max cursor read is never larger than ``upper`` and adds no safety (it only re-reads
    more after a quiet period); and it never advances on an idle table, so the window of
    such a table would grow without bound.
    """
    q = conn.dialect.identifier_preparer.quote
    column = q(spec.cursor.column)
    current = now if now is not None else source_now(conn)
    conn.rollback()
    # Whole seconds: stored DATETIMEs compare correctly against them on every backend (SQLite
    # compares text, and '... 10:00:00' sorts before '... 10:00:00.000000').
    upper = _floor_second(current - dt.timedelta(seconds=spec.cursor.lag_seconds))
    where = [f"{column} <= :hi"]
    params: dict[str, Any] = {"hi": _sql_ts(upper)}
    previous = dt.datetime.fromisoformat(value["ts"]) if value else None
    if previous is not None:
        lower = _floor_second(previous - dt.timedelta(seconds=spec.cursor.lookback_seconds))
        where.append(f"{column} >= :lo")
        params["lo"] = _sql_ts(lower)
    # Never move backwards if the source clock stepped back: `previous` was proven complete.
    watermark = max(upper, previous) if previous is not None else upper
    return where, params, {"kind": "timestamp", "ts": watermark.isoformat()}, upper


def _keyset_pages(
    conn: sa.Connection,
    spec: TableSpec,
    columns: Sequence[str],
    sort: Sequence[str],
    where: Sequence[str],
    params: Mapping[str, Any],
    batch_rows: int,
) -> Iterator[list[Sequence[Any]]]:
    """Pages of ``columns`` ordered by ``sort`` (unique), resuming after the last row's key.

    The next page starts strictly after ``(c0, c1, ...)`` of the previous page's last row, so
    rows that tie on the cursor are split by the primary key and none is skipped. Each page is
    its own transaction: no long-lived snapshot holds back the source's purge.
    """
    q = conn.dialect.identifier_preparer.quote
    quoted = [q(c) for c in sort]
    positions = [list(columns).index(c) for c in sort]
    select = f"SELECT {', '.join(q(c) for c in columns)} FROM {q(spec.physical)}"
    order = ", ".join(quoted)
    key: tuple[Any, ...] | None = None
    while True:
        clauses = list(where)
        bound = dict(params)
        if key is not None:
            # The leading `c0 >= :k0` lets the database seek an index on (c0, ...).
            clauses.append(f"{quoted[0]} >= :k0 AND {_strictly_after(quoted, 0)}")
            bound.update({f"k{i}": v for i, v in enumerate(key)})
        sql = select
        if clauses:
            sql += " WHERE " + " AND ".join(f"({c})" for c in clauses)
        sql += f" ORDER BY {order} LIMIT {int(batch_rows)}"
        rows = conn.execute(sa.text(sql), bound).fetchall()
        conn.rollback()
        if rows:
            yield rows
        if len(rows) < batch_rows:
            return
        # The driver's own values (datetime, or text on SQLite) compare exactly like stored ones.
        key = tuple(rows[-1][p] for p in positions)


def _strictly_after(quoted: Sequence[str], i: int) -> str:
    """``(c_i, ..., c_n) > (:k_i, ..., :k_n)`` written without row values, for portability."""
    if i == len(quoted) - 1:
        return f"{quoted[i]} > :k{i}"
    return f"({quoted[i]} > :k{i} OR ({quoted[i]} = :k{i} AND {_strictly_after(quoted, i + 1)}))"


# --- helpers ------------------------------------------------------------------------------


def _check_kind(spec: TableSpec, value: WatermarkValue | None) -> None:
    if value is not None and value.get("kind") != spec.cursor.kind:
        raise ExtractionError(
            f"{spec.key}: the stored watermark {value!r} is not a {spec.cursor.kind!r} cursor "
            "(the contract's cursor changed?); reset this table's watermark to re-extract it"
        )


def _not_attempted(spec: TableSpec, cause: Exception, store: WatermarkStore) -> TableFailure:
    return TableFailure(
        source=spec.source,
        table=spec.name,
        error_type=type(cause).__name__,
        error=f"not attempted, the source could not be reached: {cause}",
        watermark=store.get(spec.source, spec.name)[0],
    )


def _empty(spec: TableSpec) -> pa.Table:
    return rows_to_arrow([], list(spec.columns), spec.columns)


def _floor_second(value: dt.datetime) -> dt.datetime:
    return value.replace(microsecond=0)


def _sql_ts(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _json_scalar(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat(sep=" ")
    return value
