"""The API beyond the reads: OpenAPI, feedback, assignment, admin reload, exposures, metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.test import Client
from rest_framework.authtoken.models import Token

from apps.experiments.models import Experiment, Variant
from apps.models.choices import ModelStatus
from apps.models.models import ModelVersion
from apps.serving.exposure import ExposureWriter, set_writer
from apps.serving.state import set_state
from tests.serving.test_api import install, primary
from tests.serving.test_recommend import make_bundle

pytestmark = pytest.mark.django_db

FOR_YOU = "/api/v1/recommendations/for-you"
FEEDBACK = "/api/v1/feedback"
RELOAD = "/api/v1/admin/reload"


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    path = make_bundle(tmp_path / "v1")
    primary(path, "v1")
    return path


@pytest.fixture(autouse=True)
def writer(tmp_path: Path) -> Iterator[ExposureWriter]:
    w = ExposureWriter(tmp_path / "logs" / "exposures.jsonl")
    previous = set_writer(w)
    yield w
    w.close()
    set_writer(previous)
    set_state(None)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- OpenAPI ------------------------------------------------------------------------------


def test_the_schema_validates_without_warnings(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "schema.yml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    text = out.read_text()
    for route in ("/api/v1/feedback", "/api/v1/users/{user_id}/assignment", "/api/v1/popular"):
        assert route in text
    assert "ErrorOutput" in text


def test_the_schema_and_the_offline_docs_are_served(client) -> None:  # type: ignore[no-untyped-def]
    schema = client.get("/api/schema/")
    assert schema.status_code == 200
    assert b"/api/v1/recommendations/for-you" in schema.content
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "drf_spectacular_sidecar/swagger-ui-dist" in html
    assert "cdn." not in html


# -- feedback -----------------------------------------------------------------------------


def test_feedback_is_accepted_and_written_as_one_line(client, writer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    event = {"request_id": "r-1", "event": "click", "item_id": 10, "user_id": 1, "position": 2}
    response = client.post(FEEDBACK, event, content_type="application/json")
    assert response.status_code == 202
    assert response.json()["queued"] is True
    writer.flush()
    [line] = read(tmp_path / "logs" / "feedback.jsonl")
    assert {k: line[k] for k in event} == event
    assert line["ts"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"request_id": "r", "event": "click", "item_id": 1, "itemId": 1}, "itemId"),
        ({"request_id": "r", "event": "like", "item_id": 1}, "event"),
        ({"request_id": "r", "event": "click", "item_id": 0}, "item_id"),
        ({"request_id": "r", "event": "click"}, "item_id"),
        ({"request_id": "<x>", "event": "click", "item_id": 1}, "request_id"),
        ({"request_id": "r", "event": "click", "item_id": 1, "position": -1}, "position"),
    ],
)
def test_bad_feedback_is_a_400_naming_the_field(client, writer, tmp_path, body, field) -> None:  # type: ignore[no-untyped-def]
    response = client.post(FEEDBACK, body, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert field in response.json()["detail"]
    writer.flush()
    assert not (tmp_path / "logs" / "feedback.jsonl").exists()


# -- assignment ---------------------------------------------------------------------------


def test_the_assignment_shows_version_canary_shadow_and_variants(client, bundle, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Given a primary, a canary, a shadow and a running experiment on for_you that takes everyone
    install()
    ModelVersion.objects.create(
        version="v2", status=ModelStatus.CANARY, bundle_path=str(tmp_path), traffic_share=0.1
    )
    ModelVersion.objects.create(version="v3", status=ModelStatus.SHADOW, bundle_path="x")
    experiment = Experiment.objects.create(name="exp", scene="for_you", salt="s", status="running")
    Variant.objects.create(experiment=experiment, name="all", allocation=10_000, position=0)
    # When the user's assignment is asked
    body = client.get("/api/v1/users/42/assignment").json()
    # Then it shows what serves and where the user falls
    assert body["user_id"] == 42
    assert body["model_version"] == "v1"
    assert body["primary"] == "v1"
    assert body["canary"] == {"version": "v2", "traffic_share": 0.1}
    assert body["shadow"]["version"] == "v3"
    assert body["variants"]["for_you"] == "exp:all"
    assert body["variants"]["popular"] == "default"


@pytest.mark.parametrize("user_id", ["abc", "0", "-3", str(2**63)])
def test_a_bad_user_id_in_the_assignment_path_is_a_400(client, user_id) -> None:  # type: ignore[no-untyped-def]
    response = client.get(f"/api/v1/users/{user_id}/assignment")
    assert response.status_code == 400
    assert "user_id" in response.json()["detail"]


# -- admin reload -------------------------------------------------------------------------


def make_user(name: str, *, staff: bool, perm: bool) -> User:
    user = User.objects.create_user(name, password="pw", is_staff=staff)
    if perm:
        user.user_permissions.add(
            Permission.objects.get(
                content_type__app_label="registry", codename="change_modelversion"
            )
        )
    return user


def audit_lines(writer: ExposureWriter) -> list[dict]:
    return read(writer.paths["audit"])


def test_anonymous_reload_is_refused_and_audited(client, writer) -> None:  # type: ignore[no-untyped-def]
    response = client.post(RELOAD)
    assert response.status_code in (401, 403)
    [line] = audit_lines(writer)
    assert line["outcome"] == "refused"
    assert line["actor"] == "anonymous"


@pytest.mark.parametrize(("staff", "perm"), [(False, True), (True, False), (False, False)])
def test_reload_needs_staff_and_the_permission(client, writer, staff, perm) -> None:  # type: ignore[no-untyped-def]
    user = make_user("bob", staff=staff, perm=perm)
    token = Token.objects.create(user=user)
    response = client.post(RELOAD, HTTP_AUTHORIZATION=f"Token {token.key}")
    assert response.status_code == 403
    [line] = audit_lines(writer)
    assert (line["outcome"], line["actor"], line["status"]) == ("refused", "bob", 403)


def test_a_token_reloads_and_returns_what_is_served(client, writer, bundle, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Given a worker serving v1, and v2 promoted meanwhile
    install()
    assert client.get(FOR_YOU, {"user_id": 1}).json()["model_version"] == "v1"
    ModelVersion.objects.filter(version="v1").update(status=ModelStatus.ARCHIVED)
    primary(make_bundle(tmp_path / "v2"), "v2")
    token = Token.objects.create(user=make_user("ops", staff=True, perm=True))
    # When staff reloads by token
    response = client.post(RELOAD, HTTP_AUTHORIZATION=f"Token {token.key}")
    # Then v2 serves in this process, and the attempt is audited
    assert response.status_code == 200
    assert response.json()["changed"] is True
    assert response.json()["model_version"] == "v2"
    assert client.get(FOR_YOU, {"user_id": 1}).json()["model_version"] == "v2"
    [line] = audit_lines(writer)
    assert (line["outcome"], line["actor"], line["auth"]) == (
        "applied",
        "ops",
        "TokenAuthentication",
    )
    assert line["model_version"] == "v2"


def test_get_on_reload_is_a_405(client, writer) -> None:  # type: ignore[no-untyped-def]
    token = Token.objects.create(user=make_user("ops", staff=True, perm=True))
    response = client.get(RELOAD, HTTP_AUTHORIZATION=f"Token {token.key}")
    assert response.status_code == 405
    assert audit_lines(writer)[0]["status"] == 405


def test_a_session_must_send_the_csrf_token(writer, bundle) -> None:  # type: ignore[no-untyped-def]
    install()
    make_user("ops", staff=True, perm=True)
    browser = Client(enforce_csrf_checks=True)
    assert browser.login(username="ops", password="pw")
    # Without the CSRF token: refused
    refused = browser.post(RELOAD)
    assert refused.status_code == 403
    assert "CSRF" in refused.json()["detail"]
    # With it: allowed
    browser.get("/admin/")  # renders a form with a CSRF token: sets the csrftoken cookie
    token = browser.cookies["csrftoken"].value
    allowed = browser.post(RELOAD, HTTP_X_CSRFTOKEN=token)
    assert allowed.status_code == 200
    lines = [(line["outcome"], line["actor"]) for line in audit_lines(writer)]
    assert lines == [("refused", "ops"), ("applied", "ops")]


# -- exposures and metrics ----------------------------------------------------------------


def test_each_recommendation_response_writes_one_exposure_line(
    client, writer, bundle, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    install()
    body = client.get(FOR_YOU, {"user_id": 1, "limit": 2, "visitor_id": "v-9"}).json()
    client.get("/api/v1/popular", {"limit": 1})
    writer.flush()
    first, second = read(tmp_path / "logs" / "exposures.jsonl")
    assert first["request_id"] == body["request_id"]
    assert (first["user_id"], first["visitor_id"], first["scene"]) == (1, "v-9", "for_you")
    assert (first["variant"], first["model_version"], first["source"]) == (
        "default",
        "v1",
        "local_store",
    )
    assert first["degraded"] is False
    assert first["degrade_reason"] is None
    assert first["latency_ms"] >= 0
    # the price shown is logged with the item (online GMV uses it when feedback has no value)
    assert first["items"] == [
        {
            "item_id": item["item_id"],
            "position": position,
            "channel": item["channel"],
            "price": item["price"],
        }
        for position, item in enumerate(body["items"], start=1)
    ]
    assert [item["item_id"] for item in first["items"]] == [10, 11]
    assert second["scene"] == "popular"
    assert second["user_id"] is None


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


def test_metrics_count_requests_latency_degradation_exposures_and_model(client, bundle) -> None:  # type: ignore[no-untyped-def]
    install()
    before = client.get("/metrics").content.decode()
    client.get(FOR_YOU, {"user_id": 1})
    client.get(FOR_YOU, {"user_id": 0})
    set_state(None)
    ModelVersion.objects.all().delete()
    install()
    client.get("/api/v1/popular")  # no primary: degraded, reason no_model
    after = client.get("/metrics").content.decode()

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("recommendation_requests_total", endpoint="for_you", status="200") == 1
    assert delta("recommendation_requests_total", endpoint="for_you", status="400") == 1
    assert delta("recommendation_latency_seconds_count", endpoint="for_you") == 2
    assert delta("recommendation_degraded_total", reason="no_model") == 1
    assert delta("recommendation_exposures_total") == 2
    assert "recommendation_exposure_dropped_total" in after
    assert "recommendation_timeouts_total" in after
    assert 'recommendation_model_info{version="v1"}' not in after  # cleared when no model
    assert "user_id" not in "".join(
        line for line in after.splitlines() if line.startswith("recommendation_")
    )


@pytest.mark.parametrize("field", ["item_id", "position", "value"])
def test_json_booleans_are_not_numbers_in_feedback(client, writer, tmp_path, field) -> None:  # type: ignore[no-untyped-def]
    event = {"request_id": "r-1", "event": "purchase", "item_id": 10, field: True}
    response = client.post(FEEDBACK, event, content_type="application/json")
    assert response.status_code == 400
    assert field in response.json()["detail"]
    writer.flush()
    assert not (tmp_path / "logs" / "feedback.jsonl").exists()
