"""Recommendation answers over a `ServingSnapshot`: for-you, similar items, popular. Pure core.

Each function returns an `Outcome` `(items, source, reason)` from
`degrade.recommend_with_fallback`: Redis (when configured) -> the bundle's local store -> the
snapshot's in-memory popular list. No store error escapes: the chain catches it.

Already-purchased items: the bundle's per-user lists are written with the user's seen items
already removed at training time (`trainer._write_local_store` ranks recall candidates, which
exclude seen items), and Redis holds the same lists. Interactions after the bundle was trained
are not known here; callers may pass them in `exclude`.

Ordering of Redis user lists: Redis stores a user's candidates split by channel (one hash
field each). Bundles trained since 2026-11-28 publish each channel's recall list
(`user_candidates`: the top `per_channel` of every channel, several hundred items), so the
online ranker fuses and scores the very candidates training did. When the snapshot has a
ranker (`snapshot.ranker`, bundles with `features/` and `ranker/`), for-you reads them as
arrays, fuses them (`rank.fuse_arrays`, weighted RRF with the snapshot's or the caller's
channel weights, 1.0 by default) into up to `rank.MAX_CANDIDATES` candidates, re-ranks them
and returns the top `limit`; a failing or too slow ranker keeps the fused (recall) order and
is reported through `on_ranker_failed` (the response labels it `ranker_failed`; not an error,
not a fallback step). Older bundles published their ranked lists split by channel: without a
ranker those fields are merged by descending score, which restores the ranked order. Lists
from the local store are final ranked answers and are served as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from apps.serving.engine.degrade import Deadline, Outcome, StepCounter, recommend_with_fallback
from apps.serving.engine.rank import MAX_CANDIDATES, ChannelArrays, fuse_arrays, pair_arrays
from apps.serving.engine.redis_store import RedisCandidateStore
from apps.serving.engine.snapshot import ServingSnapshot
from apps.serving.engine.sources import Source, StoreUnavailable, Unavailable

POPULAR_CHANNEL = "popular"


@dataclass(frozen=True)
class RecItem:
    """One recommended item as the response shows it."""

    item_id: int
    title: str
    price: float | None
    score: float
    channel: str
    reason: str


@dataclass(frozen=True)
class Stores:
    """The online stores a request may use besides the snapshot.

    `redis` is None when no Redis is configured (the local store is then the normal source).
    `redis_published` False means Redis is configured but the snapshot's version is not
    published there: the Redis step is then counted as unavailable without a round trip.
    """

    redis: RedisCandidateStore | None = None
    redis_published: bool = True
    deadline: Deadline | None = None
    count: StepCounter | None = None


_REASONS = {
    POPULAR_CHANNEL: "Popular right now",
    "trending": "Trending this week",
    "itemcf": "Often bought together with items you viewed",
    "usercf": "Popular with people like you",
    "content": "Similar to items you viewed",
    "semantic": "Related to your interests",
    "vector": "Related to your interests",
    "category": "From a category you like",
    "tag": "Matches topics you follow",
    "price_band": "In your usual price range",
    "ease": "Picked for you",
}


def reason_text(channel: str, *, similar_to: int | None = None) -> str:
    """A short, human explanation of why an item is shown."""
    if similar_to is not None and channel != POPULAR_CHANNEL:
        return f"Similar to item {similar_to}"
    return _REASONS.get(channel, "Recommended for you")


def _items(
    snapshot: ServingSnapshot,
    pairs: Sequence[tuple[int, float, str]],
    limit: int,
    exclude: Collection[int],
    *,
    similar_to: int | None = None,
    category: str | None = None,
) -> list[RecItem]:
    out: list[RecItem] = []
    seen: set[int] = set()
    for item_id, score, channel in pairs:
        if item_id in exclude or item_id in seen:
            continue
        info = snapshot.catalogue.get(item_id)
        if category is not None and (info is None or info.category != category):
            continue
        seen.add(item_id)
        out.append(
            RecItem(
                item_id=int(item_id),
                title=info.title if info else "",
                price=info.price if info else None,
                score=round(float(score), 6),
                channel=channel,
                reason=reason_text(channel, similar_to=similar_to),
            )
        )
        if len(out) >= limit:
            break
    return out


def _redis_step(
    stores: Stores, read: Callable[[RedisCandidateStore], list[RecItem]]
) -> Callable[[], list[RecItem]] | None:
    """The chain's Redis step, or None when no Redis is configured."""
    redis_store = stores.redis
    if redis_store is None:
        return None

    def step() -> list[RecItem]:
        if not stores.redis_published:
            # The version key is missing: Redis cannot answer for this bundle. Counted as
            # unavailable (not as empty) so the response says it is degraded.
            raise StoreUnavailable(
                Unavailable.CONNECTION, f"version {redis_store.version} not published"
            )
        return read(redis_store)

    return step


def _popular_pairs(snapshot: ServingSnapshot) -> list[tuple[int, float, str]]:
    return [(i, s, POPULAR_CHANNEL) for i, s in snapshot.popular]


def _merge_by_score(lists: dict[str, list[tuple[int, float]]]) -> list[tuple[int, float, str]]:
    merged = [(i, s, channel) for channel in sorted(lists) for i, s in lists[channel]]
    merged.sort(key=lambda row: row[1], reverse=True)  # stable: ties keep channel order
    return merged


# A channel's candidates: `(item_id, score)` pairs, or `(ids, scores)` arrays from Redis.
ChannelCandidates = Sequence[tuple[int, float]] | ChannelArrays


def _is_arrays(value: ChannelCandidates) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], np.ndarray)


def _as_arrays(lists: Mapping[str, ChannelCandidates]) -> dict[str, ChannelArrays]:
    out: dict[str, ChannelArrays] = {}
    for channel, value in lists.items():
        if _is_arrays(value):
            out[channel] = value  # type: ignore[assignment]
        elif value:
            out[channel] = pair_arrays(list(value))  # type: ignore[arg-type]
    return out


def _as_lists(lists: Mapping[str, ChannelCandidates]) -> dict[str, list[tuple[int, float]]]:
    return {
        channel: (
            list(zip(value[0].tolist(), value[1].tolist(), strict=True))  # type: ignore[union-attr]
            if _is_arrays(value)
            else list(value)  # type: ignore[arg-type]
        )
        for channel, value in lists.items()
    }


def rank_candidates(
    snapshot: ServingSnapshot,
    user_id: int,
    lists: Mapping[str, ChannelCandidates],
    *,
    channel_weights: Mapping[str, float] | None = None,
    use_ranker: bool = True,
    now: pd.Timestamp | None = None,
    deadline: Deadline | None = None,
    on_ranker_failed: Callable[[str], None] | None = None,
) -> list[tuple[int, float, str]]:
    """Per-channel candidates (pair lists or Redis arrays) in serving order: fused and
    re-ranked when the snapshot has a ranker (recall order if it fails, or if `use_ranker` is
    False: an experiment arm without the ranker), merged by score when it has none."""
    ranker = snapshot.ranker
    weights = snapshot.channel_weights if channel_weights is None else channel_weights
    if ranker is None:
        if snapshot.ranker_error is not None and on_ranker_failed is not None:
            on_ranker_failed("unavailable")  # the bundle has a ranker that could not load
        if snapshot.recall_lists:  # recall lists: their fused order is the recall order
            return fuse_arrays(_as_arrays(lists), weights, MAX_CANDIDATES).recall_order()
        return _merge_by_score(_as_lists(lists))
    candidates = fuse_arrays(_as_arrays(lists), weights, MAX_CANDIDATES)
    if not use_ranker:
        return candidates.recall_order()
    budget = ranker.budget_s
    if deadline is not None:
        budget = min(budget, deadline.remaining())
    when = pd.Timestamp.now(tz="UTC") if now is None else now
    result = ranker.rank(user_id, candidates, when, budget_s=budget)
    if result.failed and on_ranker_failed is not None:
        on_ranker_failed(result.error or "ranker_failed")
    return result.items


@dataclass(frozen=True)
class Options:
    """Per-request choices, mostly from an experiment variant (None/True = serving default).

    `on_lists` receives the per-channel candidate lists read from Redis (metrics);
    `on_ranker_failed(error)` is called when the ranker failed and recall order was kept.
    """

    channel_weights: Mapping[str, float] | None = None
    use_ranker: bool = True
    now: pd.Timestamp | None = None
    on_ranker_failed: Callable[[str], None] | None = None
    on_lists: Callable[[Mapping[str, ChannelCandidates]], None] | None = None


DEFAULT_OPTIONS = Options()


def for_you(
    snapshot: ServingSnapshot,
    stores: Stores,
    user_id: int,
    limit: int,
    exclude: Collection[int] = frozenset(),
    *,
    channel_weights: Mapping[str, float] | None = None,
    now: pd.Timestamp | None = None,
    on_ranker_failed: Callable[[str], None] | None = None,
    options: Options | None = None,
) -> Outcome[RecItem]:
    """The user's ranked list; an unknown user gets the popular list (reason `empty`, not
    degraded).

    Redis candidate lists are fused and re-ranked when the snapshot has a ranker (see the
    module docstring): `channel_weights` overrides the snapshot's (an experiment variant),
    `now` is the request time for the features (default: the wall clock), and
    `on_ranker_failed(error)` is called when the ranker failed and recall order was kept.
    `options` carries the same choices (and a few more) as one object; explicit keyword
    arguments win over it.
    """
    opts = options or DEFAULT_OPTIONS
    weights = channel_weights if channel_weights is not None else opts.channel_weights
    failed = on_ranker_failed or opts.on_ranker_failed
    skip = set(exclude)

    def from_redis(store: RedisCandidateStore) -> list[RecItem]:
        lists: Mapping[str, ChannelCandidates]
        if snapshot.ranker is not None or snapshot.recall_lists:
            lists = store.get_user_arrays(user_id, snapshot.channels)
        else:
            lists = store.get_user_lists(user_id, snapshot.channels)
        if opts.on_lists is not None:
            opts.on_lists(lists)
        ordered = rank_candidates(
            snapshot,
            user_id,
            lists,
            channel_weights=weights,
            use_ranker=opts.use_ranker,
            now=now if now is not None else opts.now,
            deadline=stores.deadline,
            on_ranker_failed=failed,
        )
        return _items(snapshot, ordered, limit, skip)

    return recommend_with_fallback(
        _redis_step(stores, from_redis),
        lambda: _items(snapshot, snapshot.local_store.user_recs(user_id), limit, skip),
        lambda: _items(snapshot, _popular_pairs(snapshot), limit, skip),
        deadline=stores.deadline,
        count=stores.count,
    )


def similar(
    snapshot: ServingSnapshot,
    stores: Stores,
    item_id: int,
    limit: int,
    exclude: Collection[int] = frozenset(),
) -> Outcome[RecItem]:
    """Items similar to `item_id` across channels by score; an unknown item gets popular."""
    skip = {*exclude, item_id}

    def from_redis(store: RedisCandidateStore) -> list[RecItem]:
        lists = store.get_similar(item_id)
        return _items(snapshot, _merge_by_score(lists), limit, skip, similar_to=item_id)

    return recommend_with_fallback(
        _redis_step(stores, from_redis),
        lambda: _items(
            snapshot,
            _merge_by_score(snapshot.local_store.similar(item_id)),
            limit,
            skip,
            similar_to=item_id,
        ),
        lambda: _items(snapshot, _popular_pairs(snapshot), limit, skip),
        deadline=stores.deadline,
        count=stores.count,
    )


def detail(
    snapshot: ServingSnapshot,
    stores: Stores,
    item_id: int,
    user_id: int,
    limit: int,
    exclude: Collection[int] = frozenset(),
    *,
    options: Options | None = None,
) -> Outcome[RecItem]:
    """Detail-page recommendations: items similar to `item_id`, ordered for `user_id`.

    The similar items of every channel (Redis, else the local store, else popular) become the
    candidates, each channel's score and rank its recall features, and the ranker scores them
    for this user (its user and user x item features personalise the order). Without a
    ranker, when the ranker is switched off, or for a user the bundle does not know, the
    similar order is kept. The user's already-bought items (those in the bundle's history)
    are excluded like everywhere else.
    """
    opts = options or DEFAULT_OPTIONS
    skip = {*exclude, item_id}
    pool = min(MAX_CANDIDATES, max(limit * 5, 50))

    def personalise(lists: dict[str, list[tuple[int, float]]]) -> list[RecItem]:
        ranker = snapshot.ranker
        if ranker is None or not opts.use_ranker or not ranker.knows_user(user_id):
            return _items(snapshot, _merge_by_score(lists), limit, skip, similar_to=item_id)
        ordered = rank_candidates(
            snapshot,
            user_id,
            lists,
            channel_weights=opts.channel_weights,
            now=opts.now,
            deadline=stores.deadline,
            on_ranker_failed=opts.on_ranker_failed,
        )
        return _items(snapshot, ordered[: pool * 2], limit, skip, similar_to=item_id)

    return recommend_with_fallback(
        _redis_step(stores, lambda store: personalise(store.get_similar(item_id))),
        lambda: personalise(snapshot.local_store.similar(item_id)),
        lambda: _items(snapshot, _popular_pairs(snapshot), limit, skip),
        deadline=stores.deadline,
        count=stores.count,
    )


def popular(snapshot: ServingSnapshot, limit: int, category: str | None = None) -> Outcome[RecItem]:
    """The snapshot's in-memory popular list, optionally one category. No store is asked, so
    it is never degraded (an unknown category gives an empty list, not an error)."""
    items = _items(snapshot, _popular_pairs(snapshot), limit, (), category=category)
    return Outcome(items, Source.POPULAR, None)
