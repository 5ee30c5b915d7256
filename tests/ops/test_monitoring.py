"""The shipped monitoring configuration is valid, and its alert rules behave as tested.

Runs the real tools (promtool, amtool) against monitoring/, as Prometheus and Alertmanager
would load it, and checks what the tools do not: each alert carries what on-call needs (a
severity, a summary, a description and a runbook link that resolves), and each alert has a
unit test that shows it firing and one that shows it quiet.
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.ops.conftest import MONITORING, ROOT

ALERT_FILES = sorted((MONITORING / "alerts").glob("*.yml"))
TEST_FILES = sorted((MONITORING / "tests").glob("*.yml"))
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
SEVERITIES = {"critical", "warning", "info"}


def alert_rules() -> list[dict]:
    rules = []
    for path in ALERT_FILES:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            rules.extend(rule for rule in group["rules"] if "alert" in rule)
    return rules


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def runbook_anchors() -> set[str]:
    text = RUNBOOK.read_text(encoding="utf-8")
    return {github_anchor(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.MULTILINE)}


# -- the tools -------------------------------------------------------------------------------


def test_prometheus_config_is_valid_and_loads_every_alert_file(promtool, run):
    result = run(promtool, "check", "config", MONITORING / "prometheus.yml")
    assert result.returncode == 0, result.stdout
    # rule_files is relative to prometheus.yml, so the check also loads the rules: a glob
    # that matched nothing would pass silently with "0 rule files found".
    assert f"{len(ALERT_FILES)} rule files found" in result.stdout


def test_alert_rule_files_are_valid(promtool, run):
    result = run(promtool, "check", "rules", *ALERT_FILES)
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("SUCCESS") == len(ALERT_FILES)


def test_alert_rule_unit_tests_pass(promtool, run):
    assert TEST_FILES, "monitoring/tests/*.yml holds the promtool unit tests"
    result = run(promtool, "test", "rules", *TEST_FILES)
    assert result.returncode == 0, result.stdout
    assert "FAILED" not in result.stdout


def test_promtool_rejects_a_broken_rule(promtool, run, tmp_path):
    # The checks above would be worthless if promtool accepted anything.
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "groups:\n  - name: x\n    rules:\n      - alert: Broken\n        expr: sum(rate(x[5m])\n"
    )
    assert run(promtool, "check", "rules", broken).returncode != 0


def test_alertmanager_config_is_valid(amtool, run):
    result = run(amtool, "check-config", MONITORING / "alertmanager.yml")
    assert result.returncode == 0, result.stdout
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize(
    ("severity", "receiver"),
    [("critical", "oncall-critical"), ("warning", "oncall-warning"), ("info", "oncall-warning")],
)
def test_alertmanager_routes_each_severity_to_its_receiver(amtool, run, severity, receiver):
    result = run(
        amtool,
        "config",
        "routes",
        "test",
        f"--config.file={MONITORING / 'alertmanager.yml'}",
        "alertname=Example",
        f"severity={severity}",
        merge=False,  # amtool warns on stderr that --config.file overrides the URL
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == receiver


# -- what the tools do not check -------------------------------------------------------------


def test_the_alerts_cover_the_on_call_brief():
    names = {rule["alert"] for rule in alert_rules()}
    assert {
        "ApiHighErrorRate",
        "RecommendationLatencyP99High",
        "RecommendationDegradedShareHigh",
        "RecommendationTimeoutsHigh",
        "RecommendationBreakerOpen",
        "DataQualityBelowThreshold",
        "PipelineStageFailed",
        "PipelineStale",
        "ModelStale",
        "ExposureLogDropping",
        "TargetDown",
    } <= names
    assert len(names) == len(alert_rules()), "alert names are unique"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_each_alert_has_a_severity_summary_description_and_a_runbook_section(rule):
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert annotations["summary"].strip()
    assert annotations["description"].strip()
    path, _, anchor = annotations["runbook_url"].partition("#")
    assert path == "docs/RUNBOOK.md"
    assert anchor in runbook_anchors(), f"docs/RUNBOOK.md has no heading for #{anchor}"


def _unit_tests() -> dict[str, dict[str, int]]:
    """For each alert: how many promtool test cases expect it firing, and how many quiet."""
    seen: dict[str, dict[str, int]] = {}
    for path in TEST_FILES:
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for check in case.get("alert_rule_test", []):
                outcome = "firing" if check.get("exp_alerts") else "quiet"
                counts = seen.setdefault(check["alertname"], {"firing": 0, "quiet": 0})
                counts[outcome] += 1
    return seen


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_each_alert_has_unit_tests_showing_it_firing_and_quiet(rule):
    counts = _unit_tests().get(rule["alert"], {"firing": 0, "quiet": 0})
    assert counts["firing"] >= 1, f"no promtool test expects {rule['alert']} to fire"
    assert counts["quiet"] >= 1, f"no promtool test expects {rule['alert']} to stay quiet"


def test_runbook_anchors_follow_github_rules():
    # The anchor function must agree with the renderer, or every link above is unchecked.
    assert github_anchor("ApiHighErrorRate") == "apihigherrorrate"
    assert github_anchor("Confirm: the `up` panel") == "confirm-the-up-panel"


def test_the_runbook_names_only_management_commands_that_exist():
    from django.core.management import get_commands

    text = RUNBOOK.read_text(encoding="utf-8")
    named = set(re.findall(r"manage\.py\s+([a-z_]+)", text))
    assert {"run_pipeline", "sync_redis", "check_sources"} <= named
    assert named - set(get_commands()) == set()


def test_the_runbook_relies_on_files_that_exist():
    # Paths the runbook tells on-call to open or edit.
    text = RUNBOOK.read_text(encoding="utf-8")
    paths = set(re.findall(r"`((?:monitoring|config|apps|docs)/[\w./-]+\.\w+)`", text))
    assert paths, "the runbook points at configuration files"
    assert [p for p in sorted(paths) if not (ROOT / p).exists()] == []
