"""Celery tasks of experiments: thin wrappers that call one service."""

from __future__ import annotations

from datetime import date

from celery import shared_task

from apps.experiments import services


@shared_task(name="experiments.online_report_compute", acks_late=True, reject_on_worker_lost=True)
def online_report_compute_task(day: str | None = None, triggered_by: str = "beat") -> dict:
    """Compute the online evaluation of ``day`` (ISO date). Without a day (the beat's daily
    run): yesterday (UTC), plus the earlier days whose attribution window had not closed when
    they were computed (``services.online_report_daily``).

    Idempotent: a day has one report row, recomputed in place, so a redelivered task only
    redoes the same work.
    """
    if day:
        report = services.online_report_compute(
            day=date.fromisoformat(day), triggered_by=triggered_by
        )
        recomputed = []
    else:
        report, recomputed = services.online_report_daily(triggered_by=triggered_by)
    return {
        "id": report.pk,
        "date": report.date.isoformat(),
        "seconds": report.seconds,
        "recomputed": [r.date.isoformat() for r in recomputed],
    }
