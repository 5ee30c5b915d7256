"""Operator workflows in a real browser: log in, edit a running experiment, promote the shadow
model, read the quality report and the dashboard; each checked in the database and, where
serving is concerned, in the API's answers."""

from __future__ import annotations

import json
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from django.contrib.admin.models import LogEntry

from tests.browser.conftest import IN_CI

if not IN_CI:  # with CI=true a missing selenium must fail the run, not skip it
    pytest.importorskip("selenium", reason="selenium is not installed (requirements-dev.txt)")

from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

from apps.experiments import services as experiment_services
from apps.experiments.bucketing import bucket
from apps.experiments.models import Variant
from apps.models import services as model_services
from apps.models.bundle import write_manifest
from apps.models.choices import AuditAction, AuditOutcome, ModelStatus
from apps.models.models import ModelAudit, ModelVersion
from apps.pipeline import frames, schema
from apps.pipeline import services as pipeline_services
from apps.pipeline.models import DataQualityReport
from tests.models.test_services import FEATURES, GOOD_METRICS, good_loader, quality_report
from tests.serving.test_recommend import make_bundle

pytestmark = pytest.mark.django_db(transaction=True)

WAIT_SECONDS = 10


# --- helpers ------------------------------------------------------------------------------------


def wait_for(browser: Any, css: str) -> Any:
    return WebDriverWait(browser, WAIT_SECONDS).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, css))
    )


def log_in(browser: Any, live_server: Any, username: str = "admin", password: str = "password"):
    browser.get(f"{live_server.url}/admin/login/")
    browser.find_element(By.NAME, "username").send_keys(username)
    browser.find_element(By.NAME, "password").send_keys(password)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait_for(browser, "#user-tools")


def api(live_server: Any, path: str) -> dict[str, Any]:
    """GET a JSON answer of the live server (loopback only)."""
    with urllib.request.urlopen(f"{live_server.url}{path}", timeout=10) as response:
        assert response.status == 200
        return json.loads(response.read())


def success_message(browser: Any) -> str:
    return wait_for(browser, ".messagelist .success").text


def user_in_bucket(salt: str, low: int, high: int) -> int:
    """The first user id whose bucket under ``salt`` is in [low, high)."""
    return next(u for u in range(1, 100_000) if low <= bucket(salt, u) < high)


# --- workflows ----------------------------------------------------------------------------------


def test_an_operator_logs_in_to_the_admin(browser, live_server, admin_user):
    # When the operator signs in with a password
    log_in(browser, live_server)
    # Then the admin index greets them and links to the dashboard
    assert "admin" in browser.find_element(By.CSS_SELECTOR, "#user-tools").text.lower()
    link = browser.find_element(By.CSS_SELECTOR, "#dashboard-link a")
    assert link.get_attribute("href") == f"{live_server.url}/admin/dashboard/"


def test_a_wrong_password_does_not_get_in(browser, live_server, admin_user):
    browser.get(f"{live_server.url}/admin/login/")
    browser.find_element(By.NAME, "username").send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys("not-the-password")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    assert "enter the correct username and password" in wait_for(browser, ".errornote").text
    assert not browser.find_elements(By.CSS_SELECTOR, "#user-tools")


def test_editing_a_running_experiments_variant_reaches_the_database_and_the_api(
    browser, live_server, admin_user, serving
):
    # Given experiment "home" running on for_you: control takes buckets 0-4999, ease 5000-9999
    home = experiment_services.experiment_create(
        name="home",
        scene="for_you",
        variants=[
            {"name": "control", "allocation": 5000},
            {"name": "ease", "allocation": 5000, "params": {"channel_weights": {"ease": 1.0}}},
        ],
    )
    experiment_services.experiment_start(experiment_id=home.pk)
    staying = user_in_bucket("home", 5000, 8000)  # stays in ease when ease shrinks to 30%
    leaving = user_in_bucket("home", 8000, 10_000)  # falls outside it
    for user in (staying, leaving):
        assert api(live_server, f"/api/v1/users/{user}/assignment")["variants"]["for_you"] == (
            "home:ease"
        )
    # When the operator changes ease's channel weights and its share in the change form
    log_in(browser, live_server)
    browser.get(f"{live_server.url}/admin/experiments/experiment/{home.pk}/change/")
    index = next(
        i
        for i in range(2)
        if browser.find_element(By.NAME, f"variants-{i}-name").get_attribute("value") == "ease"
    )
    params = browser.find_element(By.NAME, f"variants-{index}-params")
    params.clear()
    params.send_keys('{"channel_weights": {"ease": 3.0, "popular": 0.5}}')
    percent = browser.find_element(By.NAME, f"variants-{index}-percent")
    percent.clear()
    percent.send_keys("30")
    browser.find_element(By.NAME, "_continue").click()
    assert "was changed successfully" in success_message(browser)
    # Then the database holds the canonical parameters and the new share
    ease = Variant.objects.get(experiment=home, name="ease")
    assert ease.params == {"channel_weights": {"ease": 3.0, "popular": 0.5}}
    assert ease.allocation == 3000
    assert LogEntry.objects.filter(object_id=str(home.pk), user=admin_user).exists()
    # And the API answers with the new configuration at once: the user whose bucket is still
    # inside ease keeps it, the other is now outside the experiment
    assert api(live_server, f"/api/v1/users/{staying}/assignment")["variants"]["for_you"] == (
        "home:ease"
    )
    assert api(live_server, f"/api/v1/users/{leaving}/assignment")["variants"]["for_you"] == (
        "default"
    )
    body = api(live_server, f"/api/v1/recommendations/for-you?user_id={staying}")
    assert body["variant"] == "home:ease"
    # and the experiments snapshot those answers were served from carries the new weights
    # (the assignment endpoint shows variant labels, not parameters)
    served = serving.current().experiments.for_scene("for_you").assign(staying)
    assert dict(served.params.channel_weights) == {"ease": 3.0, "popular": 0.5}


@pytest.fixture
def registry(tmp_path: Path, settings: Any) -> dict[str, ModelVersion]:
    """A primary v1 and a shadow v2, both real serving bundles with manifests; v2 recommends
    item 22 to user 1 where v1 recommends items 10-13. The admin's smoke test uses a loader
    that always scores."""
    settings.RECO = {**settings.RECO, "BUNDLE_LOADER": "tests.models.test_services.good_loader"}
    versions = {}
    for version, recs in (("v1", None), ("v2", {1: [[22, 0.99, "usercf"]]})):
        directory = make_bundle(tmp_path / version, user_recs=recs)
        write_manifest(
            directory,
            version=version,
            created_at="2026-01-01T00:00:00+00:00",
            data_snapshot={"interactions": "snap-1"},
            features=FEATURES,
            params={},
            metrics=GOOD_METRICS,
        )
        versions[version] = model_services.model_version_register(
            bundle_path=str(directory),
            version=version,
            metrics=GOOD_METRICS,
            feature_schema=FEATURES,
            quality_report_id=quality_report().pk,
            actor="pipeline",
        )
    model_services.model_version_promote(
        version_id=versions["v1"].pk, actor="pipeline", loader=good_loader
    )
    model_services.model_version_start_shadow(
        version_id=versions["v2"].pk, actor="pipeline", loader=good_loader
    )
    return versions


def test_promoting_the_shadow_with_the_one_click_action_switches_what_the_api_serves(
    browser, live_server, admin_user, serving, registry
):
    # Given v1 serving and v2 in shadow
    before = api(live_server, "/api/v1/recommendations/for-you?user_id=1&limit=4")
    assert before["model_version"] == "v1"
    assert [i["item_id"] for i in before["items"]] == [10, 11, 12, 13]
    assert api(live_server, "/api/v1/users/1/assignment")["shadow"]["version"] == "v2"
    # When the operator selects v2 and runs "Promote to primary"
    log_in(browser, live_server)
    browser.get(f"{live_server.url}/admin/registry/modelversion/")
    v2 = registry["v2"]
    browser.find_element(By.CSS_SELECTOR, f"input[name=_selected_action][value='{v2.pk}']").click()
    Select(browser.find_element(By.NAME, "action")).select_by_value("promote_to_primary")
    browser.find_element(By.CSS_SELECTOR, "button[name=index]").click()
    # Then the admin says so
    assert "Promoted v2 to primary (v1 archived)." in success_message(browser)
    # and the registry changed, with an audit row naming the operator and a LogEntry
    v2.refresh_from_db()
    assert v2.status == ModelStatus.PRIMARY
    assert ModelVersion.objects.get(version="v1").status == ModelStatus.ARCHIVED
    audit = ModelAudit.objects.get(
        model_version=v2, action=AuditAction.PROMOTE, outcome=AuditOutcome.APPLIED
    )
    assert audit.actor == "admin"
    assert LogEntry.objects.filter(object_id=str(v2.pk), user=admin_user).exists()
    # and the API serves v2 from the next request on
    after = api(live_server, "/api/v1/recommendations/for-you?user_id=1&limit=4")
    assert after["model_version"] == "v2"
    assert [i["item_id"] for i in after["items"]] == [22]
    assignment = api(live_server, "/api/v1/users/1/assignment")
    assert (assignment["primary"], assignment["shadow"]) == ("v2", None)


@pytest.fixture
def quality(data_dir: Path) -> DataQualityReport:
    """A real quality stage run over a small staged data set (its HTML report is on disk)."""
    now = pd.Timestamp(datetime.now(UTC))
    users = pd.DataFrame(
        {
            "user_id": [1, 2, 3],
            "username": ["a", "b", "c"],
            "company": ["x", "y", "z"],
            "industry": ["retail"] * 3,
            "province": ["p"] * 3,
            "city": ["c"] * 3,
            "created_at": [now] * 3,
        }
    )
    items = pd.DataFrame(
        {
            "item_id": [10, 11],
            "title": ["Ten", "Eleven"],
            "description": ["d", "d"],
            "tags": ["t", "t"],
            "category": ["books", "music"],
            "price": [10.0, 11.0],
            "company": ["x", "y"],
            "created_at": [now] * 2,
            "updated_at": [now] * 2,
            "is_active": [True, True],
        }
    )
    interactions = schema.empty_frame(schema.ENTITIES["interactions"])
    frames.write_frames(
        data_dir / "staged", {"users": users, "items": items, "interactions": interactions}
    )
    stage = pipeline_services.stage_run_execute(stage="quality")
    assert stage.status == "succeeded", stage.error
    return DataQualityReport.objects.get(pk=stage.detail["report_id"])


def test_the_quality_report_and_the_dashboard_show_what_the_platform_is_doing(
    browser, live_server, admin_user, serving, registry, quality, exposure_writer
):
    # Given three recommendation requests served (their exposure lines are on disk)
    for user in (1, 2, 3):
        api(live_server, f"/api/v1/recommendations/for-you?user_id={user}")
    assert exposure_writer.flush()
    log_in(browser, live_server)
    # When the operator opens the quality report in the admin
    browser.get(f"{live_server.url}/admin/pipeline/dataqualityreport/{quality.pk}/change/")
    page = wait_for(browser, "#content-main").text
    assert f"{quality.score:.1f}" in page
    html_link = browser.find_element(By.LINK_TEXT, "HTML report").get_attribute("href")
    # and follows its HTML report
    browser.get(html_link)
    assert f"Data quality report #{quality.pk}" in browser.title + browser.page_source
    verdict = "PASSED" if quality.passed else "BLOCKED"
    assert verdict in browser.find_element(By.TAG_NAME, "body").text
    # When the operator opens the dashboard from the admin index
    browser.get(f"{live_server.url}/admin/")
    browser.find_element(By.CSS_SELECTOR, "#dashboard-link a").click()
    wait_for(browser, "#panel-serving")
    # Then each panel shows the state of the platform
    assert browser.title.startswith("Operator dashboard")
    models = browser.find_element(By.ID, "panel-models").text
    assert "v1" in models
    assert "v2" in models
    assert "0.3000" in models  # ndcg@10 of the primary
    quality_panel = browser.find_element(By.ID, "panel-quality").text
    assert f"{quality.score:.1f}" in quality_panel
    assert browser.find_element(By.ID, "health-requests").text == "3"
    assert "p99" in browser.find_element(By.ID, "health-latency").text
    # and the quality link on the dashboard leads to the same report
    href = browser.find_element(By.CSS_SELECTOR, "#panel-quality a").get_attribute("href")
    assert href.endswith(f"/admin/pipeline/dataqualityreport/{quality.pk}/change/")


def post_feedback(live_server: Any, **event: Any) -> None:
    request = urllib.request.Request(
        f"{live_server.url}/api/v1/feedback",
        data=json.dumps(event).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 202


def test_compute_now_turns_served_requests_and_feedback_into_results_per_variant(
    browser, live_server, admin_user, serving, registry, exposure_writer, data_dir
):
    # (data_dir: the computation writes DATA_DIR/evaluation/online-<day>.json, kept out of var/)
    # Given experiment "home" running (control 0-4999, ease 5000-9999) and one user in each
    home = experiment_services.experiment_create(
        name="home",
        scene="for_you",
        variants=[{"name": "control", "allocation": 5000}, {"name": "ease", "allocation": 5000}],
    )
    experiment_services.experiment_start(experiment_id=home.pk)
    in_control = user_in_bucket("home", 0, 5000)
    in_ease = user_in_bucket("home", 5000, 10_000)
    # and real API answers (the popular list of 4 items for these unknown users) with feedback:
    # the ease user clicks the first item and buys it for 25.0; the control user does nothing
    shown = {}
    for user in (in_control, in_ease):
        body = api(live_server, f"/api/v1/recommendations/for-you?user_id={user}&limit=4")
        shown[user] = (body["request_id"], [i["item_id"] for i in body["items"]])
    assert len(shown[in_ease][1]) == 4
    rid, items = shown[in_ease]
    post_feedback(live_server, request_id=rid, event="click", item_id=items[0], user_id=in_ease)
    post_feedback(live_server, request_id=rid, event="purchase", item_id=items[0], value=25.0)
    assert exposure_writer.flush()
    # When the operator opens the experiment, follows "Online results" and clicks "Compute now"
    log_in(browser, live_server)
    browser.get(f"{live_server.url}/admin/experiments/experiment/{home.pk}/change/")
    browser.find_element(By.ID, "online-results-link").click()
    assert "No online evaluation" in wait_for(browser, "#no-report").text
    browser.find_element(By.ID, "compute-now").click()
    assert "2 requests" in success_message(browser)

    # Then each variant's row shows its requests, clicks, purchases and rates
    def cell(variant: str, column: str) -> str:
        return browser.find_element(
            By.CSS_SELECTOR, f"#results-latest tr[data-variant='{variant}'] td.{column}"
        ).text

    assert (cell("ease", "requests"), cell("ease", "impressions")) == ("1", "4")
    assert (cell("ease", "clicks"), cell("ease", "purchases")) == ("1", "1")
    assert cell("ease", "ctr").startswith("25.00%")
    assert cell("ease", "cvr-click").startswith("100.00%")
    assert cell("ease", "gmv").startswith("6.25")  # 25.0 over 4 items shown
    assert (cell("control", "requests"), cell("control", "clicks")) == ("1", "0")
    assert cell("control", "ctr").startswith("0.00%")
    # and the stored report and the LogEntry of the action exist
    assert LogEntry.objects.filter(user=admin_user, change_message__contains="compute now").exists()
