"""Overload shedding: answer 503 + Retry-After at once instead of queueing without bound.

Under gunicorn's sync workers a request beyond capacity waits in the listen socket's backlog,
where the application cannot see it: at twice the capacity the queue, and every request's
latency, grows until clients time out. Two signals let a worker refuse work it cannot do in
time, before Django, DRF, Redis or the ranker spend anything on it:

- Queueing delay: how long the request's bytes waited in the kernel before a worker took them.
  Under gunicorn sync workers (`gunicorn.conf.py` calls `install_arrival_timestamps`) the
  listening socket has `SO_TIMESTAMPNS` on, so the kernel stamps every received segment, and
  the worker peeks at the first byte of each accepted connection (`MSG_PEEK`: one syscall,
  nothing consumed) to read when the request arrived, to the microsecond. Elsewhere it is
  read from the connection's `TCP_INFO` (`tcpi_last_data_recv`: milliseconds since the last
  segment arrived, in jiffies: 4 ms steps here, too coarse for a 1-5 ms target: a request
  that waited 4.1 ms reads 8; Linux). The policy is CoDel's: a burst that drains
  within the interval (the 150 ms a worker spends on 3 Redis timeouts while its breaker
  opens) is served, not shed; a standing queue, every request above `SHED_QUEUE_TARGET_MS`
  for `SHED_QUEUE_INTERVAL_MS`, switches the process to shedding every request that waited
  longer than the target, until none has for a whole interval or less work arrives than
  the process can do (see `StandingQueue`). Under overload the accepted
  requests then wait about the target, so their latency stays near the normal one whatever
  the offered rate, and the excess is refused cheaply from the stale head of the queue.
  Without a socket in the WSGI environ (another server, a unix socket) the signal is absent
  and nothing is shed on it.
- In-flight requests per process (`SHED_MAX_IN_FLIGHT`): for threaded workers, where requests
  wait in the worker's own thread pool; a sync worker never has more than one.

Shed responses are small JSON 503s with `Retry-After`, counted in
`recommendation_shed_total{reason}`. Health, readiness, metrics and the admin are never shed:
an operator must be able to see and act on an overloaded server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import Counter

logger = logging.getLogger(__name__)

SHED = Counter(
    "recommendation_shed_total",
    "Requests refused with 503 by overload shedding, by the signal that refused them.",
    ["reason"],
)

DEFAULTS: dict[str, Any] = {
    "SHED_ENABLED": True,
    "SHED_QUEUE_TARGET_MS": 1.0,
    "SHED_QUEUE_INTERVAL_MS": 500.0,
    "SHED_QUEUE_MIN_LATE": 20,
    "SHED_MAX_IN_FLIGHT": 0,
    "SHED_RETRY_AFTER_SECONDS": 1,
}
# Paths (exact, or prefixes ending in "/") never shed.
EXEMPT_PATHS = ("/health", "/ready", "/metrics", "/admin/")

# struct tcp_info (linux/tcp.h): 8 one-byte fields, then __u32 fields; tcpi_last_data_recv is
# the 12th of them (after rto, ato, snd_mss, rcv_mss, unacked, sacked, lost, retrans, fackets,
# last_data_sent, last_ack_sent): byte offset 8 + 11 * 4 = 52.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_LAST_DATA_RECV = struct.Struct("=I")
_LAST_DATA_RECV_OFFSET = 52
_TCP_INFO_BYTES = 104


# SO_TIMESTAMPNS (linux/asm-generic/socket.h) when the socket module lacks the name.
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("=qq")
_ANCILLARY_BYTES = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 64
# What the worker's thread noted at accept: (the connection, its first byte's arrival time).
_arrival = threading.local()


def install_arrival_timestamps(worker: Any) -> bool:
    """Make a gunicorn sync worker decide each request's admission as it accepts it.

    Sets `SO_TIMESTAMPNS` on the worker's listening sockets (accepted connections inherit
    it) and wraps `worker.handle`, which the sync worker calls with each accepted connection
    before it reads the request: `admit_connection` peeks at the request's first bytes and
    their receive stamp, and a request the standing queue refuses gets its 503 written
    straight to the socket, before gunicorn parses it or Django builds a request (about a
    tenth of the CPU of a 503 from the middleware: under a 2x overload half the requests are
    shed, and what they cost is taken from the ones being served). False (nothing changed)
    for other workers or where the option is refused; the middleware then decides alone,
    from `TCP_INFO`.
    """
    handle = getattr(worker, "handle", None)
    sockets = getattr(worker, "sockets", None)
    if handle is None or not sockets or type(worker).__name__ != "SyncWorker":
        return False
    try:
        for listener in sockets:
            listener.sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except (OSError, AttributeError) as exc:
        logger.warning("shedding: no kernel receive timestamps (%s); using TCP_INFO", exc)
        return False
    gate = ConnectionGate.from_settings()

    def admitting_handle(listener: Any, client: socket.socket, addr: Any) -> Any:
        if not gate.admit_connection(client):
            return None
        started = time.monotonic()
        try:
            return handle(listener, client, addr)
        finally:
            if gate.queue is not None:
                gate.queue.served(time.monotonic() - started)

    worker.handle = admitting_handle
    return True


# How much of a request the gate peeks at: the method and enough of the path to tell an
# exempt path (EXEMPT_PATHS) from the API.
_PEEK_BYTES = 64
_ADMITTED = -1.0  # `_arrival.value[1]` once the gate admitted the request itself


class ConnectionGate:
    """The worker-level half of the shedding: one StandingQueue per process, fed with the
    kernel's receive stamp of each accepted connection (`admit_connection`)."""

    def __init__(self, queue: StandingQueue | None, retry_after: str) -> None:
        self.queue = queue
        self.retry_after = retry_after

    @classmethod
    def from_settings(cls) -> ConnectionGate:
        target = float(_option("SHED_QUEUE_TARGET_MS"))
        enabled = bool(_option("SHED_ENABLED")) and target > 0
        queue = _standing_queue(target) if enabled else None
        return cls(queue, str(max(1, int(_option("SHED_RETRY_AFTER_SECONDS")))))

    def admit_connection(self, client: socket.socket) -> bool:
        """False when the request was refused here (503 written, connection closed).

        Notes the arrival for `queue_ms` when this gate cannot decide (no bytes yet, no
        stamp, a request line it cannot read): the middleware then decides.
        """
        _arrival.value = None
        head, arrived = peek_arrival(client)
        if arrived is None:
            return True
        waited = max(0.0, (time.time() - arrived) * 1000.0)  # the kernel stamps realtime
        path = _request_path(head)
        if self.queue is None or path is None:
            _arrival.value = (client, arrived)
            return True
        if path.startswith(EXEMPT_PATHS):
            return True
        if _loading_a_model():
            self.queue.reset()
            _arrival.value = (client, _ADMITTED)
            return True
        if self.queue.admit(waited):
            _arrival.value = (client, _ADMITTED)
            return True
        SHED.labels(reason="queue_time").inc()
        _refuse(client, waited, self.retry_after)
        return False


def peek_arrival(client: socket.socket) -> tuple[bytes, float | None]:
    """The first bytes waiting on `client` and when the first of them reached the kernel (its
    receive timestamp; None when nothing is there yet or there is no stamp), read with a
    non-consuming peek."""
    try:
        data, ancillary, _, _ = client.recvmsg(
            _PEEK_BYTES, _ANCILLARY_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT
        )
    except OSError:  # nothing there yet (it was not queued), or the peer is gone
        return b"", None
    for level, kind, stamp in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(stamp) >= _TIMESPEC.size:
            seconds, nanoseconds = _TIMESPEC.unpack_from(stamp)
            return data, seconds + nanoseconds / 1e9
    return data, None


def _request_path(head: bytes) -> str | None:
    """The (start of the) path of an origin-form request line, else None."""
    method, space, rest = head.partition(b" ")
    if not space or not method.isalpha() or not rest.startswith(b"/"):
        return None
    return rest.split(b" ", 1)[0].decode("latin-1")


def shed_body(reason: str, waited_ms: float | None) -> bytes:
    """The JSON of a shed request's 503 (the middleware's and the gate's)."""
    body: dict[str, Any] = {
        "error": "overloaded",
        "detail": "The server is over capacity; retry after the given delay.",
        "reason": reason,
    }
    if waited_ms is not None:
        body["queued_ms"] = round(waited_ms)
    return json.dumps(body).encode()


def _refuse(client: socket.socket, waited_ms: float, retry_after: str) -> None:
    """Answer 503 + Retry-After on the raw connection and close it."""
    body = shed_body("queue_time", waited_ms)
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {retry_after}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    # Read what the client sent: closing with unread bytes would reset the connection and
    # the client could lose the 503 with it.
    with contextlib.suppress(OSError):
        client.recv(65536, socket.MSG_DONTWAIT)
    try:
        client.sendall(head + body)
    except OSError:
        pass  # the client left: nothing to answer
    finally:
        client.close()


def _admitted_by_gate(environ: dict[str, Any]) -> bool:
    """Whether the worker's ConnectionGate already admitted this request (once)."""
    noted = getattr(_arrival, "value", None)
    if noted is not None and noted[1] == _ADMITTED and noted[0] is environ.get("gunicorn.socket"):
        _arrival.value = None
        return True
    return False


def queue_ms(environ: dict[str, Any]) -> float | None:
    """Milliseconds since the request's bytes reached the kernel, or None when unknown.

    Read when the request reaches the application, this is the time it waited for a worker
    (the backlog, or a threaded worker's queue) plus the worker's own parse time: from the
    receive timestamp the worker's ConnectionGate noted (microseconds), else from `TCP_INFO` (4 ms steps).
    """
    sock = environ.get("gunicorn.socket")
    noted = getattr(_arrival, "value", None)
    if noted is not None and sock is not None and noted[0] is sock and noted[1] != _ADMITTED:
        _arrival.value = None
        # The kernel stamps with the realtime clock.
        return max(0.0, (time.time() - noted[1]) * 1000.0)
    if _TCP_INFO is None or sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_BYTES)
    except (OSError, AttributeError, TypeError):
        return None  # not a TCP socket (a unix socket), or already closed
    if len(info) < _LAST_DATA_RECV_OFFSET + _LAST_DATA_RECV.size:
        return None
    return float(_LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_OFFSET)[0])


# Waits falling by at least this many ms per ms of a run of late requests: a draining queue.
DRAIN_SLOPE = 0.25
# A run of late requests is a standing queue only once a request has waited at least this
# share of the interval: the slowdowns seen at half the capacity left waits of 20-120 ms
# (and one shed 3 requests with a 500 ms interval), a 2x overload ~250 ms after an interval.
STANDING_SHARE = 0.25
# Shedding stops once the offered load (arrivals x mean service time) is below this share of
# one worker's time, and MEAN_SERVICE_WEIGHT is the weight of each admitted request in that
# mean (an exponentially weighted one).
EXIT_LOAD = 0.9
MEAN_SERVICE_WEIGHT = 0.1


class StandingQueue:
    """CoDel's decision on the queueing delay of successive requests (one per process).

    `admit(waited_ms)` is True unless the process is shedding: it starts once every request
    seen for `interval_ms` waited longer than `target_ms` (a standing queue, not a burst),
    and stops once none has for `interval_ms`. While shedding, a request that waited no
    longer than the target is still admitted. `clock` is injectable for tests.

    Three refinements keep a stall of the whole process (both gunicorn workers stopped
    200-250 ms a few times per 10 minutes in the soak at half the capacity, cause unknown)
    or a short slowdown from reading as overload:
    - the run of late requests must be seen: a gap of more than half an interval with no
      request at all (the process was not running) restarts it at the next request, so the
      interval is not served by the stall itself;
    - a queue that is draining is not standing. After a stall the waits fall from the
      stall's length towards zero, by (1 - load) / load ms per ms (1 at half the capacity);
      under overload they stay or grow. Shedding starts only if the latest request waited
      longer than the run's first one less a quarter of the run's length, so the drain after
      a stall is served wherever the load leaves a fifth of the capacity spare;
    - a queue is standing only once it is long: the latest request waited at least a
      quarter of the interval (`STANDING_SHARE`). A 2x overload grows the wait by ~0.5 ms
      per ms (~250 ms after a 500 ms interval); the short slowdowns of a busy machine grew it
      to 20-120 ms.

    Leaving: CoDel stops dropping once the queue is gone, but shedding is so cheap that the
    queue is gone at once, and at half the capacity a fifth or more of the requests still
    arrive while both workers are busy, so "no late request for a whole interval" seldom
    came: a false start shed for seconds (3,181 requests in one 10-minute soak). So shedding
    also stops, after a quarter of an interval, once the offered load is below capacity:
    the requests that reached this process in the last quarter interval (shed or not) times
    its mean service time (`served`, the time the worker spent on each admitted request)
    cover less than `EXIT_LOAD` of that time. Under a 2x overload that is ~2, at half the
    capacity ~0.5.
    """

    def __init__(
        self,
        target_ms: float,
        interval_ms: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        min_late: int = 1,
    ) -> None:
        self.target_ms = target_ms
        self.interval_s = interval_ms / 1000.0
        # A run of late requests is a standing queue only if the process was busy: at least
        # `min_late` of them within the last interval. At 15 requests/s three late ones span
        # 200 ms while the worker idles between them (late because something else had the
        # CPU, not because requests queued for the worker).
        self.min_late = max(1, int(min_late))
        self._clock = clock
        self.shedding = False
        self._above_since: float | None = None  # first of an unbroken run of late requests
        self._recent_late: deque[float] = deque(maxlen=self.min_late)  # their times
        self._last_above = float("-inf")
        self._last_seen = float("-inf")  # the previous request, late or not
        self._first_wait_ms = 0.0  # how long the run's first request waited
        self._shed_since = 0.0
        self._arrivals: deque[float] = deque()  # while shedding: when each request came
        self.mean_service_s = 0.0  # of admitted requests (`served`); 0: not measured

    def reset(self) -> None:
        """Forget the current run of late requests and stop shedding."""
        self.shedding = False
        self._above_since = None
        self._recent_late.clear()

    def served(self, seconds: float) -> None:
        """Note how long the worker spent on a request it admitted."""
        if self.mean_service_s <= 0.0:
            self.mean_service_s = seconds
        else:
            self.mean_service_s += MEAN_SERVICE_WEIGHT * (seconds - self.mean_service_s)

    def offered_load(self, now: float) -> float | None:
        """While shedding: the work that reached this process in the last quarter interval
        over that time (1.0: exactly its capacity); None when unknown."""
        window = self.interval_s / 4
        while self._arrivals and self._arrivals[0] < now - window:
            self._arrivals.popleft()
        if self.mean_service_s <= 0.0 or window <= 0.0 or now - self._shed_since < window:
            return None
        return len(self._arrivals) * self.mean_service_s / window

    def admit(self, waited_ms: float) -> bool:
        now = self._clock()
        unseen = now - self._last_seen > self.interval_s / 2
        self._last_seen = now
        if self.shedding:
            self._arrivals.append(now)
            load = self.offered_load(now)
            if now - self._last_above >= self.interval_s or (load is not None and load < EXIT_LOAD):
                # no late request for a whole interval, or less work arriving than the
                # process can do: the overload is over
                self.shedding = False
                self._above_since = None
                self._arrivals.clear()
        if waited_ms <= self.target_ms:
            self._above_since = None
            return True
        self._last_above = now
        if self._above_since is None or unseen:
            self._above_since = now
            self._first_wait_ms = waited_ms
            self._recent_late.clear()
        self._recent_late.append(now)
        busy = (
            len(self._recent_late) == self.min_late
            and now - self._recent_late[0] <= self.interval_s
        )
        run_s = now - self._above_since
        draining = waited_ms < self._first_wait_ms - run_s * 1000.0 * DRAIN_SLOPE
        long_enough = waited_ms >= self.interval_s * 1000.0 * STANDING_SHARE
        standing = run_s >= self.interval_s and not draining and long_enough
        if not self.shedding and standing and busy:
            self.shedding = True
            self._shed_since = now
            self._arrivals.append(now)
        return not self.shedding


# While this process loads a model bundle, and for LOAD_GRACE_S after, queueing delay is not
# read as overload (see `model_loading`).
LOAD_GRACE_S = 1.0
_loads_lock = threading.Lock()
_loads_running = 0
_quiet_until = 0.0


@contextlib.contextmanager
def model_loading() -> Iterator[None]:
    """Mark a bundle load in this process (a promotion, a rollback, a canary).

    The load runs off the request path, but for about a second it competes with the requests
    for the GIL and the cores, so they queue a few milliseconds longer than the target for
    longer than the interval: to CoDel, a standing queue. That is a slowdown the process
    caused itself and that ends on its own, not more traffic than it can serve; shedding on
    it refused requests at a tenth of the capacity during promotions
    (tests/reliability/test_promotion_under_load.py). So the queue is not judged while a load
    runs and for LOAD_GRACE_S after (the backlog drains); the in-flight limit still applies.
    """
    global _loads_running, _quiet_until
    with _loads_lock:
        _loads_running += 1
    try:
        yield
    finally:
        with _loads_lock:
            _loads_running -= 1
            _quiet_until = time.monotonic() + LOAD_GRACE_S


def _loading_a_model() -> bool:
    return _loads_running > 0 or time.monotonic() < _quiet_until


def _standing_queue(target_ms: float) -> StandingQueue:
    return StandingQueue(
        target_ms,
        float(_option("SHED_QUEUE_INTERVAL_MS")),
        min_late=int(_option("SHED_QUEUE_MIN_LATE")),
    )


def _option(name: str) -> Any:
    return getattr(settings, "RECO", {}).get(name, DEFAULTS[name])


class SheddingMiddleware:
    """First in MIDDLEWARE: refuse a request the process cannot serve in time."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.enabled = bool(_option("SHED_ENABLED"))
        target = float(_option("SHED_QUEUE_TARGET_MS"))
        self.queue = _standing_queue(target) if target > 0 else None
        self.max_in_flight = int(_option("SHED_MAX_IN_FLIGHT"))
        self.retry_after = str(max(1, int(_option("SHED_RETRY_AFTER_SECONDS"))))
        self._lock = threading.Lock()
        self.in_flight = 0

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if not self.enabled or request.path.startswith(EXEMPT_PATHS):
            return self.get_response(request)
        judged = False
        if self.queue is not None and not _admitted_by_gate(request.META):
            if _loading_a_model():
                self.queue.reset()
            else:
                waited = queue_ms(request.META)
                if waited is not None and not self.queue.admit(waited):
                    return self.shed("queue_time", waited)
                judged = waited is not None
        if judged:
            started = time.monotonic()
            try:
                return self._in_flight_limited(request)
            finally:
                self.queue.served(time.monotonic() - started)  # type: ignore[union-attr]
        return self._in_flight_limited(request)

    def _in_flight_limited(self, request: HttpRequest) -> HttpResponse:
        if self.max_in_flight <= 0:
            return self.get_response(request)
        with self._lock:
            admitted = self.in_flight < self.max_in_flight
            if admitted:
                self.in_flight += 1
        if not admitted:
            return self.shed("in_flight", None)
        try:
            return self.get_response(request)
        finally:
            with self._lock:
                self.in_flight -= 1

    def shed(self, reason: str, waited_ms: float | None) -> HttpResponse:
        SHED.labels(reason=reason).inc()
        response = HttpResponse(
            shed_body(reason, waited_ms), status=503, content_type="application/json"
        )
        response["Retry-After"] = self.retry_after
        # Django logs every 5xx at ERROR ("Service Unavailable"): at 2x capacity that is
        # hundreds of lines a second, written while the worker is already behind. A shed is
        # the designed outcome, counted in recommendation_shed_total instead.
        response._has_been_logged = True  # type: ignore[attr-defined]
        return response
