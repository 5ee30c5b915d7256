"""Admin endpoints (reload, promote, rollback, retrain): who may change what is served.

The matrix: anonymous, authenticated non-staff, staff without the permission, staff with it
x GET/POST x session with and without the CSRF token x valid/expired/revoked API token. Only
authorised POSTs succeed; everything else is 401/403/405 and changes nothing (the primary
model version and the number of pipeline runs are compared before and after); every attempt,
allowed or refused, leaves one audit line naming the user, the address and the outcome; the
throttle answers 429 past its limit.
"""

# Fixtures are imported from security_fixtures by name and then requested as arguments.
# ruff: noqa: F811
from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import pytest
from django.test import Client

from apps.models.choices import AuditAction, AuditOutcome
from apps.models.models import ModelAudit
from apps.pipeline.models import PipelineRun
from tests.models.test_services import register
from tests.reliability.security_fixtures import (  # noqa: F401 (fixtures)
    PROMOTE,
    RELOAD,
    RETRAIN,
    ROLLBACK,
    People,
    RegistryState,
    audit_lines,
    audit_log,
    enqueued,
    expired_token_key,
    grant,
    people,
    registry,
    revoked_token_key,
    session_client,
    throttle,
)

pytestmark = pytest.mark.django_db

ADDRESS = "127.0.0.1"  # Django's test client's REMOTE_ADDR


@dataclass(frozen=True)
class Endpoint:
    path: str
    action: str  # the audit line's `action`
    success: int
    # The registry state an applied POST leads to, from the state before.
    effect: Callable[[RegistryState], RegistryState]


ENDPOINTS = {
    "reload": Endpoint(RELOAD, "serving_reload", 200, lambda before: before),
    "promote": Endpoint(
        PROMOTE.format(version="v2"),
        "model_promote",
        200,
        lambda before: RegistryState("v2", before.runs),
    ),
    "rollback": Endpoint(
        ROLLBACK, "model_rollback", 200, lambda before: RegistryState("v0", before.runs)
    ),
    "retrain": Endpoint(
        RETRAIN,
        "pipeline_retrain",
        202,
        lambda before: RegistryState(before.primary, before.runs + 1),
    ),
}


@dataclass(frozen=True)
class Caller:
    """How a request authenticates: `token` (valid, expired, revoked) or `session` (with or
    without the CSRF token) as `user` (plain, staff or ops), or nothing at all."""

    scheme: str  # "none" | "token" | "session"
    user: str = ""
    token: str = "valid"  # "valid" | "expired" | "revoked"
    csrf: bool = False

    @property
    def name(self) -> str:
        if self.scheme == "none":
            return "anonymous"
        if self.scheme == "token":
            return f"token-{self.token}:{self.user}"
        return f"session{'+csrf' if self.csrf else '-no-csrf'}:{self.user}"

    def expected(self, method: str, success: int) -> int:
        """The status this caller must get."""
        if self.scheme == "none" or self.token in ("expired", "revoked"):
            return 401
        if self.user != "ops":
            return 403  # non-staff, or staff without the permission (CSRF or not)
        if method == "GET":
            return 405  # authorised, but the endpoints are POST-only
        if self.scheme == "session" and not self.csrf:
            return 403
        return success

    def actor(self) -> str:
        """Who the audit line must name: the session's user even when its CSRF check failed;
        nobody when the token does not authenticate."""
        if self.scheme == "none" or self.token in ("expired", "revoked"):
            return "anonymous"
        return self.user

    def client(self, people: People) -> tuple[Client, dict[str, str]]:
        if self.scheme == "session":
            return session_client(getattr(people, self.user), csrf=self.csrf)
        browser = Client(enforce_csrf_checks=True)
        if self.scheme == "none":
            return browser, {}
        user = getattr(people, self.user)
        key = {
            "valid": lambda: people.tokens[self.user],
            "expired": lambda: expired_token_key(user),
            "revoked": lambda: revoked_token_key(user),
        }[self.token]()
        return browser, {"HTTP_AUTHORIZATION": f"Token {key}"}


CALLERS = [
    Caller("none"),
    *(Caller("token", user) for user in ("plain", "staff", "ops")),
    Caller("token", "ops", token="expired"),
    Caller("token", "ops", token="revoked"),
    *(
        Caller("session", user, csrf=csrf)
        for user in ("plain", "staff", "ops")
        for csrf in (False, True)
    ),
]


def send(browser: Client, method: str, path: str, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    if method == "GET":
        return browser.get(path, **headers)
    return browser.post(path, {}, content_type="application/json", **headers)


@pytest.mark.parametrize("endpoint", ENDPOINTS.values(), ids=ENDPOINTS.keys())
@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("caller", CALLERS, ids=[c.name for c in CALLERS])
def test_only_authorised_posts_change_anything_and_every_attempt_is_audited(
    endpoint, method, caller, people, registry, audit_log, throttle, enqueued
) -> None:  # type: ignore[no-untyped-def]
    # Given a registry with a primary, a candidate and a rollback target, and a caller
    browser, headers = caller.client(people)
    before = RegistryState.now()
    # When the caller sends the request
    response = send(browser, method, endpoint.path, headers)
    # Then only an authorised POST succeeds
    expected = caller.expected(method, endpoint.success)
    assert response.status_code == expected, response.content
    assert response["Content-Type"].startswith("application/json")
    if expected == 401:
        assert response["WWW-Authenticate"] == "Token"
    # and only it changes what is served or queued
    after = RegistryState.now()
    applied = expected == endpoint.success
    assert after == (endpoint.effect(before) if applied else before)
    if endpoint.action == "pipeline_retrain" and applied:
        assert enqueued == [PipelineRun.objects.get().pk]
    else:
        assert enqueued == []
    # and the attempt is audited with the user, the address and the outcome
    [line] = audit_lines(audit_log)
    assert line["action"] == endpoint.action
    assert line["method"] == method
    assert line["path"] == endpoint.path
    assert line["status"] == expected
    assert line["outcome"] == ("applied" if applied else "refused")
    assert line["actor"] == caller.actor()
    assert line["address"] == ADDRESS
    assert line["ts"]
    if not applied:
        assert line["reason"]  # DRF's detail: why it was refused
    else:
        assert line["auth"] == (
            "TokenAuthentication" if caller.scheme == "token" else "SessionAuthentication"
        )


# -- one permission per action --------------------------------------------------------------


@pytest.mark.parametrize(
    ("granted", "allowed", "refused"),
    [
        (("registry", "change_modelversion"), "promote", "retrain"),
        (("pipeline", "change_pipelinerun"), "retrain", "rollback"),
    ],
)
def test_each_action_needs_its_own_permission(
    granted, allowed, refused, people, registry, audit_log, throttle, enqueued
) -> None:  # type: ignore[no-untyped-def]
    # Given staff holding only one of the two admin permissions
    grant(people.staff, granted)
    auth = {"HTTP_AUTHORIZATION": f"Token {people.tokens['staff']}"}
    browser = Client(enforce_csrf_checks=True)
    # When they call the action it covers and one it does not
    before = RegistryState.now()
    denied = browser.post(ENDPOINTS[refused].path, {}, content_type="application/json", **auth)
    assert RegistryState.now() == before
    ok = browser.post(ENDPOINTS[allowed].path, {}, content_type="application/json", **auth)
    # Then only the covered one is applied
    assert denied.status_code == 403
    assert "pipeline.change_pipelinerun" in denied.json()["detail"] or (
        "registry.change_modelversion" in denied.json()["detail"]
    )
    assert ok.status_code == ENDPOINTS[allowed].success
    assert [line["status"] for line in audit_lines(audit_log)] == [403, ok.status_code]


def test_an_inactive_staff_members_token_is_refused(people, registry, audit_log, throttle) -> None:  # type: ignore[no-untyped-def]
    people.ops.is_active = False
    people.ops.save()
    response = Client().post(
        ROLLBACK,
        {},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Token {people.tokens['ops']}",
    )
    assert response.status_code == 401
    assert RegistryState.now() == registry


# -- token expiry -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_age_days", "age", "status"),
    [
        (None, timedelta(days=29), 200),  # the default maximum is 30 days
        (None, timedelta(days=31), 401),
        (1.0, timedelta(hours=23), 200),
        (1.0, timedelta(hours=25), 401),
    ],
)
def test_a_token_expires_after_the_configured_age(
    max_age_days, age, status, people, audit_log, throttle, settings
) -> None:  # type: ignore[no-untyped-def]
    if max_age_days is not None:
        settings.RECO = {**settings.RECO, "API_TOKEN_MAX_AGE_DAYS": max_age_days}
    key = expired_token_key(people.ops, age=age)
    response = Client().post(RELOAD, HTTP_AUTHORIZATION=f"Token {key}")
    assert response.status_code == status
    if status == 401:
        assert response.json()["detail"] == "Token has expired."
        [line] = audit_lines(audit_log)
        assert line["reason"] == "Token has expired."


# -- the throttle -------------------------------------------------------------------------


def test_the_throttle_answers_429_past_the_limit_and_changes_nothing(
    people, registry, audit_log, throttle
) -> None:  # type: ignore[no-untyped-def]
    # Given a limit of 3 admin requests a minute
    throttle("3/minute")
    auth = {"HTTP_AUTHORIZATION": f"Token {people.tokens['ops']}"}
    browser = Client()
    # When an authorised operator sends 3 reloads and then a promotion
    statuses = [browser.post(RELOAD, **auth).status_code for _ in range(3)]
    refused = browser.post(
        PROMOTE.format(version="v2"), {}, content_type="application/json", **auth
    )
    # Then the fourth request is throttled, says when to retry, and promotes nothing
    assert statuses == [200, 200, 200]
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) > 0
    assert "throttled" in refused.json()["detail"].lower()
    assert RegistryState.now() == registry
    last = audit_lines(audit_log)[-1]
    assert (last["action"], last["status"], last["outcome"]) == ("model_promote", 429, "refused")
    assert last["address"] == ADDRESS


def test_failed_authentications_count_against_the_limit(
    people, registry, audit_log, throttle
) -> None:  # type: ignore[no-untyped-def]
    # Given a limit of 3, and someone guessing tokens from one address
    throttle("3/minute")
    browser = Client()
    guesses = [
        browser.post(RELOAD, HTTP_AUTHORIZATION=f"Token guess{n}").status_code for n in range(3)
    ]
    # When the right token comes from the same address, even with a forged X-Forwarded-For
    late = browser.post(
        RELOAD,
        HTTP_AUTHORIZATION=f"Token {people.tokens['ops']}",
        HTTP_X_FORWARDED_FOR="203.0.113.9",
    )
    # Then the guesses were 401s and the address is now throttled (the header is not trusted)
    assert guesses == [401, 401, 401]
    assert late.status_code == 429
    assert audit_lines(audit_log)[-1]["address"] == ADDRESS
    # while another address is not
    other = browser.post(
        RELOAD, HTTP_AUTHORIZATION=f"Token {people.tokens['ops']}", REMOTE_ADDR="10.0.0.7"
    )
    assert other.status_code == 200
    assert audit_lines(audit_log)[-1]["address"] == "10.0.0.7"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_throttle_lets_requests_through_when_its_cache_is_down(
    people, audit_log, settings
) -> None:  # type: ignore[no-untyped-def]
    # Given the throttle's cache on a Redis that refuses connections
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": f"redis://127.0.0.1:{_closed_port()}/0",
            "OPTIONS": {"socket_timeout": 0.1, "socket_connect_timeout": 0.1},
        }
    }
    # When an operator reloads (a rollback during a Redis outage must stay possible)
    response = Client().post(RELOAD, HTTP_AUTHORIZATION=f"Token {people.tokens['ops']}")
    # Then authentication and permissions still decide, and the attempt is audited
    assert response.status_code == 200
    assert audit_lines(audit_log)[-1]["outcome"] == "applied"
    anonymous = Client().post(RELOAD)
    assert anonymous.status_code == 401


# -- what the actions answer --------------------------------------------------------------


def ops_post(people: People, path: str, body: object = None):  # type: ignore[no-untyped-def]
    return Client().post(
        path,
        {} if body is None else body,
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Token {people.tokens['ops']}",
    )


def test_a_promotion_is_applied_and_recorded_in_the_registry_audit(
    people, registry, audit_log, throttle
) -> None:  # type: ignore[no-untyped-def]
    response = ops_post(people, PROMOTE.format(version="v2"), {"reason": "better ndcg"})
    assert response.status_code == 200
    body = response.json()
    assert (body["action"], body["model_version"], body["replaced"]) == ("promote", "v2", "v1")
    assert {gate["name"] for gate in body["gates"]} >= {"data_quality", "smoke_test"}
    row = ModelAudit.objects.get(pk=body["audit_id"])
    assert (row.action, row.outcome, row.actor, row.address) == (
        AuditAction.PROMOTE,
        AuditOutcome.APPLIED,
        "ops",
        ADDRESS,
    )
    assert "better ndcg" in row.reason
    assert audit_lines(audit_log)[-1]["model_version"] == "v2"


def test_a_refused_promotion_is_a_409_with_the_reasons(
    people, registry, audit_log, throttle, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    # Given a candidate whose training data failed the quality gate
    register(tmp_path / "more", "v3", score=50.0)
    # When staff promotes it
    response = ops_post(people, PROMOTE.format(version="v3"))
    # Then it is refused with the failing gate's reason, and nothing changed
    assert response.status_code == 409
    body = response.json()
    assert body["error"] == "refused"
    assert any(reason.startswith("data_quality") for reason in body["reasons"])
    assert any(gate["name"] == "data_quality" and not gate["passed"] for gate in body["gates"])
    assert RegistryState.now() == registry
    assert ModelAudit.objects.filter(
        action=AuditAction.PROMOTE, outcome=AuditOutcome.REFUSED, actor="ops"
    ).exists()
    line = audit_lines(audit_log)[-1]
    assert (line["status"], line["outcome"], line["version"]) == (409, "refused", "v3")
    assert "data_quality" in line["reason"]


@pytest.mark.parametrize("version", ["nope", "x" * 10_000, "١٢"])
def test_promoting_an_unknown_version_is_a_404(
    version, people, registry, audit_log, throttle
) -> None:  # type: ignore[no-untyped-def]
    response = ops_post(people, PROMOTE.format(version=version))
    assert response.status_code == 404
    assert "detail" in response.json()
    assert RegistryState.now() == registry
    line = audit_lines(audit_log)[-1]
    assert (line["status"], line["outcome"]) == (404, "refused")
    assert len(line["version"]) <= 64
    assert len(line["path"]) <= 256  # a 10 kB URL does not make a 10 kB audit line


def test_a_rollback_can_be_made_conditional_on_the_primary(
    people, registry, audit_log, throttle
) -> None:  # type: ignore[no-untyped-def]
    stale = ops_post(people, ROLLBACK, {"expected_primary": "v0"})
    assert stale.status_code == 409
    assert "primary changed" in stale.json()["detail"]
    assert RegistryState.now() == registry
    done = ops_post(people, ROLLBACK, {"expected_primary": "v1"})
    assert done.status_code == 200
    assert (done.json()["model_version"], done.json()["replaced"]) == ("v0", "v1")


def test_a_retrain_queues_one_full_run_like_the_admin_button(
    people, registry, audit_log, throttle, enqueued
) -> None:  # type: ignore[no-untyped-def]
    response = ops_post(people, RETRAIN)
    assert response.status_code == 202
    run = PipelineRun.objects.get()
    assert (run.kind, run.status, run.triggered_by) == ("full", "pending", "api:ops")
    assert response.json() == {
        "run_id": run.pk,
        "kind": "full",
        "status": "pending",
        "queued": "queued (test)",
    }
    assert enqueued == [run.pk]
    assert audit_lines(audit_log)[-1]["run_id"] == run.pk
    # A second retrain while that run is pending queues nothing: one effective run.
    again = ops_post(people, RETRAIN)
    assert again.status_code == 409
    assert again.json() == {
        "error": "run_active",
        "detail": "a full pipeline run is already pending or running",
        "run_id": run.pk,
    }
    assert PipelineRun.objects.count() == 1
    assert enqueued == [run.pk]
    assert (audit_lines(audit_log)[-1]["status"], audit_lines(audit_log)[-1]["run_id"]) == (
        409,
        None,
    )


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (ROLLBACK, {"expected_primay": "v1"}, "expected_primay"),
        (ROLLBACK, {"reason": "x" * 501}, "reason"),
        (PROMOTE.format(version="v2"), ["not", "an", "object"], "body"),
        (RETRAIN, {"kind": "incremental"}, "kind"),
    ],
)
def test_a_bad_body_is_a_400_that_changes_nothing(
    path, body, field, people, registry, audit_log, throttle, enqueued
) -> None:  # type: ignore[no-untyped-def]
    response = ops_post(people, path, body)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert field in response.json()["detail"]
    assert RegistryState.now() == registry
    assert enqueued == []
    assert audit_lines(audit_log)[-1]["outcome"] == "refused"


def test_malformed_json_is_a_400_not_a_500(people, registry, audit_log, throttle) -> None:  # type: ignore[no-untyped-def]
    response = Client().post(
        ROLLBACK,
        "{not json",
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Token {people.tokens['ops']}",
    )
    assert response.status_code == 400
    assert "body" in response.json()["detail"]
    assert RegistryState.now() == registry
