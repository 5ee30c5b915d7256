"""Promotion gates: the checks a model version must pass before it serves traffic. Pure core.

Each gate returns a ``GateResult(name, passed, reason)``; ``reason`` always says what was
measured, so an operator reading a refusal (or an audit row) knows what to fix. A gate that
could not run for lack of configuration passes with ``skipped=True`` and a reason starting
with "skipped:".

The smoke test judges latency twice: against an absolute p95 budget (wall clock), and against
the primary, whose bundle it loads with the same loader and times on the same sample requests,
interleaved with the candidate's (``compare_latency``). The comparison measures the scoring
thread's CPU time per request (``time.thread_time``): on one thread that is the request's
latency without the waits for a core that other processes cause, which made wall-clock ratios
of two identical bundles swing from 0.13x to 7.2x while two busy loops shared this project's
2-core machine (0.94-1.05x in CPU time). Both are timed on one scoring thread, as serving
scores (one worker per core, ``num_threads=1`` in ``rank.py``). A scorer may expose
``prepare(rows) -> batch``: the gate then turns each request into the model's input untimed
and times ``scorer(batch)`` only, so the model's cost is not diluted by the harness's
row-to-matrix loop (``load_ranker_scorer`` does this for a bundle's ranker).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from apps.models.bundle import manifest_sha256 as compute_manifest_sha256
from apps.models.bundle import read_manifest, verify_bundle

DATA_QUALITY = "data_quality"
OFFLINE_METRICS = "offline_metrics"
ARTIFACT_CHECKSUMS = "artifact_checksums"
FEATURE_SCHEMA = "feature_schema"
SMOKE_TEST = "smoke_test"
# The order gates run in. The smoke test comes last: it loads the bundle, which is only done
# once its checksums are known to be good.
ALL_GATES: tuple[str, ...] = (
    DATA_QUALITY,
    OFFLINE_METRICS,
    ARTIFACT_CHECKSUMS,
    FEATURE_SCHEMA,
    SMOKE_TEST,
)

# A scorer takes a request's candidate rows (feature name -> value) and returns one score per
# row; a loader turns a bundle directory into a scorer.
Scorer = Callable[[list[dict[str, Any]]], Sequence[float]]
Loader = Callable[[Path], Scorer]
FeatureSpec = Mapping[str, Any] | Sequence[Any] | str

# The relative latency check (see ``compare_latency``). Two identical demo bundles measured
# 0.92-1.10x in CPU time on this project's 2-core machine, quiet or with two busy-loop
# processes on both cores (benchmarks/results/reliability/bad_candidates.json has each run's
# figures). 2.0 leaves that noise a wide margin and still stops a scorer that would double the
# ranker's share of the request budget; 3.0 would let a model 2.5x slower through.
DEFAULT_MAX_LATENCY_RATIO = 2.0
# Timed requests per side: the p95 of 200 is the 190th value, so a handful of stalls on a
# shared machine do not move it; well under a second per gate run for a 1 ms scorer.
DEFAULT_LATENCY_SAMPLES = 200
# Below this candidate p95 the ratio is not judged: differences of microseconds are timer and
# cache noise and cost nothing against the ranker's 30 ms budget. The demo ranker takes about
# 0.3 ms per 50-row request, so a candidate twice as slow is still judged.
DEFAULT_LATENCY_FLOOR_MS = 0.25


@dataclass(frozen=True)
class GateResult:
    """The outcome of one gate."""

    name: str
    passed: bool
    reason: str
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- data quality -----------------------------------------------------------------------------


def gate_data_quality(score: float | None, *, threshold: float) -> GateResult:
    """The training data's quality score must reach ``threshold`` (no report is a failure)."""
    if score is None:
        return GateResult(DATA_QUALITY, False, "no data-quality report is linked to this version")
    if not math.isfinite(score) or score < threshold:
        return GateResult(
            DATA_QUALITY,
            False,
            f"data-quality score {score:.1f} is below the threshold {threshold:.1f}",
        )
    return GateResult(
        DATA_QUALITY, True, f"data-quality score {score:.1f} >= threshold {threshold:.1f}"
    )


# --- offline metrics --------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def gate_offline_metrics(
    candidate: Mapping[str, Any],
    primary: Mapping[str, Any] | None,
    *,
    tolerances: Mapping[str, float],
    lower_is_better: Collection[str] = (),
) -> GateResult:
    """No metric may be worse than the primary's by more than its relative tolerance.

    ``tolerances`` maps a metric to the largest relative drop allowed (0.02: at most 2% lower
    than the primary). Only metrics named there and present on the primary are compared; a
    candidate missing one of them, or holding a non-finite value, fails. Metrics named in
    ``lower_is_better`` (losses) may not rise by more than their tolerance. No primary passes.
    """
    if primary is None:
        return GateResult(OFFLINE_METRICS, True, "no primary to compare against")
    problems: list[str] = []
    compared: list[str] = []
    for metric, tolerance in sorted(tolerances.items()):
        reference = _number(primary.get(metric))
        if reference is None:
            continue
        value = _number(candidate.get(metric))
        if value is None:
            problems.append(f"{metric} is missing or not a finite number (primary {reference:.4f})")
            continue
        compared.append(metric)
        worse_by = value - reference if metric in lower_is_better else reference - value
        relative = (
            worse_by / abs(reference) if reference != 0 else (math.inf if worse_by > 0 else 0.0)
        )
        if relative > tolerance:
            direction = "rose" if metric in lower_is_better else "dropped"
            problems.append(
                f"{metric} {direction} {relative:.1%} ({reference:.4f} -> {value:.4f}), "
                f"more than the {tolerance:.1%} allowed"
            )
    if problems:
        return GateResult(OFFLINE_METRICS, False, "; ".join(problems))
    if not compared:
        return GateResult(OFFLINE_METRICS, True, "the primary has none of the gated metrics")
    return GateResult(
        OFFLINE_METRICS, True, f"{', '.join(compared)} within tolerance of the primary"
    )


# --- artifact checksums -----------------------------------------------------------------------


def gate_artifact_checksums(
    directory: Path,
    *,
    expected_version: str | None = None,
    expected_manifest_sha256: str | None = None,
) -> GateResult:
    """The bundle matches its manifest (``verify_bundle``), and the manifest is the one that
    was registered: same version string and, when recorded, the same manifest sha256."""
    problems = verify_bundle(directory)
    if not problems:
        if expected_manifest_sha256:
            actual = compute_manifest_sha256(directory)
            if actual != expected_manifest_sha256:
                problems.append("manifest.json changed since registration (sha256 differs)")
        if expected_version is not None:
            manifest_version = read_manifest(directory).get("version")
            if manifest_version != expected_version:
                problems.append(
                    f"manifest version {manifest_version!r} is not {expected_version!r}"
                )
    if problems:
        shown = problems[:10]
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        return GateResult(ARTIFACT_CHECKSUMS, False, "; ".join(shown) + more)
    return GateResult(ARTIFACT_CHECKSUMS, True, "every file matches its manifest checksum")


# --- feature schema ---------------------------------------------------------------------------


def _normalise(schema: Sequence[FeatureSpec]) -> list[tuple[str, str | None]]:
    """``{"name", "dtype"}`` mappings, ``(name, dtype)`` pairs or bare names -> (name, dtype)."""
    out: list[tuple[str, str | None]] = []
    for spec in schema:
        if isinstance(spec, str):
            out.append((spec, None))
        elif isinstance(spec, Mapping):
            dtype = spec.get("dtype")
            out.append((str(spec["name"]), None if dtype is None else str(dtype)))
        else:
            name, dtype = spec[0], spec[1] if len(spec) > 1 else None
            out.append((str(name), None if dtype is None else str(dtype)))
    return out


def gate_feature_schema(
    model_schema: Sequence[FeatureSpec], serving_schema: Sequence[FeatureSpec] | None
) -> GateResult:
    """The model's features are the serving schema's: same names in the same order, and the
    same dtypes where both sides state one. ``None`` for the serving schema skips the gate."""
    if serving_schema is None:
        return GateResult(
            FEATURE_SCHEMA, True, "skipped: no serving feature schema to compare with", True
        )
    model = _normalise(model_schema)
    serving = _normalise(serving_schema)
    model_names = [n for n, _ in model]
    serving_names = [n for n, _ in serving]
    problems: list[str] = []
    missing = [n for n in serving_names if n not in model_names]
    extra = [n for n in model_names if n not in serving_names]
    if missing:
        problems.append(f"missing features (serving has, model lacks): {', '.join(missing)}")
    if extra:
        problems.append(f"extra features (model has, serving lacks): {', '.join(extra)}")
    duplicates = sorted({n for n in model_names if model_names.count(n) > 1})
    if duplicates:
        problems.append(f"duplicate features: {', '.join(duplicates)}")
    if not problems and model_names != serving_names:
        first = next(
            i for i, (a, b) in enumerate(zip(model_names, serving_names, strict=False)) if a != b
        )
        problems.append(
            f"feature order differs from position {first}: model has "
            f"{model_names[first]!r}, serving has {serving_names[first]!r}"
        )
    if not problems:
        dtypes = [
            f"{name} is {a} in the model, {b} in serving"
            for (name, a), (_, b) in zip(model, serving, strict=False)
            if a is not None and b is not None and a != b
        ]
        if dtypes:
            problems.append("dtype mismatch: " + ", ".join(dtypes))
    if problems:
        return GateResult(FEATURE_SCHEMA, False, "; ".join(problems))
    return GateResult(FEATURE_SCHEMA, True, f"{len(model)} features match the serving schema")


# --- smoke test -------------------------------------------------------------------------------


def synthetic_requests(
    feature_schema: Sequence[FeatureSpec], *, requests: int = 20, rows: int = 10
) -> list[list[dict[str, Any]]]:
    """Deterministic sample requests for a smoke test when the bundle ships none.

    Numeric features take small values that vary by row, text features a short string, so a
    scorer sees realistic types without real data.
    """
    schema = _normalise(feature_schema)
    out: list[list[dict[str, Any]]] = []
    for r in range(requests):
        batch = []
        for i in range(rows):
            row: dict[str, Any] = {}
            for j, (name, dtype) in enumerate(schema):
                kind = (dtype or "float").lower()
                if "str" in kind or "object" in kind or "categ" in kind:
                    row[name] = f"v{(r + i + j) % 5}"
                elif "bool" in kind:
                    row[name] = (r + i + j) % 2 == 0
                elif "int" in kind:
                    row[name] = (r * rows + i + j) % 7
                else:
                    row[name] = ((r * rows + i + j) % 11) / 10.0
            batch.append(row)
        out.append(batch)
    return out


def p95(values: Sequence[float]) -> float:
    """95th percentile by the nearest-rank method (an observed value, never interpolated)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


@contextlib.contextmanager
def one_scoring_thread() -> Iterator[None]:
    """Limit OpenMP (LightGBM's predictor) to one thread in this thread while timing.

    Serving scores on one thread per request (``rank.py``), so that is the latency to judge.
    LightGBM's default, every core, measured 0.25 ms for 50 rows on an idle 2-core machine
    and 8 ms while another process kept one core busy: a gate timing that would judge the
    neighbours, not the model. Without threadpoolctl (a scikit-learn dependency) it times as is.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn always installs it
        yield
        return
    with threadpool_limits(limits=1, user_api="openmp"):
        yield


def _prepared(scorer: Scorer, request: list[dict[str, Any]]) -> Any:
    """The request as the scorer's input: ``scorer.prepare(rows)`` when it has one."""
    prepare = getattr(scorer, "prepare", None)
    return prepare(list(request)) if callable(prepare) else list(request)


class RankerScorer:
    """A bundle's ranker as a smoke-test scorer: rows in the manifest's feature order, a
    missing feature at its catalogue default, scored on one thread (as serving scores).

    ``prepare(rows)`` builds the float32 matrix; calling the scorer with a matrix scores it,
    with rows prepares them first.
    """

    def __init__(self, names: Sequence[str], defaults: Any, predict: Callable[[Any], Any]) -> None:
        self.names = list(names)
        self.defaults = defaults
        self.predict = predict

    def prepare(self, rows: list[dict[str, Any]]) -> Any:
        import numpy as np

        defaults = self.defaults
        return np.array(
            [[row.get(n, defaults[i]) for i, n in enumerate(self.names)] for row in rows],
            dtype=np.float32,
        ).reshape(len(rows), len(self.names))

    def __call__(self, batch: Any) -> Sequence[float]:
        if isinstance(batch, list):
            batch = self.prepare(batch)
        return [float(v) for v in self.predict(batch)]


def load_ranker_scorer(bundle_dir: Path) -> RankerScorer:
    """The smoke-test loader for bundles the train stage writes: ``ranker/`` scored natively
    (LightGBM on one thread, or the logistic fallback), features as the manifest lists them.

    Unlike ``apps.pipeline.train.loader.load_scorer`` it can be timed without its per-row
    Python loop (``prepare``): that loop costs about 1 ms per 50-row request on this project's
    machine, several times the demo ranker itself (0.2-0.45 ms), and hid a predictor 8x slower
    behind a measured ratio of 1.6-2.0x.
    """
    import json

    from apps.pipeline import features as ft
    from apps.pipeline.train import ranker as rk

    bundle = Path(bundle_dir)
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    names = [str(f["name"]) for f in manifest["features"]]
    defaults = [ft.spec_default(n) if n in ft.FEATURE_NAMES else 0.0 for n in names]
    model = rk.load_ranker(bundle / "ranker")
    if isinstance(model, rk.LGBMRanker):
        booster = model.booster_

        def predict(matrix: Any) -> Any:
            return booster.predict(matrix, num_threads=1)

    else:
        predict = model.scorer().score
    return RankerScorer(names, defaults, predict)


@dataclass(frozen=True)
class LatencyComparison:
    """Per-request p95 times (CPU or wall, by the clock used) of a candidate and the primary
    on the same requests."""

    candidate_p95_ms: float
    primary_p95_ms: float
    samples: int

    @property
    def ratio(self) -> float:
        if self.primary_p95_ms > 0:
            return self.candidate_p95_ms / self.primary_p95_ms
        return math.inf if self.candidate_p95_ms > 0 else 1.0


def compare_latency(
    candidate: Scorer,
    primary: Scorer,
    requests: Sequence[list[dict[str, Any]]],
    *,
    samples: int = DEFAULT_LATENCY_SAMPLES,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyComparison:
    """Time both scorers on the same requests, ``samples`` requests each, interleaved.

    ``clock`` is read before and after each call; ``time.thread_time`` (what the smoke test
    uses) counts only the CPU time of this thread, so a scorer must score on the calling
    thread (``one_scoring_thread``) for it to see the whole cost.

    Request ``i`` is ``requests[i % len(requests)]``, scored by both back to back, the
    candidate first on even ``i`` and the primary first on odd ones: a slow spell of the
    machine, and whatever the first call leaves warm for the second, fall on both sides alike.
    A scorer with ``prepare`` gets its prepared batch, built outside the timed call.
    Exceptions from either scorer propagate.
    """
    if not requests:
        raise ValueError("no sample requests to time")
    if samples < 1:
        raise ValueError("samples must be at least 1")
    timed: dict[str, list[float]] = {"candidate": [], "primary": []}
    scorers = {"candidate": candidate, "primary": primary}
    for i in range(samples):
        request = requests[i % len(requests)]
        order = ("candidate", "primary") if i % 2 == 0 else ("primary", "candidate")
        for side in order:
            batch = _prepared(scorers[side], request)
            started = clock()
            scorers[side](batch)
            timed[side].append((clock() - started) * 1000.0)
    return LatencyComparison(p95(timed["candidate"]), p95(timed["primary"]), samples)


class _PrimaryFailed(Exception):
    """The primary's scorer raised while being timed (not the candidate's fault)."""


def _relative_latency(
    scorer: Scorer,
    *,
    load: Loader,
    primary_dir: Path,
    requests: Sequence[list[dict[str, Any]]],
    max_ratio: float,
    samples: int,
    floor_ms: float,
    clock: Callable[[], float],
) -> tuple[bool, str]:
    """(passed, reason) of the candidate's p95 against the primary's, on the same requests.

    A primary that cannot be loaded or cannot score the requests is no reason to refuse a
    candidate (it may be the fix): the check is then reported as not made, and passes.
    """
    try:
        primary = load(Path(primary_dir))
        primary(_prepared(primary, requests[0]))
    except Exception as exc:
        return True, (
            f"not compared with the primary: its bundle could not be loaded or scored "
            f"({type(exc).__name__}: {exc})"
        )

    class PrimaryScorer:
        """The primary's scorer, its errors told apart from the candidate's."""

        def prepare(self, rows: list[dict[str, Any]]) -> Any:
            try:
                return _prepared(primary, rows)
            except Exception as exc:
                raise _PrimaryFailed(f"{type(exc).__name__}: {exc}") from exc

        def __call__(self, batch: Any) -> Sequence[float]:
            try:
                return primary(batch)
            except Exception as exc:
                raise _PrimaryFailed(f"{type(exc).__name__}: {exc}") from exc

    try:
        with one_scoring_thread():
            comparison = compare_latency(
                scorer, PrimaryScorer(), requests, samples=samples, clock=clock
            )
    except _PrimaryFailed as exc:
        return True, f"not compared with the primary: its scorer raised {exc}"
    except Exception as exc:
        return False, f"a timed request raised {type(exc).__name__}: {exc}"
    c, p, ratio = comparison.candidate_p95_ms, comparison.primary_p95_ms, comparison.ratio
    measured = (
        f"p95 CPU time {c:.2f} ms vs the primary's {p:.2f} ms on the same requests "
        f"({samples} each, interleaved): {ratio:.2f}x"
    )
    if c <= floor_ms:
        return True, f"{measured}, not judged below the {floor_ms:.1f} ms floor"
    if ratio > max_ratio:
        return False, (
            f"p95 CPU time per request {c:.2f} ms is {ratio:.2f}x the primary's p95 {p:.2f} ms "
            f"on the same requests ({samples} each, interleaved), more than the "
            f"{max_ratio:.1f}x allowed"
        )
    return True, f"{measured} <= {max_ratio:.1f}x"


def gate_smoke_test(
    directory: Path,
    *,
    load: Loader | None,
    requests: Sequence[list[dict[str, Any]]],
    p95_budget_ms: float,
    clock: Callable[[], float] = time.perf_counter,
    primary_dir: Path | None = None,
    max_latency_ratio: float | None = None,
    latency_samples: int = DEFAULT_LATENCY_SAMPLES,
    latency_floor_ms: float = DEFAULT_LATENCY_FLOOR_MS,
    cpu_clock: Callable[[], float] = time.thread_time,
) -> GateResult:
    """Load the bundle, score every sample request, and check the scores and the latency.

    Fails when the loader or the scorer raises, when a request gets the wrong number of
    scores, when any score is NaN or infinite, when the p95 latency per request exceeds
    ``p95_budget_ms``, or, given the primary's bundle (``primary_dir``) and
    ``max_latency_ratio``, when the candidate's p95 is more than that many times the
    primary's, both loaded with ``load`` and timed on the same requests in one interleaved run
    (``compare_latency``, ``latency_samples`` requests each, in the scoring thread's CPU time
    read from ``cpu_clock``; the absolute budget is wall time from ``clock``). A candidate p95 at or below
    ``latency_floor_ms`` is not judged by ratio. The first request is scored once untimed as
    a warm-up (lazy initialisation is not request latency). A scorer with ``prepare`` is timed
    on prepared batches only. No loader skips the gate.
    """
    if load is None:
        return GateResult(SMOKE_TEST, True, "skipped: no loader configured", True)
    if not requests:
        return GateResult(SMOKE_TEST, False, "no sample requests to score")
    try:
        scorer = load(Path(directory))
    except Exception as exc:
        return GateResult(SMOKE_TEST, False, f"loader raised {type(exc).__name__}: {exc}")
    try:
        scorer(_prepared(scorer, requests[0]))
    except Exception as exc:
        return GateResult(SMOKE_TEST, False, f"warm-up request raised {type(exc).__name__}: {exc}")
    latencies: list[float] = []
    bad: list[tuple[int, int]] = []
    total = 0
    with one_scoring_thread():
        for index, request in enumerate(requests):
            try:
                batch = _prepared(scorer, request)
                started = clock()
                scores = list(scorer(batch))
            except Exception as exc:
                return GateResult(
                    SMOKE_TEST, False, f"request {index} raised {type(exc).__name__}: {exc}"
                )
            latencies.append((clock() - started) * 1000.0)
            if len(scores) != len(request):
                return GateResult(
                    SMOKE_TEST,
                    False,
                    f"request {index} has {len(request)} rows but got {len(scores)} scores",
                )
            total += len(scores)
            for row, score in enumerate(scores):
                try:
                    finite = math.isfinite(float(score))
                except (TypeError, ValueError):
                    finite = False
                if not finite:
                    bad.append((index, row))
    if bad:
        first_request, first_row = bad[0]
        return GateResult(
            SMOKE_TEST,
            False,
            f"{len(bad)} of {total} scores are NaN, infinite or not numbers "
            f"(first at request {first_request}, row {first_row})",
        )
    observed = p95(latencies)
    if observed > p95_budget_ms:
        return GateResult(
            SMOKE_TEST,
            False,
            f"p95 latency {observed:.1f} ms exceeds the {p95_budget_ms:.1f} ms budget "
            f"({len(requests)} requests)",
        )
    reason = (
        f"{len(requests)} requests scored, p95 {observed:.1f} ms <= {p95_budget_ms:.1f} ms, "
        "all scores finite"
    )
    if primary_dir is None or max_latency_ratio is None:
        return GateResult(SMOKE_TEST, True, reason)
    passed, relative = _relative_latency(
        scorer,
        load=load,
        primary_dir=primary_dir,
        requests=requests,
        max_ratio=max_latency_ratio,
        samples=latency_samples,
        floor_ms=latency_floor_ms,
        clock=cpu_clock,
    )
    if not passed:
        return GateResult(SMOKE_TEST, False, relative)
    return GateResult(SMOKE_TEST, True, f"{reason}; {relative}")


# --- all gates --------------------------------------------------------------------------------


def run_gates(
    *,
    bundle_dir: Path,
    quality_score: float | None,
    quality_threshold: float,
    candidate_metrics: Mapping[str, Any],
    primary_metrics: Mapping[str, Any] | None,
    metric_tolerances: Mapping[str, float],
    model_schema: Sequence[FeatureSpec],
    serving_schema: Sequence[FeatureSpec] | None,
    load: Loader | None,
    sample_requests: Sequence[list[dict[str, Any]]],
    p95_budget_ms: float,
    expected_version: str | None = None,
    expected_manifest_sha256: str | None = None,
    lower_is_better: Collection[str] = (),
    gates: Collection[str] = ALL_GATES,
    clock: Callable[[], float] = time.perf_counter,
    primary_bundle_dir: Path | None = None,
    max_latency_ratio: float | None = None,
    latency_samples: int = DEFAULT_LATENCY_SAMPLES,
    latency_floor_ms: float = DEFAULT_LATENCY_FLOOR_MS,
    cpu_clock: Callable[[], float] = time.thread_time,
) -> list[GateResult]:
    """Run the named gates (all by default) in ``ALL_GATES`` order and return every result.

    Every selected gate runs, so a refusal lists all that is wrong at once, except that the
    smoke test never loads a bundle whose checksums failed (it fails as "not run" instead).
    With ``primary_bundle_dir`` and ``max_latency_ratio`` the smoke test also times the
    candidate against the primary (``gate_smoke_test``).
    """
    unknown = set(gates) - set(ALL_GATES)
    if unknown:
        raise ValueError(f"unknown gates: {', '.join(sorted(unknown))}")
    results: list[GateResult] = []
    checksums_ok = True
    for name in ALL_GATES:
        if name not in gates:
            continue
        if name == DATA_QUALITY:
            result = gate_data_quality(quality_score, threshold=quality_threshold)
        elif name == OFFLINE_METRICS:
            result = gate_offline_metrics(
                candidate_metrics,
                primary_metrics,
                tolerances=metric_tolerances,
                lower_is_better=lower_is_better,
            )
        elif name == ARTIFACT_CHECKSUMS:
            result = gate_artifact_checksums(
                bundle_dir,
                expected_version=expected_version,
                expected_manifest_sha256=expected_manifest_sha256,
            )
            checksums_ok = result.passed
        elif name == FEATURE_SCHEMA:
            result = gate_feature_schema(model_schema, serving_schema)
        elif load is not None and not checksums_ok:
            result = GateResult(SMOKE_TEST, False, "not run: the bundle failed its checksum gate")
        else:
            result = gate_smoke_test(
                bundle_dir,
                load=load,
                requests=sample_requests,
                p95_budget_ms=p95_budget_ms,
                clock=clock,
                primary_dir=primary_bundle_dir,
                max_latency_ratio=max_latency_ratio,
                latency_samples=latency_samples,
                latency_floor_ms=latency_floor_ms,
                cpu_clock=cpu_clock,
            )
        results.append(result)
    return results


def failed(results: Sequence[GateResult]) -> list[GateResult]:
    """The gates that did not pass."""
    return [r for r in results if not r.passed]
