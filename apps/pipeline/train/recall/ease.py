"""EASE (Steck 2019): a closed-form item-item linear autoencoder."""

from __future__ import annotations

from typing import ClassVar, Self

import numpy as np
import scipy.linalg

from apps.pipeline.train.base import TrainingSet
from apps.pipeline.train.recall._common import Channel, FloatArray, IntArray


class EASE(Channel):
    """Embarrassingly Shallow Autoencoder: B = I - P / diag(P), P = (X'X + l2 I)^-1, diag(B)=0.

    Scores are x_u B. B is dense (items x items), so the catalogue is capped by
    ``max_items``: 20k items already take 1.6 GB in float32 and a cubic-time inverse.
    """

    name: ClassVar[str] = "ease"
    _state: ClassVar[tuple[str, ...]] = (*Channel._state, "weights_")

    weights_: FloatArray

    def __init__(self, l2: float = 300.0, binary: bool = True, max_items: int = 20_000) -> None:
        self.l2 = l2
        self.binary = binary
        self.max_items = max_items

    def fit(self, data: TrainingSet) -> Self:
        """Solve the closed form on the items anyone interacted with."""
        if self.l2 <= 0:
            raise ValueError(f"l2 must be > 0, got {self.l2}")
        self._fit_history(data, with_catalogue=False)
        n_items = self.item_ids_.size
        if n_items > self.max_items:
            raise ValueError(
                f"EASE keeps a dense items x items matrix: {n_items} items exceed "
                f"max_items={self.max_items} (memory ~ {8 * n_items**2 / 2**30:.1f} GiB to fit). "
                "Raise max_items if the machine allows it, or use ItemCF/Vector for this catalogue."
            )
        if self.binary:
            # Steck's formulation is on a 0/1 matrix; the scoring side uses the same input.
            self.history_ = self.history_.copy()
            self.history_.data[:] = 1.0
        gram = (self.history_.T @ self.history_).toarray().astype(np.float64)
        gram[np.diag_indices_from(gram)] += self.l2
        # The Gram matrix plus a positive ridge is symmetric positive definite: Cholesky inverse.
        precision = scipy.linalg.inv(gram, overwrite_a=True, check_finite=False, assume_a="pos")
        weights = precision / -np.diag(precision)
        weights[np.diag_indices_from(weights)] = 0.0
        self.weights_ = weights.astype(np.float32)
        return self

    def _score_block(self, rows: IntArray) -> FloatArray:
        return np.asarray(self.history_[rows] @ self.weights_, dtype=np.float32)

    def _similarity_block(self, rows: IntArray) -> FloatArray:
        # Row i of B: how much having item i predicts each other item.
        return np.array(self.weights_[rows], dtype=np.float32)
