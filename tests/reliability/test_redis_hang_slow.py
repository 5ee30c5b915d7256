"""Scenario 2: Redis hung (SIGSTOP) and Redis slow (200 ms added by the fault proxy).

Both faults make every Redis call wait out the serving client's 50 ms timeout. The breaker must
open within a second, so p99 stays under 200 ms and only a bounded number of requests pay the
full timeout: per worker, the failure threshold while it opens, then one half-open probe per
reset period. A request "paid the full timeout" when the server labelled it `redis_timeout`
(the label is given exactly when the Redis call timed out).

Control: the same timeline against a server whose breaker never opens (failure threshold
10^9, shedding off so that the queue shows as latency): every request pays the timeout, the
two sync workers fall to ~40 requests/s, and p99 reaches seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.reliability.faultproxy import LATENCY, PASS, FaultProxy, fault_proxy
from tests.reliability.serving_fixtures import (
    OFFSET,
    REASON,
    DemoSite,
    LoadRun,
    RedisProcess,
    run_load,
    running_server,
    summarize,
    write_result,
)

pytestmark = pytest.mark.slow

RATE = 100.0
DURATION = 16.0
WORKERS = 2
THRESHOLD = 3  # RECO SERVING_BREAKER_FAILURES (the default)
RESET_S = 2.0  # RECO SERVING_BREAKER_RESET_SECONDS (the default)
ADDED_LATENCY_MS = 200
# (name, start, end) of each fault, seconds into the load.
HUNG = ("hung", 2.0, 6.0)
SLOW = ("slow", 9.0, 13.0)
# The control isolates the breakers: shedding is off too, or it would turn the queue they
# prevent into 503s instead of latency.
DISABLED_BREAKER = {"RECO_SERVING_BREAKER_FAILURES": "1000000000", "RECO_SHED_ENABLED": "0"}


def _timeline(redis: RedisProcess, proxy: FaultProxy) -> list:
    return [
        (HUNG[1], "hung_start", redis.stop),
        (HUNG[2], "hung_end", redis.resume),
        (SLOW[1], "slow_start", lambda: proxy.set_mode(LATENCY, latency_ms=ADDED_LATENCY_MS)),
        (SLOW[2], "slow_end", lambda: proxy.set_mode(PASS)),
    ]


def fault_figures(run: LoadRun, name: str) -> dict:
    """What the issue asks of one fault window, from the responses."""
    start, end = run.events[f"{name}_start"], run.events[f"{name}_end"]
    # A request scheduled just before the fault may reach Redis after it started.
    during = run.window(start - 0.2, end + 0.5)
    paid = [s for s in during if s[REASON] == "redis_timeout"]
    opened = [s[OFFSET] for s in during if s[REASON] == "breaker_open" and s[OFFSET] >= start]
    probes_possible = math.ceil((end - start) / RESET_S)
    return {
        "fault_start_s": start,
        "fault_end_s": end,
        **summarize(during),
        "breaker_open_after_s": round(min(opened) - start, 3) if opened else None,
        "paid_full_timeout": len(paid),
        "paid_full_timeout_first_second": sum(1 for s in paid if s[OFFSET] < start + 1.0),
        # After 1 s every worker's breaker must be open; the next timeout can only be a
        # half-open probe, no earlier than one reset period after the circuit opened.
        "paid_full_timeout_between_1s_and_reset": sum(
            1 for s in paid if start + 1.0 <= s[OFFSET] < start + RESET_S
        ),
        "bound_opening_workers_x_threshold": WORKERS * THRESHOLD,
        "bound_with_half_open_probes": WORKERS * (THRESHOLD + probes_possible),
    }


def _run(site: DemoSite, redis: RedisProcess, workdir: Path, settings: dict) -> dict:
    with (
        fault_proxy(redis.port) as proxy,
        running_server(site, workdir, proxy.url, settings=settings) as server,
    ):
        run = run_load(
            server,
            site.for_you_paths(),
            rate=RATE,
            duration=DURATION,
            timeline=_timeline(redis, proxy),
        )
        workers_alive = len(server.worker_pids())
    return {
        "events_s": run.events,
        "whole_run": summarize(run.samples),
        "hung": fault_figures(run, "hung"),
        "slow": fault_figures(run, "slow"),
        "workers_alive_at_end": workers_alive,
    }


def test_a_hung_or_slow_redis_opens_the_breaker_within_a_second_and_p99_stays_low(
    demo_site: DemoSite, redis_server: RedisProcess, tmp_path: Path
) -> None:
    # Given the server reading Redis through the fault proxy, with the default breaker
    demo_site.publish(redis_server.url)
    # When Redis is SIGSTOPped for 4 s, then 200 ms is added to every Redis reply for 4 s
    with_breaker = _run(demo_site, redis_server, tmp_path / "breaker", {})
    # and the control: the same timeline with a breaker that never opens
    without_breaker = _run(demo_site, redis_server, tmp_path / "control", DISABLED_BREAKER)
    report = {
        "what": "Redis hung (SIGSTOP) then slow (+200 ms via the fault proxy) under load",
        "rate_rps": RATE,
        "duration_s": DURATION,
        "workers": WORKERS,
        "redis_timeout_ms": 50,
        "breaker": {"failure_threshold": THRESHOLD, "reset_s": RESET_S},
        "with_breaker": with_breaker,
        "control_breaker_disabled": without_breaker,
    }
    write_result("s2_redis_hung_and_slow", report)
    # Then, for each fault, with the breaker:
    for fault in ("hung", "slow"):
        figures = with_breaker[fault]
        # every worker's breaker opened within a second
        assert figures["breaker_open_after_s"] is not None, fault
        assert figures["breaker_open_after_s"] <= 1.0, fault
        assert figures["paid_full_timeout_between_1s_and_reset"] == 0, fault
        # only workers x threshold requests paid the timeout while it opened (plus the probes)
        assert figures["paid_full_timeout_first_second"] <= WORKERS * THRESHOLD, fault
        assert figures["paid_full_timeout"] <= figures["bound_with_half_open_probes"], fault
        # and p99 stayed under 200 ms with nothing failed
        assert figures["p99_ms"] < 200, fault
        assert figures["http_5xx"] == 0, fault
        assert figures["client_timeouts"] == 0, fault
        # the control: the same fault without the breaker is far worse
        control = without_breaker[fault]
        assert control["p99_ms"] >= 200, fault
        assert control["p99_ms"] >= 5 * figures["p99_ms"], fault
        assert control["paid_full_timeout"] > figures["bound_with_half_open_probes"], fault
    assert with_breaker["whole_run"]["http_5xx"] == 0
    assert with_breaker["workers_alive_at_end"] == WORKERS
