"""Experiment services: every write to experiments and variants outside the admin's forms.

Each service runs in one ``transaction.atomic()``, locks the experiment rows it changes, and
bumps ``ConfigVersion`` when it changes anything; after commit it also publishes on Redis (when
``REDIS_URL`` is set) so serving workers reload at once instead of at their next poll. A
refusal raises ``ExperimentError`` listing every problem, and nothing is written.

Lifecycle: draft -> running <-> paused -> stopped (see ``choices.ExperimentStatus``). Starting
checks that the variants allocate some traffic and at most 100%, that every ``model_version``
they name is registered and not rejected, that the end is not past, and that no other
experiment is running on the scene.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from apps.experiments import attribution
from apps.experiments.attribution import Interaction
from apps.experiments.bucketing import BUCKETS
from apps.experiments.choices import ExperimentStatus
from apps.experiments.models import ConfigVersion, Experiment, OnlineEvaluationReport, Variant
from apps.experiments.params import ParamsError, clean_params
from apps.experiments.selectors import CONFIG_VERSION_PK
from apps.experiments.yaml_io import (
    MISSING,
    ExperimentsFileError,
    ExperimentSpec,
    VariantSpec,
    parse_experiments_data,
    parse_experiments_yaml,
)

logger = logging.getLogger(__name__)

VERSION_KEY = "reco:experiments:version"
CHANGED_CHANNEL = "reco:experiments:changed"

Status = ExperimentStatus
ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    Status.DRAFT: frozenset({Status.RUNNING, Status.STOPPED}),
    Status.RUNNING: frozenset({Status.PAUSED, Status.STOPPED}),
    Status.PAUSED: frozenset({Status.RUNNING, Status.STOPPED}),
    Status.STOPPED: frozenset(),
}


class ExperimentError(ValueError):
    """A request was refused; nothing changed. ``problems`` names experiment, variant, field."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class ImportReport:
    """What an import did (or, in a dry run, would do), by experiment name."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    version: int | None = None

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated)


# --- publish hook --------------------------------------------------------------------------------


def on_experiments_change(*, event: str, names: Sequence[str], version: int) -> bool:
    """Tell serving workers the experiments changed: set ``reco:experiments:version`` and
    publish on ``reco:experiments:changed``. Returns whether Redis took the message.

    Runs after commit and never raises: the change is durable in the database, and workers
    also poll ``experiments_config_version()``, so a lost message only delays a reload.
    """
    url = getattr(settings, "REDIS_URL", "")
    if not url:
        return False
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # Short timeouts and no retries: this runs inside an admin request.
        client = redis.Redis.from_url(
            url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
        )
        try:
            client.set(VERSION_KEY, version)
            message = {"event": event, "experiments": list(names), "version": version}
            client.publish(CHANGED_CHANNEL, json.dumps(message))
            return True
        finally:
            client.close()
    except Exception:  # never raise after commit, whatever the client does
        logger.warning("could not publish experiments change %s v%s", event, version, exc_info=True)
        return False


def experiments_config_bump(*, event: str, names: Iterable[str] = ()) -> int:
    """Increase the config version (in the caller's transaction) and publish after commit.

    Services call it; the admin calls it after saving a change form or deleting.
    """
    names = list(names)
    with transaction.atomic():
        ConfigVersion.objects.get_or_create(pk=CONFIG_VERSION_PK)
        ConfigVersion.objects.filter(pk=CONFIG_VERSION_PK).update(
            version=F("version") + 1, updated_at=timezone.now()
        )
        version = ConfigVersion.objects.values_list("version", flat=True).get(pk=CONFIG_VERSION_PK)
        # Looked up at call time so tests (and the lead's wiring) can replace the hook.
        transaction.on_commit(
            lambda: on_experiments_change(event=event, names=names, version=version)
        )
    return int(version)


# --- checks --------------------------------------------------------------------------------------


def _where(experiment: str, variant: str | None = None) -> str:
    return f"experiment {experiment!r}" + (f", variant {variant!r}" if variant else "")


def _allocation_problems(name: str, variants: Sequence[VariantSpec]) -> list[str]:
    total = sum(v.allocation for v in variants)
    if total > BUCKETS:
        return [
            f"{_where(name)}, field variants: allocations sum to {total} basis points "
            f"({total / 100:g}%), more than {BUCKETS} (100%)"
        ]
    return []


def _start_problems(
    name: str, variants: Sequence[VariantSpec], *, ends_at: datetime | None, now: datetime
) -> list[str]:
    """What stops an experiment from running with these variants."""
    problems = _allocation_problems(name, variants)
    if sum(v.allocation for v in variants) == 0:
        problems.append(f"{_where(name)}, field variants: no variant has an allocation above 0")
    if ends_at is not None and ends_at <= now:
        problems.append(f"{_where(name)}, field ends_at: {ends_at.isoformat()} is already past")
    wanted = {v.params["model_version"]: v.name for v in variants if v.params.get("model_version")}
    if wanted:
        from apps.models.choices import ModelStatus
        from apps.models.models import ModelVersion

        known = set(
            ModelVersion.objects.filter(version__in=wanted)
            .exclude(status=ModelStatus.REJECTED)
            .values_list("version", flat=True)
        )
        problems.extend(
            f"{_where(name, variant)}, field params.model_version: {version!r} is not a "
            "registered (non-rejected) model version"
            for version, variant in sorted(wanted.items())
            if version not in known
        )
    return problems


def _transition_problem(name: str, current: str, target: str) -> str | None:
    if target == current or target in ALLOWED_TRANSITIONS[current]:
        return None
    return f"{_where(name)}, field status: cannot go from {current} to {target}"


def _specs(variants: Iterable[Variant]) -> tuple[VariantSpec, ...]:
    return tuple(
        VariantSpec(name=v.name, allocation=v.allocation, params=v.params) for v in variants
    )


def _ordered_variants(experiment: Experiment) -> list[Variant]:
    return list(Variant.objects.filter(experiment=experiment).order_by("position", "name"))


def _lock(experiment_id: int) -> Experiment:
    experiment = Experiment.objects.select_for_update().filter(pk=experiment_id).first()
    if experiment is None:
        raise ExperimentError([f"experiment #{experiment_id} does not exist"])
    return experiment


def _running_on(scene: str, *, besides: int | None) -> Experiment | None:
    others = Experiment.objects.select_for_update().filter(scene=scene, status=Status.RUNNING)
    return others.exclude(pk=besides).first() if besides else others.first()


def _set_status(experiment: Experiment, status: str, now: datetime) -> None:
    experiment.status = status
    if status == Status.RUNNING and experiment.starts_at is None:
        experiment.starts_at = now
    if status == Status.STOPPED:
        ended = experiment.ends_at is not None and experiment.ends_at <= now
        never_started = experiment.starts_at is not None and experiment.starts_at >= now
        if not ended and not never_started:
            experiment.ends_at = now


# --- lifecycle -----------------------------------------------------------------------------------


def experiment_create(
    *,
    name: str,
    scene: str,
    description: str = "",
    salt: str = "",
    starts_at: datetime | None = None,
    ends_at: datetime | None = None,
    variants: Sequence[Mapping[str, Any]] = (),
) -> Experiment:
    """Create a draft experiment with its variants (``{"name", "allocation", "params"}``,
    allocation in basis points). The salt defaults to the name."""
    data: dict[str, Any] = {
        "name": name,
        "scene": scene,
        "status": Status.DRAFT,
        "description": description,
        "starts_at": starts_at,
        "ends_at": ends_at,
        "variants": [dict(v) for v in variants],
    }
    if salt:
        data["salt"] = salt
    try:
        [spec] = parse_experiments_data({"experiments": [data]})
    except ExperimentsFileError as exc:
        raise ExperimentError(exc.problems) from exc
    with transaction.atomic():
        if Experiment.objects.filter(name=name).exists():
            raise ExperimentError([f"{_where(name)}, field name: an experiment has this name"])
        experiment = _apply_fields(spec, None)
        assert spec.variants is not MISSING
        _sync_variants(experiment, [], spec.variants)
        experiments_config_bump(event="create", names=[name])
    return experiment


def _change_status(experiment_id: int, target: str, event: str) -> Experiment:
    now = timezone.now()
    with transaction.atomic():
        experiment = _lock(experiment_id)
        problem = _transition_problem(experiment.name, experiment.status, target)
        if problem is not None:
            raise ExperimentError([problem])
        if experiment.status == target:
            return experiment  # already there: safe to call twice
        if target == Status.RUNNING:
            variants = _specs(_ordered_variants(experiment))
            problems = _start_problems(
                experiment.name, variants, ends_at=experiment.ends_at, now=now
            )
            other = _running_on(experiment.scene, besides=experiment.pk)
            if other is not None:
                problems.append(
                    f"{_where(experiment.name)}, field scene: {other.name!r} is already running "
                    f"on {experiment.scene}; stop or pause it first"
                )
            if problems:
                raise ExperimentError(problems)
        _set_status(experiment, target, now)
        experiment.save(update_fields=["status", "starts_at", "ends_at", "updated_at"])
        experiments_config_bump(event=event, names=[experiment.name])
    return experiment


def experiment_start(*, experiment_id: int) -> Experiment:
    """Run a draft or paused experiment (see the module docstring for the checks)."""
    return _change_status(experiment_id, Status.RUNNING, "start")


def experiment_pause(*, experiment_id: int) -> Experiment:
    """Stop serving a running experiment for now; it can be started again."""
    return _change_status(experiment_id, Status.PAUSED, "pause")


def experiment_stop(*, experiment_id: int) -> Experiment:
    """End an experiment for good (``ends_at`` becomes now if it was open or later)."""
    return _change_status(experiment_id, Status.STOPPED, "stop")


def variant_set_params(*, variant_id: int, params: Any) -> Variant:
    """Replace a variant's parameters with validated, canonical ones."""
    with transaction.atomic():
        variant = (
            Variant.objects.select_related("experiment")
            .select_for_update()
            .filter(pk=variant_id)
            .first()
        )
        if variant is None:
            raise ExperimentError([f"variant #{variant_id} does not exist"])
        where = _where(variant.experiment.name, variant.name)
        try:
            clean = clean_params(params)
        except ParamsError as exc:
            raise ExperimentError([f"{where}, field {p}" for p in exc.problems]) from exc
        if clean != variant.params:
            variant.params = clean
            variant.save(update_fields=["params"])
            experiments_config_bump(event="params", names=[variant.experiment.name])
    return variant


def variant_set_allocation(*, variant_id: int, allocation: int) -> Variant:
    """Change a variant's share (basis points); the experiment's total stays at most 100%."""
    with transaction.atomic():
        variant = Variant.objects.select_related("experiment").filter(pk=variant_id).first()
        if variant is None:
            raise ExperimentError([f"variant #{variant_id} does not exist"])
        experiment = _lock(variant.experiment_id)
        variants = _ordered_variants(experiment)
        where = _where(experiment.name, variant.name)
        if (
            isinstance(allocation, bool)
            or not isinstance(allocation, int)
            or not 0 <= allocation <= BUCKETS
        ):
            raise ExperimentError(
                [f"{where}, field allocation: must be 0..{BUCKETS}, not {allocation!r}"]
            )
        updated = [
            VariantSpec(v.name, allocation if v.pk == variant.pk else v.allocation, v.params)
            for v in variants
        ]
        problems = _allocation_problems(experiment.name, updated)
        if problems:
            raise ExperimentError(problems)
        if variant.allocation != allocation:
            variant.allocation = allocation
            variant.save(update_fields=["allocation"])
            experiments_config_bump(event="allocation", names=[experiment.name])
    return variant


# --- YAML import ---------------------------------------------------------------------------------


def _field_changes(spec: ExperimentSpec, current: Experiment | None) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    defaults = {"salt": spec.name, "description": "", "starts_at": None, "ends_at": None}
    for name in ("scene", "salt", "description", "starts_at", "ends_at"):
        value = getattr(spec, name)
        if value is MISSING:
            if current is not None:
                continue
            value = defaults[name]
        if current is None or getattr(current, name) != value:
            changes[name] = value
    return changes


def _apply_fields(spec: ExperimentSpec, current: Experiment | None) -> Experiment:
    changes = _field_changes(spec, current)
    if current is None:
        return Experiment.objects.create(name=spec.name, status=Status.DRAFT, **changes)
    if changes:
        for name, value in changes.items():
            setattr(current, name, value)
        current.save()
    return current


def _sync_variants(
    experiment: Experiment, current: Sequence[Variant], wanted: Sequence[VariantSpec]
) -> bool:
    """Make the experiment's variants exactly ``wanted`` (in that order); True if it changed."""
    names = {v.name for v in wanted}
    stale = [v.pk for v in current if v.name not in names]
    if stale:
        Variant.objects.filter(pk__in=stale).delete()
    existing = {v.name: v for v in current}
    changed = bool(stale)
    for position, spec in enumerate(wanted):
        variant = existing.get(spec.name)
        if variant is None:
            Variant.objects.create(
                experiment=experiment,
                name=spec.name,
                position=position,
                allocation=spec.allocation,
                params=spec.params,
            )
            changed = True
        elif (variant.position, variant.allocation, variant.params) != (
            position,
            spec.allocation,
            spec.params,
        ):
            variant.position, variant.allocation, variant.params = (
                position,
                spec.allocation,
                spec.params,
            )
            variant.save(update_fields=["position", "allocation", "params"])
            changed = True
    return changed


def experiments_import(*, text: str, dry_run: bool = False) -> ImportReport:
    """Make the database match an experiments file (see ``yaml_io``); idempotent.

    Everything is checked before anything is written, and every problem is reported at once.
    Experiments missing from the file are left alone. ``dry_run`` reports without writing.
    """
    try:
        specs = parse_experiments_yaml(text)
    except ExperimentsFileError as exc:
        raise ExperimentError(exc.problems) from exc
    now = timezone.now()
    report = ImportReport()
    with transaction.atomic():
        names = [s.name for s in specs]
        stored = {e.name: e for e in Experiment.objects.select_for_update().filter(name__in=names)}
        stored_variants: dict[int, list[Variant]] = {e.pk: [] for e in stored.values()}
        for variant in Variant.objects.filter(experiment__in=list(stored.values())).order_by(
            "position", "name"
        ):
            stored_variants[variant.experiment_id].append(variant)
        running: dict[str, str] = dict(
            Experiment.objects.select_for_update()
            .filter(status=Status.RUNNING)
            .exclude(name__in=names)
            .values_list("scene", "name")
        )
        problems: list[str] = []
        plans: list[tuple[ExperimentSpec, Experiment | None, str, bool]] = []
        for spec in specs:
            current = stored.get(spec.name)
            old_variants = stored_variants[current.pk] if current is not None else []
            status_now = current.status if current is not None else Status.DRAFT
            target = spec.status if spec.status is not MISSING else status_now
            transition = _transition_problem(spec.name, status_now, target)
            if transition is not None:
                problems.append(transition)
            fields = _field_changes(spec, current)
            if current is not None and current.status != Status.DRAFT:
                problems.extend(
                    f"{_where(spec.name)}, field {name}: cannot change once the experiment "
                    f"has started (it is {current.status})"
                    for name in ("salt", "scene")
                    if name in fields
                )
            variants = spec.variants if spec.variants is not MISSING else _specs(old_variants)
            variants_changed = spec.variants is not MISSING and _specs(old_variants) != variants
            changed = current is None or bool(fields) or variants_changed or target != status_now
            if target == Status.RUNNING:
                if changed and transition is None:
                    ends_at = fields.get("ends_at", current.ends_at if current else None)
                    problems.extend(_start_problems(spec.name, variants, ends_at=ends_at, now=now))
                if spec.scene in running:
                    problems.append(
                        f"{_where(spec.name)}, field status: {running[spec.scene]!r} is already "
                        f"running on {spec.scene}"
                    )
                running[spec.scene] = spec.name
            else:
                problems.extend(_allocation_problems(spec.name, variants))
            plans.append((spec, current, target, changed))
        if problems:
            raise ExperimentError(problems)
        # Pauses and stops first, so a scene is free before another experiment starts on it.
        outcome: dict[str, list[str]] = {}
        for spec, current, target, changed in sorted(plans, key=lambda p: p[2] == Status.RUNNING):
            if not changed:
                outcome[spec.name] = report.unchanged
                continue
            experiment = _apply_fields(spec, current)
            if spec.variants is not MISSING:
                _sync_variants(experiment, stored_variants.get(experiment.pk, []), spec.variants)
            if target != experiment.status:
                _set_status(experiment, target, now)
                experiment.save(update_fields=["status", "starts_at", "ends_at", "updated_at"])
            outcome[spec.name] = report.updated if current is not None else report.created
        for spec in specs:  # report in file order
            outcome[spec.name].append(spec.name)
        if report.changed:
            version = experiments_config_bump(event="import", names=report.created + report.updated)
            report = ImportReport(
                report.created, report.updated, report.unchanged, None if dry_run else version
            )
        if dry_run:
            # Rolls back every write, and drops the after-commit publish with them.
            transaction.set_rollback(True)
    return report


# --- online evaluation reports -------------------------------------------------------------------


def _item_prices() -> dict[int, float]:
    """Item prices from the clean catalogue (DATA_DIR/clean/items.parquet), for purchases whose
    feedback carries no value; empty when the pipeline has not cleaned anything yet."""
    path = Path(settings.DATA_DIR) / "clean" / "items.parquet"
    if not path.is_file():
        return {}
    import pandas as pd

    frame = pd.read_parquet(path, columns=["item_id", "price"]).dropna()
    return {int(i): float(p) for i, p in zip(frame["item_id"], frame["price"], strict=True)}


def online_attribution_window() -> timedelta:
    """How long after an exposure an interaction is credited to it (RECO
    ``ONLINE_ATTRIBUTION_HOURS``, default 24)."""
    hours = float(getattr(settings, "RECO", {}).get("ONLINE_ATTRIBUTION_HOURS", 24))
    if hours <= 0:
        raise ExperimentError([f"RECO ONLINE_ATTRIBUTION_HOURS must be above 0, not {hours:g}"])
    return timedelta(hours=hours)


def online_promotion_span() -> timedelta:
    """The longest window compared on each side of a promotion (RECO
    ``ONLINE_PROMOTION_WINDOW_DAYS``, default 7)."""
    days = float(getattr(settings, "RECO", {}).get("ONLINE_PROMOTION_WINDOW_DAYS", 7))
    if days <= 0:
        raise ExperimentError([f"RECO ONLINE_PROMOTION_WINDOW_DAYS must be above 0, not {days:g}"])
    return timedelta(days=days)


def _clean_interactions(
    *, since: datetime, until: datetime
) -> tuple[list[Interaction], datetime | None]:
    """The clean interactions that can be credited to an exposure, ``since <= ts < until``,
    and when the clean stage last wrote them (None before the pipeline cleaned anything).

    Reads only the needed columns and row groups of DATA_DIR/clean/interactions.parquet (the
    clean stage's output, as ``apps.pipeline.frames.write_frames`` writes it).
    """
    path = Path(settings.DATA_DIR) / "clean" / "interactions.parquet"
    if not path.is_file():
        return [], None
    import pandas as pd
    import pyarrow.parquet as pq

    as_of = datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)
    present = set(pq.read_schema(path).names)
    wanted = ("user_id", "visitor_id", "item_id", "event", "ts", "value", "quantity")
    frame = pd.read_parquet(
        path,
        columns=[c for c in wanted if c in present],
        filters=[
            ("ts", ">=", since),
            ("ts", "<", until),
            ("event", "in", sorted(attribution.EVENT_KINDS)),
        ],
    )
    return attribution.interactions_from_frame(frame, since=since, until=until), as_of


def _promotion_comparison(
    *, now: datetime, window: timedelta, prices: dict[int, float]
) -> dict[str, Any] | None:
    """Before/after the current primary's promotion (``attribution.compare_promotion``); None
    without a promoted primary."""
    from apps.models.selectors import model_version_primary
    from apps.serving.exposure import default_path

    primary = model_version_primary()
    if primary is None or primary.promoted_at is None:
        return None
    span = online_promotion_span()
    promoted = primary.promoted_at
    # Once both windows have their full span the comparison no longer changes: reuse the last
    # one stored rather than read two spans of logs again every day.
    for stored in OnlineEvaluationReport.objects.order_by("-computed_at").values_list(
        "results", flat=True
    )[:3]:
        found = (stored or {}).get("promotion") or {}
        if (
            found.get("status") == "ready"
            and found.get("model_version") == primary.version
            and found.get("promoted_at") == promoted.isoformat()
            and found.get("hours") == span.total_seconds() / 3600
        ):
            return found
    interactions, _ = _clean_interactions(
        since=promoted - span, until=min(promoted + span + window, now)
    )
    return attribution.compare_promotion(
        default_path(),
        promoted_at=promoted,
        now=now,
        span=span,
        interactions=interactions,
        window=window,
        prices=prices,
        model_version=primary.version,
    )


def online_report_json_path(day: date) -> Path:
    """Where a day's online evaluation is written as JSON: DATA_DIR/evaluation/."""
    return Path(settings.DATA_DIR) / "evaluation" / f"online-{day.isoformat()}.json"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write via a temporary file and a rename, so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)


_COMPUTE = object()


def online_report_compute(
    *,
    day: date,
    triggered_by: str = "beat",
    now: datetime | None = None,
    promotion: Any = _COMPUTE,
) -> OnlineEvaluationReport:
    """Evaluate one UTC day of exposures and store it as that day's ``OnlineEvaluationReport``
    (replacing an earlier computation of the day) and as DATA_DIR/evaluation/online-<day>.json.

    Outcomes come from the feedback log (joined by request id) and from the clean interactions
    attributed by last touch within ``online_attribution_window()``
    (``apps.experiments.attribution``), broken down by day, scene, channel, position bucket,
    variant and model version; the report also compares equal windows before and after the
    current primary's promotion. ``results["by_variant"]`` and ``["by_model_version"]`` keep
    the feedback basis, as reports always had.

    Safe to run twice. A day still running is evaluated up to ``now``; a future day is refused
    with ``ExperimentError``. Feedback is read up to 24 hours past the day and interactions up
    to the attribution window past it, so recomputing a day later (``online_report_daily`` does)
    counts what happened after midnight; ``summary["attribution"]["complete"]`` says whether
    the clean interactions already covered the whole window when it was computed.
    ``promotion`` passes a comparison computed already (it depends on ``now``, not the day).
    """
    from apps.serving.exposure import default_path

    now = now or timezone.now()
    start = datetime.combine(day, dt_time.min, tzinfo=UTC)
    if start >= now:
        raise ExperimentError([f"online report: {day.isoformat()} has not started yet (UTC)"])
    end = min(start + timedelta(days=1), now)
    window = online_attribution_window()
    began = time.perf_counter()
    prices = _item_prices()
    interactions, as_of = _clean_interactions(since=start, until=end + window)
    result = attribution.evaluate_grouped(
        default_path(),
        start=start,
        end=end,
        interactions=interactions,
        window=window,
        prices=prices,
    )
    data = result.to_dict()
    if promotion is _COMPUTE:
        promotion = _promotion_comparison(now=now, window=window, prices=prices)
    settled = start + timedelta(days=1) + window
    results = {
        "by_variant": data["breakdown"][attribution.FEEDBACK]["variant"],
        "by_model_version": data["breakdown"][attribution.FEEDBACK]["model_version"],
        "totals": data["totals"],
        "breakdown": data["breakdown"],
        "promotion": promotion,
    }
    summary = {
        "feedback": data["feedback"],
        "logs": data["logs"],
        "attribution": {
            **data["attribution"],
            "model": data["attribution_model"],
            "window_hours": data["window_hours"],
            "interactions_as_of": as_of.isoformat() if as_of else None,
            "complete_after": settled.isoformat(),
            "complete": as_of is not None and as_of >= settled,
        },
    }
    seconds = round(time.perf_counter() - began, 3)
    with transaction.atomic():
        report, _ = OnlineEvaluationReport.objects.update_or_create(
            date=day,
            defaults={
                "window_start": start,
                "window_end": end,
                "computed_at": now,
                "results": results,
                "summary": summary,
                "seconds": seconds,
                "triggered_by": triggered_by[:64],
            },
        )
    _write_json(
        online_report_json_path(day),
        {
            "date": day.isoformat(),
            "window_start": start.isoformat(),
            "window_end": end.isoformat(),
            "computed_at": now.isoformat(),
            "triggered_by": report.triggered_by,
            "seconds": seconds,
            "results": results,
            "summary": summary,
        },
    )
    return report


def online_report_daily(
    *, triggered_by: str = "beat", now: datetime | None = None
) -> tuple[OnlineEvaluationReport, list[OnlineEvaluationReport]]:
    """Yesterday's report (UTC), plus a recomputation of each earlier report whose attribution
    window had not closed (``summary["attribution"]["complete"]`` false) when it was computed,
    as far back as the window reaches. Returns (yesterday's, the recomputed ones).

    Safe to run twice: each day is recomputed in place.
    """
    now = now or timezone.now()
    yesterday = now.date() - timedelta(days=1)
    report = online_report_compute(day=yesterday, triggered_by=triggered_by, now=now)
    reach = math.ceil(online_attribution_window() / timedelta(days=1)) + 1
    earlier = OnlineEvaluationReport.objects.filter(
        date__gte=yesterday - timedelta(days=reach), date__lt=yesterday
    ).order_by("date")
    recomputed = [
        online_report_compute(
            day=old.date,
            triggered_by=triggered_by,
            now=now,
            promotion=report.results.get("promotion"),
        )
        for old in earlier
        if not ((old.summary or {}).get("attribution") or {}).get("complete")
    ]
    return report, recomputed
