"""A private MariaDB server for the reliability scenarios, safe to stop, hang and kill.

`MariaDBProcess` runs `/usr/sbin/mariadbd` on a throw-away data directory (made by
`mariadb-install-db`), on a free loopback port and its own socket, small enough to start in
about a second: 16 MB buffer pool, 8 MB redo log, no binary log, no performance schema.

Only the process started here is ever signalled, by pid. The machine's shared MariaDB (3306)
is used by the rest of the suite and by CI: nothing here connects to it, let alone stops it.

`kill()` + `start()` restarts on the same data directory and port, so committed rows survive
(InnoDB crash recovery), as after a real crash of the source database.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.serving_fixtures import IN_CI, SHARED_PORTS, PrivateServer, free_port

MARIADBD = "/usr/sbin/mariadbd"
INSTALL_DB = "mariadb-install-db"


def _require(path: str) -> str:
    found = shutil.which(path)
    if found is None:
        message = f"{path} is not installed (the reliability scenarios run a private MariaDB)"
        if IN_CI:
            pytest.fail(f"{message}; CI=true: reliability tests must not skip")
        pytest.skip(message)
    return found


def process_state(pid: int) -> str | None:
    """The one-letter state of `pid` from /proc (`T` stopped, `Z` zombie), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


class MariaDBProcess(PrivateServer):
    """A private mariadbd on a free loopback port with its data in `workdir/data`."""

    kill_wait_s = 10.0
    term_wait_s = 20.0  # InnoDB flushes on a clean shutdown

    def __init__(self, workdir: Path) -> None:
        self.binary = _require(MARIADBD)
        self.workdir = workdir
        self.datadir = workdir / "data"
        self.socket = workdir / "mariadb.sock"
        self.log = workdir / "mariadb.err"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped = False
        self.starts = 0
        workdir.mkdir(parents=True, exist_ok=True)
        self._install()
        self.start()

    # -- addresses -------------------------------------------------------------------------

    def url(self, database: str = "", port: int | None = None) -> str:
        """A source URL as the platform takes it (`mysql://root@host:port/db`); `port`
        replaces the server's (a fault proxy in front of it)."""
        return f"mysql://root@127.0.0.1:{port or self.port}/{database}"

    def connect(self, database: str = "", timeout: int = 5):  # type: ignore[no-untyped-def]
        """A direct MySQLdb connection (root, no password) with short timeouts."""
        import MySQLdb

        return MySQLdb.connect(
            host="127.0.0.1",
            port=self.port,
            user="root",
            passwd="",
            db=database,
            connect_timeout=timeout,
            read_timeout=timeout,
            charset="utf8mb4",
        )

    def create_database(self, name: str) -> str:
        """Create (or empty and re-create) database `name`; its URL."""
        conn = self.connect()
        try:
            cur = conn.cursor()
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        finally:
            conn.close()
        return self.url(name)

    # -- lifecycle -------------------------------------------------------------------------

    def _install(self) -> None:
        done = subprocess.run(
            [
                _require(INSTALL_DB),
                "--no-defaults",
                f"--datadir={self.datadir}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
                *self._sizing(),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"mariadb-install-db failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")

    @staticmethod
    def _sizing() -> list[str]:
        return [
            "--innodb-buffer-pool-size=16M",
            "--innodb-log-file-size=8M",
            # Committed rows reach the OS at commit: they survive a SIGKILL of the server (not
            # a power cut, which these scenarios do not simulate).
            "--innodb-flush-log-at-trx-commit=2",
            "--innodb-doublewrite=0",
            "--innodb-use-native-aio=0",
        ]

    def start(self) -> None:
        """Start mariadbd (again) on the same data directory and port; wait until it answers."""
        assert self.port not in SHARED_PORTS, "never start on a shared service's port"
        if self.process is not None and self.process.poll() is None:
            return
        self.process = subprocess.Popen(
            [
                self.binary,
                "--no-defaults",  # must come first: no /etc/mysql config, no shared socket
                f"--datadir={self.datadir}",
                f"--socket={self.socket}",
                f"--pid-file={self.workdir / 'mariadb.pid'}",
                f"--log-error={self.log}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-log-bin",
                "--skip-name-resolve",
                "--performance-schema=OFF",
                "--max-connections=64",
                # Source DATETIMEs are naive UTC; NOW() too, like the platform's sources.
                "--default-time-zone=+00:00",
                *self._sizing(),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.stopped = False
        self.starts += 1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                self.connect(timeout=1).close()
                return
            except Exception:
                time.sleep(0.05)
        log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        self.close()
        pytest.fail(f"could not start a private mariadbd on port {self.port}:\n{log}")

    def _after_signal(self, sig: signal.Signals) -> None:
        """Return once the kernel reports the process stopped (SIGSTOP) or running again."""
        if sig == signal.SIGSTOP:
            self._wait_state(lambda s: s == "T", "stopped")
        elif sig == signal.SIGCONT:
            self._wait_state(lambda s: s != "T", "running")

    def _signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        assert self.process.poll() is None
        super()._signal(sig)

    def _wait_state(self, ok, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + 5
        while not ok(process_state(self.pid) or "?"):
            if time.monotonic() > deadline:
                pytest.fail(f"mariadbd (pid {self.pid}) did not become {what}")
            time.sleep(0.005)


@contextlib.contextmanager
def private_mariadb(workdir: Path) -> Iterator[MariaDBProcess]:
    """A private mariadbd for the duration of the block; whatever state it was left in
    (stopped, killed), it is stopped at the end and its data directory removed."""
    server = MariaDBProcess(workdir)
    try:
        yield server
    finally:
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def mariadb_server(tmp_path: Path) -> Iterator[MariaDBProcess]:
    """A private mariadbd for one test."""
    with private_mariadb(tmp_path / "mariadb") as server:
        yield server


__all__ = ["MariaDBProcess", "mariadb_server", "private_mariadb", "process_state"]
