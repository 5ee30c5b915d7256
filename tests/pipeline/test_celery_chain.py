"""The pipeline as a chain of stage tasks, run eagerly: retries, failures, redelivery, takeover.

The real worker (prefork pool, Redis broker, a killed pool child) is in test_celery_worker.py.
"""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import time

import MySQLdb
import pytest
import redis
import sqlalchemy.exc
from django.db import utils as django_db
from django.utils import timezone

from apps.pipeline import errors, extract, services, tasks
from apps.pipeline.models import (
    ExtractionLock,
    PipelineRun,
    RunStatus,
    StageRun,
    Watermark,
)
from apps.pipeline.sources.contract import ContractError
from recoplatform.celery import app
from tests.pipeline.test_pipeline_run import demo_sources  # noqa: F401 (a fixture)

pytestmark = pytest.mark.django_db

STAGE_TASK = "pipeline.pipeline_stage_execute"


def lost_connection() -> sqlalchemy.exc.OperationalError:
    """What SQLAlchemy raises when MySQL drops the connection in the middle of a query."""
    return sqlalchemy.exc.OperationalError(
        "SELECT 1", {}, MySQLdb.OperationalError(2013, "Lost connection to server during query")
    )


@pytest.fixture
def run() -> PipelineRun:
    return services.pipeline_run_create(kind="test", triggered_by="pytest")


@pytest.fixture
def eager_retries(monkeypatch):
    """Let eager tasks retry (a propagating eager task raises Retry instead) and record each
    countdown the task asked Celery for."""
    propagates = app.conf.task_eager_propagates
    app.conf.task_eager_propagates = False
    task = app.tasks[STAGE_TASK]
    countdowns: list[float] = []
    original = task.retry

    def retry(*args, **kwargs):
        countdowns.append(kwargs["countdown"])
        return original(*args, **kwargs)

    monkeypatch.setattr(task, "retry", retry)
    yield countdowns
    app.conf.task_eager_propagates = propagates


def flaky(monkeypatch, stage: str, failures: list[BaseException]) -> list[int]:
    """Make ``stage`` raise each of ``failures`` in turn, then run for real; count the calls."""
    real = services.STAGES[stage]
    calls: list[int] = []

    def run_stage(stage_run, progress):
        calls.append(stage_run.pk)
        if len(calls) <= len(failures):
            raise failures[len(calls) - 1]
        return real(stage_run, progress)

    monkeypatch.setitem(services.STAGES, stage, run_stage)
    return calls


# --- which errors are transient ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (lost_connection(), True),
        (MySQLdb.OperationalError(2006, "MySQL server has gone away"), True),
        (django_db.OperationalError(2003, "Can't connect to MySQL server"), True),
        (django_db.OperationalError("database is locked"), True),
        (redis.exceptions.ConnectionError("Connection refused"), True),
        (redis.exceptions.TimeoutError("Timeout reading from socket"), True),
        (errors.TransientSourceError("source went away"), True),
        # a statement the server refuses is not a connection problem
        (MySQLdb.OperationalError(1054, "Unknown column 'x'"), False),
        (
            sqlalchemy.exc.OperationalError("x", {}, Exception("unable to open database file")),
            False,
        ),
        (django_db.OperationalError("no such table: pipeline_stagerun"), False),
        (ContractError("matomo.log_visit: column 'idvisit' is missing"), False),
        (services.QualityGateError("score 80 below 90"), False),
        (ValueError("a bug"), False),
        (KeyError("a bug"), False),
    ],
)
def test_only_named_dependency_errors_are_transient(exc, transient):
    assert errors.is_transient(exc) is transient


def test_the_backoff_grows_exponentially_with_jitter_and_a_cap():
    policy = errors.RetryPolicy(max_retries=6, base_seconds=2.0, cap_seconds=20.0)
    for retry, ceiling in enumerate([2, 4, 8, 16, 20, 20]):
        delays = {policy.delay(retry) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (retry, delays)
        assert len(delays) > 1  # jittered, so workers that failed together spread out


# --- the chain ---------------------------------------------------------------------------------


def test_the_chain_has_one_task_per_stage_in_order_then_the_finish(run):
    sig = tasks.pipeline_run_chain(run.pk, services.FULL_STAGES)
    names = [(t.task, t.args) for t in sig.tasks]
    assert names == [
        *((STAGE_TASK, (run.pk, stage)) for stage in services.FULL_STAGES),
        ("pipeline.pipeline_run_finish", (run.pk, list(services.FULL_STAGES))),
    ]
    # immutable signatures: no stage receives the previous stage's return value
    assert all(t.immutable for t in sig.tasks)
    for name in (STAGE_TASK, "pipeline.pipeline_run_finish", "pipeline.pipeline_run_execute"):
        assert app.tasks[name].acks_late is True
        assert app.tasks[name].reject_on_worker_lost is True


def test_the_stage_tasks_run_a_whole_pipeline_and_finish_it(demo_sources, run):  # noqa: F811
    # When each link of the chain runs once, in order (what a worker does)
    for stage in services.PIPELINE_STAGES:
        assert tasks.pipeline_stage_execute_task.apply(args=(run.pk, stage)).get() == (
            f"{stage}: done"
        )
    assert tasks.pipeline_run_finish_task.apply(
        args=(run.pk, list(services.PIPELINE_STAGES))
    ).get() == (RunStatus.SUCCEEDED)
    # Then the run succeeded with one succeeded row per stage, each run by a different task
    run.refresh_from_db()
    assert run.status == RunStatus.SUCCEEDED
    rows = list(run.stages.order_by("id"))
    assert [(s.stage, s.status, s.attempts) for s in rows] == [
        (stage, RunStatus.SUCCEEDED, 1) for stage in services.PIPELINE_STAGES
    ]
    assert len({s.owner for s in rows}) == len(rows)


# --- retries -----------------------------------------------------------------------------------


def test_a_transient_error_is_retried_with_backoff_and_then_succeeds(
    demo_sources,  # noqa: F811
    run,
    monkeypatch,
    eager_retries,
):
    # Given an extraction whose source drops the connection twice, then answers
    calls = flaky(monkeypatch, "extract_business", [lost_connection(), lost_connection()])
    # When its stage task runs
    result = tasks.pipeline_stage_execute_task.apply(args=(run.pk, "extract_business"))
    # Then it was retried twice and succeeded on the third try, in the same StageRun row
    assert result.get() == "extract_business: done"
    assert len(calls) == 3
    assert len(set(calls)) == 1
    stage = StageRun.objects.get(pipeline_run=run)
    assert (stage.status, stage.attempts) == (RunStatus.SUCCEEDED, 3)
    # and each retry waited longer, as the policy says, and is on the record for operators
    recorded = [r["retry_in"] for r in stage.detail["retries"]]
    assert eager_retries == recorded
    policy = errors.STAGE_RETRY
    for retry, seconds in enumerate(recorded):
        ceiling = min(policy.cap_seconds, policy.base_seconds * 2**retry)
        assert ceiling / 2 <= seconds <= ceiling
    assert all("Lost connection" in r["error"] for r in stage.detail["retries"])
    # and the watermarks moved once, by the successful try
    assert set(Watermark.objects.filter(source="business").values_list("version", flat=True)) == {1}
    run.refresh_from_db()
    assert run.status == RunStatus.RUNNING  # the rest of the chain is still to come


def test_a_non_transient_error_fails_the_run_at_once_without_a_retry(
    demo_sources,  # noqa: F811
    run,
    monkeypatch,
    eager_retries,
):
    # Given a stage with a programming error
    calls = flaky(monkeypatch, "extract_business", [KeyError("dataset_name")])
    # When its stage task runs
    result = tasks.pipeline_stage_execute_task.apply(args=(run.pk, "extract_business"))
    # Then it ran once, was not retried, and the task failed (which stops the chain)
    assert len(calls) == 1
    assert eager_retries == []
    assert result.state == "FAILURE"
    assert isinstance(result.result, errors.StageFailed)
    # and the stage and the run are failed, naming the stage and the error
    stage = StageRun.objects.get(pipeline_run=run)
    assert stage.status == RunStatus.FAILED
    assert stage.error.startswith("KeyError: 'dataset_name'")
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED
    assert run.error == "stage extract_business failed: KeyError: 'dataset_name'"
    assert run.finished_at is not None
    # and a later link of the chain, were it delivered anyway, does nothing
    assert tasks.pipeline_stage_execute_task.apply(args=(run.pk, "extract_matomo")).get() == (
        f"extract_matomo: pipeline run #{run.pk} is already failed"
    )
    assert not StageRun.objects.filter(stage="extract_matomo").exists()


def test_a_transient_error_that_persists_fails_the_run_after_the_bounded_retries(
    run, monkeypatch, eager_retries
):
    failures = [redis.exceptions.ConnectionError("refused")] * 10
    calls = flaky(monkeypatch, "canonicalize", failures)
    result = tasks.pipeline_stage_execute_task.apply(args=(run.pk, "canonicalize"))
    assert result.state == "FAILURE"
    assert len(calls) == errors.STAGE_RETRY.max_retries + 1
    assert len(eager_retries) == errors.STAGE_RETRY.max_retries
    stage = StageRun.objects.get(pipeline_run=run)
    assert stage.status == RunStatus.FAILED
    assert len(stage.detail["retries"]) == errors.STAGE_RETRY.max_retries
    run.refresh_from_db()
    assert run.error == "stage canonicalize failed: ConnectionError: refused"


def test_an_extraction_that_loses_its_source_raises_a_transient_source_error(
    demo_sources,  # noqa: F811
    run,
    monkeypatch,
):
    # Given a source that drops the connection of every table once (as extract_source reports it)
    real = extract.extract_source
    tries = []

    def extract_source(engine, spec, *args, **kwargs):
        tries.append(spec.name)
        if len(tries) == 1:
            failure = extract.TableFailure(
                spec.name, "user", "OperationalError", str(lost_connection()), None
            )
            raise extract.SourceExtractionFailed(
                extract.SourceResult(spec.name, token=1, failures=(failure,))
            )
        return real(engine, spec, *args, **kwargs)

    monkeypatch.setattr(extract, "extract_source", extract_source)
    slept: list[float] = []
    # When the pipeline runs in-process (manage.py run_pipeline), which shares the stage step
    result = services.pipeline_run_execute(
        run_id=run.pk, stages=("extract_business",), sleep=slept.append
    )
    # Then the lost source was retried after the backoff, and the run succeeded
    assert result.status == RunStatus.SUCCEEDED
    stage = result.stages.get()
    assert stage.detail["retries"][0]["error"].startswith("TransientSourceError: source 'business'")
    assert slept == [stage.detail["retries"][0]["retry_in"]]


def test_a_source_that_is_missing_is_not_retried(demo_sources, run, settings, tmp_path):  # noqa: F811
    settings.BUSINESS_DB_URL = f"sqlite:///{tmp_path / 'missing' / 'business.sqlite3'}"
    slept: list[float] = []
    result = services.pipeline_run_execute(run_id=run.pk, sleep=slept.append)
    assert result.status == RunStatus.FAILED
    assert slept == []
    assert result.stages.get().attempts == 1


# --- redelivery --------------------------------------------------------------------------------


def test_a_redelivered_stage_that_already_succeeded_is_a_no_op_that_passes_the_chain_on(
    run, monkeypatch
):
    # Given a stage that succeeded in this run
    calls = flaky(monkeypatch, "canonicalize", [])
    assert tasks.pipeline_stage_execute_task.apply(args=(run.pk, "canonicalize")).get() == (
        "canonicalize: done"
    )
    # When the same task is delivered again
    step = services.pipeline_stage_execute(run_id=run.pk, stage="canonicalize", owner_token="x")
    again = tasks.pipeline_stage_execute_task.apply(args=(run.pk, "canonicalize"))
    # Then nothing ran again, the chain goes on (a result, not a stop) and there is one row
    assert step.action == services.StepAction.CONTINUE
    assert again.get() == "canonicalize: already succeeded"
    assert len(calls) == 1
    assert StageRun.objects.filter(pipeline_run=run).count() == 1


def test_a_stage_running_in_a_live_worker_is_left_alone_and_checked_again_later(run, monkeypatch):
    # Given a stage that another host's worker runs, with a fresh heartbeat
    calls = flaky(monkeypatch, "canonicalize", [])
    PipelineRun.objects.filter(pk=run.pk).update(status=RunStatus.RUNNING)
    StageRun.objects.create(
        pipeline_run=run,
        stage="canonicalize",
        status=RunStatus.RUNNING,
        owner="other-host:4242:task-1",
        heartbeat_at=timezone.now() - dt.timedelta(seconds=10),
        attempts=1,
    )
    # When a duplicate delivery arrives
    step = services.pipeline_stage_execute(run_id=run.pk, stage="canonicalize", owner_token="dup")
    # Then it does not run the stage; it comes back once the heartbeat could have gone stale
    assert step.action == services.StepAction.RETRY
    assert step.retry_in == pytest.approx(services.STAGE_OWNER_STALE_SECONDS - 10, abs=2)
    assert calls == []
    assert StageRun.objects.get().owner == "other-host:4242:task-1"


def test_a_stage_whose_heartbeat_stopped_on_another_host_is_taken_over(run, monkeypatch):
    calls = flaky(monkeypatch, "canonicalize", [])
    PipelineRun.objects.filter(pk=run.pk).update(status=RunStatus.RUNNING)
    stale = timezone.now() - dt.timedelta(seconds=services.STAGE_OWNER_STALE_SECONDS + 1)
    StageRun.objects.create(
        pipeline_run=run,
        stage="canonicalize",
        status=RunStatus.RUNNING,
        owner="other-host:4242:task-1",
        heartbeat_at=stale,
        attempts=1,
    )
    step = services.pipeline_stage_execute(run_id=run.pk, stage="canonicalize", owner_token="new")
    assert step.action == services.StepAction.CONTINUE
    assert len(calls) == 1
    stage = StageRun.objects.get()
    assert (stage.status, stage.attempts) == (RunStatus.SUCCEEDED, 2)
    assert stage.owner.endswith(":new")


def test_an_extraction_whose_worker_died_is_re_run_with_its_lock_taken_back(
    demo_sources,  # noqa: F811
    run,
):
    # Given an extraction that a worker process on this host was running when it died: the
    # StageRun still says running and the source's lock is still held by that attempt
    dead_pid = subprocess.Popen(["true"])
    dead_pid.wait()
    PipelineRun.objects.filter(pk=run.pk).update(status=RunStatus.RUNNING)
    owner = f"{socket.gethostname()}:{dead_pid.pid}:task-1"
    stage = StageRun.objects.create(
        pipeline_run=run,
        stage="extract_business",
        status=RunStatus.RUNNING,
        owner=owner,
        heartbeat_at=timezone.now(),  # fresh: only the vanished process shows it is dead
        attempts=1,
    )
    far = timezone.now() + dt.timedelta(hours=1)
    ExtractionLock.objects.create(
        name=extract.lock_name("business"),
        holder=f"{socket.gethostname()}:{dead_pid.pid}:stage{stage.pk}",
        token=7,
        acquired_at=timezone.now(),
        expires_at=far,
    )
    # When the task is redelivered
    result = tasks.pipeline_stage_execute_task.apply(args=(run.pk, "extract_business"))
    # Then the stage ran again to success under a newer fencing token, and released the lock
    assert result.get() == "extract_business: done"
    stage.refresh_from_db()
    assert (stage.status, stage.attempts) == (RunStatus.SUCCEEDED, 2)
    lock = ExtractionLock.objects.get(name=extract.lock_name("business"))
    assert (lock.token, lock.holder) == (8, "")
    assert set(
        Watermark.objects.filter(source="business").values_list("fence_token", flat=True)
    ) == {8}


def test_a_redelivered_start_does_not_start_a_second_chain_once_a_stage_began(run):
    assert services.pipeline_run_start(run_id=run.pk) == services.PIPELINE_STAGES
    # redelivered before any stage began: the chain may never have been sent, send it again
    assert services.pipeline_run_start(run_id=run.pk) == services.PIPELINE_STAGES
    StageRun.objects.create(pipeline_run=run, stage="extract_business")
    assert services.pipeline_run_start(run_id=run.pk) is None


def test_the_finish_task_only_succeeds_a_run_whose_stages_all_succeeded(run):
    PipelineRun.objects.filter(pk=run.pk).update(status=RunStatus.RUNNING)
    stages = ["extract_business", "extract_matomo"]
    StageRun.objects.create(pipeline_run=run, stage="extract_business", status="succeeded")
    assert services.pipeline_run_finish(run_id=run.pk, stages=stages).status == RunStatus.RUNNING
    StageRun.objects.create(pipeline_run=run, stage="extract_matomo", status="skipped")
    assert services.pipeline_run_finish(run_id=run.pk, stages=stages).status == RunStatus.SUCCEEDED


@pytest.mark.django_db(transaction=True)
def test_a_running_stage_keeps_its_heartbeat_fresh(run, monkeypatch):
    # Given beats every 50 ms and a stage that takes 400 ms
    monkeypatch.setattr(services, "STAGE_HEARTBEAT_SECONDS", 0.05)
    beats = []

    def slow_stage(stage_run, progress):
        for _ in range(8):
            time.sleep(0.05)
            beats.append(StageRun.objects.get(pk=stage_run.pk).heartbeat_at)
        return services.StageOutcome()

    monkeypatch.setitem(services.STAGES, "canonicalize", slow_stage)
    # When it runs
    step = services.pipeline_stage_execute(run_id=run.pk, stage="canonicalize")
    # Then other processes saw its heartbeat move while it ran
    assert step.action == services.StepAction.CONTINUE
    assert len(set(beats)) >= 3
    assert max(beats) > StageRun.objects.get().started_at
