"""`manage.py sync_redis`: republish the primary bundle after Redis lost its data."""

from __future__ import annotations

import pytest
import redis
from django.core.management import call_command
from django.core.management.base import CommandError

from apps.models.choices import ModelStatus
from apps.models.models import ModelVersion
from tests.serving.test_recommend import make_bundle

pytestmark = pytest.mark.django_db


def test_it_republishes_the_primary_after_a_flush(settings, redis_url, tmp_path, capsys):
    # Given a primary bundle and a Redis that has lost everything
    bundle = make_bundle(tmp_path / "v7")
    ModelVersion.objects.create(version="v7", status=ModelStatus.PRIMARY, bundle_path=str(bundle))
    settings.REDIS_URL = redis_url
    client = redis.Redis.from_url(redis_url)
    assert client.get("reco:current") is None
    # When an operator runs the sync
    call_command("sync_redis")
    # Then serving's pointer names the primary again and its lists are there
    assert client.get("reco:current") == b"v7"
    assert client.exists("reco:v7:popular")
    out = capsys.readouterr().out
    assert "lists:    published:" in out
    assert "features: skipped: the bundle has no feature tables" in out


def test_it_explains_why_it_cannot_run(settings, redis_url):
    settings.REDIS_URL = ""
    with pytest.raises(CommandError, match="REDIS_URL is not configured"):
        call_command("sync_redis")
    settings.REDIS_URL = redis_url
    with pytest.raises(CommandError, match="no primary model version"):
        call_command("sync_redis")
