"""The degradation chain (Redis -> local store -> popular) and the local SQLite store.

Unit tests drive the chain with plain callables; the end-to-end tests wire a private
redis-server and a real store.sqlite3 and break them (SIGSTOP, SIGKILL, a corrupt file, a
missing file, a writer holding an exclusive lock).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import redis

from apps.serving.engine.breaker import CircuitBreaker, State
from apps.serving.engine.degrade import Deadline, Outcome, recommend_with_fallback
from apps.serving.engine.local_store import LocalStore
from apps.serving.engine.redis_store import (
    RedisCandidateStore,
    make_serving_client,
    publish_bundle_lists,
)
from apps.serving.engine.sources import Reason, Source, StoreUnavailable, Unavailable

# sqlite3's default busy timeout is 5 s; anything under this bound proves it was not used.
LOCKED_BOUND_S = 2.0

POPULAR_ITEMS = [(1, 30.0), (2, 20.0), (3, 10.0)]


class Steps:
    """Records what the chain reports to the metrics layer."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, step: Source, outcome: str) -> None:
        self.seen.append((str(step), str(outcome)))


def raises(exc: BaseException):
    def fn():
        raise exc

    return fn


def write_store(path: Path) -> Path:
    """A store.sqlite3 with the schema `trainer._write_local_store` writes."""
    with sqlite3.connect(path) as conn:
        conn.executescript(
            "CREATE TABLE user_recs (user_id INTEGER PRIMARY KEY, items TEXT NOT NULL);"
            "CREATE TABLE similar_items (item_id INTEGER, channel_items TEXT NOT NULL);"
            "CREATE INDEX similar_items_item ON similar_items (item_id);"
            "CREATE TABLE popular (rank INTEGER PRIMARY KEY, item_id INTEGER NOT NULL,"
            " score REAL NOT NULL);"
        )
        conn.execute(
            "INSERT INTO user_recs VALUES (?, ?)",
            (7, json.dumps([[501, 0.9, "itemcf"], [502, 0.4, "vector"]])),
        )
        conn.executemany(
            "INSERT INTO similar_items VALUES (?, ?)",
            [
                (101, json.dumps({"channel": "itemcf", "items": [[102, 0.8], [103, 0.1]]})),
                (101, json.dumps({"channel": "content", "items": [[104, 0.7]]})),
            ],
        )
        conn.executemany(
            "INSERT INTO popular VALUES (?, ?, ?)",
            [(rank, i, s) for rank, (i, s) in enumerate(POPULAR_ITEMS, 1)],
        )
    conn.close()
    return path


@pytest.fixture
def store_file(tmp_path):
    return write_store(tmp_path / "store.sqlite3")


# -- the chain, with plain callables -----------------------------------------------------


def test_a_healthy_redis_answers_and_nothing_else_runs():
    steps = Steps()
    later = []
    outcome = recommend_with_fallback(
        lambda: ["r1"], lambda: later.append("local") or ["l1"], lambda: ["p1"], count=steps
    )
    items, source, reason = outcome
    assert (items, source, reason) == (["r1"], Source.REDIS, None)
    assert outcome.degraded is False
    assert later == []
    assert steps.seen == [("redis", "ok")]


@pytest.mark.parametrize(
    ("cause", "reason"),
    [
        (Unavailable.TIMEOUT, Reason.REDIS_TIMEOUT),
        (Unavailable.CONNECTION, Reason.REDIS_CONNECTION),
        (Unavailable.BREAKER_OPEN, Reason.BREAKER_OPEN),
    ],
)
def test_it_falls_back_to_the_local_store_when_redis_is_unavailable(cause, reason):
    steps = Steps()
    outcome = recommend_with_fallback(
        raises(StoreUnavailable(cause)), lambda: ["l1"], lambda: ["p1"], count=steps
    )
    assert tuple(outcome) == (["l1"], Source.LOCAL_STORE, reason)
    assert outcome.degraded is True
    assert steps.seen == [("redis", str(reason)), ("local_store", "ok")]


def test_it_falls_back_to_popular_when_redis_and_the_local_store_are_down():
    steps = Steps()
    outcome = recommend_with_fallback(
        raises(StoreUnavailable("timeout")),
        raises(StoreUnavailable("local_store")),
        lambda: ["p1"],
        count=steps,
    )
    # the reason is the root cause; the local store's failure is in the step counts
    assert tuple(outcome) == (["p1"], Source.POPULAR, Reason.REDIS_TIMEOUT)
    assert steps.seen == [
        ("redis", "redis_timeout"),
        ("local_store", "local_store_unavailable"),
        ("popular", "ok"),
    ]


def test_without_redis_the_local_store_is_the_normal_source():
    steps = Steps()
    outcome = recommend_with_fallback(None, lambda: ["l1"], lambda: ["p1"], count=steps)
    assert tuple(outcome) == (["l1"], Source.LOCAL_STORE, None)
    assert outcome.degraded is False
    assert steps.seen == [("local_store", "ok")]


def test_without_redis_a_broken_local_store_is_degraded_to_popular():
    outcome = recommend_with_fallback(None, raises(StoreUnavailable("local_store")), lambda: [1])
    assert tuple(outcome) == ([1], Source.POPULAR, Reason.LOCAL_STORE_UNAVAILABLE)
    assert outcome.degraded is True


def test_a_cold_start_user_gets_popular_marked_empty_but_not_degraded():
    steps = Steps()
    outcome = recommend_with_fallback(lambda: [], lambda: [], lambda: ["p1"], count=steps)
    assert tuple(outcome) == (["p1"], Source.POPULAR, Reason.EMPTY)
    assert outcome.degraded is False
    assert steps.seen == [("redis", "empty"), ("local_store", "empty"), ("popular", "ok")]


def test_a_failure_after_an_empty_answer_becomes_the_reason():
    outcome = recommend_with_fallback(
        lambda: [], raises(StoreUnavailable("local_store")), lambda: ["p1"]
    )
    assert outcome.reason is Reason.LOCAL_STORE_UNAVAILABLE
    assert outcome.degraded is True


def test_unexpected_errors_never_escape_the_chain():
    # given every step raising something that is not a StoreUnavailable
    outcome = recommend_with_fallback(
        raises(ValueError("corrupt value")), raises(RuntimeError("bug")), raises(KeyError("x"))
    )
    # then the caller still gets an answer, labelled
    assert tuple(outcome) == ([], Source.POPULAR, Reason.REDIS_ERROR)


def test_an_exhausted_budget_skips_straight_to_popular():
    # given a budget that runs out while Redis is being asked
    now = [0.0]
    deadline = Deadline.after(0.1, clock=lambda: now[0])
    local_calls = []

    def slow_redis():
        now[0] += 0.2
        raise StoreUnavailable("timeout")

    steps = Steps()
    outcome = recommend_with_fallback(
        slow_redis,
        lambda: local_calls.append(1) or ["l1"],
        lambda: ["p1"],
        deadline=deadline,
        count=steps,
    )
    # then the local store is never started, and popular answers
    assert local_calls == []
    assert tuple(outcome) == (["p1"], Source.POPULAR, Reason.REDIS_TIMEOUT)
    assert steps.seen == [
        ("redis", "redis_timeout"),
        ("local_store", "skipped_budget"),
        ("popular", "ok"),
    ]


def test_a_budget_spent_before_the_first_step_is_the_reason():
    now = [5.0]
    deadline = Deadline.after(0.0, clock=lambda: now[0])
    redis_calls = []
    outcome = recommend_with_fallback(
        lambda: redis_calls.append(1) or ["r1"], lambda: ["l1"], lambda: ["p1"], deadline=deadline
    )
    assert redis_calls == []
    assert tuple(outcome) == (["p1"], Source.POPULAR, Reason.BUDGET_EXHAUSTED)
    assert deadline.remaining() == 0.0


def test_outcome_values_are_plain_strings_for_responses_logs_and_metrics():
    outcome = Outcome(["x"], Source.LOCAL_STORE, Reason.BREAKER_OPEN)
    assert json.dumps({"source": outcome.source, "reason": outcome.reason}) == (
        '{"source": "local_store", "reason": "breaker_open"}'
    )


# -- the local store ---------------------------------------------------------------------


def test_the_local_store_reads_the_bundle_layout(store_file):
    store = LocalStore(store_file)
    assert store.user_recs(7) == [(501, 0.9, "itemcf"), (502, 0.4, "vector")]
    assert store.user_recs(8) == []
    assert store.similar(101) == {"itemcf": [(102, 0.8), (103, 0.1)], "content": [(104, 0.7)]}
    assert store.similar(999) == {}
    assert store.popular(2) == [(1, 30.0), (2, 20.0)]
    store.close()


def test_the_local_store_is_opened_read_only(store_file):
    store = LocalStore(store_file)
    store.popular(1)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store._connect().execute("DELETE FROM popular")
    store.close()


def test_the_local_store_serves_several_threads(store_file):
    store = LocalStore(store_file)
    results: list[object] = []
    start = threading.Barrier(4)

    def read() -> None:
        start.wait(timeout=5)
        for _ in range(50):
            results.append(store.user_recs(7)[0][0])

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [501] * 200
    assert len(store._all) == 4  # one connection per thread
    store.close()


@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated_json"])
def test_an_unreadable_local_store_raises_store_unavailable(tmp_path, damage):
    path = tmp_path / "store.sqlite3"
    if damage == "corrupt":
        path.write_bytes(b"this is not a database" * 100)
    elif damage == "truncated_json":
        write_store(path)
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE user_recs SET items = '[[501, 0.9' WHERE user_id = 7")
        conn.close()
    store = LocalStore(path)
    with pytest.raises(StoreUnavailable) as info:
        store.user_recs(7)
    assert info.value.reason is Unavailable.LOCAL_STORE
    store.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_local_store_without_read_permission_raises_store_unavailable(store_file):
    store_file.chmod(0)
    try:
        with pytest.raises(StoreUnavailable):
            LocalStore(store_file).popular(1)
    finally:
        store_file.chmod(0o644)


def test_a_locked_local_store_fails_fast_instead_of_waiting_five_seconds(store_file):
    # given another connection holding an exclusive lock on the file
    writer = sqlite3.connect(store_file, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        store = LocalStore(store_file)
        started = time.monotonic()
        # when the serving path reads it
        with pytest.raises(StoreUnavailable) as info:
            store.user_recs(7)
        elapsed = time.monotonic() - started
        # then it gives up after the short busy timeout, not sqlite3's default 5 s
        assert "locked" in str(info.value)
        assert elapsed < LOCKED_BOUND_S
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    # and once the writer is gone the same store reads again
    assert store.user_recs(7)[0][0] == 501
    store.close()


def test_a_local_store_breaker_stops_touching_a_locked_file(store_file):
    breaker = CircuitBreaker("local_store", failure_threshold=2, clock=lambda: 0.0)
    store = LocalStore(store_file, breaker=breaker)
    writer = sqlite3.connect(store_file, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        for _ in range(2):
            with pytest.raises(StoreUnavailable):
                store.popular(1)
        assert breaker.state is State.OPEN
        with pytest.raises(StoreUnavailable, match="breaker open"):
            store.popular(1)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        store.close()


# -- end to end: a private Redis, a real store file, real faults -------------------------


@pytest.fixture
def chain(private_redis, store_file):
    """A request function wired like the serving engine, plus the pieces to break."""
    admin = redis.Redis.from_url(private_redis.url)
    publish_bundle_lists(admin, "v1", {7: {"itemcf": [(101, 0.9)]}}, {}, POPULAR_ITEMS)
    admin.close()
    client = make_serving_client(private_redis.url, timeout_ms=50)
    breaker = CircuitBreaker("redis", failure_threshold=2, reset_timeout=60.0)
    redis_store = RedisCandidateStore(client, breaker, version="v1")
    local = LocalStore(store_file)
    steps = Steps()

    def recommend(user_id: int) -> Outcome:
        return recommend_with_fallback(
            lambda: [i for pairs in redis_store.get_user_lists(user_id, ["itemcf"]).values()
                     for i, _ in pairs],
            lambda: [i for i, _, _ in local.user_recs(user_id)],
            lambda: [i for i, _ in POPULAR_ITEMS],
            deadline=Deadline.after(5.0),
            count=steps,
        )  # fmt: skip

    yield recommend, private_redis, store_file, steps, breaker
    client.close()
    local.close()


def test_end_to_end_a_healthy_stack_answers_from_redis(chain):
    recommend, *_ = chain
    assert tuple(recommend(7)) == ([101], Source.REDIS, None)


def test_end_to_end_a_stopped_redis_falls_to_the_local_store_then_the_breaker_opens(chain):
    recommend, server, _, steps, breaker = chain
    server.stop()
    # the first two requests time out, then the breaker answers without waiting
    outcomes = [recommend(7) for _ in range(4)]
    assert [o.source for o in outcomes] == [Source.LOCAL_STORE] * 4
    assert [o.items for o in outcomes] == [[501, 502]] * 4
    assert [o.reason for o in outcomes] == [Reason.REDIS_TIMEOUT] * 2 + [Reason.BREAKER_OPEN] * 2
    assert breaker.state is State.OPEN
    assert steps.seen.count(("redis", "breaker_open")) == 2


def test_end_to_end_a_killed_redis_and_a_corrupt_store_fall_to_popular(chain):
    # given Redis killed and the local store file overwritten with garbage
    recommend, server, store_file, steps, _ = chain
    server.kill()
    store_file.write_bytes(b"\x00garbage" * 512)
    # when a request is served: then no exception escapes and popular answers
    outcome = recommend(7)
    assert tuple(outcome) == ([1, 2, 3], Source.POPULAR, Reason.REDIS_CONNECTION)
    assert steps.seen == [
        ("redis", "redis_connection"),
        ("local_store", "local_store_unavailable"),
        ("popular", "ok"),
    ]


def test_end_to_end_a_stopped_redis_and_a_locked_store_answer_from_popular_quickly(chain):
    recommend, server, store_file, steps, _ = chain
    server.stop()
    writer = sqlite3.connect(store_file, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        outcome = recommend(7)
        elapsed = time.monotonic() - started
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert tuple(outcome) == ([1, 2, 3], Source.POPULAR, Reason.REDIS_TIMEOUT)
    assert ("local_store", "local_store_unavailable") in steps.seen
    # a 50 ms Redis timeout plus a 30 ms busy timeout: nowhere near 5 s + 5 s
    assert elapsed < LOCKED_BOUND_S


def test_an_empty_redis_answer_the_local_store_can_give_is_degraded_as_missing_data():
    # Redis came back empty (restarted without data): it answers "nothing" for a user the
    # bundle knows, and the bundle's local store does have the list.
    steps = Steps()
    outcome = recommend_with_fallback(lambda: [], lambda: ["l1"], lambda: ["p1"], count=steps)
    assert tuple(outcome) == (["l1"], Source.LOCAL_STORE, Reason.REDIS_MISSING)
    assert outcome.degraded is True
    assert steps.seen == [("redis", "empty"), ("local_store", "ok")]
    # without Redis configured the same local answer is the normal one
    assert recommend_with_fallback(None, lambda: ["l1"], lambda: ["p1"]).degraded is False
