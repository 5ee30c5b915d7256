"""Training end to end on demo data: bundle, MLflow run, registry, evaluation, gates."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest

from apps.models import services as model_services
from apps.models.bundle import verify_bundle
from apps.models.models import EvaluationReport, ModelAudit, ModelVersion
from apps.pipeline import demo, services
from apps.pipeline.models import RunStatus
from apps.pipeline.train.loader import load_scorer
from tests.demo_frames import write_demo_sources

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

END = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)


@pytest.fixture
def trained(tmp_path, settings, data_dir, redis_url):
    """One full pipeline run (ingest + train) on a small demo marketplace."""
    urls = write_demo_sources(
        tmp_path, demo.DemoConfig(users=300, items=80, actions=25_000, days=40, seed=11, end=END)
    )
    business, matomo = urls["business"], urls["matomo"]
    settings.BUSINESS_DB_URL = business
    settings.MATOMO_DB_URL = matomo
    settings.REDIS_URL = redis_url
    settings.MLFLOW_TRACKING_URI = f"sqlite:///{data_dir / 'mlflow.db'}"
    settings.MLFLOW_ARTIFACT_ROOT = (data_dir / "mlartifacts").as_uri()
    run = services.pipeline_run_create(kind="full", triggered_by="pytest")
    run = services.pipeline_run_execute(run_id=run.pk)
    stages = {s.stage: s for s in run.stages.all()}
    assert run.status == RunStatus.SUCCEEDED, {k: s.error for k, s in stages.items()}
    return stages["train"]


def test_a_full_run_trains_registers_and_promotes_the_first_model(trained, data_dir, redis_url):
    # Then one version exists, promoted through the gates because the registry was empty
    version = ModelVersion.objects.get()
    assert version.status == "primary"
    assert ModelAudit.objects.filter(
        model_version=version, action="promote", outcome="applied"
    ).exists()
    # and its bundle is complete: manifest checksums hold, no pickle, ONNX matches LightGBM
    bundle = Path(version.bundle_path)
    assert verify_bundle(bundle) == []
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert len(manifest["features"]) >= 70
    assert (bundle / "ranker" / "model.txt").is_file()
    assert (bundle / "ranker" / "model.onnx").is_file()
    assert version.metrics["onnx_max_abs_diff"] < 1e-5
    # and the recorded metrics include the ranker's AUC and NDCG
    assert {"ndcg@10", "recall@10", "ranker_auc"} <= set(version.metrics)
    # and the fused + ranked system beats popularity on the validation window
    ndcg = trained.detail["ndcg@10"]
    assert ndcg["ranked"] > ndcg["popular"]
    # and the run is in MLflow with the bundle as an artifact
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{data_dir / 'mlflow.db'}")
    run = MlflowClient().get_run(version.mlflow_run_id)
    assert run.data.metrics["ndcg_at_10"] == pytest.approx(version.metrics["ndcg@10"])
    artifacts = [a.path for a in MlflowClient().list_artifacts(version.mlflow_run_id, "bundle")]
    assert "bundle/manifest.json" in artifacts
    # and the feature tables went to Redis under the version's keys
    assert trained.detail["feature_sync"].startswith("synced:"), trained.detail["feature_sync"]
    import redis

    client = redis.Redis.from_url(redis_url)
    assert client.get("reco:feat:current").decode() == version.version
    # and the promoted bundle's lists were published for serving, pointer last
    assert trained.detail["published"].startswith("published:"), trained.detail["published"]
    assert client.get("reco:current").decode() == version.version
    # and an evaluation report compares the channels
    report = EvaluationReport.objects.get(model_version=version)
    assert "popular" in report.baseline
    assert Path(report.html_path).read_text().count("<tr") > 5


def test_a_corrupted_candidate_is_refused_and_the_primary_stays(trained, tmp_path):
    # Given the primary, and a copy of its bundle registered as a new candidate
    primary = ModelVersion.objects.get()
    copy = tmp_path / "candidate"
    shutil.copytree(primary.bundle_path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["version"] = "v-candidate"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    candidate = model_services.model_version_register(
        bundle_path=str(copy),
        version="v-candidate",
        metrics=primary.metrics,
        feature_schema=primary.feature_schema,
        quality_report_id=primary.quality_report_id,
        actor="pytest",
    )
    # When one of its artifacts is corrupted after registration
    model = copy / "ranker" / "model.txt"
    model.write_text(model.read_text().replace("tree", "tree ", 1))
    # Then promotion is refused with the checksum gate's reason
    with pytest.raises(model_services.PromotionRefused) as excinfo:
        model_services.model_version_promote(
            version_id=candidate.pk, actor="pytest", loader=load_scorer
        )
    assert "artifact_checksums" in str(excinfo.value)
    # and the primary is untouched, and the refusal is audited
    primary.refresh_from_db()
    assert primary.status == "primary"
    audit = ModelAudit.objects.get(model_version=candidate, action="promote")
    assert audit.outcome == "refused"


def test_the_bundle_scorer_scores_its_smoke_requests(trained):
    version = ModelVersion.objects.get()
    bundle = Path(version.bundle_path)
    requests = json.loads((bundle / "smoke_requests.json").read_text())
    scores = load_scorer(bundle)(requests[0])
    assert len(scores) == len(requests[0])
    assert len(set(scores)) > 1


def test_training_is_refused_below_the_quality_gate(trained, settings):
    settings.RECO = {**settings.RECO, "QUALITY_THRESHOLD": 100.5}
    stage = services.stage_run_execute(stage="train")
    assert stage.status == RunStatus.FAILED
    assert "QualityGateError" in stage.error
    assert ModelVersion.objects.count() == 1
