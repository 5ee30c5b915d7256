"""Diversity re-ranking of a ranked list (pure core): a category cap or MMR.

An experiment variant may ask for diversity (`apps.experiments.params.Diversity`). Both methods
work on what serving has for every item at request time, the catalogue's category, so they cost
microseconds and need no embedding lookups:

- ``category_cap``: walk the ranked list and keep at most ``max_per_category`` items of each
  category; when that leaves fewer than ``limit`` items, the skipped ones fill the tail in
  their ranked order (a short list is worse than a repetitive one).
- ``mmr``: maximal marginal relevance (Carbonell & Goldstein, 1998). Relevance is the item's
  position in the ranked list mapped to (0, 1] (scores of different sources are not
  comparable, ranks are); similarity between two items is 1 when they share a category, else
  0. Each pick maximises ``lambda * relevance - (1 - lambda) * max similarity to the picks so
  far``; ``lambda = 1`` returns the ranked order, smaller values spread categories sooner.

Items without a category ("") never count as similar to anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

MMR = "mmr"
CATEGORY_CAP = "category_cap"
NONE = "none"


def category_cap(
    items: Sequence[T], category_of: Callable[[T], str], max_per_category: int, limit: int
) -> list[T]:
    """At most ``max_per_category`` per category first, then the skipped items, up to ``limit``."""
    if max_per_category < 1:
        raise ValueError("max_per_category must be >= 1")
    kept: list[T] = []
    skipped: list[T] = []
    counts: dict[str, int] = {}
    for item in items:
        category = category_of(item)
        if category and counts.get(category, 0) >= max_per_category:
            skipped.append(item)
            continue
        counts[category] = counts.get(category, 0) + 1
        kept.append(item)
        if len(kept) >= limit:
            return kept
    return (kept + skipped)[:limit]


def mmr(items: Sequence[T], category_of: Callable[[T], str], lambda_: float, limit: int) -> list[T]:
    """Greedy MMR over the ranked ``items`` with category similarity (see the module doc)."""
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError("lambda must be within [0, 1]")
    n = len(items)
    if n == 0 or limit <= 0:
        return []
    relevance = [1.0 - position / n for position in range(n)]
    categories = [category_of(item) for item in items]
    chosen: list[int] = []
    picked_categories: set[str] = set()
    remaining = list(range(n))
    while remaining and len(chosen) < limit:
        best_index = -1
        best_value = float("-inf")
        for position in remaining:
            category = categories[position]
            similarity = 1.0 if category and category in picked_categories else 0.0
            value = lambda_ * relevance[position] - (1.0 - lambda_) * similarity
            if value > best_value:  # strict: ties keep the ranked order
                best_value, best_index = value, position
        chosen.append(best_index)
        remaining.remove(best_index)
        if categories[best_index]:
            picked_categories.add(categories[best_index])
    return [items[position] for position in chosen]


def diversify(
    items: Sequence[T],
    category_of: Callable[[T], str],
    limit: int,
    *,
    method: str | None,
    lambda_: float | None = None,
    max_per_category: int | None = None,
) -> list[T]:
    """Apply ``method`` (``mmr``, ``category_cap``, ``none`` or None) and cut to ``limit``."""
    if method in (None, NONE):
        return list(items[:limit])
    if method == MMR:
        return mmr(items, category_of, 0.7 if lambda_ is None else lambda_, limit)
    if method == CATEGORY_CAP:
        return category_cap(items, category_of, max_per_category or 2, limit)
    raise ValueError(f"unknown diversity method {method!r}")
