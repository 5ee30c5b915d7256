"""The fault proxy itself, in front of a private Redis: each mode does what the scenarios rely on,
on connections opened before the switch as well as new ones."""

from __future__ import annotations

import time

import pytest
import redis

from tests.reliability.faultproxy import BLACKHOLE, LATENCY, PASS, RESET, fault_proxy
from tests.reliability.serving_fixtures import RedisProcess


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


def test_each_mode_applies_to_open_and_new_connections(redis_server: RedisProcess) -> None:
    with fault_proxy(redis_server.port) as proxy:
        # Given a client whose pooled connection is open before any fault
        client = _client(proxy.url)
        assert client.set("k", "v") is True
        # Latency: the same connection now waits at least the added time each way
        proxy.set_mode(LATENCY, latency_ms=150)
        started = time.monotonic()
        assert client.get("k") == b"v"
        assert time.monotonic() - started >= 0.3
        # Blackhole: the peer accepts and never answers (a read timeout, not a refusal)
        proxy.set_mode(BLACKHOLE)
        with pytest.raises(redis.exceptions.TimeoutError):
            client.get("k")
        # Reset: open connections are reset and new ones too
        proxy.set_mode(RESET)
        with pytest.raises(redis.exceptions.ConnectionError):
            client.get("k")
        with pytest.raises(redis.exceptions.ConnectionError):
            _client(proxy.url).get("k")
        # Pass: back to normal on a fresh connection
        proxy.set_mode(PASS)
        assert _client(proxy.url).get("k") == b"v"
        assert proxy.accepted >= 3


def test_an_unknown_mode_is_refused(redis_server: RedisProcess) -> None:
    with fault_proxy(redis_server.port) as proxy, pytest.raises(ValueError, match="unknown mode"):
        proxy.set_mode("slow")
