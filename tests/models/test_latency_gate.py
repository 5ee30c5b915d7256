"""The smoke test's latency check against the primary: same requests, one interleaved run,
refused above a ratio, with both p95s and the ratio in the reason.

Time is a fake clock that the scorers advance (both the wall clock and the CPU clock of the
gate), so no test depends on real timing.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest

from apps.models import gates, services
from apps.models.bundle import write_manifest
from apps.models.choices import AuditAction, AuditOutcome, ModelStatus
from apps.models.models import ModelAudit
from apps.models.selectors import model_version_primary
from tests.models.test_gates import FEATURES, FakeClock, make_bundle
from tests.models.test_services import register

REQUESTS = gates.synthetic_requests(FEATURES, requests=10, rows=5)


def timed_loader(clock: FakeClock, ms_by_dir: dict[str, float], calls: list | None = None):
    """A loader whose scorer advances the clock by the bundle directory's cost per call."""

    def load(path: Path):
        cost = ms_by_dir[Path(path).name]

        def scorer(rows):
            if calls is not None:
                calls.append(Path(path).name)
            clock.now += cost / 1000.0
            return [0.5] * len(rows)

        return scorer

    return load


def smoke(tmp_path: Path, clock: FakeClock, load, **overrides):
    arguments = {
        "load": load,
        "requests": REQUESTS,
        "p95_budget_ms": 50.0,
        "clock": clock,
        "cpu_clock": clock,
        "primary_dir": tmp_path / "primary",
        "max_latency_ratio": 2.0,
        "latency_samples": 40,
        "latency_floor_ms": 1.0,
    }
    arguments.update(overrides)
    return gates.gate_smoke_test(tmp_path / "candidate", **arguments)


# --- compare_latency ---------------------------------------------------------------------------


def test_compare_latency_interleaves_the_two_scorers_on_the_same_requests():
    # Given two scorers that record which request they scored
    clock = FakeClock()
    seen: list[tuple[str, int]] = []

    def scorer(side: str, ms: float):
        def score(rows):
            seen.append((side, rows[0]["n"]))
            clock.now += ms / 1000.0
            return [0.0] * len(rows)

        return score

    requests = [[{"n": i}] for i in range(3)]
    # When they are compared on 4 samples
    result = gates.compare_latency(
        scorer("candidate", 3.0), scorer("primary", 1.0), requests, samples=4, clock=clock
    )
    # Then each request went to both, back to back, the first side alternating
    assert seen == [
        ("candidate", 0),
        ("primary", 0),
        ("primary", 1),
        ("candidate", 1),
        ("candidate", 2),
        ("primary", 2),
        ("primary", 0),
        ("candidate", 0),
    ]
    # and the p95s and the ratio are exact
    assert result.candidate_p95_ms == pytest.approx(3.0)
    assert result.primary_p95_ms == pytest.approx(1.0)
    assert result.ratio == pytest.approx(3.0)
    assert result.samples == 4


def test_compare_latency_times_only_the_scoring_of_a_prepared_batch():
    # Given a scorer whose prepare step is slow and whose scoring is fast
    clock = FakeClock()

    class Prepared:
        def prepare(self, rows):
            clock.now += 0.050
            return ("batch", len(rows))

        def __call__(self, batch):
            assert batch[0] == "batch"
            clock.now += 0.002
            return [0.0] * batch[1]

    # When it is compared with a plain scorer of 2 ms
    def plain(rows):
        clock.now += 0.002
        return [0.0] * len(rows)

    result = gates.compare_latency(Prepared(), plain, REQUESTS, samples=10, clock=clock)
    # Then preparing is not counted: both sides are 2 ms
    assert result.candidate_p95_ms == pytest.approx(2.0)
    assert result.ratio == pytest.approx(1.0)


def test_compare_latency_needs_requests_and_samples():
    with pytest.raises(ValueError, match="no sample requests"):
        gates.compare_latency(len, len, [], samples=3)
    with pytest.raises(ValueError, match="at least 1"):
        gates.compare_latency(len, len, REQUESTS, samples=0)


# --- the smoke test against the primary -------------------------------------------------------


def test_a_candidate_much_slower_than_the_primary_is_refused_with_both_p95s_and_the_ratio(
    tmp_path,
):
    # Given a candidate at 10 ms and a primary at 2 ms, both well inside the 50 ms budget
    clock = FakeClock()
    load = timed_loader(clock, {"candidate": 10.0, "primary": 2.0})
    # When the smoke test runs with a 2.0x limit
    result = smoke(tmp_path, clock, load)
    # Then it is refused, naming both p95s, the ratio and the limit
    assert not result.passed
    assert result.reason == (
        "p95 CPU time per request 10.00 ms is 5.00x the primary's p95 2.00 ms on the same "
        "requests (40 each, interleaved), more than the 2.0x allowed"
    )


def test_a_candidate_within_the_ratio_passes_and_reports_the_comparison(tmp_path):
    clock = FakeClock()
    load = timed_loader(clock, {"candidate": 3.0, "primary": 2.0})
    result = smoke(tmp_path, clock, load)
    assert result.passed
    assert result.reason == (
        "10 requests scored, p95 3.0 ms <= 50.0 ms, all scores finite; p95 CPU time 3.00 ms "
        "vs the primary's 2.00 ms on the same requests (40 each, interleaved): 1.50x <= 2.0x"
    )


def test_the_ratio_limit_is_exclusive_and_configurable(tmp_path):
    clock = FakeClock()
    load = timed_loader(clock, {"candidate": 4.0, "primary": 2.0})
    assert smoke(tmp_path, clock, load).passed  # exactly 2.0x
    assert not smoke(tmp_path, clock, load, max_latency_ratio=1.5).passed


def test_a_candidate_below_the_floor_is_not_judged_by_ratio(tmp_path):
    # Given a 0.5 ms candidate ten times slower than a 0.05 ms primary, and a 1 ms floor
    clock = FakeClock()
    load = timed_loader(clock, {"candidate": 0.5, "primary": 0.05})
    result = smoke(tmp_path, clock, load)
    # Then it passes: the reason shows the ratio and says why it was not judged
    assert result.passed
    assert result.reason.endswith("10.00x, not judged below the 1.0 ms floor")


def test_without_a_primary_or_a_limit_the_primary_is_never_loaded(tmp_path):
    clock, calls = FakeClock(), []
    load = timed_loader(clock, {"candidate": 10.0, "primary": 1.0}, calls)
    assert smoke(tmp_path, clock, load, primary_dir=None).passed
    assert smoke(tmp_path, clock, load, max_latency_ratio=None).passed
    assert set(calls) == {"candidate"}


def test_the_absolute_budget_is_judged_first(tmp_path):
    # Given a candidate over the absolute budget
    clock, calls = FakeClock(), []
    load = timed_loader(clock, {"candidate": 60.0, "primary": 1.0}, calls)
    # Then the refusal is the budget's, and the primary was not even loaded
    result = smoke(tmp_path, clock, load)
    assert not result.passed
    assert result.reason == "p95 latency 60.0 ms exceeds the 50.0 ms budget (10 requests)"
    assert set(calls) == {"candidate"}


def test_nan_scores_are_refused_before_any_comparison(tmp_path):
    clock, calls = FakeClock(), []

    def load(path):
        def scorer(rows):
            calls.append(Path(path).name)
            return [float("nan")] * len(rows)

        return scorer

    result = smoke(tmp_path, clock, load)
    assert not result.passed
    assert "scores are NaN" in result.reason
    assert set(calls) == {"candidate"}


def test_a_primary_that_cannot_load_or_score_does_not_block_the_candidate(tmp_path):
    clock = FakeClock()
    fast = timed_loader(clock, {"candidate": 2.0})

    def broken_primary(path):
        if Path(path).name == "primary":
            raise OSError("model.txt is missing")
        return fast(path)

    result = smoke(tmp_path, clock, broken_primary)
    assert result.passed
    assert result.reason.endswith(
        "not compared with the primary: its bundle could not be loaded or scored "
        "(OSError: model.txt is missing)"
    )

    def flaky_primary(path):
        if Path(path).name != "primary":
            return fast(path)
        calls = []

        def scorer(rows):
            calls.append(1)
            if len(calls) > 3:
                raise RuntimeError("primary gave up")
            return [0.5] * len(rows)

        return scorer

    result = smoke(tmp_path, clock, flaky_primary)
    assert result.passed
    assert result.reason.endswith(
        "not compared with the primary: its scorer raised RuntimeError: primary gave up"
    )


def test_a_candidate_that_raises_while_timed_fails(tmp_path):
    clock = FakeClock()

    def load(path):
        calls = []

        def scorer(rows):
            calls.append(1)
            if Path(path).name == "candidate" and len(calls) > len(REQUESTS) + 3:
                raise MemoryError("out of memory")
            return [0.5] * len(rows)

        return scorer

    result = smoke(tmp_path, clock, load)
    assert not result.passed
    assert result.reason == "a timed request raised MemoryError: out of memory"


def test_run_gates_passes_the_primary_bundle_to_the_smoke_test(tmp_path):
    clock = FakeClock()
    candidate = make_bundle(tmp_path / "candidate")
    load = timed_loader(clock, {"candidate": 9.0, "primary": 3.0})
    results = gates.run_gates(
        bundle_dir=candidate,
        quality_score=97.0,
        quality_threshold=90.0,
        candidate_metrics={},
        primary_metrics=None,
        metric_tolerances={},
        model_schema=FEATURES,
        serving_schema=FEATURES,
        load=load,
        sample_requests=REQUESTS,
        p95_budget_ms=50.0,
        expected_version="v1",
        clock=clock,
        cpu_clock=clock,
        primary_bundle_dir=tmp_path / "primary",
        max_latency_ratio=2.0,
        latency_samples=20,
    )
    failed = {r.name: r.reason for r in gates.failed(results)}
    assert list(failed) == ["smoke_test"]
    assert "is 3.00x the primary's p95 3.00 ms" in failed["smoke_test"]


# --- scoring thread and the ranker loader --------------------------------------------------------


def test_scoring_is_timed_on_one_openmp_thread():
    import lightgbm  # noqa: F401  (loads OpenMP)
    from threadpoolctl import threadpool_info

    with gates.one_scoring_thread():
        inside = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "openmp"]
    assert inside
    assert set(inside) == {1}


def test_the_ranker_loader_scores_like_lightgbm_and_prepares_rows_with_defaults(tmp_path):
    # Given a bundle with a small real LightGBM ranker over two features
    from apps.pipeline.train import ranker as rk

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)
    model = rk.LGBMRanker("binary", n_estimators=20, min_data_in_leaf=5, num_threads=1)
    model.fit(X, y, feature_names=["f_a", "f_b"])
    bundle = tmp_path / "b"
    model.save(bundle / "ranker")
    write_manifest(
        bundle,
        version="v1",
        created_at="2024-05-01T00:00:00+00:00",
        data_snapshot={},
        features=[{"name": "f_a", "dtype": "float32"}, {"name": "f_b", "dtype": "float32"}],
        params={},
        metrics={},
    )
    scorer = gates.load_ranker_scorer(bundle)
    rows = [{"f_a": 0.5, "f_b": -1.0}, {"f_a": -2.0}]
    # When rows are prepared and scored
    batch = scorer.prepare(rows)
    # Then the matrix is in the manifest's order, a missing feature at its default (0.0)
    assert batch.dtype == np.float32
    assert batch.tolist() == [[0.5, -1.0], [-2.0, 0.0]]
    # and the scores are LightGBM's, whether given the rows or the prepared batch
    expected = model.predict(batch).tolist()
    assert scorer(batch) == pytest.approx(expected, abs=1e-6)
    assert scorer(rows) == pytest.approx(expected, abs=1e-6)


# --- the service reads the settings --------------------------------------------------------------


@pytest.fixture
def fake_clock(monkeypatch):
    """Run the services' gates on a fake clock."""
    clock = FakeClock()
    monkeypatch.setattr(
        services.gates,
        "run_gates",
        functools.partial(gates.run_gates, clock=clock, cpu_clock=clock),
    )
    return clock


@pytest.fixture
def reco(settings):
    def override(**options):
        settings.RECO = {**settings.RECO, **options}

    return override


@pytest.mark.django_db
def test_promotion_is_refused_when_the_candidate_is_slower_than_the_primary_by_the_setting(
    tmp_path, fake_clock, reco
):
    # Given a primary (v1) scoring in 1 ms and a candidate (v2) in 3 ms
    load = timed_loader(fake_clock, {"v1": 1.0, "v2": 3.0})
    reco(GATE_LATENCY_FLOOR_MS=0.25, GATE_LATENCY_SAMPLES=30)
    v1 = register(tmp_path, "v1")
    services.model_version_promote(version_id=v1.pk, actor="alice", loader=load)
    v2 = register(tmp_path, "v2")
    # When it is promoted under the default limit
    with pytest.raises(services.PromotionRefused) as refused:
        services.model_version_promote(version_id=v2.pk, actor="alice", loader=load)
    # Then the refusal names the smoke test, both p95s and the ratio
    assert refused.value.reasons == [
        "smoke_test: p95 CPU time per request 3.00 ms is 3.00x the primary's p95 1.00 ms on "
        "the same requests (30 each, interleaved), more than the 2.0x allowed"
    ]
    # and the primary is unchanged, with a refused audit row
    assert model_version_primary() == v1
    audit = ModelAudit.objects.filter(model_version=v2, outcome=AuditOutcome.REFUSED).get()
    assert audit.action == AuditAction.PROMOTE
    assert "3.00x the primary's p95 1.00 ms" in audit.reason
    # When the limit is raised to 4.0 it is promoted
    reco(GATE_MAX_LATENCY_RATIO=4.0)
    services.model_version_promote(version_id=v2.pk, actor="alice", loader=load)
    v2.refresh_from_db()
    assert v2.status == ModelStatus.PRIMARY


@pytest.mark.django_db
def test_a_zero_ratio_setting_turns_the_comparison_off(tmp_path, fake_clock, reco):
    calls: list[str] = []
    load = timed_loader(fake_clock, {"v1": 1.0, "v2": 30.0}, calls)
    reco(GATE_MAX_LATENCY_RATIO=0)
    v1 = register(tmp_path, "v1")
    services.model_version_promote(version_id=v1.pk, actor="alice", loader=load)
    v2 = register(tmp_path, "v2")
    calls.clear()
    services.model_version_promote(version_id=v2.pk, actor="alice", loader=load)
    assert model_version_primary() == v2
    assert set(calls) == {"v2"}


def test_both_sides_score_the_same_requests(tmp_path):
    clock = FakeClock()
    seen: dict[str, set[int]] = {"candidate": set(), "primary": set()}

    def load(path):
        def scorer(rows):
            seen[Path(path).name].add(len(rows))
            clock.now += 0.001
            return [0.5] * len(rows)

        return scorer

    requests = [[{"item_pop": 1.0}] * n for n in (3, 4, 5)]
    assert smoke(tmp_path, clock, load, requests=requests).passed
    assert seen == {"candidate": {3, 4, 5}, "primary": {3, 4, 5}}
