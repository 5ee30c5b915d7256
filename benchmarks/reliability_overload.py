"""Scenario 4: overload. Twice the measured capacity for 60 s against the production server.

What must hold (issue 6): the excess is shed quickly with 503 and `Retry-After`; the accepted
requests keep p99 within twice the normal p99; no worker dies; worker memory stays flat;
latency recovers within 10 s after the spike.

Steps, all on one machine in one run (ratios are what to compare; PERFORMANCE.md):
1. a trained demo site (or `--site DIR` from an earlier run), a private redis-server with the
   bundle published, gunicorn with gunicorn.conf.py (2 sync workers);
2. capacity: open-loop steps (benchmarks/loadgen's C generator, else serving_load's) against the server
   with shedding OFF; capacity = the highest step served at >= 98 % of the offered rate with
   p99 <= 250 ms;
3. normal p99 at half the capacity, shedding ON (the production configuration);
4. the spike: 2 x capacity for `--spike-seconds` with shedding ON, worker pids and RSS sampled
   every 2 s, immediately followed by half the capacity again for the recovery;
5. the control: the same spike (shorter) with shedding OFF.

    python -m benchmarks.reliability_overload               # ~4 minutes
    python -m benchmarks.reliability_overload --site /tmp/x --spike-seconds 20

Writes benchmarks/results/reliability_overload.json; exits 1 when a criterion fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tests.reliability.serving_fixtures import (
    LATENCY,
    OFFSET,
    RETRY_AFTER,
    STATUS,
    RedisProcess,
    Server,
    build_demo_site,
    generator_name,
    load_demo_site,
    percentile,
    run_load,
    summarize,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "reliability_overload.json"
SHEDDING_OFF = {"RECO_SHED_ENABLED": "0"}
CONNECTIONS = 128
CLIENT_TIMEOUT_S = 2.0


def capacity_steps(server: Server, paths: list[str], steps: list[float], seconds: float) -> list:
    results = []
    for rate in steps:
        run = run_load(
            server,
            paths,
            rate=rate,
            duration=seconds,
            connections=CONNECTIONS,
            timeout=CLIENT_TIMEOUT_S,
        )
        figures = summarize(run.samples)
        figures["offered_rps"] = rate
        figures["served_rps"] = run.summary["throughput_rps"]
        figures["kept_up"] = (
            figures["http_200"] >= 0.98 * figures["requests"]
            and figures["p99_ms"] is not None
            and figures["p99_ms"] <= 100
        )
        results.append(figures)
        print(json.dumps({k: figures[k] for k in ("offered_rps", "served_rps", "p99_ms")}))
        if not figures["kept_up"]:
            break
    return results


def per_second(samples: list[list[Any]]) -> list[dict[str, Any]]:
    """Per 1-s bucket (by scheduled send time): accepted p99, counts by outcome."""
    buckets: dict[int, list[list[Any]]] = defaultdict(list)
    for s in samples:
        buckets[int(s[OFFSET])].append(s)
    rows = []
    for second in sorted(buckets):
        rows_in = buckets[second]
        accepted = [s[LATENCY] for s in rows_in if s[STATUS] == 200]
        rows.append(
            {
                "second": second,
                "requests": len(rows_in),
                "accepted": len(accepted),
                "shed_503": sum(1 for s in rows_in if s[STATUS] == 503),
                "failed": sum(1 for s in rows_in if s[STATUS] not in (200, 503)),
                "accepted_p99_ms": percentile(accepted, 0.99),
            }
        )
    return rows


def spike_figures(samples: list[list[Any]], normal_p99: float) -> dict[str, Any]:
    accepted = [s[LATENCY] for s in samples if s[STATUS] == 200]
    shed = [s for s in samples if s[STATUS] == 503]
    return {
        **summarize(samples),
        "accepted": len(accepted),
        "accepted_p50_ms": percentile(accepted, 0.50),
        "accepted_p99_ms": percentile(accepted, 0.99),
        "accepted_p99_over_normal_p99": round((percentile(accepted, 0.99) or 0) / normal_p99, 2),
        "shed_503": len(shed),
        "shed_share": round(len(shed) / max(1, len(samples)), 4),
        "shed_p50_ms": percentile([s[LATENCY] for s in shed], 0.50),
        "shed_p99_ms": percentile([s[LATENCY] for s in shed], 0.99),
        "shed_without_retry_after": sum(1 for s in shed if not s[RETRY_AFTER]),
        "other_5xx": sum(
            1
            for s in samples
            if isinstance(s[STATUS], int) and s[STATUS] >= 500 and s[STATUS] != 503
        ),
    }


def recovery_seconds(after: list[dict[str, Any]], limit_ms: float, settle: int = 3) -> float | None:
    """Seconds into the post-spike load until the first run of `settle` consecutive good
    seconds (nothing shed or failed, accepted p99 within `limit_ms`); None: never."""

    def good(row: dict[str, Any]) -> bool:
        return (
            not row["shed_503"] and not row["failed"] and (row["accepted_p99_ms"] or 0) <= limit_ms
        )

    for i in range(len(after) - settle + 1):
        if all(good(row) for row in after[i : i + settle]):
            return float(after[i]["second"])
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", help="a directory with a site built by an earlier run")
    parser.add_argument("--spike-seconds", type=float, default=60.0)
    parser.add_argument("--control-seconds", type=float, default=20.0)
    parser.add_argument("--step-seconds", type=float, default=6.0)
    parser.add_argument(
        "--steps",
        default="100,150,200,250,300,350,400,500,600,800,1000,1200,1500",
        help="open-loop rates tried, in order, until one is not kept up",
    )
    parser.add_argument("--capacity", type=float, help="skip the search: use this capacity")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra environment setting for the shedding server (e.g. RECO_SHED_MAX_QUEUE_MS=20)",
    )
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="reco-overload-"))
    if args.site and (Path(args.site) / "site.json").exists():
        site = load_demo_site(Path(args.site))
    else:
        site = build_demo_site(Path(args.site) if args.site else work / "site")
    paths = site.for_you_paths()
    redis = RedisProcess(work / "redis")
    report: dict[str, Any] = {
        "benchmark": "reliability_overload",
        "command": " ".join(["python -m benchmarks.reliability_overload", *sys.argv[1:]]),
        "server": "gunicorn.conf.py, 2 sync workers, private Redis, demo bundle",
        "generator": {
            "kind": generator_name(),
            "connections": CONNECTIONS,
            "client_timeout_s": CLIENT_TIMEOUT_S,
        },
    }
    try:
        site.publish(redis.url)
        # 2. capacity, shedding off
        if args.capacity:
            steps: list[dict[str, Any]] = []
            capacity = args.capacity
        else:
            with_server = Server(site, work / "capacity", redis.url, settings=SHEDDING_OFF)
            try:
                steps = capacity_steps(
                    with_server,
                    paths,
                    [float(r) for r in args.steps.split(",")],
                    args.step_seconds,
                )
            finally:
                with_server.close()
            kept = [s for s in steps if s["kept_up"]]
            capacity = kept[-1]["offered_rps"] if kept else steps[0]["offered_rps"]
        report["capacity_steps"] = steps
        report["capacity_rps"] = capacity
        extra = dict(item.split("=", 1) for item in args.setting)
        report["shedding_server_settings"] = extra
        half, spike_rate = capacity / 2, capacity * 2
        # 3.-4. production configuration: normal, spike, recovery
        server = Server(site, work / "shedding", redis.url, settings=extra)
        try:
            normal = run_load(
                server, paths, rate=half, duration=20, connections=CONNECTIONS,
                timeout=CLIENT_TIMEOUT_S,
            )  # fmt: skip
            normal_p99 = summarize(normal.samples)["p99_ms"] or 1.0
            pids_before = server.worker_pids()
            memory: list[dict[str, Any]] = []

            def sample_memory() -> None:
                pids = server.worker_pids()
                memory.append(
                    {
                        "t": round(time.monotonic(), 2),
                        "workers": {str(p): server.rss_kib(p) for p in pids},
                    }
                )

            spike = run_load(
                server,
                paths,
                rate=spike_rate,
                duration=args.spike_seconds,
                connections=CONNECTIONS,
                timeout=CLIENT_TIMEOUT_S,
                timeline=[
                    (t, f"memory_{t:.0f}", sample_memory)
                    for t in range(0, int(args.spike_seconds) + 1, 2)
                ],
            )
            recovery = run_load(
                server, paths, rate=half, duration=20, connections=CONNECTIONS,
                timeout=CLIENT_TIMEOUT_S,
            )  # fmt: skip
            pids_after = server.worker_pids()
            shed_metric = server.metric_total("recommendation_shed_total")
        finally:
            server.close()
        # 5. control: the same spike without shedding
        control_server = Server(site, work / "control", redis.url, settings=SHEDDING_OFF)
        try:
            control = run_load(
                control_server, paths, rate=spike_rate, duration=args.control_seconds,
                connections=CONNECTIONS, timeout=CLIENT_TIMEOUT_S,
            )  # fmt: skip
        finally:
            control_server.close()
    finally:
        redis.close()

    rss = defaultdict(list)
    for row in memory:
        for pid, kib in row["workers"].items():
            if kib is not None:
                rss[pid].append(kib)
    # Memory: the first 10 s are the warm-up of the spike (allocator pools, caches).
    settle = max(1, len(memory) // 6)
    growth = {
        pid: round(100.0 * (max(v[settle:]) - v[settle]) / v[settle], 2)
        for pid, v in rss.items()
        if len(v) > settle
    }
    after_rows = per_second(recovery.samples)
    spike_fig = spike_figures(spike.samples, normal_p99)
    control_fig = spike_figures(control.samples, normal_p99)
    recovered = recovery_seconds(after_rows, 2 * normal_p99)
    report.update(
        {
            "normal": {"rate_rps": half, **summarize(normal.samples)},
            "spike": {"rate_rps": spike_rate, "duration_s": args.spike_seconds, **spike_fig},
            "spike_per_second": per_second(spike.samples),
            "recovery": {
                "rate_rps": half,
                "recovered_after_s": recovered,
                **summarize(recovery.samples),
                "per_second": after_rows,
            },
            "workers": {
                "before": pids_before,
                "after": pids_after,
                "rss_kib_first_last": {p: [v[0], v[-1]] for p, v in rss.items()},
                "rss_growth_pct_after_warmup": growth,
            },
            "recommendation_shed_total": shed_metric,
            "control_no_shedding": {
                "rate_rps": spike_rate,
                "duration_s": args.control_seconds,
                **control_fig,
            },
        }
    )
    checks = {
        "excess_shed_with_503": spike_fig["shed_503"] > 0,
        "every_503_has_retry_after": spike_fig["shed_without_retry_after"] == 0,
        # Quickly: far below the client's 2 s timeout and the control's queueing.
        "shed_quickly_p99_under_250ms": (spike_fig["shed_p99_ms"] or 1e9) < 250,
        "no_other_5xx_or_client_timeouts": spike_fig["other_5xx"] == 0
        and spike_fig["client_timeouts"] == 0,
        "accepted_p99_within_2x_normal": spike_fig["accepted_p99_ms"] is not None
        and spike_fig["accepted_p99_ms"] <= 2 * normal_p99,
        "no_worker_died": pids_before == pids_after,
        "memory_flat_under_10pct": bool(growth) and max(growth.values()) < 10.0,
        "recovered_within_10s": recovered is not None and recovered <= 10.0,
        "control_is_worse": (control_fig["p99_ms"] or 0) > 5 * (spike_fig["accepted_p99_ms"] or 1),
    }
    report["checks"] = checks
    report["passed"] = all(checks.values())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps({"capacity_rps": capacity, "normal_p99_ms": normal_p99, "checks": checks}))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
