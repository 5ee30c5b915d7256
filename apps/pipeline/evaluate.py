"""Offline evaluation: top-k ranking metrics, beyond-accuracy metrics and split protocols.
Pure core (no Django).

Inputs are plain mappings: ``recs`` maps a user to a ranked list of item ids (best first) and
``truth`` maps a user to the set of held-out relevant items. Every held-out interaction is
relevant (binary relevance), as in the public benchmark tables this platform compares itself
with (Microsoft Recommenders on MovieLens-100K).

Definitions (``k`` = list length, ``R_u`` = relevant set, ``hits`` = relevant items in the top k):

- precision@k = |hits| / k (divided by k even when fewer than k items were recommended, as in
  Recommenders' ``precision_at_k``);
- recall@k = |hits| / |R_u|;
- ndcg@k: DCG = sum over hits of 1 / log2(1 + rank), IDCG = the same for min(k, |R_u|) hits at
  ranks 1..; binary relevance, i.e. Recommenders' ``ndcg_at_k`` with ``score_type="binary"``
  and ``relevancy_method="top_k"`` (its natural-log discount cancels in the ratio);
- map@k = (sum over hits of precision at the hit's rank) / min(k, |R_u|);
- hit_rate@k = 1 if any hit; mrr@k = 1 / rank of the first hit (0 without a hit).

Each metric is averaged over the users of ``truth`` with a non-empty relevant set; a user with
no recommendations scores 0 (Recommenders averages over the users present in both frames; with
a recommendation for every test user, as in its benchmarks, the two agree).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from itertools import combinations
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd

Recs = Mapping[Hashable, Sequence[Hashable]]
Truth = Mapping[Hashable, AbstractSet[Hashable]]

__all__ = [
    "Split",
    "auc",
    "catalogue_coverage",
    "channel_hit_share",
    "evaluate",
    "exclude_seen",
    "hit_rate_at_k",
    "intra_list_diversity",
    "map_at_k",
    "mrr_at_k",
    "ndcg_at_k",
    "ndcg_grouped",
    "novelty",
    "popularity_from",
    "precision_at_k",
    "recall_at_k",
    "stratified_split",
    "time_split",
    "truth_from",
]


# --------------------------------------------------------------------------- per-user metrics


def _users(truth: Truth) -> list[Hashable]:
    """The users a metric averages over: those with at least one relevant item."""
    return [user for user, relevant in truth.items() if relevant]


def _top(recs: Recs, user: Hashable, k: int) -> Sequence[Hashable]:
    return list(recs.get(user, ()))[:k]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def precision_at_k(recs: Recs, truth: Truth, k: int = 10) -> float:
    """Mean over users of |relevant items in the top k| / k."""
    _check_k(k)
    return _mean([sum(item in truth[u] for item in _top(recs, u, k)) / k for u in _users(truth)])


def recall_at_k(recs: Recs, truth: Truth, k: int = 10) -> float:
    """Mean over users of |relevant items in the top k| / |relevant items|."""
    _check_k(k)
    return _mean(
        [sum(item in truth[u] for item in _top(recs, u, k)) / len(truth[u]) for u in _users(truth)]
    )


def _ndcg_user(ranked: Sequence[Hashable], relevant: AbstractSet[Hashable], k: int) -> float:
    dcg = sum(1.0 / math.log2(rank + 1) for rank, item in enumerate(ranked, 1) if item in relevant)
    idcg = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(k, len(relevant)) + 1))
    return dcg / idcg


def ndcg_at_k(recs: Recs, truth: Truth, k: int = 10) -> float:
    """Mean over users of binary-relevance NDCG@k (log2 discount, IDCG over min(k, |R|))."""
    _check_k(k)
    return _mean([_ndcg_user(_top(recs, u, k), truth[u], k) for u in _users(truth)])


def map_at_k(recs: Recs, truth: Truth, k: int = 10) -> float:
    """Mean over users of average precision at k, normalised by min(k, |relevant|)."""
    _check_k(k)
    scores = []
    for user in _users(truth):
        relevant = truth[user]
        hits = 0
        total = 0.0
        for rank, item in enumerate(_top(recs, user, k), 1):
            if item in relevant:
                hits += 1
                total += hits / rank
        scores.append(total / min(k, len(relevant)))
    return _mean(scores)


def hit_rate_at_k(recs: Recs, truth: Truth, k: int = 10) -> float:
    """Share of users with at least one relevant item in the top k."""
    _check_k(k)
    return _mean([float(any(item in truth[u] for item in _top(recs, u, k))) for u in _users(truth)])


def mrr_at_k(recs: Recs, truth: Truth, k: int = 10) -> float:
    """Mean over users of 1 / rank of the first relevant item in the top k (0 if none)."""
    _check_k(k)
    scores = []
    for user in _users(truth):
        first = next(
            (rank for rank, item in enumerate(_top(recs, user, k), 1) if item in truth[user]),
            None,
        )
        scores.append(1.0 / first if first else 0.0)
    return _mean(scores)


# ------------------------------------------------------------------- beyond-accuracy metrics


def catalogue_coverage(recs: Recs, n_items: int, k: int = 10) -> float:
    """Share of the catalogue (``n_items``) that appears in at least one top-k list."""
    _check_k(k)
    if n_items <= 0:
        raise ValueError("n_items must be positive")
    shown = {item for ranked in recs.values() for item in list(ranked)[:k]}
    return len(shown) / n_items


def popularity_from(interactions: pd.DataFrame) -> dict[Hashable, float]:
    """Popularity of each item: the share of users who interacted with it (in (0, 1])."""
    pairs = interactions[["user_id", "item_id"]].dropna().drop_duplicates()
    n_users = pairs["user_id"].nunique()
    if n_users == 0:
        return {}
    counts = pairs.groupby("item_id")["user_id"].size()
    return {_plain(item): float(count) / n_users for item, count in counts.items()}


def novelty(recs: Recs, item_popularity: Mapping[Hashable, float], k: int = 10) -> float:
    """Mean self-information ``-log2 p(i)`` of the recommended items (higher = less popular).

    ``p(i)`` comes from ``item_popularity`` (see ``popularity_from``). An item without a
    positive popularity (never seen in training) is scored as the rarest known item, because
    its self-information is otherwise infinite and would swamp the mean.
    """
    _check_k(k)
    known = [p for p in item_popularity.values() if p > 0]
    if not known:
        return 0.0
    floor = min(known)
    bits = [
        -math.log2(max(item_popularity.get(item, 0.0), floor))
        for ranked in recs.values()
        for item in list(ranked)[:k]
    ]
    return _mean(bits)


def _similarity(
    a: Hashable,
    b: Hashable,
    item_categories: Mapping[Hashable, object] | None,
    item_vectors: Mapping[Hashable, np.ndarray] | None,
) -> float | None:
    """Similarity of two items, or None when one of them is unknown."""
    if item_vectors is not None:
        va, vb = item_vectors.get(a), item_vectors.get(b)
        if va is None or vb is None:
            return None
        norm = float(np.linalg.norm(va) * np.linalg.norm(vb))
        return float(np.dot(va, vb)) / norm if norm > 0 else 0.0
    assert item_categories is not None
    if a not in item_categories or b not in item_categories:
        return None
    ca, cb = item_categories[a], item_categories[b]
    if isinstance(ca, set | frozenset) and isinstance(cb, set | frozenset):
        # Several categories per item: Jaccard overlap.
        union = ca | cb
        return len(ca & cb) / len(union) if union else 0.0
    return 1.0 if ca == cb else 0.0


def intra_list_diversity(
    recs: Recs,
    k: int = 10,
    *,
    item_categories: Mapping[Hashable, object] | None = None,
    item_vectors: Mapping[Hashable, np.ndarray] | None = None,
) -> float:
    """Mean over lists of 1 - mean pairwise similarity of the top-k items.

    Similarity is the cosine of ``item_vectors`` when given, otherwise 1 for the same category
    (Jaccard overlap when categories are sets). Pairs with an unknown item are skipped and
    lists with fewer than two known items do not count, so missing metadata never reads as
    diversity.
    """
    _check_k(k)
    if item_categories is None and item_vectors is None:
        raise ValueError("intra_list_diversity needs item_categories or item_vectors")
    scores = []
    for ranked in recs.values():
        sims = [
            s
            for a, b in combinations(list(ranked)[:k], 2)
            if (s := _similarity(a, b, item_categories, item_vectors)) is not None
        ]
        if sims:
            scores.append(1.0 - float(np.mean(sims)))
    return _mean(scores)


def channel_hit_share(
    recs: Recs, truth: Truth, channels: Mapping[Hashable, Sequence[str]], k: int = 10
) -> dict[str, float]:
    """Share of all top-k hits that each recall channel produced.

    ``channels[user][i]`` is the channel of ``recs[user][i]``. Shares sum to 1 when there is
    at least one hit; a channel that produced recommendations but no hit gets 0.
    """
    _check_k(k)
    hits: Counter[str] = Counter()
    seen: set[str] = set()
    for user in _users(truth):
        ranked = _top(recs, user, k)
        labels = list(channels.get(user, ()))[: len(ranked)]
        if len(labels) != len(ranked):
            raise ValueError(f"user {user!r}: {len(ranked)} items but {len(labels)} channels")
        for item, channel in zip(ranked, labels, strict=True):
            seen.add(channel)
            if item in truth[user]:
                hits[channel] += 1
    total = sum(hits.values())
    return {channel: (hits[channel] / total if total else 0.0) for channel in sorted(seen)}


def evaluate(
    recs: Recs,
    truth: Truth,
    *,
    k: int = 10,
    item_popularity: Mapping[Hashable, float],
    n_items: int,
    item_categories: Mapping[Hashable, object] | None = None,
    item_vectors: Mapping[Hashable, np.ndarray] | None = None,
    channels: Mapping[Hashable, Sequence[str]] | None = None,
) -> dict[str, float]:
    """All offline metrics at ``k`` as one flat dict (ready for MLflow and the manifest).

    Keys: ``precision@k``, ``recall@k``, ``ndcg@k``, ``map@k``, ``hit_rate@k``, ``mrr@k``,
    ``coverage@k``, ``novelty@k``, ``n_users``; ``diversity@k`` when categories or vectors are
    given; ``hit_share@k/<channel>`` when channels are given.
    """
    out = {
        f"precision@{k}": precision_at_k(recs, truth, k),
        f"recall@{k}": recall_at_k(recs, truth, k),
        f"ndcg@{k}": ndcg_at_k(recs, truth, k),
        f"map@{k}": map_at_k(recs, truth, k),
        f"hit_rate@{k}": hit_rate_at_k(recs, truth, k),
        f"mrr@{k}": mrr_at_k(recs, truth, k),
        f"coverage@{k}": catalogue_coverage(recs, n_items, k),
        f"novelty@{k}": novelty(recs, item_popularity, k),
        "n_users": float(len(_users(truth))),
    }
    if item_categories is not None or item_vectors is not None:
        out[f"diversity@{k}"] = intra_list_diversity(
            recs, k, item_categories=item_categories, item_vectors=item_vectors
        )
    if channels is not None:
        for channel, share in channel_hit_share(recs, truth, channels, k).items():
            out[f"hit_share@{k}/{channel}"] = share
    return out


# ------------------------------------------------------------------------ ranker helpers


def auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the binary labels ``y_true > 0`` (ties count one half).

    Mann-Whitney form over average ranks, so it needs no threshold and handles ties exactly.
    Returns NaN when only one class is present.
    """
    y = np.asarray(y_true) > 0
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(s).rank(method="average").to_numpy()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ndcg_grouped(
    y_true: np.ndarray, scores: np.ndarray, groups: Sequence[int] | np.ndarray, k: int = 10
) -> float:
    """Mean NDCG@k over query groups with graded gains ``2**label - 1`` (LightGBM's default).

    ``groups`` are the sizes of consecutive row blocks. Groups without a positive label are
    skipped (LightGBM counts them as 1, which flatters the mean). Ties in ``scores`` are
    broken by row order, so the result is deterministic.
    """
    _check_k(k)
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    sizes = np.asarray(groups, dtype=np.int64)
    if sizes.sum() != len(y):
        raise ValueError(f"groups sum to {sizes.sum()} but there are {len(y)} rows")
    values = []
    start = 0
    for size in sizes:
        labels, block = y[start : start + size], s[start : start + size]
        start += size
        if not (labels > 0).any():
            continue
        discounts = 1.0 / np.log2(np.arange(2, min(k, size) + 2))
        order = np.argsort(-block, kind="stable")[:k]
        ideal = np.sort(labels)[::-1][:k]
        dcg = float(((2.0 ** labels[order] - 1) * discounts[: len(order)]).sum())
        idcg = float(((2.0**ideal - 1) * discounts[: len(ideal)]).sum())
        values.append(dcg / idcg)
    return _mean(values)


# -------------------------------------------------------------------------- split protocols


class Split(NamedTuple):
    """A train/test pair of interaction frames."""

    train: pd.DataFrame
    test: pd.DataFrame


def time_split(interactions: pd.DataFrame, days: float, *, ts_col: str = "ts") -> Split:
    """Hold out the last ``days`` days: test = events at or after ``max(ts) - days`` by users
    who have history before that cutoff (cold-start users cannot be scored from history)."""
    if days <= 0:
        raise ValueError("days must be positive")
    cutoff = interactions[ts_col].max() - pd.Timedelta(days=days)
    before = interactions[ts_col] < cutoff
    train = interactions[before]
    test = interactions[~before & interactions["user_id"].isin(train["user_id"].unique())]
    return Split(train.reset_index(drop=True), test.reset_index(drop=True))


def stratified_split(
    interactions: pd.DataFrame,
    test_size: float = 0.25,
    seed: int = 42,
    *,
    filter_by: Literal["user", "item"] = "user",
    min_rating: int = 1,
    col_user: str = "user_id",
    col_item: str = "item_id",
) -> Split:
    """Random split within each user (or item): of each group's ``n`` rows in random order,
    the first ``round((1 - test_size) * n)`` train and the rest test.

    Reproduces Microsoft Recommenders 1.2.1 ``python_stratified_split(data, ratio=1 -
    test_size, min_rating, filter_by, seed)`` row for row on the same input order (checked
    against it): groups with fewer than ``min_rating`` rows are dropped; one uniform number is
    drawn per row from ``np.random.RandomState(seed)`` in input order; rows are sorted by
    (group, number); the cut uses numpy rounding, half to even (a 2-row group keeps both rows
    in train, a 6-row group 4). Both frames come back in that sorted order, with the input's
    index.

    ``filter_by`` chooses the group: ``"user"`` (the default here and in Recommenders) keeps
    75 % of every user's interactions in train; ``"item"`` keeps 75 % of every item's. Which one
    a published table used must be read from the notebook that produced it and passed
    explicitly; the MovieLens-100K benchmark table (BiVAE 0.475, BPR 0.442, LightGCN 0.420,
    SAR 0.382 NDCG@10) uses ratio 0.75, min_rating 1 and seed 42.
    """
    if filter_by not in ("user", "item"):
        raise ValueError(f"filter_by must be 'user' or 'item', got {filter_by!r}")
    if min_rating < 1:
        raise ValueError("min_rating must be >= 1")
    if not 0.0 < test_size < 1.0:
        raise ValueError("test_size must be in (0, 1)")
    key = col_user if filter_by == "user" else col_item
    data = interactions
    if min_rating > 1:
        data = data[data.groupby(key)[key].transform("size") >= min_rating]
    order = pd.DataFrame(
        {
            "key": data[key].to_numpy(),
            "random": np.random.RandomState(seed).rand(len(data)),
        }
    )
    order = order.sort_values(["key", "random"])
    groups = order.groupby("key", sort=False)
    rank = groups.cumcount().to_numpy() + 1
    count = groups["key"].transform("size").to_numpy()
    in_train = rank <= np.round((1.0 - test_size) * count)
    rows = order.index.to_numpy()
    return Split(data.iloc[rows[in_train]], data.iloc[rows[~in_train]])


def truth_from(test: pd.DataFrame) -> dict[Hashable, set[Hashable]]:
    """The relevant set per user: every held-out interaction is relevant."""
    pairs = test[["user_id", "item_id"]].dropna()
    out: dict[Hashable, set[Hashable]] = {}
    for user, item in zip(pairs["user_id"], pairs["item_id"], strict=True):
        out.setdefault(_plain(user), set()).add(_plain(item))
    return out


def exclude_seen(
    recs: Recs, seen: Mapping[Hashable, set[Hashable]] | pd.DataFrame, k: int | None = None
) -> dict[Hashable, list[Hashable]]:
    """Drop each user's training items from their list (then cut to ``k``), as the benchmark
    protocol does: an item the user already has cannot count as a hit."""
    if isinstance(seen, pd.DataFrame):
        seen = truth_from(seen)
    out = {}
    for user, ranked in recs.items():
        known = seen.get(user, set())
        kept = [item for item in ranked if item not in known]
        out[user] = kept[:k] if k is not None else kept
    return out


def _plain(value: object) -> Hashable:
    """numpy/pandas scalars as Python scalars, so ids from frames and from lists compare equal
    as dict keys (they already hash equal; this keeps reprs and JSON clean)."""
    if isinstance(value, np.generic):
        plain: Hashable = value.item()
        return plain
    return value
