"""The registry admin through the Django test client: lists, lifecycle actions, messages."""

from __future__ import annotations

import pytest
from django.contrib import messages
from django.contrib.admin.models import LogEntry
from django.contrib.messages import get_messages
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from apps.models.choices import AuditAction, AuditOutcome, EvaluationProtocol, ModelStatus
from apps.models.models import EvaluationReport, ModelAudit, ModelVersion
from apps.models.selectors import model_version_primary
from tests.models.test_services import make_primary, register

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:registry_modelversion_changelist"


@pytest.fixture(autouse=True)
def loader(settings):
    """The admin uses the configured loader; point it at a scorer that always works."""
    settings.RECO = {**settings.RECO, "BUNDLE_LOADER": "tests.models.test_services.good_loader"}


def act(client, action: str, *versions: ModelVersion, **data):
    data = {"action": action, "_selected_action": [v.pk for v in versions], **data}
    return client.post(reverse(CHANGELIST), data)


def notices(response) -> list[tuple[int, str]]:
    return [(m.level, m.message) for m in get_messages(response.wsgi_request)]


def test_the_changelist_shows_status_metrics_share_and_quality(admin_client, tmp_path):
    make_primary(tmp_path, "v1")
    response = admin_client.get(reverse(CHANGELIST))
    assert response.status_code == 200
    html = response.content.decode()
    assert "v1" in html
    assert "Primary" in html
    assert "0.3000" in html  # ndcg@10
    assert "0.4500" in html  # recall@10
    assert "100%" in html  # traffic share
    assert "97.0" in html  # data-quality score


def test_the_changelist_query_count_does_not_grow_with_the_number_of_versions(
    admin_client, tmp_path, django_assert_num_queries
):
    # Given two versions, measure the page once
    for i in range(2):
        register(tmp_path, f"a{i}")
    admin_client.get(reverse(CHANGELIST))  # warm the session and content types
    with CaptureQueriesContext(connection) as baseline:
        assert admin_client.get(reverse(CHANGELIST)).status_code == 200
    # When ten more versions (each with its own quality report) exist
    for i in range(10):
        register(tmp_path, f"b{i}")
    # Then the page costs exactly the same number of queries
    with django_assert_num_queries(len(baseline.captured_queries)):
        response = admin_client.get(reverse(CHANGELIST))
    assert response.content.decode().count('name="_selected_action"') == 12


def test_promote_action_promotes_and_says_so(admin_client, tmp_path):
    v1 = make_primary(tmp_path, "v1")
    v2 = register(tmp_path, "v2")
    response = act(admin_client, "promote_to_primary", v2)
    assert response.status_code == 302
    # Then v2 is primary, v1 archived
    assert model_version_primary() == v2
    v1.refresh_from_db()
    assert v1.status == ModelStatus.ARCHIVED
    # and the operator reads what happened
    [(level, text)] = notices(response)
    assert level == messages.SUCCESS
    assert text == "Promoted v2 to primary (v1 archived). 5 gates passed."
    # and the audit row records the admin user and address, the LogEntry both versions
    audit = ModelAudit.objects.filter(action=AuditAction.PROMOTE, model_version=v2).get()
    assert (audit.actor, audit.address, audit.outcome) == ("admin", "127.0.0.1", "applied")
    assert LogEntry.objects.filter(
        object_id=str(v2.pk), change_message__startswith="Promoted"
    ).exists()
    assert LogEntry.objects.filter(
        object_id=str(v1.pk), change_message__startswith="Archived"
    ).exists()


def test_a_refused_promotion_is_an_error_message_with_the_reasons(admin_client, tmp_path):
    v1 = make_primary(tmp_path, "v1")
    v2 = register(tmp_path, "v2", score=60.0)
    response = act(admin_client, "promote_to_primary", v2)
    [(level, text)] = notices(response)
    assert level == messages.ERROR
    assert text == (
        "Promotion of v2 refused: data_quality: data-quality score 60.0 is below the threshold 90.0"
    )
    assert model_version_primary() == v1
    assert ModelAudit.objects.filter(outcome=AuditOutcome.REFUSED, model_version=v2).count() == 1
    assert LogEntry.objects.filter(
        object_id=str(v2.pk), change_message__contains="refused"
    ).exists()


def test_promote_needs_exactly_one_version(admin_client, tmp_path):
    v1, v2 = register(tmp_path, "v1"), register(tmp_path, "v2")
    response = act(admin_client, "promote_to_primary", v1, v2)
    assert notices(response) == [(messages.WARNING, "Promote: select exactly one version.")]
    assert model_version_primary() is None


def test_set_canary_share_asks_for_the_share_then_applies_it(admin_client, tmp_path):
    make_primary(tmp_path, "v1")
    v2 = register(tmp_path, "v2")
    # When the action is chosen, an intermediate form asks for the share
    form = act(admin_client, "set_canary_share", v2)
    assert form.status_code == 200
    assert 'name="share"' in form.content.decode()
    assert ModelVersion.objects.get(pk=v2.pk).status == ModelStatus.CANDIDATE
    # When the form is submitted with 10%
    response = act(admin_client, "set_canary_share", v2, apply="1", share="0.1")
    # Then v2 is the canary at 10% and the message says so
    assert response.status_code == 302
    v2.refresh_from_db()
    assert (v2.status, v2.traffic_share) == (ModelStatus.CANARY, 0.1)
    [(level, text)] = notices(response)
    assert level == messages.SUCCESS
    assert text.startswith("v2 is the canary at 10% of traffic.")


def test_an_out_of_range_canary_share_redisplays_the_form(admin_client, tmp_path):
    v2 = register(tmp_path, "v2")
    response = act(admin_client, "set_canary_share", v2, apply="1", share="0.7")
    assert response.status_code == 200
    assert "less than or equal to 0.5" in response.content.decode()
    v2.refresh_from_db()
    assert (v2.status, v2.traffic_share) == (ModelStatus.CANDIDATE, 0.0)


def test_start_shadow_action(admin_client, tmp_path):
    make_primary(tmp_path, "v1")
    v2 = register(tmp_path, "v2")
    response = act(admin_client, "start_shadow", v2)
    v2.refresh_from_db()
    assert v2.status == ModelStatus.SHADOW
    [(level, text)] = notices(response)
    assert level == messages.SUCCESS
    assert text.startswith("v2 now runs in shadow")


def test_roll_back_action_restores_the_previous_primary(admin_client, tmp_path):
    v1 = make_primary(tmp_path, "v1")
    v2 = make_primary(tmp_path, "v2")
    response = act(admin_client, "roll_back", v2)
    assert model_version_primary() == v1
    assert notices(response) == [
        (messages.SUCCESS, "Rolled back: v1 is the primary again (v2 archived). 1 gate passed.")
    ]
    audit = ModelAudit.objects.filter(action=AuditAction.ROLLBACK).get()
    assert (audit.outcome, audit.actor) == (AuditOutcome.APPLIED, "admin")


def test_roll_back_without_an_earlier_primary_is_an_error(admin_client, tmp_path):
    v1 = make_primary(tmp_path, "v1")
    response = act(admin_client, "roll_back", v1)
    assert notices(response) == [
        (
            messages.ERROR,
            "Rollback of v1 refused: no earlier primary is archived to roll back to from v1",
        )
    ]
    assert model_version_primary() == v1


def test_roll_back_requires_selecting_the_primary(admin_client, tmp_path):
    make_primary(tmp_path, "v1")
    v2 = make_primary(tmp_path, "v2")
    v1 = ModelVersion.objects.get(version="v1")
    response = act(admin_client, "roll_back", v1)
    assert notices(response) == [
        (messages.WARNING, "Roll back: select the current primary to roll it back.")
    ]
    assert model_version_primary() == v2


def test_reject_action_asks_for_a_reason_and_rejects(admin_client, tmp_path):
    v2, v3 = register(tmp_path, "v2"), register(tmp_path, "v3")
    form = act(admin_client, "reject", v2, v3)
    assert 'name="reason"' in form.content.decode()
    response = act(admin_client, "reject", v2, v3, apply="1", reason="offline eval leaked")
    assert set(ModelVersion.objects.values_list("status", flat=True)) == {ModelStatus.REJECTED}
    assert notices(response) == [
        (messages.SUCCESS, "Rejected v2."),
        (messages.SUCCESS, "Rejected v3."),
    ]
    assert (
        ModelAudit.objects.filter(action=AuditAction.REJECT, reason="offline eval leaked").count()
        == 2
    )


def test_the_audit_list_is_read_only_and_filters_by_outcome(admin_client, tmp_path):
    make_primary(tmp_path, "v1")
    register(tmp_path, "v2", score=10.0)
    act(admin_client, "promote_to_primary", ModelVersion.objects.get(version="v2"))
    url = reverse("admin:registry_modelaudit_changelist")
    refused = admin_client.get(url, {"outcome__exact": "refused"})
    assert refused.status_code == 200
    html = refused.content.decode()
    assert "data-quality score 10.0 is below the threshold" in html
    assert "registered from" not in html
    audit = ModelAudit.objects.filter(outcome=AuditOutcome.REFUSED).get()
    detail = admin_client.get(reverse("admin:registry_modelaudit_change", args=[audit.pk]))
    assert detail.status_code == 200
    assert "FAIL" in detail.content.decode()
    assert admin_client.get(reverse("admin:registry_modelaudit_add")).status_code == 403


def test_the_evaluation_list_links_to_its_html_report(admin_client, tmp_path):
    v1 = make_primary(tmp_path, "v1")
    html_file = tmp_path / "eval.html"
    html_file.write_text("<h1>Evaluation of v1</h1>")
    report = EvaluationReport.objects.create(
        model_version=v1,
        protocol=EvaluationProtocol.TIME,
        dataset="demo",
        k=10,
        metrics={"ndcg@10": 0.31, "recall@10": 0.44},
        baseline={"popular": {"ndcg@10": 0.12}},
        html_path=str(html_file),
    )
    response = admin_client.get(reverse("admin:registry_evaluationreport_changelist"))
    html = response.content.decode()
    link = reverse("admin:registry_evaluationreport_file", args=[report.pk, "html"])
    assert link in html
    assert "0.3100" in html
    assert "0.1200" in html  # the popularity baseline
    page = admin_client.get(link)
    assert page.status_code == 200
    assert b"Evaluation of v1" in b"".join(page.streaming_content)
    missing = reverse("admin:registry_evaluationreport_file", args=[report.pk, "json"])
    assert admin_client.get(missing).status_code == 404


def test_the_version_change_page_shows_the_manifest_and_audit_trail(admin_client, tmp_path):
    v1 = make_primary(tmp_path, "v1")
    response = admin_client.get(reverse("admin:registry_modelversion_change", args=[v1.pk]))
    assert response.status_code == 200
    html = response.content.decode()
    assert "ranker/model.txt" in html  # manifest files
    assert "user_age_days" in html  # feature schema
    assert "registered from" in html  # audit trail inline
