"""The pipeline chain on a real Celery worker (prefork pool) against the Redis broker.

Each test starts `celery -A recoplatform worker` as a subprocess on Redis database 13 (flushed
before and after), pointed at this test's SQLite database file, DATA_DIR and demo sources.
Workers are stopped in teardown by the pids this module started, never by name.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from celery import Celery
from django.conf import settings as django_settings
from django.db import connection

from apps.pipeline import demo, services
from apps.pipeline.lake import Lake
from apps.pipeline.models import (
    DataQualityReport,
    ExtractionLock,
    PipelineRun,
    RunStatus,
    StageRun,
    Watermark,
)
from tests.conftest import flushed_redis_db
from tests.demo_frames import write_demo_sources
from tests.reliability.celery_fixtures import children, kill_if_same

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis, pytest.mark.slow]

BROKER_DB = 13
REPO = Path(django_settings.BASE_DIR)
# An hour back: every demo row is older than the sources' safety lag (at most minutes), so a
# run a few seconds later reads exactly the same rows as the control.
END = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0) - dt.timedelta(hours=1)
# The stage the kill test interrupts, and how long its first attempt pauses after writing its
# first lake batch (before any watermark moves): the window in which the test kills it.
KILLED_STAGE = "extract_matomo"
PAUSE_SECONDS = 8


# --- processes ---------------------------------------------------------------------------------


class Worker:
    """A `celery worker` subprocess started by this test."""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "recoplatform",
                "worker",
                "--pool=prefork",
                "--concurrency=1",
                "--loglevel=INFO",
                f"--hostname={name}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=REPO,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        self._children: list[tuple[int, str]] = []

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.process.poll() is not None:
                pytest.fail(f"worker exited ({self.process.returncode}):\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; worker log:\n{self.text()[-3000:]}")
            time.sleep(0.1)

    def wait_ready(self) -> None:
        self.wait_until("the worker to be ready", lambda: " ready." in self.text(), 45)
        self._children = children(self.process.pid)

    def pool_children(self) -> list[tuple[int, str]]:
        found = children(self.process.pid)
        self._children += [c for c in found if c not in self._children]
        return found

    def stop(self, timeout: float = 20) -> None:
        """Warm shutdown (SIGTERM); SIGKILL the worker and its pool children if it hangs."""
        known = self._children + self.pool_children() if self.process.poll() is None else []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for pid, start in known:
            kill_if_same(pid, start)
        self._log_file.close()


@pytest.fixture
def broker_url() -> Iterator[str]:
    """A Redis database (13) for the broker, empty before and after the test."""
    yield from flushed_redis_db(BROKER_DB)


@pytest.fixture
def sources(tmp_path) -> dict[str, str]:
    """Small demo business + Matomo SQLite databases (same data for every test: fixed seed)."""
    return write_demo_sources(
        tmp_path, demo.DemoConfig(users=150, items=60, actions=6000, days=20, seed=7, end=END)
    )


@pytest.fixture
def worker_env(broker_url, sources, data_dir) -> dict[str, str]:
    """The environment of a worker that shares this test's database, DATA_DIR and sources."""
    database = connection.settings_dict["NAME"]
    assert Path(database).is_file(), "the test database must be a file the worker can open"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CELERY_", "RECO_", "DATABASE_", "REDIS_"))
    }
    env.update(
        DJANGO_SETTINGS_MODULE="recoplatform.settings",
        DATABASE_URL=f"sqlite:///{database}",
        DATA_DIR=str(data_dir),
        BUSINESS_DB_URL=sources["business"],
        MATOMO_DB_URL=sources["matomo"],
        CELERY_BROKER_URL=broker_url,
        # Several lake batches per Matomo table, so a crash can fall between two of them.
        RECO_EXTRACT_BATCH_ROWS="1000",
        # Django's system checks (which import every app's URLs) are `manage.py check`'s job;
        # in a worker started per test they only add start-up time.
        CELERY_SKIP_CHECKS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def start_worker(tmp_path) -> Iterator[Callable[..., Worker]]:
    """Start workers; every one still running is stopped at teardown."""
    started: list[Worker] = []

    def start(env: dict[str, str], **extra: str) -> Worker:
        worker = Worker(
            f"w{len(started)}", {**env, **extra}, tmp_path / f"worker{len(started)}.log"
        )
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture
def send(broker_url) -> Iterator[Callable[[str, list], None]]:
    """Send a task by name through the broker (this test process itself runs Celery eagerly)."""
    producer = Celery("test-producer", broker=broker_url, set_as_current=False)

    def send_task(name: str, args: list) -> None:
        producer.send_task(name, args=args)

    yield send_task
    producer.close()


def wait_for_run(run_id: int, worker: Worker, timeout: float = 45) -> PipelineRun:
    finished = (RunStatus.SUCCEEDED, RunStatus.FAILED)
    worker.wait_until(
        f"run #{run_id} to finish",
        lambda: PipelineRun.objects.get(pk=run_id).status in finished,
        timeout,
    )
    return PipelineRun.objects.get(pk=run_id)


# --- what a run leaves behind ------------------------------------------------------------------


def footprint(data_dir: Path) -> dict[str, object]:
    """What a run produced: lake rows per table, canonical frame rows, watermark moves."""
    contract = services.get_contract()
    lake = Lake(data_dir / "raw")
    frames = {
        f"{stage}/{name}": len(pd.read_parquet(data_dir / stage / f"{name}.parquet"))
        for stage in ("staged", "clean")
        for name in ("users", "items", "interactions")
    }
    return {
        "lake": {
            (source, table): lake.row_count(source, table)
            for source, spec in contract.sources.items()
            for table in spec.tables
        },
        "frames": frames,
        # each watermark moved once (version 1); id cursors also end at the same id
        "watermarks": {
            (w.source, w.table): (
                w.version,
                w.value if (w.value or {}).get("kind") == "id" else w.value["kind"],
            )
            for w in Watermark.objects.all()
        },
    }


def lake_tokens(data_dir: Path, source: str) -> set[int]:
    """Fencing tokens found in a source's lake file names (``...-t<token>.parquet``)."""
    return {
        int(path.stem.rsplit("-t", 1)[1])
        for path in (data_dir / "raw" / source).rglob("*.parquet")
        if not path.name.startswith(".")
    }


# --- tests -------------------------------------------------------------------------------------


def test_a_run_is_a_chain_of_stage_tasks_that_completes_on_a_worker(worker_env, start_worker, send):
    # Given a worker and a pending run
    worker = start_worker(worker_env)
    run = services.pipeline_run_create(kind="incremental", triggered_by="pytest")
    # When the run's task goes through the broker
    send("pipeline.pipeline_run_execute", [run.pk])
    run = wait_for_run(run.pk, worker)
    # Then it succeeded, every stage once and in order
    assert run.status == RunStatus.SUCCEEDED, run.error
    stages = list(run.stages.order_by("id"))
    assert [(s.stage, s.status, s.attempts) for s in stages] == [
        (stage, RunStatus.SUCCEEDED, 1) for stage in services.PIPELINE_STAGES
    ]
    assert PipelineRun.objects.count() == 1
    # and each stage ran as its own task, in the worker's pool process (not in this process)
    [(child, _)] = worker.pool_children()
    owners = [s.owner.split(":") for s in stages]
    assert {pid for _, pid, _ in owners} == {str(child)}
    assert len({task for _, _, task in owners}) == len(stages)
    assert str(os.getpid()) not in {pid for _, pid, _ in owners}
    # and the chain's entry, each stage and the finish were tasks the worker ran
    log = worker.text()
    assert log.count("pipeline.pipeline_stage_execute[") >= len(stages)
    assert "pipeline.pipeline_run_finish[" in log

    # When beat's scheduled task arrives, it creates a run and chains its stages the same way
    send("pipeline.pipeline_scheduled", ["incremental"])
    worker.wait_until(
        "the scheduled run", lambda: PipelineRun.objects.filter(triggered_by="beat").exists(), 20
    )
    scheduled = wait_for_run(PipelineRun.objects.get(triggered_by="beat").pk, worker)
    assert scheduled.status == RunStatus.SUCCEEDED, scheduled.error
    assert [s.stage for s in scheduled.stages.order_by("id")] == list(services.PIPELINE_STAGES)


def test_a_stage_killed_mid_task_is_re_run_once_in_effect_on_a_new_worker(
    worker_env, start_worker, send, data_dir, tmp_path, settings
):
    # Given a control: the same data through the in-process pipeline, with nothing killed
    settings.DATA_DIR = control_dir = tmp_path / "control"
    settings.BUSINESS_DB_URL = worker_env["BUSINESS_DB_URL"]
    settings.MATOMO_DB_URL = worker_env["MATOMO_DB_URL"]
    settings.RECO = {**settings.RECO, "EXTRACT_BATCH_ROWS": 1000}
    control_run = services.pipeline_run_execute(
        run_id=services.pipeline_run_create(kind="control").pk
    )
    assert control_run.status == RunStatus.SUCCEEDED, control_run.error
    control = footprint(control_dir)
    # (the platform's records start empty again, as they were for the control)
    for model in (PipelineRun, DataQualityReport, Watermark, ExtractionLock):
        model.objects.all().delete()
    settings.DATA_DIR = data_dir

    # and a worker whose first attempt at extract_matomo pauses after its first lake batch
    first = start_worker(worker_env, RECO_TEST_STAGE_PAUSE=f"{KILLED_STAGE}:{PAUSE_SECONDS}")
    run = services.pipeline_run_create(kind="incremental", triggered_by="pytest")
    send("pipeline.pipeline_run_execute", [run.pk])
    first.wait_until(
        f"{KILLED_STAGE} to write its first batch",
        lambda: (
            StageRun.objects.filter(stage=KILLED_STAGE, status=RunStatus.RUNNING).exists()
            and any((data_dir / "raw" / "matomo").rglob("batch-*.parquet"))
        ),
        30,
    )
    stage = StageRun.objects.get(stage=KILLED_STAGE)
    [(child, start)] = first.pool_children()
    assert stage.owner.split(":")[1] == str(child)  # the pool child runs the stage right now

    # When that pool child is killed (SIGKILL, as the OOM killer would), its worker is stopped
    # and a new worker is started
    kill_if_same(child, start)
    first.wait_until(
        "the worker to see its child die",
        lambda: "WorkerLostError" in first.text() or "SIGKILL" in first.text(),
        20,
    )
    first.stop()
    second = start_worker(worker_env)
    run = wait_for_run(run.pk, second)

    # Then the run succeeded with one succeeded row per stage; only the killed stage ran twice
    assert run.status == RunStatus.SUCCEEDED, run.error
    stages = list(run.stages.order_by("id"))
    assert [s.stage for s in stages] == list(services.PIPELINE_STAGES)
    assert {s.status for s in stages} == {RunStatus.SUCCEEDED}
    assert {s.stage: s.attempts for s in stages} == {
        stage: 2 if stage == KILLED_STAGE else 1 for stage in services.PIPELINE_STAGES
    }
    assert StageRun.objects.filter(status=RunStatus.SUCCEEDED).count() == len(stages)
    killed = run.stages.get(stage=KILLED_STAGE)
    assert killed.owner.split(":")[1] != str(child)
    # and the killed attempt had written to the lake under an older fencing token
    assert len(lake_tokens(data_dir, "matomo")) == 2
    # and the outcome is exactly the clean run's: lake rows, frames, each watermark moved once
    assert footprint(data_dir) == control
    assert set(Watermark.objects.values_list("version", flat=True)) == {1}
    assert not ExtractionLock.objects.exclude(holder="").exists()
    assert DataQualityReport.objects.count() == 1
