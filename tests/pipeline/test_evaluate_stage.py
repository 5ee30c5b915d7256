"""The evaluate stage: the stratified protocol on the clean data, stored as an EvaluationReport."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from apps.models.choices import EvaluationProtocol, ModelStatus
from apps.models.models import EvaluationReport, ModelVersion
from apps.pipeline import demo, frames, services
from apps.pipeline.models import RunStatus
from tests.demo_frames import demo_clean_frames

pytestmark = pytest.mark.django_db

END = dt.datetime(2026, 1, 31, tzinfo=dt.UTC)
SMALL = demo.DemoConfig(users=200, items=60, actions=12000, days=30, seed=11, end=END)


@pytest.fixture
def clean_data(data_dir: Path, tmp_path: Path) -> Path:
    sources = tmp_path / "sources"
    sources.mkdir()
    clean = demo_clean_frames(sources, SMALL)
    frames.write_frames(data_dir / "clean", clean)
    return data_dir


def test_evaluate_stores_a_stratified_report_of_the_newest_version(clean_data, settings) -> None:  # type: ignore[no-untyped-def]
    # Cheaper channels for the test: the stage takes the training options from settings.
    settings.RECO = {
        **settings.RECO,
        "TRAIN_OPTIONS": {"max_users": 200, "channels": ("itemcf", "ease", "popular")},
    }
    primary = ModelVersion.objects.create(
        version="v1", status=ModelStatus.PRIMARY, bundle_path="/nonexistent/v1"
    )
    newest = ModelVersion.objects.create(
        version="v2", status=ModelStatus.CANDIDATE, bundle_path="/nonexistent/v2"
    )
    stage_run = services.stage_run_execute(stage="evaluate")
    assert stage_run.status == RunStatus.SUCCEEDED, stage_run.error
    report = EvaluationReport.objects.get(model_version=newest)
    assert report.protocol == EvaluationProtocol.STRATIFIED
    assert report.compared_to == primary
    assert report.k == 10
    # the table: the full system, each channel, and the baselines, all real numbers in [0, 1]
    assert 0.0 < report.metrics["ndcg@10"] <= 1.0
    assert set(report.per_channel) == {"itemcf", "ease", "popular"}
    assert set(report.baseline) == {"popularity", "fused"}
    # a personalised channel beats popularity on this data (the evaluation is not noise)
    assert report.per_channel["ease"]["ndcg@10"] > report.baseline["popularity"]["ndcg@10"]
    saved = json.loads(Path(report.json_path).read_text())
    assert saved["protocol"] == "stratified"
    assert saved["table"]["ranked"]["ndcg@10"] == pytest.approx(report.metrics["ndcg@10"])
    assert stage_run.detail["version"] == "v2"


def test_evaluate_without_a_registered_version_fails_with_a_clear_error(clean_data) -> None:  # type: ignore[no-untyped-def]
    stage_run = services.stage_run_execute(stage="evaluate")
    assert stage_run.status == RunStatus.FAILED
    assert "no registered model version" in stage_run.error
    assert not EvaluationReport.objects.exists()
