"""Scenario 3: the whole fallback chain. Redis is down AND the bundle's store.sqlite3 cannot be
read, so answers must come from the in-memory popular list, with no 5xx, and SQLite's 5 s
default busy timeout must not reach the request path.

The local store is made unreadable the realistic way: another process holds an exclusive lock
on it (`BEGIN EXCLUSIVE`, as a writer would; chmod does not stop root). The store is opened
read-only with a 30 ms busy timeout, behind its own circuit breaker.

Controls: (1) while the lock is held, a fresh read-only connection from the test is refused
("database is locked"), so the fault is real; the answers move to the popular list only
inside the lock window. (2) The same timeline with the breakers disabled (and shedding off,
so that the queue shows as latency): every request then waits out the 30 ms busy timeout, two
sync workers fall below the offered rate, and p99 grows by an order of magnitude.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.reliability.serving_fixtures import (
    SOURCE,
    STATUS,
    DemoSite,
    RedisProcess,
    phases,
    run_load,
    running_server,
    summarize,
    write_result,
)

pytestmark = pytest.mark.slow

RATE = 100.0
RESET_S = 2.0
# The control isolates the breakers: shedding is off too, or it would turn the queue they
# prevent into 503s instead of latency.
DISABLED_BREAKER = {"RECO_SERVING_BREAKER_FAILURES": "1000000000", "RECO_SHED_ENABLED": "0"}


class StoreLock:
    """An exclusive lock on a SQLite file, held by this (test) process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None
        self.probes: list[str] = []

    def acquire(self) -> None:
        self.conn = sqlite3.connect(self.path, timeout=5, isolation_level=None)
        self.conn.execute("BEGIN EXCLUSIVE")

    def probe(self) -> None:
        """Read the file as serving does (read-only, short busy timeout); note the outcome."""
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=0.1)
        try:
            conn.execute("SELECT COUNT(*) FROM popular").fetchone()
            self.probes.append("readable")
        except sqlite3.OperationalError as exc:
            self.probes.append(str(exc))
        finally:
            conn.close()

    def release(self) -> None:
        if self.conn is not None:
            self.conn.execute("ROLLBACK")
            self.conn.close()
            self.conn = None


def _run(
    site: DemoSite,
    redis: RedisProcess,
    workdir: Path,
    settings: dict[str, str],
    *,
    kill_at: float,
    lock_at: float,
    unlock_at: float,
    duration: float,
) -> dict:
    lock = StoreLock(site.bundles[site.primary] / "store.sqlite3")
    redis.restart()  # the previous run killed it; its data is gone (no persistence)
    site.publish(redis.url)
    try:
        with running_server(site, workdir, redis.url, settings=settings) as server:
            run = run_load(
                server,
                site.for_you_paths(),
                rate=RATE,
                duration=duration,
                timeline=[
                    (kill_at, "redis_killed", redis.kill),
                    (lock_at, "store_locked", lock.acquire),
                    ((lock_at + unlock_at) / 2, "lock_probed", lock.probe),
                    (unlock_at, "store_unlocked", lock.release),
                ],
            )
            workers_alive = len(server.worker_pids())
    finally:
        lock.release()
    ev = run.events
    locked = run.window(ev["store_locked"] + 0.3, ev["store_unlocked"])
    return {
        "events_s": ev,
        "lock_probe_from_another_connection": lock.probes,
        "whole_run": summarize(run.samples),
        "phases": phases(
            run,
            [
                ("redis_up", 0.0, ev["redis_killed"]),
                # Ends 0.1 s before the lock: a request scheduled just before it may be read
                # after it (latency counts from the scheduled time), a boundary, not a fault.
                ("redis_down", ev["redis_killed"] + 0.3, ev["store_locked"] - 0.1),
                ("redis_down_store_locked", ev["store_locked"] + 0.3, ev["store_unlocked"]),
                ("store_unlocked_after_reset", ev["store_unlocked"] + RESET_S + 1.0, duration),
            ],
        ),
        "popular_share_while_locked": round(
            sum(1 for s in locked if s[STATUS] == 200 and s[SOURCE] == "popular")
            / max(1, len(locked)),
            4,
        ),
        "workers_alive_at_end": workers_alive,
    }


def test_redis_down_and_a_locked_local_store_fall_back_to_the_popular_list(
    demo_site: DemoSite, redis_server: RedisProcess, tmp_path: Path
) -> None:
    # Given the server on a published Redis; when Redis is killed at 2 s and the bundle's
    # store.sqlite3 is exclusively locked by another connection from 5 s to 10 s
    chain = _run(
        demo_site,
        redis_server,
        tmp_path / "chain",
        {},
        kill_at=2.0,
        lock_at=5.0,
        unlock_at=10.0,
        duration=14.0,
    )
    # and the control: the same with the breakers disabled (shorter: it only has to show p99)
    control = _run(
        demo_site,
        redis_server,
        tmp_path / "control",
        DISABLED_BREAKER,
        kill_at=1.0,
        lock_at=3.0,
        unlock_at=7.0,
        duration=9.0,
    )
    report = {
        "what": "Redis SIGKILLed, then the bundle's store.sqlite3 held under BEGIN EXCLUSIVE",
        "rate_rps": RATE,
        "workers": 2,
        "local_store_busy_timeout_ms": 30,
        "sqlite_default_busy_timeout_ms": 5000,
        "breaker": {"failure_threshold": 3, "reset_s": RESET_S},
        "with_breakers": chain,
        "control_breakers_disabled": control,
    }
    write_result("s3_whole_fallback_chain", report)
    locked = chain["phases"]["redis_down_store_locked"]
    # Then the lock was real: another reader was refused while it was held
    assert chain["lock_probe_from_another_connection"] == ["database is locked"]
    # and every answer under the lock came from the in-memory popular list, degraded
    assert chain["popular_share_while_locked"] == 1.0
    assert locked["degraded_share"] == 1.0
    # with no 5xx, no client timeout, and p99 far below SQLite's 5 s default busy timeout
    whole = chain["whole_run"]
    assert whole["http_5xx"] == 0
    assert whole["client_timeouts"] == 0
    assert whole["connection_errors"] == 0
    assert locked["p99_ms"] < 200
    # and the popular list appeared only under the lock: before it the local store answered,
    # and after it was released the local store answered again
    assert chain["phases"]["redis_down"]["sources"] == {
        "local_store": chain["phases"]["redis_down"]["http_200"]
    }
    after = chain["phases"]["store_unlocked_after_reset"]
    assert after["sources"] == {"local_store": after["http_200"]}
    assert chain["workers_alive_at_end"] == 2
    # The control: without the breakers every request pays the busy timeout and p99 explodes
    control_locked = control["phases"]["redis_down_store_locked"]
    assert control["lock_probe_from_another_connection"] == ["database is locked"]
    assert control_locked["p99_ms"] >= 10 * locked["p99_ms"]
