"""The circuit breaker: states, the single half-open probe, what counts, and concurrency.

Time is an injected fake clock; no test sleeps to move the breaker.
"""

from __future__ import annotations

import sqlite3
import threading

import pytest
import redis.exceptions

from apps.serving.engine.breaker import BreakerOpen, CircuitBreaker, State


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def failing(exc: BaseException):
    def fn() -> None:
        raise exc

    return fn


def make(threshold: int = 3, reset: float = 2.0, **kwargs) -> tuple[CircuitBreaker, FakeClock]:
    clock = FakeClock()
    return CircuitBreaker("redis", threshold, reset, clock, **kwargs), clock


def open_it(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failure_threshold):
        with pytest.raises(redis.exceptions.TimeoutError):
            breaker.call(failing(redis.exceptions.TimeoutError("slow")))


def test_it_stays_closed_below_the_threshold_and_opens_at_it():
    # given a breaker that opens after 3 consecutive failures
    breaker, _ = make(threshold=3)
    # when two calls fail
    for _ in range(2):
        with pytest.raises(redis.exceptions.ConnectionError):
            breaker.call(failing(redis.exceptions.ConnectionError("refused")))
    # then it is still closed, and the third failure opens it
    assert breaker.state is State.CLOSED
    with pytest.raises(OSError, match="reset"):
        breaker.call(failing(OSError("reset")))
    assert breaker.state is State.OPEN
    assert breaker.transitions == {"closed->open": 1}


def test_a_success_resets_the_consecutive_failure_count():
    breaker, _ = make(threshold=3)
    for _ in range(2):
        with pytest.raises(redis.exceptions.TimeoutError):
            breaker.call(failing(redis.exceptions.TimeoutError()))
    assert breaker.call(lambda: "ok") == "ok"
    for _ in range(2):
        with pytest.raises(redis.exceptions.TimeoutError):
            breaker.call(failing(redis.exceptions.TimeoutError()))
    # four failures in all, but never three in a row
    assert breaker.state is State.CLOSED


def test_an_open_breaker_refuses_without_calling_the_function():
    # given an open breaker
    breaker, clock = make()
    open_it(breaker)
    calls = []
    # when callers arrive before the reset timeout
    clock.advance(1.9)
    for _ in range(5):
        with pytest.raises(BreakerOpen):
            breaker.call(calls.append, 1)
    # then the dependency was never touched
    assert calls == []
    assert breaker.allow() is False


def test_after_the_reset_timeout_exactly_one_caller_gets_the_probe():
    breaker, clock = make()
    open_it(breaker)
    clock.advance(2.0)
    # the first caller gets the probe, everyone else is still refused
    assert breaker.allow() is True
    assert breaker.state is State.HALF_OPEN
    assert [breaker.allow() for _ in range(10)] == [False] * 10


def test_concurrent_callers_after_the_reset_timeout_get_one_probe_between_them():
    # given an open breaker whose reset timeout has passed
    breaker, clock = make()
    open_it(breaker)
    clock.advance(5)
    start = threading.Barrier(8)
    answers: list[bool] = []
    lock = threading.Lock()

    def race() -> None:
        start.wait(timeout=5)
        granted = breaker.allow()
        with lock:
            answers.append(granted)

    # when 8 threads ask at once
    threads = [threading.Thread(target=race) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # then exactly one of them may probe
    assert sorted(answers) == [False] * 7 + [True]


def test_a_successful_probe_closes_the_breaker():
    transitions = []
    breaker, clock = make(on_transition=lambda name, old, new: transitions.append((name, old, new)))
    open_it(breaker)
    clock.advance(2)
    assert breaker.call(lambda: 42) == 42
    assert breaker.state is State.CLOSED
    assert breaker.failures == 0
    assert breaker.transitions == {"closed->open": 1, "open->half_open": 1, "half_open->closed": 1}
    assert transitions == [
        ("redis", State.CLOSED, State.OPEN),
        ("redis", State.OPEN, State.HALF_OPEN),
        ("redis", State.HALF_OPEN, State.CLOSED),
    ]


def test_a_failed_probe_reopens_for_a_full_reset_timeout():
    breaker, clock = make()
    open_it(breaker)
    clock.advance(2)
    with pytest.raises(redis.exceptions.TimeoutError):
        breaker.call(failing(redis.exceptions.TimeoutError()))
    assert breaker.state is State.OPEN
    # the open period restarts from the failed probe
    clock.advance(1.5)
    assert breaker.allow() is False
    clock.advance(0.5)
    assert breaker.allow() is True
    assert breaker.transitions["half_open->open"] == 1


def test_errors_outside_the_counted_tuple_pass_through_uncounted():
    # given a breaker with a threshold of 1
    breaker, _ = make(threshold=1)
    # when the dependency answers with "key missing" or a bad-argument error
    for exc in (KeyError("user:1"), redis.exceptions.ResponseError("WRONGTYPE"), ValueError()):
        with pytest.raises(type(exc)):
            breaker.call(failing(exc))
    # then the circuit is still closed
    assert breaker.state is State.CLOSED
    assert breaker.failures == 0


def test_sqlite_operational_errors_are_counted_by_default():
    breaker, _ = make(threshold=1)
    with pytest.raises(sqlite3.OperationalError):
        breaker.call(failing(sqlite3.OperationalError("database is locked")))
    assert breaker.state is State.OPEN


def test_the_counted_tuple_is_configurable():
    breaker, _ = make(threshold=1, counted=(LookupError,))
    with pytest.raises(redis.exceptions.TimeoutError):
        breaker.call(failing(redis.exceptions.TimeoutError()))
    assert breaker.state is State.CLOSED
    with pytest.raises(KeyError):
        breaker.call(failing(KeyError("x")))
    assert breaker.state is State.OPEN


def test_an_uncounted_error_from_the_probe_frees_the_probe_slot():
    # given a half-open breaker whose probe ended with an uncounted error
    breaker, clock = make()
    open_it(breaker)
    clock.advance(2)
    with pytest.raises(KeyError):
        breaker.call(failing(KeyError("missing")))
    # then it is still half-open, and the next caller may probe (no stuck breaker)
    assert breaker.state is State.HALF_OPEN
    assert breaker.allow() is True


def test_a_probe_that_never_reports_is_presumed_lost_after_the_reset_timeout():
    breaker, clock = make()
    open_it(breaker)
    clock.advance(2)
    assert breaker.allow() is True  # the holder never calls record_*
    clock.advance(1)
    assert breaker.allow() is False
    clock.advance(1)
    assert breaker.allow() is True


def test_the_lock_is_not_held_while_the_protected_call_runs():
    # given a closed breaker and a function that cannot finish until 8 calls are inside it
    breaker, _ = make()
    inside = threading.Barrier(8)
    errors: list[BaseException] = []

    def slow_call() -> str:
        # If the breaker serialised calls, only one thread could be here and the barrier
        # would break after its timeout.
        inside.wait(timeout=5)
        return "ok"

    def worker() -> None:
        try:
            assert breaker.call(slow_call) == "ok"
        except BaseException as exc:
            errors.append(exc)

    # when 8 threads call through the same breaker
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # then all 8 were inside the call at the same time
    assert errors == []
    assert not inside.broken


def test_invalid_parameters_are_rejected():
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker("x", failure_threshold=0)
    with pytest.raises(ValueError, match="reset_timeout"):
        CircuitBreaker("x", reset_timeout=0)
