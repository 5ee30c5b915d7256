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

from apps.serving import shedding
from apps.serving.shedding import (
    ConnectionGate,
    SheddingMiddleware,
    StandingQueue,
    _admitted_by_gate,
    install_arrival_timestamps,
    queue_ms,
)

REAL_LOADING_CHECK = shedding._loading_a_model


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
    # Given every request waiting longer than the target (and a quarter interval) for a
    # whole interval
    decisions = []
    for _ in range(12):
        decisions.append(queue.admit(30))
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
    for _ in range(10):  # one late request every 10 ms, each served
        assert mw(get("/api/v1/popular", waited_ms=40)).status_code == 200
        clock.advance(10)
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
    assert calls == ["/api/v1/popular"] * 10
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
    assert settings.RECO["SHED_QUEUE_TARGET_MS"] == 1.0
    assert settings.RECO["SHED_QUEUE_INTERVAL_MS"] == 500.0


def test_a_shed_request_through_django_is_a_503_that_is_not_logged_as_an_error(
    client, settings, caplog
) -> None:  # type: ignore[no-untyped-def]
    # Given shedding that starts at the first late request (a zero interval)
    settings.RECO = {
        **settings.RECO,
        "SHED_QUEUE_TARGET_MS": 5.0,
        "SHED_QUEUE_INTERVAL_MS": 0.0,
        "SHED_QUEUE_MIN_LATE": 1,
    }
    # When a request that waited 500 ms goes through the whole Django stack
    with caplog.at_level(logging.WARNING, logger="django.request"):
        response = client.get("/api/v1/popular", **{"gunicorn.socket": FakeTcpSocket(500)})
    # Then it is refused, and not logged as a server error (one line per shed request would
    # flood the log exactly when the server is behind); the counter records it instead
    assert response.status_code == 503
    assert response["Retry-After"] == "1"
    assert response.json()["error"] == "overloaded"
    assert [r for r in caplog.records if r.name == "django.request"] == []


class SyncWorker:
    """The two attributes of gunicorn's sync worker that `install_arrival_timestamps` uses."""

    def __init__(self, listener: socket.socket) -> None:
        self.sockets = [type("Listener", (), {"sock": listener})()]

    def handle(self, listener, client, addr) -> None:  # type: ignore[no-untyped-def]
        raise AssertionError("replaced by the gate")


@pytest.fixture(scope="module")
def kernel_stamping():  # type: ignore[no-untyped-def]
    """Keep receive timestamping on for the module. The kernel switches it on a moment after
    the first socket asks (deferred), and off once none has it; a segment arriving in between
    is stamped when read, which reads as no wait (a gunicorn worker keeps its listener all
    its life, so only its first milliseconds are affected)."""
    with socket.socket() as keeper:
        keeper.setsockopt(socket.SOL_SOCKET, shedding._SO_TIMESTAMPNS, 1)
        time.sleep(0.1)
        yield


@pytest.fixture
def stamped_listener(monkeypatch, kernel_stamping):  # type: ignore[no-untyped-def]
    """A loopback listener with kernel receive timestamps on, as the gate sets it up. No model
    load counts: an earlier test's serving state may still be loading a bundle in a background
    thread (the test of `model_loading` puts the real check back)."""
    monkeypatch.setattr(shedding, "_loading_a_model", lambda: False)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        assert install_arrival_timestamps(SyncWorker(listener))
        yield listener


def queued(listener: socket.socket, request: bytes, wait_s: float):  # type: ignore[no-untyped-def]
    """A client that sent `request`, and the server side accepted `wait_s` later."""
    client = socket.create_connection(listener.getsockname())
    client.sendall(request)
    time.sleep(wait_s)
    conn, _ = listener.accept()
    return client, conn


def test_the_gate_answers_503_itself_before_the_request_is_parsed(stamped_listener) -> None:  # type: ignore[no-untyped-def]
    # Given a process already shedding (interval 0: the first late request starts it)
    gate = ConnectionGate(StandingQueue(5.0, 0.0), "2")
    client, conn = queued(stamped_listener, b"GET /api/v1/popular HTTP/1.1\r\n\r\n", 0.03)
    # When the request that waited 30 ms in the backlog is accepted
    with client:
        assert gate.admit_connection(conn) is False
        answer = client.recv(4096)
    # Then the client got the 503 on the raw connection, which the gate closed
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"Retry-After: 2" in head
    document = json.loads(body)
    assert document["reason"] == "queue_time"
    assert document["queued_ms"] >= 30
    assert conn.fileno() == -1


def test_the_gate_admits_exempt_paths_and_requests_below_the_target(stamped_listener) -> None:  # type: ignore[no-untyped-def]
    shedding = ConnectionGate(StandingQueue(5.0, 0.0), "1")
    lenient = ConnectionGate(StandingQueue(10_000.0, 0.0), "1")
    # Given requests that waited 30 ms: one for /health, one for the API
    health, health_conn = queued(stamped_listener, b"GET /health HTTP/1.1\r\n\r\n", 0.03)
    api, api_conn = queued(stamped_listener, b"GET /api/v1/popular HTTP/1.1\r\n\r\n", 0.03)
    with health, health_conn, api, api_conn:
        # Then /health is admitted even by a shedding gate, undecided for the middleware
        assert shedding.admit_connection(health_conn) is True
        assert not _admitted_by_gate({"gunicorn.socket": health_conn})
        # and the API request is admitted under a 10 s target, marked as decided once
        assert lenient.admit_connection(api_conn) is True
        assert _admitted_by_gate({"gunicorn.socket": api_conn})
        assert not _admitted_by_gate({"gunicorn.socket": api_conn})
        # and gunicorn still finds the whole request on the socket
        assert api_conn.recv(100) == b"GET /api/v1/popular HTTP/1.1\r\n\r\n"


def test_queue_ms_uses_the_kernel_receive_stamp_to_the_microsecond(stamped_listener) -> None:  # type: ignore[no-untyped-def]
    client, conn = queued(stamped_listener, b"GET / HTTP/1.1\r\n\r\n", 0.03)
    late = socket.create_connection(stamped_listener.getsockname())
    late_conn, _ = stamped_listener.accept()
    with client, conn, late, late_conn:
        undecided = ConnectionGate(None, "1")  # shedding off: it only notes the arrival
        undecided.admit_connection(conn)
        stamped = queue_ms({"gunicorn.socket": conn})
        # a connection whose bytes arrive after the peek falls back to TCP_INFO
        undecided.admit_connection(late_conn)
        late.sendall(b"GET / HTTP/1.1\r\n\r\n")
        time.sleep(0.01)
        fallback = queue_ms({"gunicorn.socket": late_conn})
    assert stamped is not None
    assert 30.0 <= stamped < 30_000
    assert stamped != round(stamped)  # sub-millisecond, unlike tcpi_last_data_recv's steps
    assert fallback is not None
    assert fallback == round(fallback)


def test_only_gunicorn_s_sync_worker_gets_the_gate() -> None:
    class ThreadWorker(SyncWorker):
        pass

    with socket.socket() as listener:
        worker = ThreadWorker(listener)
        original = worker.handle
        assert not install_arrival_timestamps(worker)
        assert worker.handle == original
    with socket.socket() as listener:
        worker = SyncWorker(listener)
        assert install_arrival_timestamps(worker)
        assert worker.handle.__name__ == "admitting_handle"
        assert listener.getsockopt(socket.SOL_SOCKET, shedding._SO_TIMESTAMPNS) == 1


def test_queueing_while_the_process_loads_a_model_is_not_shed(
    stamped_listener, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    # Given a gate that would shed the first late request (interval 0), and no grace period
    monkeypatch.setattr(shedding, "_loading_a_model", REAL_LOADING_CHECK)
    monkeypatch.setattr(shedding, "LOAD_GRACE_S", 0.0)
    monkeypatch.setattr(shedding, "_loads_running", 0)
    monkeypatch.setattr(shedding, "_quiet_until", 0.0)
    gate = ConnectionGate(StandingQueue(5.0, 0.0), "1")
    request = b"GET /api/v1/popular HTTP/1.1\r\n\r\n"
    # When a request waited 30 ms while this process was loading a bundle
    client, conn = queued(stamped_listener, request, 0.03)
    with client, conn, shedding.model_loading():
        during = gate.admit_connection(conn)
    # Then it was admitted; the same wait after the load is shed
    client, conn = queued(stamped_listener, request, 0.03)
    with client:
        after = gate.admit_connection(conn)
    assert during is True
    assert after is False


def test_a_few_late_requests_spanning_the_interval_are_not_a_standing_queue() -> None:
    # Given a 200 ms interval that needs 20 late requests, on a fake clock
    now = [0.0]
    queue = StandingQueue(1.0, 200.0, clock=lambda: now[0], min_late=20)
    # When a mostly idle worker sees one late request every 66 ms (15 per second) for 2 s
    sparse = []
    for _ in range(30):
        sparse.append(queue.admit(3.0))
        now[0] += 0.066
    # Then it never sheds; a busy one (one late request per 2 ms) starts within the interval
    assert all(sparse)
    queue.reset()
    busy = []
    for _ in range(150):
        busy.append(queue.admit(60.0))
        now[0] += 0.002
    assert not all(busy)
    assert busy.index(False) >= 100  # 200 ms of late requests first


def a_stall_then_its_drain(queue: StandingQueue, now: list[float], stall_s: float) -> list[bool]:
    """Late requests every 2 ms (a short run), then nothing for `stall_s` (the process stopped),
    then the backlog drains at half the capacity: the first request waited the stall's
    length, each later one 2 ms less, one every 2 ms. The admit decisions."""
    decisions = []
    for _ in range(10):
        decisions.append(queue.admit(3.0))
        now[0] += 0.002
    now[0] += stall_s
    waited = stall_s * 1000
    while waited > 0:
        decisions.append(queue.admit(waited))
        waited -= 2.0
        now[0] += 0.002
    decisions.append(queue.admit(0.5))
    return decisions


def test_a_stall_of_the_process_and_its_drain_are_not_a_standing_queue() -> None:
    # Given a 200 ms interval that needs 20 late requests, on a fake clock
    now = [0.0]
    queue = StandingQueue(1.0, 200.0, clock=lambda: now[0], min_late=20)
    # When the process stalls for 250 ms in a run of late requests, and for 600 ms (whose
    # drain, 600 ms of late requests, outlasts the interval three times)
    short = a_stall_then_its_drain(queue, now, 0.25)
    long = a_stall_then_its_drain(queue, now, 0.6)
    # Then every request is served
    assert all(short)
    assert all(long)
    assert queue.shedding is False


def test_a_queue_that_grows_after_a_stall_is_shed() -> None:
    # Given the same queue
    now = [0.0]
    queue = StandingQueue(1.0, 200.0, clock=lambda: now[0], min_late=20)
    # When after a 250 ms stall the waits do not fall but grow (twice the capacity arrives)
    for _ in range(10):
        queue.admit(3.0)
        now[0] += 0.002
    now[0] += 0.25
    decisions = []
    waited = 250.0
    for _ in range(200):
        decisions.append(queue.admit(waited))
        waited += 1.0
        now[0] += 0.002
    # Then it sheds, once the grown queue has been seen for an interval
    assert not all(decisions)
    assert decisions.index(False) >= 100  # 200 ms of late requests first


def shedding_queue(now: list[float]) -> StandingQueue:
    """A queue (1 ms target, 200 ms interval) of a worker whose requests take 4 ms, driven
    into shedding by 200 ms of arrivals every 2 ms (twice its capacity) with growing waits."""
    queue = StandingQueue(1.0, 200.0, clock=lambda: now[0], min_late=20)
    for _ in range(20):
        queue.served(0.004)
    waited = 2.0
    while not queue.shedding:
        queue.admit(waited)
        waited += 1.0
        now[0] += 0.002
    return queue


def keep_arriving(
    queue: StandingQueue, now: list[float], every_s: float, seconds: float
) -> list[bool]:
    """Arrivals every `every_s` for `seconds`, one in three late (both workers busy): the
    decisions on the late ones."""
    decisions = []
    for i in range(round(seconds / every_s)):
        late = i % 3 == 0
        decision = queue.admit(3.0 if late else 0.2)
        if late:
            decisions.append(decision)
        now[0] += every_s
    return decisions


def test_shedding_stops_once_less_work_arrives_than_the_worker_can_do() -> None:
    # Given a worker shedding a 2x overload
    now = [0.0]
    queue = shedding_queue(now)
    # When the overload goes on for a second, then the load falls to half the capacity (a
    # request every 8 ms) while a third of the requests still wait a little
    overload = keep_arriving(queue, now, 0.002, 1.0)
    still_shedding = queue.shedding
    after = keep_arriving(queue, now, 0.008, 1.0)
    # Then it kept shedding the late requests through the overload
    assert still_shedding is True
    assert not any(overload)
    # and stopped within a quarter interval of the load falling (50 ms: a few requests),
    # though late requests kept coming more often than once an interval
    assert queue.shedding is False
    assert after.count(False) <= 3
    assert all(after[3:])


def test_without_service_times_shedding_stops_only_after_an_interval_with_no_late_request() -> None:
    # Given a queue that never learnt how long requests take (the middleware without a gate
    # before anything was served), shedding
    now = [0.0]
    queue = StandingQueue(1.0, 200.0, clock=lambda: now[0], min_late=20)
    waited = 2.0
    while not queue.shedding:
        queue.admit(waited)
        waited += 1.0
        now[0] += 0.002
    # When the load falls to half but a third of the requests still wait a little
    after = keep_arriving(queue, now, 0.008, 1.0)
    # Then it still sheds them (no estimate of the load: the interval rule alone)
    assert queue.shedding is True
    assert not any(after)


def test_a_late_run_is_a_standing_queue_only_once_its_waits_reach_a_quarter_interval() -> None:
    # Given a 200 ms interval on a fake clock
    now = [0.0]
    queue = StandingQueue(1.0, 200.0, clock=lambda: now[0], min_late=20)
    # When every request waits 20-40 ms for 400 ms (a short slowdown), then 60 ms
    short = []
    for i in range(200):
        short.append(queue.admit(20.0 + (i % 3) * 10))
        now[0] += 0.002
    long = []
    for _ in range(10):
        long.append(queue.admit(60.0))
        now[0] += 0.002
    # Then the short queue is served and the long one shed at once (it stood an interval)
    assert all(short)
    assert long[0] is False
