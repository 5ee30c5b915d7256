"""Fixtures of the security tests (admin API matrix, fuzzing): users, tokens, a registry with
something to promote and roll back to, a private audit log and a private throttle cache.

Imported by name into the test modules that use them (no conftest: other suites in
tests/reliability/ must not be affected).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission, User
from django.core.cache import cache
from django.test import Client
from django.utils import timezone
from rest_framework.authtoken.models import Token

from apps.models.selectors import model_version_primary
from apps.pipeline import tasks as pipeline_tasks
from apps.pipeline.models import PipelineRun
from apps.serving.exposure import ExposureWriter, set_writer
from apps.serving.state import set_state
from tests.models.test_services import make_primary, register
from tests.serving.test_api import install

PASSWORD = "pw-for-tests-only"
RELOAD = "/api/v1/admin/reload"
PROMOTE = "/api/v1/admin/models/{version}/promote"
ROLLBACK = "/api/v1/admin/models/rollback"
RETRAIN = "/api/v1/admin/pipeline/retrain"
ADMIN_PERMISSIONS = (("registry", "change_modelversion"), ("pipeline", "change_pipelinerun"))


def good_loader(path: Path) -> Callable[[list[Any]], list[float]]:
    """RECO["BUNDLE_LOADER"] for promotions through the API: a scorer that passes the smoke
    test (the test bundles carry no real ranker)."""
    return lambda rows: [0.5] * len(rows)


GOOD_LOADER = "tests.reliability.security_fixtures.good_loader"


def grant(user: User, *perms: tuple[str, str]) -> User:
    for app_label, codename in perms:
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return user


@dataclass
class People:
    """Who calls: a non-staff user who holds the permissions anyway (staff is required too),
    staff without any permission, and `ops` (staff with both admin permissions)."""

    plain: User
    staff: User
    ops: User
    tokens: dict[str, str] = field(default_factory=dict)


def make_people() -> People:
    plain = grant(User.objects.create_user("plain", password=PASSWORD), *ADMIN_PERMISSIONS)
    staff = User.objects.create_user("staff", password=PASSWORD, is_staff=True)
    ops = grant(
        User.objects.create_user("ops", password=PASSWORD, is_staff=True), *ADMIN_PERMISSIONS
    )
    people = People(plain=plain, staff=staff, ops=ops)
    for user in (plain, staff):
        people.tokens[user.username] = Token.objects.create(user=user).key
    people.tokens["ops"] = Token.objects.create(user=ops).key
    return people


def expired_token_key(user: User, *, age: timedelta = timedelta(days=31)) -> str:
    """A token of `user` created `age` ago (older than the default 30-day maximum).

    A user has one DRF token, so this replaces any other token of theirs."""
    Token.objects.filter(user=user).delete()
    token = Token.objects.create(user=user)
    Token.objects.filter(pk=token.pk).update(created=timezone.now() - age)
    return token.key


def revoked_token_key(user: User) -> str:
    """The key of a token of `user` that was deleted (revoked); `user` keeps no token."""
    token, _ = Token.objects.get_or_create(user=user)
    key = token.key
    token.delete()
    return key


@dataclass(frozen=True)
class RegistryState:
    """What the admin endpoints may change: the primary's name and the number of runs."""

    primary: str | None
    runs: int

    @classmethod
    def now(cls) -> RegistryState:
        primary = model_version_primary()
        return cls(primary.version if primary else None, PipelineRun.objects.count())


@pytest.fixture
def audit_log(tmp_path: Path) -> Iterator[ExposureWriter]:
    """A private audit log (the writer's `audit` stream) and a serving state that refreshes
    only when asked."""
    writer = ExposureWriter(tmp_path / "logs" / "exposures.jsonl")
    previous = set_writer(writer)
    install()
    yield writer
    writer.close()
    set_writer(previous)
    set_state(None)


def audit_lines(writer: ExposureWriter) -> list[dict[str, Any]]:
    path = writer.paths["audit"]
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def throttle(settings) -> Callable[[str], None]:  # type: ignore[no-untyped-def]
    """A private in-memory throttle cache (never a shared Redis: concurrent runs on this
    machine would share counters); call it with a rate to change the admin limit."""
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "LOCATION": f"security-{uuid.uuid4().hex}",
        }
    }
    cache.clear()

    def set_rate(rate: str) -> None:
        settings.REST_FRAMEWORK = {
            **settings.REST_FRAMEWORK,
            "DEFAULT_THROTTLE_RATES": {"admin": rate},
        }

    set_rate("30/minute")
    return set_rate


@pytest.fixture
def registry(tmp_path: Path, settings) -> RegistryState:  # type: ignore[no-untyped-def]
    """v0 (archived former primary: the rollback target), v1 (the primary) and v2 (a
    candidate that passes every gate)."""
    settings.RECO = {**settings.RECO, "BUNDLE_LOADER": GOOD_LOADER}
    make_primary(tmp_path / "bundles", "v0")
    make_primary(tmp_path / "bundles", "v1")
    register(tmp_path / "bundles", "v2")
    return RegistryState.now()


@pytest.fixture
def enqueued(monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    """Record the pipeline runs the retrain endpoint enqueues instead of running them."""
    calls: list[int] = []

    def fake_enqueue(run_id: int) -> str:
        calls.append(run_id)
        return "queued (test)"

    monkeypatch.setattr(pipeline_tasks, "enqueue_pipeline_run", fake_enqueue)
    return calls


@pytest.fixture
def people(db, settings) -> People:  # type: ignore[no-untyped-def]
    # A fast hasher: PBKDF2 costs ~0.2 s per user and per login, times a hundred tests.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    return make_people()


def session_client(user: User | None, *, csrf: bool) -> tuple[Client, dict[str, str]]:
    """A browser-like client (CSRF enforced) logged in as `user`, and the headers its POSTs
    carry: the CSRF token when `csrf`, nothing otherwise."""
    browser = Client(enforce_csrf_checks=True)
    if user is None:
        return browser, {}
    assert browser.login(username=user.username, password=PASSWORD)
    if not csrf:
        return browser, {}
    # The login page (or, for staff, the admin index it redirects to) renders a form with a
    # CSRF token, which sets the csrftoken cookie.
    browser.get("/admin/login/", follow=True)
    return browser, {"HTTP_X_CSRFTOKEN": browser.cookies["csrftoken"].value}
