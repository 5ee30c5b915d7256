"""Per-request routing and variant parameters: canary share, pinned versions, the shadow model,
diversity, the detail page, the assignment's params, and change notifications over Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from apps.experiments.models import Experiment, Variant
from apps.models.choices import ModelStatus
from apps.models.models import ModelVersion
from apps.serving.engine import diversity
from apps.serving.exposure import ExposureWriter, set_writer
from apps.serving.shadow import ShadowPool, set_pool
from apps.serving.state import BUCKETS, ServingState, canary_bucket, set_state
from tests.serving.test_api import install, primary
from tests.serving.test_recommend import make_bundle

pytestmark = pytest.mark.django_db

FOR_YOU = "/api/v1/recommendations/for-you"


@pytest.fixture(autouse=True)
def writer(tmp_path: Path) -> Iterator[ExposureWriter]:
    w = ExposureWriter(tmp_path / "logs" / "exposures.jsonl")
    previous = set_writer(w)
    yield w
    w.close()
    set_writer(previous)
    set_state(None)


@pytest.fixture
def two_versions(tmp_path: Path) -> tuple[ModelVersion, ModelVersion]:
    """v1 primary and v2 (user 1 gets a different list from v2) as a candidate."""
    v1 = primary(make_bundle(tmp_path / "v1"), "v1")
    v2_bundle = make_bundle(tmp_path / "v2", user_recs={1: [[13, 0.9, "content"]]})
    v2 = ModelVersion.objects.create(
        version="v2", status=ModelStatus.CANDIDATE, bundle_path=str(v2_bundle)
    )
    return v1, v2


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- diversity (pure) ---------------------------------------------------------------------

CATEGORY = {1: "a", 2: "a", 3: "a", 4: "b", 5: "c", 6: ""}


def test_category_cap_keeps_order_and_fills_the_tail_with_what_it_skipped() -> None:
    items = [1, 2, 3, 4, 5]
    assert diversity.category_cap(items, CATEGORY.get, 1, 3) == [1, 4, 5]
    # not enough other categories: the skipped items come back in ranked order
    assert diversity.category_cap(items, CATEGORY.get, 1, 5) == [1, 4, 5, 2, 3]
    assert diversity.category_cap([6, 6, 6], CATEGORY.get, 1, 3) == [6, 6, 6]


def test_mmr_spreads_categories_and_lambda_one_keeps_the_ranking() -> None:
    items = [1, 2, 3, 4, 5]
    assert diversity.mmr(items, CATEGORY.get, 1.0, 5) == items
    spread = diversity.mmr(items, CATEGORY.get, 0.5, 3)
    assert spread[0] == 1
    assert {CATEGORY[i] for i in spread} == {"a", "b", "c"}
    with pytest.raises(ValueError, match="lambda"):
        diversity.mmr(items, CATEGORY.get, 1.5, 3)


# -- canary -------------------------------------------------------------------------------


def test_canary_serves_its_share_of_users_and_each_user_stays_put(client, two_versions) -> None:  # type: ignore[no-untyped-def]
    _, v2 = two_versions
    v2.status, v2.traffic_share = ModelStatus.CANARY, 0.3
    v2.save()
    install()
    users = range(1, 401)
    served = {u: client.get(FOR_YOU, {"user_id": u}).json()["model_version"] for u in users}
    expected = {u: "v2" if canary_bucket("v2", u) < 0.3 * BUCKETS else "v1" for u in users}
    assert served == expected
    share = sum(v == "v2" for v in served.values()) / len(served)
    assert 0.2 < share < 0.4
    # the same user asks again: same model
    again = {u: client.get(FOR_YOU, {"user_id": u}).json()["model_version"] for u in users[:50]}
    assert again == {u: served[u] for u in users[:50]}


def test_a_canary_user_gets_the_canary_bundles_answer(client, two_versions) -> None:  # type: ignore[no-untyped-def]
    _, v2 = two_versions
    v2.status, v2.traffic_share = ModelStatus.CANARY, 1.0
    v2.save()
    install()
    body = client.get(FOR_YOU, {"user_id": 1}).json()
    assert body["model_version"] == "v2"
    assert [item["item_id"] for item in body["items"]] == [13]


# -- variant parameters -------------------------------------------------------------------


def _experiment(scene: str, params: dict) -> None:
    experiment = Experiment.objects.create(name="exp", scene=scene, salt="s", status="running")
    Variant.objects.create(
        experiment=experiment, name="arm", allocation=10_000, position=0, params=params
    )


def test_a_variant_can_pin_a_registered_model_version(client, two_versions) -> None:  # type: ignore[no-untyped-def]
    _experiment("for_you", {"model_version": "v2"})
    install()
    body = client.get(FOR_YOU, {"user_id": 1}).json()
    assert (body["variant"], body["model_version"]) == ("exp:arm", "v2")
    assert [item["item_id"] for item in body["items"]] == [13]
    # outside the experiment's scene the primary serves
    similar = client.get("/api/v1/items/10/similar", {"user_id": 1}).json()
    assert similar["model_version"] == "v1"


def test_a_pinned_version_that_was_rejected_is_not_served(client, two_versions) -> None:  # type: ignore[no-untyped-def]
    _, v2 = two_versions
    v2.status = ModelStatus.REJECTED
    v2.save()
    _experiment("for_you", {"model_version": "v2"})
    install()
    assert client.get(FOR_YOU, {"user_id": 1}).json()["model_version"] == "v1"


def test_a_category_cap_variant_diversifies_the_answer(client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    primary(make_bundle(tmp_path / "v1"), "v1")
    # user 1's list is books, books, music, music: cap 1 per category
    _experiment("for_you", {"diversity": {"method": "category_cap", "max_per_category": 1}})
    install()
    body = client.get(FOR_YOU, {"user_id": 1, "limit": 2}).json()
    assert [item["item_id"] for item in body["items"]] == [10, 12]
    assert body["variant"] == "exp:arm"


def test_the_assignment_shows_the_variant_params_and_the_served_version(
    client, two_versions
) -> None:  # type: ignore[no-untyped-def]
    params = {"channel_weights": {"ease": 2.0}, "ranker": False, "model_version": "v2"}
    _experiment("for_you", params)
    install()
    body = client.get("/api/v1/users/7/assignment").json()
    assert body["variants"]["for_you"] == "exp:arm"
    assert body["params"]["for_you"] == params
    assert body["params"]["similar"] == {}
    assert body["served_version"] == {
        "for_you": "v2",
        "similar": "v1",
        "detail": "v1",
        "popular": "v1",
    }


# -- detail page --------------------------------------------------------------------------


def test_the_detail_page_answers_similar_items_and_validates_its_input(client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    primary(make_bundle(tmp_path / "v1"), "v1")
    install()
    body = client.get("/api/v1/items/10/for-user", {"user_id": 1}).json()
    # a bundle without a ranker keeps the similar order (itemcf 11, 12 then content 13)
    assert [item["item_id"] for item in body["items"]] == [11, 13, 12]
    assert body["degraded"] is False
    missing = client.get("/api/v1/items/10/for-user")
    assert missing.status_code == 400
    assert "user_id" in missing.json()["detail"]


# -- shadow -------------------------------------------------------------------------------


def test_the_shadow_scores_requests_in_the_background_and_logs_both_answers(  # type: ignore[no-untyped-def]
    client, two_versions, writer, tmp_path
) -> None:
    _, v2 = two_versions
    v2.status = ModelStatus.SHADOW
    v2.save()
    pool = ShadowPool(sample=1.0)
    previous = set_pool(pool)
    try:
        install()
        body = client.get(FOR_YOU, {"user_id": 1, "limit": 3}).json()
        assert body["model_version"] == "v1"  # the shadow never answers
        assert pool.drain(5.0)
    finally:
        set_pool(previous)
    writer.flush()
    (line,) = read(tmp_path / "logs" / "shadow.jsonl")
    assert line["request_id"] == body["request_id"]
    assert (line["served_version"], line["shadow_version"]) == ("v1", "v2")
    assert line["served_items"] == [10, 11, 12]
    assert line["shadow_items"] == [13]
    assert line["overlap"] == 0.0
    assert pool.scored == 1


def test_a_full_shadow_queue_drops_the_job_without_delaying_the_request(  # type: ignore[no-untyped-def]
    client, two_versions
) -> None:
    _, v2 = two_versions
    v2.status = ModelStatus.SHADOW
    v2.save()
    pool = ShadowPool(sample=1.0, queue_size=1)
    pool._ensure_thread = lambda: None  # no worker: the queue stays full
    previous = set_pool(pool)
    try:
        install()
        for _ in range(3):
            assert client.get(FOR_YOU, {"user_id": 1}).status_code == 200
    finally:
        set_pool(previous)
    assert pool.dropped == 2


# -- change notifications -----------------------------------------------------------------


# The listener thread has its own database connection: the rows must be committed.
@pytest.mark.django_db(transaction=True)
def test_a_change_message_on_redis_refreshes_the_worker_at_once(  # type: ignore[no-untyped-def]
    client, two_versions, redis_url
) -> None:
    v1, v2 = two_versions
    # Polling effectively off: only the pub/sub listener can pick up the change.
    state = ServingState(redis_url=redis_url, poll_seconds=3600, background=True)
    set_state(state)
    assert client.get(FOR_YOU, {"user_id": 1}).json()["model_version"] == "v1"
    deadline = time.monotonic() + 5
    publisher = redis.Redis.from_url(redis_url)
    # the listener subscribes on its own thread; wait until it is there
    while time.monotonic() < deadline and publisher.pubsub_numsub("reco:model:changed")[0][1] < 1:
        time.sleep(0.05)
    ModelVersion.objects.filter(pk=v1.pk).update(status=ModelStatus.ARCHIVED)
    ModelVersion.objects.filter(pk=v2.pk).update(status=ModelStatus.PRIMARY)
    publisher.publish("reco:model:changed", json.dumps({"version": "v2"}))

    def serving() -> str | None:
        snapshot = state.current().snapshot
        return snapshot.model_version if snapshot is not None else None

    while time.monotonic() < deadline and serving() != "v2":
        time.sleep(0.05)
    assert state.notifications >= 1
    assert client.get(FOR_YOU, {"user_id": 1}).json()["model_version"] == "v2"


# -- ranker failures are labelled -----------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "reason"), [("budget_exceeded", "ranker_timeout"), ("ValueError: x", "ranker_failed")]
)
def test_a_ranker_failure_marks_the_answer_degraded_and_counts_it(  # type: ignore[no-untyped-def]
    client, tmp_path, monkeypatch, error, reason
) -> None:
    from apps.serving import metrics
    from apps.serving.engine import recommend

    primary(make_bundle(tmp_path / "v1"), "v1")
    install()
    real = recommend.for_you

    def failing(*args, options=None, **kwargs):  # the engine reports a kept recall order
        options.on_ranker_failed(error)
        return real(*args, options=options, **kwargs)

    monkeypatch.setattr(recommend, "for_you", failing)
    before = metrics.DEGRADED.labels(reason=reason)._value.get()
    body = client.get(FOR_YOU, {"user_id": 1}).json()
    assert (body["degraded"], body["degrade_reason"]) == (True, reason)
    assert [item["item_id"] for item in body["items"]] == [10, 11, 12, 13]
    assert metrics.DEGRADED.labels(reason=reason)._value.get() == before + 1
