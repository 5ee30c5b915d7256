"""Registry services: every write to a model version's lifecycle goes through these functions.

Each service runs in one ``transaction.atomic()``, locks the rows it changes with
``select_for_update`` (in primary-key order, so two services never deadlock), and writes one
``ModelAudit`` row whether the request is applied or refused. A refusal raises
``ModelActionRefused`` (``PromotionRefused`` when gates said no) *after* its transaction has
committed the audit row; the registry itself is left exactly as it was. Call these outside
any outer transaction, or a refusal's audit row is rolled back with the caller's.

Which gates run for which change:

- promote (to primary): every gate, with ``PROMOTION_METRIC_TOLERANCES``.
- canary: every gate too, but the offline-metric gate uses the looser
  ``CANARY_METRIC_TOLERANCES``. A canary exists to measure online what offline metrics may
  misjudge, and its exposure is capped at 50% and reversible at once; the looser tolerance
  still stops a model whose offline metrics collapsed.
- shadow: only the safety gates (checksums, feature schema, smoke test). A shadow's output is
  never shown, but it runs inside the serving workers, so it must load and score cleanly.
- rollback: only the checksum gate on the version restored. It was fully gated when it was
  first promoted, and rollback must stay fast; the workers still smoke-test it on load.

Settings read (``settings.RECO``, all optional): ``BUNDLE_LOADER`` (dotted path of a
``load(bundle_dir) -> scorer`` callable; none skips the smoke test), ``SMOKE_P95_MS``,
``SMOKE_SAMPLE_REQUESTS``, ``PROMOTION_METRIC_TOLERANCES``, ``CANARY_METRIC_TOLERANCES``,
``SERVING_FEATURE_SCHEMA`` (a list, or the dotted path of a list or of a callable returning
one; unset means "the current primary's schema"), and for the smoke test's latency check
against the primary (``gates.compare_latency``: the primary's bundle loaded with the same
loader, timed on the same requests): ``GATE_MAX_LATENCY_RATIO`` (default 2.0; None or 0 turns
the check off), ``GATE_LATENCY_SAMPLES`` (200 timed requests per side) and
``GATE_LATENCY_FLOOR_MS`` (0.25: a candidate p95 at or below it is not judged by ratio).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.module_loading import import_string

from apps.models import bundle, gates
from apps.models.choices import AuditAction, AuditOutcome, ModelStatus
from apps.models.gates import GateResult, Loader
from apps.models.models import ModelAudit, ModelVersion
from apps.models.selectors import model_version_rollback_target
from apps.pipeline.conf import reco
from apps.pipeline.models import DataQualityReport

logger = logging.getLogger(__name__)

MAX_CANARY_SHARE = 0.5
MODEL_VERSION_KEY = "reco:model:version"
MODEL_CHANGED_CHANNEL = "reco:model:changed"
# A file a bundle may ship with representative requests (a JSON list of lists of rows).
SMOKE_REQUESTS_FILE = "smoke_requests.json"
# Losses: a rise, not a drop, is a regression.
LOWER_IS_BETTER = frozenset({"logloss", "rmse", "mae"})

DEFAULT_PROMOTION_TOLERANCES = {"ndcg@10": 0.02, "recall@10": 0.02, "auc": 0.01}
DEFAULT_CANARY_TOLERANCES = {"ndcg@10": 0.10, "recall@10": 0.10, "auc": 0.05}
DEFAULT_SMOKE_P95_MS = 100.0
DEFAULT_SMOKE_SAMPLE_REQUESTS = 20
DEFAULT_MAX_LATENCY_RATIO = gates.DEFAULT_MAX_LATENCY_RATIO
DEFAULT_LATENCY_SAMPLES = gates.DEFAULT_LATENCY_SAMPLES
DEFAULT_LATENCY_FLOOR_MS = gates.DEFAULT_LATENCY_FLOOR_MS

SAFETY_GATES = (gates.ARTIFACT_CHECKSUMS, gates.FEATURE_SCHEMA, gates.SMOKE_TEST)


class ModelActionRefused(Exception):
    """A lifecycle request was refused; the registry is unchanged and an audit row says why."""

    def __init__(self, reasons: Sequence[str], results: Sequence[GateResult] = ()) -> None:
        self.reasons = list(reasons)
        self.results = list(results)
        super().__init__("; ".join(self.reasons))


class PromotionRefused(ModelActionRefused):
    """Gates refused a promotion (or a canary or shadow start); ``results`` holds every gate."""

    def __init__(self, results: Sequence[GateResult]) -> None:
        super().__init__([f"{r.name}: {r.reason}" for r in gates.failed(results)], results)


@dataclass(frozen=True)
class Transition:
    """What an applied lifecycle change did: the version changed, the one it replaced (the
    archived primary, for a promotion or rollback), the gates that ran and the audit row."""

    version: ModelVersion
    audit: ModelAudit
    replaced: ModelVersion | None = None
    results: list[GateResult] = field(default_factory=list)


# --- publish hook --------------------------------------------------------------------------------


def on_model_change(*, event: str, version: str) -> int | None:
    """Tell serving workers the registry changed: bump ``reco:model:version`` and publish on
    ``reco:model:changed``. Returns the new counter, or None without Redis (or on failure).

    Runs after commit. It never raises: the change is already durable. Serving workers should
    also poll the counter (or the registry), so a lost message delays a reload, never loses it.
    """
    url = getattr(settings, "REDIS_URL", "")
    if not url:
        return None
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # Short timeouts and no retries: this runs inside an admin request (RELIABILITY.md).
    client = redis.Redis.from_url(
        url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
    )
    try:
        counter = int(client.incr(MODEL_VERSION_KEY))
        message = {"event": event, "version": version, "counter": counter}
        client.publish(MODEL_CHANGED_CHANNEL, json.dumps(message))
        return counter
    except redis.RedisError:
        logger.warning("could not publish model change %s %s", event, version, exc_info=True)
        return None
    finally:
        client.close()


def _publish_after_commit(*, event: str, version: str) -> None:
    # Looked up at call time so tests (and the lead's wiring) can replace on_model_change.
    transaction.on_commit(lambda: on_model_change(event=event, version=version))


# --- helpers -----------------------------------------------------------------------------------


def _option(key: str, default: Any) -> Any:
    return getattr(settings, "RECO", {}).get(key, default)


def _address(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def _audit(
    *,
    version: ModelVersion | None,
    label: str = "",
    action: str,
    actor: str,
    address: str | None,
    outcome: str,
    from_status: str = "",
    to_status: str = "",
    reason: str = "",
    results: Sequence[GateResult] = (),
) -> ModelAudit:
    return ModelAudit.objects.create(
        model_version=version,
        version=(version.version if version is not None else label)[:64],
        action=action,
        actor=(actor or "system")[:150],
        address=_address(address),
        from_status=from_status,
        to_status=to_status,
        outcome=outcome,
        reason=reason,
        gates=[r.to_dict() for r in results],
    )


def _lock(ids: Q) -> list[ModelVersion]:
    """Lock the matching versions, in primary-key order (a fixed order cannot deadlock)."""
    return list(ModelVersion.objects.select_for_update().filter(ids).order_by("pk"))


def _pick(
    rows: Sequence[ModelVersion], *, pk: int | None = None, status: str | None = None
) -> ModelVersion | None:
    for row in rows:
        if (pk is not None and row.pk == pk) or (status is not None and row.status == status):
            return row
    return None


def _resolve_loader(loader: Loader | None) -> Loader | None:
    if loader is not None:
        return loader
    path = _option("BUNDLE_LOADER", None)
    if not path:
        return None
    try:
        return import_string(path)
    except ImportError as exc:
        message = f"RECO['BUNDLE_LOADER']={path!r} cannot be imported: {exc}"

        def broken(_: Path) -> gates.Scorer:
            raise ImproperlyConfigured(message)

        return broken


def _serving_schema(primary: ModelVersion | None) -> list[Any] | None:
    configured = _option("SERVING_FEATURE_SCHEMA", None)
    if isinstance(configured, str):
        configured = import_string(configured)
    if callable(configured):
        configured = configured()
    if configured is not None:
        return list(configured)
    return list(primary.feature_schema) if primary is not None else None


def _sample_requests(version: ModelVersion) -> list[list[dict[str, Any]]]:
    path = Path(version.bundle_path) / SMOKE_REQUESTS_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if isinstance(data, list) and all(isinstance(r, list) for r in data) and data:
            return data
    count = int(_option("SMOKE_SAMPLE_REQUESTS", DEFAULT_SMOKE_SAMPLE_REQUESTS))
    return gates.synthetic_requests(version.feature_schema, requests=count)


def _max_latency_ratio() -> float | None:
    value = _option("GATE_MAX_LATENCY_RATIO", DEFAULT_MAX_LATENCY_RATIO)
    if value is None or float(value) <= 0:
        return None
    return float(value)


def _run_gates(
    version: ModelVersion,
    *,
    primary: ModelVersion | None,
    tolerances: dict[str, float],
    loader: Loader | None,
    only: Collection[str] = gates.ALL_GATES,
) -> list[GateResult]:
    other = primary if primary is not None and primary.pk != version.pk else None
    score = (
        DataQualityReport.objects.filter(pk=version.quality_report_id)
        .values_list("score", flat=True)
        .first()
    )
    load = _resolve_loader(loader)
    return gates.run_gates(
        bundle_dir=Path(version.bundle_path),
        quality_score=score,
        quality_threshold=float(reco("QUALITY_THRESHOLD")),
        candidate_metrics=version.metrics,
        primary_metrics=other.metrics if other is not None else None,
        metric_tolerances=tolerances,
        lower_is_better=LOWER_IS_BETTER,
        model_schema=version.feature_schema,
        serving_schema=_serving_schema(other),
        load=load,
        sample_requests=_sample_requests(version) if load is not None else [],
        p95_budget_ms=float(_option("SMOKE_P95_MS", DEFAULT_SMOKE_P95_MS)),
        expected_version=version.version,
        expected_manifest_sha256=version.manifest_sha256 or None,
        gates=only,
        primary_bundle_dir=Path(other.bundle_path) if other is not None else None,
        max_latency_ratio=_max_latency_ratio(),
        latency_samples=int(_option("GATE_LATENCY_SAMPLES", DEFAULT_LATENCY_SAMPLES)),
        latency_floor_ms=float(_option("GATE_LATENCY_FLOOR_MS", DEFAULT_LATENCY_FLOOR_MS)),
    )


def _save(version: ModelVersion, **changes: Any) -> None:
    for name, value in changes.items():
        setattr(version, name, value)
    version.save(update_fields=list(changes))


# --- services ----------------------------------------------------------------------------------


def _normalise_schema(feature_schema: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for spec in feature_schema:
        if isinstance(spec, str):
            out.append({"name": spec, "dtype": None})
        elif isinstance(spec, dict):
            out.append({"name": str(spec["name"]), "dtype": spec.get("dtype")})
        else:
            out.append({"name": str(spec[0]), "dtype": spec[1] if len(spec) > 1 else None})
    return out


def model_version_register(
    *,
    bundle_path: str | Path,
    version: str,
    metrics: dict[str, Any],
    feature_schema: Sequence[Any],
    mlflow_run_id: str = "",
    quality_report_id: int | None = None,
    actor: str = "system",
    address: str | None = None,
) -> ModelVersion:
    """Record a trained bundle as a candidate, fingerprinting its manifest.

    Refuses (``ModelActionRefused``, audited) an empty or duplicate version string, a metric
    that is NaN or infinite, or a quality report that does not exist. The bundle's contents
    are checked by the gates at promotion, not here.
    """
    problems: list[str] = []
    version = (version or "").strip()
    if not version or len(version) > 64:
        problems.append("the version string must be 1 to 64 characters")
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        problems.append(f"metrics are not finite numbers: {', '.join(sorted(bad))}")
    try:
        schema = _normalise_schema(feature_schema)
    except (KeyError, IndexError, TypeError):
        schema = []
        problems.append("the feature schema must list names or {name, dtype} mappings")
    with transaction.atomic():
        if version and ModelVersion.objects.filter(version=version).exists():
            problems.append(f"version {version!r} is already registered")
        if (
            quality_report_id is not None
            and not DataQualityReport.objects.filter(pk=quality_report_id).exists()
        ):
            problems.append(f"data-quality report #{quality_report_id} does not exist")
        if problems:
            _audit(
                version=None,
                label=version,
                action=AuditAction.REGISTER,
                actor=actor,
                address=address,
                outcome=AuditOutcome.REFUSED,
                to_status=ModelStatus.CANDIDATE,
                reason="; ".join(problems),
            )
            registered = None
        else:
            registered = ModelVersion.objects.create(
                version=version,
                status=ModelStatus.CANDIDATE,
                bundle_path=str(bundle_path),
                mlflow_run_id=mlflow_run_id or "",
                metrics=dict(metrics),
                feature_schema=schema,
                quality_report_id=quality_report_id,
                manifest_sha256=bundle.manifest_sha256(bundle_path),
            )
            _audit(
                version=registered,
                action=AuditAction.REGISTER,
                actor=actor,
                address=address,
                outcome=AuditOutcome.APPLIED,
                to_status=ModelStatus.CANDIDATE,
                reason=f"registered from {bundle_path}",
            )
    if registered is None:
        raise ModelActionRefused(problems)
    return registered


def model_version_promote(
    *,
    version_id: int,
    actor: str,
    address: str | None = None,
    reason: str = "",
    loader: Loader | None = None,
) -> Transition:
    """Make a version the primary after every gate passes; archive the previous primary.

    The promoted version gets ``traffic_share`` 1.0 and ``promoted_at`` now; the old primary
    becomes archived (``archived_at`` now) and is what a rollback restores. Serving workers
    are told after commit. Raises ``PromotionRefused`` listing each failed gate's reason, or
    ``ModelActionRefused`` when the version cannot be promoted from its status.
    """
    refusal: ModelActionRefused | None = None
    with transaction.atomic():
        rows = _lock(Q(pk=version_id) | Q(status=ModelStatus.PRIMARY))
        version = _pick(rows, pk=version_id)
        primary = _pick(rows, status=ModelStatus.PRIMARY)
        results: list[GateResult] = []
        if version is None:
            refusal = ModelActionRefused([f"model version #{version_id} does not exist"])
        elif version.status == ModelStatus.PRIMARY:
            refusal = ModelActionRefused([f"{version.version} is already the primary"])
        elif version.status == ModelStatus.REJECTED:
            refusal = ModelActionRefused([f"{version.version} was rejected"])
        else:
            tolerances = _option("PROMOTION_METRIC_TOLERANCES", DEFAULT_PROMOTION_TOLERANCES)
            results = _run_gates(version, primary=primary, tolerances=tolerances, loader=loader)
            if gates.failed(results):
                refusal = PromotionRefused(results)
        if refusal is not None:
            _audit(
                version=version,
                label=f"#{version_id}",
                action=AuditAction.PROMOTE,
                actor=actor,
                address=address,
                outcome=AuditOutcome.REFUSED,
                from_status=version.status if version else "",
                to_status=ModelStatus.PRIMARY,
                reason="; ".join(refusal.reasons),
                results=results,
            )
        else:
            assert version is not None
            now = timezone.now()
            from_status = version.status
            if primary is not None:
                # Archive first: the partial unique index allows one primary per statement.
                _save(primary, status=ModelStatus.ARCHIVED, traffic_share=0.0, archived_at=now)
            _save(version, status=ModelStatus.PRIMARY, traffic_share=1.0, promoted_at=now)
            replaced = f"; replaced {primary.version}" if primary is not None else ""
            audit = _audit(
                version=version,
                action=AuditAction.PROMOTE,
                actor=actor,
                address=address,
                outcome=AuditOutcome.APPLIED,
                from_status=from_status,
                to_status=ModelStatus.PRIMARY,
                reason=(reason or "promoted") + replaced,
                results=results,
            )
            _publish_after_commit(event=AuditAction.PROMOTE, version=version.version)
    if refusal is not None:
        raise refusal
    return Transition(version=version, audit=audit, replaced=primary, results=results)


def model_version_start_shadow(
    *,
    version_id: int,
    actor: str,
    address: str | None = None,
    reason: str = "",
    loader: Loader | None = None,
) -> Transition:
    """Run a candidate (or the canary) in shadow: it scores a sample in the background and is
    never shown. Only the safety gates run (checksums, schema, smoke test); one shadow at a
    time. A canary moved to shadow stops receiving traffic."""
    refusal: ModelActionRefused | None = None
    with transaction.atomic():
        rows = _lock(Q(pk=version_id) | Q(status__in=[ModelStatus.PRIMARY, ModelStatus.SHADOW]))
        version = _pick(rows, pk=version_id)
        primary = _pick(rows, status=ModelStatus.PRIMARY)
        shadow = _pick(rows, status=ModelStatus.SHADOW)
        results: list[GateResult] = []
        if version is None:
            refusal = ModelActionRefused([f"model version #{version_id} does not exist"])
        elif version.status not in (ModelStatus.CANDIDATE, ModelStatus.CANARY):
            refusal = ModelActionRefused(
                [
                    f"{version.version} is {version.status}; only a candidate or the canary can shadow"
                ]
            )
        elif shadow is not None:
            refusal = ModelActionRefused(
                [f"{shadow.version} is already the shadow; promote or reject it first"]
            )
        else:
            results = _run_gates(
                version, primary=primary, tolerances={}, loader=loader, only=SAFETY_GATES
            )
            if gates.failed(results):
                refusal = PromotionRefused(results)
        audit = _finish(
            refusal,
            version=version,
            version_id=version_id,
            action=AuditAction.SHADOW,
            to_status=ModelStatus.SHADOW,
            actor=actor,
            address=address,
            reason=reason or "shadow started",
            results=results,
            changes={"status": ModelStatus.SHADOW, "traffic_share": 0.0},
        )
    if refusal is not None:
        raise refusal
    return Transition(version=version, audit=audit, results=results)


def model_version_set_canary(
    *,
    version_id: int,
    share: float,
    actor: str,
    address: str | None = None,
    reason: str = "",
    loader: Loader | None = None,
) -> Transition:
    """Send ``share`` of users (0 < share <= 0.5) to a version; or change the canary's share.

    Every gate runs, with the looser canary metric tolerances (see the module docstring).
    One canary at a time: another version already in canary is a refusal.
    """
    refusal: ModelActionRefused | None = None
    try:
        share = float(share)
    except (TypeError, ValueError):
        share = math.nan
    with transaction.atomic():
        rows = _lock(Q(pk=version_id) | Q(status__in=[ModelStatus.PRIMARY, ModelStatus.CANARY]))
        version = _pick(rows, pk=version_id)
        primary = _pick(rows, status=ModelStatus.PRIMARY)
        canary = _pick(rows, status=ModelStatus.CANARY)
        results: list[GateResult] = []
        if version is None:
            refusal = ModelActionRefused([f"model version #{version_id} does not exist"])
        elif not (0.0 < share <= MAX_CANARY_SHARE):
            refusal = ModelActionRefused(
                [f"canary share must be above 0 and at most {MAX_CANARY_SHARE}, not {share}"]
            )
        elif version.status not in (
            ModelStatus.CANDIDATE,
            ModelStatus.SHADOW,
            ModelStatus.CANARY,
        ):
            refusal = ModelActionRefused(
                [f"{version.version} is {version.status}; only a candidate or shadow can canary"]
            )
        elif canary is not None and canary.pk != version.pk:
            refusal = ModelActionRefused(
                [f"{canary.version} is already the canary; promote, shadow or reject it first"]
            )
        else:
            tolerances = _option("CANARY_METRIC_TOLERANCES", DEFAULT_CANARY_TOLERANCES)
            results = _run_gates(version, primary=primary, tolerances=tolerances, loader=loader)
            if gates.failed(results):
                refusal = PromotionRefused(results)
        audit = _finish(
            refusal,
            version=version,
            version_id=version_id,
            action=AuditAction.CANARY,
            to_status=ModelStatus.CANARY,
            actor=actor,
            address=address,
            reason=reason or f"canary at {share:.0%} of traffic",
            results=results,
            changes={"status": ModelStatus.CANARY, "traffic_share": share},
        )
    if refusal is not None:
        raise refusal
    return Transition(version=version, audit=audit, results=results)


def model_version_rollback(
    *,
    actor: str,
    address: str | None = None,
    reason: str = "",
    expected_primary_id: int | None = None,
) -> Transition:
    """Archive the primary and restore the most recently archived former primary.

    Only the restored bundle's checksums are gated (it passed every gate when first
    promoted; rollback must stay fast). ``expected_primary_id`` makes the rollback
    conditional: if another change made a different version primary meanwhile, it is refused
    rather than undoing that change. Rolling back twice swaps the two versions back.
    """
    refusal: ModelActionRefused | None = None
    results: list[GateResult] = []
    with transaction.atomic():
        target = model_version_rollback_target()
        wanted = Q(status=ModelStatus.PRIMARY)
        if target is not None:
            wanted |= Q(pk=target.pk)
        rows = _lock(wanted)
        primary = _pick(rows, status=ModelStatus.PRIMARY)
        target = _pick(rows, pk=target.pk) if target is not None else None
        if target is not None and model_version_rollback_target() != target:
            # Another change archived a version between the read and the lock.
            refusal = ModelActionRefused(["the registry changed meanwhile; try again"])
        elif primary is None:
            refusal = ModelActionRefused(["there is no primary to roll back"])
        elif expected_primary_id is not None and primary.pk != expected_primary_id:
            refusal = ModelActionRefused(
                [f"the primary changed meanwhile: {primary.version} is the primary now"]
            )
        elif target is None or target.status != ModelStatus.ARCHIVED:
            refusal = ModelActionRefused(
                [f"no earlier primary is archived to roll back to from {primary.version}"]
            )
        else:
            results = gates.run_gates(
                bundle_dir=Path(target.bundle_path),
                quality_score=None,
                quality_threshold=0.0,
                candidate_metrics={},
                primary_metrics=None,
                metric_tolerances={},
                model_schema=[],
                serving_schema=None,
                load=None,
                sample_requests=[],
                p95_budget_ms=0.0,
                expected_version=target.version,
                expected_manifest_sha256=target.manifest_sha256 or None,
                gates=(gates.ARTIFACT_CHECKSUMS,),
            )
            if gates.failed(results):
                refusal = ModelActionRefused(
                    [f"cannot restore {target.version}: {r.reason}" for r in gates.failed(results)],
                    results,
                )
        if refusal is not None:
            _audit(
                version=primary,
                label="-",
                action=AuditAction.ROLLBACK,
                actor=actor,
                address=address,
                outcome=AuditOutcome.REFUSED,
                from_status=primary.status if primary else "",
                to_status=ModelStatus.ARCHIVED,
                reason="; ".join(refusal.reasons),
                results=results,
            )
        else:
            assert primary is not None
            assert target is not None
            now = timezone.now()
            _save(primary, status=ModelStatus.ARCHIVED, traffic_share=0.0, archived_at=now)
            _save(target, status=ModelStatus.PRIMARY, traffic_share=1.0, promoted_at=now)
            audit = _audit(
                version=target,
                action=AuditAction.ROLLBACK,
                actor=actor,
                address=address,
                outcome=AuditOutcome.APPLIED,
                from_status=ModelStatus.ARCHIVED,
                to_status=ModelStatus.PRIMARY,
                reason=(reason or "rolled back") + f"; archived {primary.version}",
                results=results,
            )
            _publish_after_commit(event=AuditAction.ROLLBACK, version=target.version)
    if refusal is not None:
        raise refusal
    return Transition(version=target, audit=audit, replaced=primary, results=results)


def model_version_reject(
    *, version_id: int, actor: str, reason: str, address: str | None = None
) -> Transition:
    """Mark a version as never to be served. Works on candidates, the shadow, the canary (its
    traffic stops) and archived versions (which leaves them out of rollback). The primary
    cannot be rejected: roll back or promote another version first. A reason is required."""
    refusal: ModelActionRefused | None = None
    with transaction.atomic():
        rows = _lock(Q(pk=version_id))
        version = _pick(rows, pk=version_id)
        if version is None:
            refusal = ModelActionRefused([f"model version #{version_id} does not exist"])
        elif not (reason or "").strip():
            refusal = ModelActionRefused(["a reason is required to reject a version"])
        elif version.status == ModelStatus.PRIMARY:
            refusal = ModelActionRefused(
                [f"{version.version} is the primary; roll back or promote another version first"]
            )
        elif version.status == ModelStatus.REJECTED:
            refusal = ModelActionRefused([f"{version.version} is already rejected"])
        audit = _finish(
            refusal,
            version=version,
            version_id=version_id,
            action=AuditAction.REJECT,
            to_status=ModelStatus.REJECTED,
            actor=actor,
            address=address,
            reason=reason,
            results=[],
            changes={"status": ModelStatus.REJECTED, "traffic_share": 0.0},
        )
    if refusal is not None:
        raise refusal
    return Transition(version=version, audit=audit)


def _finish(
    refusal: ModelActionRefused | None,
    *,
    version: ModelVersion | None,
    version_id: int,
    action: str,
    to_status: str,
    actor: str,
    address: str | None,
    reason: str,
    results: Sequence[GateResult],
    changes: dict[str, Any],
) -> ModelAudit:
    """Write the refused audit row, or apply ``changes``, audit them and schedule a publish."""
    from_status = version.status if version is not None else ""
    if refusal is not None:
        return _audit(
            version=version,
            label=f"#{version_id}",
            action=action,
            actor=actor,
            address=address,
            outcome=AuditOutcome.REFUSED,
            from_status=from_status,
            to_status=to_status,
            reason="; ".join(refusal.reasons),
            results=results,
        )
    assert version is not None
    _save(version, **changes)
    audit = _audit(
        version=version,
        action=action,
        actor=actor,
        address=address,
        outcome=AuditOutcome.APPLIED,
        from_status=from_status,
        to_status=to_status,
        reason=reason,
        results=results,
    )
    _publish_after_commit(event=action, version=version.version)
    return audit
