"""Celery tasks: thin wrappers that take ids and call one service.

They are safe to run twice: ``pipeline_run_execute`` claims its run with a conditional UPDATE,
so a redelivered task finds the run already claimed and returns.
"""

from __future__ import annotations

from celery import shared_task

from apps.pipeline import services


@shared_task(name="pipeline.pipeline_run_execute", acks_late=True, reject_on_worker_lost=True)
def pipeline_run_execute_task(run_id: int) -> str | None:
    """Execute a pending PipelineRun by id."""
    run = services.pipeline_run_execute(run_id=run_id)
    return run.status if run else None


@shared_task(name="pipeline.stage_run_execute", acks_late=True, reject_on_worker_lost=True)
def stage_run_execute_task(stage: str) -> dict:
    """Run one stage on its own (recorded as a StageRun without a pipeline run)."""
    stage_run = services.stage_run_execute(stage=stage)
    return {"id": stage_run.pk, "status": stage_run.status}


def enqueue_pipeline_run(run_id: int) -> str:
    """Queue a run on the broker; with no broker (eager mode), run it on a background thread.

    An admin request must never execute the pipeline itself: with Celery eager, ``delay``
    would run every stage inside the request, so the embedded default uses a thread instead.
    """
    from django.conf import settings

    if not settings.CELERY_TASK_ALWAYS_EAGER:
        pipeline_run_execute_task.delay(run_id)
        return "queued on the broker"
    import threading

    from django.db import close_old_connections

    def work() -> None:
        try:
            services.pipeline_run_execute(run_id=run_id)
        finally:
            close_old_connections()

    threading.Thread(target=work, name=f"pipeline-run-{run_id}", daemon=True).start()
    return "running in the background (no broker configured)"


@shared_task(name="pipeline.pipeline_scheduled", acks_late=True, reject_on_worker_lost=True)
def pipeline_scheduled_task(kind: str = "incremental") -> str | None:
    """Beat entry point: create and execute a run of ``kind`` unless one is already running."""
    return services.pipeline_run_scheduled(kind=kind)
