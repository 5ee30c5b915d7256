"""Serving fixtures: a private, throw-away redis-server that tests may stop, resume and kill.

Fault injection signals only the process started here; the shared Redis on 6379 is used by
the rest of the suite and by CI and must never be paused or killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SHARED_REDIS_PORT = 6379


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class PrivateRedis:
    """A redis-server this test owns: `url`, `pid`, and the faults it can be put through."""

    port: int
    process: subprocess.Popen[bytes]
    stopped: bool = field(default=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGSTOP: the peer hangs with its sockets open (the worst case for timeouts)."""
        self._signal(signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        """SIGCONT after `stop`."""
        self._signal(signal.SIGCONT)
        self.stopped = False

    def kill(self) -> None:
        """SIGKILL: connections are refused from now on."""
        if self.process.poll() is None:
            self._signal(signal.SIGKILL)
            self.process.wait(timeout=5)
        self.stopped = False

    def _signal(self, sig: signal.Signals) -> None:
        assert self.port != SHARED_REDIS_PORT, "never signal the shared Redis"
        self.process.send_signal(sig)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """Start a private redis-server on a free loopback port (no persistence, data dir under
    tmp_path); kill it at teardown whatever state the test left it in."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("redis-server is not installed (CI=true: must not skip)")
        pytest.skip("redis-server is not installed")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server: PrivateRedis | None = None
    # The free port can be taken between probing and binding: try a few.
    for _ in range(3):
        port = _free_port()
        assert port != SHARED_REDIS_PORT
        process = subprocess.Popen(
            [
                binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", str(workdir),
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "no",
                "--loglevel", "warning",
                "--logfile", str(workdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.poll() is None and not _pings(port):
            time.sleep(0.02)
        if process.poll() is None and _pings(port):
            server = PrivateRedis(port, process)
            break
        process.kill()
        process.wait(timeout=5)
    if server is None:
        pytest.fail("could not start a private redis-server")
    try:
        yield server
    finally:
        if server.process.poll() is None:
            if server.stopped:
                server.resume()  # a stopped process would not act on SIGTERM
            server.process.terminate()
            try:
                server.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait(timeout=5)


@pytest.fixture(autouse=True)
def _exposure_log_in_tmp(tmp_path):
    """Keep every serving test's exposure and feedback lines out of the repository's var/."""
    from apps.serving import exposure

    writer = exposure.ExposureWriter(tmp_path / "exposures" / "exposures.jsonl")
    previous = exposure.set_writer(writer)
    try:
        yield writer
    finally:
        exposure.set_writer(previous)
        writer.close()
