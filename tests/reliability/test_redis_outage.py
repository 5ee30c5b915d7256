"""Scenario 1: Redis is SIGKILLed, then restarted, under a sustained open-loop load.

The production server (gunicorn, 2 sync workers) serves a trained demo bundle whose lists are
published to a private Redis. The private Redis runs without automatic persistence, like the
compose file's; the test takes an RDB snapshot (SAVE) right after publishing, so the restarted
process comes back with the same data, as a Redis with RDB persistence would. That isolates
what this scenario is about, the breaker's recovery. The second test restarts Redis empty (the
compose file's Redis after a crash) and republishes with `manage.py sync_redis`, the
documented recovery; serving is back on Redis once a worker's poll (every 5 s) sees the
version's key again.

Control: each run shows the degraded label only inside the fault window: before the kill and
after recovery every answer comes from Redis, not degraded.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.serving_fixtures import (
    DEGRADED,
    OFFSET,
    REASON,
    REDIS_REASONS,
    REPO,
    SOURCE,
    STATUS,
    DemoSite,
    RedisProcess,
    Server,
    phases,
    run_load,
    running_server,
    summarize,
    write_result,
)

pytestmark = pytest.mark.slow

RATE = 120.0
RESET_S = 2.0  # the breaker's reset time (RECO SERVING_BREAKER_RESET_SECONDS, the default)
KILL_AT = 4.0
RESTART_AT = 10.0
DURATION = 18.0


def _on_redis(sample: list) -> bool:
    return (
        sample[STATUS] == 200 and sample[SOURCE] == "redis" and sample[REASON] not in REDIS_REASONS
    )


def recovered_after(samples: list[list], since: float) -> float | None:
    """Seconds after `since` until every later answer came from Redis (None: never)."""
    later = [s for s in samples if s[OFFSET] >= since]
    if not later or not _on_redis(later[-1]):
        return None
    last_off = max((s[OFFSET] for s in later if not _on_redis(s)), default=since)
    return round(max(0.0, last_off - since), 3)


def test_redis_killed_and_restarted_under_load_never_fails_a_request(
    demo_site: DemoSite, redis_server: RedisProcess, tmp_path: Path
) -> None:
    # Given the bundle published to a private Redis (snapshotted to disk) and the server on it
    demo_site.publish(redis_server.url)
    redis_server.snapshot()
    with running_server(
        demo_site,
        tmp_path / "server",
        redis_server.url,
        settings={"RECO_SERVING_BREAKER_RESET_SECONDS": str(RESET_S)},
    ) as server:
        # When Redis is killed at 4 s and restarted at 10 s during 18 s of 120 requests/s
        run = run_load(
            server,
            demo_site.for_you_paths(),
            rate=RATE,
            duration=DURATION,
            timeline=[
                (KILL_AT, "redis_killed", redis_server.kill),
                (RESTART_AT, "redis_restarted", redis_server.start),
            ],
        )
        workers_alive = len(server.worker_pids())
    killed, restarted = run.events["redis_killed"], run.events["redis_restarted"]
    recovered = recovered_after(run.samples, restarted)
    # The outage proper: from the kill until the breaker could first have let a probe through.
    outage = run.window(killed + 0.2, restarted)
    report = {
        "what": "Redis SIGKILLed then restarted (same data, RDB snapshot) under open-loop load",
        "rate_rps": RATE,
        "duration_s": DURATION,
        "workers": 2,
        "breaker_reset_s": RESET_S,
        "events_s": run.events,
        "redis_restart_data": "RDB snapshot taken after publishing (dump.rdb reloaded)",
        "recovered_after_s": recovered,
        "recovery_limit_s": RESET_S + 1.0,
        "whole_run": summarize(run.samples),
        "phases": phases(
            run,
            [
                # A request sent just before the kill may be served just after it.
                ("before_kill", 0.0, killed - 0.1),
                ("outage", killed, restarted),
                ("after_restart", restarted, DURATION),
            ],
        ),
        "workers_alive_at_end": workers_alive,
    }
    write_result("s1_redis_killed_restarted", report)
    whole = report["whole_run"]
    # Then no request failed or timed out
    assert whole["http_5xx"] == 0
    assert whole["client_timeouts"] == 0
    assert whole["connection_errors"] == 0
    assert whole["requests"] == int(RATE * DURATION)
    # and while Redis was down, every answer was degraded, from the local store, with a
    # Redis reason (connection refused first, then the open breaker)
    assert outage
    assert all(s[STATUS] == 200 and s[SOURCE] == "local_store" for s in outage)
    reasons = {s[REASON] for s in outage}
    assert reasons <= {"redis_connection", "breaker_open"}
    assert "breaker_open" in reasons
    # and the control: before the kill nothing carried a Redis reason, all came from Redis
    before = report["phases"]["before_kill"]
    assert before["sources"] == {"redis": before["http_200"]}
    assert not set(before["degraded_reasons"]) & REDIS_REASONS
    # and after the restart every worker was back on Redis within the breaker's reset + 1 s
    assert recovered is not None
    assert recovered <= RESET_S + 1.0
    assert workers_alive == 2


POLL_S = 5.0  # RECO SERVING_POLL_SECONDS (the default)


def _sync_redis(server: Server):  # type: ignore[no-untyped-def]
    def run() -> None:
        done = subprocess.run(
            [sys.executable, "manage.py", "sync_redis"],
            cwd=REPO,
            env=server.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr

    return run


def test_redis_restarted_empty_is_back_in_use_one_poll_after_sync_redis(
    demo_site: DemoSite, redis_server: RedisProcess, tmp_path: Path
) -> None:
    # Given the server on a published Redis that keeps no data across a restart
    demo_site.publish(redis_server.url)
    with running_server(demo_site, tmp_path / "server", redis_server.url) as server:
        # When Redis is killed at 3 s, restarted empty at 7 s and republished right after
        run = run_load(
            server,
            demo_site.for_you_paths(),
            rate=RATE,
            duration=20.0,
            timeline=[
                (3.0, "redis_killed", redis_server.kill),
                (7.0, "redis_restarted_empty", redis_server.start),
                (7.2, "sync_redis_done", _sync_redis(server)),
            ],
        )
        workers_alive = len(server.worker_pids())
    ev = run.events
    gap = run.window(ev["redis_restarted_empty"], ev["sync_redis_done"])
    recovered = recovered_after(run.samples, ev["sync_redis_done"])
    report = {
        "what": "Redis SIGKILLed, restarted EMPTY, republished with manage.py sync_redis",
        "rate_rps": RATE,
        "duration_s": 20.0,
        "events_s": ev,
        "republish_seconds": round(ev["sync_redis_done"] - ev["redis_restarted_empty"], 3),
        "recovered_after_republish_s": recovered,
        "recovery_limit_s": POLL_S + 1.0,
        "whole_run": summarize(run.samples),
        "phases": phases(
            run,
            [
                ("before_kill", 0.0, ev["redis_killed"] - 0.1),
                ("outage", ev["redis_killed"], ev["redis_restarted_empty"]),
                (
                    "empty_redis_until_republished",
                    ev["redis_restarted_empty"],
                    ev["sync_redis_done"],
                ),
                ("after_republish", ev["sync_redis_done"], 20.0),
            ],
        ),
        # An empty Redis answers "no list" for a user the bundle knows: such answers come
        # from the local store and must be labelled degraded (`redis_missing`, or the
        # version-key check's `redis_connection` once a poll saw the key missing).
        "empty_redis_local_store_answers_not_labelled_degraded": sum(
            1 for s in gap if s[STATUS] == 200 and s[SOURCE] == "local_store" and not s[DEGRADED]
        ),
        "workers_alive_at_end": workers_alive,
    }
    write_result("s1b_redis_restarted_empty_republished", report)
    whole = report["whole_run"]
    # Then nothing failed
    assert whole["http_5xx"] == 0
    assert whole["client_timeouts"] == 0
    assert whole["connection_errors"] == 0
    # and the empty Redis was really empty: answers came from the local store until the
    # republish (the last of them may already read keys it has written: they are versioned)
    assert report["phases"]["empty_redis_until_republished"]["sources"].get("local_store", 0) > 0
    # and none of those local-store answers passed for a normal one
    assert report["empty_redis_local_store_answers_not_labelled_degraded"] == 0
    # and after the republish every worker was back on Redis within one poll (+1 s)
    assert recovered is not None
    assert recovered <= POLL_S + 1.0
    before = report["phases"]["before_kill"]
    assert before["sources"] == {"redis": before["http_200"]}
    assert workers_alive == 2
