"""Registry services: registration, gated promotion, shadow, canary, rollback, reject, publish.

Every refusal must leave the primary untouched and an audit row with outcome=refused that
names the failed gate.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from django.db import IntegrityError, transaction

from apps.models import services
from apps.models.bundle import write_manifest
from apps.models.choices import AuditAction, AuditOutcome, ModelStatus
from apps.models.models import ModelAudit, ModelVersion
from apps.models.selectors import model_version_primary, model_version_serving_state
from apps.pipeline.models import DataQualityReport

pytestmark = pytest.mark.django_db

FEATURES = [{"name": "item_pop", "dtype": "float64"}, {"name": "user_age_days", "dtype": "int64"}]
GOOD_METRICS = {"ndcg@10": 0.300, "recall@10": 0.450, "auc": 0.800}


# --- helpers shared with test_admin.py ----------------------------------------------------------


def make_bundle(root: Path, version: str, *, features=FEATURES) -> Path:
    """A tiny bundle directory with two files and a manifest."""
    directory = root / version
    (directory / "ranker").mkdir(parents=True)
    (directory / "ranker" / "model.txt").write_text(f"tree for {version}\n")
    (directory / "popular.json").write_text("[3, 1, 2]")
    write_manifest(
        directory,
        version=version,
        created_at="2024-05-01T00:00:00+00:00",
        data_snapshot={"interactions": "snap-1"},
        features=features,
        params={"num_leaves": 31},
        metrics={},
    )
    return directory


def quality_report(score: float = 97.0) -> DataQualityReport:
    return DataQualityReport.objects.create(score=score, threshold=90.0, passed=score >= 90.0)


def register(
    root: Path,
    version: str,
    *,
    metrics=None,
    score: float | None = 97.0,
    features=FEATURES,
) -> ModelVersion:
    """Register a candidate with a bundle and (unless score is None) a quality report."""
    report = quality_report(score) if score is not None else None
    return services.model_version_register(
        bundle_path=str(make_bundle(root, version, features=features)),
        version=version,
        metrics=dict(GOOD_METRICS if metrics is None else metrics),
        feature_schema=features,
        mlflow_run_id=f"run-{version}",
        quality_report_id=report.pk if report else None,
        actor="pipeline",
    )


def good_loader(path: Path):
    return lambda rows: [0.5] * len(rows)


def make_primary(root: Path, version: str = "v1", **kwargs) -> ModelVersion:
    candidate = register(root, version, **kwargs)
    return services.model_version_promote(
        version_id=candidate.pk, actor="alice", loader=good_loader
    ).version


def nan_loader(path: Path):
    return lambda rows: [math.nan] + [0.5] * (len(rows) - 1)


def raising_loader(path: Path):
    raise OSError("ranker.onnx is truncated")


def slow_loader(path: Path):
    def score(rows):
        # Sleeping guarantees a latency above the 1 ms budget the test sets.
        time.sleep(0.005)
        return [0.5] * len(rows)

    return score


def refused_audits(action: str = AuditAction.PROMOTE):
    return ModelAudit.objects.filter(action=action, outcome=AuditOutcome.REFUSED)


@pytest.fixture
def reco(settings):
    """Override ``settings.RECO`` keys for one test."""

    def override(**options):
        settings.RECO = {**settings.RECO, **options}

    return override


@pytest.fixture
def published(monkeypatch):
    """Record on_model_change calls instead of touching Redis."""
    calls: list[dict] = []
    monkeypatch.setattr(services, "on_model_change", lambda **kw: calls.append(kw))
    return calls


# --- register -----------------------------------------------------------------------------------


def test_registering_a_bundle_records_a_candidate_with_its_manifest_fingerprint(tmp_path):
    # When a trained bundle is registered
    version = register(tmp_path, "v1")
    # Then it is a candidate carrying the manifest's sha256, metrics and schema
    assert version.status == ModelStatus.CANDIDATE
    assert len(version.manifest_sha256) == 64
    assert version.metrics == GOOD_METRICS
    assert version.feature_names == ["item_pop", "user_age_days"]
    assert version.mlflow_run_id == "run-v1"
    # and an applied register audit row by the pipeline
    audit = ModelAudit.objects.get(action=AuditAction.REGISTER)
    assert (audit.model_version, audit.outcome, audit.actor) == (
        version,
        AuditOutcome.APPLIED,
        "pipeline",
    )


def test_registering_a_duplicate_version_or_nan_metric_is_refused_and_audited(tmp_path):
    register(tmp_path, "v1")
    with pytest.raises(services.ModelActionRefused) as refused:
        services.model_version_register(
            bundle_path=str(tmp_path / "v1"),
            version="v1",
            metrics={"auc": math.nan},
            feature_schema=FEATURES,
            mlflow_run_id="",
            quality_report_id=987654,
            actor="pipeline",
        )
    assert refused.value.reasons == [
        "metrics are not finite numbers: auc",
        "version 'v1' is already registered",
        "data-quality report #987654 does not exist",
    ]
    assert ModelVersion.objects.count() == 1
    audit = refused_audits(AuditAction.REGISTER).get()
    assert "already registered" in audit.reason
    assert audit.version == "v1"


# --- promote ------------------------------------------------------------------------------------


def test_promoting_a_good_candidate_archives_the_old_primary_and_audits_it(
    tmp_path, published, django_capture_on_commit_callbacks
):
    # Given a primary v1 and a better candidate v2
    v1 = make_primary(tmp_path, "v1")
    v2 = register(tmp_path, "v2", metrics={"ndcg@10": 0.32, "recall@10": 0.46, "auc": 0.81})
    published.clear()
    # When v2 is promoted
    with django_capture_on_commit_callbacks(execute=True):
        transition = services.model_version_promote(
            version_id=v2.pk,
            actor="alice",
            address="10.0.0.7",
            reason="better ndcg",
            loader=good_loader,
        )
    # Then v2 serves all traffic and v1 is archived
    v1.refresh_from_db()
    v2.refresh_from_db()
    assert (v2.status, v2.traffic_share) == (ModelStatus.PRIMARY, 1.0)
    assert v2.promoted_at is not None
    assert (v1.status, v1.traffic_share) == (ModelStatus.ARCHIVED, 0.0)
    assert v1.archived_at is not None
    assert transition.replaced == v1
    # and every gate ran and passed
    assert [r.name for r in transition.results] == [
        "data_quality",
        "offline_metrics",
        "artifact_checksums",
        "feature_schema",
        "smoke_test",
    ]
    assert all(r.passed and not r.skipped for r in transition.results)
    # and the audit row says who, from where, and what changed
    audit = ModelAudit.objects.filter(action=AuditAction.PROMOTE).order_by("-id").first()
    assert audit.outcome == AuditOutcome.APPLIED
    assert (audit.actor, audit.address) == ("alice", "10.0.0.7")
    assert (audit.from_status, audit.to_status) == (ModelStatus.CANDIDATE, ModelStatus.PRIMARY)
    assert audit.reason == "better ndcg; replaced v1"
    assert len(audit.gates) == 5
    # and serving workers were told after commit
    assert published == [{"event": "promote", "version": "v2"}]


def _corrupt(version: ModelVersion) -> None:
    path = Path(version.bundle_path) / "ranker" / "model.txt"
    path.write_bytes(path.read_bytes() + b"\x00")


REFUSALS = {
    # name: (candidate options, loader, settings overrides, mutate, failed gate, reason fragment)
    "low quality score": (
        {"score": 70.0},
        good_loader,
        {},
        None,
        "data_quality",
        "data-quality score 70.0 is below the threshold 90.0",
    ),
    "worse metrics": (
        {"metrics": {"ndcg@10": 0.25, "recall@10": 0.45, "auc": 0.80}},
        good_loader,
        {},
        None,
        "offline_metrics",
        "ndcg@10 dropped 16.7% (0.3000 -> 0.2500), more than the 2.0% allowed",
    ),
    "corrupted checksum": (
        {},
        good_loader,
        {},
        _corrupt,
        "artifact_checksums",
        "checksum mismatch: ranker/model.txt",
    ),
    "nan scores": (
        {},
        nan_loader,
        {},
        None,
        "smoke_test",
        "20 of 200 scores are NaN, infinite or not numbers (first at request 0, row 0)",
    ),
    "slow smoke test": (
        {},
        slow_loader,
        {"SMOKE_P95_MS": 1.0, "SMOKE_SAMPLE_REQUESTS": 3},
        None,
        "smoke_test",
        "exceeds the 1.0 ms budget (3 requests)",
    ),
    "loader raises": (
        {},
        raising_loader,
        {},
        None,
        "smoke_test",
        "loader raised OSError: ranker.onnx is truncated",
    ),
    "schema mismatch": (
        {"features": [{"name": "item_pop", "dtype": "float64"}, {"name": "price_band"}]},
        good_loader,
        {},
        None,
        "feature_schema",
        "missing features (serving has, model lacks): user_age_days; "
        "extra features (model has, serving lacks): price_band",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS), ids=list(REFUSALS))
def test_a_failed_gate_refuses_promotion_and_leaves_the_primary_untouched(
    tmp_path, reco, published, case
):
    options, loader, overrides, mutate, gate, fragment = REFUSALS[case]
    reco(**overrides)
    # Given a primary and a candidate that fails one gate
    v1 = make_primary(tmp_path, "v1")
    candidate = register(tmp_path, "v2", **options)
    if mutate:
        mutate(candidate)
    published.clear()
    # When it is promoted
    with pytest.raises(services.PromotionRefused) as refused:
        services.model_version_promote(version_id=candidate.pk, actor="alice", loader=loader)
    # Then the refusal names the gate and why (a bundle with bad checksums is not even loaded,
    # so its smoke test fails as "not run")
    failed = {r.name: r.reason for r in refused.value.results if not r.passed}
    assert gate in failed
    assert all(reason.startswith("not run:") for name, reason in failed.items() if name != gate)
    assert any(
        reason.startswith(f"{gate}: ") and fragment in reason for reason in refused.value.reasons
    )
    # and the primary, the candidate and serving are untouched
    assert model_version_primary() == v1
    v1.refresh_from_db()
    candidate.refresh_from_db()
    assert (v1.status, v1.traffic_share) == (ModelStatus.PRIMARY, 1.0)
    assert candidate.status == ModelStatus.CANDIDATE
    assert published == []
    # and a refused audit row names the gate
    audit = refused_audits().get()
    assert audit.model_version == candidate
    assert audit.actor == "alice"
    assert (audit.from_status, audit.to_status) == (ModelStatus.CANDIDATE, ModelStatus.PRIMARY)
    assert f"{gate}: " in audit.reason
    assert fragment in audit.reason
    assert {g["name"]: g["passed"] for g in audit.gates}[gate] is False


def test_the_first_promotion_needs_no_primary_and_reports_a_skipped_smoke_test(tmp_path, reco):
    # Given no loader passed and none configured
    reco(BUNDLE_LOADER=None)
    candidate = register(tmp_path, "v1")
    # When the first version is promoted
    transition = services.model_version_promote(version_id=candidate.pk, actor="alice")
    # Then it is primary, and the smoke test and schema gate say they were skipped
    assert model_version_primary() == candidate
    results = {r.name: r for r in transition.results}
    assert results["smoke_test"].skipped
    assert results["smoke_test"].reason == "skipped: no loader configured"
    assert results["feature_schema"].skipped
    assert results["offline_metrics"].reason == "no primary to compare against"


def test_the_bundle_loader_setting_is_used_when_no_loader_is_passed(tmp_path, reco):
    reco(BUNDLE_LOADER="tests.models.test_services.nan_loader")
    candidate = register(tmp_path, "v1")
    with pytest.raises(services.PromotionRefused, match="smoke_test: 20 of 200 scores are NaN"):
        services.model_version_promote(version_id=candidate.pk, actor="alice")
    assert model_version_primary() is None


def test_an_unimportable_bundle_loader_fails_the_smoke_test_with_the_setting_name(tmp_path, reco):
    reco(BUNDLE_LOADER="tests.models.no_such_module.load")
    candidate = register(tmp_path, "v1")
    with pytest.raises(services.PromotionRefused) as refused:
        services.model_version_promote(version_id=candidate.pk, actor="alice")
    assert "loader raised ImproperlyConfigured: RECO['BUNDLE_LOADER']=" in refused.value.reasons[0]


def test_smoke_requests_shipped_in_the_bundle_are_the_ones_scored(tmp_path):
    # Given a bundle that ships two representative requests
    candidate = register(tmp_path, "v1")
    requests = [[{"item_pop": 0.3, "user_age_days": 4}], [{"item_pop": 0.1, "user_age_days": 9}]]
    (Path(candidate.bundle_path) / "smoke_requests.json").write_text(json.dumps(requests))
    write_manifest(
        candidate.bundle_path,
        version="v1",
        created_at="2024-05-01T00:00:00+00:00",
        data_snapshot={"interactions": "snap-1"},
        features=FEATURES,
        params={"num_leaves": 31},
        metrics={},
    )
    ModelVersion.objects.filter(pk=candidate.pk).update(manifest_sha256="")
    seen: list[list[dict]] = []

    def loader(path):
        return lambda rows: seen.append(rows) or [0.5] * len(rows)

    # When it is promoted
    services.model_version_promote(version_id=candidate.pk, actor="alice", loader=loader)
    # Then the warm-up and both requests were scored with the shipped rows
    assert seen == [requests[0], requests[0], requests[1]]


def test_a_rejected_version_or_the_primary_itself_cannot_be_promoted(tmp_path):
    v1 = make_primary(tmp_path, "v1")
    with pytest.raises(services.ModelActionRefused, match="v1 is already the primary"):
        services.model_version_promote(version_id=v1.pk, actor="alice")
    v2 = register(tmp_path, "v2")
    services.model_version_reject(version_id=v2.pk, actor="alice", reason="bad offline eval")
    with pytest.raises(services.ModelActionRefused, match="v2 was rejected"):
        services.model_version_promote(version_id=v2.pk, actor="alice", loader=good_loader)
    assert refused_audits().count() == 2
    assert model_version_primary() == v1


def test_the_database_refuses_a_second_primary(tmp_path):
    make_primary(tmp_path, "v1")
    v2 = register(tmp_path, "v2")
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelVersion.objects.filter(pk=v2.pk).update(status=ModelStatus.PRIMARY)


# --- rollback -----------------------------------------------------------------------------------


def test_rollback_restores_the_previous_primary(
    tmp_path, published, django_capture_on_commit_callbacks
):
    # Given v1 was replaced by v2
    v1 = make_primary(tmp_path, "v1")
    v2 = make_primary(tmp_path, "v2")
    published.clear()
    # When the primary is rolled back
    with django_capture_on_commit_callbacks(execute=True):
        transition = services.model_version_rollback(actor="bob", reason="CTR fell")
    # Then v1 serves again and v2 is archived
    v1.refresh_from_db()
    v2.refresh_from_db()
    assert (v1.status, v1.traffic_share) == (ModelStatus.PRIMARY, 1.0)
    assert (v2.status, v2.traffic_share) == (ModelStatus.ARCHIVED, 0.0)
    assert (transition.version, transition.replaced) == (v1, v2)
    # and it is audited and published
    audit = ModelAudit.objects.filter(action=AuditAction.ROLLBACK).get()
    assert (audit.outcome, audit.model_version, audit.actor) == (AuditOutcome.APPLIED, v1, "bob")
    assert audit.reason == "CTR fell; archived v2"
    assert published == [{"event": "rollback", "version": "v1"}]


def test_rollback_goes_to_the_most_recently_archived_primary_and_skips_rejected_ones(tmp_path):
    # Given v1 -> v2 -> v3 promotions, and v2 later rejected
    make_primary(tmp_path, "v1")
    v2 = make_primary(tmp_path, "v2")
    make_primary(tmp_path, "v3")
    services.model_version_reject(version_id=v2.pk, actor="bob", reason="data leak found")
    # When v3 is rolled back
    transition = services.model_version_rollback(actor="bob")
    # Then v1 (not the rejected v2) is primary
    assert transition.version.version == "v1"
    assert model_version_primary().version == "v1"


def test_rollback_is_refused_when_no_earlier_primary_exists(tmp_path):
    v1 = make_primary(tmp_path, "v1")
    register(tmp_path, "v2")  # a candidate is not a rollback target
    with pytest.raises(services.ModelActionRefused) as refused:
        services.model_version_rollback(actor="bob")
    assert refused.value.reasons == ["no earlier primary is archived to roll back to from v1"]
    assert model_version_primary() == v1
    audit = refused_audits(AuditAction.ROLLBACK).get()
    assert audit.reason == "no earlier primary is archived to roll back to from v1"


def test_rollback_is_refused_when_the_primary_changed_meanwhile(tmp_path):
    v1 = make_primary(tmp_path, "v1")
    v2 = make_primary(tmp_path, "v2")
    with pytest.raises(services.ModelActionRefused, match="the primary changed meanwhile: v2"):
        services.model_version_rollback(actor="bob", expected_primary_id=v1.pk)
    assert model_version_primary() == v2


def test_rollback_is_refused_when_the_restored_bundle_is_corrupted(tmp_path):
    v1 = make_primary(tmp_path, "v1")
    v2 = make_primary(tmp_path, "v2")
    _corrupt(v1)
    with pytest.raises(services.ModelActionRefused) as refused:
        services.model_version_rollback(actor="bob")
    assert refused.value.reasons == ["cannot restore v1: checksum mismatch: ranker/model.txt"]
    assert model_version_primary() == v2


# --- canary and shadow ------------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.0, -0.1, 0.51, 1.0, math.nan, "lots"])
def test_a_canary_share_outside_zero_to_a_half_is_refused_and_audited(tmp_path, share):
    make_primary(tmp_path, "v1")
    v2 = register(tmp_path, "v2")
    with pytest.raises(
        services.ModelActionRefused, match=r"canary share must be above 0 and at most 0\.5"
    ):
        services.model_version_set_canary(
            version_id=v2.pk, share=share, actor="carol", loader=good_loader
        )
    v2.refresh_from_db()
    assert (v2.status, v2.traffic_share) == (ModelStatus.CANDIDATE, 0.0)
    assert refused_audits(AuditAction.CANARY).count() == 1


def test_a_canary_gets_its_share_and_can_be_adjusted(tmp_path, published):
    make_primary(tmp_path, "v1")
    v2 = register(tmp_path, "v2")
    services.model_version_set_canary(
        version_id=v2.pk, share=0.1, actor="carol", loader=good_loader
    )
    services.model_version_set_canary(
        version_id=v2.pk, share=0.5, actor="carol", loader=good_loader
    )
    v2.refresh_from_db()
    assert (v2.status, v2.traffic_share) == (ModelStatus.CANARY, 0.5)
    state = model_version_serving_state()
    assert (state["primary"]["version"], state["canary"]["version"]) == ("v1", "v2")
    assert state["canary"]["traffic_share"] == 0.5


def test_only_one_canary_at_a_time(tmp_path):
    make_primary(tmp_path, "v1")
    v2, v3 = register(tmp_path, "v2"), register(tmp_path, "v3")
    services.model_version_set_canary(
        version_id=v2.pk, share=0.1, actor="carol", loader=good_loader
    )
    with pytest.raises(services.ModelActionRefused, match="v2 is already the canary"):
        services.model_version_set_canary(
            version_id=v3.pk, share=0.1, actor="carol", loader=good_loader
        )
    v3.refresh_from_db()
    assert v3.status == ModelStatus.CANDIDATE


def test_a_canary_tolerates_a_small_offline_drop_that_blocks_promotion(tmp_path):
    # Given a candidate 5% worse in ndcg@10 than the primary (canary tolerance 10%, primary 2%)
    make_primary(tmp_path, "v1")
    v2 = register(tmp_path, "v2", metrics={"ndcg@10": 0.285, "recall@10": 0.45, "auc": 0.80})
    # Then it may take a canary share
    services.model_version_set_canary(
        version_id=v2.pk, share=0.2, actor="carol", loader=good_loader
    )
    # but not the primary
    with pytest.raises(services.PromotionRefused, match=r"offline_metrics: ndcg@10 dropped 5\.0%"):
        services.model_version_promote(version_id=v2.pk, actor="carol", loader=good_loader)
    v2.refresh_from_db()
    assert (v2.status, v2.traffic_share) == (ModelStatus.CANARY, 0.2)


def test_a_canary_is_still_refused_for_a_collapsed_metric_or_nan_scores(tmp_path):
    make_primary(tmp_path, "v1")
    collapsed = register(tmp_path, "v2", metrics={"ndcg@10": 0.10, "recall@10": 0.45, "auc": 0.80})
    with pytest.raises(services.PromotionRefused, match=r"offline_metrics: ndcg@10 dropped 66\.7%"):
        services.model_version_set_canary(
            version_id=collapsed.pk, share=0.1, actor="c", loader=good_loader
        )
    nan = register(tmp_path, "v3")
    with pytest.raises(services.PromotionRefused, match="smoke_test: "):
        services.model_version_set_canary(
            version_id=nan.pk, share=0.1, actor="c", loader=nan_loader
        )


def test_promoting_the_canary_gives_it_all_traffic(tmp_path):
    make_primary(tmp_path, "v1")
    v2 = register(tmp_path, "v2")
    services.model_version_set_canary(
        version_id=v2.pk, share=0.1, actor="carol", loader=good_loader
    )
    services.model_version_promote(version_id=v2.pk, actor="carol", loader=good_loader)
    v2.refresh_from_db()
    assert (v2.status, v2.traffic_share) == (ModelStatus.PRIMARY, 1.0)
    assert model_version_serving_state()["canary"] is None


def test_a_shadow_runs_only_the_safety_gates(tmp_path):
    # Given a candidate whose data quality would block a promotion
    make_primary(tmp_path, "v1")
    v2 = register(tmp_path, "v2", score=50.0)
    # When it starts in shadow
    transition = services.model_version_start_shadow(
        version_id=v2.pk, actor="dan", loader=good_loader
    )
    # Then it shadows with no traffic, checked by checksum, schema and smoke test only
    v2.refresh_from_db()
    assert (v2.status, v2.traffic_share) == (ModelStatus.SHADOW, 0.0)
    assert [r.name for r in transition.results] == [
        "artifact_checksums",
        "feature_schema",
        "smoke_test",
    ]


def test_a_shadow_with_a_failing_smoke_test_or_a_second_shadow_is_refused(tmp_path):
    make_primary(tmp_path, "v1")
    v2, v3 = register(tmp_path, "v2"), register(tmp_path, "v3")
    with pytest.raises(services.PromotionRefused, match="smoke_test: loader raised OSError"):
        services.model_version_start_shadow(version_id=v2.pk, actor="dan", loader=raising_loader)
    services.model_version_start_shadow(version_id=v2.pk, actor="dan", loader=good_loader)
    with pytest.raises(services.ModelActionRefused, match="v2 is already the shadow"):
        services.model_version_start_shadow(version_id=v3.pk, actor="dan", loader=good_loader)
    assert refused_audits(AuditAction.SHADOW).count() == 2


# --- reject -------------------------------------------------------------------------------------


def test_rejecting_the_canary_stops_its_traffic(tmp_path):
    make_primary(tmp_path, "v1")
    v2 = register(tmp_path, "v2")
    services.model_version_set_canary(
        version_id=v2.pk, share=0.3, actor="carol", loader=good_loader
    )
    services.model_version_reject(version_id=v2.pk, actor="carol", reason="CTR down 8% in canary")
    v2.refresh_from_db()
    assert (v2.status, v2.traffic_share) == (ModelStatus.REJECTED, 0.0)
    audit = ModelAudit.objects.filter(action=AuditAction.REJECT).get()
    assert (audit.outcome, audit.reason, audit.from_status) == (
        AuditOutcome.APPLIED,
        "CTR down 8% in canary",
        ModelStatus.CANARY,
    )


def test_the_primary_cannot_be_rejected_and_a_reason_is_required(tmp_path):
    v1 = make_primary(tmp_path, "v1")
    v2 = register(tmp_path, "v2")
    with pytest.raises(services.ModelActionRefused, match="v1 is the primary; roll back"):
        services.model_version_reject(version_id=v1.pk, actor="carol", reason="no")
    with pytest.raises(services.ModelActionRefused, match="a reason is required"):
        services.model_version_reject(version_id=v2.pk, actor="carol", reason="  ")
    assert model_version_primary() == v1
    assert refused_audits(AuditAction.REJECT).count() == 2


def test_an_unknown_version_is_a_refusal_with_an_audit_row():
    with pytest.raises(services.ModelActionRefused, match="model version #424242 does not exist"):
        services.model_version_promote(version_id=424242, actor="eve", address="not-an-ip")
    audit = refused_audits().get()
    assert (audit.model_version, audit.version, audit.address) == (None, "#424242", None)


# --- publish hook -------------------------------------------------------------------------------


def test_without_redis_the_publish_hook_does_nothing(settings):
    settings.REDIS_URL = ""
    assert services.on_model_change(event="promote", version="v1") is None


def test_an_unreachable_redis_does_not_break_the_publish_hook(settings):
    # Port 1 on loopback refuses connections at once.
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    assert services.on_model_change(event="promote", version="v1") is None


@pytest.mark.redis
def test_the_publish_hook_bumps_the_version_key_and_publishes(settings, redis_url):
    import redis

    settings.REDIS_URL = redis_url
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(services.MODEL_CHANGED_CHANNEL)
    pubsub.get_message(timeout=1.0)  # consume the subscribe confirmation
    try:
        first = services.on_model_change(event="promote", version="v1")
        second = services.on_model_change(event="rollback", version="v0")
        message = pubsub.get_message(timeout=2.0)
    finally:
        pubsub.close()
        client.close()
    assert (first, second) == (1, 2)
    assert json.loads(message["data"]) == {"event": "promote", "version": "v1", "counter": 1}
