"""Benchmark: the offline pipeline end to end on demo data of a given size.

Creates a private DATA_DIR, generates demo data, then runs `manage.py run_pipeline` twice
(the first run extracts everything, the second is incremental) in child processes, and
records the seconds and rows of every stage plus each child's peak RSS.

    python -m benchmarks.pipeline_run --actions 1000000
    python -m benchmarks.pipeline_run --actions 5000000 --business-url mysql://root@127.0.0.1:3306/reco_bench_b ...

Writes benchmarks/results/pipeline_run.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def run_child(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run a manage.py command; return (seconds, peak RSS in MB of that child alone)."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "manage.py", *args], cwd=ROOT, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"manage.py {' '.join(args)} failed with exit code {child.returncode}")
    return seconds, usage.ru_maxrss / 1024


def stage_rows(db: Path) -> list[dict]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT pipeline_run_id, stage, status, rows_in, rows_out, detail "
            "FROM pipeline_stagerun ORDER BY id"
        ).fetchall()
    out = []
    for run_id, stage, status, rows_in, rows_out, detail in rows:
        seconds = json.loads(detail or "{}").get("seconds")
        out.append(
            {
                "run": run_id,
                "stage": stage,
                "status": status,
                "rows_in": rows_in,
                "rows_out": rows_out,
                "seconds": seconds,
            }
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--actions", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=2_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--business-url", default="")
    parser.add_argument("--matomo-url", default="")
    parser.add_argument("--out", default=str(RESULTS / "pipeline_run.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reco-bench-") as tmp:
        data = Path(tmp)
        env = {**os.environ, "DATA_DIR": str(data), "PYTHONUNBUFFERED": "1"}
        env.pop("DATABASE_URL", None)
        if args.business_url:
            env["BUSINESS_DB_URL"] = args.business_url
        if args.matomo_url:
            env["MATOMO_DB_URL"] = args.matomo_url
        timings = {}
        timings["migrate"] = run_child(["migrate", "-v", "0"], env)
        timings["make_demo_data"] = run_child(
            [
                "make_demo_data",
                "--reset",
                "--no-progress",
                f"--actions={args.actions}",
                f"--users={args.users}",
                f"--items={args.items}",
                f"--days={args.days}",
            ],
            env,
        )
        timings["pipeline_first"] = run_child(["run_pipeline", "--no-progress"], env)
        timings["pipeline_incremental"] = run_child(["run_pipeline", "--no-progress"], env)
        stages = stage_rows(data / "recoplatform.sqlite3")
    result = {
        "benchmark": "pipeline_run",
        "command": " ".join(["python -m benchmarks.pipeline_run", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "sizes": {
            "actions": args.actions,
            "users": args.users,
            "items": args.items,
            "days": args.days,
        },
        "steps": {
            k: {"seconds": round(s, 2), "peak_rss_mb": round(m, 1)} for k, (s, m) in timings.items()
        },
        "stages": stages,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["steps"], indent=2))
    for row in stages:
        print(
            f"run {row['run']} {row['stage']:<17} {row['status']:<9} in={row['rows_in']:>10,} out={row['rows_out']:>10,} {row['seconds']}s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
