"""The ranker: labels from post-cutoff behaviour, LightGBM (binary or lambdarank) with a logistic
fallback, ONNX export, and the scorers the serving hot path chooses from. Pure core (no Django).

Scores: a binary model (LightGBM ``binary`` or the logistic fallback) predicts the probability
of engagement; a ``lambdarank`` model predicts a raw ranking score (a log-odds-like number with
no probability meaning). Every scorer of one model returns the same numbers as the model's
``predict``, as float32, so the serving path may swap one scorer for another.

Files (no pickle anywhere): ``model.txt`` (LightGBM's text model, already cut at the best
iteration), ``ranker.json`` (kind, parameters, feature names, learned state of the logistic
model, validation metrics), ``model.onnx`` (optional export of a LightGBM model).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, Self, TypeAlias, runtime_checkable

import lightgbm as lgb
import numpy as np
import pandas as pd
from scipy.special import expit

from apps.pipeline import schema
from apps.pipeline.evaluate import auc, ndcg_grouped

MODEL_FILE = "model.txt"
META_FILE = "ranker.json"
ONNX_FILE = "model.onnx"
# onnxmltools' LightGBM converter emits ai.onnx opset 15 at most (see PERFORMANCE.md).
ONNX_OPSET = 15
ONNX_INPUT = "input"
# onnxruntime sums a TreeEnsembleRegressor in float32 while LightGBM sums in double: a
# lambdarank model of 400 trees with raw scores near 20 drifted 2.7e-5 from LightGBM. Summing
# blocks of 50 trees in double kept it under 6e-6 (up to 1,000 trees measured) at no
# measurable cost. Binary models need no split: the sigmoid shrinks the error (3.6e-7 at
# 1,000 trees), and onnxmltools only splits regressors.
ONNX_TREES_PER_NODE = 50

Objective = Literal["lambdarank", "binary"]
Features: TypeAlias = np.ndarray | pd.DataFrame

__all__ = [
    "LGBMRanker",
    "LogisticRanker",
    "LogisticScorer",
    "NativeLGBMScorer",
    "OnnxMismatchError",
    "OnnxScorer",
    "Scorer",
    "build_labels",
    "choose_scorer",
    "export_onnx",
    "group_sizes",
    "load_ranker",
    "verify_onnx",
]


# ----------------------------------------------------------------------------------- labels


def build_labels(
    pairs: pd.DataFrame,
    interactions_after_cutoff: pd.DataFrame,
    weights: Mapping[str, float] | None = None,
    *,
    graded: bool = True,
    exposures: pd.DataFrame | None = None,
    n_sampled_negatives: int = 0,
    item_pool: Sequence[int] | np.ndarray | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Label each (user, item) pair by what the user did with the item after the cutoff.

    The label is the largest event weight among the pair's post-cutoff events (``graded``, for
    lambdarank; weights must then be whole numbers because LightGBM's grades are integers) or
    1 if that weight is positive (binary). Events missing from ``weights`` (default
    ``schema.EVENTS``) carry no signal.

    The rows are the candidate ``pairs`` (recall output; those without an interaction are the
    negatives), plus the pairs of ``exposures`` from the same window (shown but not clicked:
    the strongest negatives; shown and clicked: positives), plus ``n_sampled_negatives`` items
    per user drawn with ``seed`` from ``item_pool`` (default: every item in the inputs) among
    the items the user neither interacted with nor already has a row for.

    Returns ``user_id``, ``item_id``, ``label`` (int64) and ``origin`` ("candidate",
    "exposure" or "sampled"), sorted by user then item so that each user is one group.
    """
    weights = dict(schema.EVENTS if weights is None else weights)
    if n_sampled_negatives < 0:
        raise ValueError("n_sampled_negatives must be >= 0")
    if graded:
        fractional = {e: w for e, w in weights.items() if w != math.floor(w) or w < 0}
        if fractional:
            raise ValueError(f"graded labels need non-negative whole weights, got {fractional}")

    frames = [_pairs(pairs).assign(origin="candidate")]
    if exposures is not None:
        frames.append(_pairs(exposures).assign(origin="exposure"))
    rows = pd.concat(frames, ignore_index=True).drop_duplicates(["user_id", "item_id"])

    events = interactions_after_cutoff.dropna(subset=["user_id", "item_id"])
    strength = events["event"].astype(str).map(weights).fillna(0.0)
    best = (
        pd.DataFrame(
            {
                "user_id": events["user_id"].astype("int64"),
                "item_id": events["item_id"].astype("int64"),
                "weight": strength,
            }
        )
        .groupby(["user_id", "item_id"], as_index=False)["weight"]
        .max()
    )

    if n_sampled_negatives:
        pool = np.unique(
            np.asarray(item_pool, dtype=np.int64)
            if item_pool is not None
            else np.concatenate([rows["item_id"].to_numpy(), best["item_id"].to_numpy()])
        )
        sampled = _sample_negatives(rows, best, pool, n_sampled_negatives, seed)
        rows = pd.concat([rows, sampled], ignore_index=True)

    out = rows.merge(best, on=["user_id", "item_id"], how="left")
    weight = out.pop("weight").fillna(0.0)
    out["label"] = (weight if graded else (weight > 0)).astype("int64")
    out = out.sort_values(["user_id", "item_id"], kind="stable").reset_index(drop=True)
    return out[["user_id", "item_id", "label", "origin"]]


def _pairs(frame: pd.DataFrame) -> pd.DataFrame:
    known = frame.dropna(subset=["user_id", "item_id"])
    return pd.DataFrame(
        {
            "user_id": known["user_id"].astype("int64").to_numpy(),
            "item_id": known["item_id"].astype("int64").to_numpy(),
        }
    )


def _sample_negatives(
    rows: pd.DataFrame, best: pd.DataFrame, pool: np.ndarray, n: int, seed: int
) -> pd.DataFrame:
    """Up to ``n`` items per user from ``pool`` that the user has no row and no event for."""
    rng = np.random.default_rng(seed)
    taken = pd.concat([rows[["user_id", "item_id"]], best[["user_id", "item_id"]]])
    excluded = taken.groupby("user_id")["item_id"].agg(set)
    users: list[int] = []
    items: list[int] = []
    # Sorted users and one generator: the same inputs and seed give the same sample.
    for user in sorted(rows["user_id"].unique()):
        skip = excluded.get(user, set())
        # Drawing n + |skip| distinct items guarantees n survivors whenever the pool allows.
        draw = rng.choice(pool, size=min(len(pool), n + len(skip)), replace=False)
        kept = [int(i) for i in draw if i not in skip][:n]
        users.extend([int(user)] * len(kept))
        items.extend(kept)
    return pd.DataFrame(
        {
            "user_id": np.asarray(users, dtype=np.int64),
            "item_id": np.asarray(items, dtype=np.int64),
            "origin": "sampled",
        }
    )


def group_sizes(frame: pd.DataFrame, key: str = "user_id") -> np.ndarray:
    """Sizes of the consecutive blocks of ``key`` (LightGBM's ``group``); each key must form
    one block, otherwise lambdarank would silently compare rows of different users."""
    values = frame[key].to_numpy()
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    if len(starts) != len(pd.unique(values)):
        raise ValueError(f"rows of one {key} are not contiguous; sort by {key} first")
    sizes: np.ndarray = np.diff(np.r_[starts, len(values)]).astype(np.int64)
    return sizes


# ---------------------------------------------------------------------------------- rankers


def _matrix(X: Features, feature_names: Sequence[str] | None) -> np.ndarray:
    """Features as a float32 2-D array, columns in the model's order when X is a frame."""
    if isinstance(X, pd.DataFrame):
        if feature_names is not None:
            missing = [f for f in feature_names if f not in X.columns]
            if missing:
                raise ValueError(f"missing features: {missing[:5]}")
            X = X[list(feature_names)]
        return np.ascontiguousarray(X.to_numpy(dtype=np.float32))
    arr = np.ascontiguousarray(X, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"features must be 2-D, got shape {arr.shape}")
    if feature_names is not None and arr.shape[1] != len(feature_names):
        raise ValueError(f"expected {len(feature_names)} features, got {arr.shape[1]}")
    return arr


def _names(X: Features, feature_names: Sequence[str] | None) -> list[str]:
    if feature_names is not None:
        return [str(f) for f in feature_names]
    if isinstance(X, pd.DataFrame):
        return [str(c) for c in X.columns]
    return [f"f{i}" for i in range(np.shape(X)[1])]


def _validation_metrics(
    y: np.ndarray, scores: np.ndarray, groups: np.ndarray | None, *, probabilities: bool
) -> dict[str, float]:
    """AUC on ``y > 0``; logloss only for probabilities (a lambdarank score is not one, and a
    sigmoid of it would be an arbitrary calibration); NDCG@10 when groups are known."""
    metrics = {"auc": auc(y, scores)}
    if probabilities:
        p = np.clip(scores.astype(np.float64), 1e-15, 1 - 1e-15)
        t = (y > 0).astype(np.float64)
        metrics["logloss"] = float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))
    if groups is not None:
        metrics["ndcg@10"] = ndcg_grouped(y, scores, groups, k=10)
    return metrics


class LGBMRanker:
    """LightGBM ranker (``lambdarank`` over user groups, or ``binary``) with early stopping.

    ``fit`` stops when the validation metric (NDCG@10 for lambdarank, logloss for binary) has
    not improved for ``early_stopping_rounds`` rounds, then keeps only the trees up to the best
    iteration, so ``predict``, the saved model and the ONNX export all score the same model.
    ``num_threads=0`` lets LightGBM use every core.
    """

    kind: ClassVar[str] = "lightgbm"

    def __init__(
        self,
        objective: Objective = "lambdarank",
        *,
        num_leaves: int = 31,
        learning_rate: float = 0.05,
        n_estimators: int = 300,
        min_data_in_leaf: int = 20,
        feature_fraction: float = 0.9,
        seed: int = 0,
        early_stopping_rounds: int = 30,
        num_threads: int = 0,
    ) -> None:
        self.objective = objective
        self.num_leaves = num_leaves
        self.learning_rate = learning_rate
        self.n_estimators = n_estimators
        self.min_data_in_leaf = min_data_in_leaf
        self.feature_fraction = feature_fraction
        self.seed = seed
        self.early_stopping_rounds = early_stopping_rounds
        self.num_threads = num_threads

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters (saved in ``ranker.json``)."""
        return {
            "objective": self.objective,
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "n_estimators": self.n_estimators,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "seed": self.seed,
            "early_stopping_rounds": self.early_stopping_rounds,
            "num_threads": self.num_threads,
        }

    def _lgb_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "objective": self.objective,
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "seed": self.seed,
            "num_threads": self.num_threads,
            # Same data, seed and threads -> the same trees (the bundle must be reproducible).
            "deterministic": True,
            "force_row_wise": True,
            "verbosity": -1,
        }
        if self.objective == "lambdarank":
            params.update(metric="ndcg", eval_at=[10])
        else:
            params.update(metric="binary_logloss")
        return params

    def _labels(self, y: np.ndarray | pd.Series) -> np.ndarray:
        labels = np.asarray(y, dtype=np.float64)
        if np.isnan(labels).any() or (labels < 0).any():
            raise ValueError("labels must be non-negative numbers")
        if self.objective == "binary":
            # Graded labels from build_labels work for both objectives: any signal is a 1.
            return (labels > 0).astype(np.float64)
        if (labels != np.floor(labels)).any() or labels.max(initial=0) > 30:
            raise ValueError("lambdarank labels must be whole grades in 0..30")
        return labels

    def fit(
        self,
        X: Features,
        y: np.ndarray | pd.Series,
        groups: Sequence[int] | np.ndarray | None = None,
        X_valid: Features | None = None,
        y_valid: np.ndarray | pd.Series | None = None,
        groups_valid: Sequence[int] | np.ndarray | None = None,
        *,
        feature_names: Sequence[str] | None = None,
    ) -> Self:
        """Train; with a validation set (time-based, made by the caller) stop early on it."""
        if self.objective not in ("lambdarank", "binary"):
            raise ValueError(f"objective must be 'lambdarank' or 'binary', got {self.objective!r}")
        names = _names(X, feature_names)
        train_x = _matrix(X, feature_names if isinstance(X, pd.DataFrame) else None)
        train_y = self._labels(y)
        if len(train_x) != len(train_y):
            raise ValueError("X and y have different lengths")
        if self.objective == "lambdarank" and groups is None:
            raise ValueError("lambdarank needs groups (rows per user, consecutive)")
        if groups is not None and int(np.sum(groups)) != len(train_y):
            raise ValueError("groups must sum to the number of rows")
        train = lgb.Dataset(train_x, train_y, group=groups, feature_name=names, free_raw_data=True)
        callbacks: list[Any] = []
        valid_sets: list[lgb.Dataset] = []
        valid = None
        if X_valid is not None:
            if y_valid is None:
                raise ValueError("X_valid needs y_valid")
            if self.objective == "lambdarank" and groups_valid is None:
                raise ValueError("lambdarank needs groups_valid")
            valid_x = _matrix(X_valid, names if isinstance(X_valid, pd.DataFrame) else None)
            valid_y = self._labels(y_valid)
            valid = (valid_x, np.asarray(y_valid, dtype=np.float64), groups_valid)
            valid_sets = [lgb.Dataset(valid_x, valid_y, group=groups_valid, reference=train)]
            callbacks.append(
                lgb.early_stopping(
                    self.early_stopping_rounds, first_metric_only=True, verbose=False
                )
            )
        booster = lgb.train(
            self._lgb_params(),
            train,
            num_boost_round=self.n_estimators,
            valid_sets=valid_sets,
            valid_names=["valid"] * len(valid_sets),
            callbacks=callbacks,
        )
        best = booster.best_iteration if valid_sets and booster.best_iteration > 0 else None
        self.best_iteration_ = int(best or booster.current_iteration())
        # Keep only the trees up to the best iteration: every consumer then sees one model.
        self.booster_ = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
        self.feature_names_ = names
        self.metrics_: dict[str, float] = {}
        if valid is not None:
            vx, vy, vg = valid
            self.metrics_ = _validation_metrics(
                vy,
                self.predict(vx),
                None if vg is None else np.asarray(vg),
                probabilities=self.objective == "binary",
            )
        return self

    def predict(self, X: Features) -> np.ndarray:
        """Scores as float32: probability for binary, raw ranking score for lambdarank."""
        scores = self.booster_.predict(_matrix(X, self.feature_names_))
        return np.asarray(scores, dtype=np.float32)

    def save(self, directory: Path) -> None:
        """Write ``model.txt`` (LightGBM text) and ``ranker.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.booster_.save_model(directory / MODEL_FILE)
        meta = {
            "kind": self.kind,
            "params": self.get_params(),
            "feature_names": self.feature_names_,
            "best_iteration": self.best_iteration_,
            "metrics": self.metrics_,
            "lightgbm_version": lgb.__version__,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=True))

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Read a ranker written by ``save``."""
        directory = Path(directory)
        meta = _read_meta(directory, cls.kind)
        ranker = cls(**meta["params"])
        ranker.booster_ = lgb.Booster(model_file=directory / MODEL_FILE)
        ranker.feature_names_ = list(meta["feature_names"])
        ranker.best_iteration_ = int(meta["best_iteration"])
        ranker.metrics_ = dict(meta["metrics"])
        return ranker


class LogisticRanker:
    """Fallback ranker: standardised features and an L2 logistic regression on ``y > 0``.

    Missing values are imputed with the training mean (a standardised 0), so the fallback never
    fails on a feature that LightGBM would have handled natively. ``predict`` is the
    probability of engagement, comparable with a binary LightGBM model.
    """

    kind: ClassVar[str] = "logistic"

    def __init__(self, *, C: float = 1.0, max_iter: int = 1000, seed: int = 0) -> None:
        self.C = C
        self.max_iter = max_iter
        self.seed = seed

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters (saved in ``ranker.json``)."""
        return {"C": self.C, "max_iter": self.max_iter, "seed": self.seed}

    def fit(
        self,
        X: Features,
        y: np.ndarray | pd.Series,
        groups: Sequence[int] | np.ndarray | None = None,
        X_valid: Features | None = None,
        y_valid: np.ndarray | pd.Series | None = None,
        groups_valid: Sequence[int] | np.ndarray | None = None,
        *,
        feature_names: Sequence[str] | None = None,
    ) -> Self:
        """Train on binary ``y > 0``; ``groups`` only serve the NDCG of the validation set."""
        # Imported here: serving loads LogisticScorer without needing scikit-learn.
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        names = _names(X, feature_names)
        x = _matrix(X, feature_names if isinstance(X, pd.DataFrame) else None).astype(np.float64)
        target = (np.asarray(y, dtype=np.float64) > 0).astype(np.int64)
        if len(np.unique(target)) < 2:
            raise ValueError("the logistic ranker needs both positive and negative labels")
        means = np.nanmean(x, axis=0)
        means = np.where(np.isnan(means), 0.0, means)
        x = np.where(np.isnan(x), means, x)
        scaler = StandardScaler().fit(x)
        model = LogisticRegression(C=self.C, max_iter=self.max_iter, random_state=self.seed)
        model.fit(scaler.transform(x), target)
        self.feature_names_ = names
        self.mean_ = scaler.mean_.astype(np.float64)
        self.scale_ = scaler.scale_.astype(np.float64)
        self.coef_ = model.coef_.ravel().astype(np.float64)
        self.intercept_ = float(model.intercept_[0])
        self.metrics_: dict[str, float] = {}
        if X_valid is not None:
            if y_valid is None:
                raise ValueError("X_valid needs y_valid")
            self.metrics_ = _validation_metrics(
                np.asarray(y_valid, dtype=np.float64),
                self.predict(X_valid),
                None if groups_valid is None else np.asarray(groups_valid),
                probabilities=True,
            )
        return self

    def scorer(self) -> LogisticScorer:
        """The serving scorer of this model."""
        return LogisticScorer(self.coef_, self.intercept_, self.mean_, self.scale_)

    def predict(self, X: Features) -> np.ndarray:
        """Probability of engagement as float32."""
        return self.scorer().score(_matrix(X, self.feature_names_))

    def save(self, directory: Path) -> None:
        """Write ``ranker.json`` with the coefficients, means and scales."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "kind": self.kind,
            "params": self.get_params(),
            "feature_names": self.feature_names_,
            "coef": self.coef_.tolist(),
            "intercept": self.intercept_,
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
            "metrics": self.metrics_,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, allow_nan=True))

    @classmethod
    def load(cls, directory: Path) -> Self:
        """Read a ranker written by ``save``."""
        meta = _read_meta(Path(directory), cls.kind)
        ranker = cls(**meta["params"])
        ranker.feature_names_ = list(meta["feature_names"])
        ranker.coef_ = np.asarray(meta["coef"], dtype=np.float64)
        ranker.intercept_ = float(meta["intercept"])
        ranker.mean_ = np.asarray(meta["mean"], dtype=np.float64)
        ranker.scale_ = np.asarray(meta["scale"], dtype=np.float64)
        ranker.metrics_ = dict(meta["metrics"])
        return ranker


Ranker = LGBMRanker | LogisticRanker


def _read_meta(directory: Path, kind: str) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((directory / META_FILE).read_text())
    if meta.get("kind") != kind:
        raise ValueError(f"{directory} holds a {meta.get('kind')!r} ranker, not {kind!r}")
    return meta


def load_ranker(directory: Path) -> Ranker:
    """Load whichever ranker ``directory`` holds."""
    kind = json.loads((Path(directory) / META_FILE).read_text()).get("kind")
    for cls in (LGBMRanker, LogisticRanker):
        if kind == cls.kind:
            return cls.load(directory)
    raise ValueError(f"unknown ranker kind {kind!r} in {directory}")


# ---------------------------------------------------------------------------------- scorers


@runtime_checkable
class Scorer(Protocol):
    """The serving hot path's view of a model: float32 rows in, one float32 score per row."""

    name: str

    def score(self, X: np.ndarray) -> np.ndarray:
        """Scores of the rows of a float32 2-D array, as a float32 1-D array."""
        ...


class NativeLGBMScorer:
    """LightGBM's own predictor (``Booster.predict``) on a fixed number of threads."""

    name = "lightgbm"

    def __init__(self, booster: lgb.Booster, *, num_threads: int = 1) -> None:
        self.booster = booster
        # One thread per request: serving runs one worker per core (PERFORMANCE.md).
        self.num_threads = num_threads

    @classmethod
    def from_ranker(cls, ranker: LGBMRanker, *, num_threads: int = 1) -> Self:
        """Score with the ranker's trained booster."""
        return cls(ranker.booster_, num_threads=num_threads)

    @classmethod
    def load(cls, directory: Path, *, num_threads: int = 1) -> Self:
        """Read ``model.txt`` from a ranker directory."""
        return cls(lgb.Booster(model_file=Path(directory) / MODEL_FILE), num_threads=num_threads)

    def score(self, X: np.ndarray) -> np.ndarray:
        """Booster.predict as float32."""
        out = self.booster.predict(X, num_threads=self.num_threads)
        return np.asarray(out, dtype=np.float32)


class OnnxScorer:
    """onnxruntime over the exported model, single-threaded, sequential execution."""

    name = "onnx"

    def __init__(self, path: Path, *, num_threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Errors only: the converted classifier declares its label output as shape [1],
        # which makes onnxruntime warn on every batch although the values are right.
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        # A binary classifier exports (label, probabilities); a regressor (lambdarank) one
        # output of raw scores.
        self._probabilities = "probabilities" in outputs
        self.output_name = "probabilities" if self._probabilities else outputs[0]

    def score(self, X: np.ndarray) -> np.ndarray:
        """The model's score per row, matching ``LGBMRanker.predict``."""
        x = np.ascontiguousarray(X, dtype=np.float32)
        (out,) = self.session.run([self.output_name], {self.input_name: x})
        out = np.asarray(out)
        scores = out[:, 1] if self._probabilities else out.reshape(len(x))
        return np.ascontiguousarray(scores, dtype=np.float32)


class LogisticScorer:
    """The logistic fallback in numpy: one matrix-vector product and a sigmoid."""

    name = "logistic"

    def __init__(
        self, coef: np.ndarray, intercept: float, mean: np.ndarray, scale: np.ndarray
    ) -> None:
        self.mean = np.asarray(mean, dtype=np.float64)
        # Fold the standardisation into the weights: (x - m) / s . w + b = x . (w / s) + b'.
        self.weights = np.asarray(coef, dtype=np.float64) / np.asarray(scale, dtype=np.float64)
        self.bias = float(intercept) - float(self.mean @ self.weights)

    def score(self, X: np.ndarray) -> np.ndarray:
        """Probability per row; a missing value counts as the training mean."""
        x = np.asarray(X, dtype=np.float64)
        if np.isnan(x).any():
            x = np.where(np.isnan(x), self.mean, x)
        return np.asarray(expit(x @ self.weights + self.bias), dtype=np.float32)


def choose_scorer(
    scorers: Sequence[Scorer], X_sample: np.ndarray, *, atol: float = 1e-5, repeats: int = 30
) -> tuple[Scorer, dict[str, float]]:
    """The fastest scorer that agrees with the first one (the reference) within ``atol``.

    Returns it with each scorer's median seconds per call on ``X_sample`` (NaN for scorers
    that disagree and were not timed). Meant for bundle load, off the request path.
    """
    if not scorers:
        raise ValueError("no scorers")
    x = np.ascontiguousarray(X_sample, dtype=np.float32)
    reference = scorers[0].score(x)
    timings: dict[str, float] = {}
    best: tuple[float, Scorer] | None = None
    for scorer in scorers:
        got = scorer.score(x)
        if got.shape != reference.shape or not np.all(np.abs(got - reference) <= atol):
            timings[scorer.name] = float("nan")
            continue
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            scorer.score(x)
            samples.append(time.perf_counter() - start)
        timings[scorer.name] = float(np.median(samples))
        if best is None or timings[scorer.name] < best[0]:
            best = (timings[scorer.name], scorer)
    assert best is not None  # the reference always agrees with itself
    return best[1], timings


# ------------------------------------------------------------------------------------- ONNX


class OnnxMismatchError(ValueError):
    """The ONNX export does not score like the native model."""


def export_onnx(ranker: LGBMRanker, n_features: int, path: Path) -> Path:
    """Convert a fitted LightGBM ranker to ONNX (opset ``ONNX_OPSET``) and write it to ``path``.

    The Booster is converted directly: onnxmltools reads the objective from the model text,
    so a binary model becomes a TreeEnsembleClassifier (probabilities) and a lambdarank model
    a TreeEnsembleRegressor (raw scores), both matching ``ranker.predict``. A large lambdarank
    model is split into ensembles of ``ONNX_TREES_PER_NODE`` trees summed in double.
    """
    import onnx
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    if not isinstance(ranker, LGBMRanker):
        raise TypeError("only LightGBM rankers export to ONNX; the logistic one is numpy")
    if n_features != ranker.booster_.num_feature():
        raise ValueError(
            f"the model has {ranker.booster_.num_feature()} features, not {n_features}"
        )
    split = (
        ONNX_TREES_PER_NODE
        if ranker.objective == "lambdarank" and ranker.booster_.num_trees() > ONNX_TREES_PER_NODE
        else None
    )
    model = convert_lightgbm(
        ranker.booster_,
        name=f"recoplatform-ranker-{ranker.objective}",
        initial_types=[(ONNX_INPUT, FloatTensorType([None, n_features]))],
        target_opset=ONNX_OPSET,
        zipmap=False,
        split=split,
    )
    onnx.helper.set_model_props(
        model,
        {
            "objective": ranker.objective,
            "feature_names": json.dumps(ranker.feature_names_),
            "best_iteration": str(ranker.best_iteration_),
        },
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())
    return path


def verify_onnx(path: Path, ranker: LGBMRanker, X_sample: np.ndarray, atol: float = 1e-5) -> float:
    """Max absolute difference between ONNX and native scores on ``X_sample``.

    Raises ``OnnxMismatchError`` beyond ``atol``: a bundle whose ONNX file scores differently
    must never reach serving, where the fastest agreeing scorer is picked.
    """
    x = np.ascontiguousarray(X_sample, dtype=np.float32)
    native = NativeLGBMScorer.from_ranker(ranker).score(x)
    exported = OnnxScorer(path).score(x)
    if native.shape != exported.shape:
        raise OnnxMismatchError(f"shapes differ: native {native.shape}, onnx {exported.shape}")
    diff = np.abs(native.astype(np.float64) - exported.astype(np.float64))
    worst = float(diff.max()) if len(diff) else 0.0
    if np.isnan(diff).any() or worst > atol:
        raise OnnxMismatchError(f"ONNX scores differ from LightGBM by {worst:.3g} > {atol:g}")
    return worst
