"""The scrape-time collector exports pipeline, registry and experiment state from the database."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from django.db import DatabaseError
from prometheus_client import CollectorRegistry, generate_latest

from apps.experiments.models import Experiment, Variant
from apps.models.models import ModelVersion
from apps.pipeline.metrics import PipelineCollector
from apps.pipeline.models import DataQualityReport, PipelineRun, RunStatus, StageRun

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def collector() -> PipelineCollector:
    return PipelineCollector(clock=lambda: NOW)


def samples(name: str, source: PipelineCollector | None = None) -> dict[tuple, float]:
    """Every sample of one metric, keyed by its sorted (label, value) pairs."""
    found: dict[tuple, float] = {}
    for family in (source or collector()).collect():
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def stage_run(stage: str, status: str, *, ended_ago: timedelta, seconds: float) -> StageRun:
    finished = NOW - ended_ago
    return StageRun.objects.create(
        stage=stage,
        status=status,
        started_at=finished - timedelta(seconds=seconds),
        finished_at=finished,
    )


def pipeline_run(kind: str, status: str, *, ended_ago: timedelta | None) -> PipelineRun:
    finished = NOW - ended_ago if ended_ago is not None else None
    return PipelineRun.objects.create(
        kind=kind, status=status, started_at=finished, finished_at=finished
    )


def model_version(version: str, status: str, **fields) -> ModelVersion:
    return ModelVersion.objects.create(
        version=version, status=status, bundle_path=f"/bundles/{version}", **fields
    )


def test_an_empty_database_exports_no_samples_and_reports_every_section_up():
    # Given a fresh install: no reports, runs, models or experiments
    # When Prometheus scrapes
    up = samples("recoplatform_collector_section_up")
    # Then every section was read, and there is nothing to report
    assert up == {
        (("section", s),): 1.0 for s in ("quality", "stages", "runs", "models", "experiments")
    }
    assert samples("recoplatform_data_quality_score") == {}
    assert samples("recoplatform_model_version_info") == {}
    assert samples("recoplatform_pipeline_stage_last_status") == {}


def test_the_latest_quality_report_gives_the_score_and_gate():
    DataQualityReport.objects.create(score=97.0, threshold=90.0, passed=True)
    DataQualityReport.objects.create(score=84.5, threshold=90.0, passed=False)

    assert samples("recoplatform_data_quality_score") == {(): 84.5}
    assert samples("recoplatform_data_quality_passed") == {(): 0.0}


def test_each_stage_reports_the_duration_and_status_of_its_last_finished_run():
    # Given extract_business succeeded (10 s), then failed (3 s), and is running again now
    stage_run("extract_business", RunStatus.SUCCEEDED, ended_ago=timedelta(hours=2), seconds=10)
    stage_run("extract_business", RunStatus.FAILED, ended_ago=timedelta(hours=1), seconds=3)
    StageRun.objects.create(stage="extract_business", status=RunStatus.RUNNING, started_at=NOW)
    # and quality succeeded in 42 s
    stage_run("quality", RunStatus.SUCCEEDED, ended_ago=timedelta(minutes=5), seconds=42)

    # When Prometheus scrapes
    durations = samples("recoplatform_pipeline_stage_last_duration_seconds")
    statuses = samples("recoplatform_pipeline_stage_last_status")
    finished = samples("recoplatform_pipeline_stage_last_finished_timestamp_seconds")

    # Then the failure is the last result of extract_business (the running one has none yet)
    assert durations == {(("stage", "extract_business"),): 3.0, (("stage", "quality"),): 42.0}
    assert statuses[(("stage", "extract_business"), ("status", "failed"))] == 1.0
    assert statuses[(("stage", "extract_business"), ("status", "succeeded"))] == 0.0
    assert statuses[(("stage", "quality"), ("status", "succeeded"))] == 1.0
    # every status of a reported stage has a sample, stages never run have none
    assert {dict(k)["status"] for k in statuses} == set(RunStatus.values)
    assert {dict(k)["stage"] for k in statuses} == {"extract_business", "quality"}
    assert finished[(("stage", "quality"),)] == (NOW - timedelta(minutes=5)).timestamp()


def test_seconds_since_the_last_success_is_per_kind_and_infinite_when_none_succeeded():
    # Given incremental runs: a success two hours ago, then a failure an hour ago
    pipeline_run("incremental", RunStatus.SUCCEEDED, ended_ago=timedelta(hours=2))
    pipeline_run("incremental", RunStatus.FAILED, ended_ago=timedelta(hours=1))
    # and full runs that have only ever failed or are still running
    pipeline_run("full", RunStatus.FAILED, ended_ago=timedelta(hours=3))
    pipeline_run("full", RunStatus.RUNNING, ended_ago=None)

    since = samples("recoplatform_pipeline_seconds_since_last_success")

    # Then the failure does not reset the clock, and "full" is infinitely stale
    assert since[(("kind", "incremental"),)] == 2 * 3600.0
    assert math.isinf(since[(("kind", "full"),)])
    # which the text exposition renders as +Inf, a value Prometheus compares as expected
    registry = CollectorRegistry()
    registry.register(collector())
    assert 'recoplatform_pipeline_seconds_since_last_success{kind="full"} +Inf' in (
        generate_latest(registry).decode()
    )


def test_live_model_versions_are_exported_with_share_age_and_the_primarys_offline_metrics():
    # Given a primary, a canary, a shadow and rows that serve no traffic
    primary = model_version(
        "v3",
        "primary",
        traffic_share=0.9,
        metrics={"ndcg@10": 0.31, "recall@10": 0.42, "per_channel": {"ease": 0.2}, "ok": True},
    )
    model_version("v4", "canary", traffic_share=0.1, metrics={"ndcg@10": 0.35})
    model_version("v5", "shadow")
    model_version("v2", "archived", traffic_share=0.0)
    model_version("v6", "candidate")
    ModelVersion.objects.filter(pk=primary.pk).update(created_at=NOW - timedelta(days=2))

    info = samples("recoplatform_model_version_info")
    share = samples("recoplatform_model_traffic_share")
    offline = samples("recoplatform_model_offline_metric")
    age = samples("recoplatform_model_age_seconds")

    # Then only primary/canary/shadow appear, each with its status
    assert info == {
        (("status", "primary"), ("version", "v3")): 1.0,
        (("status", "canary"), ("version", "v4")): 1.0,
        (("status", "shadow"), ("version", "v5")): 1.0,
    }
    assert share[(("status", "canary"), ("version", "v4"))] == 0.1
    assert share[(("status", "primary"), ("version", "v3"))] == 0.9
    assert age[(("status", "primary"), ("version", "v3"))] == 2 * 86400.0
    # and offline metrics are the primary's flat numbers only (no nested dicts, no booleans)
    assert offline == {
        (("metric", "ndcg@10"), ("version", "v3")): 0.31,
        (("metric", "recall@10"), ("version", "v3")): 0.42,
    }


def test_running_experiments_export_allocations_and_valid_channel_weights_only():
    # Given a running experiment with two variants, and a draft one
    running = Experiment.objects.create(name="ease-boost", scene="for_you", status="running")
    Variant.objects.create(experiment=running, name="control", position=0, allocation=5000)
    Variant.objects.create(
        experiment=running,
        name="treatment",
        position=1,
        allocation=2500,
        # "user_42" was hand-edited into the row: it must never become a label value
        params={"channel_weights": {"ease": 2.0, "popular": 0.5, "user_42": 9.0}},
    )
    draft = Experiment.objects.create(name="later", scene="similar", status="draft")
    Variant.objects.create(
        experiment=draft, name="a", allocation=10000, params={"channel_weights": {"tag": 1.0}}
    )

    allocation = samples("recoplatform_experiment_variant_allocation_ratio")
    weights = samples("recoplatform_experiment_channel_weight")

    assert allocation == {
        (("experiment", "ease-boost"), ("scene", "for_you"), ("variant", "control")): 0.5,
        (("experiment", "ease-boost"), ("scene", "for_you"), ("variant", "treatment")): 0.25,
    }
    assert weights == {
        (("channel", "ease"), ("experiment", "ease-boost"), ("variant", "treatment")): 2.0,
        (("channel", "popular"), ("experiment", "ease-boost"), ("variant", "treatment")): 0.5,
    }


def test_a_failing_query_drops_only_its_section_and_marks_it_down(monkeypatch):
    # Given a quality report and a primary, and a registry table that errors when read
    DataQualityReport.objects.create(score=95.0, threshold=90.0, passed=True)
    model_version("v1", "primary", traffic_share=1.0)

    def broken(*args, **kwargs):
        raise DatabaseError("registry table is locked")

    monkeypatch.setattr(ModelVersion.objects, "filter", broken)

    # When Prometheus scrapes, the scrape itself does not fail
    source = collector()
    up = samples("recoplatform_collector_section_up", source)

    # Then the registry section is down and empty, and the others still report
    assert up[(("section", "models"),)] == 0.0
    assert up[(("section", "quality"),)] == 1.0
    assert samples("recoplatform_model_version_info", source) == {}
    assert samples("recoplatform_data_quality_score", source) == {(): 95.0}


def test_a_scrape_costs_one_query_per_section(django_assert_num_queries):
    # Given rows in every section
    DataQualityReport.objects.create(score=95.0, threshold=90.0, passed=True)
    for stage in ("extract_business", "extract_matomo", "canonicalize", "quality", "clean"):
        for _ in range(3):
            stage_run(stage, RunStatus.SUCCEEDED, ended_ago=timedelta(hours=1), seconds=1)
    for kind in ("incremental", "full", "adhoc"):
        pipeline_run(kind, RunStatus.SUCCEEDED, ended_ago=timedelta(hours=1))
    model_version("v1", "primary", traffic_share=0.9, metrics={"ndcg@10": 0.3})
    model_version("v2", "canary", traffic_share=0.1)
    experiment = Experiment.objects.create(name="e", scene="for_you", status="running")
    for i in range(4):
        Variant.objects.create(experiment=experiment, name=f"v{i}", position=i, allocation=2500)

    # When Prometheus scrapes, the cost does not grow with the rows: one query per section
    with django_assert_num_queries(5):
        families = list(collector().collect())
    assert any(f.name == "recoplatform_experiment_variant_allocation_ratio" for f in families)


def test_the_metrics_endpoint_serves_the_registry_and_pipeline_gauges(client):
    # Given a primary model and a finished stage
    model_version("v7", "primary", traffic_share=1.0, metrics={"ndcg@10": 0.25})
    stage_run("clean", RunStatus.SUCCEEDED, ended_ago=timedelta(minutes=1), seconds=5)

    body = client.get("/metrics").content.decode()

    assert 'recoplatform_model_version_info{status="primary",version="v7"} 1.0' in body
    assert 'recoplatform_model_offline_metric{metric="ndcg@10",version="v7"} 0.25' in body
    assert 'recoplatform_pipeline_stage_last_status{stage="clean",status="succeeded"} 1.0' in body
