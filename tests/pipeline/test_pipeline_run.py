"""The pipeline end to end through its services, tasks, commands and admin, on demo data."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
from pathlib import Path

import pandas as pd
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from apps.pipeline import demo, services, tasks
from apps.pipeline.models import (
    DataQualityReport,
    ExtractionLock,
    ExtractionRun,
    PipelineRun,
    RunStatus,
    StageRun,
    Watermark,
)
from apps.pipeline.sources.db import make_engine
from tests.demo_frames import write_demo_sources

pytestmark = pytest.mark.django_db(transaction=True)

END = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)


@pytest.fixture
def demo_sources(tmp_path, settings, data_dir):
    """Small demo business + Matomo SQLite databases wired into the settings."""
    urls = write_demo_sources(
        tmp_path, demo.DemoConfig(users=150, items=60, actions=6000, days=20, seed=7, end=END)
    )
    business, matomo = urls["business"], urls["matomo"]
    settings.BUSINESS_DB_URL = business
    settings.MATOMO_DB_URL = matomo
    return {"business": business, "matomo": matomo}


def _run() -> PipelineRun:
    run = services.pipeline_run_create(kind="test", triggered_by="pytest")
    result = services.pipeline_run_execute(run_id=run.pk)
    assert result is not None
    return result


def test_a_full_run_extracts_scores_and_cleans_the_demo_data(demo_sources, data_dir):
    # When the whole pipeline runs once
    run = _run()
    # Then every stage succeeded, in order
    stages = list(run.stages.order_by("id"))
    assert [s.stage for s in stages] == list(services.PIPELINE_STAGES)
    assert all(s.status == RunStatus.SUCCEEDED for s in stages), [
        (s.stage, s.error) for s in stages
    ]
    assert run.status == RunStatus.SUCCEEDED
    # and each source table has an extraction record and a watermark
    assert ExtractionRun.objects.filter(source="business").count() == 4
    assert ExtractionRun.objects.filter(source="matomo").count() == 5
    assert Watermark.objects.filter(value__isnull=False).count() == 9
    # and clean demo data scores at least 97 with an HTML and a JSON report on disk
    report = DataQualityReport.objects.get()
    assert report.score >= 97, report.checks
    assert report.passed
    assert "<svg" in Path(report.html_path).read_text()
    assert json.loads(Path(report.json_path).read_text())["score"] == pytest.approx(report.score)
    # and the clean frames hold interactions of every source
    clean = pd.read_parquet(data_dir / "clean" / "interactions.parquet")
    assert set(clean["source"]) == {"business", "matomo"}
    assert {"detail_view", "purchase", "add_to_cart"} <= set(clean["event"])
    assert services.quality_gate_check() == report


def test_a_second_run_reads_only_the_lookback_window(demo_sources, data_dir):
    # Given a first full extraction
    _run()
    first = {(e.source, e.table): e.rows_read for e in ExtractionRun.objects.all()}
    # When nothing changed at the source and the pipeline runs again
    _run()
    second = {
        (e.source, e.table): e.rows_read
        for e in ExtractionRun.objects.filter(
            stage_run__pipeline_run__in=PipelineRun.objects.order_by("-id")[:1]
        )
    }
    # Then only the lookback windows are re-read, not the tables from the start
    # (the demo's action table is smaller than its 20,000-id lookback, so it is re-read whole)
    assert second[("matomo", "log_visit")] < first[("matomo", "log_visit")] / 10
    business_first = sum(v for (source, _), v in first.items() if source == "business")
    business_second = sum(v for (source, _), v in second.items() if source == "business")
    assert business_second < business_first / 10
    # and the lake still holds exactly the source rows (no duplicates from re-reading)
    engine = make_engine(demo_sources["matomo"])
    with engine.connect() as conn:
        source_rows = conn.exec_driver_sql(
            "SELECT COUNT(*) FROM matomo_log_link_visit_action"
        ).scalar_one()
    engine.dispose()
    assert services.lake().row_count("matomo", "log_link_visit_action") == source_rows


def test_a_failing_source_stops_the_run_and_keeps_the_watermark(demo_sources, settings, tmp_path):
    # Given a first successful run
    _run()
    before = {(w.source, w.table): (w.value, w.version) for w in Watermark.objects.all()}
    # When the Matomo database disappears
    settings.MATOMO_DB_URL = f"sqlite:///{tmp_path / 'missing' / 'matomo.sqlite3'}"
    run = _run()
    # Then the run failed at extract_matomo, the later stages did not run, and the error is kept
    assert run.status == RunStatus.FAILED
    statuses = {s.stage: s.status for s in run.stages.all()}
    assert statuses == {"extract_business": RunStatus.SUCCEEDED, "extract_matomo": RunStatus.FAILED}
    assert "extract_matomo" in run.error
    assert run.stages.get(stage="extract_matomo").error
    # and no Matomo watermark moved
    after = {
        (w.source, w.table): (w.value, w.version) for w in Watermark.objects.filter(source="matomo")
    }
    assert after == {k: v for k, v in before.items() if k[0] == "matomo"}
    # and the lock was released for the next run
    assert not ExtractionLock.objects.exclude(holder="").exists()


def test_the_task_runs_a_pipeline_once_even_when_delivered_twice(demo_sources):
    # Given a pending run
    run = services.pipeline_run_create(kind="test", triggered_by="pytest")
    # When the task is delivered twice (Celery eager in tests)
    first = tasks.pipeline_run_execute_task.delay(run.pk).get()
    second = tasks.pipeline_run_execute_task.delay(run.pk).get()
    # Then it ran once
    assert first == RunStatus.SUCCEEDED
    assert second is None
    assert StageRun.objects.filter(pipeline_run=run).count() == len(services.PIPELINE_STAGES)


def test_the_quality_gate_blocks_training_below_the_threshold(demo_sources, settings):
    # Given a report, and a threshold above any reachable score
    _run()
    settings.RECO = {**settings.RECO, "QUALITY_THRESHOLD": 100.5}
    # Then the gate refuses, naming the score and threshold
    with pytest.raises(services.QualityGateError, match=r"below the threshold 100.5"):
        services.quality_gate_check()


def test_the_commands_run_a_stage_and_the_pipeline(demo_sources, capsys):
    call_command("run_stage", "extract_business", "--no-progress")
    assert "extract_business succeeded" in capsys.readouterr().out
    call_command("run_pipeline", "--no-progress")
    out = capsys.readouterr().out
    assert "succeeded" in out
    assert "score=" in out
    call_command("check_sources")
    assert "source contract OK" in capsys.readouterr().out


def test_check_sources_names_the_missing_table(demo_sources, settings, tmp_path):
    empty = tmp_path / "empty.sqlite3"
    sqlite3.connect(empty).close()
    settings.MATOMO_DB_URL = f"sqlite:///{empty}"
    with pytest.raises(
        CommandError, match=r"matomo.log_visit: table 'matomo_log_visit' is missing"
    ):
        call_command("check_sources")


def test_a_source_that_does_not_exist_is_not_created(demo_sources, settings, tmp_path):
    missing = tmp_path / "typo.sqlite3"
    settings.BUSINESS_DB_URL = f"sqlite:///{missing}"
    with pytest.raises(CommandError, match=r"source 'business': cannot connect"):
        call_command("check_sources")
    assert not missing.exists()


def test_operators_see_runs_and_open_the_quality_report_in_the_admin(demo_sources, admin_client):
    # Given a finished run
    _run()
    report = DataQualityReport.objects.get()
    # Then the admin lists the run, its stages, watermarks and the report
    for name in ("pipelinerun", "stagerun", "watermark", "extractionrun", "dataqualityreport"):
        response = admin_client.get(reverse(f"admin:pipeline_{name}_changelist"))
        assert response.status_code == 200, name
    page = admin_client.get(reverse("admin:pipeline_dataqualityreport_changelist")).content.decode()
    assert reverse("pipeline:quality-report", args=[report.pk]) in page
    # and the HTML report opens with the score and charts
    html = admin_client.get(reverse("pipeline:quality-report", args=[report.pk]))
    assert html.status_code == 200
    body = b"".join(html.streaming_content).decode()
    assert f"{report.score:.1f}" in body
    assert "<svg" in body


def test_the_quality_report_is_not_public(demo_sources, client):
    _run()
    report = DataQualityReport.objects.get()
    response = client.get(reverse("pipeline:quality-report", args=[report.pk]))
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_the_run_now_button_queues_a_run(demo_sources, admin_client):
    # When an operator presses "Run pipeline now"
    response = admin_client.post(reverse("admin:pipeline_pipelinerun_run_now"), follow=True)
    # Then a run is recorded and the message says so (with no broker it runs on a thread)
    for thread in threading.enumerate():
        if thread.name.startswith("pipeline-run-"):
            thread.join(timeout=120)
    assert response.status_code == 200
    run = PipelineRun.objects.get()
    assert run.status == RunStatus.SUCCEEDED
    assert run.triggered_by.startswith("admin:")
    assert f"Pipeline run #{run.pk}" in response.content.decode()


def test_the_run_now_button_queues_nothing_while_a_manual_run_is_pending(admin_client):
    # Given a manual run still waiting for a worker (a double click, a second operator)
    pending = PipelineRun.objects.create(kind="manual", triggered_by="admin:first")
    # When the button is pressed again
    response = admin_client.post(reverse("admin:pipeline_pipelinerun_run_now"), follow=True)
    # Then no second run exists and the operator is told which run is active
    assert response.status_code == 200
    assert list(PipelineRun.objects.values_list("pk", flat=True)) == [pending.pk]
    assert f"Pipeline run #{pending.pk} is already pending or running" in (
        response.content.decode()
    )


def test_metrics_export_the_latest_quality_score(demo_sources, client):
    _run()
    body = client.get("/metrics").content.decode()
    score = DataQualityReport.objects.get().score
    line = next(ln for ln in body.splitlines() if ln.startswith("recoplatform_data_quality_score "))
    assert float(line.split()[1]) == pytest.approx(score)


def test_the_admin_shows_the_feature_catalogue(admin_client):
    from apps.pipeline.features import catalogue

    page = admin_client.get(reverse("pipeline:feature-catalogue")).content.decode()
    assert f"Feature catalogue ({len(catalogue())} features)" in page
    assert "<code>recall_score_itemcf</code>" in page
    index = admin_client.get(reverse("admin:index")).content.decode()
    assert reverse("pipeline:feature-catalogue") in index
