"""Pipeline services: every write of the pipeline app goes through these functions.

Each stage is a plain function ``stage_<name>(stage_run, progress)`` that fetches its inputs,
calls the pure core, writes its outputs and returns a ``StageOutcome``. ``stage_run_execute``
wraps any stage with the bookkeeping (status, timings, row counts, error text), so the
management commands, the Celery tasks and the admin all run stages the same way.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from apps.pipeline import canonical, clean, extract, frames, quality
from apps.pipeline.conf import data_path, reco
from apps.pipeline.lake import Lake
from apps.pipeline.models import (
    DataQualityReport,
    ExtractionRun,
    PipelineRun,
    RunStatus,
    Stage,
    StageRun,
)
from apps.pipeline.sources.contract import Contract, load_contract, validate_live
from apps.pipeline.sources.db import make_engine
from apps.pipeline.stores import DjangoLockManager, DjangoWatermarkStore

logger = logging.getLogger(__name__)

Progress = Callable[[int], None] | None

# The order a full run executes. Quality runs on the canonical frames *before* cleaning so
# that its score reflects the data as delivered, not after repairs.
PIPELINE_STAGES: tuple[str, ...] = (
    Stage.EXTRACT_BUSINESS,
    Stage.EXTRACT_MATOMO,
    Stage.CANONICALIZE,
    Stage.QUALITY,
    Stage.CLEAN,
)
# A full run also trains (daily); the incremental run only ingests (hourly).
FULL_STAGES: tuple[str, ...] = (*PIPELINE_STAGES, Stage.TRAIN)


@dataclass(frozen=True)
class StageOutcome:
    """What a stage reports back for its ``StageRun`` row."""

    rows_in: int = 0
    rows_out: int = 0
    detail: dict[str, Any] = field(default_factory=dict)


class QualityGateError(RuntimeError):
    """Training is blocked: the latest data-quality report is below the threshold."""


# --- contract and sources ---------------------------------------------------------------------


@lru_cache(maxsize=4)
def _contract_cached(path: str, mtime: float) -> Contract:
    return load_contract(path)


def get_contract() -> Contract:
    """The validated source contract (re-read when the file changes)."""
    path = str(reco("SOURCES_CONTRACT"))
    mtime = os.path.getmtime(path) if os.path.exists(path) else 0.0
    return _contract_cached(path, mtime)


def source_url(contract: Contract, source: str) -> str:
    """The database URL of a source, from the setting its contract names."""
    setting = contract.sources[source].url_setting
    return str(getattr(settings, setting, "") or "")


def sources_check() -> list[str]:
    """Validate the contract against every live source; return a line per source checked.

    Raises ``ContractError`` listing every mismatch (missing tables/columns, wrong types).
    """
    contract = get_contract()
    engines = {}
    for name in contract.sources:
        url = source_url(contract, name)
        if url:
            engines[name] = make_engine(url, read_only=True)
    try:
        validate_live(contract, engines)
    finally:
        for engine in engines.values():
            engine.dispose()
    return [
        f"{name}: {len(spec.tables)} tables match ({_redact(source_url(contract, name))})"
        for name, spec in contract.sources.items()
    ]


def _redact(url: str) -> str:
    """Hide a password in a URL for logs and messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in creds else url
    return url


def _dir(*parts: str) -> Path:
    """A directory under DATA_DIR, created if missing."""
    path = Path(settings.DATA_DIR).joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def lake() -> Lake:
    """The raw lake under DATA_DIR/raw."""
    return Lake(Path(settings.DATA_DIR) / "raw")


# --- stages ----------------------------------------------------------------------------------


def _stage_extract(source: str, stage_run: StageRun, progress: Progress) -> StageOutcome:
    contract = get_contract()
    url = source_url(contract, source)
    spec = contract.sources[source]
    if not url:
        return StageOutcome(detail={"skipped": f"{spec.url_setting} is not configured"})
    engine = make_engine(url, read_only=True)
    holder = f"{socket.gethostname()}:{os.getpid()}:stage{stage_run.pk}"
    failed: extract.SourceExtractionFailed | None = None
    try:
        result = extract.extract_source(
            engine,
            spec,
            lake(),
            DjangoWatermarkStore(),
            DjangoLockManager(),
            holder=holder,
            lock_ttl_seconds=int(reco("EXTRACT_LOCK_TTL_SECONDS")),
            batch_rows=int(reco("EXTRACT_BATCH_ROWS")),
            progress=progress,
            reconcile=True,
        )
    except extract.SourceExtractionFailed as exc:
        # Record what the successful tables did before failing the stage.
        failed, result = exc, exc.result
    finally:
        engine.dispose()
    rows_read = rows_written = 0
    tables = {}
    store = DjangoWatermarkStore()
    with transaction.atomic():
        for table in result.tables:
            if table.reconciled:
                store.mark_reconciled(source, table.table)
            ExtractionRun.objects.create(
                stage_run=stage_run,
                source=source,
                table=table.table,
                status=RunStatus.SUCCEEDED,
                rows_read=table.rows_read,
                rows_written=table.rows_written,
                rows_deleted=table.rows_deleted,
                watermark_from=table.watermark_from,
                watermark_to=table.watermark_to,
                upper_bound=str(table.upper_bound or ""),
                seconds=table.seconds,
            )
            rows_read += table.rows_read
            rows_written += table.rows_written
            tables[table.table] = {
                "rows_read": table.rows_read,
                "rows_written": table.rows_written,
                "rows_deleted": table.rows_deleted,
                "rows_total": table.rows_total,
                "seconds": round(table.seconds, 3),
            }
        for failure in result.failures:
            ExtractionRun.objects.create(
                stage_run=stage_run,
                source=source,
                table=failure.table,
                status=RunStatus.FAILED,
                watermark_from=failure.watermark,
                watermark_to=failure.watermark,
                error=f"{failure.error_type}: {failure.error}",
            )
    if failed is not None:
        raise failed
    return StageOutcome(rows_in=rows_read, rows_out=rows_written, detail={"tables": tables})


def stage_extract_business(stage_run: StageRun, progress: Progress = None) -> StageOutcome:
    """Extract the business database's tables incrementally into the lake."""
    return _stage_extract("business", stage_run, progress)


def stage_extract_matomo(stage_run: StageRun, progress: Progress = None) -> StageOutcome:
    """Extract the Matomo log tables incrementally into the lake."""
    return _stage_extract("matomo", stage_run, progress)


def stage_canonicalize(stage_run: StageRun, progress: Progress = None) -> StageOutcome:
    """Map the lake's raw tables to canonical users, items and interactions (not yet cleaned)."""
    contract = get_contract()
    the_lake = lake()
    raw = {}
    for spec in (t for s in contract.sources.values() for t in s.tables.values()):
        if the_lake.exists(spec.source, spec.name):
            raw[spec.key] = the_lake.read_table(spec.source, spec.name)
            if progress:
                progress(len(raw[spec.key]))
    result = canonical.build_canonical(raw, contract)
    out = {"users": result.users, "items": result.items, "interactions": result.interactions}
    frames.write_frames(_dir("staged"), out)
    rows_in = sum(len(df) for df in raw.values())
    return StageOutcome(
        rows_in=rows_in,
        rows_out=sum(len(df) for df in out.values()),
        detail={"rows": {k: len(v) for k, v in out.items()}, "stats": _jsonable(result.stats)},
    )


def stage_quality(stage_run: StageRun, progress: Progress = None) -> StageOutcome:
    """Score the staged (uncleaned) data and store a DataQualityReport with HTML and JSON."""
    staged = frames.read_frames(_dir("staged"))
    if progress:
        progress(sum(len(df) for df in staged.values()))
    previous = DataQualityReport.objects.order_by("-created_at").first()
    threshold = float(reco("QUALITY_THRESHOLD"))
    config = quality.QualityConfig(
        gate=threshold, freshness_max_age_hours=float(reco("FRESHNESS_MAX_AGE_HOURS"))
    )
    now = timezone.now()
    result = quality.assess_quality(
        staged, now=now, previous=previous.summary if previous else None, thresholds=config
    )
    with transaction.atomic():
        report = DataQualityReport.objects.create(
            stage_run=stage_run,
            score=result.score,
            threshold=threshold,
            passed=result.passed,
            checks=_jsonable(result.checks),
            summary=_jsonable(result.summary),
        )
        directory = _dir("reports", "quality")
        html_path = directory / f"quality-{report.pk}.html"
        json_path = directory / f"quality-{report.pk}.json"
        html_path.write_text(
            quality.render_quality_html(
                result, title=f"Data quality report #{report.pk}", created_at=now
            ),
            encoding="utf-8",
        )
        json_path.write_text(json.dumps(_jsonable(result.to_dict()), indent=2), encoding="utf-8")
        report.html_path = str(html_path)
        report.json_path = str(json_path)
        report.save(update_fields=["html_path", "json_path"])
    data_path("reports", "quality", "latest.prom").write_text(
        quality.quality_prometheus_text(result), encoding="utf-8"
    )
    failing = [c["name"] for c in result.checks if c["status"] == "fail"]
    return StageOutcome(
        rows_in=sum(len(df) for df in staged.values()),
        detail={
            "score": round(result.score, 2),
            "passed": result.passed,
            "report_id": report.pk,
            "failing": failing,
        },
    )


def stage_clean(stage_run: StageRun, progress: Progress = None) -> StageOutcome:
    """Clean the staged frames into DATA_DIR/clean with a cleaning report."""
    staged = frames.read_frames(_dir("staged"))
    if progress:
        progress(sum(len(df) for df in staged.values()))
    cleaner = clean.DataCleaner(now=timezone.now())
    result = cleaner.clean(staged)
    out = {"users": result.users, "items": result.items, "interactions": result.interactions}
    frames.write_frames(_dir("clean"), out)
    report = _jsonable(result.report.to_dict())
    data_path("clean", "cleaning_report.json").write_text(
        json.dumps(report, indent=2), encoding="utf-8"
    )
    return StageOutcome(
        rows_in=sum(len(df) for df in staged.values()),
        rows_out=sum(len(df) for df in out.values()),
        detail={"cleaning": report},
    )


def stage_train(stage_run: StageRun, progress: Progress = None) -> StageOutcome:
    """Train a bundle from the clean frames, log it to MLflow and register a candidate version.

    Refuses to start when the latest data-quality report is below the gate. The first model of
    an empty registry is promoted through the normal gates so serving has a primary.
    """
    from apps.models import selectors as model_selectors
    from apps.models import services as model_services
    from apps.models.bundle import write_manifest
    from apps.models.models import EvaluationReport
    from apps.pipeline import tracking
    from apps.pipeline.train import report as train_report
    from apps.pipeline.train import trainer
    from apps.pipeline.train.loader import load_scorer

    quality_report = quality_gate_check()
    clean_frames = frames.read_frames(_dir("clean"))
    if progress:
        progress(len(clean_frames["interactions"]))
    now = timezone.now()
    version = f"v{now:%Y%m%d-%H%M%S}-{stage_run.pk}"
    bundle_dir = _dir("bundles", version)
    config = trainer.TrainConfig(**reco("TRAIN_OPTIONS"))
    result = trainer.train_bundle(clean_frames, config, bundle_dir, log=logger.info)
    train_report.write_html(
        bundle_dir / "evaluation.html", result, title=f"Offline evaluation of {version}"
    )
    write_manifest(
        bundle_dir,
        version=version,
        created_at=now,
        data_snapshot={
            "quality_report_id": quality_report.pk,
            "quality_score": quality_report.score,
            "rows": {name: len(df) for name, df in clean_frames.items()},
            "cutoffs": result.cutoffs,
        },
        features=result.feature_schema,
        params=config.params(),
        metrics=result.metrics,
    )
    warnings = []
    try:
        run_id = tracking.log_training_run(
            version=version,
            params=config.params(),
            metrics=result.metrics,
            bundle_dir=bundle_dir,
            tags={"quality_report_id": str(quality_report.pk)},
        )
    except Exception as exc:  # a tracking outage must not throw away a trained model
        logger.warning("MLflow logging failed: %s", exc)
        run_id = ""
        warnings.append(f"MLflow logging failed: {exc.__class__.__name__}: {exc}")
    feature_sync = _sync_features_to_redis(bundle_dir, version)
    primary = model_selectors.model_version_primary()
    model_version = model_services.model_version_register(
        bundle_path=str(bundle_dir),
        version=version,
        metrics=_jsonable(result.metrics),
        feature_schema=result.feature_schema,
        mlflow_run_id=run_id,
        quality_report_id=quality_report.pk,
        actor="pipeline",
    )
    k = config.k
    EvaluationReport.objects.create(
        model_version=model_version,
        protocol="time",
        dataset="clean interactions (time split)",
        k=k,
        metrics=_jsonable(result.comparison["ranked"]),
        per_channel=_jsonable(
            {n: result.comparison[n] for n in result.channels if n in result.comparison}
        ),
        baseline=_jsonable(
            {
                n: result.comparison[n]
                for n in ("popular", "fused", "ranked_logistic")
                if n in result.comparison
            }
        ),
        compared_to=primary,
        html_path=str(bundle_dir / "evaluation.html"),
        json_path=str(bundle_dir / "training.json"),
    )
    promoted = False
    if primary is None and reco("AUTO_PROMOTE_FIRST"):
        try:
            model_services.model_version_promote(
                version_id=model_version.pk,
                actor="pipeline",
                reason="first model of an empty registry",
                loader=load_scorer,
            )
            promoted = True
        except model_services.ModelActionRefused as exc:
            warnings.append(f"first model not promoted: {exc}")
    published = _publish_to_redis(bundle_dir, version) if promoted else "skipped: not the primary"
    return StageOutcome(
        rows_in=len(clean_frames["interactions"]),
        rows_out=result.counts["train_examples"] + result.counts["valid_examples"],
        detail={
            "version": version,
            "model_version_id": model_version.pk,
            "mlflow_run_id": run_id,
            "promoted": promoted,
            f"ndcg@{k}": {
                n: round(m.get(f"ndcg@{k}", 0.0), 4) for n, m in result.comparison.items()
            },
            "ranker": result.ranker_metrics,
            "skipped_channels": result.skipped_channels,
            "timings": result.timings,
            "counts": result.counts,
            "warnings": warnings,
            "feature_sync": feature_sync,
            "published": published,
        },
    )


def primary_sync_to_redis() -> dict[str, str]:
    """Republish the current primary bundle's lists and features to Redis, without training.

    For after a Redis outage or flush: serving answers from the bundle's local store (marked
    degraded) until this has run. Raises ``ValueError`` when there is nothing to publish.
    """
    from apps.models import selectors as model_selectors

    if not settings.REDIS_URL:
        raise ValueError("REDIS_URL is not configured: there is no Redis to synchronise")
    primary = model_selectors.model_version_primary()
    if primary is None:
        raise ValueError("no primary model version: train and promote one first")
    bundle_dir = Path(primary.bundle_path)
    return {
        "version": primary.version,
        "lists": _publish_to_redis(bundle_dir, primary.version),
        "features": _sync_features_to_redis(bundle_dir, primary.version),
    }


def _publish_to_redis(bundle_dir: Path, version: str) -> str:
    """Publish the primary bundle's lists to Redis for serving; never fails training.

    Serving falls back to the bundle's local store while Redis lacks the version.
    """
    if not settings.REDIS_URL:
        return "skipped: REDIS_URL is not configured (serving reads the bundle's local store)"
    from apps.pipeline.feature_store import make_redis_client
    from apps.serving.engine.publish import publish_from_bundle

    client = make_redis_client(settings.REDIS_URL, timeout=5.0)
    try:
        keys = publish_from_bundle(client, bundle_dir, version)
    except Exception as exc:  # Redis down: serving uses the local store until the next publish
        logger.warning("publishing %s to Redis failed: %s", version, exc)
        return f"failed: {exc.__class__.__name__}: {exc}"
    finally:
        client.close()
    return f"published: {keys} keys under version {version}"


def _sync_features_to_redis(bundle_dir: Path, version: str) -> str:
    """Push the bundle's feature tables to Redis under a versioned key; never fails training.

    With no Redis configured, or Redis down, the bundle's SQLite feature store serves.
    """
    if not settings.REDIS_URL:
        return "skipped: REDIS_URL is not configured (the bundle's SQLite store serves)"
    from apps.pipeline import feature_store
    from apps.pipeline.features import FeatureBuilder

    if not (bundle_dir / "features").is_dir():
        return "skipped: the bundle has no feature tables"
    tables = FeatureBuilder.load(bundle_dir / "features").tables()
    client = feature_store.make_redis_client(settings.REDIS_URL, timeout=2.0)
    try:
        result = feature_store.sync_to_redis(client, tables, version)
    finally:
        client.close()
    note = f" ({result.reason})" if result.reason else ""
    return f"{result.status}: {result.keys_written} keys under version {result.version}{note}"


STAGES: dict[str, Callable[[StageRun, Progress], StageOutcome]] = {
    Stage.EXTRACT_BUSINESS: stage_extract_business,
    Stage.EXTRACT_MATOMO: stage_extract_matomo,
    Stage.CANONICALIZE: stage_canonicalize,
    Stage.QUALITY: stage_quality,
    Stage.CLEAN: stage_clean,
    Stage.TRAIN: stage_train,
}


# --- run bookkeeping ---------------------------------------------------------------------------


def stage_run_execute(
    *, stage: str, pipeline_run: PipelineRun | None = None, progress: Progress = None
) -> StageRun:
    """Run one stage with full bookkeeping; the StageRun row records success or the error.

    Never raises for a stage failure: the caller reads ``status``/``error`` (a failed stage
    must leave a record an operator can read, not just a traceback in a worker log).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")
    stage_run = StageRun.objects.create(
        pipeline_run=pipeline_run, stage=stage, status=RunStatus.RUNNING, started_at=timezone.now()
    )
    started = time.perf_counter()
    try:
        outcome = STAGES[stage](stage_run, progress)
    except Exception as exc:
        logger.exception("stage %s failed", stage)
        StageRun.objects.filter(pk=stage_run.pk).update(
            status=RunStatus.FAILED,
            finished_at=timezone.now(),
            error=f"{exc.__class__.__name__}: {exc}\n\n{traceback.format_exc(limit=8)}",
            detail={"seconds": round(time.perf_counter() - started, 3)},
        )
    else:
        detail = dict(outcome.detail)
        detail["seconds"] = round(time.perf_counter() - started, 3)
        StageRun.objects.filter(pk=stage_run.pk).update(
            status=RunStatus.SKIPPED if "skipped" in detail else RunStatus.SUCCEEDED,
            finished_at=timezone.now(),
            rows_in=outcome.rows_in,
            rows_out=outcome.rows_out,
            detail=_jsonable(detail),
        )
    stage_run.refresh_from_db()
    return stage_run


def pipeline_run_create(*, kind: str = "incremental", triggered_by: str = "manual") -> PipelineRun:
    """Record a pending pipeline run (the task or command executes it)."""
    return PipelineRun.objects.create(kind=kind, triggered_by=triggered_by[:64])


def pipeline_run_execute(
    *,
    run_id: int,
    stages: tuple[str, ...] | None = None,
    on_stage: Callable[[str], Progress] | None = None,
) -> PipelineRun | None:
    """Claim a pending run and execute its stages in order, stopping at the first failure.

    The claim is a conditional UPDATE (pending -> running), so a task delivered twice runs
    once; a missing or already-claimed run is a silent no-op that returns None.
    """
    claimed = PipelineRun.objects.filter(pk=run_id, status=RunStatus.PENDING).update(
        status=RunStatus.RUNNING, started_at=timezone.now()
    )
    if not claimed:
        return None
    run = PipelineRun.objects.get(pk=run_id)
    if stages is None:
        stages = FULL_STAGES if run.kind == "full" else PIPELINE_STAGES
    failed: StageRun | None = None
    for stage in stages:
        progress = on_stage(stage) if on_stage else None
        stage_run = stage_run_execute(stage=stage, pipeline_run=run, progress=progress)
        if stage_run.status == RunStatus.FAILED:
            failed = stage_run
            break
    PipelineRun.objects.filter(pk=run_id).update(
        status=RunStatus.FAILED if failed else RunStatus.SUCCEEDED,
        finished_at=timezone.now(),
        error=f"stage {failed.stage} failed: {failed.error.splitlines()[0]}" if failed else "",
    )
    run.refresh_from_db()
    return run


def pipeline_run_scheduled(*, kind: str) -> str | None:
    """Start a scheduled run of ``kind`` unless one of that kind is already running."""
    if PipelineRun.objects.filter(kind=kind, status=RunStatus.RUNNING).exists():
        return "skipped: a run of this kind is already running"
    run = pipeline_run_create(kind=kind, triggered_by="beat")
    result = pipeline_run_execute(run_id=run.pk)
    return result.status if result else None


def quality_gate_check() -> DataQualityReport:
    """Return the latest quality report if it passes the gate; raise ``QualityGateError`` if not.

    Training calls this first: a report below the threshold (or no report at all) blocks it.
    """
    report = DataQualityReport.objects.order_by("-created_at").first()
    if report is None:
        raise QualityGateError("no data-quality report exists yet; run the quality stage first")
    threshold = float(reco("QUALITY_THRESHOLD"))
    if report.score < threshold:
        failing = ", ".join(c["name"] for c in report.checks if c.get("status") == "fail") or "none"
        raise QualityGateError(
            f"data-quality score {report.score:.1f} is below the threshold {threshold:.1f} "
            f"(report #{report.pk}; failing checks: {failing})"
        )
    return report


def _jsonable(value: Any) -> Any:
    """Convert numpy/pandas scalars and timestamps into JSON-safe values."""
    import datetime as dt

    import numpy as np
    import pandas as pd

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, pd.Timestamp | dt.datetime | dt.date):
        return value.isoformat()
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and value != value:
        return None
    return value
