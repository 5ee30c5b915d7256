"""Celery tasks of experiments: thin wrappers that call one service."""

from __future__ import annotations

from datetime import date, timedelta

from celery import shared_task
from django.utils import timezone

from apps.experiments import services


@shared_task(name="experiments.online_report_compute", acks_late=True, reject_on_worker_lost=True)
def online_report_compute_task(day: str | None = None, triggered_by: str = "beat") -> dict:
    """Compute the online evaluation of ``day`` (ISO date; default: yesterday, UTC).

    Idempotent: a day has one report row, recomputed in place, so a redelivered task only
    redoes the same work.
    """
    when = date.fromisoformat(day) if day else timezone.now().date() - timedelta(days=1)
    report = services.online_report_compute(day=when, triggered_by=triggered_by)
    return {"id": report.pk, "date": report.date.isoformat(), "seconds": report.seconds}
