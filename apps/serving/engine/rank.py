"""Online re-ranking of fused recall candidates with the bundle's ranker. Pure core (no Django).

A `Ranker` is built once per bundle, at snapshot load (off the request path): it loads the
`FeatureBuilder` from `bundle/features` (its user/item tables are already dense arrays, so a
request only gathers rows), the ranker from `bundle/ranker`, and picks the fastest scorer that
agrees with native LightGBM within 1e-5 (`choose_scorer` over `NativeLGBMScorer` and, when the
bundle has `model.onnx`, `OnnxScorer`, both single-threaded). A smoke check scores a few rows
and refuses the bundle (`RankerLoadError`) when a score is not finite.

`rank()` builds the candidates' feature matrix with one vectorised `transform_pairs` call and
scores it. It never raises: on any error, or when scoring took longer than the per-call budget,
it returns the candidates in recall (fused) order with `failed=True`, which the caller labels
`ranker_failed` (a kept recall order, not an error).

Features match training: per-channel recall scores and ranks become the
`recall_score_<c>`/`recall_rank_<c>` columns and the candidate's position the `fused_rank`
column; absent channels get the training defaults (0 / `MISSING_RANK`), and no scene is
passed (training used none).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from apps.pipeline import features as ft
from apps.pipeline.train import ranker as rk

logger = logging.getLogger(__name__)

FEATURES_DIR = "features"
RANKER_DIR = "ranker"
# Candidates fused from the per-channel lists before ranking (the training default, `fused`).
MAX_CANDIDATES = 200
# Scoring 200 rows takes 1-3 ms (PERFORMANCE.md); ten times that means something is wrong
# (a starved CPU, a pathological input) and the request is better served in recall order.
DEFAULT_BUDGET_S = 0.03
SMOKE_ROWS = 8
CHOOSE_ROWS = 200
AGREEMENT_ATOL = 1e-5

# channel -> (score in that channel, 1-based rank in that channel)
ChannelHits = Mapping[str, tuple[float, float]]
# (item_id, fused score, channel shown, per-channel hits)
Candidate = tuple[int, float, str, ChannelHits]
Ranked = tuple[int, float, str]


class RankerLoadError(Exception):
    """The bundle's ranker cannot serve (unreadable files, schema mismatch, failed smoke)."""


_PURCHASES: int | None = (
    ft.FEATURE_NAMES.index("ui_past_purchases") if "ui_past_purchases" in ft.FEATURE_NAMES else None
)


@dataclass(frozen=True)
class RankResult:
    """Ranked `(item_id, score, channel)` rows; `failed` means they are in recall order."""

    items: list[Ranked]
    failed: bool = False
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def has_ranker(bundle_dir: str | Path) -> bool:
    """True when the bundle carries a feature state and a ranker (newer bundles)."""
    bundle = Path(bundle_dir)
    return (bundle / FEATURES_DIR / "features.json").is_file() and (
        bundle / RANKER_DIR / rk.META_FILE
    ).is_file()


def fuse_lists(
    lists: Mapping[str, Sequence[tuple[int, float]]],
    weights: Mapping[str, float] | None = None,
    k: int = MAX_CANDIDATES,
) -> list[Candidate]:
    """Fuse per-channel `(item_id, score)` lists (each in channel order) into up to `k`
    candidates with `recall.fuse` (weighted RRF; a channel missing from `weights` gets 1.0),
    keeping each item's score and rank in every channel that recalled it."""
    from apps.pipeline.train.recall import fuse

    per: dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]] = {}
    hits_by_channel: dict[str, dict[int, tuple[float, float]]] = {}
    for channel, pairs in lists.items():
        if not pairs:
            continue
        ids = np.fromiter((int(i) for i, _ in pairs), dtype=np.int64, count=len(pairs))
        scores = np.fromiter((float(s) for _, s in pairs), dtype=np.float32, count=len(pairs))
        per[channel] = (ids, scores)
        hits: dict[int, tuple[float, float]] = {}
        for rank, (item, score) in enumerate(zip(ids.tolist(), scores.tolist(), strict=True), 1):
            hits.setdefault(item, (score, float(rank)))  # a repeated item: its best mention
        hits_by_channel[channel] = hits
    if not per:
        return []
    ids, scores, chans = fuse(per, weights or {}, k)
    out: list[Candidate] = []
    for item, score, channel in zip(ids.tolist(), scores.tolist(), chans.tolist(), strict=True):
        item_hits = {c: h[item] for c, h in hits_by_channel.items() if item in h}
        out.append((int(item), float(score), str(channel), item_hits))
    return out


class Ranker:
    """The bundle's feature builder and fastest agreeing scorer, ready for `rank()`."""

    def __init__(
        self,
        builder: ft.FeatureBuilder,
        scorer: rk.Scorer,
        model_features: Sequence[str],
        *,
        budget_s: float = DEFAULT_BUDGET_S,
        timings: Mapping[str, float] | None = None,
    ) -> None:
        self.builder = builder
        self.scorer = scorer
        self.budget_s = budget_s
        self.timings = dict(timings or {})
        self.model_features = list(model_features)
        self.cutoff: pd.Timestamp = builder.cutoff_
        names = list(ft.FEATURE_NAMES)
        missing = [f for f in model_features if f not in names]
        if missing:
            raise RankerLoadError(f"the ranker needs features the builder lacks: {missing[:5]}")
        # transform_pairs returns catalogue order; gather the model's columns only if it differs.
        self._columns: npt.NDArray[np.intp] | None = (
            None
            if list(model_features) == names
            else np.asarray([names.index(f) for f in model_features], dtype=np.intp)
        )
        self._score_cols = {c: f"recall_score_{c}" for c in ft.RECALL_CHANNELS}
        self._rank_cols = {c: f"recall_rank_{c}" for c in ft.RECALL_CHANNELS}
        self._slot = {c: k for k, c in enumerate(ft.RECALL_CHANNELS)}
        # Serving channel name -> slot (-1: not a feature channel), filled on first sight.
        self._slot_of: dict[str, int] = {}

    @property
    def scorer_name(self) -> str:
        return str(self.scorer.name)

    # ------------------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        *,
        budget_s: float = DEFAULT_BUDGET_S,
        num_threads: int = 1,
    ) -> Ranker:
        """Load, choose the scorer and smoke-test; `RankerLoadError` when it cannot serve."""
        bundle = Path(bundle_dir)
        try:
            builder = ft.FeatureBuilder.load(bundle / FEATURES_DIR)
            model = rk.load_ranker(bundle / RANKER_DIR)
            model_features = list(model.feature_names_)
            if isinstance(model, rk.LogisticRanker):
                scorers: list[rk.Scorer] = [model.scorer()]
            else:
                scorers = [rk.NativeLGBMScorer.from_ranker(model, num_threads=num_threads)]
                onnx_path = bundle / RANKER_DIR / rk.ONNX_FILE
                if onnx_path.is_file():
                    try:
                        scorers.append(rk.OnnxScorer(onnx_path, num_threads=num_threads))
                    except Exception as exc:  # a broken export: native still serves
                        logger.warning("ONNX scorer of %s unusable: %s", bundle, exc)
            probe = cls(builder, scorers[0], model_features, budget_s=budget_s)
            sample = probe.sample_matrix(CHOOSE_ROWS)
            scorer, timings = rk.choose_scorer(scorers, sample, atol=AGREEMENT_ATOL)
            ranker = cls(builder, scorer, model_features, budget_s=budget_s, timings=timings)
            ranker.smoke()
        except RankerLoadError:
            raise
        except Exception as exc:
            raise RankerLoadError(f"cannot load the ranker of {bundle}: {exc}") from exc
        return ranker

    def sample_matrix(self, n: int) -> npt.NDArray[np.float32]:
        """Feature rows of `n` known (user, item) pairs, for scorer choice and smoke tests."""
        users = self.builder.user_ids_
        items = self.builder.item_ids_
        if not len(users) or not len(items):
            raise RankerLoadError("the feature state knows no user or no item")
        pairs = pd.DataFrame(
            {
                "user_id": np.resize(users, n),
                "item_id": np.resize(items[::-1], n),
                "recall_score_popular": np.linspace(1.0, 0.0, n),
                "recall_rank_popular": np.arange(1, n + 1, dtype=np.float64),
            }
        )
        X, _ = self.builder.transform_pairs(pairs)
        return self._model_matrix(X)

    def smoke(self, rows: int = SMOKE_ROWS) -> None:
        """Score a few rows; `RankerLoadError` unless every score is finite."""
        scores = self.scorer.score(self.sample_matrix(rows))
        if scores.shape != (rows,) or not np.all(np.isfinite(scores)):
            raise RankerLoadError(f"ranker smoke check failed: {scores[:rows]!r}")

    # ------------------------------------------------------------------------- serving

    def _model_matrix(self, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        if self._columns is not None:
            X = X[:, self._columns]
        return np.ascontiguousarray(X, dtype=np.float32)

    def features(
        self,
        user_id: int,
        candidates: Sequence[Candidate],
        now: pd.Timestamp | None = None,
    ) -> npt.NDArray[np.float32]:
        """The model's float32 feature matrix of the candidates, one row each."""
        return self._features(user_id, candidates, now)[0]

    def _features(
        self,
        user_id: int,
        candidates: Sequence[Candidate],
        now: pd.Timestamp | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_] | None]:
        """The model matrix and, per row, whether the user already bought the item."""
        n = len(candidates)
        scores = np.zeros((len(ft.RECALL_CHANNELS), n))
        ranks = np.full((len(ft.RECALL_CHANNELS), n), ft.MISSING_RANK)
        hit = np.zeros(len(ft.RECALL_CHANNELS), dtype=bool)
        slot_of = self._slot_of
        for row, candidate in enumerate(candidates):
            for channel, (score, rank) in candidate[3].items():
                k = slot_of.get(channel)
                if k is None:
                    k = slot_of[channel] = self._slot.get(channel, -1)
                if k >= 0:
                    scores[k, row] = score
                    ranks[k, row] = rank
                    hit[k] = True
        columns: dict[str, object] = {
            "user_id": np.full(n, int(user_id), dtype=np.int64),
            "item_id": np.fromiter((int(c[0]) for c in candidates), dtype=np.int64, count=n),
        }
        # Only channels that recalled something: an absent column gets the catalogue default
        # (score 0, rank MISSING_RANK), exactly what training filled in, at half the cost.
        for channel, k in self._slot.items():
            if hit[k]:
                columns[self._score_cols[channel]] = scores[k]
                columns[self._rank_cols[channel]] = ranks[k]
        # Candidates arrive in fused (recall) order, as the training pairs' `fused_rank`.
        columns["fused_rank"] = np.arange(1, n + 1, dtype=np.float64)
        when = self.cutoff if now is None else max(pd.Timestamp(now), self.cutoff)
        X, _ = self.builder.transform_pairs(pd.DataFrame(columns), when)
        purchased = X[:, _PURCHASES] > 0 if _PURCHASES is not None else None
        return self._model_matrix(X), purchased

    def knows_user(self, user_id: int) -> bool:
        """Whether the bundle's feature state has history for the user."""
        ids = self.builder.user_ids_
        pos = int(np.searchsorted(ids, user_id))
        return pos < len(ids) and int(ids[pos]) == int(user_id)

    def rank(
        self,
        user_id: int,
        candidates: Sequence[Candidate],
        now: pd.Timestamp | None = None,
        *,
        budget_s: float | None = None,
    ) -> RankResult:
        """The candidates by descending model score (ties keep recall order).

        `now` (default: the bundle's cutoff; never earlier) ages the recency features. On
        any error, or when scoring took longer than `budget_s` (default: the ranker's), the
        candidates come back in the given (recall) order with `failed=True`.
        """
        recall: list[Ranked] = [(int(c[0]), float(c[1]), str(c[2])) for c in candidates]
        if not candidates:
            return RankResult(recall)
        budget = self.budget_s if budget_s is None else budget_s
        try:
            started = time.perf_counter()
            X, purchased = self._features(user_id, candidates, now)
            built = time.perf_counter()
            scores = self.scorer.score(X)
            done = time.perf_counter()
            if scores.shape != (len(candidates),) or not np.all(np.isfinite(scores)):
                raise ValueError(f"scorer {self.scorer_name} returned unusable scores")
        except Exception as exc:
            logger.warning("ranker failed for user %s, keeping recall order: %s", user_id, exc)
            return RankResult(recall, failed=True, error=f"{type(exc).__name__}: {exc}")
        timings = {"features_s": built - started, "score_s": done - built}
        if done - built > budget:
            logger.warning(
                "ranker scoring took %.1f ms > budget %.1f ms, keeping recall order",
                (done - built) * 1e3,
                budget * 1e3,
            )
            return RankResult(recall, failed=True, error="budget_exceeded", timings=timings)
        order = np.argsort(-scores, kind="stable")
        if purchased is not None and purchased.shape == scores.shape and purchased.any():
            # Items the user already bought (in the bundle's history) are never recommended.
            order = order[~purchased[order]]
        score_list = scores.tolist()
        items = [(recall[k][0], score_list[k], recall[k][2]) for k in order.tolist()]
        return RankResult(items, timings=timings)
