"""Overload shedding: answer 503 + Retry-After at once instead of queueing without bound.

Under gunicorn's sync workers a request beyond capacity waits in the listen socket's backlog,
where the application cannot see it: at twice the capacity the queue, and every request's
latency, grows until clients time out. Two signals let a worker refuse work it cannot do in
time, before Django, DRF, Redis or the ranker spend anything on it:

- Queueing delay: how long the request's bytes waited in the kernel before a worker took them,
  read from the connection's `TCP_INFO` (`tcpi_last_data_recv`: milliseconds since the last
  segment arrived, in jiffies, 4 ms here; Linux). The policy is CoDel's: a burst that drains
  within the interval (the 150 ms a worker spends on 3 Redis timeouts while its breaker
  opens) is served, not shed; a standing queue, every request above `SHED_QUEUE_TARGET_MS`
  for `SHED_QUEUE_INTERVAL_MS`, switches the process to shedding every request that waited
  longer than the target, until none has for a whole interval. Under overload the accepted
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

import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
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
    "SHED_QUEUE_TARGET_MS": 5.0,
    "SHED_QUEUE_INTERVAL_MS": 200.0,
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


def queue_ms(environ: dict[str, Any]) -> float | None:
    """Milliseconds since the request's last bytes reached the kernel, or None when unknown.

    Read when the request reaches the application, this is the time it waited for a worker
    (the backlog, or a threaded worker's queue) plus the worker's own parse time.
    """
    sock = environ.get("gunicorn.socket")
    if _TCP_INFO is None or sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_BYTES)
    except (OSError, AttributeError, TypeError):
        return None  # not a TCP socket (a unix socket), or already closed
    if len(info) < _LAST_DATA_RECV_OFFSET + _LAST_DATA_RECV.size:
        return None
    return float(_LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_OFFSET)[0])


class StandingQueue:
    """CoDel's decision on the queueing delay of successive requests (one per process).

    `admit(waited_ms)` is True unless the process is shedding: it starts once every request
    seen for `interval_ms` waited longer than `target_ms` (a standing queue, not a burst),
    and stops once none has for `interval_ms`. While shedding, a request that waited no
    longer than the target is still admitted. `clock` is injectable for tests.
    """

    def __init__(
        self,
        target_ms: float,
        interval_ms: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target_ms = target_ms
        self.interval_s = interval_ms / 1000.0
        self._clock = clock
        self.shedding = False
        self._above_since: float | None = None  # first of an unbroken run of late requests
        self._last_above = float("-inf")

    def admit(self, waited_ms: float) -> bool:
        now = self._clock()
        if self.shedding and now - self._last_above >= self.interval_s:
            self.shedding = False  # no late request for a whole interval: the queue is gone
            self._above_since = None
        if waited_ms <= self.target_ms:
            self._above_since = None
            return True
        self._last_above = now
        if self._above_since is None:
            self._above_since = now
        if not self.shedding and now - self._above_since >= self.interval_s:
            self.shedding = True
        return not self.shedding


def _option(name: str) -> Any:
    return getattr(settings, "RECO", {}).get(name, DEFAULTS[name])


class SheddingMiddleware:
    """First in MIDDLEWARE: refuse a request the process cannot serve in time."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response
        self.enabled = bool(_option("SHED_ENABLED"))
        target = float(_option("SHED_QUEUE_TARGET_MS"))
        self.queue = (
            StandingQueue(target, float(_option("SHED_QUEUE_INTERVAL_MS"))) if target > 0 else None
        )
        self.max_in_flight = int(_option("SHED_MAX_IN_FLIGHT"))
        self.retry_after = str(max(1, int(_option("SHED_RETRY_AFTER_SECONDS"))))
        self._lock = threading.Lock()
        self.in_flight = 0

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if not self.enabled or request.path.startswith(EXEMPT_PATHS):
            return self.get_response(request)
        if self.queue is not None:
            waited = queue_ms(request.META)
            if waited is not None and not self.queue.admit(waited):
                return self.shed("queue_time", waited)
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
        body = {
            "error": "overloaded",
            "detail": "The server is over capacity; retry after the given delay.",
            "reason": reason,
        }
        if waited_ms is not None:
            body["queued_ms"] = round(waited_ms)
        response = HttpResponse(json.dumps(body), status=503, content_type="application/json")
        response["Retry-After"] = self.retry_after
        # Django logs every 5xx at ERROR ("Service Unavailable"): at 2x capacity that is
        # hundreds of lines a second, written while the worker is already behind. A shed is
        # the designed outcome, counted in recommendation_shed_total instead.
        response._has_been_logged = True  # type: ignore[attr-defined]
        return response
