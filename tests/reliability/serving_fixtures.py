"""Real processes for the serving reliability scenarios: a trained demo site, private Redis
servers, the production gunicorn server, an open-loop load with faults on a timeline, and
the JSON result files.

Only processes started here are ever signalled, by pid. The machine's shared Redis (6379)
and MariaDB (3306) are used by the rest of the suite and by CI: nothing here touches them,
and every child process gets explicit URLs (a developer's REDIS_URL in the environment must
not make a scenario publish to, or read from, the shared Redis).

The load generator is `benchmarks/serving_load.py`'s (open loop, every request timed from its
scheduled send time, in a second process); `run_load` adds a timeline of fault injections
executed by the test's process while the load runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from benchmarks import loadgen
from benchmarks.serving_load import LoadProcess, choose_generator, worker_pids

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO / "benchmarks" / "results" / "reliability"
SHARED_PORTS = frozenset({6379, 3306})
IN_CI = os.environ.get("CI", "").lower() == "true"
SECRET = "reliability-tests-only-secret-key-0123456789"

# Demo sizes: the smallest data that trains every channel and the ranker (about 20-30 s on
# this 2-core machine); the scenarios need a real bundle, not a big one.
DEMO_USERS = 200
DEMO_ITEMS = 60
DEMO_ACTIONS = 8000
DEMO_SEED = 7
SITE_FILE = "site.json"

# Environment variables a child must never inherit: each points at a service or a database
# the scenarios set explicitly.
_INHERITED_BLOCKLIST = re.compile(
    r"^(REDIS_URL|DATABASE_URL|BUSINESS_DB_URL|MATOMO_DB_URL|CELERY_\w+|MLFLOW_\w+|DATA_DIR|"
    r"PROMETHEUS_MULTIPROC_DIR|RECO_\w+|DJANGO_\w+)$"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    assert port not in SHARED_PORTS
    return port


def _require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is not installed (CI=true: reliability tests must not skip)")
        pytest.skip(f"{name} is not installed")
    return path


def base_env(**overrides: str) -> dict[str, str]:
    """The parent's environment without service URLs, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not _INHERITED_BLOCKLIST.match(k)}
    env.update(PYTHONUNBUFFERED="1", DJANGO_SETTINGS_MODULE="recoplatform.settings")
    env.update(overrides)
    return env


# -- Redis ---------------------------------------------------------------------------------


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class PrivateServer:
    """Signals for a server process a test started (`self.process`, on `self.port`): stop
    (SIGSTOP), resume, kill, restart and close, always by pid, never on a shared port.
    Subclasses implement `start()` and may wait for a state in `_after_signal`."""

    process: subprocess.Popen[bytes] | None
    port: int
    stopped: bool
    # Seconds to wait for the process to exit after SIGKILL and after SIGTERM.
    kill_wait_s = 5.0
    term_wait_s = 5.0

    def start(self) -> None:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        """SIGSTOP: the peer hangs with its sockets open (the worst case for timeouts)."""
        self._signal(signal.SIGSTOP)
        self.stopped = True
        self._after_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `stop`."""
        self._signal(signal.SIGCONT)
        self.stopped = False
        self._after_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL: open connections drop, new ones are refused (nothing listens)."""
        if self.process is not None and self.process.poll() is None:
            self._signal(signal.SIGKILL)
            self.process.wait(timeout=self.kill_wait_s)
        self.stopped = False

    def restart(self) -> None:
        """`kill`, then `start` again on the same port (and data directory)."""
        self.kill()
        self.start()

    def close(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        if self.stopped:
            self.resume()  # a stopped process would not act on SIGTERM
        process.terminate()
        try:
            process.wait(timeout=self.term_wait_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def _after_signal(self, sig: signal.Signals) -> None:
        """Hook: wait until the process is in the state `sig` asked for (default: no wait)."""

    def _signal(self, sig: signal.Signals) -> None:
        assert self.port not in SHARED_PORTS, "never signal a shared service"
        assert self.process is not None
        self.process.send_signal(sig)  # by pid: only the process this object started


class RedisProcess(PrivateServer):
    """A private redis-server on a free loopback port, with its data in `workdir`.

    No automatic persistence by default; `snapshot()` writes dump.rdb on demand, and
    `restart()` on the same port loads it when it exists, as a Redis with RDB persistence
    would after a crash. Subclasses change `persistence()` (the broker's append-only file).
    """

    def __init__(self, workdir: Path) -> None:
        self.binary = _require_binary("redis-server")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process = None
        self.stopped = False
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def persistence(self) -> list[str]:
        return ["--dbfilename", "dump.rdb", "--appendonly", "no"]

    def start(self) -> None:
        assert self.port not in SHARED_PORTS
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.workdir),
                "--save", "",
                *self.persistence(),
                "--daemonize", "no",
                "--loglevel", "warning",
                "--logfile", str(self.workdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if _pings(self.port):  # a Redis still loading its data answers -LOADING, not PONG
                return
            time.sleep(0.02)
        self.close()
        pytest.fail(f"could not start a private redis-server on port {self.port}")

    def client(self):  # type: ignore[no-untyped-def]
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def snapshot(self) -> None:
        """SAVE: what is in memory now is what a restart loads."""
        client = self.client()
        try:
            client.save()
        finally:
            client.close()


# -- the demo site (one per test session) ----------------------------------------------------


@dataclass(frozen=True)
class DemoSite:
    """A DATA_DIR with demo sources, a trained primary bundle and a registered candidate
    (a copy of the primary's bundle under another version), plus the registry database."""

    data_dir: Path
    database: Path
    primary: str
    candidate: str
    bundles: dict[str, Path]
    user_ids: tuple[int, ...]
    build_seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "data_dir": str(self.data_dir),
            "database": str(self.database),
            "primary": self.primary,
            "candidate": self.candidate,
            "bundles": {k: str(v) for k, v in self.bundles.items()},
            "user_ids": list(self.user_ids),
            "build_seconds": self.build_seconds,
        }

    def for_you_paths(self, limit: int = 20, users: int = 150) -> list[str]:
        return [
            f"/api/v1/recommendations/for-you?user_id={u}&limit={limit}"
            for u in self.user_ids[:users]
        ]

    def publish(self, redis_url: str, *versions: str) -> None:
        """Write the versions' candidate lists to Redis (the path the train stage and
        `manage.py sync_redis` take), pointer flipped last."""
        import redis

        from apps.serving.engine.publish import publish_from_bundle

        client = redis.Redis.from_url(redis_url, socket_timeout=5)
        try:
            for version in versions or (self.primary,):
                publish_from_bundle(client, self.bundles[version], version)
            # Point at the primary, as after a normal publish of the serving version.
            client.set("reco:current", self.primary)
        finally:
            client.close()

    def copy_database(self, target: Path) -> Path:
        """A private copy of the registry database (a server's promotions stay its own)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        source = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)
        finally:
            source.close()
            copy.close()
        return target


def _manage(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"manage.py {' '.join(args)} failed ({done.returncode}):\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout


def build_demo_site(root: Path) -> DemoSite:
    """make_demo_data (small) + run_pipeline --kind full (trains and auto-promotes the first
    model) + a second registered version; no Redis involved (each scenario publishes to its
    own)."""
    started = time.monotonic()
    data_dir = root / "data"
    data_dir.mkdir(parents=True)
    database = data_dir / "recoplatform.sqlite3"
    env = base_env(
        DATA_DIR=str(data_dir),
        DATABASE_URL=f"sqlite:///{database}",
        REDIS_URL="",
        CELERY_BROKER_URL="",
        DJANGO_DEBUG="1",
        LOG_LEVEL="WARNING",
    )
    _manage(env, "migrate", "--noinput", "-v", "0")
    _manage(
        env,
        "make_demo_data",
        "--reset",
        "--users", str(DEMO_USERS),
        "--items", str(DEMO_ITEMS),
        "--actions", str(DEMO_ACTIONS),
        "--seed", str(DEMO_SEED),
        "--no-progress",
    )  # fmt: skip
    _manage(env, "run_pipeline", "--kind", "full", "--no-progress", timeout=600)
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT version, bundle_path FROM registry_modelversion WHERE status = 'primary'"
        ).fetchone()
    assert row is not None, "the pipeline did not promote a primary"
    primary, primary_bundle = row[0], Path(row[1])
    candidate = f"{primary}-b"
    copied = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.reliability.registry_ops",
            "register-copy",
            primary,
            candidate,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert copied.returncode == 0, copied.stderr[-3000:]
    candidate_bundle = Path(json.loads(copied.stdout.strip().splitlines()[-1])["bundle_path"])
    with sqlite3.connect(f"file:{primary_bundle / 'store.sqlite3'}?mode=ro", uri=True) as conn:
        users = tuple(r[0] for r in conn.execute("SELECT user_id FROM user_recs ORDER BY user_id"))
    assert users, "the bundle has no per-user lists"
    site = DemoSite(
        data_dir=data_dir,
        database=database,
        primary=primary,
        candidate=candidate,
        bundles={primary: primary_bundle, candidate: candidate_bundle},
        user_ids=users,
        build_seconds=round(time.monotonic() - started, 1),
    )
    (root / SITE_FILE).write_text(json.dumps(site.to_json(), indent=2))
    return site


def load_demo_site(root: Path) -> DemoSite:
    """A site `build_demo_site(root)` built before (benchmarks reuse one with --site)."""
    doc = json.loads((root / SITE_FILE).read_text())
    return DemoSite(
        data_dir=Path(doc["data_dir"]),
        database=Path(doc["database"]),
        primary=doc["primary"],
        candidate=doc["candidate"],
        bundles={k: Path(v) for k, v in doc["bundles"].items()},
        user_ids=tuple(doc["user_ids"]),
        build_seconds=doc["build_seconds"],
    )


@pytest.fixture(scope="session")
def demo_site(tmp_path_factory: pytest.TempPathFactory) -> DemoSite:
    """One trained demo site per test session (about half a minute)."""
    _require_binary("redis-server")
    return build_demo_site(tmp_path_factory.mktemp("reliability-site"))


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private redis-server for one test; killed at teardown whatever state it was left in."""
    server = RedisProcess(tmp_path / "redis")
    try:
        yield server
    finally:
        server.close()


# -- the production server ------------------------------------------------------------------


_MODEL_INFO = re.compile(r'^recommendation_model_info\{[^}]*pid="(\d+)"[^}]*version="([^"]+)"')
_MODEL_INFO_ALT = re.compile(r'^recommendation_model_info\{[^}]*version="([^"]+)"[^}]*pid="(\d+)"')


class Server:
    """gunicorn with gunicorn.conf.py (the production config), `workers` workers, on a free
    loopback port, against `site` with its own registry copy, Prometheus directory and logs."""

    def __init__(
        self,
        site: DemoSite,
        workdir: Path,
        redis_url: str,
        *,
        workers: int = 2,
        settings: dict[str, str] | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.site = site
        self.workdir = workdir
        self.workers = workers
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        database = site.copy_database(workdir / "registry.sqlite3")
        self.env = base_env(
            DATA_DIR=str(site.data_dir),
            DATABASE_URL=f"sqlite:///{database}",
            REDIS_URL=redis_url,
            CELERY_BROKER_URL="",
            DJANGO_DEBUG="0",
            DJANGO_SECRET_KEY=SECRET,
            # Production settings otherwise; TLS ends at a proxy in front of gunicorn, and the
            # load generator speaks plain HTTP to gunicorn as that proxy would.
            DJANGO_SECURE_SSL_REDIRECT="0",
            PROMETHEUS_MULTIPROC_DIR=str(workdir / "prometheus"),
            RECO_BIND=f"127.0.0.1:{self.port}",
            RECO_WORKERS=str(workers),
            RECO_EXPOSURE_LOG=str(workdir / "exposures" / "exposures.jsonl"),
            LOG_LEVEL="WARNING",
            **(settings or {}),
        )
        self.log_path = workdir / "gunicorn.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py",
             "recoplatform.wsgi:application"],
            cwd=REPO,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    # -- HTTP -------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def get_json(self, path: str) -> dict[str, Any]:
        status, _, body = self.get(path)
        assert status == 200, (status, body[:300])
        return json.loads(body)

    def metrics(self) -> str:
        return self.get("/metrics")[2].decode()

    def served_versions(self) -> dict[int, str]:
        """pid -> the model version that worker last served (`recommendation_model_info`)."""
        out: dict[int, str] = {}
        for line in self.metrics().splitlines():
            if (m := _MODEL_INFO.match(line)) and line.rstrip().endswith(" 1.0"):
                out[int(m.group(1))] = m.group(2)
            elif (m := _MODEL_INFO_ALT.match(line)) and line.rstrip().endswith(" 1.0"):
                out[int(m.group(2))] = m.group(1)
        return out

    def metric_total(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            head, _, value = line.rpartition(" ")
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    # -- processes --------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """The master's live children (gunicorn workers), from /proc."""
        return worker_pids(self.process.pid)

    @staticmethod
    def rss_kib(pid: int) -> int | None:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._log.close()

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 90
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"gunicorn exited early:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                if self.get("/health", timeout=1)[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"gunicorn did not answer /health:\n{self.log_tail()}")
            time.sleep(0.2)
        # Every worker loads the bundle on its first request (after the fork): warm them all
        # with concurrent requests until each one has served (the per-pid model gauge).
        paths = self.site.for_you_paths(limit=5, users=40)
        while len(self.served_versions()) < self.workers:
            threads = [
                threading.Thread(target=self.get, args=(paths[i % len(paths)], 30), daemon=True)
                for i in range(8)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            if time.monotonic() > deadline:
                raise AssertionError(f"workers did not warm up:\n{self.log_tail()}")


@contextlib.contextmanager
def running_server(
    site: DemoSite, workdir: Path, redis_url: str, **kwargs: Any
) -> Iterator[Server]:
    server = Server(site, workdir, redis_url, **kwargs)
    try:
        yield server
    finally:
        server.close()


# -- registry actions -----------------------------------------------------------------------


# How operator and batch work runs beside the server under test: an idle-priority job
# (util-linux chrt), else nice 19. In production it runs on another host (admin, Celery
# worker); on these 2 cores, at normal priority, a promotion's gates (~2 s of one core scoring
# candidate and primary) take CPU from the 2 serving workers and make them shed.
BATCH_PRIORITY = ["chrt", "--idle", "0"] if shutil.which("chrt") else ["nice", "-n", "19"]


class RegistryOperator:
    """`registry_ops serve` with the server's environment, at batch priority: Django is set
    up before the load, so only the action itself runs during it."""

    def __init__(self, server: Server) -> None:
        env = dict(server.env)
        # The promotion's smoke-test gate times the candidate on this same 2-core machine
        # while the load runs; the gate is not what the scenarios test.
        env["RECO_SMOKE_P95_MS"] = "2000"
        self.process = subprocess.Popen(
            [*BATCH_PRIORITY, sys.executable, "-m", "tests.reliability.registry_ops", "serve"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.answers: dict[str, dict[str, Any]] = {}
        assert json.loads(self._read()) == {"ready": True}

    def action(self, name: str, command: str):  # type: ignore[no-untyped-def]
        def run() -> None:
            assert self.process.stdin is not None
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
            self.answers[name] = json.loads(self._read())

        return run

    def _read(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, "registry_ops exited"
        return line

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


# -- load with a fault timeline --------------------------------------------------------------


@dataclass
class LoadRun:
    """A finished load: the generator's summary, its per-request samples and when each
    timeline event happened (seconds from the load's first scheduled request)."""

    summary: dict[str, Any]
    samples: list[list[Any]]
    events: dict[str, float]
    rate: float
    duration: float
    started_at: float  # time.monotonic() of the first scheduled request

    def offset(self, monotonic: float) -> float:
        """A `time.monotonic()` value (any process) as seconds into the load."""
        return round(monotonic - self.started_at, 3)

    def window(self, start: float = 0.0, end: float | None = None) -> list[list[Any]]:
        end = self.duration + 1e9 if end is None else end
        return [s for s in self.samples if start <= s[0] < end]


def generator_name() -> str:
    """The load generator `run_load` uses here: "c-openloop" or "python-asyncio" (serving_load's
    choice; RECO_LOADGEN=python forces the latter)."""
    wanted = "python" if os.environ.get("RECO_LOADGEN") == "python" else "auto"
    return "c-openloop" if choose_generator(wanted) == "c" else "python-asyncio"


def run_load(
    server: Server,
    paths: Sequence[str],
    *,
    rate: float,
    duration: float,
    timeline: Iterable[tuple[float, str, Callable[[], Any]]] = (),
    connections: int = 32,
    timeout: float = 2.0,
) -> LoadRun:
    """Open-loop load from a second process; `timeline` entries `(at_s, name, action)` run in
    this process at `at_s` seconds into the load, and their actual times are recorded.

    The generator is benchmarks/loadgen's C one where a C compiler builds it (~0.09 ms of CPU
    per request), else serving_load's asyncio one (~0.3-0.5 ms, taken from the 2 cores the
    server under test runs on); RECO_LOADGEN=python forces the latter."""
    runner: Any = loadgen.LoadRun if generator_name() == "c-openloop" else LoadProcess
    load = runner(
        "127.0.0.1",
        server.port,
        list(paths),
        rate,
        duration,
        connections,
        timeout=timeout,
        record=True,
    )
    # The generator schedules its first request 0.2 s after its loop starts (serving_load);
    # the exact offsets of the events are computed from its reported start afterwards.
    t0 = time.monotonic() + 0.2
    happened: dict[str, float] = {}
    try:
        for at, name, action in sorted(timeline, key=lambda e: e[0]):
            delay = t0 + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            action()
            happened[name] = time.monotonic()
    finally:
        result = load.result()
    start = result.pop("started_at")
    samples = result.pop("samples")
    events = {name: round(at - start, 3) for name, at in happened.items()}
    return LoadRun(result, samples, events, rate, duration, start)


# -- analysis -------------------------------------------------------------------------------

# Sample columns (benchmarks/serving_load.py `record=True`).
OFFSET, LATENCY, STATUS, SOURCE, DEGRADED, REASON, VERSION, RETRY_AFTER = range(8)
REDIS_REASONS = frozenset({"redis_connection", "redis_timeout", "breaker_open", "redis_error"})


def percentile(values: Sequence[float], p: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 2)


def summarize(samples: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """The figures a scenario reports for a set of requests."""
    statuses = Counter(s[STATUS] for s in samples)
    latencies = [s[LATENCY] for s in samples if s[LATENCY] is not None]
    ok = [s for s in samples if s[STATUS] == 200]
    degraded = [s for s in ok if s[DEGRADED]]
    return {
        "requests": len(samples),
        "http_200": statuses.get(200, 0),
        "http_5xx": sum(n for code, n in statuses.items() if isinstance(code, int) and code >= 500),
        # Of those, overload sheds (the only 503s the server sends): not failures of a request
        # the server took on.
        "http_503": statuses.get(503, 0),
        "http_4xx": sum(
            n for code, n in statuses.items() if isinstance(code, int) and 400 <= code < 500
        ),
        "client_timeouts": statuses.get("timeout", 0),
        "connection_errors": statuses.get("error", 0),
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": percentile(latencies, 1.0),
        "degraded_share": round(len(degraded) / len(ok), 4) if ok else None,
        "degraded_reasons": dict(Counter(s[REASON] for s in degraded)),
        "sources": dict(Counter(s[SOURCE] for s in ok)),
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """benchmarks/results/reliability/<name>.json (the figures the issue asks each scenario
    to report)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    document = {
        "scenario": name,
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)},
        **payload,
    }
    if "rate_rps" in payload:  # a scenario under load: which generator drove it
        document["load_generator"] = generator_name()
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    return path


def phases(run: LoadRun, bounds: Sequence[tuple[str, float, float]]) -> dict[str, dict[str, Any]]:
    return {name: summarize(run.window(start, end)) for name, start, end in bounds}
