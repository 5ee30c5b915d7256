"""Benchmark: the production server under an open-loop load, beside a bare baseline endpoint.

Starts gunicorn (gunicorn.conf.py) on a free loopback port against DATA_DIR's current primary
model, then drives a fixed request rate from a second process: every request is timed from
its *scheduled* send time, so queueing shows up in the latency (a closed loop would hide it).
The same run measures `/api/v1/_baseline` (a DRF view returning a fixed list from one Redis
GET, or from memory without Redis) so that the ratio of the two is measured on one machine in
one run.

    python -m benchmarks.serving_load --rate 500 --duration 20
    REDIS_URL=redis://127.0.0.1:6379/0 python -m benchmarks.serving_load --rate 1500

Writes benchmarks/results/serving_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second (open loop)")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--data-dir", default=str(ROOT / "var"))
    parser.add_argument("--out", default=str(RESULTS / "serving_load.json"))
    args = parser.parse_args()
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
        results = {
            "full_path": load_from_second_process(
                "127.0.0.1", port, full_paths, args.rate, args.duration, args.connections
            ),
            "baseline": load_from_second_process(
                "127.0.0.1", port, ["/api/v1/_baseline"], args.rate, args.duration, args.connections
            ),
        }
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
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "server": {
            "kind": "gunicorn sync",
            "workers": args.workers,
            "redis": bool(os.environ.get("REDIS_URL")),
        },
        "load": {"rate": args.rate, "duration_s": args.duration, "connections": args.connections},
        "workload": workload(data_dir, users),
        "results": results,
        "ratios": {
            "throughput_full_over_baseline": round(
                full["throughput_rps"] / max(1e-9, bare["throughput_rps"]), 3
            ),
            "p99_full_over_baseline": round(
                (full["p99_ms"] or 0) / max(1e-9, bare["p99_ms"] or 1e-9), 3
            ),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
