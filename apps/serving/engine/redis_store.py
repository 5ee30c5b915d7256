"""Candidate lists in Redis: the serving reader (one round trip per read) and the offline writer.

Key layout (all under `prefix`, default "reco"):

    {prefix}:current                  the bundle version being served; written LAST on publish
    {prefix}:{version}:u:{user_id}    hash: channel -> packed list (per-user candidate lists)
    {prefix}:{version}:s:{item_id}    hash: channel -> packed list (similar items)
    {prefix}:{version}:popular        packed list (global popular, rank order)

Keys are versioned so a publish never mixes two bundles: readers keep using the version their
bundle snapshot names until the worker swaps bundles, and the previous version stays in Redis
for an instant rollback. The reader takes the version from its bundle snapshot instead of
reading `{prefix}:current` per request, which would cost a second round trip.

Value encoding ("packed list"): one format byte (0x01), then n little-endian int64 item ids,
then n little-endian float32 scores: 12 bytes an item, no parsing, decoded with
`numpy.frombuffer`. Against JSON (~20 bytes an item and a parse per request) it is smaller and
several times faster to decode; float32 is the precision the ranker works in anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from apps.serving.engine.breaker import BreakerOpen, CircuitBreaker
from apps.serving.engine.sources import StoreUnavailable, Unavailable

FORMAT_V1 = b"\x01"
_ID = np.dtype("<i8")
_SCORE = np.dtype("<f4")
_ITEM_BYTES = _ID.itemsize + _SCORE.itemsize

# Keys written per pipeline round trip when publishing: big enough to amortise the round trip,
# small enough that one batch never blocks the shared Redis for long.
PUBLISH_BATCH = 500

ScoredList = list[tuple[int, float]]


class CorruptValue(ValueError):
    """A value in Redis is not a packed list (a healthy Redis, bad data: not counted)."""


def encode_list(pairs: Iterable[tuple[int, float]]) -> bytes:
    """Pack (item_id, score) pairs in the documented format."""
    rows = list(pairs)
    ids = np.fromiter((int(i) for i, _ in rows), dtype=_ID, count=len(rows))
    scores = np.fromiter((float(s) for _, s in rows), dtype=_SCORE, count=len(rows))
    return FORMAT_V1 + ids.tobytes() + scores.tobytes()


def decode_arrays(value: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Unpack a packed list as `(ids, scores)` arrays; `CorruptValue` when it is not one."""
    if not value.startswith(FORMAT_V1) or (len(value) - 1) % _ITEM_BYTES:
        raise CorruptValue(f"not a packed list ({len(value)} bytes)")
    n = (len(value) - 1) // _ITEM_BYTES
    ids = np.frombuffer(value, dtype=_ID, count=n, offset=1)
    scores = np.frombuffer(value, dtype=_SCORE, count=n, offset=1 + n * _ID.itemsize)
    return ids, scores


def decode_list(value: bytes) -> ScoredList:
    """Unpack a packed list; `CorruptValue` when it is not one."""
    ids, scores = decode_arrays(value)
    return list(zip(ids.tolist(), scores.tolist(), strict=True))


def make_serving_client(
    url: str, *, timeout_ms: int = 50, max_connections: int = 16
) -> redis.Redis:
    """A redis-py client for the request path: bounded connect and read times, no retries.

    redis-py's defaults (5 s timeouts, 10 retries with backoff) turned a SIGSTOPped Redis into
    a 59 s GET; with these settings it fails in about `timeout_ms`. `max_connections` must
    cover the worker's threads: the plain ConnectionPool raises at the limit instead of waiting.
    """
    timeout = timeout_ms / 1000
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        max_connections=max_connections,
    )


def _key(prefix: str, version: str, kind: str, ident: int) -> str:
    return f"{prefix}:{version}:{kind}:{int(ident)}"


class RedisCandidateStore:
    """Reads a bundle version's candidate lists, each read one round trip, behind a breaker.

    Every failure surfaces as `StoreUnavailable` with reason timeout, connection or
    breaker_open; a corrupt value raises `CorruptValue` (a bug or bad data, not an outage).
    """

    def __init__(
        self,
        client: redis.Redis,
        breaker: CircuitBreaker,
        version: str,
        prefix: str = "reco",
    ) -> None:
        self.client = client
        self.breaker = breaker
        self.version = version
        self.prefix = prefix

    def get_user_lists(self, user_id: int, channels: Sequence[str]) -> dict[str, ScoredList]:
        """Candidate lists for `user_id` from the named channels (one HMGET); channels with
        no list are left out, so an unknown user gives an empty dict."""
        return {
            channel: list(zip(ids.tolist(), scores.tolist(), strict=True))
            for channel, (ids, scores) in self.get_user_arrays(user_id, channels).items()
        }

    def get_user_arrays(
        self, user_id: int, channels: Sequence[str]
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """`get_user_lists` as `(ids, scores)` numpy arrays per channel (no Python tuples:
        the ranker's fusion and features work on arrays)."""
        if not channels:
            return {}
        key = _key(self.prefix, self.version, "u", user_id)
        values = self._run(self.client.hmget, key, list(channels))
        return {
            channel: decode_arrays(value)
            for channel, value in zip(channels, values, strict=True)
            if value is not None
        }

    def get_similar(self, item_id: int) -> dict[str, ScoredList]:
        """Similar-item lists for `item_id`, by channel (one HGETALL)."""
        key = _key(self.prefix, self.version, "s", item_id)
        values = self._run(self.client.hgetall, key)
        return {channel.decode(): decode_list(value) for channel, value in values.items()}

    def get_popular(self) -> ScoredList:
        """The version's popular list in rank order (one GET); empty when missing."""
        value = self._run(self.client.get, f"{self.prefix}:{self.version}:popular")
        return [] if value is None else decode_list(value)

    def _run(self, command: Callable[..., Any], *args: Any) -> Any:
        try:
            return self.breaker.call(command, *args)
        except BreakerOpen as exc:
            raise StoreUnavailable(Unavailable.BREAKER_OPEN, self.breaker.name) from exc
        except redis.exceptions.TimeoutError as exc:
            raise StoreUnavailable(Unavailable.TIMEOUT, str(exc)) from exc
        except (redis.exceptions.ConnectionError, OSError) as exc:
            raise StoreUnavailable(Unavailable.CONNECTION, str(exc)) from exc


def current_version(client: redis.Redis, prefix: str = "reco") -> str | None:
    """The version the pointer key names, or None before the first publish (loader side)."""
    value = client.get(f"{prefix}:current")
    return None if value is None else value.decode()


def publish_bundle_lists(
    client: redis.Redis,
    version: str,
    user_lists: Mapping[int, Mapping[str, Sequence[tuple[int, float]]]],
    similar: Mapping[int, Mapping[str, Sequence[tuple[int, float]]]],
    popular: Sequence[tuple[int, float]],
    *,
    prefix: str = "reco",
    batch: int = PUBLISH_BATCH,
) -> int:
    """Write a bundle's lists under versioned keys, then flip `{prefix}:current` last.

    Offline side (use a client with ordinary timeouts, not the serving one). Safe to run
    twice: every write is an overwrite of the same versioned key. A crash midway leaves the
    pointer on the previous version, so readers never see a half-written bundle. Returns the
    number of keys written, the pointer excluded.
    """
    if ":" in version or not version:
        raise ValueError("version must be a non-empty string without ':'")
    written = 0
    pipe = client.pipeline(transaction=False)
    pending = 0

    def flush() -> None:
        nonlocal pending
        if pending:
            pipe.execute()
            pending = 0

    for kind, table in (("u", user_lists), ("s", similar)):
        for ident, lists in table.items():
            mapping = {channel: encode_list(pairs) for channel, pairs in lists.items()}
            if not mapping:
                continue
            key = _key(prefix, version, kind, ident)
            # Replace, not merge: a re-publish must not keep a channel the bundle dropped.
            pipe.delete(key)
            pipe.hset(key, mapping=mapping)
            pending += 1
            written += 1
            if pending >= batch:
                flush()
    pipe.set(f"{prefix}:{version}:popular", encode_list(popular))
    written += 1
    pending += 1
    flush()
    client.set(f"{prefix}:current", version)
    return written
