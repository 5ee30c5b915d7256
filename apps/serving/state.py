"""Per-process serving state: the current primary's snapshot, the experiments snapshot and the
Redis reader, swapped by reference when the registry changes (CONVENTIONS rule 8).

Requests call `current()`, which never touches the database except on the very first call
(nothing to serve yet). Afterwards, at most every `poll_seconds`, a request starts one
background thread that polls the registry's primary and the experiments config version and, on
a change, loads the new snapshot and swaps it in. A bundle that fails to load is logged and the
old snapshot keeps serving. Tests call `refresh()` directly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from django.conf import settings
from django.db import close_old_connections

from apps.experiments.bucketing import ExperimentsSnapshot
from apps.experiments.selectors import experiments_config_version, experiments_snapshot
from apps.models.selectors import model_version_primary
from apps.serving.engine.breaker import CircuitBreaker
from apps.serving.engine.recommend import Stores
from apps.serving.engine.redis_store import RedisCandidateStore, make_serving_client
from apps.serving.engine.snapshot import ServingSnapshot, SnapshotError, load_snapshot

logger = logging.getLogger(__name__)

DEFAULT_POLL_SECONDS = 5.0
DEFAULT_REDIS_TIMEOUT_MS = 50
DEFAULT_REDIS_PREFIX = "reco"


def _option(name: str, default: Any) -> Any:
    return getattr(settings, "RECO", {}).get(name, default)


@dataclass(frozen=True)
class Current:
    """What one request serves from: read once, so a swap mid-request cannot mix bundles."""

    snapshot: ServingSnapshot | None
    experiments: ExperimentsSnapshot
    stores: Stores


class ServingState:
    """The holder of one process's serving references (thread-safe; swaps are atomic)."""

    def __init__(
        self,
        *,
        redis_url: str | None = None,
        poll_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        loader: Callable[[Path, str], ServingSnapshot] = load_snapshot,
        background: bool = True,
    ) -> None:
        self.redis_url = settings.REDIS_URL if redis_url is None else redis_url
        self.poll_seconds = float(
            _option("SERVING_POLL_SECONDS", DEFAULT_POLL_SECONDS)
            if poll_seconds is None
            else poll_seconds
        )
        self.prefix = str(_option("SERVING_REDIS_PREFIX", DEFAULT_REDIS_PREFIX))
        self._clock = clock
        self._loader = loader
        self._background = background
        self._lock = threading.Lock()  # held by the one refresh in progress
        self._snapshot: ServingSnapshot | None = None
        self._experiments = ExperimentsSnapshot(version=0)
        self._stores = Stores()
        self._loaded = False
        self._last_poll = float("-inf")
        self._client: redis.Redis | None = None
        self._breaker: CircuitBreaker | None = None
        if self.redis_url:
            timeout = int(_option("SERVING_REDIS_TIMEOUT_MS", DEFAULT_REDIS_TIMEOUT_MS))
            self._client = make_serving_client(self.redis_url, timeout_ms=timeout)
            self._breaker = CircuitBreaker("redis_candidates")

    @property
    def breaker(self) -> CircuitBreaker | None:
        """The per-process breaker in front of Redis (None without Redis)."""
        return self._breaker

    def current(self) -> Current:
        """The references to serve this request from; schedules a poll when one is due."""
        if not self._loaded:
            self.refresh()  # first request: nothing to serve until the first load
        elif self._clock() - self._last_poll >= self.poll_seconds:
            self._poll_in_background()
        return Current(self._snapshot, self._experiments, self._stores)

    def refresh(self) -> bool:
        """Poll the registry and experiments now; swap what changed. Returns True when the
        model snapshot changed. Errors are logged: the old references keep serving."""
        with self._lock:
            self._last_poll = self._clock()
            changed = False
            try:
                changed = self._refresh_model()
            except Exception:
                logger.exception("serving: model refresh failed; keeping the current snapshot")
            try:
                self._refresh_experiments()
            except Exception:
                logger.exception("serving: experiments refresh failed; keeping the current one")
            try:
                self._refresh_stores()
            except Exception:
                logger.exception("serving: redis check failed; keeping the current stores")
            self._loaded = True
            return changed

    # -- internals -----------------------------------------------------------------------

    def _poll_in_background(self) -> None:
        if not self._lock.acquire(blocking=False):
            return  # a refresh is already running
        self._last_poll = self._clock()  # claimed: other requests do not start another
        self._lock.release()
        if not self._background:
            self.refresh()
            return
        threading.Thread(
            target=self._background_refresh, name="serving-refresh", daemon=True
        ).start()

    def _background_refresh(self) -> None:
        try:
            self.refresh()
        finally:
            close_old_connections()  # this thread's DB connection must not leak

    def _refresh_model(self) -> bool:
        row = model_version_primary()
        old = self._snapshot
        if row is None:
            if old is not None:
                logger.warning("serving: the registry has no primary; serving nothing")
                self._snapshot = None
                return True
            return False
        if old is not None and old.model_version == row.version:
            return False
        bundle = Path(row.bundle_path)
        if not bundle.is_absolute():
            bundle = Path(settings.BASE_DIR) / bundle
        try:
            new = self._loader(bundle, row.version)
        except SnapshotError:
            logger.exception("serving: cannot load %s; keeping the current snapshot", row.version)
            return False
        self._snapshot = new  # the swap: one reference assignment
        logger.info("serving: now serving %s from %s", row.version, bundle)
        # The old store's connections are closed; a request still holding the old snapshot
        # reopens them transparently.
        if old is not None:
            old.close()
        return True

    def _refresh_experiments(self) -> None:
        version = experiments_config_version()
        if version != self._experiments.version or not self._loaded:
            self._experiments = experiments_snapshot()

    def _refresh_stores(self) -> None:
        snapshot = self._snapshot
        if self._client is None or self._breaker is None or snapshot is None:
            self._stores = Stores()
            return
        store = RedisCandidateStore(
            self._client, self._breaker, snapshot.model_version, prefix=self.prefix
        )
        published = self._stores.redis_published
        try:
            # The version's popular key is written with every publish: it says whether this
            # bundle's lists are in Redis at all. One EXISTS per poll, not per request.
            published = bool(
                self._breaker.call(
                    self._client.exists, f"{self.prefix}:{snapshot.model_version}:popular"
                )
            )
        except Exception as exc:  # an outage: requests find out through the breaker
            logger.warning("serving: cannot check the redis version key: %s", exc)
        self._stores = Stores(redis=store, redis_published=published)


_state: ServingState | None = None
_state_lock = threading.Lock()


def get_state() -> ServingState:
    """The process's serving state, created on first use."""
    global _state
    if _state is None:
        with _state_lock:
            if _state is None:
                _state = ServingState()
    return _state


def set_state(state: ServingState | None) -> None:
    """Replace the process's state (tests, and a reload endpoint later)."""
    global _state
    with _state_lock:
        _state = state
