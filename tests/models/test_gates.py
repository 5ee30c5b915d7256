"""Each promotion gate with a passing and a failing case, and the reasons operators read."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from apps.models import gates
from apps.models.bundle import manifest_sha256, write_manifest
from apps.models.gates import GateResult

FEATURES = [{"name": "item_pop", "dtype": "float64"}, {"name": "user_age_days", "dtype": "int64"}]
TOLERANCES = {"ndcg@10": 0.02, "recall@10": 0.02, "auc": 0.01}


def make_bundle(directory: Path, version: str = "v1") -> Path:
    directory.mkdir(parents=True)
    (directory / "ranker.txt").write_text("tree\n")
    (directory / "popular.json").write_text("[1, 2, 3]")
    write_manifest(
        directory,
        version=version,
        created_at="2024-05-01T00:00:00+00:00",
        data_snapshot={},
        features=FEATURES,
        params={},
        metrics={},
    )
    return directory


class FakeClock:
    """A clock the scorer advances, so latency is exact and no test waits."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def loader_for(clock: FakeClock, *, ms: float = 1.0, score: float = 0.5, calls=None):
    def load(path: Path):
        if calls is not None:
            calls.append(path)

        def scorer(rows):
            clock.now += ms / 1000.0
            return [score] * len(rows)

        return scorer

    return load


REQUESTS = gates.synthetic_requests(FEATURES, requests=20, rows=5)


# --- data quality -----------------------------------------------------------------------------


def test_data_quality_passes_at_or_above_the_threshold():
    result = gates.gate_data_quality(95.0, threshold=90.0)
    assert result == GateResult("data_quality", True, "data-quality score 95.0 >= threshold 90.0")


def test_data_quality_fails_below_the_threshold_or_without_a_report():
    low = gates.gate_data_quality(82.5, threshold=90.0)
    assert not low.passed
    assert low.reason == "data-quality score 82.5 is below the threshold 90.0"
    missing = gates.gate_data_quality(None, threshold=90.0)
    assert not missing.passed
    assert missing.reason == "no data-quality report is linked to this version"


# --- offline metrics --------------------------------------------------------------------------


def test_metrics_within_tolerance_of_the_primary_pass():
    # A 1% relative drop in ndcg@10 is inside the 2% tolerance
    result = gates.gate_offline_metrics(
        {"ndcg@10": 0.297, "recall@10": 0.5, "auc": 0.8},
        {"ndcg@10": 0.300, "recall@10": 0.5, "auc": 0.8},
        tolerances=TOLERANCES,
    )
    assert result.passed
    assert result.reason == "auc, ndcg@10, recall@10 within tolerance of the primary"


def test_a_metric_dropping_beyond_its_tolerance_fails_with_the_numbers():
    result = gates.gate_offline_metrics(
        {"ndcg@10": 0.285, "recall@10": 0.5, "auc": 0.8},
        {"ndcg@10": 0.300, "recall@10": 0.5, "auc": 0.8},
        tolerances=TOLERANCES,
    )
    assert not result.passed
    assert result.reason == ("ndcg@10 dropped 5.0% (0.3000 -> 0.2850), more than the 2.0% allowed")


def test_without_a_primary_the_metric_gate_passes():
    result = gates.gate_offline_metrics({"ndcg@10": 0.01}, None, tolerances=TOLERANCES)
    assert result == GateResult("offline_metrics", True, "no primary to compare against")


def test_a_candidate_missing_a_gated_metric_or_holding_nan_fails():
    result = gates.gate_offline_metrics(
        {"ndcg@10": math.nan}, {"ndcg@10": 0.3, "auc": 0.8}, tolerances=TOLERANCES
    )
    assert not result.passed
    assert "auc is missing or not a finite number (primary 0.8000)" in result.reason
    assert "ndcg@10 is missing or not a finite number (primary 0.3000)" in result.reason


def test_a_loss_that_rises_beyond_tolerance_fails():
    result = gates.gate_offline_metrics(
        {"logloss": 0.60},
        {"logloss": 0.50},
        tolerances={"logloss": 0.05},
        lower_is_better={"logloss"},
    )
    assert not result.passed
    assert result.reason.startswith("logloss rose 20.0% (0.5000 -> 0.6000)")


# --- artifact checksums -----------------------------------------------------------------------


def test_an_intact_bundle_passes_the_checksum_gate(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    result = gates.gate_artifact_checksums(
        bundle, expected_version="v1", expected_manifest_sha256=manifest_sha256(bundle)
    )
    assert result == GateResult(
        "artifact_checksums", True, "every file matches its manifest checksum"
    )


def test_a_modified_file_fails_the_checksum_gate(tmp_path):
    bundle = make_bundle(tmp_path / "b")
    (bundle / "ranker.txt").write_text("tree!\n")
    result = gates.gate_artifact_checksums(bundle)
    assert not result.passed
    assert result.reason == "checksum mismatch: ranker.txt"


def test_a_regenerated_manifest_or_another_version_fails_the_checksum_gate(tmp_path):
    # Given the fingerprint recorded at registration
    bundle = make_bundle(tmp_path / "b")
    registered = manifest_sha256(bundle)
    # When someone swaps a file and regenerates the manifest under another version
    (bundle / "ranker.txt").write_text("other model\n")
    write_manifest(
        bundle,
        version="v9",
        created_at="2024-05-02",
        data_snapshot={},
        features=FEATURES,
        params={},
        metrics={},
    )
    result = gates.gate_artifact_checksums(
        bundle, expected_version="v1", expected_manifest_sha256=registered
    )
    # Then both the fingerprint and the version are reported
    assert not result.passed
    assert result.reason == (
        "manifest.json changed since registration (sha256 differs); "
        "manifest version 'v9' is not 'v1'"
    )


# --- feature schema ---------------------------------------------------------------------------


def test_the_same_names_in_the_same_order_pass_the_schema_gate():
    result = gates.gate_feature_schema(FEATURES, ["item_pop", "user_age_days"])
    assert result == GateResult("feature_schema", True, "2 features match the serving schema")


def test_missing_and_extra_features_are_named():
    result = gates.gate_feature_schema(
        [{"name": "item_pop"}, {"name": "price_band"}], ["item_pop", "user_age_days"]
    )
    assert not result.passed
    assert result.reason == (
        "missing features (serving has, model lacks): user_age_days; "
        "extra features (model has, serving lacks): price_band"
    )


def test_a_different_order_or_dtype_fails_the_schema_gate():
    order = gates.gate_feature_schema(["b", "a"], ["a", "b"])
    assert not order.passed
    assert order.reason == "feature order differs from position 0: model has 'b', serving has 'a'"
    dtype = gates.gate_feature_schema([("a", "float64")], [{"name": "a", "dtype": "string"}])
    assert not dtype.passed
    assert dtype.reason == "dtype mismatch: a is float64 in the model, string in serving"


def test_no_serving_schema_skips_the_schema_gate():
    result = gates.gate_feature_schema(FEATURES, None)
    assert result.passed
    assert result.skipped
    assert result.reason.startswith("skipped:")


# --- smoke test -------------------------------------------------------------------------------


def test_a_fast_scorer_with_finite_scores_passes_the_smoke_test(tmp_path):
    clock = FakeClock()
    result = gates.gate_smoke_test(
        tmp_path, load=loader_for(clock, ms=3.0), requests=REQUESTS, p95_budget_ms=50.0, clock=clock
    )
    assert result.passed
    assert result.reason == "20 requests scored, p95 3.0 ms <= 50.0 ms, all scores finite"


def test_a_slow_scorer_fails_the_smoke_test_with_its_p95(tmp_path):
    clock = FakeClock()
    result = gates.gate_smoke_test(
        tmp_path,
        load=loader_for(clock, ms=120.0),
        requests=REQUESTS,
        p95_budget_ms=50.0,
        clock=clock,
    )
    assert not result.passed
    assert result.reason == "p95 latency 120.0 ms exceeds the 50.0 ms budget (20 requests)"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_fail_the_smoke_test(tmp_path, bad):
    clock = FakeClock()
    result = gates.gate_smoke_test(
        tmp_path,
        load=loader_for(clock, score=bad),
        requests=REQUESTS,
        p95_budget_ms=50.0,
        clock=clock,
    )
    assert not result.passed
    assert result.reason == (
        "100 of 100 scores are NaN, infinite or not numbers (first at request 0, row 0)"
    )


def test_a_loader_that_raises_fails_the_smoke_test_with_its_error(tmp_path):
    def load(path):
        raise OSError("ranker.onnx is truncated")

    result = gates.gate_smoke_test(tmp_path, load=load, requests=REQUESTS, p95_budget_ms=50.0)
    assert not result.passed
    assert result.reason == "loader raised OSError: ranker.onnx is truncated"


def test_a_scorer_returning_the_wrong_number_of_scores_fails(tmp_path):
    def load(path):
        return lambda rows: [0.1]

    result = gates.gate_smoke_test(tmp_path, load=load, requests=REQUESTS, p95_budget_ms=50.0)
    assert not result.passed
    assert result.reason == "request 0 has 5 rows but got 1 scores"


def test_no_loader_skips_the_smoke_test():
    result = gates.gate_smoke_test(Path("."), load=None, requests=REQUESTS, p95_budget_ms=50.0)
    assert result == GateResult("smoke_test", True, "skipped: no loader configured", True)


def test_p95_is_an_observed_value_by_nearest_rank():
    assert gates.p95([float(i) for i in range(1, 101)]) == 95.0
    assert gates.p95([5.0]) == 5.0
    assert gates.p95([1.0, 2.0, 100.0]) == 100.0


# --- all gates --------------------------------------------------------------------------------


def _run(bundle: Path, clock: FakeClock, load, **overrides):
    arguments = {
        "bundle_dir": bundle,
        "quality_score": 97.0,
        "quality_threshold": 90.0,
        "candidate_metrics": {"ndcg@10": 0.31},
        "primary_metrics": {"ndcg@10": 0.30},
        "metric_tolerances": TOLERANCES,
        "model_schema": FEATURES,
        "serving_schema": FEATURES,
        "load": load,
        "sample_requests": REQUESTS,
        "p95_budget_ms": 50.0,
        "expected_version": "v1",
        "clock": clock,
    }
    arguments.update(overrides)
    return gates.run_gates(**arguments)


def test_run_gates_returns_every_gate_in_order(tmp_path):
    clock = FakeClock()
    results = _run(make_bundle(tmp_path / "b"), clock, loader_for(clock))
    assert [r.name for r in results] == list(gates.ALL_GATES)
    assert all(r.passed for r in results), results


def test_run_gates_never_loads_a_bundle_whose_checksums_failed(tmp_path):
    # Given a tampered bundle and a loader that records its calls
    bundle = make_bundle(tmp_path / "b")
    (bundle / "popular.json").write_text("[9]")
    clock, calls = FakeClock(), []
    # When every gate runs
    results = {r.name: r for r in _run(bundle, clock, loader_for(clock, calls=calls))}
    # Then the smoke test failed without loading anything
    assert calls == []
    assert results["artifact_checksums"].reason == "checksum mismatch: popular.json"
    assert results["smoke_test"] == GateResult(
        "smoke_test", False, "not run: the bundle failed its checksum gate"
    )
    assert [r.name for r in gates.failed(results.values())] == ["artifact_checksums", "smoke_test"]


def test_run_gates_can_run_a_subset_and_rejects_unknown_names(tmp_path):
    clock = FakeClock()
    bundle = make_bundle(tmp_path / "b")
    subset = _run(bundle, clock, None, gates=("feature_schema", "data_quality"))
    assert [r.name for r in subset] == ["data_quality", "feature_schema"]
    with pytest.raises(ValueError, match="unknown gates: latency"):
        _run(bundle, clock, None, gates=("latency",))
