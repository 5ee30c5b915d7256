"""Shared machinery of the recall channels: id encoding, the user-item matrix, top-k, files.

Every channel indexes users and items by position in sorted id arrays (``user_ids_``,
``item_ids_``) and keeps the weighted history matrix ``history_`` (users x items, CSR) both to
score and to exclude what a user has already seen. Persistence is generic: a channel lists its
learned attributes in ``_state``; arrays go to one ``state.npz`` (no object arrays, so it loads
with ``allow_pickle=False``), sparse matrices as their CSR parts, Faiss indexes as ``.faiss``
files, parameters and scalars as JSON.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import faiss
import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp

from apps.pipeline.train.base import Candidates, Recaller, TrainingSet

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]

PARAMS_FILE = "params.json"
STATE_FILE = "state.npz"

# One dense (rows x items) float32 score block is at most this many cells (64 MB): memory stays
# flat whatever the catalogue while each block is still scored with one vectorised product.
DENSE_BLOCK_CELLS = 1 << 24

NO_SCORE = np.float32(-np.inf)


def block_rows(n_columns: int) -> int:
    """How many rows of a dense block of ``n_columns`` fit in ``DENSE_BLOCK_CELLS``."""
    return max(1, DENSE_BLOCK_CELLS // max(1, n_columns))


def empty_candidates() -> Candidates:
    """A candidate list with nothing in it, in the dtypes every channel returns."""
    return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)


def as_ids(ids: Sequence[int] | npt.ArrayLike, what: str) -> IntArray:
    """Validate and convert request ids to a 1-D int64 array."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of integer ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def check_k(k: int) -> int:
    """Validate a list length."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def encode(ids: IntArray, universe: IntArray) -> tuple[IntArray, BoolArray]:
    """Positions of ``ids`` in the sorted ``universe`` and whether each id is in it."""
    if universe.size == 0:
        return np.zeros(ids.shape, dtype=np.int64), np.zeros(ids.shape, dtype=bool)
    pos = np.searchsorted(universe, ids).clip(0, universe.size - 1)
    return pos.astype(np.int64), universe[pos] == ids


def event_weights(data: TrainingSet) -> npt.NDArray[np.float64]:
    """The signal strength of each interaction row; unknown events weigh nothing."""
    events = data.interactions["event"].astype("string")
    return events.map(dict(data.weights)).astype("float64").fillna(0.0).to_numpy()


def require_columns(frame: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    """Fail at the entry point with the missing column names, not deep inside numpy."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} frame lacks columns {missing}")


@dataclass(frozen=True)
class UserItemMatrix:
    """Users x items matrix of damped event weights over sorted id arrays."""

    user_ids: IntArray
    item_ids: IntArray
    matrix: sp.csr_matrix


def user_item_matrix(data: TrainingSet, *, with_catalogue: bool) -> UserItemMatrix:
    """Sum event weights per (user, item) and damp them with log1p.

    Only positive-weight events count (a bare page view weighs 0 by default). The damping keeps
    a user who reloads an item page fifty times from outweighing one purchase. With
    ``with_catalogue`` the item axis also holds catalogue items nobody touched yet, so content
    channels can recall them.
    """
    inter = data.interactions
    require_columns(inter, ("user_id", "item_id", "event", "ts"), "interactions")
    weight = event_weights(data)
    keep = weight > 0
    users = inter["user_id"].to_numpy(dtype=np.int64)[keep]
    items = inter["item_id"].to_numpy(dtype=np.int64)[keep]
    weight = weight[keep]
    user_ids = np.unique(users)
    item_universe = [items]
    if with_catalogue and "item_id" in data.items.columns:
        item_universe.append(data.items["item_id"].dropna().to_numpy(dtype=np.int64))
    item_ids = np.unique(np.concatenate(item_universe))
    rows = np.searchsorted(user_ids, users)
    cols = np.searchsorted(item_ids, items)
    matrix = sp.csr_matrix(
        (weight, (rows, cols)), shape=(user_ids.size, item_ids.size), dtype=np.float64
    )
    matrix.sum_duplicates()
    matrix.data = np.log1p(matrix.data)
    return UserItemMatrix(user_ids, item_ids, matrix.astype(np.float32))


def catalogue_column(data: TrainingSet, item_ids: IntArray, column: str) -> pd.Series:
    """A catalogue column aligned to ``item_ids`` (missing items and values are NA)."""
    items = data.items
    if column not in items.columns or "item_id" not in items.columns:
        return pd.Series(pd.NA, index=range(item_ids.size), dtype="object")
    table = items.dropna(subset=["item_id"]).drop_duplicates("item_id", keep="last")
    series = table.set_index(table["item_id"].astype("int64"))[column]
    return series.reindex(item_ids).reset_index(drop=True)


def active_mask(data: TrainingSet, item_ids: IntArray) -> BoolArray:
    """Which items may be recalled: inactive catalogue items never are; unknown ones may be."""
    active = catalogue_column(data, item_ids, "is_active")
    return active.astype("boolean").fillna(True).to_numpy(dtype=bool)


def item_text(data: TrainingSet, item_ids: IntArray) -> list[str]:
    """Title, description and tags of each item as one string ('' when there is none)."""
    parts = [
        catalogue_column(data, item_ids, column).astype("string").fillna("")
        for column in ("title", "description", "tags")
    ]
    parts[2] = parts[2].str.replace(",", " ", regex=False)
    text = (parts[0] + " " + parts[1] + " " + parts[2]).str.strip()
    return [str(t) for t in text]


def distinct_users(history: sp.csr_matrix) -> FloatArray:
    """Item popularity as the number of distinct users, robust to a few heavy users."""
    return np.asarray(history.getnnz(axis=0), dtype=np.float32)


def row_normalize(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Rows scaled to sum 1 (all-zero rows stay zero)."""
    sums = np.asarray(matrix.sum(axis=1)).ravel()
    inv = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)
    return sp.csr_matrix(sp.diags(inv.astype(np.float32)) @ matrix)


def l2_normalize_rows(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Rows scaled to unit L2 norm (all-zero rows stay zero)."""
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return sp.csr_matrix(sp.diags(inv.astype(np.float32)) @ matrix)


def top_k_rows(scores: FloatArray, k: int) -> tuple[IntArray, FloatArray]:
    """Column indices and values of each row's ``k`` best scores, best first.

    Ties break by lower column index so results do not depend on argpartition's internals.
    Non-candidates (-inf) sort last; callers drop them.
    """
    n_rows, n_cols = scores.shape
    kk = min(k, n_cols)
    if kk == 0:
        return np.empty((n_rows, 0), np.int64), np.empty((n_rows, 0), np.float32)
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < n_cols else None
    if part is None:
        part = np.broadcast_to(np.arange(n_cols), (n_rows, n_cols))
    values = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -values), axis=-1)
    idx = np.take_along_axis(part, order, axis=1).astype(np.int64)
    return idx, np.take_along_axis(values, order, axis=1)


def top_k_sparse_rows(dense: FloatArray, n: int) -> sp.csr_matrix:
    """Keep each row's ``n`` largest positive entries of a dense block as a CSR matrix."""
    idx, values = top_k_rows(dense, n)
    keep = values > 0
    rows = np.repeat(np.arange(dense.shape[0]), idx.shape[1]).reshape(idx.shape)
    return sp.csr_matrix(
        (values[keep], (rows[keep], idx[keep])), shape=dense.shape, dtype=np.float32
    )


def rows_to_candidates(
    item_ids: IntArray, idx: IntArray, values: FloatArray, k: int
) -> list[Candidates]:
    """Turn per-row top-k positions into (item ids, scores) lists, dropping non-candidates."""
    out: list[Candidates] = []
    for row_idx, row_values in zip(idx, values, strict=True):
        keep = np.isfinite(row_values)
        out.append(
            (
                item_ids[row_idx[keep][:k]].astype(np.int64),
                row_values[keep][:k].astype(np.float32),
            )
        )
    return out


def mask_seen(scores: FloatArray, seen: sp.csr_matrix) -> None:
    """Set the score of every seen (row, item) to -inf in place."""
    rows, cols = seen.nonzero()
    scores[rows, cols] = NO_SCORE


def is_seen(seen: sp.csr_matrix, cols: IntArray) -> BoolArray:
    """For a (rows x m) array of item positions, whether row r has seen item cols[r, j].

    Looks up row-major cell keys with one searchsorted: scipy's fancy (row, col) indexing
    costs far more per lookup, and this runs on every over-fetched search result.
    """
    n_rows, m = cols.shape
    if n_rows == 0 or m == 0 or seen.nnz == 0:
        return np.zeros(cols.shape, dtype=bool)
    seen = sp.csr_matrix(seen)
    seen.sort_indices()
    n_cols = np.int64(seen.shape[1])
    seen_rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(seen.indptr))
    seen_keys = seen_rows * n_cols + seen.indices.astype(np.int64)
    keys = np.arange(n_rows, dtype=np.int64)[:, None] * n_cols + cols
    pos = np.searchsorted(seen_keys, keys).clip(0, seen_keys.size - 1)
    return seen_keys[pos] == keys


class Channel(Recaller):
    """A recall channel over the weighted user-item matrix, with generic batching and files.

    Subclasses implement ``fit`` (calling ``_fit_history``) and ``_score_block`` (dense scores
    for a block of known users, -inf or <= 0 for non-candidates); channels with item-to-item
    similarity implement ``_similarity_block``. ``_state`` lists the learned attributes saved.
    """

    name: ClassVar[str]
    _state: ClassVar[tuple[str, ...]] = ("user_ids_", "item_ids_", "history_", "active_")
    # Whether a score must be > 0 to be a candidate: 0 means "no evidence" for channels that
    # sum similarities or shares, and negative regression outputs predict no interaction.
    _positive_only: ClassVar[bool] = True

    user_ids_: IntArray
    item_ids_: IntArray
    history_: sp.csr_matrix
    active_: BoolArray

    # -- parameters -------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """Constructor parameters, scikit-learn style (used by save/load and for MLflow)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- fitting helpers --------------------------------------------------------------------
    def _fit_history(self, data: TrainingSet, *, with_catalogue: bool) -> UserItemMatrix:
        matrix = user_item_matrix(data, with_catalogue=with_catalogue)
        self.user_ids_ = matrix.user_ids
        self.item_ids_ = matrix.item_ids
        self.history_ = matrix.matrix
        self.active_ = active_mask(data, matrix.item_ids)
        return matrix

    def _check_fitted(self) -> None:
        if not hasattr(self, "item_ids_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() first")

    # -- recommend --------------------------------------------------------------------------
    def recommend(
        self, user_ids: Sequence[int], k: int, *, exclude_seen: bool = True
    ) -> dict[int, Candidates]:
        """Top-``k`` items per user, best first; unknown users get ``_fallback``."""
        self._check_fitted()
        k = check_k(k)
        users = as_ids(user_ids, "user_ids")
        pos, known = encode(users, self.user_ids_)
        out: dict[int, Candidates] = {}
        fallback = self._fallback(k)
        for user in users[~known]:
            out[int(user)] = fallback
        known_users, rows = users[known], pos[known]
        step = self._block_size()
        for start in range(0, rows.size, step):
            block = rows[start : start + step]
            lists = self._recommend_block(block, k, exclude_seen)
            for user, cands in zip(known_users[start : start + step], lists, strict=True):
                out[int(user)] = cands
        return out

    def _block_size(self) -> int:
        return block_rows(self.item_ids_.size)

    def _fallback(self, k: int) -> Candidates:
        """What an unknown user gets: nothing, for personalised channels."""
        return empty_candidates()

    def _score_block(self, rows: IntArray) -> FloatArray:
        raise NotImplementedError

    def _recommend_block(self, rows: IntArray, k: int, exclude_seen: bool) -> list[Candidates]:
        scores = np.asarray(self._score_block(rows), dtype=np.float32)
        scores = self._finalize(scores)
        if exclude_seen:
            mask_seen(scores, self.history_[rows])
        idx, values = top_k_rows(scores, k)
        return rows_to_candidates(self.item_ids_, idx, values, k)

    def _finalize(self, scores: FloatArray) -> FloatArray:
        if self._positive_only:
            scores[~(scores > 0)] = NO_SCORE
        scores[:, ~self.active_] = NO_SCORE
        return scores

    # -- similar ----------------------------------------------------------------------------
    def similar(self, item_ids: Sequence[int], k: int) -> dict[int, Candidates]:
        """Top-``k`` items similar to each known item (itself excluded); {} without support."""
        self._check_fitted()
        if not self._has_similarity():
            return {}
        k = check_k(k)
        items = as_ids(item_ids, "item_ids")
        pos, known = encode(items, self.item_ids_)
        out: dict[int, Candidates] = {int(i): empty_candidates() for i in items[~known]}
        known_items, rows = items[known], pos[known]
        step = block_rows(self.item_ids_.size)
        for start in range(0, rows.size, step):
            block = rows[start : start + step]
            scores = self._finalize(np.asarray(self._similarity_block(block), dtype=np.float32))
            scores[np.arange(block.size), block] = NO_SCORE
            idx, values = top_k_rows(scores, k)
            lists = rows_to_candidates(self.item_ids_, idx, values, k)
            for item, cands in zip(known_items[start : start + step], lists, strict=True):
                out[int(item)] = cands
        return out

    def _has_similarity(self) -> bool:
        return type(self)._similarity_block is not Channel._similarity_block

    def _similarity_block(self, rows: IntArray) -> FloatArray:
        raise NotImplementedError

    # -- persistence ------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write parameters (JSON), arrays (npz, no pickle) and Faiss indexes to ``directory``."""
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        scalars: dict[str, Any] = {}
        for attr in self._state:
            value = getattr(self, attr)
            if sp.issparse(value):
                csr = sp.csr_matrix(value)
                arrays[f"{attr}.data"] = csr.data
                arrays[f"{attr}.indices"] = csr.indices
                arrays[f"{attr}.indptr"] = csr.indptr
                arrays[f"{attr}.shape"] = np.asarray(csr.shape, dtype=np.int64)
            elif isinstance(value, np.ndarray):
                if value.dtype == object:
                    raise TypeError(f"{attr} is an object array; it would need pickle to save")
                arrays[attr] = value
            elif isinstance(value, faiss.Index):
                faiss.write_index(value, str(directory / f"{attr}.faiss"))
            elif isinstance(value, bool | int | float | str) or value is None:
                scalars[attr] = value
            else:
                raise TypeError(f"{attr} of type {type(value).__name__} cannot be saved")
        np.savez(directory / STATE_FILE, **arrays)
        meta = {"channel": self.name, "params": self.get_params(), "scalars": scalars}
        (directory / PARAMS_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Read a state written by ``save`` (npz loaded with ``allow_pickle=False``)."""
        directory = Path(directory)
        meta = json.loads((directory / PARAMS_FILE).read_text())
        if meta.get("channel") != cls.name:
            raise ValueError(f"{directory} holds channel {meta.get('channel')!r}, not {cls.name!r}")
        obj = cls(**meta["params"])
        for attr, value in meta["scalars"].items():
            setattr(obj, attr, value)
        with np.load(directory / STATE_FILE, allow_pickle=False) as state:
            keys = set(state.files)
            for attr in cls._state:
                if attr in keys:
                    setattr(obj, attr, state[attr])
                elif f"{attr}.data" in keys:
                    shape = tuple(int(s) for s in state[f"{attr}.shape"])
                    parts = (state[f"{attr}.data"], state[f"{attr}.indices"])
                    matrix = sp.csr_matrix((*parts, state[f"{attr}.indptr"]), shape=shape)
                    setattr(obj, attr, matrix)
                elif (directory / f"{attr}.faiss").exists():
                    setattr(obj, attr, faiss.read_index(str(directory / f"{attr}.faiss")))
                elif attr not in meta["scalars"]:
                    raise ValueError(f"{directory} lacks the learned attribute {attr}")
        obj._after_load()
        return obj

    def _after_load(self) -> None:
        """Hook for settings that files do not carry (e.g. Faiss search parameters)."""
