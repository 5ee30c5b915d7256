"""The recommendation API end to end: registry row -> state holder -> engine -> JSON."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from apps.models.choices import ModelStatus
from apps.models.models import ModelVersion
from apps.serving.engine.publish import publish_from_bundle
from apps.serving.state import ServingState, set_state
from tests.serving.test_recommend import make_bundle

pytestmark = pytest.mark.django_db

FOR_YOU = "/api/v1/recommendations/for-you"
ITEM_FIELDS = {"item_id", "title", "price", "score", "channel", "reason"}


def primary(bundle: Path, version: str) -> ModelVersion:
    return ModelVersion.objects.create(
        version=version, status=ModelStatus.PRIMARY, bundle_path=str(bundle)
    )


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    path = make_bundle(tmp_path / "v1")
    primary(path, "v1")
    return path


def install(redis_url: str = "") -> ServingState:
    # Background polling off: tests refresh explicitly.
    state = ServingState(redis_url=redis_url, poll_seconds=3600, background=False)
    set_state(state)
    return state


@pytest.fixture(autouse=True)
def _reset_state() -> Iterator[None]:
    yield
    set_state(None)


def test_for_you_answers_from_the_local_store_when_no_redis_is_configured(client, bundle) -> None:  # type: ignore[no-untyped-def]
    install()
    response = client.get(FOR_YOU, {"user_id": 1, "limit": 2, "unknown": "ignored"})
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == "v1"
    assert body["variant"] == "default"
    assert body["degraded"] is False
    assert body["degrade_reason"] is None
    assert body["source"] == "local_store"
    assert body["request_id"]
    assert [i["item_id"] for i in body["items"]] == [10, 11]
    assert set(body["items"][0]) == ITEM_FIELDS
    assert body["items"][0]["title"] == "Ten"


def test_an_unknown_user_gets_the_popular_list_without_an_error(client, bundle) -> None:  # type: ignore[no-untyped-def]
    install()
    body = client.get(FOR_YOU, {"user_id": 99999}).json()
    assert body["source"] == "popular"
    assert body["degraded"] is False
    assert [i["item_id"] for i in body["items"]][:2] == [20, 21]


def test_similar_and_popular_endpoints_answer(client, bundle) -> None:  # type: ignore[no-untyped-def]
    install()
    similar = client.get("/api/v1/items/10/similar", {"limit": 2}).json()
    assert [i["item_id"] for i in similar["items"]] == [11, 13]
    unknown = client.get("/api/v1/items/777/similar").json()
    assert unknown["source"] == "popular"
    books = client.get("/api/v1/popular", {"category": "books"}).json()
    assert [i["item_id"] for i in books["items"]] == [20, 22, 10]


@pytest.mark.parametrize(
    ("url", "params", "field"),
    [
        (FOR_YOU, {"user_id": -1}, "user_id"),
        (FOR_YOU, {"user_id": 0}, "user_id"),
        (FOR_YOU, {"user_id": 2**63}, "user_id"),
        (FOR_YOU, {"user_id": "abc"}, "user_id"),
        (FOR_YOU, {}, "user_id"),
        (FOR_YOU, {"user_id": 1, "limit": 0}, "limit"),
        (FOR_YOU, {"user_id": 1, "limit": 101}, "limit"),
        ("/api/v1/items/abc/similar", {}, "item_id"),
        ("/api/v1/items/-5/similar", {}, "item_id"),
        (f"/api/v1/items/{2**63}/similar", {}, "item_id"),
        ("/api/v1/items/10/similar", {"user_id": "x"}, "user_id"),
        ("/api/v1/popular", {"limit": 101}, "limit"),
    ],
)
def test_bad_input_is_a_400_json_error(client, bundle, url, params, field) -> None:  # type: ignore[no-untyped-def]
    install()
    response = client.get(url, params)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid_request"
    assert field in body["detail"]


def test_a_sane_x_request_id_is_echoed_and_a_bad_one_replaced(client, bundle) -> None:  # type: ignore[no-untyped-def]
    install()
    ok = client.get(FOR_YOU, {"user_id": 1}, HTTP_X_REQUEST_ID="abc-123.x")
    assert ok.json()["request_id"] == "abc-123.x"
    assert ok["X-Request-ID"] == "abc-123.x"
    bad = client.get(FOR_YOU, {"user_id": 1}, HTTP_X_REQUEST_ID="<script> x")
    assert bad.json()["request_id"] != "<script> x"
    assert len(bad.json()["request_id"]) == 32


def test_no_primary_is_a_degraded_empty_answer_not_a_5xx(client) -> None:  # type: ignore[no-untyped-def]
    install()
    response = client.get(FOR_YOU, {"user_id": 1})
    assert response.status_code == 200
    assert response.json()["degraded"] is True
    assert response.json()["items"] == []


def test_a_primary_change_is_picked_up_without_a_restart(client, bundle, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Given a worker serving v1
    state = install()
    assert client.get(FOR_YOU, {"user_id": 1}).json()["model_version"] == "v1"
    # When the registry's primary becomes v2 (whose user 1 list differs)
    v2 = make_bundle(tmp_path / "v2", user_recs={1: [[22, 0.99, "usercf"]]})
    ModelVersion.objects.filter(version="v1").update(status=ModelStatus.ARCHIVED)
    primary(v2, "v2")
    assert state.refresh() is True
    # Then the next request is served from v2
    body = client.get(FOR_YOU, {"user_id": 1}).json()
    assert body["model_version"] == "v2"
    assert [i["item_id"] for i in body["items"]] == [22]
    # And a bundle that cannot load leaves v2 serving
    ModelVersion.objects.filter(version="v2").update(status=ModelStatus.ARCHIVED)
    primary(tmp_path / "missing", "v3")
    assert state.refresh() is False
    assert client.get(FOR_YOU, {"user_id": 1}).json()["model_version"] == "v2"


def test_it_serves_from_redis_then_degrades_when_redis_is_killed(  # type: ignore[no-untyped-def]
    client, bundle, private_redis
) -> None:
    # Given the bundle published to a private Redis and a worker configured for it
    publish_from_bundle(redis.Redis.from_url(private_redis.url), bundle, "v1")
    state = install(private_redis.url)
    state.refresh()
    body = client.get(FOR_YOU, {"user_id": 1, "limit": 4}).json()
    assert body["source"] == "redis"
    assert body["degraded"] is False
    assert [i["item_id"] for i in body["items"]] == [10, 11, 12, 13]
    # When Redis is killed
    private_redis.kill()
    # Then every answer is a 200 from the local store, marked degraded with a reason
    reasons = []
    for _ in range(7):
        response = client.get(FOR_YOU, {"user_id": 1, "limit": 4})
        assert response.status_code == 200
        body = response.json()
        assert body["degraded"] is True
        assert body["source"] == "local_store"
        assert [i["item_id"] for i in body["items"]] == [10, 11, 12, 13]
        reasons.append(body["degrade_reason"])
    assert reasons[0] == "redis_connection"
    # and after the breaker's threshold the circuit opens: no more connection attempts
    assert reasons[-1] == "breaker_open"


def test_an_unpublished_version_in_redis_is_served_degraded_from_the_local_store(  # type: ignore[no-untyped-def]
    client, bundle, private_redis
) -> None:
    state = install(private_redis.url)
    state.refresh()
    body = client.get(FOR_YOU, {"user_id": 1}).json()
    assert body["source"] == "local_store"
    assert body["degraded"] is True
    assert body["degrade_reason"]


@pytest.mark.parametrize(
    "url",
    [FOR_YOU + "?user_id=1&limit=5", "/api/v1/items/10/similar?limit=5", "/api/v1/popular?limit=5"],
)
def test_every_recommendation_answer_has_the_documented_shape(client, bundle, url) -> None:  # type: ignore[no-untyped-def]
    # The views build the JSON body directly (no output serializer on the hot path); the
    # documented serializer must still accept exactly what they send.
    from apps.serving.serializers import RecommendationOutput

    install()
    body = client.get(url).json()
    form = RecommendationOutput(data=body)
    assert form.is_valid(), form.errors
    assert RecommendationOutput(form.validated_data).data == body
