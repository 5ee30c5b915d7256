"""Neighbourhood collaborative filtering: item-item (ItemCF) and user-user (UserCF) cosine."""

from __future__ import annotations

from typing import ClassVar, Self

import numpy as np
import scipy.sparse as sp

from apps.pipeline.train.base import TrainingSet
from apps.pipeline.train.recall._common import (
    Channel,
    FloatArray,
    IntArray,
    block_rows,
    l2_normalize_rows,
    top_k_sparse_rows,
)


def _cosine_neighbours(vectors: sp.csr_matrix, n_neighbours: int, shrink: float) -> sp.csr_matrix:
    """Each row's ``n_neighbours`` most cosine-similar other rows, as a sparse matrix.

    Computed in row blocks so the dense (block x rows) product stays bounded; ``shrink``
    damps similarities resting on few co-occurrences (Koren's shrinkage).
    """
    n = vectors.shape[0]
    norms = np.sqrt(np.asarray(vectors.multiply(vectors).sum(axis=1)).ravel()).astype(np.float32)
    unit = l2_normalize_rows(vectors) if shrink == 0 else vectors
    unit_t = sp.csr_matrix(unit.T)
    blocks = []
    step = block_rows(n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        dense = (unit[start:stop] @ unit_t).toarray().astype(np.float32)
        if shrink:
            denom = np.outer(norms[start:stop], norms) + np.float32(shrink)
            dense = np.divide(dense, denom, out=np.zeros_like(dense), where=denom > 0)
        dense[np.arange(stop - start), np.arange(start, stop)] = 0.0
        blocks.append(top_k_sparse_rows(dense, n_neighbours))
    if not blocks:
        return sp.csr_matrix((n, n), dtype=np.float32)
    return sp.csr_matrix(sp.vstack(blocks, format="csr"), dtype=np.float32)


class ItemCF(Channel):
    """Item-based CF: cosine between item columns of the weighted matrix, top-N kept sparse.

    A user's score for item j is the sum over history items i of weight(u, i) x sim(i, j).
    """

    name: ClassVar[str] = "itemcf"
    _state: ClassVar[tuple[str, ...]] = (*Channel._state, "similarity_")

    similarity_: sp.csr_matrix

    def __init__(self, n_neighbours: int = 100, shrink: float = 0.0) -> None:
        self.n_neighbours = n_neighbours
        self.shrink = shrink

    def fit(self, data: TrainingSet) -> Self:
        """Learn the pruned item-item cosine matrix."""
        if self.n_neighbours < 1 or self.shrink < 0:
            raise ValueError("n_neighbours must be >= 1 and shrink >= 0")
        self._fit_history(data, with_catalogue=False)
        item_vectors = sp.csr_matrix(self.history_.T)
        self.similarity_ = _cosine_neighbours(item_vectors, self.n_neighbours, self.shrink)
        return self

    def _score_block(self, rows: IntArray) -> FloatArray:
        return np.asarray((self.history_[rows] @ self.similarity_).toarray(), dtype=np.float32)

    def _similarity_block(self, rows: IntArray) -> FloatArray:
        return np.asarray(self.similarity_[rows].toarray(), dtype=np.float32)


class UserCF(Channel):
    """User-based CF: a user's top-N cosine neighbours vote with their weighted histories."""

    name: ClassVar[str] = "usercf"
    _state: ClassVar[tuple[str, ...]] = (*Channel._state, "neighbours_")

    neighbours_: sp.csr_matrix

    def __init__(self, n_neighbours: int = 50, shrink: float = 0.0) -> None:
        self.n_neighbours = n_neighbours
        self.shrink = shrink

    def fit(self, data: TrainingSet) -> Self:
        """Learn each user's top-N neighbours."""
        if self.n_neighbours < 1 or self.shrink < 0:
            raise ValueError("n_neighbours must be >= 1 and shrink >= 0")
        self._fit_history(data, with_catalogue=False)
        self.neighbours_ = _cosine_neighbours(self.history_, self.n_neighbours, self.shrink)
        return self

    def _score_block(self, rows: IntArray) -> FloatArray:
        return np.asarray((self.neighbours_[rows] @ self.history_).toarray(), dtype=np.float32)
