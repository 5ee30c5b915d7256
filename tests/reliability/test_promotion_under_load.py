"""Scenario 9: a promotion and a rollback while the production server is under load.

A second version (a copy of the trained bundle, registered as a candidate) is promoted through
`model_version_promote` (every gate) and then rolled back with `model_version_rollback`, by a
separate Django process on the server's registry, as an operator's action would. Both
versions' lists are in Redis beforehand. Workers learn of the change from the registry's
`reco:model:changed` message (state.py's listener), with the 5 s poll as the safety net.

Figures, from the responses: every response is a 200 that names exactly one model version,
one of the two; the switch time is from the service's commit to the scheduled send time of
the last response that still carried the previous version (so it covers every worker).

Control: the same promotion against a server with the change messages off and a 300 s poll.
One worker then keeps the old version for longer than 5 s and the switch check reports it,
so the check can see a worker that did not switch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.reliability.serving_fixtures import (
    OFFSET,
    STATUS,
    VERSION,
    DemoSite,
    LoadRun,
    RedisProcess,
    RegistryOperator,
    run_load,
    running_server,
    summarize,
    write_result,
)

pytestmark = pytest.mark.slow

RATE = 100.0
SWITCH_LIMIT_S = 5.0
# The control's poll is far longer than its run: with 30 s a poll could land within 5 s of the
# promotion (depending on when the workers started) and the control would pass as a switch.
NO_HOT_RELOAD = {"RECO_SERVING_PUBSUB": "0", "RECO_SERVING_POLL_SECONDS": "300"}


def switch_figures(run: LoadRun, at: float, old: str, new: str, until: float) -> dict:
    """How long after `at` the previous version was still served, in [at, until)."""
    window = run.window(at - 1.0, until)
    stale = [s[OFFSET] for s in window if s[VERSION] == old and s[OFFSET] >= at]
    fresh = [s[OFFSET] for s in window if s[VERSION] == new and s[OFFSET] >= at]
    return {
        "committed_at_s": at,
        "last_previous_version_after_s": round(max(stale) - at, 3) if stale else 0.0,
        "first_new_version_after_s": round(min(fresh) - at, 3) if fresh else None,
        "previous_version_responses_after_commit": len(stale),
    }


def _promote_and_roll_back(
    site: DemoSite,
    redis: RedisProcess,
    workdir: Path,
    settings: dict[str, str],
    *,
    promote_at: float,
    rollback_at: float | None,
    duration: float,
) -> dict:
    with running_server(site, workdir, redis.url, settings=settings) as server:
        operator = RegistryOperator(server)
        timeline = [
            (promote_at, "promote", operator.action("promote", f"promote {site.candidate}"))
        ]
        if rollback_at is not None:
            timeline.append((rollback_at, "rollback", operator.action("rollback", "rollback")))
        try:
            run = run_load(
                server, site.for_you_paths(), rate=RATE, duration=duration, timeline=timeline
            )
        finally:
            operator.close()
        served_at_end = server.served_versions()
        workers_alive = len(server.worker_pids())
    answers = operator.answers
    promoted = run.offset(answers["promote"]["done_at"])
    end_promoted = run.offset(answers["rollback"]["done_at"]) if "rollback" in answers else duration
    figures: dict[str, Any] = {
        "events_s": run.events,
        "operator_answers": answers,
        "whole_run": summarize(run.samples),
        "versions_seen": sorted({str(s[VERSION]) for s in run.samples}),
        "responses_without_exactly_one_version": sum(
            1
            for s in run.samples
            if s[STATUS] != 200 or not isinstance(s[VERSION], str) or not s[VERSION]
        ),
        "promotion": switch_figures(run, promoted, site.primary, site.candidate, end_promoted),
        "served_by_each_worker_at_end": {str(k): v for k, v in served_at_end.items()},
        "workers_alive_at_end": workers_alive,
    }
    if "rollback" in answers:
        rolled = run.offset(answers["rollback"]["done_at"])
        figures["rollback"] = switch_figures(run, rolled, site.candidate, site.primary, duration)
    return figures


def test_a_promotion_and_a_rollback_under_load_switch_every_worker_without_a_failure(
    demo_site: DemoSite, redis_server: RedisProcess, tmp_path: Path
) -> None:
    # Given both versions' lists in Redis and the server serving the primary
    demo_site.publish(redis_server.url, demo_site.primary, demo_site.candidate)
    # When the candidate is promoted at 4 s and rolled back at 10 s under 100 requests/s
    live = _promote_and_roll_back(
        demo_site,
        redis_server,
        tmp_path / "hot",
        {},
        promote_at=4.0,
        rollback_at=10.0,
        duration=16.0,
    )
    # and the control: a promotion that the workers would only find by a 300 s poll
    control = _promote_and_roll_back(
        demo_site,
        redis_server,
        tmp_path / "control",
        NO_HOT_RELOAD,
        promote_at=2.0,
        rollback_at=None,
        # The promotion's gates (latency compared with the primary) take about 2 s: the run
        # must outlast the commit by well over the 5 s limit for the control to show anything.
        duration=12.0,
    )
    report = {
        "what": "promote a candidate, then roll back, through the registry services under load",
        "rate_rps": RATE,
        "workers": 2,
        "versions": {"primary": demo_site.primary, "candidate": demo_site.candidate},
        "switch_limit_s": SWITCH_LIMIT_S,
        "with_hot_reload": live,
        "control_poll_300s_no_pubsub": control,
    }
    write_result("s9_promotion_rollback_under_load", report)
    # Then both actions were applied
    assert live["operator_answers"]["promote"]["ok"], live["operator_answers"]
    assert live["operator_answers"]["rollback"]["ok"], live["operator_answers"]
    # and no request failed, each response naming exactly one of the two versions
    whole = live["whole_run"]
    assert whole["http_200"] == whole["requests"] == int(RATE * 16.0)
    assert live["responses_without_exactly_one_version"] == 0
    assert live["versions_seen"] == sorted([demo_site.primary, demo_site.candidate])
    # and every worker switched within 5 s, both ways
    for change in ("promotion", "rollback"):
        assert live[change]["first_new_version_after_s"] is not None, change
        assert live[change]["last_previous_version_after_s"] <= SWITCH_LIMIT_S, change
    assert set(live["served_by_each_worker_at_end"].values()) == {demo_site.primary}
    assert len(live["served_by_each_worker_at_end"]) == live["workers_alive_at_end"] == 2
    # The control: without the change message the same check sees a worker still serving
    # the previous version more than 5 s after the commit
    assert control["operator_answers"]["promote"]["ok"], control["operator_answers"]
    assert control["promotion"]["last_previous_version_after_s"] > SWITCH_LIMIT_S
