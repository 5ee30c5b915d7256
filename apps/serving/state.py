"""Per-process serving state: the snapshots of every version that serves (primary, canary,
shadow, and versions pinned by a running experiment variant), the experiments snapshot and the
Redis readers, swapped by reference when the registry changes (CONVENTIONS rule 8).

Requests call `current()`, which never touches the database except on the very first call
(nothing to serve yet). Afterwards, at most every `poll_seconds`, a request starts one
background thread that polls the registry and the experiments config version and, on a change,
loads the new snapshots and swaps them in. With Redis configured, a listener thread also
subscribes to the registry's and the experiments' change channels and refreshes at once, so a
promotion reaches every worker in well under a second; polling stays as the safety net for a
lost message. A bundle that fails to load is logged and the old snapshot keeps serving. Tests
call `refresh()` directly.

Routing (`Current.route`): a version pinned by the request's experiment variant wins when it is
loaded; otherwise a unit (user or visitor) whose canary bucket, `sha256("canary:<version>:unit")
mod 10000`, falls below the canary's traffic share gets the canary; everyone else the primary.
The bucket is stable per unit and version, so a user does not flip between models.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import redis
from django.conf import settings
from django.db import close_old_connections

from apps.experiments.bucketing import ExperimentsSnapshot, bucket
from apps.experiments.selectors import experiments_config_version, experiments_snapshot
from apps.models.selectors import model_version_servable, model_version_serving_state
from apps.serving import metrics, shedding
from apps.serving.engine.breaker import CircuitBreaker
from apps.serving.engine.degrade import Deadline
from apps.serving.engine.recommend import Stores
from apps.serving.engine.redis_store import RedisCandidateStore, make_serving_client
from apps.serving.engine.snapshot import ServingSnapshot, SnapshotError, load_snapshot

logger = logging.getLogger(__name__)

DEFAULT_POLL_SECONDS = 5.0
DEFAULT_REDIS_TIMEOUT_MS = 50
DEFAULT_REDIS_PREFIX = "reco"
DEFAULT_BREAKER_FAILURES = 3
DEFAULT_BREAKER_RESET_SECONDS = 2.0
BUCKETS = 10_000
# The channels `model_version_promote` & co. and the experiment services publish on.
CHANGE_CHANNELS = ("reco:model:changed", "reco:experiments:changed")


def _option(name: str, default: Any) -> Any:
    return getattr(settings, "RECO", {}).get(name, default)


def make_breaker(name: str) -> CircuitBreaker:
    """A per-process breaker configured by RECO["SERVING_BREAKER_*"], exported to metrics."""
    breaker = CircuitBreaker(
        name,
        failure_threshold=int(_option("SERVING_BREAKER_FAILURES", DEFAULT_BREAKER_FAILURES)),
        reset_timeout=float(
            _option("SERVING_BREAKER_RESET_SECONDS", DEFAULT_BREAKER_RESET_SECONDS)
        ),
        on_transition=lambda dependency, _old, new: metrics.observe_breaker(dependency, str(new)),
    )
    metrics.observe_breaker(name, "closed")
    return breaker


def load_with_store_breaker(bundle: Path, version: str) -> ServingSnapshot:
    """The default loader: the bundle's local store behind its own breaker, so a locked
    store.sqlite3 costs its 30 ms busy timeout a few times, not on every request."""
    snapshot = load_snapshot(
        bundle, version, store_breaker=make_breaker("local_store"), require_ranker=False
    )
    if snapshot.ranker_error is not None:
        metrics.MODEL_LOAD_FAILURES.inc()
        logger.error(
            "serving: %s serves without its ranker (recall order, labelled ranker_failed): %s",
            version,
            snapshot.ranker_error,
        )
    return snapshot


_NO_SNAPSHOTS: Mapping[str, ServingSnapshot] = MappingProxyType({})
_NO_STORES: Mapping[str, Stores] = MappingProxyType({})


def canary_bucket(version: str, unit: str | int) -> int:
    """The unit's stable canary bucket for ``version`` (0..9999)."""
    return bucket(f"canary:{version}", unit)


@dataclass(frozen=True)
class Current:
    """What one request serves from: read once, so a swap mid-request cannot mix bundles.

    `snapshot`/`stores` are the primary's. `canary` serves `canary_share` of units, `shadow`
    only scores in the background, `pinned` holds versions that experiment variants name.
    """

    snapshot: ServingSnapshot | None
    experiments: ExperimentsSnapshot
    stores: Stores
    canary: ServingSnapshot | None = None
    canary_share: float = 0.0
    shadow: ServingSnapshot | None = None
    pinned: Mapping[str, ServingSnapshot] = field(default_factory=lambda: _NO_SNAPSHOTS)
    stores_by_version: Mapping[str, Stores] = field(default_factory=lambda: _NO_STORES)

    def route(
        self, unit: str | int | None, pinned_version: str | None = None
    ) -> ServingSnapshot | None:
        """The snapshot this unit is served from (see the module docstring)."""
        if pinned_version is not None:
            pinned = self.pinned.get(pinned_version)
            if pinned is not None:
                return pinned
        canary = self.canary
        if (
            canary is not None
            and unit is not None
            and self.canary_share > 0
            and canary_bucket(canary.model_version, unit) < round(self.canary_share * BUCKETS)
        ):
            return canary
        return self.snapshot

    def stores_for(self, snapshot: ServingSnapshot) -> Stores:
        """The online stores of `snapshot`'s version (Redis keys are per version)."""
        if self.snapshot is not None and snapshot is self.snapshot:
            return self.stores
        return self.stores_by_version.get(snapshot.model_version, Stores())


class ServingState:
    """The holder of one process's serving references (thread-safe; swaps are atomic)."""

    def __init__(
        self,
        *,
        redis_url: str | None = None,
        poll_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        loader: Callable[[Path, str], ServingSnapshot] = load_with_store_breaker,
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
        self._canary: ServingSnapshot | None = None
        self._canary_share = 0.0
        self._shadow: ServingSnapshot | None = None
        self._pinned: Mapping[str, ServingSnapshot] = _NO_SNAPSHOTS
        self._loaded_versions: dict[str, ServingSnapshot] = {}
        self._experiments = ExperimentsSnapshot(version=0)
        self._stores = Stores()
        self._stores_by_version: Mapping[str, Stores] = _NO_STORES
        self._loaded = False
        self._last_poll = float("-inf")
        self._client: redis.Redis | None = None
        self._breaker: CircuitBreaker | None = None
        self._listener: threading.Thread | None = None
        self._listen = bool(_option("SERVING_PUBSUB", True)) and background
        self.notifications = 0  # change messages received (tests, /ready)
        if self.redis_url:
            timeout = int(_option("SERVING_REDIS_TIMEOUT_MS", DEFAULT_REDIS_TIMEOUT_MS))
            self._client = make_serving_client(self.redis_url, timeout_ms=timeout)
            self._breaker = make_breaker("redis_candidates")

    @property
    def breaker(self) -> CircuitBreaker | None:
        """The per-process breaker in front of Redis (None without Redis)."""
        return self._breaker

    def current(self) -> Current:
        """The references to serve this request from; schedules a poll when one is due."""
        if not self._loaded:
            self.refresh()  # first request: nothing to serve until the first load
            self._start_listener()
        elif self._clock() - self._last_poll >= self.poll_seconds:
            self._poll_in_background()
        return Current(
            self._snapshot,
            self._experiments,
            self._stores,
            canary=self._canary,
            canary_share=self._canary_share,
            shadow=self._shadow,
            pinned=self._pinned,
            stores_by_version=self._stores_by_version,
        )

    def refresh(self) -> bool:
        """Poll the registry and experiments now; swap what changed. Returns True when the
        model snapshot changed. Errors are logged: the old references keep serving."""
        with self._lock:
            self._last_poll = self._clock()
            changed = False
            try:
                self._refresh_experiments()
            except Exception:
                logger.exception("serving: experiments refresh failed; keeping the current one")
            try:
                changed = self._refresh_model()
            except Exception:
                logger.exception("serving: model refresh failed; keeping the current snapshot")
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

    def _load(self, version: str, bundle_path: str) -> ServingSnapshot | None:
        """The loaded snapshot of `version` (reused when already loaded), None if it fails."""
        loaded = self._loaded_versions.get(version)
        if loaded is not None:
            return loaded
        bundle = Path(bundle_path)
        if not bundle.is_absolute():
            bundle = Path(settings.BASE_DIR) / bundle
        try:
            with shedding.model_loading():
                snapshot = self._loader(bundle, version)
        except SnapshotError:
            metrics.MODEL_LOAD_FAILURES.inc()
            logger.exception("serving: cannot load %s; keeping what serves now", version)
            return None
        logger.info("serving: loaded %s from %s", version, bundle)
        return snapshot

    def _refresh_model(self) -> bool:
        """Load the registry's primary, canary, shadow and pinned versions; swap; close the
        snapshots nothing refers to any more. True when the primary changed."""
        live = model_version_serving_state()
        wanted_pins = sorted(
            {
                variant.params.model_version
                for experiment in self._experiments.experiments
                for variant in experiment.variants
                if variant.params.model_version
            }
        )
        pinned_rows = model_version_servable(wanted_pins) if wanted_pins else {}
        keep: dict[str, ServingSnapshot] = {}

        def load(row: Mapping[str, Any] | None, current: ServingSnapshot | None):
            if row is None:
                return None
            snapshot = self._load(row["version"], row["bundle_path"])
            if snapshot is None:  # a failed load keeps the old one only for the same role
                snapshot = current
            if snapshot is not None:
                keep[snapshot.model_version] = snapshot
            return snapshot

        old_primary = self._snapshot
        primary = load(live["primary"], old_primary)
        if live["primary"] is None and old_primary is not None:
            logger.warning("serving: the registry has no primary; serving nothing")
        canary = load(live["canary"], self._canary)
        shadow = load(live["shadow"], self._shadow)
        pinned = {}
        for version, row in pinned_rows.items():
            snapshot = load(row, self._pinned.get(version))
            if snapshot is not None:
                pinned[version] = snapshot
        # The swap: plain reference assignments, each a complete snapshot.
        self._snapshot = primary
        self._canary = canary
        self._canary_share = float(live["canary"]["traffic_share"]) if canary else 0.0
        self._shadow = shadow
        self._pinned = MappingProxyType(pinned)
        retired = [s for v, s in self._loaded_versions.items() if keep.get(v) is not s]
        self._loaded_versions = keep
        # A request still holding a retired snapshot reopens its store transparently.
        for snapshot in retired:
            snapshot.close()
        if primary is not old_primary and primary is not None:
            logger.info("serving: now serving %s", primary.model_version)
        return primary is not old_primary

    def _refresh_experiments(self) -> None:
        version = experiments_config_version()
        if version != self._experiments.version or not self._loaded:
            self._experiments = experiments_snapshot()

    def _refresh_stores(self) -> None:
        if self._client is None or self._breaker is None or self._snapshot is None:
            self._stores = Stores()
            self._stores_by_version = _NO_STORES
            return
        by_version = {}
        for version in self._loaded_versions:
            by_version[version] = self._stores_of(version)
        self._stores_by_version = MappingProxyType(by_version)
        self._stores = by_version[self._snapshot.model_version]

    def _stores_of(self, version: str) -> Stores:
        assert self._client is not None
        assert self._breaker is not None
        store = RedisCandidateStore(self._client, self._breaker, version, prefix=self.prefix)
        previous = self._stores_by_version.get(version)
        published = previous.redis_published if previous is not None else True
        try:
            # The version's popular key is written with every publish: it says whether this
            # bundle's lists are in Redis at all. One EXISTS per version per poll.
            published = bool(
                self._breaker.call(self._client.exists, f"{self.prefix}:{version}:popular")
            )
        except Exception as exc:  # an outage: requests find out through the breaker
            logger.warning("serving: cannot check the redis version key: %s", exc)
        return Stores(redis=store, redis_published=published)

    # -- change notifications -------------------------------------------------------------

    def _start_listener(self) -> None:
        """Subscribe to the change channels on a daemon thread (once; Redis only)."""
        if not (self._listen and self.redis_url) or self._listener is not None:
            return
        self._listener = threading.Thread(
            target=self._listen_forever, name="serving-changes", daemon=True
        )
        self._listener.start()

    def _listen_forever(self) -> None:
        backoff = 1.0
        while True:
            try:
                # Its own connection: a subscriber blocks on reads, which the request path's
                # short socket timeout would turn into constant reconnects.
                client = redis.Redis.from_url(
                    self.redis_url, socket_connect_timeout=2, socket_timeout=30
                )
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(*CHANGE_CHANNELS)
                backoff = 1.0
                while True:
                    message = pubsub.get_message(timeout=10.0)
                    if message is not None and message.get("type") == "message":
                        self.notifications += 1
                        self.refresh()
                        close_old_connections()
            except Exception as exc:  # Redis away: polling covers; try again later
                logger.info("serving: change listener reconnecting in %.0fs: %s", backoff, exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)


def stores_with_deadline(stores: Stores, deadline: Deadline | None) -> Stores:
    """The same stores with one request's deadline attached."""
    return replace(stores, deadline=deadline)


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
