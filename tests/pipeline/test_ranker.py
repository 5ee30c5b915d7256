"""The ranker: labels, learning a known signal, early stopping, files without pickle, ONNX
parity and the scorers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from apps.pipeline.evaluate import auc
from apps.pipeline.train.ranker import (
    MODEL_FILE,
    LGBMRanker,
    LogisticRanker,
    LogisticScorer,
    NativeLGBMScorer,
    OnnxMismatchError,
    OnnxScorer,
    Scorer,
    build_labels,
    choose_scorer,
    export_onnx,
    group_sizes,
    load_ranker,
    verify_onnx,
)

TS = pd.Timestamp("2024-06-01", tz="UTC")
N_FEATURES = 70  # the serving path's feature count (PERFORMANCE.md)


def ranking_data(
    n_users: int, *, seed: int, per_user: int = 20, noise: float = 0.3, missing: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by user; grades 0/1/3/5 rise with ``x0 + 0.5 x1`` (a known answer)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_users * per_user, N_FEATURES)).astype(np.float32)
    signal = X[:, 0] + 0.5 * X[:, 1] + noise * rng.normal(size=len(X))
    y = np.select([signal > 2.3, signal > 1.6, signal > 0.8], [5, 3, 1], 0)
    if missing:
        X[rng.random(X.shape) < missing] = np.nan
    return X, y, np.full(n_users, per_user)


def fit(objective: str, **params: object) -> LGBMRanker:
    X, y, groups = ranking_data(150, seed=1, missing=0.05)
    Xv, yv, gv = ranking_data(60, seed=2, missing=0.05)
    defaults: dict[str, object] = {
        "n_estimators": 200,
        "learning_rate": 0.1,
        "num_threads": 1,
        "early_stopping_rounds": 20,
    }
    return LGBMRanker(objective, **{**defaults, **params}).fit(  # type: ignore[arg-type]
        X, y, groups, Xv, yv, gv
    )


@pytest.fixture(scope="module")
def binary() -> LGBMRanker:
    return fit("binary")


@pytest.fixture(scope="module")
def lambdarank() -> LGBMRanker:
    return fit("lambdarank")


# ----------------------------------------------------------------------------------- labels


def _events(rows: list[tuple[int, int, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event"]).assign(ts=TS)


def test_labels_are_the_strongest_event_after_the_cutoff() -> None:
    # given candidates for two users and what they did afterwards
    pairs = pd.DataFrame({"user_id": [1, 1, 1, 2], "item_id": [10, 11, 12, 10]})
    events = _events(
        [
            (1, 10, "detail_view"),
            (1, 10, "purchase"),  # the strongest event wins
            (1, 11, "favorite"),
            (1, 99, "purchase"),  # not a candidate: no row
            (2, 10, "view"),  # weight 0: no signal
        ]
    )
    # when labelled with graded weights
    labels = build_labels(pairs, events)
    # then each candidate has its max weight, non-interacted candidates are 0
    assert labels[["user_id", "item_id", "label"]].values.tolist() == [
        [1, 10, 5],
        [1, 11, 2],
        [1, 12, 0],
        [2, 10, 0],
    ]
    assert set(labels["origin"]) == {"candidate"}
    # and binary labels mark any positive weight
    assert build_labels(pairs, events, graded=False)["label"].tolist() == [1, 1, 0, 0]


def test_custom_weights_and_unknown_events() -> None:
    pairs = pd.DataFrame({"user_id": [1, 1], "item_id": [10, 11]})
    events = _events([(1, 10, "task"), (1, 11, "mystery")])
    labels = build_labels(pairs, events, {"task": 4})
    assert labels["label"].tolist() == [4, 0]
    with pytest.raises(ValueError, match="whole weights"):
        build_labels(pairs, events, {"task": 2.5})
    # fractional weights are fine for binary labels
    assert build_labels(pairs, events, {"task": 0.5}, graded=False)["label"].tolist() == [1, 0]


def test_exposures_add_shown_but_unclicked_items_as_negatives() -> None:
    pairs = pd.DataFrame({"user_id": [1], "item_id": [10]})
    exposures = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [10, 20, 21]})
    events = _events([(1, 21, "search_click")])
    labels = build_labels(pairs, events, exposures=exposures)
    assert labels[["item_id", "label", "origin"]].values.tolist() == [
        [10, 0, "candidate"],
        [20, 0, "exposure"],  # shown, not clicked
        [21, 1, "exposure"],  # shown and clicked
    ]


def test_sampled_negatives_are_seeded_and_avoid_known_items() -> None:
    pairs = pd.DataFrame({"user_id": [1, 2], "item_id": [1, 2]})
    events = _events([(1, 3, "purchase")])
    pool = np.arange(1, 51)
    first = build_labels(pairs, events, n_sampled_negatives=5, item_pool=pool, seed=3)
    again = build_labels(pairs, events, n_sampled_negatives=5, item_pool=pool, seed=3)
    other = build_labels(pairs, events, n_sampled_negatives=5, item_pool=pool, seed=4)
    pd.testing.assert_frame_equal(first, again)
    sampled = first[first["origin"] == "sampled"]
    assert not sampled.equals(other[other["origin"] == "sampled"])
    assert sampled.groupby("user_id").size().to_dict() == {1: 5, 2: 5}
    assert (sampled["label"] == 0).all()
    # never the user's candidate or an item they interacted with
    user1 = set(sampled.loc[sampled["user_id"] == 1, "item_id"])
    assert not user1 & {1, 3}
    assert not first.duplicated(["user_id", "item_id"]).any()


def test_group_sizes_need_contiguous_users() -> None:
    assert group_sizes(pd.DataFrame({"user_id": [1, 1, 2, 3, 3, 3]})).tolist() == [2, 1, 3]
    with pytest.raises(ValueError, match="contiguous"):
        group_sizes(pd.DataFrame({"user_id": [1, 2, 1]}))


# ---------------------------------------------------------------------------------- LightGBM


@pytest.mark.parametrize("objective", ["binary", "lambdarank"])
def test_the_ranker_learns_a_separable_signal(
    objective: str, request: pytest.FixtureRequest
) -> None:
    ranker: LGBMRanker = request.getfixturevalue(objective)
    assert ranker.metrics_["auc"] > 0.9
    assert ranker.metrics_["ndcg@10"] > 0.8
    # logloss is a probability metric: only the binary model reports it
    assert ("logloss" in ranker.metrics_) == (objective == "binary")
    # and on fresh data from the same process it ranks positives above negatives
    X, y, _ = ranking_data(40, seed=9)
    assert auc(y, ranker.predict(X)) > 0.9


def test_binary_predictions_are_probabilities_and_float32(binary: LGBMRanker) -> None:
    X, _, _ = ranking_data(5, seed=3)
    scores = binary.predict(X)
    assert scores.dtype == np.float32
    assert scores.shape == (len(X),)
    assert ((scores >= 0) & (scores <= 1)).all()


def test_early_stopping_stops_when_validation_stops_improving() -> None:
    # given labels that are almost pure noise, so validation loss turns up after a few trees
    X, y, groups = ranking_data(100, seed=5, noise=8.0)
    Xv, yv, gv = ranking_data(50, seed=6, noise=8.0)
    ranker = LGBMRanker(
        "binary",
        n_estimators=300,
        learning_rate=0.3,
        num_leaves=63,
        min_data_in_leaf=5,
        early_stopping_rounds=10,
        num_threads=1,
    ).fit(X, y, groups, Xv, yv, gv)
    # then it stopped long before 300 trees and kept only the best ones
    assert ranker.best_iteration_ < 100
    assert ranker.booster_.num_trees() == ranker.best_iteration_


def test_without_validation_all_trees_are_kept() -> None:
    X, y, groups = ranking_data(20, seed=5)
    ranker = LGBMRanker("lambdarank", n_estimators=7, num_threads=1).fit(X, y, groups)
    assert ranker.best_iteration_ == 7
    assert ranker.metrics_ == {}


def test_inputs_are_validated_at_fit() -> None:
    X, y, groups = ranking_data(5, seed=5)
    with pytest.raises(ValueError, match="groups"):
        LGBMRanker("lambdarank", num_threads=1).fit(X, y)
    with pytest.raises(ValueError, match="sum"):
        LGBMRanker("lambdarank", num_threads=1).fit(X, y, [3, 4])
    with pytest.raises(ValueError, match="grades"):
        LGBMRanker("lambdarank", num_threads=1).fit(X, y * 10, groups)
    with pytest.raises(ValueError, match="objective"):
        LGBMRanker("regression", num_threads=1).fit(X, y, groups)  # type: ignore[arg-type]


def test_frames_keep_feature_names_and_column_order(tmp_path: Path) -> None:
    X, y, groups = ranking_data(30, seed=5)
    frame = pd.DataFrame(X, columns=[f"feat_{i}" for i in range(N_FEATURES)])
    ranker = LGBMRanker("binary", n_estimators=10, num_threads=1).fit(frame, y, groups)
    assert ranker.feature_names_[:2] == ["feat_0", "feat_1"]
    shuffled = frame[frame.columns[::-1]]
    np.testing.assert_array_equal(ranker.predict(shuffled), ranker.predict(X))


@pytest.mark.parametrize("objective", ["binary", "lambdarank"])
def test_save_and_load_give_identical_predictions_without_pickle(
    objective: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    ranker: LGBMRanker = request.getfixturevalue(objective)
    ranker.save(tmp_path)
    loaded = load_ranker(tmp_path)
    assert isinstance(loaded, LGBMRanker)
    X, _, _ = ranking_data(20, seed=11, missing=0.05)
    np.testing.assert_array_equal(loaded.predict(X), ranker.predict(X))
    assert loaded.get_params() == ranker.get_params()
    assert loaded.best_iteration_ == ranker.best_iteration_
    assert loaded.metrics_ == pytest.approx(ranker.metrics_)
    _assert_no_pickle(tmp_path, {MODEL_FILE, "ranker.json"})


def _assert_no_pickle(directory: Path, expected: set[str]) -> None:
    assert {p.name for p in directory.iterdir()} == expected
    for path in directory.iterdir():
        head = path.read_bytes()[:2]
        assert not head.startswith(b"\x80"), f"{path.name} looks like a pickle"
        path.read_text()  # text formats only


# -------------------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("objective", ["binary", "lambdarank"])
def test_onnx_export_scores_like_lightgbm(
    objective: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    ranker: LGBMRanker = request.getfixturevalue(objective)
    path = export_onnx(ranker, N_FEATURES, tmp_path / "model.onnx")
    # a batch the size of one request, with missing values, plus rows the trees never saw
    X, _, _ = ranking_data(10, seed=21, missing=0.1)
    X = np.vstack([X, np.full((1, N_FEATURES), 1e6, np.float32), np.zeros((1, N_FEATURES))])
    assert verify_onnx(path, ranker, X) < 1e-5
    onnx_scores = OnnxScorer(path).score(X)
    native = NativeLGBMScorer.from_ranker(ranker).score(X)
    assert onnx_scores.dtype == np.float32
    assert np.abs(onnx_scores - native).max() < 1e-5


def test_a_large_lambdarank_export_stays_within_tolerance(tmp_path: Path) -> None:
    # given 400 trees with raw scores near 20, where a float32 sum drifts by about 3e-5
    X, y, groups = ranking_data(150, seed=1, missing=0.05)
    ranker = LGBMRanker(
        "lambdarank",
        n_estimators=400,
        learning_rate=0.3,
        num_leaves=15,
        min_data_in_leaf=5,
        num_threads=1,
    ).fit(X, y, groups)
    assert np.abs(ranker.predict(X)).max() > 10
    # when exported (in blocks of trees summed in double)
    path = export_onnx(ranker, N_FEATURES, tmp_path / "model.onnx")
    # then it still agrees within 1e-5
    Xt, _, _ = ranking_data(50, seed=21, missing=0.05)
    assert verify_onnx(path, ranker, Xt) < 1e-5


def test_onnx_opset_is_at_most_15(binary: LGBMRanker, tmp_path: Path) -> None:
    import onnx

    model = onnx.load(export_onnx(binary, N_FEATURES, tmp_path / "m.onnx"))
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    assert default
    assert max(default) <= 15
    props = {p.key: p.value for p in model.metadata_props}
    assert props["objective"] == "binary"


def test_verify_onnx_rejects_an_export_of_another_model(binary: LGBMRanker, tmp_path: Path) -> None:
    other = fit("binary", seed=3, n_estimators=5, early_stopping_rounds=1)
    path = export_onnx(other, N_FEATURES, tmp_path / "other.onnx")
    X, _, _ = ranking_data(5, seed=21)
    with pytest.raises(OnnxMismatchError, match="differ"):
        verify_onnx(path, binary, X)


def test_export_checks_the_feature_count(binary: LGBMRanker, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="features"):
        export_onnx(binary, N_FEATURES + 1, tmp_path / "m.onnx")


# ---------------------------------------------------------------------------------- logistic


def test_the_logistic_fallback_learns_and_round_trips_as_json(tmp_path: Path) -> None:
    X, y, groups = ranking_data(150, seed=1, missing=0.05)
    Xv, yv, gv = ranking_data(60, seed=2, missing=0.05)
    ranker = LogisticRanker().fit(X, y, groups, Xv, yv, gv)
    assert ranker.metrics_["auc"] > 0.9
    assert {"logloss", "ndcg@10"} <= ranker.metrics_.keys()
    ranker.save(tmp_path)
    _assert_no_pickle(tmp_path, {"ranker.json"})
    loaded = load_ranker(tmp_path)
    assert isinstance(loaded, LogisticRanker)
    np.testing.assert_array_equal(loaded.predict(Xv), ranker.predict(Xv))


def test_the_logistic_scorer_equals_the_sklearn_pipeline() -> None:
    # given complete data (sklearn has no imputation here)
    X, y, _ = ranking_data(50, seed=4)
    ranker = LogisticRanker(C=0.5).fit(X, y)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=1000))
    reference.fit(X.astype(np.float64), (y > 0).astype(int))
    expected = reference.predict_proba(X.astype(np.float64))[:, 1]
    np.testing.assert_allclose(ranker.predict(X), expected, atol=1e-5)


def test_the_logistic_scorer_reads_missing_values_as_the_mean() -> None:
    scorer = LogisticScorer(np.array([1.0, 2.0]), 0.0, np.array([3.0, 4.0]), np.array([1.0, 1.0]))
    # at the means the log-odds are 0
    assert scorer.score(np.array([[np.nan, np.nan], [3.0, 4.0]], np.float32)).tolist() == [0.5, 0.5]


# ----------------------------------------------------------------------------------- scorers


class WrongScorer:
    """A scorer that disagrees with the reference: it must never be chosen."""

    name = "wrong"

    def score(self, X: np.ndarray) -> np.ndarray:
        return np.zeros(len(X), np.float32)


def test_every_scorer_follows_the_protocol_and_agrees(binary: LGBMRanker, tmp_path: Path) -> None:
    path = export_onnx(binary, N_FEATURES, tmp_path / "model.onnx")
    binary.save(tmp_path)
    scorers: list[Scorer] = [
        NativeLGBMScorer.load(tmp_path),
        OnnxScorer(path),
        WrongScorer(),
    ]
    assert all(isinstance(s, Scorer) for s in scorers)
    X, _, _ = ranking_data(10, seed=8)
    chosen, timings = choose_scorer(scorers, X, repeats=3)
    assert chosen.name in {"lightgbm", "onnx"}
    assert np.isnan(timings["wrong"])
    assert timings["lightgbm"] > 0
    assert timings["onnx"] > 0
