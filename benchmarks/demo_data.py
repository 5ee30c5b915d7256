"""How long make_demo_data takes, and how much memory, for a given number of Matomo actions.

    python -m benchmarks.demo_data --actions 5000000                    # SQLite and MariaDB
    python -m benchmarks.demo_data --actions 1000000 --targets sqlite

Each target runs in its own child process, so the peak RSS of one does not hide the other's.
SQLite writes to a temporary directory that is removed afterwards; MariaDB writes to a database
this script creates and drops (``--mariadb-db``, default reco_bench_demo). Results go to
benchmarks/results/demo_data.json (one entry per target, replacing older entries of that target).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "demo_data.json"
END = "2025-01-31T12:00:00"  # fixed so that reruns generate the same data


def _run_one(args: argparse.Namespace) -> dict[str, Any]:
    """Generate into one target inside this process; return timings and peak RSS."""
    from apps.pipeline import demo
    from apps.pipeline.sources.db import make_engine

    config = demo.DemoConfig(
        users=args.users,
        items=args.items,
        actions=args.actions,
        days=args.days,
        seed=args.seed,
        end=dt.datetime.fromisoformat(END),
        reset=True,
    )
    cleanup: list[Any] = []
    if args.one == "sqlite":
        directory = Path(tempfile.mkdtemp(prefix="reco_bench_demo_"))
        cleanup.append(lambda: shutil.rmtree(directory, ignore_errors=True))
        business_url = f"sqlite:///{directory / 'business.sqlite3'}"
        matomo_url = f"sqlite:///{directory / 'matomo.sqlite3'}"
    else:
        import MySQLdb

        admin = MySQLdb.connect(
            host=args.mariadb_host, port=args.mariadb_port, user="root", passwd=""
        )
        admin.cursor().execute(f"DROP DATABASE IF EXISTS `{args.mariadb_db}`")
        admin.cursor().execute(f"CREATE DATABASE `{args.mariadb_db}` CHARACTER SET utf8mb4")
        cleanup.append(
            lambda: admin.cursor().execute(f"DROP DATABASE IF EXISTS `{args.mariadb_db}`")
        )
        business_url = matomo_url = (
            f"mysql://root@{args.mariadb_host}:{args.mariadb_port}/{args.mariadb_db}"
        )
    business, matomo = make_engine(business_url), make_engine(matomo_url)
    try:
        started = time.perf_counter()
        summary = demo.generate(business, matomo, config)
        seconds = time.perf_counter() - started
        size = _size_bytes(args.one, business_url, matomo, args.mariadb_db)
    finally:
        business.dispose()
        matomo.dispose()
        for step in cleanup:
            step()
    # ru_maxrss is in KiB on Linux.
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    actions = summary.rows["matomo_log_link_visit_action"]
    return {
        "target": args.one,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_mb, 1),
        "actions_per_second": round(actions / seconds),
        "database_mb": round(size / 2**20, 1),
        "rows": dict(summary.rows),
    }


def _size_bytes(target: str, business_url: str, matomo: Any, database: str) -> int:
    if target == "sqlite":
        directory = Path(business_url.removeprefix("sqlite:///")).parent
        return sum(p.stat().st_size for p in directory.iterdir())
    with matomo.connect() as conn:
        # InnoDB's table sizes in information_schema are estimates refreshed by ANALYZE.
        tables = conn.exec_driver_sql(
            f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{database}'"
        ).scalars()
        conn.exec_driver_sql("ANALYZE TABLE " + ", ".join(f"`{t}`" for t in tables)).fetchall()
        value = conn.exec_driver_sql(
            "SELECT SUM(data_length + index_length) FROM information_schema.tables "
            f"WHERE table_schema = '{database}'"
        ).scalar()
    return int(value or 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=5_000_000)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--targets", default="sqlite,mariadb", help="comma-separated: sqlite, mariadb"
    )
    parser.add_argument("--mariadb-host", default="127.0.0.1")
    parser.add_argument("--mariadb-port", type=int, default=3306)
    parser.add_argument("--mariadb-db", default="reco_bench_demo")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--one", choices=("sqlite", "mariadb"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        print(json.dumps(_run_one(args)))
        return

    runs = []
    for target in [t.strip() for t in args.targets.split(",") if t.strip()]:
        child = [sys.executable, "-m", "benchmarks.demo_data", "--one", target]
        child += ["--actions", str(args.actions), "--users", str(args.users)]
        child += ["--items", str(args.items), "--days", str(args.days), "--seed", str(args.seed)]
        child += ["--mariadb-host", args.mariadb_host, "--mariadb-port", str(args.mariadb_port)]
        child += ["--mariadb-db", args.mariadb_db]
        print(f"demo_data: {target}, {args.actions} actions ...", file=sys.stderr, flush=True)
        done = subprocess.run(child, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            raise SystemExit(f"demo_data: the {target} run failed (exit {done.returncode})")
        run = json.loads(done.stdout.strip().splitlines()[-1])
        run["command"] = (
            f"python -m benchmarks.demo_data --targets {target} --actions {args.actions} "
            f"--users {args.users} --items {args.items} --days {args.days} --seed {args.seed}"
        )
        run["measured_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        print(json.dumps(run), flush=True)
        runs.append(run)

    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    kept = [r for r in previous.get("runs", []) if r["target"] not in {r["target"] for r in runs}]
    result = {
        "benchmark": "demo_data",
        "what": "make_demo_data core (apps.pipeline.demo.generate): wall seconds and peak RSS",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "platform": platform.platform(),
        },
        "runs": kept + runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"demo_data: wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
