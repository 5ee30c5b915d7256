"""Shared types of the training core: the training set and the ``Recaller`` interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Self

import numpy as np
import pandas as pd

from apps.pipeline import schema

# A candidate list: item ids and scores, best first, as two aligned arrays.
Candidates = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class TrainingSet:
    """What every recaller and the ranker learn from: clean canonical frames before a cutoff.

    ``interactions`` holds only rows with a known user and item and ``ts < cutoff`` (point in
    time: nothing after the cutoff leaks in). ``weights`` maps an event to its signal strength.
    """

    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame
    cutoff: pd.Timestamp
    weights: Mapping[str, float] = field(default_factory=lambda: dict(schema.EVENTS))

    @classmethod
    def from_frames(
        cls,
        frames: Mapping[str, pd.DataFrame],
        *,
        cutoff: pd.Timestamp | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> TrainingSet:
        """Cut clean frames at ``cutoff`` (default: after the newest event)."""
        inter = frames["interactions"]
        inter = inter[inter["user_id"].notna() & inter["item_id"].notna()]
        if cutoff is None:
            cutoff = (
                inter["ts"].max() + pd.Timedelta(seconds=1)
                if len(inter)
                else pd.Timestamp.now(tz="UTC")
            )
        inter = inter[inter["ts"] < cutoff].copy()
        inter["user_id"] = inter["user_id"].astype("int64")
        inter["item_id"] = inter["item_id"].astype("int64")
        return cls(
            interactions=inter.reset_index(drop=True),
            items=frames["items"],
            users=frames["users"],
            cutoff=cutoff,
            weights=dict(weights or schema.EVENTS),
        )


class Recaller(ABC):
    """A recall channel: learns from a TrainingSet, returns candidates for users and items.

    Conventions (scikit-learn style): ``__init__`` stores parameters only; ``fit`` returns self
    and sets learned attributes ending in ``_``; ``save``/``load`` use npz/parquet/json/faiss
    files in a directory, never pickle.
    """

    name: ClassVar[str]

    @abstractmethod
    def fit(self, data: TrainingSet) -> Self:
        """Learn from the training set."""

    @abstractmethod
    def recommend(
        self, user_ids: Sequence[int], k: int, *, exclude_seen: bool = True
    ) -> dict[int, Candidates]:
        """Top-``k`` candidates per user (unknown users get an empty list or a fallback)."""

    def similar(self, item_ids: Sequence[int], k: int) -> dict[int, Candidates]:
        """Top-``k`` items similar to each item; channels without item similarity return {}."""
        return {}

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write the learned state to ``directory`` without pickle."""

    @classmethod
    @abstractmethod
    def load(cls, directory: Path) -> Self:
        """Read a state written by ``save``."""
