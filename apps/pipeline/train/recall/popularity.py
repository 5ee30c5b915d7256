"""Non-personalised channels: time-decayed popularity and trending (window-over-window growth).

Both answer unknown users with the global list, which makes them the cold-start fallback.
"""

from __future__ import annotations

from typing import ClassVar, Self

import numpy as np
import numpy.typing as npt
import pandas as pd

from apps.pipeline.train.base import Candidates, TrainingSet
from apps.pipeline.train.recall._common import (
    NO_SCORE,
    Channel,
    FloatArray,
    IntArray,
    encode,
    event_weights,
    top_k_rows,
)

F64 = npt.NDArray[np.float64]


class _Global(Channel):
    """One score per item, the same for every user; known users have their history removed."""

    _state: ClassVar[tuple[str, ...]] = (*Channel._state, "scores_")

    scores_: FloatArray

    def _item_scores(self, item_pos: IntArray, weight: F64, age_days: F64) -> F64:
        """Per-item scores from the positive-weight events (NaN or <= 0: not a candidate)."""
        raise NotImplementedError

    def _sum_per_item(self, item_pos: IntArray, values: F64) -> F64:
        return np.bincount(item_pos, weights=values, minlength=self.item_ids_.size)

    def fit(self, data: TrainingSet) -> Self:
        """Score every item from the weighted events before the cutoff."""
        self._fit_history(data, with_catalogue=False)
        inter = data.interactions
        weight = event_weights(data)
        keep = weight > 0
        ts = pd.to_datetime(inter["ts"], utc=True)
        cutoff = pd.Timestamp(data.cutoff)
        cutoff = cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff
        age_days = ((cutoff - ts).dt.total_seconds() / 86_400.0).to_numpy(dtype=np.float64)
        item_pos, _ = encode(inter["item_id"].to_numpy(dtype=np.int64)[keep], self.item_ids_)
        self.scores_ = self._item_scores(item_pos, weight[keep], age_days[keep]).astype(np.float32)
        return self

    def _score_block(self, rows: IntArray) -> FloatArray:
        return np.array(np.broadcast_to(self.scores_, (rows.size, self.scores_.size)))

    def _fallback(self, k: int) -> Candidates:
        scores = self._finalize(self.scores_[None, :].copy())
        idx, values = top_k_rows(scores, k)
        keep = np.isfinite(values[0])
        return self.item_ids_[idx[0][keep]].astype(np.int64), values[0][keep].astype(np.float32)


class Popular(_Global):
    """Sum of event weights decayed by age: weight x 0.5 ** (age / half_life_days)."""

    name: ClassVar[str] = "popular"

    def __init__(self, half_life_days: float = 30.0) -> None:
        self.half_life_days = half_life_days

    def _item_scores(self, item_pos: IntArray, weight: F64, age_days: F64) -> F64:
        if self.half_life_days <= 0:
            raise ValueError(f"half_life_days must be > 0, got {self.half_life_days}")
        decay = np.exp2(-np.clip(age_days, 0.0, None) / self.half_life_days)
        return self._sum_per_item(item_pos, weight * decay)


class Trending(_Global):
    """Growth of the last window over the one before, as a Poisson z-score.

    score = (recent - previous) / sqrt(previous + prior) on weighted event counts. The prior
    keeps an item going from 0 to 1 event from topping the list; only growing items are
    candidates.
    """

    name: ClassVar[str] = "trending"
    _state: ClassVar[tuple[str, ...]] = (*_Global._state, "recent_", "previous_")

    recent_: FloatArray
    previous_: FloatArray

    def __init__(self, window_days: float = 7.0, prior: float = 5.0) -> None:
        self.window_days = window_days
        self.prior = prior

    def _item_scores(self, item_pos: IntArray, weight: F64, age_days: F64) -> F64:
        if self.window_days <= 0 or self.prior <= 0:
            raise ValueError("window_days and prior must be > 0")
        in_recent = (age_days >= 0) & (age_days < self.window_days)
        in_previous = (age_days >= self.window_days) & (age_days < 2 * self.window_days)
        recent = self._sum_per_item(item_pos, weight * in_recent)
        previous = self._sum_per_item(item_pos, weight * in_previous)
        self.recent_ = recent.astype(np.float32)
        self.previous_ = previous.astype(np.float32)
        growth = (recent - previous) / np.sqrt(previous + self.prior)
        return np.where(growth > 0, growth, np.float64(NO_SCORE))
