"""Pipeline triggers: one active run per kind, the stale-run reaper, the beat leader lease.

The end-to-end scenarios (real workers, two real beats, a broker killed and restarted) are in
tests/reliability/test_celery_faults.py; these pin each piece down on its own.
"""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
from django.conf import settings
from django.db import OperationalError, connections
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask, PeriodicTasks
from django_celery_beat.schedulers import ModelEntry

from apps.pipeline import beat, services, tasks
from apps.pipeline.models import PipelineRun, PipelineTriggerLock, RunStatus, StageRun
from recoplatform.celery import app
from tests.reliability.serving_fixtures import RedisProcess

# --- the atomic trigger ------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_trigger_creates_a_pending_run_when_none_of_its_kind_is_active():
    run = services.pipeline_run_trigger(kind="incremental", triggered_by="beat")
    assert run is not None
    assert (run.kind, run.status, run.triggered_by) == ("incremental", RunStatus.PENDING, "beat")
    lock = PipelineTriggerLock.objects.get(kind="incremental")
    assert (lock.triggers, lock.skipped, lock.last_run_id) == (1, 0, run.pk)


@pytest.mark.django_db
@pytest.mark.parametrize("status", [RunStatus.PENDING, RunStatus.RUNNING])
def test_a_pending_or_running_run_blocks_its_kind_only(status):
    # Given an active run of one kind (pending: its task is still queued)
    PipelineRun.objects.create(kind="incremental", status=status)
    # When beat triggers that kind and another one
    blocked = services.pipeline_run_create_scheduled(kind="incremental")
    other = services.pipeline_run_create_scheduled(kind="full")
    # Then only the other kind gets a run, and the skip is counted
    assert blocked is None
    assert other is not None
    assert other.kind == "full"
    assert PipelineTriggerLock.objects.get(kind="incremental").skipped == 1


@pytest.mark.django_db
@pytest.mark.parametrize("status", [RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.SKIPPED])
def test_a_finished_run_does_not_block_the_next_trigger(status):
    PipelineRun.objects.create(kind="incremental", status=status)
    assert services.pipeline_run_create_scheduled(kind="incremental") is not None


@pytest.mark.django_db
def test_a_trigger_delivered_again_gets_its_own_run_back_and_never_a_second_one():
    # Given a run created by one delivery of a scheduled task (id "task-1")
    run = services.pipeline_run_create_scheduled(kind="incremental", trigger_id="task-1")
    assert run is not None
    # When the same task is delivered again (its worker died before starting the run), or
    # another task triggers the kind
    again = services.pipeline_run_create_scheduled(kind="incremental", trigger_id="task-1")
    other = services.pipeline_run_create_scheduled(kind="incremental", trigger_id="task-2")
    # Then the redelivery gets its pending run back (to start it) and the other is skipped
    assert again is not None
    assert again.pk == run.pk
    assert other is None
    # and once that run finished, the old task delivered once more makes no second run
    PipelineRun.objects.filter(pk=run.pk).update(status=RunStatus.SUCCEEDED)
    assert services.pipeline_run_create_scheduled(kind="incremental", trigger_id="task-1") is None
    assert PipelineRun.objects.count() == 1


@pytest.mark.django_db
def test_the_scheduled_task_reports_a_skip_while_a_pending_run_waits():
    PipelineRun.objects.create(kind="incremental", status=RunStatus.PENDING)
    result = tasks.pipeline_scheduled_task.delay("incremental").get()
    assert result == services.SCHEDULED_SKIPPED
    assert PipelineRun.objects.filter(kind="incremental").count() == 1


@pytest.mark.django_db(transaction=True)
def test_simultaneous_triggers_on_separate_connections_create_one_run(monkeypatch):
    # Given run creation slowed down, so every trigger is inside the critical section at once
    create = services.pipeline_run_create

    def slow_create(**kwargs):
        time.sleep(0.3)
        return create(**kwargs)

    monkeypatch.setattr(services, "pipeline_run_create", slow_create)
    barrier = threading.Barrier(4)
    results: list[object] = []

    def trigger() -> None:
        try:
            barrier.wait()
            results.append(services.pipeline_run_trigger(kind="incremental", triggered_by="t"))
        except Exception as exc:  # surfaced by the assertion below
            results.append(exc)
        finally:
            connections.close_all()

    # When four threads (four database connections) trigger the same kind at the same moment
    threads = [threading.Thread(target=trigger) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    # Then exactly one run exists; the other three were told a run is active (no error)
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sum(r is not None for r in results) == 1
    assert PipelineRun.objects.filter(kind="incremental").count() == 1
    assert PipelineTriggerLock.objects.get(kind="incremental").skipped == 3


# --- the stale-run reaper ------------------------------------------------------------------------

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
STALE = 3600.0


def _run(status: str, started_minutes_ago: float, **fields) -> PipelineRun:
    run = PipelineRun.objects.create(status=status, **{"kind": "incremental", **fields})
    created = NOW - dt.timedelta(minutes=started_minutes_ago)
    PipelineRun.objects.filter(pk=run.pk).update(
        created_at=created, started_at=created if status == RunStatus.RUNNING else None
    )
    run.refresh_from_db()
    return run


@pytest.mark.django_db
def test_the_reaper_fails_a_running_run_with_no_sign_of_life_and_frees_its_kind():
    # Given a run started 3 h ago whose running stage last beat 2 h ago (its worker died and
    # its task was lost), and a run of another kind whose stage beat a minute ago
    dead = _run(RunStatus.RUNNING, 180)
    StageRun.objects.create(
        pipeline_run=dead,
        stage="extract_business",
        status=RunStatus.SUCCEEDED,
        started_at=NOW - dt.timedelta(minutes=180),
        finished_at=NOW - dt.timedelta(minutes=170),
    )
    stuck = StageRun.objects.create(
        pipeline_run=dead,
        stage="extract_matomo",
        status=RunStatus.RUNNING,
        owner="elsewhere:1:x",
        started_at=NOW - dt.timedelta(minutes=170),
        heartbeat_at=NOW - dt.timedelta(minutes=120),
    )
    alive = _run(RunStatus.RUNNING, 600, kind="full")
    StageRun.objects.create(
        pipeline_run=alive,
        stage="train",
        status=RunStatus.RUNNING,
        owner="elsewhere:2:y",
        started_at=NOW - dt.timedelta(minutes=590),
        heartbeat_at=NOW - dt.timedelta(minutes=1),
    )
    assert services.pipeline_run_create_scheduled(kind="incremental") is None

    # When the reaper runs with a one-hour threshold
    reaped = services.pipeline_run_reap_stale(stale_seconds=STALE, now=NOW)

    # Then only the silent run failed, with its running stage; the long but live one is left
    assert reaped == [dead.pk]
    dead.refresh_from_db()
    alive.refresh_from_db()
    stuck.refresh_from_db()
    assert dead.status == RunStatus.FAILED
    assert dead.error.startswith("reaped: no sign of life")
    assert (stuck.status, stuck.owner) == (RunStatus.FAILED, "")
    assert dead.stages.get(stage="extract_business").status == RunStatus.SUCCEEDED
    assert alive.status == RunStatus.RUNNING
    # and the next trigger of the kind is no longer blocked
    assert services.pipeline_run_create_scheduled(kind="incremental") is not None


@pytest.mark.django_db
def test_the_reaper_keeps_recent_runs_and_fails_pending_runs_never_started():
    recent = _run(RunStatus.RUNNING, 30)
    queued = _run(RunStatus.PENDING, 10, triggered_by="fresh")
    lost = _run(RunStatus.PENDING, 120, triggered_by="lost")
    done = _run(RunStatus.SUCCEEDED, 600)

    reaped = services.pipeline_run_reap_stale(stale_seconds=STALE, now=NOW)

    assert reaped == [lost.pk]
    statuses = dict(PipelineRun.objects.values_list("pk", "status"))
    assert statuses == {
        recent.pk: RunStatus.RUNNING,
        queued.pk: RunStatus.PENDING,
        lost.pk: RunStatus.FAILED,
        done.pk: RunStatus.SUCCEEDED,
    }
    # a second pass finds nothing more to do
    assert services.pipeline_run_reap_stale(stale_seconds=STALE, now=NOW) == []


@pytest.mark.django_db
def test_the_reaper_task_uses_the_configured_threshold(settings):
    settings.PIPELINE_RUN_STALE_SECONDS = 60
    old = PipelineRun.objects.create(kind="incremental", status=RunStatus.PENDING)
    PipelineRun.objects.filter(pk=old.pk).update(
        created_at=timezone.now() - dt.timedelta(seconds=120)
    )
    assert tasks.pipeline_run_reap_stale_task.delay().get() == [old.pk]


def test_the_reaper_waits_longer_than_the_broker_redelivers():
    visibility = settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]
    assert visibility >= 3600  # longer than the longest stage
    assert visibility < settings.PIPELINE_RUN_STALE_SECONDS


def test_every_link_of_a_run_chain_waits_out_a_broker_restart_when_published():
    chain = tasks.pipeline_run_chain(7, ["extract_business", "clean"])
    for link in chain.tasks:
        assert link.options["retry"] is True
        assert link.options["retry_policy"]["max_retries"] >= 10


# --- the beat leader lease -----------------------------------------------------------------------


@pytest.fixture
def lease_redis(tmp_path):
    server = RedisProcess(tmp_path / "redis")  # private, on a free port: never the shared one
    client = server.client()
    yield client
    client.close()
    server.close()


def test_one_lease_holder_at_a_time_renewed_by_it_and_taken_over_after_expiry(lease_redis):
    first = beat.LeaderLease(lease_redis, "k", ttl_seconds=0.3, token="a")
    second = beat.LeaderLease(lease_redis, "k", ttl_seconds=0.3, token="b")
    # the first takes it; the second cannot while it is renewed
    assert first.acquire_or_renew()
    assert not second.acquire_or_renew()
    time.sleep(0.2)
    assert first.acquire_or_renew()  # renewed: another full TTL from now
    time.sleep(0.2)
    assert not second.acquire_or_renew()
    # once the first stops renewing, the second takes over and the first cannot come back
    time.sleep(0.35)
    assert second.acquire_or_renew()
    assert not first.acquire_or_renew()
    assert second.holder() == "b"
    # releasing is only for the holder; the holder's release frees it at once
    assert not first.release()
    assert second.release()
    assert first.acquire_or_renew()


class FakeLease:
    def __init__(self, answers):
        self.answers = list(answers)
        self.token = "fake"
        self.released = False

    def acquire_or_renew(self):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def release(self):
        self.released = True
        return True


# transaction=True: the stock scheduler closes connections it finds inside a transaction
@pytest.mark.django_db(transaction=True)
def test_the_scheduler_sends_only_while_it_holds_the_lease(monkeypatch):
    # Given a scheduler whose lease answers: held by another, ours, Redis down, ours again
    scheduler = beat.LeaderDatabaseScheduler(app=app)
    scheduler.lease = FakeLease([False, True, ConnectionError("down"), True])
    ticks = []
    monkeypatch.setattr(
        beat.DatabaseScheduler, "tick", lambda self, *a, **k: ticks.append(1) or 100.0
    )
    # When it ticks four times
    standby = scheduler.tick()
    scheduler._heap, scheduler._initial_read = ["stale entries"], False
    leading = scheduler.tick()
    # (taking the lease over re-reads the schedule the old leader kept saving)
    assert scheduler._heap is None
    assert scheduler._initial_read is True
    lost = scheduler.tick()
    again = scheduler.tick()
    # Then the stock tick (which sends due tasks) ran only while it held the lease, and a
    # leader always wakes up in time to renew
    assert len(ticks) == 2
    assert standby == lost == scheduler.standby_interval
    assert leading == again == scheduler.standby_interval  # min(100, ttl / 3)
    assert scheduler.is_leader
    # and closing releases the lease for the standby
    scheduler.close()
    assert scheduler.lease.released


def due_every_minute(name="probe: every minute"):
    """A periodic task last run two minutes ago: due now, then in a minute."""
    every, _ = IntervalSchedule.objects.get_or_create(every=60, period=IntervalSchedule.SECONDS)
    return PeriodicTask.objects.create(
        name=name,
        task="tests.beat_probe",  # no such task: beat sends it by name
        interval=every,
        last_run_at=timezone.now() - dt.timedelta(minutes=2),
    )


def leading_scheduler(monkeypatch, sent):
    """A real LeaderDatabaseScheduler on the test database whose lease is always ours and
    whose sends are recorded instead of published."""
    scheduler = beat.LeaderDatabaseScheduler(app=app)
    scheduler.lease = FakeLease([True] * 100)
    scheduler.__dict__["producer"] = object()  # the cached producer: never a broker connection
    monkeypatch.setattr(app, "send_task", lambda name, *a, **k: sent.append(name))
    return scheduler


def sends_of(sent, name="tests.beat_probe"):
    return sum(s == name for s in sent)


@pytest.mark.django_db(transaction=True)
def test_a_close_during_a_save_saves_the_last_run_releases_the_lease_and_ends_the_loop(
    monkeypatch,
):
    # Given a leading scheduler with one due task, whose first save of a last run is cut off
    # the way celery's SIGTERM handler cuts it: the handler closes the scheduler (from inside
    # the save) and the SystemExit it raises reaches the loop as an ordinary error
    task = due_every_minute()
    sent: list[str] = []
    scheduler = leading_scheduler(monkeypatch, sent)
    real_save = ModelEntry.save
    interrupted = []

    def save(entry):
        if not interrupted:
            interrupted.append(entry.name)
            scheduler.close()  # what celery's _sync handler does first
            raise RuntimeError("Cannot operate on a closed database.")
        return real_save(entry)

    monkeypatch.setattr(ModelEntry, "save", save)
    # When it ticks (sends the task; the save is interrupted) and ticks again
    scheduler.tick()
    assert sends_of(sent) == 1
    # Then the close saved the last run before releasing the lease, so a standby taking over
    # reads it and does not send the task again
    assert interrupted == [task.name]
    assert scheduler.lease.released
    assert PeriodicTask.objects.get(pk=task.pk).last_run_at > timezone.now() - dt.timedelta(
        seconds=30
    )
    # and the next tick ends the loop instead of taking the lease again and sending
    with pytest.raises(SystemExit):
        scheduler.tick()
    assert sends_of(sent) == 1
    scheduler.close()  # the service's own close after the loop: nothing left to do
    assert not scheduler.is_leader


@pytest.mark.django_db(transaction=True)
def test_a_failed_save_is_retried_and_a_re_read_schedule_does_not_send_the_task_again(
    monkeypatch,
):
    # Given a leading scheduler whose saves fail while the database is locked
    task = due_every_minute()
    before = PeriodicTask.objects.get(pk=task.pk).last_run_at
    sent: list[str] = []
    scheduler = leading_scheduler(monkeypatch, sent)
    real_save = ModelEntry.save
    locked = [True]

    def save(entry):
        if locked[0]:
            raise OperationalError("database is locked")
        return real_save(entry)

    monkeypatch.setattr(ModelEntry, "save", save)
    # When it sends the task, its save fails, and the schedule is then read again from the
    # database (an operator edited a task; a lease taken over)
    scheduler.tick()
    assert sends_of(sent) == 1
    assert PeriodicTask.objects.get(pk=task.pk).last_run_at == before
    scheduler._initial_read, scheduler._heap = True, None
    for _ in range(3):
        scheduler.tick()
    # Then the task is not due again: the re-read kept this process's unsaved last run
    assert sends_of(sent) == 1
    # and once the database takes writes again, the next sync saves it
    locked[0] = False
    scheduler.sync()
    assert PeriodicTask.objects.get(pk=task.pk).last_run_at > before
    assert not scheduler._dirty


@pytest.mark.django_db(transaction=True)
def test_a_schedule_change_noticed_before_a_send_does_not_send_the_task_twice(monkeypatch):
    # Given a leading scheduler with one due task, and a change to the periodic tasks made
    # after it started (a second beat starting saves its default entries)
    due_every_minute()
    sent: list[str] = []
    scheduler = leading_scheduler(monkeypatch, sent)
    PeriodicTasks.update_changed()
    # When it ticks a few times (the first notices the change while building its heap)
    for _ in range(4):
        scheduler.tick()
    # Then it sent the task once
    assert sends_of(sent) == 1


@pytest.mark.django_db(transaction=True)
def test_a_save_never_moves_a_later_last_run_back(monkeypatch):
    # Given an unsaved last run older than the one another beat saved meanwhile
    task = due_every_minute()
    sent: list[str] = []
    scheduler = leading_scheduler(monkeypatch, sent)
    scheduler.tick()  # sends and saves
    ours = PeriodicTask.objects.get(pk=task.pk).last_run_at
    later = ours + dt.timedelta(minutes=5)
    PeriodicTask.objects.filter(pk=task.pk).update(last_run_at=later)
    # When its sync saves the entry again
    scheduler._dirty.add(task.name)
    scheduler.sync()
    # Then the later run stays
    assert PeriodicTask.objects.get(pk=task.pk).last_run_at == later
    assert not scheduler._dirty


@pytest.mark.django_db(transaction=True)
def test_without_a_lock_url_the_scheduler_is_the_stock_one(monkeypatch):
    assert app.conf.beat_leader_lock_url == ""  # tests run without a broker
    scheduler = beat.LeaderDatabaseScheduler(app=app)
    monkeypatch.setattr(beat.DatabaseScheduler, "tick", lambda self, *a, **k: 42.0)
    assert scheduler.lease is None
    assert scheduler.tick() == 42.0


# --- the trigger on MariaDB (production's database) ------------------------------------------------

# Run in a subprocess whose Django database is the throw-away MariaDB database: five forked
# processes (five connections) trigger the same kind at one moment, each run creation slowed
# so that all five are inside the critical section; first with the real trigger, then with
# the old check-then-create (the control).
MARIADB_RACE = r"""
import json, multiprocessing as mp, sys, time
import django
django.setup()
from django.core.management import call_command
from django.db import connections
call_command("migrate", "pipeline", verbosity=0)
from apps.pipeline import services
from apps.pipeline.models import PipelineRun

create = services.pipeline_run_create
def slow_create(**kwargs):
    time.sleep(0.3)
    return create(**kwargs)
services.pipeline_run_create = slow_create

def naive(*, kind, triggered_by):
    if PipelineRun.objects.filter(kind=kind, status__in=services.ACTIVE_STATUSES).exists():
        return None
    return services.pipeline_run_create(kind=kind, triggered_by=triggered_by)

def work(trigger, barrier, queue):
    barrier.wait()
    try:
        queue.put("created" if trigger(kind="incremental", triggered_by="race") else "skipped")
    except Exception as exc:
        queue.put(f"error: {exc}")

out = {}
for name, trigger in (("atomic", services.pipeline_run_trigger), ("naive", naive)):
    PipelineRun.objects.all().delete()
    connections.close_all()  # every child opens its own connection
    barrier, queue = mp.Barrier(5), mp.Queue()
    children = [mp.Process(target=work, args=(trigger, barrier, queue)) for _ in range(5)]
    for child in children:
        child.start()
    results = sorted(queue.get(timeout=60) for _ in children)
    for child in children:
        child.join(10)
    out[name] = {"results": results, "runs": PipelineRun.objects.count()}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.mariadb
@pytest.mark.slow
def test_five_simultaneous_triggers_on_mariadb_create_one_run(mariadb_url):
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "DATABASE_"))}
    env.update(DATABASE_URL=mariadb_url, DJANGO_SETTINGS_MODULE="recoplatform.settings")
    done = subprocess.run(
        [sys.executable, "-c", MARIADB_RACE],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    [line] = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")] or [done.stderr]
    out = json.loads(line.removeprefix("RESULT "))
    # The real trigger: one run, four skips, no error (the others waited on the row lock)
    assert out["atomic"] == {"results": ["created"] + ["skipped"] * 4, "runs": 1}
    # The control: check-then-create lets several in
    assert out["naive"]["runs"] > 1
