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


# Per-channel candidates as arrays: (item ids in channel order, scores).
ChannelArrays = tuple[npt.NDArray[np.int64], npt.NDArray[np.floating]]


@dataclass(frozen=True)
class CandidateSet:
    """Fused candidates as arrays, in fused (recall) order: what the ranker's features need.

    `scores[k]` / `ranks[k]` hold each candidate's score and 1-based rank in the feature
    channel of slot `k` (`features.RECALL_CHANNELS` order; 0 / `MISSING_RANK` where that
    channel did not recall it) and `hit[k]` whether the channel recalled any candidate.
    """

    ids: npt.NDArray[np.int64]
    fused: npt.NDArray[np.float32]
    channels: list[str]
    scores: npt.NDArray[np.float64]
    ranks: npt.NDArray[np.float64]
    hit: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return len(self.ids)

    def recall_order(self) -> list[Ranked]:
        return list(zip(self.ids.tolist(), self.fused.tolist(), self.channels, strict=True))

    @classmethod
    def empty(cls) -> CandidateSet:
        c = len(ft.RECALL_CHANNELS)
        return cls(
            np.empty(0, np.int64),
            np.empty(0, np.float32),
            [],
            np.zeros((c, 0)),
            np.full((c, 0), ft.MISSING_RANK),
            np.zeros(c, dtype=bool),
        )

    @classmethod
    def from_candidates(cls, candidates: Sequence[Candidate]) -> CandidateSet:
        """The array form of `(item_id, fused score, channel, hits)` tuples."""
        n = len(candidates)
        c = len(ft.RECALL_CHANNELS)
        scores = np.zeros((c, n))
        ranks = np.full((c, n), ft.MISSING_RANK)
        hit = np.zeros(c, dtype=bool)
        for row, candidate in enumerate(candidates):
            for channel, (score, rank) in candidate[3].items():
                k = _SLOT.get(channel, -1)
                if k >= 0:
                    scores[k, row] = score
                    ranks[k, row] = rank
                    hit[k] = True
        return cls(
            np.fromiter((int(x[0]) for x in candidates), dtype=np.int64, count=n),
            np.fromiter((float(x[1]) for x in candidates), dtype=np.float32, count=n),
            [str(x[2]) for x in candidates],
            scores,
            ranks,
            hit,
        )


_SLOT = {c: k for k, c in enumerate(ft.RECALL_CHANNELS)}


def fuse_arrays(
    per: Mapping[str, ChannelArrays],
    weights: Mapping[str, float] | None = None,
    k: int = MAX_CANDIDATES,
    *,
    rrf_k: float = 60.0,
    default_weight: float = 1.0,
) -> CandidateSet:
    """Fuse per-channel `(ids, scores)` arrays (each in channel order) into up to `k`
    candidates, keeping each candidate's score and rank in every feature channel that
    recalled it (a repeated item: its first mention; zero-weight channels included, as in
    training's `candidate_pairs`).

    The fusion is `recall.fuse`'s weighted RRF (a channel missing from `weights` gets
    `default_weight`, 0 switches it off; ties: item id; shown channel: the largest
    contribution, ties alphabetical), computed in one pass over all channels' rows instead of
    a pass per channel: the same ids, scores and channels (tests compare the two), at a
    fraction of the cost on the request path.
    """
    weights = weights or {}
    names = sorted(c for c, v in per.items() if len(v[0]))
    if not names:
        return CandidateSet.empty()
    w = np.empty(len(names))
    for idx, name in enumerate(names):
        w[idx] = float(weights.get(name, default_weight))
        if w[idx] < 0 or not np.isfinite(w[idx]):
            raise ValueError(f"weight of channel {name!r} must be finite and >= 0, got {w[idx]}")
    sizes = [len(per[name][0]) for name in names]
    ids = np.concatenate([np.asarray(per[name][0], dtype=np.int64) for name in names])
    scores = np.concatenate([np.asarray(per[name][1], dtype=np.float32) for name in names])
    chan = np.repeat(np.arange(len(names)), sizes)
    pos = np.concatenate([np.arange(n) for n in sizes])
    # First mention of each (channel, item): the rows fusion and the features use.
    order = np.lexsort((pos, ids, chan))
    first = np.r_[True, (chan[order][1:] != chan[order][:-1]) | (ids[order][1:] != ids[order][:-1])]
    keep = np.sort(order[first])
    if len(keep) < len(ids):
        ids, scores, chan, pos = ids[keep], scores[keep], chan[keep], pos[keep]
    unique, group = np.unique(ids, return_inverse=True)
    weight = w[chan]
    fused_rows = weight > 0
    if not fused_rows.any():
        return CandidateSet.empty()
    contrib = np.where(fused_rows, weight / (rrf_k + pos + 1.0), 0.0)
    # Same summation order as `fuse` (channels alphabetical, each in its own order); the
    # zero terms of switched-off channels change no sum.
    total = np.bincount(group, weights=contrib, minlength=len(unique))
    eligible = np.bincount(group, weights=fused_rows, minlength=len(unique)) > 0
    ranking = np.lexsort((unique, -total))
    top = ranking[eligible[ranking]][:k]
    f_group, f_contrib, f_chan = group[fused_rows], contrib[fused_rows], chan[fused_rows]
    best_order = np.lexsort((f_chan, -f_contrib, f_group))
    leads = np.r_[True, f_group[best_order][1:] != f_group[best_order][:-1]]
    best = np.empty(len(unique), dtype=np.int64)
    best[f_group[best_order][leads]] = f_chan[best_order][leads]
    n = len(top)
    at = np.full(len(unique), -1, dtype=np.int64)
    at[top] = np.arange(n)
    row_at = at[group]
    slot_of = np.array([_SLOT.get(name, -1) for name in names], dtype=np.int64)
    row_slot = slot_of[chan]
    use = (row_at >= 0) & (row_slot >= 0)
    c = len(ft.RECALL_CHANNELS)
    channel_scores = np.zeros((c, n))
    channel_ranks = np.full((c, n), ft.MISSING_RANK)
    hit = np.zeros(c, dtype=bool)
    channel_scores[row_slot[use], row_at[use]] = scores[use]
    channel_ranks[row_slot[use], row_at[use]] = pos[use] + 1.0
    hit[row_slot[use]] = True
    shown = [names[i] for i in best[top].tolist()]
    return CandidateSet(
        unique[top], total[top].astype(np.float32), shown, channel_scores, channel_ranks, hit
    )


def pair_arrays(pairs: Sequence[tuple[int, float]]) -> ChannelArrays:
    """One channel's `(item_id, score)` pairs as `(int64 ids, float32 scores)` arrays."""
    ids = np.fromiter((int(i) for i, _ in pairs), dtype=np.int64, count=len(pairs))
    scores = np.fromiter((float(s) for _, s in pairs), dtype=np.float32, count=len(pairs))
    return ids, scores


def fuse_lists(
    lists: Mapping[str, Sequence[tuple[int, float]]],
    weights: Mapping[str, float] | None = None,
    k: int = MAX_CANDIDATES,
) -> list[Candidate]:
    """`fuse_arrays` over `(item_id, score)` lists, as `(item_id, fused score, channel,
    hits)` tuples with `hits` the candidate's `(score, rank)` per channel that recalled it."""
    per = {channel: pair_arrays(pairs) for channel, pairs in lists.items() if pairs}
    if not per:
        return []
    from apps.pipeline.train.recall import fuse

    ids, fused, chans = fuse(per, weights or {}, k)
    first_mention: dict[str, dict[int, tuple[float, float]]] = {}
    for channel, (channel_ids, channel_scores) in per.items():
        hits: dict[int, tuple[float, float]] = {}
        for rank, (item, score) in enumerate(
            zip(channel_ids.tolist(), channel_scores.tolist(), strict=True), 1
        ):
            hits.setdefault(item, (score, float(rank)))
        first_mention[channel] = hits
    return [
        (
            int(item),
            float(score),
            str(channel),
            {c: h[item] for c, h in first_mention.items() if item in h},
        )
        for item, score, channel in zip(ids.tolist(), fused.tolist(), chans.tolist(), strict=True)
    ]


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
        self._slot = _SLOT

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
            _check_files(bundle)
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
        candidates: Sequence[Candidate] | CandidateSet,
        now: pd.Timestamp | None = None,
    ) -> npt.NDArray[np.float32]:
        """The model's float32 feature matrix of the candidates, one row each."""
        return self._features(user_id, _as_set(candidates), now)[0]

    def _features(
        self,
        user_id: int,
        candidates: CandidateSet,
        now: pd.Timestamp | None = None,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_] | None]:
        """The model matrix and, per row, whether the user already bought the item."""
        n = len(candidates)
        columns: dict[str, object] = {
            "user_id": np.full(n, int(user_id), dtype=np.int64),
            "item_id": candidates.ids,
        }
        # Only channels that recalled something: an absent column gets the catalogue default
        # (score 0, rank MISSING_RANK), exactly what training filled in, at half the cost.
        for channel, k in self._slot.items():
            if candidates.hit[k]:
                columns[self._score_cols[channel]] = candidates.scores[k]
                columns[self._rank_cols[channel]] = candidates.ranks[k]
        # Candidates arrive in fused (recall) order, as the training pairs' `fused_rank`.
        columns["fused_rank"] = np.arange(1, n + 1, dtype=np.float64)
        when = self.cutoff if now is None else max(pd.Timestamp(now), self.cutoff)
        # A mapping of arrays, not a DataFrame: the same matrix without pandas' overhead.
        X, _ = self.builder.transform_pairs(columns, when)
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
        candidates: Sequence[Candidate] | CandidateSet,
        now: pd.Timestamp | None = None,
        *,
        budget_s: float | None = None,
    ) -> RankResult:
        """The candidates by descending model score (ties keep recall order).

        `now` (default: the bundle's cutoff; never earlier) ages the recency features. On
        any error, or when scoring took longer than `budget_s` (default: the ranker's), the
        candidates come back in the given (recall) order with `failed=True`.
        """
        candidates = _as_set(candidates)
        recall = candidates.recall_order()
        if not len(candidates):
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


def _check_files(bundle: Path) -> None:
    """Refuse (`RankerLoadError`) a ranker or feature file that differs from the bundle's
    manifest before anything parses it: LightGBM aborts the whole process (std::terminate) on
    some corrupt model files, which in a serving worker would be a crash loop, not an error.
    Bundles without a manifest (built by hand) are not checked."""
    from apps.models.bundle import MANIFEST_NAME, file_sha256, read_manifest

    if not (bundle / MANIFEST_NAME).is_file():
        return
    for rel, digest in read_manifest(bundle)["files"].items():
        if rel.startswith((f"{RANKER_DIR}/", f"{FEATURES_DIR}/")):
            path = bundle / rel
            if not path.is_file() or file_sha256(path) != digest.lower():
                raise RankerLoadError(f"{rel} does not match the bundle's manifest checksum")


def _as_set(candidates: Sequence[Candidate] | CandidateSet) -> CandidateSet:
    if isinstance(candidates, CandidateSet):
        return candidates
    return CandidateSet.from_candidates(candidates)
