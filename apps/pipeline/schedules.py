"""The pipeline's default schedules, defined in code and stored with django-celery-beat.

Code owns *what* runs and *when* (task, arguments, crontab); the admin owns *whether* it runs
(``PeriodicTask.enabled``): ``schedules_sync`` rewrites everything but ``enabled``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from django.db import transaction
from django_celery_beat.models import CrontabSchedule, PeriodicTask


@dataclass(frozen=True)
class Schedule:
    """One periodic pipeline job."""

    name: str
    task: str
    kwargs: dict
    minute: str
    hour: str
    description: str
    day_of_week: str = "*"


SCHEDULES: tuple[Schedule, ...] = (
    # Every hour at minute 5: extract both sources, map, score quality, clean.
    Schedule(
        "pipeline: incremental",
        "pipeline.pipeline_scheduled",
        {"kind": "incremental"},
        "5",
        "*",
        "Hourly incremental extraction, quality and cleaning.",
    ),
    # Every day at 03:30 UTC: the same plus training, registration and publishing.
    Schedule(
        "pipeline: full retrain",
        "pipeline.pipeline_scheduled",
        {"kind": "full"},
        "30",
        "3",
        "Daily full run: ingest, train, evaluate, register, publish.",
    ),
    # Every 15 minutes: re-score data quality on what was last extracted.
    Schedule(
        "pipeline: quality snapshot",
        "pipeline.stage_run_execute",
        {"stage": "quality"},
        "*/15",
        "*",
        "Quality score every 15 minutes (feeds the quality alert).",
    ),
    # Every 10 minutes: fail runs whose chain was lost (no sign of life for
    # PIPELINE_RUN_STALE_SECONDS), so they stop blocking the next run of their kind.
    Schedule(
        "pipeline: reap stale runs",
        "pipeline.pipeline_run_reap_stale",
        {},
        "*/10",
        "*",
        "Fail pipeline runs stuck in pending/running after their tasks were lost.",
    ),
    # Sundays at 05:00 UTC: the recipe on the stratified protocol of the public benchmarks.
    Schedule(
        "pipeline: stratified evaluation",
        "pipeline.stage_run_execute",
        {"stage": "evaluate"},
        "0",
        "5",
        "Weekly offline evaluation (stratified split) stored as an EvaluationReport.",
        day_of_week="0",
    ),
    # Every day at 00:20 UTC: yesterday's exposures joined to client feedback and to the site's
    # attributed views and orders, by variant, model, scene, channel and position.
    Schedule(
        "experiments: online report",
        "experiments.online_report_compute",
        {},
        "20",
        "0",
        "Daily online evaluation (CTR, CVR, GMV per exposure by variant, model, scene,"
        " channel and position) of the previous UTC day.",
    ),
)


def schedules_sync() -> dict[str, str]:
    """Create or update the beat entries from ``SCHEDULES``; keep each entry's ``enabled``.

    Returns ``{name: "created" | "updated" | "unchanged"}``.
    """
    outcome: dict[str, str] = {}
    with transaction.atomic():
        for spec in SCHEDULES:
            crontab, _ = CrontabSchedule.objects.get_or_create(
                minute=spec.minute,
                hour=spec.hour,
                day_of_week=spec.day_of_week,
                day_of_month="*",
                month_of_year="*",
                timezone="UTC",
            )
            wanted = {
                "task": spec.task,
                "kwargs": json.dumps(spec.kwargs, sort_keys=True),
                "crontab": crontab,
                "description": spec.description,
            }
            task = PeriodicTask.objects.filter(name=spec.name).first()
            if task is None:
                PeriodicTask.objects.create(name=spec.name, enabled=True, **wanted)
                outcome[spec.name] = "created"
                continue
            changed = [k for k, v in wanted.items() if getattr(task, k) != v]
            if changed:
                for key in changed:
                    setattr(task, key, wanted[key])
                task.save()  # a full save also bumps beat's change marker
                outcome[spec.name] = "updated"
            else:
                outcome[spec.name] = "unchanged"
    return outcome
