"""Pipeline services: every write of the pipeline app goes through these functions.

Each stage is a plain function ``stage_<name>(stage_run, progress)`` that fetches its inputs,
calls the pure core, writes its outputs and returns a ``StageOutcome``. Two wrappers add the
bookkeeping (status, timings, row counts, error text): ``pipeline_stage_execute`` runs a stage
of a pipeline run (claimed, retried on transient errors, safe to call twice), shared by the
Celery chain and the in-process ``pipeline_run_execute``; ``stage_run_execute`` runs a stage on
its own. Both go through ``_stage_call``, so every caller runs stages the same way.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from apps.pipeline import canonical, clean, errors, extract, frames, quality
from apps.pipeline.conf import data_path, reco
from apps.pipeline.lake import Lake
from apps.pipeline.models import (
    DataQualityReport,
    ExtractionLock,
    ExtractionRun,
    PipelineRun,
    PipelineTriggerLock,
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
        if result.failures and all(
            errors.failure_is_transient(f.error_type, f.error) for f in result.failures
        ):
            # The source went away (every failed table lost its connection); nothing failed
            # for a reason a retry would repeat, and no failed table moved its watermark.
            raise errors.TransientSourceError(
                f"source {source!r} connection lost or refused: {failed}"
            ) from failed
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
        # A retried or taken-over attempt replaces what an earlier attempt of this stage run
        # recorded, so a run never holds two reports.
        DataQualityReport.objects.filter(stage_run=stage_run).delete()
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


def stage_evaluate(stage_run: StageRun, progress: Progress = None) -> StageOutcome:
    """Evaluate the training recipe on the clean data with the stratified protocol of the
    public benchmarks and store it as an ``EvaluationReport`` of the newest registered version.

    The train stage reports the time-split comparison of the bundle it trained; this stage
    answers "how good is this recipe on the current data, in the terms of published tables"
    (random 75/25 split per user, seed 42, every held-out interaction relevant, k from the
    training options): popularity, every channel, fused and ranked side by side. It retrains
    on the split, so it costs about as much as training; it is not part of the daily run
    (``manage.py run_stage evaluate`` and a weekly schedule run it). The report is compared
    with the primary's latest stratified report when the newest version is not the primary.
    """
    from apps.models import selectors as model_selectors
    from apps.models.choices import EvaluationProtocol
    from apps.models.models import EvaluationReport, ModelVersion
    from apps.pipeline.train import protocols, trainer

    target = ModelVersion.objects.order_by("-created_at", "-id").first()
    if target is None:
        raise ValueError("no registered model version to attach the evaluation to: train first")
    clean_frames = frames.read_frames(_dir("clean"))
    if progress:
        progress(len(clean_frames["interactions"]))
    config = trainer.TrainConfig(**reco("TRAIN_OPTIONS"))
    folds = int(settings.RECO.get("EVALUATE_RANKER_FOLDS", 1))
    result = protocols.run_stratified(
        clean_frames, config, k=config.k, ranker_folds=folds, log=logger.info
    )
    table = result.table
    out = _dir("evaluation") / f"stratified-{target.version}.json"
    out.write_text(json.dumps(_jsonable(result.to_dict()), indent=2), encoding="utf-8")
    primary = model_selectors.model_version_primary()
    systems = {protocols.POPULARITY, protocols.FUSED, protocols.RANKED}
    report = EvaluationReport.objects.create(
        model_version=target,
        protocol=EvaluationProtocol.STRATIFIED,
        dataset="clean interactions (stratified 75/25 per user, seed 42)",
        k=config.k,
        metrics=_jsonable(table[protocols.RANKED]),
        per_channel=_jsonable({n: m for n, m in table.items() if n not in systems}),
        baseline=_jsonable(
            {n: table[n] for n in (protocols.POPULARITY, protocols.FUSED) if n in table}
        ),
        compared_to=primary if primary is not None and primary.pk != target.pk else None,
        json_path=str(out),
    )
    key = f"ndcg@{config.k}"
    return StageOutcome(
        rows_in=len(clean_frames["interactions"]),
        rows_out=int(result.counts.get("test_pairs", 0)),
        detail={
            "version": target.version,
            "evaluation_report_id": report.pk,
            key: {n: round(float(m.get(key, 0.0)), 4) for n, m in table.items()},
            "counts": _jsonable(result.counts),
            "json": str(out),
        },
    )


def primary_sync_to_redis(*, expected_version_id: int | None = None) -> dict[str, str]:
    """Republish the current primary bundle's lists and features to Redis, without training.

    For after a Redis outage or flush: serving answers from the bundle's local store (marked
    degraded) until this has run. Raises ``ValueError`` when there is nothing to publish, or
    when ``expected_version_id`` (the version an operator selected) is no longer the primary.
    """
    from apps.models import selectors as model_selectors

    if not settings.REDIS_URL:
        raise ValueError("REDIS_URL is not configured: there is no Redis to synchronise")
    primary = model_selectors.model_version_primary()
    if primary is None:
        raise ValueError("no primary model version: train and promote one first")
    if expected_version_id is not None and primary.pk != expected_version_id:
        raise ValueError(
            f"the selected version is not the primary any more ({primary.version} is): "
            "reload the page and select the primary"
        )
    bundle_dir = Path(primary.bundle_path)
    return {
        "version": primary.version,
        "lists": _publish_to_redis(bundle_dir, primary.version),
        "features": _sync_features_to_redis(bundle_dir, primary.version),
    }


def primary_sync_to_redis_logged(*, version_id: int, user_id: int) -> tuple[bool, str]:
    """Run ``primary_sync_to_redis`` for an operator and record the outcome in the version's
    admin history (a ``LogEntry`` by that user); return ``(succeeded, message)``.

    The admin's "Republish to Redis" runs this in the background, so it never raises: every
    outcome, a refusal or an outage included, must reach the history.
    """
    from django.contrib.admin.models import CHANGE, LogEntry

    from apps.models.models import ModelVersion

    try:
        outcome = primary_sync_to_redis(expected_version_id=version_id)
    except ValueError as exc:
        ok, text = False, f"Republish to Redis refused: {exc}"
    except Exception as exc:  # Redis or the bundle failed mid-way: say so in the history
        logger.exception("republishing to Redis failed")
        ok, text = False, f"Republish to Redis failed: {exc.__class__.__name__}: {exc}"
    else:
        ok = not outcome["lists"].startswith("failed")
        text = (
            f"Republish of {outcome['version']} to Redis {'done' if ok else 'failed'}: "
            f"lists {outcome['lists']}; features {outcome['features']}"
        )
    version = ModelVersion.objects.filter(pk=version_id).first()
    if version is not None:
        LogEntry.objects.log_actions(
            user_id=user_id,
            queryset=[version],
            action_flag=CHANGE,
            change_message=text,
            single_object=True,
        )
    return ok, text


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
    Stage.EVALUATE: stage_evaluate,
}


# --- run bookkeeping ---------------------------------------------------------------------------

# A running pipeline stage refreshes its heartbeat every STAGE_HEARTBEAT_SECONDS; one silent for
# STAGE_OWNER_STALE_SECONDS (six missed beats) is presumed dead and may be taken over. On the
# owner's own host a vanished process is recognised at once, so the task of a pool child
# killed by the OOM killer re-runs as soon as Celery redelivers it.
STAGE_HEARTBEAT_SECONDS = 10.0
STAGE_OWNER_STALE_SECONDS = 60.0
# Tests only (tests/pipeline/test_celery_worker.py): "<stage>:<seconds>" pauses the first attempt
# of that stage after its first progress report, so a test can kill a worker in the middle of
# it. Never set it in production.
TEST_PAUSE_ENV = "RECO_TEST_STAGE_PAUSE"


class StepAction(StrEnum):
    """What the caller of ``pipeline_stage_execute`` does next."""

    CONTINUE = "continue"  # the stage is done (now or earlier): go on with the next one
    RETRY = "retry"  # call again after ``retry_in`` seconds (transient error or a live owner)
    STOP = "stop"  # nothing to do: the run is finished or another attempt owns the stage
    FAILED = "failed"  # the stage failed for good and the run is marked failed


@dataclass(frozen=True)
class StageStep:
    """The result of one ``pipeline_stage_execute`` call."""

    action: StepAction
    reason: str
    stage_run_id: int | None = None
    retry_in: float = 0.0


def stage_owner(token: str = "") -> str:
    """Name this attempt: host, process, and the Celery task id (or the thread)."""
    who = token or f"thread-{threading.get_ident()}"
    return f"{socket.gethostname()}:{os.getpid()}:{who}"[:255]


def _pid_gone(pid: int) -> bool:
    """True when no live process on this host has ``pid`` (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, under another user
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def _owner_alive(owner: str, heartbeat_at: Any, now: Any) -> bool:
    """Whether the attempt named ``owner`` may still be running its stage.

    A process that is gone from this host is dead at once. Another host's processes cannot be
    checked, so there only a heartbeat older than STAGE_OWNER_STALE_SECONDS proves death.
    """
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host == socket.gethostname() and pid.isdigit() and _pid_gone(int(pid)):
        return False
    if heartbeat_at is None:
        return False
    return (now - heartbeat_at).total_seconds() < STAGE_OWNER_STALE_SECONDS


class _Heartbeat:
    """Refreshes ``StageRun.heartbeat_at`` from a daemon thread while a stage runs."""

    def __init__(self, stage_run_id: int, owner: str) -> None:
        self.stage_run_id = stage_run_id
        self.owner = owner
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, name=f"stage-heartbeat-{stage_run_id}", daemon=True
        )

    def __enter__(self) -> _Heartbeat:
        from django.db import connection

        # Inside a transaction (a test, a caller's atomic block) no other process can see the
        # row, so nobody could take it over, and a beat would only wait for our own lock.
        if not connection.in_atomic_block:
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _beat(self) -> None:
        from django.db import connections

        try:
            while not self._stop.wait(STAGE_HEARTBEAT_SECONDS):
                try:
                    StageRun.objects.filter(
                        pk=self.stage_run_id, owner=self.owner, status=RunStatus.RUNNING
                    ).update(heartbeat_at=timezone.now())
                except Exception as exc:  # a missed beat only allows a takeover sooner
                    logger.warning("stage heartbeat of #%s failed: %s", self.stage_run_id, exc)
        finally:
            connections.close_all()  # this thread's own connections


def _test_pause(stage_run: StageRun, progress: Progress) -> Progress:
    """Wrap ``progress`` to sleep once after the first report when TEST_PAUSE_ENV names the
    stage and this is its first attempt (the re-run after a crash goes straight through).

    For extraction the first report comes right after the first lake batch is durable and
    before any watermark moves: the worst moment for a crash.
    """
    name, _, seconds = os.environ.get(TEST_PAUSE_ENV, "").partition(":")
    stage = stage_run.stage
    if name != stage or stage_run.attempts > 1:
        return progress
    paused = False

    def report(rows: int) -> None:
        nonlocal paused
        if progress:
            progress(rows)
        if not paused:
            paused = True
            logger.warning("%s: pausing stage %s for %s s", TEST_PAUSE_ENV, stage, seconds)
            time.sleep(float(seconds))

    return report


def _stage_call(stage_run: StageRun, progress: Progress) -> StageOutcome:
    """Run the stage function of a claimed ``StageRun`` (every caller goes through here)."""
    with _Heartbeat(stage_run.pk, stage_run.owner):
        return STAGES[stage_run.stage](stage_run, _test_pause(stage_run, progress))


def _error_text(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}\n\n{''.join(traceback.format_exception(exc, limit=8))}"


def _stage_record_success(
    stage_run: StageRun, outcome: StageOutcome, seconds: float, retries: list[dict[str, Any]]
) -> bool:
    """Mark the stage done, if this attempt still owns it; return whether it did."""
    detail = dict(outcome.detail)
    detail["seconds"] = seconds
    if retries:
        detail["retries"] = retries
    return (
        StageRun.objects.filter(
            pk=stage_run.pk, owner=stage_run.owner, status=RunStatus.RUNNING
        ).update(
            status=RunStatus.SKIPPED if "skipped" in detail else RunStatus.SUCCEEDED,
            finished_at=timezone.now(),
            rows_in=outcome.rows_in,
            rows_out=outcome.rows_out,
            detail=_jsonable(detail),
            error="",
        )
        == 1
    )


def stage_run_execute(*, stage: str, progress: Progress = None) -> StageRun:
    """Run one stage on its own (no pipeline run) with full bookkeeping in a new StageRun row.

    Never raises for a stage failure: the caller reads ``status``/``error`` (a failed stage
    must leave a record an operator can read, not just a traceback in a worker log).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")
    now = timezone.now()
    stage_run = StageRun.objects.create(
        stage=stage,
        status=RunStatus.RUNNING,
        started_at=now,
        owner=stage_owner(),
        heartbeat_at=now,
        attempts=1,
    )
    started = time.perf_counter()
    try:
        outcome = _stage_call(stage_run, progress)
    except Exception as exc:
        logger.exception("stage %s failed", stage)
        StageRun.objects.filter(pk=stage_run.pk).update(
            status=RunStatus.FAILED,
            finished_at=timezone.now(),
            error=_error_text(exc),
            detail={"seconds": round(time.perf_counter() - started, 3)},
        )
    else:
        _stage_record_success(stage_run, outcome, round(time.perf_counter() - started, 3), [])
    stage_run.refresh_from_db()
    return stage_run


def _stage_claim(stage_run: StageRun, owner: str) -> StageStep | None:
    """Make ``owner`` the runner of ``stage_run`` (None), or say why it must not run it now.

    Each claim is one conditional UPDATE on the state just read, so of two deliveries of
    the same stage exactly one runs it.
    """
    for _ in range(3):  # a lost race re-reads the row and decides again
        now = timezone.now()
        status, holder, beat = stage_run.status, stage_run.owner, stage_run.heartbeat_at
        if status in (RunStatus.SUCCEEDED, RunStatus.SKIPPED):
            return StageStep(StepAction.CONTINUE, f"already {status}", stage_run.pk)
        if status == RunStatus.FAILED:
            return StageStep(StepAction.STOP, "the stage already failed", stage_run.pk)
        rows = StageRun.objects.filter(pk=stage_run.pk, status=status, owner=holder)
        if status == RunStatus.RUNNING:
            if _owner_alive(holder, beat, now):
                age = (now - beat).total_seconds() if beat else 0.0
                wait = max(1.0, STAGE_OWNER_STALE_SECONDS - age)
                return StageStep(
                    StepAction.RETRY, f"running in {holder}", stage_run.pk, round(wait, 1)
                )
            rows = rows.filter(heartbeat_at=beat)
        claimed = rows.update(
            status=RunStatus.RUNNING,
            owner=owner,
            heartbeat_at=now,
            started_at=now,
            finished_at=None,
            attempts=F("attempts") + 1,
        )
        if claimed:
            if status == RunStatus.RUNNING:
                logger.warning(
                    "stage %s #%s: taking over from %s, which shows no sign of life",
                    stage_run.stage,
                    stage_run.pk,
                    holder,
                )
                # The dead attempt's extraction lock would block this attempt until its lease
                # expires. Freeing it is safe: the next holder gets a newer fencing token, so
                # the lake and the watermarks refuse anything the old attempt might still write.
                ExtractionLock.objects.filter(holder__endswith=f":stage{stage_run.pk}").update(
                    holder="", expires_at=None
                )
            stage_run.refresh_from_db()
            return None
        stage_run.refresh_from_db()
    return StageStep(StepAction.RETRY, "lost the race to claim the stage", stage_run.pk, 1.0)


def _stage_failed(
    stage_run: StageRun,
    exc: Exception,
    seconds: float,
    retries: list[dict[str, Any]],
    policy: errors.RetryPolicy,
) -> StageStep:
    """Record a failed attempt: back to pending for a retry if transient, else fail the run."""
    mine = StageRun.objects.filter(pk=stage_run.pk, owner=stage_run.owner, status=RunStatus.RUNNING)
    if errors.is_transient(exc) and len(retries) < policy.max_retries:
        retry_in = policy.delay(len(retries))
        retries = [
            *retries,
            {
                "at": timezone.now().isoformat(),
                "error": f"{exc.__class__.__name__}: {exc}"[:500],
                "retry_in": retry_in,
            },
        ]
        logger.warning(
            "stage %s #%s: transient %s, retry %d of %d in %.1f s",
            stage_run.stage,
            stage_run.pk,
            exc.__class__.__name__,
            len(retries),
            policy.max_retries,
            retry_in,
        )
        if not mine.update(
            status=RunStatus.PENDING,
            owner="",
            heartbeat_at=None,
            error=_error_text(exc),
            detail=_jsonable({"retries": retries, "seconds": seconds}),
        ):
            return StageStep(StepAction.STOP, "another attempt took the stage over", stage_run.pk)
        reason = f"transient error, retry {len(retries)} of {policy.max_retries}"
        return StageStep(StepAction.RETRY, reason, stage_run.pk, retry_in)
    logger.error("stage %s #%s failed", stage_run.stage, stage_run.pk, exc_info=exc)
    error = _error_text(exc)
    detail: dict[str, Any] = {"seconds": seconds, **({"retries": retries} if retries else {})}
    reason = f"stage {stage_run.stage} failed: {error.splitlines()[0]}"
    now = timezone.now()
    with transaction.atomic():
        if not mine.update(
            status=RunStatus.FAILED, finished_at=now, error=error, detail=_jsonable(detail)
        ):
            return StageStep(StepAction.STOP, "another attempt took the stage over", stage_run.pk)
        PipelineRun.objects.filter(pk=stage_run.pipeline_run_id, status=RunStatus.RUNNING).update(
            status=RunStatus.FAILED, finished_at=now, error=reason
        )
    return StageStep(StepAction.FAILED, reason, stage_run.pk)


def pipeline_stage_execute(
    *,
    run_id: int,
    stage: str,
    owner_token: str = "",
    progress: Progress = None,
    policy: errors.RetryPolicy = errors.STAGE_RETRY,
) -> StageStep:
    """Run one stage of a pipeline run, at most once in effect however often it is called.

    The one step shared by the Celery chain (a task per stage) and the in-process loop of
    ``pipeline_run_execute``. A call:

    - claims the run if it is still pending; a missing or finished run is a silent STOP;
    - finds or creates the run's single StageRun row for ``stage``;
    - returns CONTINUE without running anything if the stage already succeeded (a
      redelivered task just passes the chain on);
    - returns RETRY if a live owner is running the stage, and takes it over if that owner
      is dead (extraction is fenced by lock tokens and compare-and-set watermarks, so the
      re-run cannot double-apply what the dead attempt wrote);
    - runs it: a transient error (``errors.is_transient``) puts the stage back to pending and
      returns RETRY with exponential backoff, at most ``policy.max_retries`` times; any other
      error marks the stage and the run failed at once (FAILED).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")
    PipelineRun.objects.filter(pk=run_id, status=RunStatus.PENDING).update(
        status=RunStatus.RUNNING, started_at=timezone.now()
    )
    status = PipelineRun.objects.filter(pk=run_id).values_list("status", flat=True).first()
    if status is None:
        return StageStep(StepAction.STOP, f"pipeline run #{run_id} does not exist")
    if status != RunStatus.RUNNING:
        return StageStep(StepAction.STOP, f"pipeline run #{run_id} is already {status}")
    stage_run, _ = StageRun.objects.get_or_create(pipeline_run_id=run_id, stage=stage)
    refused = _stage_claim(stage_run, stage_owner(owner_token))
    if refused is not None:
        return refused
    retries = list((stage_run.detail or {}).get("retries", []))
    started = time.perf_counter()
    try:
        outcome = _stage_call(stage_run, progress)
    except Exception as exc:
        return _stage_failed(
            stage_run, exc, round(time.perf_counter() - started, 3), retries, policy
        )
    if not _stage_record_success(
        stage_run, outcome, round(time.perf_counter() - started, 3), retries
    ):
        return StageStep(StepAction.STOP, "another attempt took the stage over", stage_run.pk)
    return StageStep(StepAction.CONTINUE, "done", stage_run.pk)


def pipeline_run_create(*, kind: str = "incremental", triggered_by: str = "manual") -> PipelineRun:
    """Record a pending pipeline run (the task or command executes it)."""
    return PipelineRun.objects.create(kind=kind, triggered_by=triggered_by[:64])


def pipeline_run_stages(run: PipelineRun) -> tuple[str, ...]:
    """The stages a run of this kind executes, in order."""
    return FULL_STAGES if run.kind == "full" else PIPELINE_STAGES


def pipeline_run_start(*, run_id: int) -> tuple[str, ...] | None:
    """Claim a pending run for a chain of stage tasks; return its stages, or None.

    A redelivered start finds the run already claimed: it returns the stages again only while
    no stage has begun (the first delivery may have died before publishing the chain; the
    stages are idempotent, so a second chain is harmless).
    """
    claimed = PipelineRun.objects.filter(pk=run_id, status=RunStatus.PENDING).update(
        status=RunStatus.RUNNING, started_at=timezone.now()
    )
    run = PipelineRun.objects.filter(pk=run_id).first()
    if run is None:
        return None
    if not claimed and (run.status != RunStatus.RUNNING or run.stages.exists()):
        return None
    return pipeline_run_stages(run)


def pipeline_run_finish(*, run_id: int, stages: tuple[str, ...] | list[str]) -> PipelineRun | None:
    """Set a run's final status from its stages; idempotent.

    Succeeded when every one of ``stages`` succeeded (or was skipped), failed (naming the
    stage) when one failed; a run with stages still to do is left as it is.
    """
    run = PipelineRun.objects.filter(pk=run_id).first()
    if run is None:
        return None
    rows = {s.stage: s for s in run.stages.all()}
    done = (RunStatus.SUCCEEDED, RunStatus.SKIPPED)
    failed = next(
        (rows[s] for s in stages if s in rows and rows[s].status == RunStatus.FAILED), None
    )
    if failed is not None:
        PipelineRun.objects.filter(
            pk=run_id, status__in=(RunStatus.PENDING, RunStatus.RUNNING)
        ).update(
            status=RunStatus.FAILED,
            finished_at=timezone.now(),
            error=f"stage {failed.stage} failed: {failed.error.splitlines()[0]}",
        )
    elif all(s in rows and rows[s].status in done for s in stages):
        PipelineRun.objects.filter(pk=run_id, status=RunStatus.RUNNING).update(
            status=RunStatus.SUCCEEDED, finished_at=timezone.now(), error=""
        )
    run.refresh_from_db()
    return run


def pipeline_run_execute(
    *,
    run_id: int,
    stages: tuple[str, ...] | None = None,
    on_stage: Callable[[str], Progress] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> PipelineRun | None:
    """Claim a pending run and execute its stages in this process, stopping at the first failure.

    The in-process twin of the Celery chain (``manage.py run_pipeline``, eager mode): the same
    ``pipeline_stage_execute`` step, with retries slept here instead of scheduled by Celery.
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
        stages = pipeline_run_stages(run)
    for stage in stages:
        progress = on_stage(stage) if on_stage else None
        step = pipeline_stage_execute(run_id=run_id, stage=stage, progress=progress)
        while step.action == StepAction.RETRY:
            sleep(step.retry_in)
            step = pipeline_stage_execute(run_id=run_id, stage=stage, progress=progress)
        if step.action != StepAction.CONTINUE:
            break
    return pipeline_run_finish(run_id=run_id, stages=stages)


SCHEDULED_SKIPPED = "skipped: a run of this kind is already pending or running"
# A run in one of these states blocks a new run of its kind (pending: its task is queued).
ACTIVE_STATUSES = (RunStatus.PENDING, RunStatus.RUNNING)


def pipeline_run_trigger(
    *, kind: str, triggered_by: str, trigger_id: str = ""
) -> PipelineRun | None:
    """Create a pending run of ``kind`` unless one is pending or running; None if one is.

    Atomic across processes and hosts, so any number of simultaneous triggers (two beats, a
    task delivered twice, five at once) create one run. The check and the insert run in one
    transaction that first *writes* the kind's ``PipelineTriggerLock`` row: on MariaDB and
    PostgreSQL the UPDATE holds the row lock until commit and the next trigger waits for it
    (READ COMMITTED: it then sees the new run); on SQLite the first write takes the database's
    write lock before anything is read, so no snapshot can be stale. (``select_for_update``
    would not do on SQLite, where it is a no-op and a read-then-write transaction fails with
    "database is locked" instead of waiting.) The caller enqueues the run after this returns,
    that is after the commit.

    ``trigger_id`` (a Celery task id) identifies the trigger. The same trigger delivered again
    (its worker died after the commit, perhaps before the run's chain was published) gets its
    run back while that is still pending or running, for the caller to start if nothing did;
    never a second run, and never a skip that would leave its own run pending for ever.
    """
    PipelineTriggerLock.objects.get_or_create(kind=kind)  # its own commit: locked below
    with transaction.atomic():
        locks = PipelineTriggerLock.objects.filter(kind=kind)
        locks.update(triggered_at=timezone.now(), triggers=F("triggers") + 1)
        lock = locks.get()
        if trigger_id and lock.last_trigger_id == trigger_id:
            active = PipelineRun.objects.filter(pk=lock.last_run_id, status__in=ACTIVE_STATUSES)
            return active.first()
        if PipelineRun.objects.filter(kind=kind, status__in=ACTIVE_STATUSES).exists():
            locks.update(skipped=F("skipped") + 1)
            return None
        run = pipeline_run_create(kind=kind, triggered_by=triggered_by)
        locks.update(last_run_id=run.pk, last_trigger_id=trigger_id[:255])
    return run


def pipeline_run_active(*, kind: str) -> PipelineRun | None:
    """The oldest pending or running run of ``kind``, if any."""
    return PipelineRun.objects.filter(kind=kind, status__in=ACTIVE_STATUSES).order_by("pk").first()


def pipeline_run_create_scheduled(*, kind: str, trigger_id: str = "") -> PipelineRun | None:
    """Record a pending run of ``kind`` for beat, unless one of that kind is pending or running."""
    return pipeline_run_trigger(kind=kind, triggered_by="beat", trigger_id=trigger_id)


def pipeline_run_scheduled(*, kind: str) -> str | None:
    """Run a scheduled run of ``kind`` in this process unless one of that kind is active."""
    run = pipeline_run_create_scheduled(kind=kind)
    if run is None:
        return SCHEDULED_SKIPPED
    result = pipeline_run_execute(run_id=run.pk)
    return result.status if result else None


def pipeline_run_reap_stale(*, stale_seconds: float, now: Any = None) -> list[int]:
    """Fail the runs that can no longer finish, so they stop blocking their kind; their ids.

    A run's chain lives in the broker; if it is lost (a broker without persistence restarted,
    a task dropped by hand) the run would stay ``running`` or ``pending`` for ever and every
    later trigger of its kind would be skipped. A running run is stale when nothing about it
    moved for ``stale_seconds``: its start, and every stage's start, heartbeat and finish (a
    live stage beats every STAGE_HEARTBEAT_SECONDS). A pending run is stale when it was created
    that long ago and never started. ``stale_seconds`` must exceed the broker's visibility
    timeout: until then a task of the run may still be delivered again and carry it on.
    Each run is failed with a conditional UPDATE, so a run that just came back to life is left.
    """
    now = now or timezone.now()
    cutoff = now - dt.timedelta(seconds=stale_seconds)
    reaped: list[int] = []
    for run in PipelineRun.objects.filter(status=RunStatus.PENDING, created_at__lt=cutoff):
        if run.stages.exists():
            continue
        failed = PipelineRun.objects.filter(pk=run.pk, status=RunStatus.PENDING).update(
            status=RunStatus.FAILED,
            finished_at=now,
            error=f"reaped: pending since {run.created_at.isoformat()}, never started",
        )
        reaped += [run.pk] if failed else []
    running = PipelineRun.objects.filter(status=RunStatus.RUNNING).prefetch_related("stages")
    for run in running:
        stamps = [run.started_at or run.created_at]
        for stage in run.stages.all():
            stamps += [stage.started_at, stage.heartbeat_at, stage.finished_at]
        last = max(t for t in stamps if t is not None)
        if last >= cutoff:
            continue
        with transaction.atomic():
            if run.stages.filter(heartbeat_at__gte=cutoff).exists():
                continue  # a stage beat since we looked
            error = f"reaped: no sign of life since {last.isoformat()} (its tasks were lost)"
            if not PipelineRun.objects.filter(pk=run.pk, status=RunStatus.RUNNING).update(
                status=RunStatus.FAILED, finished_at=now, error=error
            ):
                continue
            run.stages.filter(status__in=ACTIVE_STATUSES).update(
                status=RunStatus.FAILED, finished_at=now, error=error, owner=""
            )
        logger.warning("pipeline run #%s %s", run.pk, error)
        reaped.append(run.pk)
    return reaped


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
