"""Celery tasks: thin wrappers that take ids and call one service.

With a broker, a pipeline run is a chain: ``pipeline_run_execute_task`` claims the run and
publishes one ``pipeline_stage_execute_task`` per stage, then ``pipeline_run_finish_task``.
Every task is late-acknowledged and requeued if its worker dies, and safe to receive twice:
``services.pipeline_stage_execute`` skips a stage that already succeeded (passing the chain
on), waits for one a live worker runs, and takes over one whose worker died. With no broker
(eager mode) the same stage service runs in-process through ``services.pipeline_run_execute``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from celery import chain, shared_task
from celery.canvas import Signature
from django.conf import settings
from django.db import close_old_connections

from apps.pipeline import errors, services
from apps.pipeline.models import RunStatus

# Every task: acknowledged only after it ran, and requeued when its worker process dies.
RELIABLE = {"acks_late": True, "reject_on_worker_lost": True}
# Each link of a run's chain is published by the task before it, from a worker. Celery's default
# retry policy gives up after under a second, so a broker restart (seconds: it reloads its
# append-only file) would drop the rest of the run; these retries wait for it for about a
# minute (15 tries, 0, 1, 2, 3, 4 s apart, then 5 s). Web requests keep the short default.
CHAIN_PUBLISH = {
    "retry": True,
    "retry_policy": {
        "max_retries": 15,
        "interval_start": 0,
        "interval_step": 1,
        "interval_max": 5,
    },
}


def pipeline_run_chain(run_id: int, stages: Sequence[str]) -> Signature:
    """One task per stage, in order, then the task that sets the run's final status."""
    return chain(
        *(pipeline_stage_execute_task.si(run_id, stage).set(**CHAIN_PUBLISH) for stage in stages),
        pipeline_run_finish_task.si(run_id, list(stages)).set(**CHAIN_PUBLISH),
    )


@shared_task(bind=True, name="pipeline.pipeline_run_execute", **RELIABLE)
def pipeline_run_execute_task(self, run_id: int) -> str | None:
    """Execute a pending PipelineRun by id: a chain of stage tasks, or in-process when eager."""
    if self.request.is_eager:
        run = services.pipeline_run_execute(run_id=run_id)
        return run.status if run else None
    stages = services.pipeline_run_start(run_id=run_id)
    if stages is None:
        return None
    pipeline_run_chain(run_id, stages).apply_async()
    return RunStatus.RUNNING


# max_retries=None: the stage service bounds retries on transient errors itself
# (errors.STAGE_RETRY); waiting for a live worker that still runs the stage must not run out.
@shared_task(bind=True, name="pipeline.pipeline_stage_execute", max_retries=None, **RELIABLE)
def pipeline_stage_execute_task(self, run_id: int, stage: str) -> str:
    """Run one stage of a pipeline run (one link of the run's chain)."""
    step = services.pipeline_stage_execute(
        run_id=run_id, stage=stage, owner_token=self.request.id or ""
    )
    if step.action == services.StepAction.RETRY:
        raise self.retry(countdown=step.retry_in)
    if step.action == services.StepAction.FAILED:
        raise errors.StageFailed(step.reason)
    if step.action == services.StepAction.STOP:
        # The run is finished, or another delivery owns this stage and carries the chain on.
        self.request.chain = None
    return f"{stage}: {step.reason}"


@shared_task(bind=True, name="pipeline.pipeline_run_finish", **RELIABLE)
def pipeline_run_finish_task(self, run_id: int, stages: list[str]) -> str | None:
    """Last link of a run's chain: set the run's final status from its stages."""
    run = services.pipeline_run_finish(run_id=run_id, stages=stages)
    return run.status if run else None


@shared_task(name="pipeline.stage_run_execute", **RELIABLE)
def stage_run_execute_task(stage: str) -> dict:
    """Run one stage on its own (recorded as a StageRun without a pipeline run)."""
    stage_run = services.stage_run_execute(stage=stage)
    return {"id": stage_run.pk, "status": stage_run.status}


def _in_background(name: str, work: Callable[[], object]) -> threading.Thread:
    """Run ``work`` on a daemon thread that closes its database connections when done."""

    def target() -> None:
        try:
            work()
        finally:
            close_old_connections()

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def enqueue_pipeline_run(run_id: int) -> str:
    """Queue a run on the broker; with no broker (eager mode), run it on a background thread.

    An admin request must never execute the pipeline itself: with Celery eager, ``delay``
    would run every stage inside the request, so the embedded default uses a thread instead.
    """
    if not settings.CELERY_TASK_ALWAYS_EAGER:
        pipeline_run_execute_task.delay(run_id)
        return "queued on the broker"
    _in_background(f"pipeline-run-{run_id}", lambda: services.pipeline_run_execute(run_id=run_id))
    return "running in the background (no broker configured)"


@shared_task(bind=True, name="pipeline.pipeline_scheduled", **RELIABLE)
def pipeline_scheduled_task(self, kind: str = "incremental") -> str | None:
    """Beat entry point: create and execute a run of ``kind`` unless one is pending or running.

    Safe to receive several times at once (two beats, a redelivery): the trigger is atomic, so
    one delivery creates the run and the others return ``SCHEDULED_SKIPPED``.
    """
    if self.request.is_eager:
        return services.pipeline_run_scheduled(kind=kind)
    run = services.pipeline_run_create_scheduled(kind=kind, trigger_id=self.request.id or "")
    if run is None:
        return services.SCHEDULED_SKIPPED
    # (a redelivery of this task gets its own run back: this starts it if nothing did yet)
    stages = services.pipeline_run_start(run_id=run.pk)
    if stages is None:
        return None
    pipeline_run_chain(run.pk, stages).apply_async()
    return RunStatus.RUNNING


@shared_task(name="pipeline.pipeline_run_reap_stale", **RELIABLE)
def pipeline_run_reap_stale_task() -> list[int]:
    """Fail runs with no sign of life for PIPELINE_RUN_STALE_SECONDS (their chain was lost)."""
    return services.pipeline_run_reap_stale(stale_seconds=settings.PIPELINE_RUN_STALE_SECONDS)


@shared_task(name="pipeline.primary_sync_to_redis", **RELIABLE)
def primary_sync_to_redis_task(version_id: int, user_id: int) -> str:
    """Republish the primary bundle to Redis for an operator; the result goes to its history."""
    _, message = services.primary_sync_to_redis_logged(version_id=version_id, user_id=user_id)
    return message


def enqueue_primary_sync_to_redis(
    *, version_id: int, user_id: int, wait_seconds: float = 0.0
) -> tuple[str, tuple[bool, str] | None]:
    """Start a republish to Redis without blocking an admin request for long.

    With a broker the task is queued. Without one it runs on a background thread, and the
    caller may wait up to ``wait_seconds`` for it: the result ``(succeeded, message)`` comes
    back when it finished in time, else None (the version's history gets it when it ends).
    """
    if not settings.CELERY_TASK_ALWAYS_EAGER:
        primary_sync_to_redis_task.delay(version_id, user_id)
        return "queued on the broker", None
    result: list[tuple[bool, str]] = []

    def work() -> None:
        result.append(services.primary_sync_to_redis_logged(version_id=version_id, user_id=user_id))

    thread = _in_background(f"redis-sync-{version_id}", work)
    thread.join(timeout=wait_seconds)
    return "running in the background (no broker configured)", (result[0] if result else None)
