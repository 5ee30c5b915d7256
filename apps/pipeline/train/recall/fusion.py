"""Fusion of per-channel candidate lists into one list, remembering each item's channel."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from apps.pipeline.train.base import Candidates
from apps.pipeline.train.recall._common import FloatArray, IntArray, check_k

FUSION_METHODS = ("rrf", "score")


def fuse(
    candidate_lists: Mapping[str, Candidates],
    weights: Mapping[str, float],
    k: int,
    *,
    method: str = "rrf",
    rrf_k: float = 60.0,
    default_weight: float = 1.0,
) -> tuple[IntArray, FloatArray, npt.NDArray[np.str_]]:
    """Merge channels' candidates into the top ``k`` items: (item ids, scores, channel of each).

    ``method="rrf"`` is weighted reciprocal-rank fusion, sum of w_c / (rrf_k + rank); it needs
    no score calibration across channels. ``method="score"`` sums w_c x the channel's scores
    min-max scaled to [0, 1]. A channel missing from ``weights`` gets ``default_weight``; a
    weight of 0 switches it off. Each item's channel is the one that contributed most to its
    score (ties: the channel named first alphabetically), for the response's "channel"/"reason".
    """
    k = check_k(k)
    if method not in FUSION_METHODS:
        raise ValueError(f"method must be one of {FUSION_METHODS}, got {method!r}")
    names = sorted(candidate_lists)
    items_parts: list[IntArray] = []
    contrib_parts: list[npt.NDArray[np.float64]] = []
    channel_parts: list[IntArray] = []
    for channel_idx, name in enumerate(names):
        weight = float(weights.get(name, default_weight))
        if weight < 0 or not np.isfinite(weight):
            raise ValueError(f"weight of channel {name!r} must be finite and >= 0, got {weight}")
        ids = np.asarray(candidate_lists[name][0], dtype=np.int64)
        scores = np.asarray(candidate_lists[name][1], dtype=np.float64)
        if weight == 0 or ids.size == 0:
            continue
        # A channel lists each item once; if one did not, its best (first) mention counts.
        _, first = np.unique(ids, return_index=True)
        first.sort()
        ids, scores = ids[first], scores[first]
        if method == "rrf":
            contrib = weight / (rrf_k + first.astype(np.float64) + 1.0)
        else:
            low, high = scores.min(), scores.max()
            scaled = (scores - low) / (high - low) if high > low else np.ones_like(scores)
            contrib = weight * scaled
        items_parts.append(ids)
        contrib_parts.append(contrib)
        channel_parts.append(np.full(ids.size, channel_idx, dtype=np.int64))
    if not items_parts:
        return np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, dtype=str)
    items = np.concatenate(items_parts)
    contrib = np.concatenate(contrib_parts)
    channel = np.concatenate(channel_parts)
    unique_items, group = np.unique(items, return_inverse=True)
    total = np.bincount(group, weights=contrib, minlength=unique_items.size)
    # Per item, the row with the largest contribution comes first in this order.
    order = np.lexsort((channel, -contrib, group))
    is_first = np.r_[True, group[order][1:] != group[order][:-1]]
    best_channel = np.empty(unique_items.size, dtype=np.int64)
    best_channel[group[order][is_first]] = channel[order][is_first]
    top = np.lexsort((unique_items, -total))[:k]
    channel_names = np.asarray(names, dtype=str)
    return (
        unique_items[top].astype(np.int64),
        total[top].astype(np.float32),
        channel_names[best_channel[top]],
    )
