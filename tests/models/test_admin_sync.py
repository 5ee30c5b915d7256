"""The registry admin's "Republish to Redis (sync only)" action: `manage.py sync_redis` from the UI."""

from __future__ import annotations

import threading

import pytest
import redis
from django.contrib import messages
from django.contrib.admin.models import LogEntry
from django.contrib.messages import get_messages
from django.urls import reverse

from apps.models.choices import ModelStatus
from apps.models.models import ModelVersion
from apps.pipeline import services, tasks
from tests.serving.test_recommend import make_bundle

# transaction=True: without a broker the sync runs on a thread, with its own connection.
pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = "admin:registry_modelversion_changelist"


def republish(client, *versions: ModelVersion):
    data = {"action": "republish_to_redis", "_selected_action": [v.pk for v in versions]}
    response = client.post(reverse(CHANGELIST), data)
    for thread in threading.enumerate():
        if thread.name.startswith("redis-sync-"):
            thread.join(timeout=30)
    return response


def notices(response) -> list[tuple[int, str]]:
    return [(m.level, m.message) for m in get_messages(response.wsgi_request)]


def history(version: ModelVersion) -> list[str]:
    return list(
        LogEntry.objects.filter(object_id=str(version.pk))
        .order_by("id")
        .values_list("change_message", flat=True)
    )


@pytest.fixture
def primary(tmp_path) -> ModelVersion:
    bundle = make_bundle(tmp_path / "v7")
    return ModelVersion.objects.create(
        version="v7", status=ModelStatus.PRIMARY, bundle_path=str(bundle)
    )


def test_it_republishes_the_primary_and_reports_the_result(
    admin_client, primary, settings, redis_url
):
    # Given a primary bundle and a Redis that has lost everything (no broker: eager mode)
    settings.REDIS_URL = redis_url
    client = redis.Redis.from_url(redis_url)
    assert client.get("reco:current") is None
    # When an operator runs the action on the primary
    response = republish(admin_client, primary)
    # Then serving's pointer names the primary again and its lists are back
    assert response.status_code == 302
    assert client.get("reco:current") == b"v7"
    assert client.exists("reco:v7:popular")
    # and the message gives the sync's result, as `manage.py sync_redis` prints it
    [(level, text)] = notices(response)
    assert level == messages.SUCCESS
    assert text.startswith("Republish of v7 to Redis done: lists published:")
    assert "features skipped: the bundle has no feature tables" in text
    # and the version's admin history records the request and the result, by this operator
    assert history(primary) == ["Republish to Redis requested.", text]
    assert set(LogEntry.objects.values_list("user__username", flat=True)) == {"admin"}


def test_a_version_that_is_not_the_primary_is_refused(admin_client, primary, settings, redis_url):
    # Given a candidate next to the primary
    settings.REDIS_URL = redis_url
    candidate = ModelVersion.objects.create(
        version="v8", status=ModelStatus.CANDIDATE, bundle_path=primary.bundle_path
    )
    # When an operator selects only the candidate
    response = republish(admin_client, candidate)
    # Then nothing is published, the operator is told why, and no history is written
    assert redis.Redis.from_url(redis_url).get("reco:current") is None
    assert notices(response) == [
        (messages.WARNING, "Republish to Redis: select the current primary.")
    ]
    assert not LogEntry.objects.exists()


def test_a_missing_redis_is_an_error_message_and_a_history_line(admin_client, primary, settings):
    settings.REDIS_URL = ""
    response = republish(admin_client, primary)
    [(level, text)] = notices(response)
    assert level == messages.ERROR
    assert text == (
        "Republish to Redis refused: REDIS_URL is not configured: there is no Redis to synchronise"
    )
    assert history(primary)[-1] == text


def test_with_a_broker_the_action_queues_the_task_and_returns(
    admin_client, primary, settings, monkeypatch
):
    # Given a configured broker (the task is captured instead of sent)
    settings.CELERY_TASK_ALWAYS_EAGER = False
    sent = []
    monkeypatch.setattr(tasks.primary_sync_to_redis_task, "delay", lambda *args: sent.append(args))
    # When an operator runs the action
    response = republish(admin_client, primary)
    # Then one task is queued for this version and operator, and the message says so
    user_id = LogEntry.objects.get().user_id
    assert sent == [(primary.pk, user_id)]
    assert notices(response) == [
        (
            messages.INFO,
            "Republish of v7 to Redis queued on the broker; its history will show the result.",
        )
    ]


def test_the_task_calls_the_same_service_as_the_command(primary, settings, redis_url, admin_user):
    # The worker side of the queued action: same service, result in the history
    settings.REDIS_URL = redis_url
    message = tasks.primary_sync_to_redis_task.delay(primary.pk, admin_user.pk).get()
    assert message.startswith("Republish of v7 to Redis done")
    assert history(primary) == [message]
    assert redis.Redis.from_url(redis_url).get("reco:current") == b"v7"
    # and the command-line service refuses a stale selection the same way
    with pytest.raises(ValueError, match="not the primary any more"):
        services.primary_sync_to_redis(expected_version_id=primary.pk + 1)
