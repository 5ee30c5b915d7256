"""The operator dashboard (/admin/dashboard/) through the test client: every panel, staff only,
and a query count that does not grow with the data."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from apps.experiments import services as experiment_services
from apps.models.choices import ModelStatus
from apps.models.models import ModelVersion
from apps.pipeline.models import DataQualityReport, PipelineRun, RunStatus, Stage, StageRun
from tests.experiments.test_online import write

pytestmark = pytest.mark.django_db

URL = "/admin/dashboard/"


def run(kind: str, status: str, *, seconds: float, stages: dict[str, float]) -> PipelineRun:
    start = datetime(2026, 1, 10, 3, 30, tzinfo=UTC)
    pipeline_run = PipelineRun.objects.create(
        kind=kind,
        status=status,
        started_at=start,
        finished_at=start + timedelta(seconds=seconds),
        error="stage clean failed: disk full" if status == RunStatus.FAILED else "",
    )
    for stage, took in stages.items():
        StageRun.objects.create(
            pipeline_run=pipeline_run,
            stage=stage,
            status=RunStatus.SUCCEEDED,
            started_at=start,
            finished_at=start + timedelta(seconds=took),
        )
    return pipeline_run


@pytest.fixture
def exposure_log(tmp_path, settings):
    path = tmp_path / "exposures" / "exposures.jsonl"
    settings.RECO = {**settings.RECO, "EXPOSURE_LOG": str(path)}
    return path


def recent(minutes_ago: float, *, latency: float | None = 4.0, reason: str | None = None) -> dict:
    record = {
        "ts": (datetime.now(UTC) - timedelta(minutes=minutes_ago)).isoformat(),
        "request_id": f"q{minutes_ago}",
        "variant": "default",
        "model_version": "v2",
        "degraded": reason is not None,
        "degrade_reason": reason,
        "source": "popular" if reason else "redis",
        "items": [],
    }
    if latency is not None:
        record["latency_ms"] = latency
    return record


@pytest.fixture
def world(exposure_log):
    """Two older runs and the latest of each kind, a primary and a shadow, a running
    experiment, two quality reports, and 40 requests in the last hour (4 degraded)."""
    run("incremental", RunStatus.SUCCEEDED, seconds=1.0, stages={Stage.EXTRACT_BUSINESS: 1.0})
    latest_incremental = run(
        "incremental",
        RunStatus.SUCCEEDED,
        seconds=42.0,
        stages={Stage.EXTRACT_BUSINESS: 12.5, Stage.QUALITY: 3.25},
    )
    latest_full = run("full", RunStatus.FAILED, seconds=90.0, stages={Stage.TRAIN: 88.0})
    DataQualityReport.objects.create(score=80.0, threshold=90.0, passed=False)
    snapshot = StageRun.objects.create(
        stage=Stage.QUALITY,
        status=RunStatus.SUCCEEDED,
        started_at=datetime(2026, 1, 10, 4, tzinfo=UTC),
        finished_at=datetime(2026, 1, 10, 4, 0, 7, tzinfo=UTC),
    )
    quality = DataQualityReport.objects.create(
        score=96.4, threshold=90.0, passed=True, html_path="/tmp/quality.html"
    )
    primary = ModelVersion.objects.create(
        version="v2",
        status=ModelStatus.PRIMARY,
        traffic_share=1.0,
        bundle_path="/tmp/v2",
        metrics={"ndcg@10": 0.3125, "recall@10": 0.45, "auc": 0.8},
        quality_report=quality,
    )
    shadow = ModelVersion.objects.create(
        version="v3", status=ModelStatus.SHADOW, bundle_path="/tmp/v3", metrics={"ndcg@10": 0.33}
    )
    ModelVersion.objects.create(version="v1", status=ModelStatus.ARCHIVED, bundle_path="/tmp/v1")
    experiment = experiment_services.experiment_create(
        name="home-weights",
        scene="for_you",
        variants=[
            {"name": "control", "allocation": 5000},
            {"name": "ease", "allocation": 3333, "params": {"channel_weights": {"ease": 2.0}}},
        ],
    )
    experiment_services.experiment_start(experiment_id=experiment.pk)
    records = [recent(90, latency=900.0, reason="redis_timeout")]  # outside the hour
    records += [recent(50 - i, latency=float(i + 1)) for i in range(36)]
    records += [recent(10, reason="redis_timeout")] * 3 + [recent(5, reason="breaker_open")]
    write(exposure_log, records)
    return {
        "incremental": latest_incremental,
        "snapshot": snapshot,
        "full": latest_full,
        "quality": quality,
        "primary": primary,
        "shadow": shadow,
        "experiment": experiment,
    }


def test_the_dashboard_shows_every_panel(admin_client, world):
    response = admin_client.get(URL)
    assert response.status_code == 200
    html = response.content.decode()
    # pipeline: the latest run of each kind, its stage timings, links to the runs
    assert reverse("admin:pipeline_pipelinerun_change", args=[world["incremental"].pk]) in html
    assert reverse("admin:pipeline_pipelinerun_change", args=[world["full"].pk]) in html
    assert "12.5 s" in html
    assert "88.0 s" in html
    assert "stage clean failed: disk full" in html
    assert reverse("admin:pipeline_pipelinerun_changelist") in html
    # and the latest stage run outside any pipeline run (the quality snapshot)
    assert reverse("admin:pipeline_stagerun_change", args=[world["snapshot"].pk]) in html
    assert "7.0 s" in html
    # models: primary and shadow with offline metrics and links; the archived one is absent
    assert reverse("admin:registry_modelversion_change", args=[world["primary"].pk]) in html
    assert reverse("admin:registry_modelversion_change", args=[world["shadow"].pk]) in html
    assert "0.3125" in html
    assert "none (shadow)" in html
    assert ">v1<" not in html
    # experiments: the running one with allocations, parameters and a link to its results
    assert "home-weights" in html
    assert "33.33%" in html
    assert "&quot;ease&quot;: 2.0" in html
    assert reverse("admin:experiments_experiment_results", args=[world["experiment"].pk]) in html
    # data quality: the latest score, linked to the report and its HTML
    assert 'id="quality-score" class="ok">96.4<' in html
    assert reverse("pipeline:quality-report", args=[world["quality"].pk]) in html
    # serving: 40 requests in the hour, 4 degraded by reason, latency quantiles
    assert 'id="health-requests">40<' in html
    assert "4 (10.0%)" in html
    assert "redis_timeout" in html
    assert "3 (7.5%)" in html
    assert "breaker_open" in html
    assert "p99 " in html


def test_the_dashboard_says_when_the_hour_had_more_requests_than_it_read(
    admin_client, exposure_log, settings
):
    settings.RECO = {**settings.RECO, "DASHBOARD_HEALTH_MAX_RECORDS": 2}
    write(exposure_log, [recent(3), recent(2), recent(1)])
    html = admin_client.get(URL).content.decode()
    assert 'id="health-requests">2<' in html
    assert 'id="health-truncated"' in html


def test_latency_is_said_to_be_not_recorded_when_records_lack_it(admin_client, exposure_log):
    write(exposure_log, [recent(3, latency=None)])
    html = admin_client.get(URL).content.decode()
    assert 'id="health-requests">1<' in html
    assert "not recorded" in html


def test_an_empty_platform_renders_every_panel_with_a_note(admin_client, exposure_log):
    html = admin_client.get(URL).content.decode()
    assert "No pipeline run yet." in html
    assert "serving has no model" in html
    assert "No experiment is running." in html
    assert "No data-quality report yet." in html


def test_the_dashboard_is_for_staff_only(client, django_user_model, exposure_log):
    response = client.get(URL)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
    django_user_model.objects.create_user("shopper", password="pw", is_staff=False)
    client.login(username="shopper", password="pw")
    assert client.get(URL).status_code == 302


def test_the_admin_index_links_to_the_dashboard(admin_client):
    html = admin_client.get(reverse("admin:index")).content.decode()
    assert 'id="dashboard-link"' in html
    assert f'href="{URL}"' in html


def test_the_dashboard_query_count_does_not_grow_with_the_data(
    admin_client, world, django_assert_num_queries
):
    admin_client.get(URL)  # warm the session
    with CaptureQueriesContext(connection) as baseline:
        assert admin_client.get(URL).status_code == 200
    # When more runs (with stages), experiments and reports exist
    for i in range(5):
        run("incremental", RunStatus.SUCCEEDED, seconds=1.0, stages={Stage.CLEAN: 1.0})
        run(f"kind{i}", RunStatus.SUCCEEDED, seconds=1.0, stages={Stage.CLEAN: 1.0})
        DataQualityReport.objects.create(score=95.0, threshold=90.0, passed=True)
        StageRun.objects.create(stage=Stage.QUALITY if i % 2 else Stage.CLEAN)
    other = experiment_services.experiment_create(
        name="similar-test", scene="similar", variants=[{"name": "x", "allocation": 100}]
    )
    experiment_services.experiment_start(experiment_id=other.pk)
    # Then the page costs the same number of queries
    with django_assert_num_queries(len(baseline.captured_queries)):
        html = admin_client.get(URL).content.decode()
    assert "similar-test" in html
    assert "kind4" in html
