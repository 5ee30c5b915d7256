"""Benchmark: the production server under an open-loop load, beside a bare baseline endpoint.

Starts gunicorn (gunicorn.conf.py) on a free loopback port against DATA_DIR's current primary
model, then drives a fixed request rate from a second process: every request is timed from
its *scheduled* send time, so queueing shows up in the latency (a closed loop would hide it).
The same run measures `/api/v1/_baseline` (a DRF view returning a fixed list from one Redis
GET, or from memory without Redis) so that the ratio of the two is measured on one machine in
one run.

    python -m benchmarks.serving_load --rate 500 --duration 20
    REDIS_URL=redis://127.0.0.1:6379/0 python -m benchmarks.serving_load --rate 1500
    python -m benchmarks.serving_load --rate 300 --sweep 600,900,1200,1500 --duration 15

The load comes from benchmarks/loadgen's C open-loop generator when a C compiler can build it
(`--generator auto`, the default), else from the asyncio one in this file (`--generator
python`), which costs several times more CPU per request than the server's cheapest endpoint.

Writes benchmarks/results/serving_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _load(
    host: str,
    port: int,
    paths: list[str],
    rate: float,
    duration: float,
    connections: int,
    *,
    timeout: float = 2.0,
    record: bool = False,
) -> dict:
    """Drive `rate` requests/s for `duration` s over at most `connections` connections.

    `timeout` is the client's wait for a response once sent (a client timeout after it).
    With `record`, the result also carries `samples`, one per request in send order:
    `[offset_s, latency_ms, status, source, degraded, degrade_reason, model_version,
    retry_after]` with `offset_s` the scheduled send time from `started_at` (a
    `time.monotonic()` value, comparable across processes), `latency_ms`/`status` None
    for a client timeout or connection error (`status` then "timeout" / "error").
    """
    total = int(rate * duration)
    queue: asyncio.Queue[tuple[float, str] | None] = asyncio.Queue()
    latencies: list[float] = []
    counts = {
        "ok": 0,
        "http_4xx": 0,
        "http_5xx": 0,
        "errors": 0,
        "client_timeouts": 0,
        "degraded": 0,
    }
    loop = asyncio.get_running_loop()
    samples: list[list] = []

    def sample(scheduled: float, status, latency, head: bytes = b"", body: bytes = b"") -> None:
        if not record:
            return
        row = [round(scheduled - start, 4), latency, status, None, None, None, None, None]
        if body[:1] == b"{":
            try:
                doc = json.loads(body)
            except ValueError:
                doc = {}
            row[3:7] = [
                doc.get("source"),
                doc.get("degraded"),
                doc.get("degrade_reason"),
                doc.get("model_version"),
            ]
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"retry-after":
                row[7] = value.strip().decode()
        samples.append(row)

    async def worker() -> None:
        reader = writer = None
        while True:
            job = await queue.get()
            if job is None:
                break
            scheduled, path = job
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n".encode()
                )
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=timeout)
                status = int(head.split(b" ", 2)[1])
                length = 0
                close = False
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                    elif name.lower() == b"connection" and value.strip().lower() == b"close":
                        close = True
                body = await asyncio.wait_for(reader.readexactly(length), timeout=timeout)
                latencies.append(loop.time() - scheduled)
                sample(scheduled, status, round(1000 * latencies[-1], 2), head, body)
                if status >= 500:
                    counts["http_5xx"] += 1
                elif status >= 400:
                    counts["http_4xx"] += 1
                else:
                    counts["ok"] += 1
                    if b'"degraded":true' in body:
                        counts["degraded"] += 1
                if close:
                    writer.close()
                    reader = writer = None
            except TimeoutError:
                counts["client_timeouts"] += 1
                sample(scheduled, "timeout", None)
                if writer is not None:
                    writer.close()
                reader = writer = None
            except (OSError, asyncio.IncompleteReadError, ValueError):
                counts["errors"] += 1
                sample(scheduled, "error", None)
                if writer is not None:
                    writer.close()
                reader = writer = None

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    start = loop.time() + 0.2
    rng = random.Random(7)
    for i in range(total):
        at = start + i / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((at, rng.choice(paths)))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    elapsed = loop.time() - start
    latencies.sort()

    def pct(p: float) -> float:
        return (
            round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2)
            if latencies
            else None
        )

    done = sum(counts[k] for k in ("ok", "http_4xx", "http_5xx"))
    extra = {"started_at": start, "samples": sorted(samples)} if record else {}
    return {
        "requests_scheduled": total,
        "requests_completed": done,
        "throughput_rps": round(done / elapsed, 1),
        "target_rps": rate,
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "max_ms": pct(1.0),
        **counts,
        "degraded_share": round(counts["degraded"] / max(1, counts["ok"]), 4),
        **extra,
    }


def _run_load(args: tuple, out: mp.Queue, options: dict | None = None) -> None:
    out.put(asyncio.run(_load(*args, **(options or {}))))


class LoadProcess:
    """A load run in a second process, started now and collected with `result()`, so the
    caller can inject faults while it runs."""

    def __init__(self, host, port, paths, rate, duration, connections, **options) -> None:
        self.duration = duration
        self._out: mp.Queue = mp.Queue()
        self._proc = mp.Process(
            target=_run_load,
            args=((host, port, paths, rate, duration, connections), self._out, options),
        )
        self._proc.start()

    def result(self) -> dict:
        try:
            return self._out.get(timeout=self.duration + 120)
        finally:
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()


def load_from_second_process(host, port, paths, rate, duration, connections, **options) -> dict:
    """The generator runs in its own process so it does not share the GIL with anything else."""
    return LoadProcess(host, port, paths, rate, duration, connections, **options).result()


def generator_load(generator: str):  # type: ignore[no-untyped-def]
    """The load function of `generator` ("c": benchmarks/loadgen's openloop.c, ~0.09 ms of
    CPU per request, most of it the kernel's TCP connect/close; "python": `_load` in a second
    process, ~0.3-0.5 ms per request, so it cannot offer much more than ~1,000 requests/s on 2
    cores and takes that CPU from the server)."""
    if generator == "c":
        from benchmarks import loadgen

        return loadgen.run_load
    return load_from_second_process


def choose_generator(wanted: str) -> str:
    """ "auto": the C generator where a C compiler can build it, else the Python one."""
    if wanted != "auto":
        return wanted
    from benchmarks import loadgen

    return "c" if loadgen.available() else "python"


# The target for the full path: p99 at most this, with zero errors (benchmark only).
TARGET_P99_MS = 25.0


def meets_target(result: dict) -> bool:
    """Every request answered 200 and p99 within TARGET_P99_MS."""
    errors = sum(result[k] for k in ("http_4xx", "http_5xx", "errors", "client_timeouts"))
    return (
        errors == 0
        and result["requests_completed"] == result["requests_scheduled"]
        and result["p99_ms"] is not None
        and result["p99_ms"] <= TARGET_P99_MS
    )


def user_ids(data_dir: Path, limit: int = 500) -> list[int]:
    """Users the current primary bundle knows (falls back to 1..limit)."""
    bundles = sorted((data_dir / "bundles").glob("*/store.sqlite3"))
    if not bundles:
        return list(range(1, limit + 1))
    with sqlite3.connect(f"file:{bundles[-1]}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT user_id FROM user_recs LIMIT ?", (limit,)).fetchall()
    return [r[0] for r in rows] or list(range(1, limit + 1))


def workload(data_dir: Path, users: list[int]) -> dict:
    """What one full-path request does for these users: channel list items read from Redis
    and candidates the ranker scores (the newest bundle's published lists, fused with equal
    channel weights). Empty when there is no bundle."""
    bundles = sorted((data_dir / "bundles").glob("*/store.sqlite3"))
    if not bundles:
        return {}
    sys.path.insert(0, str(ROOT))
    from apps.serving.engine.publish import read_bundle_lists
    from apps.serving.engine.rank import MAX_CANDIDATES, fuse_arrays

    published, _, _ = read_bundle_lists(bundles[-1])
    items, candidates = [], []
    for user in users:
        lists = published.get(user, {})
        items.append(sum(len(v) for v in lists.values()))
        arrays = {c: ([i for i, _ in v], [s for _, s in v]) for c, v in lists.items() if v}
        candidates.append(len(fuse_arrays(arrays, {}, MAX_CANDIDATES)))
    n = max(1, len(users))
    return {
        "bundle": bundles[-1].parent.name,
        "users": len(users),
        "mean_channel_items_read": round(sum(items) / n, 1),
        "mean_candidates_ranked": round(sum(candidates) / n, 1),
        "max_candidates": MAX_CANDIDATES,
    }


def worker_pids(master_pid: int) -> list[int]:
    """The server master's live children (gunicorn workers), from /proc (Linux)."""
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{master_pid}/task").iterdir():
            children.extend(int(p) for p in (task / "children").read_text().split())
    return sorted(children)


def worker_cpu_seconds(master_pid: int) -> float:
    """User + system CPU seconds used so far by the server's worker processes (Linux /proc;
    0.0 where it cannot be read)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for child in worker_pids(master_pid):
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def machine_speed_ms() -> float:
    """Milliseconds this machine takes for a fixed pure-Python loop (best of 5): these
    machines' speed varies by 2x from day to day, so figures from different runs compare
    only through it (or through the baseline measured in the same run)."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        sum(range(1_000_000))
        best = min(best, time.perf_counter() - started)
    return round(best * 1e3, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second (open loop)")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--data-dir", default=str(ROOT / "var"))
    parser.add_argument("--out", default=str(RESULTS / "serving_load.json"))
    parser.add_argument(
        "--generator",
        choices=("auto", "c", "python"),
        default="auto",
        help="load generator: c (benchmarks/loadgen, needs cc), python (asyncio), auto: c if it builds",
    )
    parser.add_argument(
        "--sweep",
        default="",
        help="comma-separated rates to run after --rate (e.g. 600,900,1200,1500): the report "
        f"gives each rate's figures and the highest whose full path met p99 <= {TARGET_P99_MS:g} ms "
        "with zero errors",
    )
    args = parser.parse_args()
    try:
        sweep = [float(r) for r in args.sweep.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--sweep must be comma-separated numbers, got {args.sweep!r}")
    if args.rate <= 0 or any(r <= 0 for r in sweep) or args.duration <= 0:
        parser.error("--rate, --sweep rates and --duration must be positive")
    generator = choose_generator(args.generator)
    load = generator_load(generator)
    data_dir = Path(args.data_dir).resolve()
    port = free_port()
    prom = tempfile.mkdtemp(prefix="reco-prom-")
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "DJANGO_DEBUG": "0",
        "DJANGO_SECRET_KEY": os.environ.get(
            "DJANGO_SECRET_KEY", "benchmark-only-secret-key-0123456789"
        ),
        "PROMETHEUS_MULTIPROC_DIR": prom,
        # Production settings redirect plain HTTP to HTTPS; TLS ends at a proxy in front of
        # gunicorn and this generator speaks plain HTTP to gunicorn as that proxy would.
        "DJANGO_SECURE_SSL_REDIRECT": "0",
        "RECO_BIND": f"127.0.0.1:{port}",
        "RECO_WORKERS": str(args.workers),
        "LOG_LEVEL": "warning",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "gunicorn.conf.py",
            "recoplatform.wsgi:application",
        ],
        cwd=ROOT,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("serving_load: the server did not start")
            time.sleep(0.3)
        users = user_ids(data_dir)
        full_paths = [f"/api/v1/recommendations/for-you?user_id={u}&limit=20" for u in users]
        # Warm every worker (bundle load happens lazily on the first request).
        for path in full_paths[:20] + ["/api/v1/_baseline"] * 10:
            urllib.request.urlopen(base + path, timeout=30).read()

        def measured(paths: list[str], rate: float) -> dict:
            cpu_before = worker_cpu_seconds(server.pid)
            result = load("127.0.0.1", port, paths, rate, args.duration, args.connections)
            used = worker_cpu_seconds(server.pid) - cpu_before
            # What a request costs the workers (shed ones included): it sets the capacity.
            result["worker_cpu_ms_per_request"] = round(
                1e3 * used / max(1, result["requests_completed"]), 3
            )
            # throughput_rps counts every response, shed 503s too: the 200s alone are the
            # requests the server really answered.
            result["ok_rps"] = round(result["ok"] / args.duration, 1)
            return result

        def at(rate: float) -> dict:
            return {
                "full_path": measured(full_paths, rate),
                "baseline": measured(["/api/v1/_baseline"], rate),
            }

        speed = machine_speed_ms()
        results = at(args.rate)
        steps = []
        for rate in sweep:
            step = at(rate)
            steps.append(
                {"rate": rate, **step, "full_path_meets_target": meets_target(step["full_path"])}
            )
            print(
                f"rate {rate:g}: full p99 {step['full_path']['p99_ms']} ms, "
                f"{step['full_path']['ok_rps']} rps answered 200, {step['full_path']['http_5xx']} 5xx; baseline p99 {step['baseline']['p99_ms']} ms",
                file=sys.stderr,
            )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    full, bare = results["full_path"], results["baseline"]
    report = {
        "benchmark": "serving_load",
        "command": " ".join(["python -m benchmarks.serving_load", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "speed_ms_sum_range_1e6": speed,
        },
        "server": {
            "kind": "gunicorn sync",
            "workers": args.workers,
            "redis": bool(os.environ.get("REDIS_URL")),
        },
        "load": {
            "rate": args.rate,
            "duration_s": args.duration,
            "connections": args.connections,
            "generator": generator,
        },
        "target": {"p99_ms_at_most": TARGET_P99_MS, "errors": 0},
        "workload": workload(data_dir, users),
        "results": results,
        "ratios": {
            "throughput_full_over_baseline": round(
                full["throughput_rps"] / max(1e-9, bare["throughput_rps"]), 3
            ),
            "worker_cpu_full_over_baseline": round(
                full["worker_cpu_ms_per_request"] / max(1e-9, bare["worker_cpu_ms_per_request"]),
                3,
            ),
            "p99_full_over_baseline": round(
                (full["p99_ms"] or 0) / max(1e-9, bare["p99_ms"] or 1e-9), 3
            ),
        },
        "full_path_meets_target": meets_target(full),
    }
    if steps:
        passing = [step["rate"] for step in steps if step["full_path_meets_target"]]
        report["sweep"] = steps
        report["highest_rate_meeting_target"] = max(passing) if passing else None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
