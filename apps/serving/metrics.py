"""Prometheus metrics of the recommendation API.

Label values come from fixed vocabularies only (endpoint names, HTTP status codes, `Reason`
values, operation names, model versions): never a user, item or request id, which would grow
the series without bound. The metrics live in prometheus_client's default registry, which
django-prometheus exposes at /metrics; under a multi-process server set
PROMETHEUS_MULTIPROC_DIR and prometheus_client aggregates the workers' files.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from apps.serving.engine.sources import Reason

REQUESTS = Counter(
    "recommendation_requests_total",
    "API requests by endpoint and HTTP status.",
    ["endpoint", "status"],
)
LATENCY = Histogram(
    "recommendation_latency_seconds",
    "Time to answer an API request, by endpoint.",
    ["endpoint"],
    # Serving targets tens of milliseconds; the tail buckets show a hung dependency.
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0),
)
DEGRADED = Counter(
    "recommendation_degraded_total",
    "Responses marked degraded, by reason.",
    ["reason"],
)
TIMEOUTS = Counter(
    "recommendation_timeouts_total",
    "Requests whose answer was changed by a timeout, by the operation that timed out.",
    ["operation"],
)
EXPOSURES = Counter(
    "recommendation_exposures_total",
    "Exposure log lines accepted by the writer's queue.",
)
EXPOSURE_DROPPED = Counter(
    "recommendation_exposure_dropped_total",
    "Log lines (exposures and feedback) dropped because the writer's queue was full.",
)
# "liveall": under multiprocess mode every live worker reports the version it serves, so a
# rollout shows as two versions until all workers have swapped.
MODEL_INFO = Gauge(
    "recommendation_model_info",
    "1 for the model version this process serves.",
    ["version"],
    multiprocess_mode="liveall",
)

# 0 closed, 1 half-open, 2 open; "max": the worst worker shows.
BREAKER_STATE = Gauge(
    "recommendation_breaker_state",
    "Circuit breaker state per dependency: 0 closed, 1 half-open, 2 open (worst worker).",
    ["dependency"],
    multiprocess_mode="max",
)
QUEUE_SIZE = Gauge(
    "recommendation_thread_pool_queue_size",
    "Jobs waiting in a background pool of the serving process (shadow scoring, log writer).",
    ["pool"],
    multiprocess_mode="livesum",
)
CANDIDATES = Counter(
    "recommendation_candidates_total",
    "Candidates read from the online store per recall channel.",
    ["channel"],
)
SHADOW = Counter(
    "recommendation_shadow_total",
    "Shadow-model scorings by outcome (scored, dropped: queue full, failed).",
    ["outcome"],
)
MODEL_LOAD_FAILURES = Counter(
    "recommendation_model_load_failures_total",
    "Bundles a serving worker could not load (it kept serving the previous snapshot).",
)
ROUTED = Counter(
    "recommendation_routed_total",
    "Recommendation answers by the registry role of the model that served them.",
    ["role"],
)

# Which degradation reasons are timeouts, and of which operation.
_TIMEOUT_OPERATIONS: dict[str, str] = {
    Reason.REDIS_TIMEOUT: "redis_candidates",
    Reason.BUDGET_EXHAUSTED: "request_budget",
    Reason.RANKER_TIMEOUT: "ranker",
}
_BREAKER_VALUES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}

_model_lock = threading.Lock()
_model_version: str | None = None


def observe_request(endpoint: str, status: int, seconds: float) -> None:
    """Count one answered request and its latency."""
    REQUESTS.labels(endpoint=endpoint, status=str(status)).inc()
    LATENCY.labels(endpoint=endpoint).observe(seconds)


def observe_degraded(reason: str) -> None:
    """Count one degraded response, and a timeout when the reason is one."""
    DEGRADED.labels(reason=reason).inc()
    operation = _TIMEOUT_OPERATIONS.get(reason)
    if operation is not None:
        TIMEOUTS.labels(operation=operation).inc()


def observe_breaker(dependency: str, state: str) -> None:
    """Export a breaker's state (closed / half_open / open)."""
    BREAKER_STATE.labels(dependency=dependency).set(_BREAKER_VALUES.get(state, 2.0))


def observe_candidates(lists: Mapping[str, Any]) -> None:
    """Count the candidates each channel contributed to one request (`(item, score)` pairs
    or an `(ids, scores)` pair of arrays per channel)."""
    for channel, items in lists.items():
        n = len(items[0]) if isinstance(items, tuple) else len(items)
        if n:
            CANDIDATES.labels(channel=channel).inc(n)


def set_model_version(version: str | None) -> None:
    """Point `recommendation_model_info` at the served version (cheap when unchanged)."""
    global _model_version
    if version == _model_version:
        return
    with _model_lock:
        if version == _model_version:
            return
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ:
            # clear() is not implemented in multi-process mode (prometheus_client only warns):
            # the previous version would keep reporting 1 beside the new one, so zero it.
            if _model_version is not None:
                MODEL_INFO.labels(version=_model_version).set(0)
        else:
            MODEL_INFO.clear()
        if version is not None:
            MODEL_INFO.labels(version=version).set(1)
        _model_version = version
