"""Scenario 7 of issue 6: Celery faults never duplicate or lose a pipeline run's effect.

- A worker's pool child is SIGKILLed in the middle of a stage while the broker (a private
  redis-server, durable like docker-compose.yml's: AOF, fsync always) is SIGKILLed and
  restarted: the worker reconnects and requeues the task (its unacknowledged copy survived in
  the AOF), and the run ends exactly as an uninterrupted control run (lake keys, frames, each
  watermark moved once). Control: the same faults with a broker that does not persist lose the
  run, which stays `running` (blocking its kind) until the stale-run reaper fails it.
- The whole worker SIGKILLed mid-stage (a lost host): another worker gets the task back after
  the visibility timeout, with the same outcome as the control.
- A stage finishing while the broker is down: the next link of the chain is published after
  the restart (the chain's publish retry policy), the run completes with every stage once.
- Five triggers at the same moment (five tasks on a worker with five pool processes) make one
  run. Control: the old check-then-create trigger makes five.
- Two `celery beat` processes send each tick once (the leader lease); SIGKILLing the leader
  hands the schedule to the standby. Control: two beats without the lease both send.

Each case writes benchmarks/results/reliability/<name>.json. Every process is private to the
test and signalled by pid; the shared Redis (6379) and MariaDB (3306) are never touched.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from celery import Celery
from django.db import connection
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from apps.pipeline import demo, services
from apps.pipeline.lake import Lake
from apps.pipeline.models import (
    DataQualityReport,
    ExtractionLock,
    PipelineRun,
    PipelineTriggerLock,
    RunStatus,
    StageRun,
    Watermark,
)
from tests.demo_frames import write_demo_sources
from tests.reliability.celery_fixtures import (
    BrokerRedis,
    CeleryProcess,
    beat_args,
    kill_if_same,
    worker_args,
)
from tests.reliability.serving_fixtures import base_env, write_result

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

# Every demo row is older than the sources' safety lag, so every run reads the same rows.
END = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0) - dt.timedelta(hours=1)
KILLED_STAGE = "extract_matomo"
# The worker's broker visibility timeout: a task delivered to a worker that died without
# acknowledging it comes back this long after its delivery (production: 2 h).
VISIBILITY_TIMEOUT = 5
TERMINAL = (RunStatus.SUCCEEDED, RunStatus.FAILED)


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def sources(tmp_path) -> dict[str, str]:
    """Small demo business + Matomo SQLite databases (fixed seed)."""
    (tmp_path / "sources").mkdir()
    return write_demo_sources(
        tmp_path / "sources",
        demo.DemoConfig(users=150, items=60, actions=6000, days=20, seed=7, end=END),
    )


@pytest.fixture
def start_broker(tmp_path) -> Iterator[Callable[..., BrokerRedis]]:
    started: list[BrokerRedis] = []

    def start(*, durable: bool) -> BrokerRedis:
        (tmp_path / "broker").mkdir(exist_ok=True)
        broker = BrokerRedis(tmp_path / "broker" / str(len(started)), durable=durable)
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.close()


@pytest.fixture
def processes(tmp_path) -> Iterator[Callable[..., CeleryProcess]]:
    """Start workers and beats; every one still running is stopped at teardown."""
    started: list[CeleryProcess] = []

    def start(args: list[str], env: dict[str, str], *, wrapper: bool = False) -> CeleryProcess:
        log = tmp_path / f"celery{len(started)}-{args[0]}.log"
        process = CeleryProcess(args, env, log, wrapper=wrapper)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def env(sources, data_dir) -> Callable[..., dict[str, str]]:
    """The environment of a Celery process sharing this test's database, DATA_DIR, sources."""
    database = connection.settings_dict["NAME"]
    assert Path(database).is_file(), "the test database must be a file the worker can open"

    def make(broker: BrokerRedis, **extra: str) -> dict[str, str]:
        return base_env(
            DATABASE_URL=f"sqlite:///{database}",
            DATA_DIR=str(data_dir),
            BUSINESS_DB_URL=sources["business"],
            MATOMO_DB_URL=sources["matomo"],
            CELERY_BROKER_URL=broker.url,
            CELERY_VISIBILITY_TIMEOUT_SECONDS=str(VISIBILITY_TIMEOUT),
            RECO_EXTRACT_BATCH_ROWS="1000",  # several lake batches per Matomo table
            CELERY_SKIP_CHECKS="1",
            DJANGO_DEBUG="1",
            **extra,
        )

    return make


def start_worker(processes, env_vars, name: str, concurrency: int = 1, **kw) -> CeleryProcess:
    worker = processes(worker_args(name, concurrency), env_vars, **kw)
    worker.wait_until("the worker to be ready", lambda: " ready." in worker.text(), 45)
    worker.pool_children()
    return worker


def sender(broker: BrokerRedis) -> Callable[[str, list], None]:
    producer = Celery("test-producer", broker=broker.url, set_as_current=False)

    def send(name: str, args: list) -> None:
        producer.send_task(name, args=args)

    return send


def wait_for_run(run_id: int, process: CeleryProcess, timeout: float = 60) -> PipelineRun:
    process.wait_until(
        f"run #{run_id} to finish",
        lambda: PipelineRun.objects.get(pk=run_id).status in TERMINAL,
        timeout,
    )
    return PipelineRun.objects.get(pk=run_id)


# --- what a run leaves behind ------------------------------------------------------------------


def lake_keys(data_dir: Path) -> dict[str, set[tuple]]:
    """Primary keys of every lake table (the lake upserts by key)."""
    contract = services.get_contract()
    lake = Lake(data_dir / "raw")
    keys = {}
    for source, spec in contract.sources.items():
        for table in spec.tables:
            if lake.exists(source, table):
                frame = lake.keys(source, table)
                keys[f"{source}.{table}"] = set(frame.itertuples(index=False, name=None))
    return keys


def frame_rows(data_dir: Path) -> dict[str, tuple[int, int]]:
    """(rows, fully duplicated rows) of every staged and clean frame."""
    out = {}
    for stage in ("staged", "clean"):
        for name in ("users", "items", "interactions"):
            frame = pd.read_parquet(data_dir / stage / f"{name}.parquet")
            out[f"{stage}/{name}"] = (len(frame), int(frame.astype(str).duplicated().sum()))
    return out


def watermark_versions() -> dict[str, int]:
    """How many times each watermark was advanced (a fresh database starts at version 0)."""
    return {f"{w.source}.{w.table}": w.version for w in Watermark.objects.all()}


def compare(control: dict[str, set[tuple]], faulted: dict[str, set[tuple]]) -> dict[str, int]:
    missing = sum(len(keys - faulted.get(t, set())) for t, keys in control.items())
    extra = sum(len(keys - control.get(t, set())) for t, keys in faulted.items())
    return {"rows_missing": missing, "rows_extra": extra}


def run_control(settings, sources: dict[str, str], control_dir: Path) -> dict[str, object]:
    """The same data through the in-process pipeline with nothing killed; the platform's records
    are emptied afterwards, as they were before it."""
    settings.DATA_DIR = control_dir
    settings.BUSINESS_DB_URL = sources["business"]
    settings.MATOMO_DB_URL = sources["matomo"]
    settings.RECO = {**settings.RECO, "EXTRACT_BATCH_ROWS": 1000}
    run = services.pipeline_run_execute(run_id=services.pipeline_run_create(kind="control").pk)
    assert run.status == RunStatus.SUCCEEDED, run.error
    outcome = {
        "keys": lake_keys(control_dir),
        "frames": frame_rows(control_dir),
        "watermarks": watermark_versions(),
    }
    for model in (PipelineRun, DataQualityReport, Watermark, ExtractionLock, PipelineTriggerLock):
        model.objects.all().delete()
    return outcome


def kill_child_with_broker_down(worker: CeleryProcess, broker: BrokerRedis, data_dir: Path):
    """Wait for KILLED_STAGE's first lake batch, SIGKILL the broker, then the pool child running
    the stage (so its worker cannot even requeue the task), then restart the broker."""
    worker.wait_until(
        f"{KILLED_STAGE} to write its first batch",
        lambda: (
            StageRun.objects.filter(stage=KILLED_STAGE, status=RunStatus.RUNNING).exists()
            and any((data_dir / "raw" / "matomo").rglob("batch-*.parquet"))
        ),
        30,
    )
    [(child, start)] = worker.pool_children()
    assert StageRun.objects.get(stage=KILLED_STAGE).owner.split(":")[1] == str(child)
    broker.kill()
    killed_at = time.monotonic()
    kill_if_same(child, start)
    # (the worker's main process, retrying its broker connection, notices the death only after
    # it reconnects)
    time.sleep(1.0)
    broker.start()
    down = round(time.monotonic() - killed_at, 2)
    worker.wait_until(
        "the worker to see its child die",
        lambda: "WorkerLostError" in worker.text() or "SIGKILL" in worker.text(),
        30,
    )
    return child, down


# --- (a) pool child and broker killed mid-stage ------------------------------------------------


def test_a_stage_killed_while_the_broker_restarts_completes_exactly_once_in_effect(
    env, start_broker, processes, sources, data_dir, tmp_path, settings
):
    # Given the outcome of an uninterrupted control run on the same data
    control = run_control(settings, sources, tmp_path / "control")
    settings.DATA_DIR = data_dir
    # and a durable broker, and a worker whose first attempt at KILLED_STAGE pauses after its
    # first lake batch (before any watermark moves)
    broker = start_broker(durable=True)
    worker = start_worker(
        processes, env(broker, RECO_TEST_STAGE_PAUSE=f"{KILLED_STAGE}:30"), "faults"
    )
    run = services.pipeline_run_create(kind="incremental", triggered_by="pytest")
    started = time.monotonic()
    sender(broker)("pipeline.pipeline_run_execute", [run.pk])

    # When the broker is SIGKILLed, then the pool child running the stage, and the broker is
    # restarted on the same port a second later
    child, broker_down_s = kill_child_with_broker_down(worker, broker, data_dir)
    run = wait_for_run(run.pk, worker, timeout=60)
    seconds = round(time.monotonic() - started, 1)

    # Then the same worker reconnected and the run succeeded, one succeeded row per stage;
    # only the killed stage ran twice
    assert worker.alive()
    assert len(worker.lines("Connected to redis://")) >= 2, worker.tail()
    assert run.status == RunStatus.SUCCEEDED, run.error
    stages = list(run.stages.order_by("id"))
    attempts = {s.stage: s.attempts for s in stages}
    assert [s.stage for s in stages] == list(services.PIPELINE_STAGES)
    assert {s.status for s in stages} == {RunStatus.SUCCEEDED}
    assert attempts == {s: 2 if s == KILLED_STAGE else 1 for s in services.PIPELINE_STAGES}
    assert run.stages.get(stage=KILLED_STAGE).owner.split(":")[1] != str(child)
    assert PipelineRun.objects.count() == 1
    # and its outcome is exactly the control's: no lake key missing or extra, the same frames
    # with no duplicated row, and each watermark advanced once
    faulted = {
        "keys": lake_keys(data_dir),
        "frames": frame_rows(data_dir),
        "watermarks": watermark_versions(),
    }
    diff = compare(control["keys"], faulted["keys"])
    duplicated = sum(dups for _, dups in faulted["frames"].values())
    write_result(
        "celery_child_and_broker_killed",
        {
            "broker": "private redis-server, appendonly yes, appendfsync always",
            "visibility_timeout_s": VISIBILITY_TIMEOUT,
            "broker_down_s": broker_down_s,
            "run_status": run.status,
            "run_seconds": seconds,
            "effective_runs": PipelineRun.objects.filter(status=RunStatus.SUCCEEDED).count(),
            "stage_attempts": attempts,
            "lake_rows_control": sum(len(k) for k in control["keys"].values()),
            "lake_rows_faulted": sum(len(k) for k in faulted["keys"].values()),
            **diff,
            "rows_duplicated": duplicated,
            "frames_control": {k: rows for k, (rows, _) in control["frames"].items()},
            "frames_faulted": {k: rows for k, (rows, _) in faulted["frames"].items()},
            "watermark_advances": faulted["watermarks"],
            "watermark_advances_control": control["watermarks"],
            "worker_connections": len(worker.lines("Connected to redis://")),
        },
    )
    assert diff == {"rows_missing": 0, "rows_extra": 0}
    assert duplicated == 0
    assert faulted["frames"] == control["frames"]
    assert faulted["watermarks"] == control["watermarks"]
    assert set(faulted["watermarks"].values()) == {1}
    assert not ExtractionLock.objects.exclude(holder="").exists()
    assert DataQualityReport.objects.count() == 1


def test_a_stage_finishing_while_the_broker_is_down_hands_its_chain_on_after_the_restart(
    env, start_broker, processes, data_dir
):
    # Given a durable broker and a worker whose KILLED_STAGE pauses 2 s after its first batch
    broker = start_broker(durable=True)
    worker = start_worker(
        processes, env(broker, RECO_TEST_STAGE_PAUSE=f"{KILLED_STAGE}:2"), "publish"
    )
    run = services.pipeline_run_create(kind="incremental", triggered_by="pytest")
    sender(broker)("pipeline.pipeline_run_execute", [run.pk])
    worker.wait_until(
        f"{KILLED_STAGE} to write its first batch",
        lambda: (
            StageRun.objects.filter(stage=KILLED_STAGE, status=RunStatus.RUNNING).exists()
            and any((data_dir / "raw" / "matomo").rglob("batch-*.parquet"))
        ),
        30,
    )

    # When the broker is SIGKILLed, the stage finishes meanwhile, and the broker comes back 5 s
    # later (Celery's default retry policy gives up publishing the next link within a second)
    broker.kill()
    worker.wait_until(
        f"{KILLED_STAGE} to finish",
        lambda: StageRun.objects.filter(stage=KILLED_STAGE, status=RunStatus.SUCCEEDED).exists(),
        20,
    )
    time.sleep(5)
    broker.start()
    run = wait_for_run(run.pk, worker, timeout=60)

    # Then the next link was published after the restart, after more retries than the
    # default's 3 and without giving up, and the run succeeded with every stage run once
    retries = worker.lines("Retrying refused callback publish")
    assert len(retries) > 3, worker.tail()
    assert not worker.lines("Giving up refused callback publish")
    assert run.status == RunStatus.SUCCEEDED, run.error
    attempts = {s.stage: s.attempts for s in run.stages.all()}
    assert attempts == dict.fromkeys(services.PIPELINE_STAGES, 1)
    assert set(watermark_versions().values()) == {1}
    write_result(
        "celery_broker_down_while_a_stage_finishes",
        {
            "broker_down_s": 5,
            "publish_retries": len(retries),
            "publish_gave_up": 0,
            "run_status": run.status,
            "stage_attempts": attempts,
            "watermark_advances": watermark_versions(),
        },
    )


def test_a_whole_worker_killed_mid_stage_is_resumed_by_another_after_the_visibility_timeout(
    env, start_broker, processes, sources, data_dir, tmp_path, settings
):
    # Given the outcome of an uninterrupted control run on the same data
    control = run_control(settings, sources, tmp_path / "control")
    settings.DATA_DIR = data_dir
    # and a worker whose first attempt at KILLED_STAGE pauses after its first lake batch
    broker = start_broker(durable=True)
    first = start_worker(
        processes, env(broker, RECO_TEST_STAGE_PAUSE=f"{KILLED_STAGE}:30"), "lost-node"
    )
    run = services.pipeline_run_create(kind="incremental", triggered_by="pytest")
    sender(broker)("pipeline.pipeline_run_execute", [run.pk])
    first.wait_until(
        f"{KILLED_STAGE} to write its first batch",
        lambda: (
            StageRun.objects.filter(stage=KILLED_STAGE, status=RunStatus.RUNNING).exists()
            and any((data_dir / "raw" / "matomo").rglob("batch-*.parquet"))
        ),
        30,
    )
    [delivered] = [t for t, line in first.lines("received") if "pipeline_stage_execute" in line][
        1:2
    ]

    # When the whole worker (main process and pool child) is SIGKILLed, as with a lost host:
    # nobody is left to requeue its task, and a second worker is started
    first.kill()
    second = start_worker(processes, env(broker), "survivor")
    run = wait_for_run(run.pk, second, timeout=60)

    # Then the second worker got the task back only once the visibility timeout had passed
    [(redelivered, _)] = [
        (t, line) for t, line in second.lines("received") if "pipeline_stage_execute" in line
    ][:1]
    waited = (redelivered - delivered).total_seconds()
    assert waited >= VISIBILITY_TIMEOUT
    # and the run succeeded with the killed stage taken over once, the outcome the control's
    assert run.status == RunStatus.SUCCEEDED, run.error
    attempts = {s.stage: s.attempts for s in run.stages.all()}
    assert attempts == {s: 2 if s == KILLED_STAGE else 1 for s in services.PIPELINE_STAGES}
    diff = compare(control["keys"], lake_keys(data_dir))
    frames = frame_rows(data_dir)
    write_result(
        "celery_whole_worker_killed",
        {
            "visibility_timeout_s": VISIBILITY_TIMEOUT,
            "redelivered_after_s": round(waited, 2),
            "run_status": run.status,
            "stage_attempts": attempts,
            **diff,
            "rows_duplicated": sum(dups for _, dups in frames.values()),
            "watermark_advances": watermark_versions(),
        },
    )
    assert diff == {"rows_missing": 0, "rows_extra": 0}
    assert frames == control["frames"]
    assert watermark_versions() == control["watermarks"]


def test_control_a_broker_without_persistence_loses_the_run_until_the_reaper_fails_it(
    env, start_broker, processes, data_dir, settings
):
    # Given a broker that keeps nothing on disk, and the same worker and faults as above
    broker = start_broker(durable=False)
    worker = start_worker(
        processes, env(broker, RECO_TEST_STAGE_PAUSE=f"{KILLED_STAGE}:30"), "no-persist"
    )
    run = services.pipeline_run_create(kind="incremental", triggered_by="beat")
    sender(broker)("pipeline.pipeline_run_execute", [run.pk])
    kill_child_with_broker_down(worker, broker, data_dir)

    # When the worker has reconnected and the visibility timeout has passed (the task was
    # delivered before that, and unacknowledged tasks are looked for every second)
    worker.wait_until(
        "the worker to reconnect", lambda: len(worker.lines("Connected to redis://")) >= 2, 30
    )
    time.sleep(VISIBILITY_TIMEOUT + 2)

    # Then the fault is visible: the stage's task is gone with the broker's memory, the run is
    # stuck in `running` and blocks every later trigger of its kind
    run.refresh_from_db()
    stages = {s.stage: s.status for s in run.stages.all()}
    assert run.status == RunStatus.RUNNING
    assert stages[KILLED_STAGE] == RunStatus.RUNNING
    assert "canonicalize" not in stages
    assert services.pipeline_run_create_scheduled(kind="incremental") is None
    # and the reaper leaves it alone while it may still come back (within the stale time) ...
    assert services.pipeline_run_reap_stale(stale_seconds=3600) == []
    # ... and fails it once nothing moved for longer, so the next trigger starts a new run
    later = timezone.now() + dt.timedelta(seconds=3601)
    assert services.pipeline_run_reap_stale(stale_seconds=3600, now=later) == [run.pk]
    run.refresh_from_db()
    assert run.status == RunStatus.FAILED
    assert run.error.startswith("reaped:")
    assert run.stages.get(stage=KILLED_STAGE).status == RunStatus.FAILED
    assert services.pipeline_run_create_scheduled(kind="incremental") is not None
    write_result(
        "celery_broker_without_persistence_control",
        {
            "broker": "private redis-server, no AOF, no RDB",
            "visibility_timeout_s": VISIBILITY_TIMEOUT,
            "waited_after_reconnect_s": VISIBILITY_TIMEOUT + 2,
            "run_status_before_reaper": RunStatus.RUNNING,
            "stages_before_reaper": stages,
            "effective_runs": 0,
            "lost_runs": 1,
            "reaped_runs": 1,
            "next_trigger_created_a_run": True,
        },
    )


# --- (b) five concurrent triggers ---------------------------------------------------------------

TRIGGERS = 5
# Each run creation sleeps this long inside the trigger, so the five deliveries all fall in the
# window between "is a run of this kind active?" and "create one" (the race to detect).
TRIGGER_WINDOW = 1.0


def scheduled_results(worker: CeleryProcess) -> list[str]:
    return [line for _, line in worker.lines("pipeline.pipeline_scheduled[") if "succeeded" in line]


def fire_five(worker: CeleryProcess, broker: BrokerRedis) -> dict[str, object]:
    send = sender(broker)
    before = len(scheduled_results(worker))
    for _ in range(TRIGGERS):
        send("pipeline.pipeline_scheduled", ["incremental"])
    worker.wait_until(
        "the five triggers to report",
        lambda: len(scheduled_results(worker)) - before >= TRIGGERS,
        45,
    )
    received = [t for t, line in worker.lines("pipeline.pipeline_scheduled[") if "received" in line]
    results = scheduled_results(worker)[before:]
    return {
        "skipped": sum("skipped" in line for line in results),
        "received_spread_ms": round(
            (max(received[-TRIGGERS:]) - min(received[-TRIGGERS:])).total_seconds() * 1000
        ),
    }


def test_five_simultaneous_triggers_make_one_effective_run(env, start_broker, processes, data_dir):
    # Given a worker with five pool processes, each trigger slowed inside its critical section
    broker = start_broker(durable=True)
    worker_env = env(broker, TEST_TRIGGER_WINDOW_SECONDS=str(TRIGGER_WINDOW))
    worker = start_worker(processes, worker_env, "five", TRIGGERS, wrapper=True)

    # When five scheduled triggers of the same kind arrive at the same moment
    outcome = fire_five(worker, broker)

    # Then one run was created and executed; the four others reported "skipped"
    [run] = PipelineRun.objects.filter(kind="incremental")
    run = wait_for_run(run.pk, worker)
    assert run.status == RunStatus.SUCCEEDED, run.error
    assert outcome["skipped"] == TRIGGERS - 1
    lock = PipelineTriggerLock.objects.get(kind="incremental")
    assert (lock.triggers, lock.skipped, lock.last_run_id) == (TRIGGERS, TRIGGERS - 1, run.pk)
    assert StageRun.objects.filter(pipeline_run=run).count() == len(services.PIPELINE_STAGES)
    assert not StageRun.objects.exclude(pipeline_run=run).exists()
    # and the five really overlapped: all delivered well within the window
    assert outcome["received_spread_ms"] < TRIGGER_WINDOW * 1000
    executed = PipelineRun.objects.filter(stages__isnull=False).distinct().count()
    assert executed == 1

    # Control: the same five triggers against the old check-then-create trigger (pending runs
    # ignored, no lock) make more than one run
    worker.stop()
    naive = start_worker(
        processes, {**worker_env, "TEST_NAIVE_TRIGGER": "1"}, "naive", TRIGGERS, wrapper=True
    )
    naive_outcome = fire_five(naive, broker)
    control = PipelineRun.objects.filter(kind="incremental").exclude(pk=run.pk)
    control_runs = control.count()
    control_started = control.exclude(status=RunStatus.PENDING).count()
    naive.kill()  # its duplicate chains are not needed: the count is the finding
    write_result(
        "celery_five_concurrent_triggers",
        {
            "triggers": TRIGGERS,
            "worker_concurrency": TRIGGERS,
            "trigger_window_s": TRIGGER_WINDOW,
            "received_spread_ms": outcome["received_spread_ms"],
            "effective_runs": executed,
            "runs_created": 1,
            "triggers_skipped": outcome["skipped"],
            "run_status": run.status,
            "control_naive_trigger": {
                "runs_created": control_runs,
                "runs_started": control_started,
                "triggers_skipped": naive_outcome["skipped"],
                "received_spread_ms": naive_outcome["received_spread_ms"],
            },
        },
    )
    assert control_runs > 1


# --- (c) two beats -------------------------------------------------------------------------------

TICK = 3  # seconds between two sends of the test's periodic task
LEASE = 3  # the beats' leader lease (production: 30 s)
TASK_NAME = "test: incremental every 3 s"


def sends(beat: CeleryProcess) -> list[dt.datetime]:
    return [t for t, _ in beat.lines(f"Sending due task {TASK_NAME}")]


def sends_per_tick(times: list[dt.datetime]) -> list[int]:
    """Group sends closer than half a tick together: one group per tick."""
    groups: list[list[dt.datetime]] = []
    for t in sorted(times):
        if groups and (t - groups[-1][0]).total_seconds() < TICK / 2:
            groups[-1].append(t)
        else:
            groups.append([t])
    return [len(g) for g in groups]


def overlapping_runs(runs: list[PipelineRun]) -> int:
    spans = sorted((r.created_at, r.finished_at or timezone.now()) for r in runs)
    return sum(1 for a, b in itertools.pairwise(spans) if b[0] < a[1])


def test_two_beats_send_each_tick_once_and_the_standby_takes_over(
    env, start_broker, processes, data_dir, tmp_path
):
    # Given a worker, a durable broker and a pipeline schedule every TICK seconds
    broker = start_broker(durable=True)
    worker = start_worker(processes, env(broker), "beats")
    every, _ = IntervalSchedule.objects.get_or_create(every=TICK, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(
        name=TASK_NAME,
        task="pipeline.pipeline_scheduled",
        kwargs=json.dumps({"kind": "incremental"}),
        interval=every,
    )
    beat_env = env(broker, CELERY_BEAT_LEADER_LOCK_SECONDS=str(LEASE))

    # When two beats run, and the one holding the lease is SIGKILLed after a few ticks
    beats = [processes(beat_args(tmp_path / f"beat{i}.pid"), beat_env) for i in range(2)]
    taken = "beat leader lock taken"
    beats[0].wait_until("a leader", lambda: any(b.lines(taken) for b in beats), 30)
    [leader] = [b for b in beats if b.lines(taken)]
    [standby] = [b for b in beats if b is not leader]
    time.sleep(2 * TICK)
    leader.kill()
    killed_at = dt.datetime.now(dt.UTC)
    standby.wait_until("the standby to take over", lambda: bool(standby.lines(taken)), 3 * LEASE)
    takeover_s = (standby.lines(taken)[0][0] - killed_at).total_seconds()
    time.sleep(2 * TICK)
    standby.stop()  # releases the lease
    sent = len(sends(leader)) + len(sends(standby))
    worker.wait_until(
        "every send to be handled and the last run to finish",
        lambda: (
            len(scheduled_results(worker)) >= sent
            and not PipelineRun.objects.exclude(status__in=TERMINAL).exists()
        ),
        30,
    )

    # Then every tick was sent once, by the leader before its death and by the standby after
    leader_sends, standby_sends = sends(leader), sends(standby)
    per_tick = sends_per_tick(leader_sends + standby_sends)
    runs = list(PipelineRun.objects.filter(triggered_by="beat"))
    skipped = sum("skipped" in line for line in scheduled_results(worker))
    assert leader_sends
    assert standby_sends
    assert max(leader_sends) < min(standby_sends)
    assert min(standby_sends) > killed_at
    assert set(per_tick) == {1}, per_tick
    # and the standby, once stopped, released the lease and did not take it again
    assert standby.lines("beat leader lock released")
    assert len(standby.lines(taken)) == 1
    # and each send made at most one run, none overlapping another, all succeeded
    assert len(runs) + skipped == len(per_tick)
    assert len(runs) >= 2  # (a run still active at the next tick makes that tick a skip)
    assert overlapping_runs(runs) == 0
    assert {r.status for r in runs} == {RunStatus.SUCCEEDED}

    # Control: two beats without the lease (the stock DatabaseScheduler's behaviour) both send
    PeriodicTask.objects.filter(name=TASK_NAME).update(last_run_at=None)
    plain_env = {**beat_env, "CELERY_BEAT_LEADER_LOCK_URL": ""}
    plain = [processes(beat_args(tmp_path / f"plain{i}.pid"), plain_env) for i in range(2)]
    plain[0].wait_until(
        "both plain beats to send twice", lambda: all(len(sends(b)) >= 2 for b in plain), 30
    )
    for beat in plain:
        beat.stop()
    control_per_tick = sends_per_tick(sends(plain[0]) + sends(plain[1]))
    worker.wait_until(
        "the control's sends to be handled and its runs to finish",
        lambda: (
            len(scheduled_results(worker)) >= sent + sum(control_per_tick)
            and not PipelineRun.objects.exclude(status__in=TERMINAL).exists()
        ),
        30,
    )
    control_runs = list(
        PipelineRun.objects.filter(triggered_by="beat").exclude(pk__in=[r.pk for r in runs])
    )
    write_result(
        "celery_two_beats",
        {
            "tick_s": TICK,
            "leader_lease_s": LEASE,
            "ticks": len(per_tick),
            "tasks_sent": len(leader_sends) + len(standby_sends),
            "sends_per_tick": per_tick,
            "sent_by_leader": len(leader_sends),
            "sent_by_standby_after_takeover": len(standby_sends),
            "takeover_s": round(takeover_s, 2),
            "effective_runs": len(runs),
            "triggers_skipped": skipped,
            "overlapping_runs": overlapping_runs(runs),
            "beats_sending_while_both_alive": sum(
                any(t < killed_at for t in sends(b)) for b in beats
            ),
            "control_two_beats_without_lease": {
                "beats_sending_while_both_alive": sum(bool(sends(b)) for b in plain),
                "tasks_sent": sum(len(sends(b)) for b in plain),
                "sends_per_tick": control_per_tick,
                "effective_runs": len(control_runs),
                "overlapping_runs": overlapping_runs(control_runs),
            },
        },
    )
    assert all(len(sends(b)) >= 2 for b in plain)  # (waited for above: both beats send)
    # and even then the atomic trigger kept the duplicate sends from overlapping runs
    assert overlapping_runs(control_runs) == 0
