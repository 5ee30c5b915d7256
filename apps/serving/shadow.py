"""Shadow scoring: the registry's shadow model answers a sample of requests off the request path.

A request that the primary (or canary) answered hands a job to this process's `ShadowPool`:
a bounded queue drained by one daemon thread. The thread runs the same engine call against
the shadow's snapshot and stores and writes one `shadow` log line comparing the two answers
(`overlap` = shared items / served items). The request never waits: when the queue is full
the job is dropped and counted (`recommendation_shadow_total{outcome="dropped"}`), and a
failing shadow is logged and counted, never seen by the client.

`RECO["SHADOW_SAMPLE"]` (default 0.2) is the share of eligible requests scored; sampling is
by request, not by user, so the shadow sees every kind of user. On a 2-core machine every
shadow scoring costs the same CPU as the request it mirrors, so keep the share modest.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.utils import timezone

from apps.serving import metrics
from apps.serving.engine.degrade import Outcome
from apps.serving.engine.recommend import RecItem
from apps.serving.exposure import SHADOW, get_writer

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE = 0.2
DEFAULT_QUEUE_SIZE = 64


@dataclass(frozen=True)
class ShadowJob:
    """One request to replay on the shadow model."""

    request_id: str
    scene: str
    served_version: str
    shadow_version: str
    served_items: tuple[int, ...]
    run: Callable[[], Outcome[RecItem]]


class ShadowPool:
    """A bounded queue and one worker thread (started lazily, restarted after a fork)."""

    def __init__(self, *, queue_size: int = DEFAULT_QUEUE_SIZE, sample: float | None = None):
        configured = getattr(settings, "RECO", {}).get("SHADOW_SAMPLE", DEFAULT_SAMPLE)
        self.sample = float(configured if sample is None else sample)
        self._queue: queue.Queue[ShadowJob] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.scored = 0
        self.dropped = 0
        self.failed = 0

    def wanted(self) -> bool:
        """Whether this request is in the shadow's sample."""
        return self.sample >= 1.0 or (self.sample > 0 and random.random() < self.sample)

    def submit(self, job: ShadowJob) -> bool:
        """Queue the job; never blocks. False (counted) when the queue is full."""
        self._ensure_thread()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.dropped += 1
            metrics.SHADOW.labels(outcome="dropped").inc()
            return False
        metrics.QUEUE_SIZE.labels(pool="shadow").set(self._queue.qsize())
        return True

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until every queued job ran (tests). False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.01)
        return False

    def _ensure_thread(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, name="shadow-scoring", daemon=True
                )
                self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                self._score(job)
            finally:
                self._queue.task_done()
                metrics.QUEUE_SIZE.labels(pool="shadow").set(self._queue.qsize())

    def _score(self, job: ShadowJob) -> None:
        started = time.perf_counter()
        try:
            outcome = job.run()
        except Exception:
            self.failed += 1
            metrics.SHADOW.labels(outcome="failed").inc()
            logger.exception("shadow %s failed on request %s", job.shadow_version, job.request_id)
            return
        shadow_items = [item.item_id for item in outcome.items]
        served = set(job.served_items)
        overlap = len(served.intersection(shadow_items)) / len(served) if served else None
        record: dict[str, Any] = {
            "ts": timezone.now().isoformat(),
            "request_id": job.request_id,
            "scene": job.scene,
            "served_version": job.served_version,
            "shadow_version": job.shadow_version,
            "served_items": list(job.served_items),
            "shadow_items": shadow_items,
            "overlap": None if overlap is None else round(overlap, 4),
            "shadow_source": str(outcome.source),
            "shadow_degraded": outcome.degraded,
            "shadow_latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        get_writer().submit(SHADOW, record)
        self.scored += 1
        metrics.SHADOW.labels(outcome="scored").inc()


_pool: ShadowPool | None = None
_pool_lock = threading.Lock()


def get_pool() -> ShadowPool:
    """The process's shadow pool, created on first use."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ShadowPool()
    return _pool


def set_pool(pool: ShadowPool | None) -> ShadowPool | None:
    """Replace the process's pool (tests); returns the previous one."""
    global _pool
    with _pool_lock:
        previous, _pool = _pool, pool
    return previous
