"""The bundle's read-only SQLite fallback store (written by `trainer._write_local_store`).

Tables: user_recs(user_id, items JSON [[item_id, score, channel], ...]) with final ranked
lists; similar_items(item_id, channel_items JSON {"channel": ..., "items": [[id, score], ...]}),
one row per channel; popular(rank, item_id, score); user_candidates(user_id, channel, items
BLOB) with each channel's recall list (read by `publish` for Redis, not on the request path).

Opened read-only (`mode=ro`) with a 30 ms busy timeout instead of sqlite3's 5 s default: a file
locked by a writer must fail the request over to the popular list, not stall it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from apps.serving.engine.breaker import BreakerOpen, CircuitBreaker
from apps.serving.engine.sources import StoreUnavailable, Unavailable

DEFAULT_BUSY_TIMEOUT_MS = 30

T = TypeVar("T")


class LocalStore:
    """Thread-safe reads of one bundle's store.sqlite3: one connection per thread.

    Any failure (missing, unreadable, corrupt, locked file; a malformed row; an open
    `breaker`) raises `StoreUnavailable("local_store")`. Absent keys give empty results.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self.breaker = breaker
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()

    def user_recs(self, user_id: int) -> list[tuple[int, float, str]]:
        """The user's ranked list as (item_id, score, channel); empty for an unknown user."""
        rows = self._query("SELECT items FROM user_recs WHERE user_id = ?", (int(user_id),))
        if not rows:
            return []
        return self._parse(
            lambda: [(int(i), float(s), str(c)) for i, s, c in json.loads(rows[0][0])]
        )

    def similar(self, item_id: int) -> dict[str, list[tuple[int, float]]]:
        """Similar items for `item_id` by channel; empty for an unknown item."""
        rows = self._query(
            "SELECT channel_items FROM similar_items WHERE item_id = ?", (int(item_id),)
        )

        def parse() -> dict[str, list[tuple[int, float]]]:
            out: dict[str, list[tuple[int, float]]] = {}
            for (raw,) in rows:
                doc = json.loads(raw)
                out[str(doc["channel"])] = [(int(i), float(s)) for i, s in doc["items"]]
            return out

        return self._parse(parse)

    def popular(self, n: int) -> list[tuple[int, float]]:
        """The top `n` popular items in rank order."""
        rows = self._query(
            "SELECT item_id, score FROM popular ORDER BY rank LIMIT ?", (max(int(n), 0),)
        )
        return [(int(i), float(s)) for i, s in rows]

    def close(self) -> None:
        """Close every thread's connection (on bundle swap); later reads reopen."""
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    # -- internals -----------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        uri = f"file:{quote(str(self.path.resolve()))}?mode=ro"
        conn = sqlite3.connect(
            uri,
            uri=True,
            timeout=self.busy_timeout_ms / 1000,
            check_same_thread=False,  # only so close() may run from another thread
        )
        try:
            # Same value as timeout= above, stated explicitly so it survives a change of how
            # the connection is made.
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        except sqlite3.Error:
            conn.close()
            raise
        self._local.conn = conn
        with self._all_lock:
            self._all.append(conn)
        return conn

    def _drop(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is None:
            return
        with self._all_lock:
            if conn in self._all:
                self._all.remove(conn)
        conn.close()

    def _fetch(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        try:
            return self._connect().execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            # "locked"/"busy" is transient: keep the connection. Anything else (unopenable
            # file, schema gone) gets a fresh connection next time, e.g. after a file fix.
            if "locked" not in str(exc) and "busy" not in str(exc):
                self._drop()
            raise

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        try:
            if self.breaker is None:
                return self._fetch(sql, params)
            return self.breaker.call(self._fetch, sql, params)
        except BreakerOpen as exc:
            raise StoreUnavailable(Unavailable.LOCAL_STORE, "breaker open") from exc
        except sqlite3.Error as exc:
            if not isinstance(exc, sqlite3.OperationalError):
                self._drop()  # corrupt file ("file is not a database") and similar
            raise StoreUnavailable(Unavailable.LOCAL_STORE, str(exc)) from exc

    @staticmethod
    def _parse(fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreUnavailable(Unavailable.LOCAL_STORE, f"malformed row: {exc}") from exc
