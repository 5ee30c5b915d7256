"""Vector recall: item vectors searched with Faiss; a user is the weighted mean of history.

``EmbeddingChannel`` is shared with the semantic channel (apps/pipeline/train/semantic.py),
which differs only in where item vectors come from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Self

import faiss
import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from sklearn.decomposition import TruncatedSVD

from apps.pipeline.train.base import Candidates, TrainingSet
from apps.pipeline.train.recall._common import (
    BoolArray,
    Channel,
    FloatArray,
    IntArray,
    as_ids,
    check_k,
    empty_candidates,
    encode,
    is_seen,
    row_normalize,
)

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf")
# Queries per Faiss search call when recommending (see _recommend_block).
SEARCH_CHUNK = 256


def normalize_dense(vectors: npt.ArrayLike) -> FloatArray:
    """Unit-length float32 rows (all-zero rows stay zero), so inner product = cosine."""
    arr = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return np.divide(arr, norms, out=np.zeros_like(arr), where=norms > 0)


def build_index(
    vectors: FloatArray,
    *,
    index_type: str,
    exact_max_items: int,
    hnsw_m: int,
    ivf_lists: int,
    seed: int,
) -> faiss.Index:
    """An inner-product Faiss index over ``vectors``.

    "auto" picks exact search up to ``exact_max_items`` (PERFORMANCE.md: exact top-100 over
    100k x 64 takes 0.64 ms, so approximate search pays only beyond that) and HNSW above it.
    """
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
    n, dim = vectors.shape
    kind = index_type
    if kind == "auto":
        kind = "flat" if n <= exact_max_items else "hnsw"
    if kind == "flat" or n == 0:
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        # Enough points per list for k-means to be meaningful (Faiss warns below 39 per list).
        n_lists = max(1, min(ivf_lists or int(4 * np.sqrt(n)), n // 39 or 1))
        # The factory's index owns its coarse quantizer, so nothing dangles after a reload.
        index = faiss.index_factory(dim, f"IVF{n_lists},Flat", faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(index).cp.seed = seed
        index.train(vectors)
    if n:
        index.add(vectors)
    return index


class EmbeddingChannel(Channel):
    """Items as unit vectors in a Faiss index; users as the weighted mean of their history.

    Subclasses set ``item_vectors_`` (items x dim, zero rows for items without a vector) in
    ``_item_vectors``. Only active items with a vector enter the index (``index_items_`` maps
    index rows to item positions); all items still count in user profiles.
    """

    _state: ClassVar[tuple[str, ...]] = (
        *Channel._state,
        "item_vectors_",
        "index_items_",
        "index_",
    )
    _positive_only: ClassVar[bool] = False
    _with_catalogue: ClassVar[bool] = False

    item_vectors_: FloatArray
    index_items_: IntArray
    index_: faiss.Index

    index_type: str
    exact_max_items: int
    hnsw_m: int
    ef_search: int
    ivf_lists: int
    n_probe: int
    seed: int

    def _item_vectors(self, data: TrainingSet) -> FloatArray:
        raise NotImplementedError

    def fit(self, data: TrainingSet) -> Self:
        """Compute item vectors and index the recallable ones."""
        self._fit_history(data, with_catalogue=self._with_catalogue)
        self.item_vectors_ = normalize_dense(self._item_vectors(data))
        has_vector = np.linalg.norm(self.item_vectors_, axis=1) > 0
        self.index_items_ = np.flatnonzero(has_vector & self.active_).astype(np.int64)
        self.index_ = build_index(
            self.item_vectors_[self.index_items_],
            index_type=self.index_type,
            exact_max_items=self.exact_max_items,
            hnsw_m=self.hnsw_m,
            ivf_lists=self.ivf_lists,
            seed=self.seed,
        )
        self._after_load()
        return self

    def _after_load(self) -> None:
        # Search-time knobs are not stored in the index file: set them from the parameters.
        if isinstance(self.index_, faiss.IndexHNSW):
            self.index_.hnsw.efSearch = self.ef_search
        elif isinstance(self.index_, faiss.IndexIVF):
            self.index_.nprobe = self.n_probe

    def user_vectors(self, history: sp.csr_matrix) -> tuple[FloatArray, BoolArray]:
        """Unit weighted-mean vectors of history rows and whether each user has one."""
        vectors = normalize_dense(row_normalize(history) @ self.item_vectors_)
        return vectors, np.linalg.norm(vectors, axis=1) > 0

    def _search(
        self, queries: FloatArray, k: int, exclude: sp.csr_matrix | None, extra: IntArray | None
    ) -> list[Candidates]:
        """Search ``k`` results per query, over-fetching to make room for excluded items.

        ``exclude`` rows mark items to drop per query (the seen items); ``extra`` drops one
        more item position per query (the query item itself in ``similar``).
        """
        n_index = int(self.index_.ntotal)
        if queries.shape[0] == 0 or n_index == 0:
            return [empty_candidates() for _ in range(queries.shape[0])]
        excluded = 0 if exclude is None else int(np.diff(exclude.indptr).max(initial=0))
        fetch = min(n_index, k + excluded + (extra is not None))
        scores, found = self.index_.search(np.ascontiguousarray(queries), fetch)
        valid = found >= 0
        positions = self.index_items_[np.where(valid, found, 0)]
        if exclude is not None:
            valid &= ~is_seen(exclude, positions)
        if extra is not None:
            valid &= positions != extra[:, None]
        out: list[Candidates] = []
        for row_valid, row_pos, row_scores in zip(valid, positions, scores, strict=True):
            out.append(
                (
                    self.item_ids_[row_pos[row_valid][:k]].astype(np.int64),
                    row_scores[row_valid][:k].astype(np.float32),
                )
            )
        return out

    def _block_size(self) -> int:
        # Faiss batches queries itself; this only bounds the (block x fetched) work arrays.
        return 4096

    def _recommend_block(self, rows: IntArray, k: int, exclude_seen: bool) -> list[Candidates]:
        history = self.history_[rows]
        vectors, has = self.user_vectors(history)
        results = [empty_candidates() for _ in range(rows.size)]
        slots = np.flatnonzero(has)
        # Each query over-fetches by its chunk's longest history; chunking users of similar
        # history length keeps one heavy buyer from inflating everyone's search.
        slots = slots[np.argsort(history.getnnz(axis=1)[slots], kind="stable")]
        for start in range(0, slots.size, SEARCH_CHUNK):
            chunk = slots[start : start + SEARCH_CHUNK]
            exclude = history[chunk] if exclude_seen else None
            for slot, cands in zip(
                chunk, self._search(vectors[chunk], k, exclude, None), strict=True
            ):
                results[slot] = cands
        return results

    def similar(self, item_ids: Sequence[int], k: int) -> dict[int, Candidates]:
        """Nearest indexed items to each known item with a vector (itself excluded)."""
        self._check_fitted()
        k = check_k(k)
        items = as_ids(item_ids, "item_ids")
        pos, known = encode(items, self.item_ids_)
        if self.item_ids_.size:
            known &= np.linalg.norm(self.item_vectors_[pos], axis=1) > 0
        out: dict[int, Candidates] = {int(i): empty_candidates() for i in items[~known]}
        rows = pos[known]
        found = self._search(self.item_vectors_[rows], k, None, rows)
        for item, cands in zip(items[known], found, strict=True):
            out[int(item)] = cands
        return out


class Vector(EmbeddingChannel):
    """Behaviour vectors: truncated SVD or ALS of the weighted user-item matrix.

    "svd": item vectors are the right singular vectors scaled by the singular values
    (randomised SVD, seeded). "als": alternating ridge least squares with uniform confidence,
    U = R V (V'V + l2 I)^-1 and V = R'U (U'U + l2 I)^-1, from a seeded random start; both are
    whole-matrix products, no per-user loop.
    """

    name: ClassVar[str] = "vector"

    def __init__(
        self,
        factors: int = 64,
        method: str = "svd",
        iterations: int = 15,
        l2: float = 1.0,
        seed: int = 0,
        index_type: str = "auto",
        exact_max_items: int = 100_000,
        hnsw_m: int = 32,
        ef_search: int = 256,
        ivf_lists: int = 0,
        n_probe: int = 16,
    ) -> None:
        self.factors = factors
        self.method = method
        self.iterations = iterations
        self.l2 = l2
        self.seed = seed
        self.index_type = index_type
        self.exact_max_items = exact_max_items
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self.ivf_lists = ivf_lists
        self.n_probe = n_probe

    def _item_vectors(self, data: TrainingSet) -> FloatArray:
        if self.method not in ("svd", "als"):
            raise ValueError(f"method must be 'svd' or 'als', got {self.method!r}")
        matrix = self.history_.astype(np.float64)
        n_users, n_items = matrix.shape
        # TruncatedSVD needs fewer components than either side of the matrix.
        rank = max(1, min(self.factors, n_users - 1, n_items - 1))
        if min(n_users, n_items) < 2:
            return np.zeros((n_items, rank), np.float32)
        if self.method == "svd":
            svd = TruncatedSVD(n_components=rank, algorithm="randomized", random_state=self.seed)
            svd.fit(matrix)
            return (svd.components_.T * svd.singular_values_).astype(np.float32)
        rng = np.random.default_rng(self.seed)
        items = rng.normal(scale=0.1, size=(n_items, rank))
        ridge = self.l2 * np.eye(rank)
        matrix_t = sp.csr_matrix(matrix.T)
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        for _ in range(self.iterations):
            users = np.linalg.solve(items.T @ items + ridge, (matrix @ items).T).T
            items = np.linalg.solve(users.T @ users + ridge, (matrix_t @ users).T).T
        # U V' is unchanged by V -> V A, U -> U A^-T for any invertible A, but cosines between
        # item vectors are not. Express the factors in the SVD basis of U V' (item vectors =
        # right singular vectors x singular values, as for "svd") so the geometry is canonical.
        _, r_users = np.linalg.qr(users)
        q_items, r_items = np.linalg.qr(items)
        _, singular, right_t = np.linalg.svd(r_users @ r_items.T)
        return (q_items @ right_t.T * singular).astype(np.float32)
