"""Overload shedding: 503 + Retry-After for a request that waited too long for a worker, or that
would exceed a threaded worker's in-flight limit; exempt paths are never shed."""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time

import pytest
from django.http import HttpResponse
from django.test import RequestFactory
from prometheus_client import REGISTRY

from apps.serving.shedding import SheddingMiddleware, StandingQueue, queue_ms


class FakeTcpSocket:
    """What `gunicorn.socket` looks like to the middleware: TCP_INFO with a given
    tcpi_last_data_recv (milliseconds)."""

    def __init__(self, waited_ms: int) -> None:
        self.waited_ms = waited_ms

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option) == (socket.IPPROTO_TCP, socket.TCP_INFO)
        info = bytearray(size)
        struct.pack_into("=I", info, 44, 999_999)  # last_data_sent: must not be read
        struct.pack_into("=I", info, 52, self.waited_ms)
        return bytes(info)


def shed_count(reason: str) -> float:
    return REGISTRY.get_sample_value("recommendation_shed_total", {"reason": reason}) or 0.0


class Clock:
    """Whole milliseconds, so that interval comparisons are exact."""

    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> float:
        return self.ms / 1000

    def advance(self, ms: int) -> None:
        self.ms += ms


def middleware(settings, calls: list[str] | None = None, **options) -> SheddingMiddleware:  # type: ignore[no-untyped-def]
    settings.RECO = {**settings.RECO, **options}

    def view(request):  # type: ignore[no-untyped-def]
        if calls is not None:
            calls.append(request.path)
        return HttpResponse("served")

    return SheddingMiddleware(view)


def get(path: str, waited_ms: int | None = None):  # type: ignore[no-untyped-def]
    extra = {} if waited_ms is None else {"gunicorn.socket": FakeTcpSocket(waited_ms)}
    return RequestFactory().get(path, **extra)


def test_a_burst_shorter_than_the_interval_is_served_not_shed() -> None:
    # Given a 5 ms target and a 100 ms interval
    clock = Clock()
    queue = StandingQueue(5.0, 100.0, clock=clock)
    # When requests waited 150 ms, 100 ms, 40 ms ... for 60 ms (a stall draining), then one
    # is fresh again
    admitted = []
    for waited in (150, 100, 40, 20, 8):
        admitted.append(queue.admit(waited))
        clock.advance(15)
    admitted.append(queue.admit(0))
    # Then every one was served
    assert admitted == [True] * 6
    assert queue.shedding is False


def test_a_standing_queue_sheds_late_requests_until_it_is_gone() -> None:
    clock = Clock()
    queue = StandingQueue(5.0, 100.0, clock=clock)
    # Given every request waiting longer than the target for a whole interval
    decisions = []
    for _ in range(12):
        decisions.append(queue.admit(20))
        clock.advance(10)
    # Then shedding starts once the interval has passed, not before
    assert decisions[:10] == [True] * 10
    assert decisions[10:] == [False, False]
    assert queue.shedding is True
    # and while it sheds, a request within the target is still served
    assert queue.admit(4) is True
    assert queue.admit(12) is False
    # When no request has been late for a whole interval, shedding stops
    clock.advance(50)
    assert queue.admit(0) is True
    assert queue.shedding is True  # 50 ms since the last late one: not yet
    clock.advance(60)
    assert queue.admit(0) is True
    assert queue.shedding is False
    assert queue.admit(30) is True  # a late request is a new burst, served


def test_a_request_shed_from_a_standing_queue_gets_503_json_and_retry_after(settings) -> None:
    # Given a worker whose queue has been standing above the target for an interval
    calls: list[str] = []
    mw = middleware(settings, calls, SHED_RETRY_AFTER_SECONDS=2)
    clock = Clock()
    mw.queue = StandingQueue(5.0, 100.0, clock=clock)
    assert mw(get("/api/v1/popular", waited_ms=40)).status_code == 200
    clock.advance(120)
    before = shed_count("queue_time")
    # When another request that waited 40 ms arrives
    response = mw(get("/api/v1/popular", waited_ms=40))
    # Then it is refused at once, never reaching the view, and counted
    assert response.status_code == 503
    assert response["Retry-After"] == "2"
    assert response["Content-Type"] == "application/json"
    body = json.loads(response.content)
    assert body["error"] == "overloaded"
    assert body["reason"] == "queue_time"
    assert body["queued_ms"] == 40
    assert calls == ["/api/v1/popular"]
    assert shed_count("queue_time") == before + 1


def test_a_request_without_a_tcp_socket_is_never_shed_on_queue_time(settings) -> None:
    # No gunicorn socket (another server, the test client): no signal
    calls: list[str] = []
    mw = middleware(settings, calls)
    mw.queue = StandingQueue(5.0, 100.0, clock=Clock())
    mw.queue.shedding = True
    assert mw(get("/api/v1/popular")).status_code == 200
    assert calls == ["/api/v1/popular"]


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics", "/admin/registry/"])
def test_health_readiness_metrics_and_the_admin_are_never_shed(settings, path) -> None:  # type: ignore[no-untyped-def]
    calls: list[str] = []
    mw = middleware(settings, calls)
    mw.queue = StandingQueue(5.0, 100.0, clock=Clock())
    mw.queue.shedding = True
    assert mw(get(path, waited_ms=5000)).status_code == 200
    assert calls == [path]


def test_shedding_can_be_turned_off(settings) -> None:
    mw = middleware(settings, SHED_ENABLED=False, SHED_MAX_IN_FLIGHT=1)
    mw.queue = StandingQueue(5.0, 100.0, clock=Clock())
    mw.queue.shedding = True
    assert mw(get("/api/v1/popular", waited_ms=5000)).status_code == 200
    assert middleware(settings, SHED_ENABLED=True, SHED_QUEUE_TARGET_MS=0.0).queue is None


def test_a_threaded_worker_sheds_beyond_its_in_flight_limit_and_admits_again_after(
    settings,
) -> None:
    # Given a limit of one request in flight, and one request held inside the view
    entered, release = threading.Event(), threading.Event()
    settings.RECO = {**settings.RECO, "SHED_MAX_IN_FLIGHT": 1, "SHED_QUEUE_TARGET_MS": 0.0}

    def slow_view(request):  # type: ignore[no-untyped-def]
        entered.set()
        release.wait(timeout=10)
        return HttpResponse("served")

    mw = SheddingMiddleware(slow_view)
    first: list[int] = []
    holder = threading.Thread(target=lambda: first.append(mw(get("/api/v1/popular")).status_code))
    holder.start()
    assert entered.wait(timeout=10)
    before = shed_count("in_flight")
    # When a second request arrives meanwhile, it is shed
    second = mw(get("/api/v1/popular"))
    assert second.status_code == 503
    assert json.loads(second.content)["reason"] == "in_flight"
    assert shed_count("in_flight") == before + 1
    # Then once the first finishes, the slot is free again
    release.set()
    holder.join(timeout=10)
    assert first == [200]
    assert mw.in_flight == 0
    assert mw(get("/api/v1/popular")).status_code == 200


def test_queue_ms_reads_how_long_bytes_have_waited_on_a_real_tcp_connection() -> None:
    # Given a real loopback connection whose server side has unread bytes
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        try:
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")
            time.sleep(0.01)
            fresh = queue_ms({"gunicorn.socket": server})
            # When they have waited another 300 ms
            time.sleep(0.3)
            waited = queue_ms({"gunicorn.socket": server})
        finally:
            client.close()
            server.close()
    # Then the kernel's tcpi_last_data_recv says so (jiffies: a few ms of resolution)
    assert fresh is not None
    assert waited is not None
    assert waited >= 280
    assert waited - fresh >= 250
    assert waited < 60_000  # not another field of tcp_info (rto is in microseconds)


def test_the_middleware_runs_first_in_the_django_stack(settings) -> None:
    # The project's middleware list: shedding comes before sessions, CSRF, auth and metrics,
    # so a refused request costs nothing else
    assert settings.MIDDLEWARE[0] == "apps.serving.shedding.SheddingMiddleware"
    # and its defaults are the documented ones
    assert settings.RECO["SHED_ENABLED"] is True
    assert settings.RECO["SHED_QUEUE_TARGET_MS"] == 5.0
    assert settings.RECO["SHED_QUEUE_INTERVAL_MS"] == 200.0


def test_a_shed_request_through_django_is_a_503_that_is_not_logged_as_an_error(
    client, settings, caplog
) -> None:  # type: ignore[no-untyped-def]
    # Given shedding that starts at the first late request (a zero interval)
    settings.RECO = {**settings.RECO, "SHED_QUEUE_TARGET_MS": 5.0, "SHED_QUEUE_INTERVAL_MS": 0.0}
    # When a request that waited 500 ms goes through the whole Django stack
    with caplog.at_level(logging.WARNING, logger="django.request"):
        response = client.get("/api/v1/popular", **{"gunicorn.socket": FakeTcpSocket(500)})
    # Then it is refused, and not logged as a server error (one line per shed request would
    # flood the log exactly when the server is behind); the counter records it instead
    assert response.status_code == 503
    assert response["Retry-After"] == "1"
    assert response.json()["error"] == "overloaded"
    assert [r for r in caplog.records if r.name == "django.request"] == []
