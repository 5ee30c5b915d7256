"""Real Celery processes for the Celery fault scenarios: a private broker, workers, beats.

Everything here runs against a private redis-server on a free loopback port (never the shared
Redis on 6379) and the test's own SQLite database file, DATA_DIR and demo sources. Processes
are signalled only by the pids this module started.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.reliability.serving_fixtures import RedisProcess

REPO = Path(__file__).resolve().parents[2]
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}):")


class BrokerRedis(RedisProcess):
    """A private redis-server for the broker, durable like docker-compose.yml's or not at all.

    Durable: every write is in the append-only file (``appendfsync always``) before Redis
    answers, so a SIGKILL loses nothing it acknowledged and a restart reloads the queues.
    """

    def __init__(self, workdir: Path, *, durable: bool) -> None:
        self.durable = durable
        super().__init__(workdir)

    def persistence(self) -> list[str]:
        if self.durable:
            return ["--appendonly", "yes", "--appendfsync", "always"]
        return ["--appendonly", "no"]


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state [0], ppid [1], start [19])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of the live child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and fields[1] == str(pid) and fields[0] != "Z":
                found.append((int(entry.name), fields[19]))
    return found


def kill_if_same(pid: int, start: str) -> None:
    """SIGKILL ``pid`` only if it is still the process seen earlier (pids can be reused)."""
    fields = _stat(pid)
    if fields and fields[19] == start:
        os.kill(pid, signal.SIGKILL)


class CeleryProcess:
    """A `celery worker` or `celery beat` subprocess started by a test, logging to a file.

    ``wrapper`` runs `python -m tests.reliability.celery_trigger_worker` instead of
    `python -m celery`: the same command after the test-only patches that module applies.
    """

    def __init__(self, args: list[str], env: dict[str, str], log: Path, *, wrapper: bool = False):
        self.log = log
        self._log_file = log.open("wb")
        module = "tests.reliability.celery_trigger_worker" if wrapper else "celery"
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "-A", "recoplatform", *args],
            cwd=REPO,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        self._children: list[tuple[int, str]] = []

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self, pattern: str) -> list[tuple[dt.datetime, str]]:
        """(time, line) of each log line that contains ``pattern`` (Celery logs local time)."""
        found = []
        for line in self.text().splitlines():
            match = LOG_TIME.match(line)
            if match and pattern in line:
                local = dt.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f")  # noqa: DTZ007
                found.append((local.astimezone(), line))
        return found

    def wait_until(self, what: str, predicate: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if not self.alive():
                pytest.fail(f"{what}: process exited ({self.process.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; log:\n{self.tail()}")
            time.sleep(0.1)

    def tail(self) -> str:
        return self.text()[-4000:]

    def pool_children(self) -> list[tuple[int, str]]:
        found = children(self.pid) if self.alive() else []
        self._children += [c for c in found if c not in self._children]
        return found

    def kill(self) -> None:
        """SIGKILL this process and the children seen so far (by pid and start time)."""
        known = self._children + self.pool_children()
        if self.alive():
            self.process.kill()
            self.process.wait(5)
        for pid, start in known:
            kill_if_same(pid, start)

    def stop(self, timeout: float = 20) -> None:
        """Warm shutdown (SIGTERM); SIGKILL it and its children if it hangs."""
        known = self._children + self.pool_children()
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for pid, start in known:
            kill_if_same(pid, start)
        if not self._log_file.closed:
            self._log_file.close()


def worker_args(name: str, concurrency: int = 1) -> list[str]:
    return [
        "worker",
        "--pool=prefork",
        f"--concurrency={concurrency}",
        "--loglevel=INFO",
        f"--hostname={name}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def beat_args(pidfile: Path) -> list[str]:
    return ["beat", "--loglevel=INFO", "--max-interval=1", f"--pidfile={pidfile}"]
