"""Catalogue-driven channels: TF-IDF content, tags, category and price band."""

from __future__ import annotations

from typing import ClassVar, Self

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer

from apps.pipeline.train.base import TrainingSet
from apps.pipeline.train.recall._common import (
    NO_SCORE,
    Channel,
    FloatArray,
    IntArray,
    catalogue_column,
    distinct_users,
    item_text,
    l2_normalize_rows,
    row_normalize,
)

# Added to a tag-match score so equal matches rank by popularity without popularity ever
# outweighing one more shared tag (match scores differ by far more than this).
POPULARITY_TIEBREAK = np.float32(1e-3)


class Content(Channel):
    """TF-IDF over title + description + tags; a user profile is the weighted mean of history.

    ``analyzer="char_wb"`` with ``ngram_max=2`` suits text without spaces (Chinese titles);
    the default word analyzer suits English.
    """

    name: ClassVar[str] = "content"
    _state: ClassVar[tuple[str, ...]] = (*Channel._state, "vectors_")

    vectors_: sp.csr_matrix

    def __init__(
        self,
        max_features: int = 50_000,
        analyzer: str = "word",
        ngram_max: int = 1,
        min_df: int = 1,
    ) -> None:
        self.max_features = max_features
        self.analyzer = analyzer
        self.ngram_max = ngram_max
        self.min_df = min_df

    def fit(self, data: TrainingSet) -> Self:
        """Vectorise the catalogue text (items without text get an empty vector)."""
        self._fit_history(data, with_catalogue=True)
        texts = item_text(data, self.item_ids_)
        vectorizer = TfidfVectorizer(
            max_features=self.max_features,
            analyzer=self.analyzer,
            ngram_range=(1, self.ngram_max),
            min_df=self.min_df,
            sublinear_tf=True,
            dtype=np.float32,
        )
        if any(texts):
            self.vectors_ = sp.csr_matrix(vectorizer.fit_transform(texts), dtype=np.float32)
        else:
            self.vectors_ = sp.csr_matrix((len(texts), 1), dtype=np.float32)
        return self

    def _score_block(self, rows: IntArray) -> FloatArray:
        profile = row_normalize(self.history_[rows]) @ self.vectors_
        return np.asarray((profile @ self.vectors_.T).toarray(), dtype=np.float32)

    def _similarity_block(self, rows: IntArray) -> FloatArray:
        return np.asarray((self.vectors_[rows] @ self.vectors_.T).toarray(), dtype=np.float32)


class Tag(Channel):
    """A user's tag profile (weighted tag shares) matched against each item's tags.

    Score = profile . item tags (unit length, so an item with many tags is not favoured), plus
    a popularity tie-break.
    """

    name: ClassVar[str] = "tag"
    _state: ClassVar[tuple[str, ...]] = (*Channel._state, "tags_", "tag_names_", "popularity_")

    tags_: sp.csr_matrix
    tag_names_: np.ndarray
    popularity_: FloatArray

    def __init__(self) -> None:
        pass

    def fit(self, data: TrainingSet) -> Self:
        """Build the item x tag matrix from the comma-separated ``tags`` column."""
        self._fit_history(data, with_catalogue=True)
        tags = catalogue_column(data, self.item_ids_, "tags").astype("string").fillna("")
        exploded = tags.str.lower().str.split(",").explode().str.strip()
        exploded = exploded[exploded.notna() & (exploded != "")]
        rows = exploded.index.to_numpy(dtype=np.int64)
        codes, names = pd.factorize(exploded.to_numpy(dtype=str), sort=True)
        matrix = sp.csr_matrix(
            (np.ones(rows.size, np.float32), (rows, codes)),
            shape=(self.item_ids_.size, max(1, names.size)),
        )
        matrix.data[:] = 1.0  # a tag listed twice is still one tag
        self.tags_ = l2_normalize_rows(matrix)
        self.tag_names_ = np.asarray(names, dtype=str)
        pop = distinct_users(self.history_)
        self.popularity_ = pop / pop.max() if pop.size and pop.max() > 0 else pop
        return self

    def _score_block(self, rows: IntArray) -> FloatArray:
        profile = row_normalize(self.history_[rows] @ self.tags_)
        match = np.asarray((profile @ self.tags_.T).toarray(), dtype=np.float32)
        return np.where(match > 0, match + POPULARITY_TIEBREAK * self.popularity_, NO_SCORE)

    def _similarity_block(self, rows: IntArray) -> FloatArray:
        match = np.asarray((self.tags_[rows] @ self.tags_.T).toarray(), dtype=np.float32)
        return np.where(match > 0, match + POPULARITY_TIEBREAK * self.popularity_, NO_SCORE)


class _GroupShare(Channel):
    """Items grouped one group per item; score = user's share of a group x in-group popularity.

    In-group popularity is (1 + users) / (1 + the group's best), so a user who loves a small
    group still sees its best items near the top, and untouched items keep a small score.
    """

    _state: ClassVar[tuple[str, ...]] = (*Channel._state, "group_of_", "group_popularity_")

    group_of_: IntArray  # group index per item, -1 for none
    group_popularity_: FloatArray

    def _groups(self, data: TrainingSet) -> tuple[IntArray, int]:
        raise NotImplementedError

    def fit(self, data: TrainingSet) -> Self:
        """Assign items to groups and learn in-group popularity."""
        self._fit_history(data, with_catalogue=True)
        group_of, n_groups = self._groups(data)
        self.group_of_ = group_of.astype(np.int64)
        pop = distinct_users(self.history_)
        grouped = group_of >= 0
        best = np.zeros(n_groups + 1, np.float32)
        np.maximum.at(best, np.where(grouped, group_of, n_groups), pop)
        share = (1.0 + pop) / (1.0 + best[np.where(grouped, group_of, n_groups)])
        self.group_popularity_ = np.where(grouped, share, 0.0).astype(np.float32)
        return self

    def _score_block(self, rows: IntArray) -> FloatArray:
        n_groups = int(self.group_of_.max()) + 1 if self.group_of_.size else 0
        grouped = self.group_of_ >= 0
        membership = sp.csr_matrix(
            (
                np.ones(int(grouped.sum()), np.float32),
                (np.flatnonzero(grouped), self.group_of_[grouped]),
            ),
            shape=(self.item_ids_.size, n_groups + 1),
        )
        shares = row_normalize(self.history_[rows] @ membership).toarray()
        # The last column is the "no group" bucket, always 0, so ungrouped items score 0.
        per_item = shares[:, np.where(grouped, self.group_of_, n_groups)]
        return np.asarray(per_item * self.group_popularity_, dtype=np.float32)


class Category(_GroupShare):
    """A user's category shares -> the popular items of those categories."""

    name: ClassVar[str] = "category"
    _state: ClassVar[tuple[str, ...]] = (*_GroupShare._state, "category_names_")

    category_names_: np.ndarray

    def __init__(self) -> None:
        pass

    def _groups(self, data: TrainingSet) -> tuple[IntArray, int]:
        category = catalogue_column(data, self.item_ids_, "category").astype("string")
        category = category.str.strip().str.lower().replace("", pd.NA)
        codes, names = pd.factorize(category, sort=True, use_na_sentinel=True)
        self.category_names_ = np.asarray(names, dtype=str)
        return np.asarray(codes, dtype=np.int64), int(names.size)


class PriceBand(_GroupShare):
    """Price quantile bands of the catalogue; a user's band shares -> popular items there."""

    name: ClassVar[str] = "price_band"
    _state: ClassVar[tuple[str, ...]] = (*_GroupShare._state, "edges_")

    edges_: FloatArray

    def __init__(self, n_bands: int = 5) -> None:
        self.n_bands = n_bands

    def _groups(self, data: TrainingSet) -> tuple[IntArray, int]:
        if self.n_bands < 1:
            raise ValueError(f"n_bands must be >= 1, got {self.n_bands}")
        price = pd.to_numeric(catalogue_column(data, self.item_ids_, "price"), errors="coerce")
        price_arr = price.to_numpy(dtype=np.float64, na_value=np.nan)
        priced = np.isfinite(price_arr) & (price_arr >= 0)
        quantiles = np.linspace(0, 1, self.n_bands + 1)[1:-1]
        edges = np.quantile(price_arr[priced], quantiles) if priced.any() else np.empty(0)
        self.edges_ = np.asarray(edges, dtype=np.float64)
        band = np.searchsorted(self.edges_, price_arr, side="right")
        return np.where(priced, band, -1).astype(np.int64), self.n_bands
