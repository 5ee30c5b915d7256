"""Feature stores: Parquet tables, a read-only SQLite file, and versioned Redis keys. Pure core.

Three places hold the user and item tables of a ``FeatureTables`` (``features.py``):

- **Parquet** (``write_parquet`` / ``read_parquet``): the offline copy in the lake or a bundle.
- **SQLite** (``write_sqlite`` / ``SQLiteFeatureStore``): one file per version, rows of
  ``(id INTEGER PRIMARY KEY, vec BLOB)`` with ``vec`` the float32 little-endian row in catalogue
  order. Written to a temp file and renamed into place, read through a read-only connection with
  a 30 ms busy timeout. This is the fallback the serving path reads when Redis is down.
- **Redis** (``sync_to_redis`` / ``read_from_redis``): ``reco:feat:{version}:{entity}:{id}``
  holds the same float32 bytes; ``reco:feat:{version}:meta:{entity}`` the columns and defaults.
  The pointer ``reco:feat:current`` names the live version and is set only after every key of
  the new version is written, so a reader never sees a half-written version. Older versions
  then expire after a grace period (readers that fetched the old pointer a moment ago still
  find their keys). A sync that cannot reach Redis logs a warning and reports ``skipped``.
  Syncs must not overlap (the pipeline run lock serialises them): a finishing sync retires
  every other registered version, including one still being written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
import pandas as pd
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from apps.pipeline.features import FeatureTables, default_vector, feature_names
from apps.pipeline.frames import write_frames

log = logging.getLogger(__name__)
T = TypeVar("T")

TableEntity = Literal["user", "item"]
ENTITIES: tuple[TableEntity, ...] = ("user", "item")

KEY_PREFIX = "reco:feat"
POINTER_KEY = f"{KEY_PREFIX}:current"
VERSIONS_KEY = f"{KEY_PREFIX}:versions"
_VERSION_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_RESERVED_VERSIONS = frozenset({"current", "versions"})
# Rows per MSET / per SQLite IN (...) query. 1,000 keys of ~200 bytes is ~200 KB per round trip:
# large enough that round trips do not dominate, small enough not to stall Redis for others.
BATCH_SIZE = 1000
_SQLITE_IN_BATCH = 500  # stays far below SQLITE_MAX_VARIABLE_NUMBER on every build
_DTYPE = np.dtype("<f4")


@dataclass(frozen=True)
class FeatureRows:
    """Feature rows of the requested ids, in request order.

    ``values`` is ``(len(ids), len(columns))`` float32; rows of ids the store does not know hold
    the catalogue defaults and have ``found`` False.
    """

    values: npt.NDArray[np.float32]
    found: npt.NDArray[np.bool_]
    columns: tuple[str, ...]
    version: str


@dataclass(frozen=True)
class SyncResult:
    """What ``sync_to_redis`` did: ``synced`` (pointer flipped) or ``skipped`` (untouched)."""

    status: Literal["synced", "skipped"]
    version: str
    keys_written: int
    previous_version: str | None = None
    reason: str = ""
    seconds: float = 0.0
    retired_versions: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------- Parquet


def write_parquet(directory: Path, tables: FeatureTables) -> dict[str, str]:
    """Write ``user_features.parquet``, ``item_features.parquet`` and ``features_meta.json``.

    Each file is replaced atomically (temp file + rename); returns name -> path.
    """
    paths = write_frames(
        directory,
        {
            "user_features": tables.user.reset_index(),
            "item_features": tables.item.reset_index(),
        },
    )
    meta = directory / "features_meta.json"
    tmp = directory / f".features_meta.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"cutoff": tables.cutoff.isoformat()}))
    os.replace(tmp, meta)
    paths["features_meta"] = str(meta)
    return paths


def read_parquet(directory: Path) -> FeatureTables:
    """Read tables written by ``write_parquet``."""
    meta = json.loads((directory / "features_meta.json").read_text())
    user = pd.read_parquet(directory / "user_features.parquet").set_index("user_id")
    item = pd.read_parquet(directory / "item_features.parquet").set_index("item_id")
    return FeatureTables(user=user, item=item, cutoff=pd.Timestamp(meta["cutoff"]))


# ------------------------------------------------------------------------------------ SQLite


def write_sqlite(path: Path, tables: FeatureTables, *, version: str) -> Path:
    """Write a complete SQLite feature store at ``path`` (atomically replacing any old file)."""
    _check_version(version)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    try:
        conn.execute(
            "PRAGMA journal_mode = OFF"
        )  # a fresh file renamed into place: no journal needed
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        meta: dict[str, str] = {"version": version, "cutoff": tables.cutoff.isoformat()}
        for entity in ENTITIES:
            frame = tables.frame(entity)
            columns = feature_names(entity)
            conn.execute(
                f"CREATE TABLE {entity}_features (id INTEGER PRIMARY KEY, vec BLOB NOT NULL)"
            )
            conn.executemany(
                f"INSERT INTO {entity}_features (id, vec) VALUES (?, ?)",
                _rows(frame, columns),
            )
            meta[f"{entity}_columns"] = json.dumps(columns)
            meta[f"{entity}_defaults"] = json.dumps(default_vector(entity).tolist())
        conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
        conn.commit()
    finally:
        conn.close()
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


class SQLiteFeatureStore:
    """Read-only access to a file written by ``write_sqlite``; safe to share between threads."""

    def __init__(self, path: Path, *, busy_timeout_ms: int = 30) -> None:
        uri = f"{path.resolve().as_uri()}?mode=ro"
        # Short busy timeout: on the request path a locked file must fail fast, not queue.
        self._conn = sqlite3.connect(
            uri, uri=True, timeout=busy_timeout_ms / 1000.0, check_same_thread=False
        )
        self._lock = threading.Lock()
        meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        self.version: str = meta["version"]
        self.cutoff = pd.Timestamp(meta["cutoff"])
        self._columns = {e: tuple(json.loads(meta[f"{e}_columns"])) for e in ENTITIES}
        self._defaults = {
            e: np.array(json.loads(meta[f"{e}_defaults"]), dtype=np.float32) for e in ENTITIES
        }

    def columns(self, entity: TableEntity) -> tuple[str, ...]:
        """Column names of ``entity`` rows."""
        return self._columns[entity]

    def get_user(self, ids: Sequence[int] | npt.NDArray[np.int64]) -> FeatureRows:
        """Rows of the given user ids (defaults where unknown)."""
        return self._get("user", ids)

    def get_item(self, ids: Sequence[int] | npt.NDArray[np.int64]) -> FeatureRows:
        """Rows of the given item ids (defaults where unknown)."""
        return self._get("item", ids)

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def _get(self, entity: TableEntity, ids: Sequence[int] | npt.NDArray[np.int64]) -> FeatureRows:
        wanted = [int(x) for x in ids]
        blobs: dict[int, bytes] = {}
        with self._lock:
            for start in range(0, len(wanted), _SQLITE_IN_BATCH):
                chunk = wanted[start : start + _SQLITE_IN_BATCH]
                marks = ",".join("?" * len(chunk))
                cursor = self._conn.execute(
                    f"SELECT id, vec FROM {entity}_features WHERE id IN ({marks})", chunk
                )
                blobs.update(cursor.fetchall())
        return _assemble(
            [blobs.get(x) for x in wanted],
            self._defaults[entity],
            self._columns[entity],
            self.version,
        )


# ------------------------------------------------------------------------------------- Redis


def make_redis_client(url: str, *, timeout: float = 0.05) -> redis.Redis:
    """A binary-safe client with explicit connect/read timeouts and no retries.

    Retries stay with the caller: on the request path a retry only doubles the wait, and the
    offline sync is idempotent and simply runs again.
    """
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
    )


def sync_to_redis(
    client: redis.Redis,
    features: FeatureTables,
    version: str,
    *,
    batch_size: int = BATCH_SIZE,
    grace_seconds: int = 300,
) -> SyncResult:
    """Write every row under ``version``, then flip ``reco:feat:current`` to it.

    Never raises on a Redis failure: it logs a warning and returns ``skipped`` with the pointer
    left on the previous version (readers keep reading it; the SQLite store serves if Redis is
    gone). Keys of a half-written version carry no pointer and are retired by the next
    successful sync. ``grace_seconds`` is how long the replaced versions' keys live on.
    """
    _check_version(version)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive (got {batch_size})")
    started = time.monotonic()
    written = 0
    previous: str | None = None
    try:
        raw = client.get(POINTER_KEY)
        previous = None if raw is None else _text(raw)
        if previous == version:
            # A task that runs twice: the version is complete and live already.
            return SyncResult(
                status="synced",
                version=version,
                keys_written=0,
                previous_version=previous,
                reason="already live",
                seconds=time.monotonic() - started,
            )
        # Register first, so that a sync dying half-way leaves keys the next one can find.
        client.sadd(VERSIONS_KEY, version)
        for entity in ENTITIES:
            meta = {
                "columns": feature_names(entity),
                "defaults": default_vector(entity).tolist(),
                "cutoff": features.cutoff.isoformat(),
            }
            client.set(_meta_key(version, entity), json.dumps(meta))
            frame = features.frame(entity)
            for batch in _chunks(_rows(frame, feature_names(entity)), batch_size):
                client.mset({_key(version, entity, key): blob for key, blob in batch})
                written += len(batch)
        # The flip: one SET, after every key above was acknowledged.
        client.set(POINTER_KEY, version)
    except (redis.RedisError, OSError) as exc:  # ConnectionError, TimeoutError, OOM, ...
        log.warning(
            "feature sync to Redis skipped for version %s after %d keys: %s",
            version,
            written,
            exc,
        )
        return SyncResult(
            status="skipped",
            version=version,
            keys_written=written,
            previous_version=previous,
            reason=f"{type(exc).__name__}: {exc}",
            seconds=time.monotonic() - started,
        )
    retired = _retire_old_versions(client, keep=version, grace_seconds=grace_seconds)
    return SyncResult(
        status="synced",
        version=version,
        keys_written=written,
        previous_version=previous,
        seconds=time.monotonic() - started,
        retired_versions=retired,
    )


def read_from_redis(
    client: redis.Redis,
    entity: TableEntity,
    ids: Sequence[int] | npt.NDArray[np.int64],
    *,
    version: str | None = None,
) -> FeatureRows | None:
    """Rows of ``ids`` from the live version (or ``version``): one GET of the pointer, one MGET.

    Returns None when nothing is published (no pointer, or the version's metadata is gone).
    Redis errors propagate: the caller's circuit breaker counts them and falls back.
    """
    if version is None:
        raw = client.get(POINTER_KEY)
        if raw is None:
            return None
        version = _text(raw)
    keys = [_meta_key(version, entity)] + [_key(version, entity, int(x)) for x in ids]
    values = client.mget(keys)
    if values[0] is None:
        return None
    columns, defaults = _parse_meta(bytes(values[0]))
    return _assemble(values[1:], defaults, columns, version)


def read_with_fallback(
    entity: TableEntity,
    ids: Sequence[int] | npt.NDArray[np.int64],
    *,
    client: redis.Redis | None,
    store: SQLiteFeatureStore,
) -> tuple[FeatureRows, Literal["redis", "sqlite"]]:
    """Read from Redis; on a Redis error or an empty Redis, from the SQLite store."""
    if client is not None:
        try:
            rows = read_from_redis(client, entity, ids)
        except (redis.RedisError, OSError) as exc:
            log.warning("feature read from Redis failed, using SQLite: %s", exc)
        else:
            if rows is not None:
                return rows, "redis"
    getter = store.get_user if entity == "user" else store.get_item
    return getter(ids), "sqlite"


def current_version(client: redis.Redis) -> str | None:
    """The live version named by the pointer, or None."""
    raw = client.get(POINTER_KEY)
    return None if raw is None else _text(raw)


# ----------------------------------------------------------------------------------- helpers


def _check_version(version: str) -> None:
    # The version is part of a SCAN pattern: no glob characters, no clash with fixed keys.
    if not _VERSION_RE.match(version) or version in _RESERVED_VERSIONS:
        raise ValueError(f"invalid feature version {version!r} (use [A-Za-z0-9._-], 1-64 chars)")


def _key(version: str, entity: str, key: int) -> str:
    return f"{KEY_PREFIX}:{version}:{entity}:{key}"


def _meta_key(version: str, entity: str) -> str:
    return f"{KEY_PREFIX}:{version}:meta:{entity}"


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _rows(frame: pd.DataFrame, columns: Sequence[str]) -> Iterator[tuple[int, bytes]]:
    """(id, float32 little-endian row bytes) for every row, columns in catalogue order."""
    matrix = np.ascontiguousarray(frame[list(columns)].to_numpy(dtype=_DTYPE))
    ids = frame.index.to_numpy(dtype=np.int64)
    width = matrix.shape[1] * _DTYPE.itemsize
    buffer = matrix.tobytes()
    for k, key in enumerate(ids.tolist()):
        yield key, buffer[k * width : (k + 1) * width]


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for row in items:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _assemble(
    blobs: Sequence[Any], defaults: npt.NDArray[np.float32], columns: tuple[str, ...], version: str
) -> FeatureRows:
    width = len(columns)
    values = np.tile(defaults, (len(blobs), 1))
    found = np.array([b is not None and len(b) == width * 4 for b in blobs], dtype=bool)
    if found.any():
        joined = b"".join(bytes(b) for b, ok in zip(blobs, found, strict=True) if ok)
        values[found] = np.frombuffer(joined, dtype=_DTYPE).reshape(-1, width)
    return FeatureRows(values=values, found=found, columns=columns, version=version)


@lru_cache(maxsize=16)
def _parse_meta(raw: bytes) -> tuple[tuple[str, ...], npt.NDArray[np.float32]]:
    # Cached by content: the same metadata is read with every request of a version.
    meta = json.loads(raw)
    defaults = np.array(meta["defaults"], dtype=np.float32)
    defaults.setflags(write=False)
    return tuple(meta["columns"]), defaults


def _retire_old_versions(client: redis.Redis, *, keep: str, grace_seconds: int) -> tuple[str, ...]:
    """Expire (or delete, with grace 0) the keys of every registered version except ``keep``.

    Best effort: the new version is already live, so a failure here only leaves garbage that
    the next sync retires.
    """
    retired: list[str] = []
    try:
        versions = sorted(_text(v) for v in client.smembers(VERSIONS_KEY))
        for old in versions:
            if old == keep:
                continue
            keys = client.scan_iter(match=f"{KEY_PREFIX}:{old}:*", count=1000)
            for batch in _chunks(keys, BATCH_SIZE):
                pipe = client.pipeline(transaction=False)
                for key in batch:
                    if grace_seconds > 0:
                        pipe.expire(key, grace_seconds)
                    else:
                        pipe.unlink(key)
                pipe.execute()
            client.srem(VERSIONS_KEY, old)
            retired.append(old)
    except (redis.RedisError, OSError) as exc:
        log.warning("retiring old feature versions failed (the next sync retries): %s", exc)
    return tuple(retired)
