"""The Redis candidate store against a private redis-server: reads, publish, and faults
(SIGSTOP, SIGCONT, SIGKILL) injected into a process this test owns.

Elapsed-time checks here are loose correctness bounds ("it did not hang for the 5 s x 10
retries of redis-py's defaults"), not performance thresholds.
"""

from __future__ import annotations

import time

import pytest
import redis

from apps.serving.engine.breaker import CircuitBreaker, State
from apps.serving.engine.redis_store import (
    CorruptValue,
    RedisCandidateStore,
    current_version,
    decode_list,
    encode_list,
    make_serving_client,
    publish_bundle_lists,
)
from apps.serving.engine.sources import StoreUnavailable, Unavailable

HANG_BOUND_S = 2.0  # far above the 50 ms timeout, far below redis-py's 5 s default

USER_LISTS = {
    7: {"itemcf": [(101, 0.9), (102, 0.5)], "popular": [(1, 3.0)]},
    8: {"vector": [(201, 0.25)]},
}
SIMILAR = {101: {"itemcf": [(102, 0.8), (103, 0.1)], "content": [(104, 0.7)]}}
POPULAR = [(1, 30.0), (2, 20.0), (3, 10.0)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingPool:
    """Counts connections taken from the pool: every command that touches a socket takes one."""

    def __init__(self, client: redis.Redis) -> None:
        self.taken = 0
        pool = client.connection_pool
        original = pool.get_connection

        def get_connection(*args, **kwargs):
            self.taken += 1
            return original(*args, **kwargs)

        pool.get_connection = get_connection  # type: ignore[method-assign]


@pytest.fixture
def published(private_redis):
    admin = redis.Redis.from_url(private_redis.url)
    publish_bundle_lists(admin, "v1", USER_LISTS, SIMILAR, POPULAR)
    admin.close()
    return private_redis


@pytest.fixture
def store_for(published):
    clients = []

    def build(threshold: int = 3, clock=None) -> tuple[RedisCandidateStore, CircuitBreaker]:
        client = make_serving_client(published.url, timeout_ms=50)
        clients.append(client)
        breaker = CircuitBreaker("redis", threshold, 2.0, clock or FakeClock())
        return RedisCandidateStore(client, breaker, version="v1"), breaker

    yield build
    for client in clients:
        client.close()


def test_packed_lists_round_trip_with_float32_scores():
    pairs = [(2**40, 0.1), (-3, 1e6), (5, 0.0)]
    decoded = decode_list(encode_list(pairs))
    assert [i for i, _ in decoded] == [2**40, -3, 5]
    assert decoded[0][1] == pytest.approx(0.1, rel=1e-6)
    assert len(encode_list(pairs)) == 1 + 12 * 3
    assert decode_list(encode_list([])) == []


def test_a_value_that_is_not_a_packed_list_is_rejected():
    with pytest.raises(CorruptValue):
        decode_list(b'[[1, 0.5, "itemcf"]]')
    with pytest.raises(CorruptValue):
        decode_list(encode_list([(1, 1.0)])[:-1])


def test_the_serving_client_has_bounded_timeouts_and_no_retries(private_redis):
    client = make_serving_client(private_redis.url, timeout_ms=50)
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == pytest.approx(0.05)
    assert kwargs["socket_connect_timeout"] == pytest.approx(0.05)
    assert kwargs["health_check_interval"] == 0
    assert kwargs["retry"].get_retries() == 0
    client.close()


def test_publish_writes_versioned_keys_and_flips_the_pointer_last(private_redis):
    # given a pointer on an older version
    admin = redis.Redis.from_url(private_redis.url)
    admin.set("reco:current", "v0")
    seen = []
    original_set = admin.set

    def spy_set(name, value, *args, **kwargs):
        # the pointer flip must find every versioned key already written
        if name == "reco:current":
            seen.append((value, admin.exists("reco:v1:u:7", "reco:v1:s:101", "reco:v1:popular")))
        return original_set(name, value, *args, **kwargs)

    admin.set = spy_set  # type: ignore[method-assign]
    # when a bundle is published
    written = publish_bundle_lists(admin, "v1", USER_LISTS, SIMILAR, POPULAR, batch=1)
    # then all keys exist, and only then did the pointer move
    assert written == 4
    assert seen == [("v1", 3)]
    assert current_version(admin) == "v1"
    admin.close()


def test_republishing_replaces_channels_instead_of_merging(private_redis):
    admin = redis.Redis.from_url(private_redis.url)
    publish_bundle_lists(admin, "v1", USER_LISTS, SIMILAR, POPULAR)
    publish_bundle_lists(admin, "v1", {7: {"vector": [(9, 1.0)]}}, {}, POPULAR)
    assert set(admin.hkeys("reco:v1:u:7")) == {b"vector"}
    admin.close()


def test_it_reads_user_lists_and_similar_items_in_one_round_trip_each(store_for):
    # given a published bundle and a serving store
    store, breaker = store_for()
    spy = CountingPool(store.client)
    # when a user's lists and an item's neighbours are read
    lists = store.get_user_lists(7, ["itemcf", "popular", "vector"])
    after_user = spy.taken
    similar = store.get_similar(101)
    # then each read took one connection (one command), and the data is what was published
    assert after_user == 1
    assert spy.taken == 2
    assert set(lists) == {"itemcf", "popular"}  # no vector list for user 7
    assert [i for i, _ in lists["itemcf"]] == [101, 102]
    assert lists["itemcf"][0][1] == pytest.approx(0.9)
    assert {c: [i for i, _ in v] for c, v in similar.items()} == {
        "itemcf": [102, 103],
        "content": [104],
    }
    assert [i for i, _ in store.get_popular()] == [1, 2, 3]
    assert store.get_user_lists(999, ["itemcf"]) == {}
    assert store.get_similar(999) == {}
    assert breaker.state is State.CLOSED


def test_a_stopped_redis_fails_with_a_timeout_instead_of_hanging(published, store_for):
    # given a serving store on a connected, healthy Redis
    store, _ = store_for()
    assert store.get_user_lists(7, ["itemcf"])
    # when the Redis process hangs (SIGSTOP keeps its sockets open)
    published.stop()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        store.get_user_lists(7, ["itemcf"])
    elapsed = time.monotonic() - started
    # then the read fails as a timeout, not after redis-py's 5 s x retries
    assert info.value.reason is Unavailable.TIMEOUT
    assert elapsed < HANG_BOUND_S


def test_a_stopped_redis_with_no_open_connection_also_fails_as_a_timeout(published, store_for):
    # the kernel still completes the TCP handshake for a stopped process, so the first read
    # (not the connect) is what times out
    store, _ = store_for()
    published.stop()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        store.get_similar(101)
    assert info.value.reason in (Unavailable.TIMEOUT, Unavailable.CONNECTION)
    assert time.monotonic() - started < HANG_BOUND_S


def test_the_breaker_opens_fails_fast_and_recovers_after_sigcont(published, store_for):
    # given a store whose breaker opens after 3 failures, on a fake clock
    clock = FakeClock()
    store, breaker = store_for(threshold=3, clock=clock)
    spy = CountingPool(store.client)
    assert store.get_user_lists(7, ["itemcf"])
    # when Redis hangs and three reads time out
    published.stop()
    for _ in range(3):
        with pytest.raises(StoreUnavailable) as info:
            store.get_user_lists(7, ["itemcf"])
        assert info.value.reason is Unavailable.TIMEOUT
    assert breaker.state is State.OPEN
    touched = spy.taken
    # then later reads fail as breaker_open without touching a socket
    for _ in range(20):
        with pytest.raises(StoreUnavailable) as info:
            store.get_user_lists(7, ["itemcf"])
        assert info.value.reason is Unavailable.BREAKER_OPEN
    assert spy.taken == touched
    # and when Redis resumes and the reset timeout passes, the probe succeeds and closes it
    published.resume()
    clock.now += 2.0
    lists = store.get_user_lists(7, ["itemcf"])
    assert [i for i, _ in lists["itemcf"]] == [101, 102]
    assert breaker.state is State.CLOSED
    assert spy.taken == touched + 1
    assert breaker.transitions == {"closed->open": 1, "open->half_open": 1, "half_open->closed": 1}


def test_a_killed_redis_fails_with_a_connection_reason(published, store_for):
    store, breaker = store_for(threshold=2)
    assert store.get_similar(101)
    # when the process is killed (connections refused from now on)
    published.kill()
    reasons = []
    for _ in range(3):
        with pytest.raises(StoreUnavailable) as info:
            store.get_similar(101)
        reasons.append(info.value.reason)
    # then two connection failures open the breaker, which answers the third
    assert reasons == [Unavailable.CONNECTION, Unavailable.CONNECTION, Unavailable.BREAKER_OPEN]
    assert breaker.state is State.OPEN


def test_a_missing_key_does_not_count_against_the_breaker(store_for):
    store, breaker = store_for(threshold=1)
    for user in range(1000, 1010):
        assert store.get_user_lists(user, ["itemcf"]) == {}
    assert breaker.state is State.CLOSED
