"""API fuzzing from the OpenAPI schema, and explicit boundary cases.

schemathesis reads the drf-spectacular schema from the app itself and calls the Django WSGI
application in-process (no server). Every operation is fuzzed with valid (positive) and
invalid (negative) inputs, anonymously and with a staff token: zero 5xx, every response
conforms to the schema (status code documented, content type, body), invalid input is
refused with a 4xx, and every 4xx is JSON. The number of examples is bounded
(`FUZZ_EXAMPLES`, env `RECO_FUZZ_EXAMPLES`) and the generation derandomized, so the run is
repeatable and short.
"""

# Fixtures are imported from security_fixtures by name and then requested as arguments.
# ruff: noqa: F401, F811
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.test import Client
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.reliability.security_fixtures import (
    People,
    audit_log,
    enqueued,
    people,
    registry,
    throttle,
)

pytestmark = pytest.mark.django_db

FUZZ_EXAMPLES = int(os.environ.get("RECO_FUZZ_EXAMPLES", "25"))

# Every operation of the schema; `test_every_operation_is_fuzzed` fails when one is added
# without being listed here.
OPERATIONS = [
    "GET /api/v1/recommendations/for-you",
    "GET /api/v1/items/{item_id}/similar",
    "GET /api/v1/items/{item_id}/for-user",
    "GET /api/v1/popular",
    "POST /api/v1/feedback",
    "GET /api/v1/users/{user_id}/assignment",
    "POST /api/v1/admin/reload",
    "POST /api/v1/admin/models/{version}/promote",
    "POST /api/v1/admin/models/rollback",
    "POST /api/v1/admin/pipeline/retrain",
]


def error_is_json(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx is a JSON object with a `detail` (DRF's shape or the API's 400 shape)."""
    if not 400 <= response.status_code < 500:
        return None
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    assert content_type.startswith("application/json"), (
        f"{response.status_code} answered with {content_type!r}, not JSON"
    )
    body = json.loads(response.content)
    assert isinstance(body, dict), f"a {response.status_code} body is not a JSON object: {body!r}"
    assert "detail" in body, f"a {response.status_code} body has no `detail`: {body!r}"
    return None


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    error_is_json,
]


@pytest.fixture
def wsgi_requests() -> Iterator[None]:
    """Call the WSGI application like Django's test client does: without closing the test's
    database connection at the end of each request."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def api_schema(wsgi_requests, registry, audit_log, throttle, enqueued) -> Any:  # type: ignore[no-untyped-def]
    """The app's own schema, loaded and called in-process, with a registry to act on, a
    private audit log, a throttle high enough not to hide answers, and no real retrain."""
    from recoplatform.wsgi import application

    throttle("100000/minute")
    return schemathesis.openapi.from_wsgi("/api/schema/?format=json", application)


def test_every_operation_is_fuzzed(api_schema) -> None:  # type: ignore[no-untyped-def]
    labels = sorted(op.ok().label for op in api_schema.get_all_operations())
    assert labels == sorted(OPERATIONS)


def _fuzz(operation: Any, mode: GenerationMode, headers: dict[str, str]) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    run()


# Operations without any input (no parameters, no body): nothing to make invalid.
NO_INPUT = {"POST /api/v1/admin/reload", "POST /api/v1/admin/pipeline/retrain"}
CASES = [
    pytest.param(label, mode, id=f"{label}-{mode.value}")
    for label in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if not (mode == GenerationMode.NEGATIVE and label in NO_INPUT)
]


@pytest.mark.parametrize("credentials", ["anonymous", "staff-token"])
@pytest.mark.parametrize(("label", "mode"), CASES)
def test_the_api_answers_fuzzed_input_as_documented(
    api_schema, people: People, label: str, mode: GenerationMode, credentials: str
) -> None:  # type: ignore[no-untyped-def]
    headers = (
        {"Authorization": f"Token {people.tokens['ops']}"} if credentials == "staff-token" else {}
    )
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]
    _fuzz(operation, mode, headers)


# -- explicit boundary cases ------------------------------------------------------------------

BAD_IDS = {
    "negative": "-1",
    "zero": "0",
    "2^63": str(2**63),
    "2^64": str(2**64),
    "arabic-indic digits": "\u0661\u0662",  # '١٢', which Python's int() reads as 12
    "full-width digits": "\uff11\uff12",
    "underscore": "1_000",
    "10000 characters": "1" * 10_000,
    "text": "abc",
    "empty": "",
}
MAX_ID = str(2**63 - 1)


def _id_requests(value: str) -> list[tuple[str, dict[str, str], str]]:
    """(path, query, the field the 400 must name) for every place an id is read."""
    return [
        (f"/api/v1/items/{value}/similar", {}, "item_id"),
        (f"/api/v1/items/{value}/for-user", {"user_id": "1"}, "item_id"),
        ("/api/v1/items/1/for-user", {"user_id": value}, "user_id"),
        ("/api/v1/items/1/similar", {"user_id": value}, "user_id"),
        ("/api/v1/recommendations/for-you", {"user_id": value}, "user_id"),
        (f"/api/v1/users/{value}/assignment", {}, "user_id"),
    ]


def assert_invalid(response: Any, field: str) -> None:
    assert response.status_code == 400, (response.status_code, response.content[:200])
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["error"] == "invalid_request"
    assert field in body["detail"]
    assert body["request_id"]


@pytest.mark.parametrize("value", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_an_out_of_range_or_misspelt_id_is_a_400_naming_the_field(value: str) -> None:
    for path, query, field in _id_requests(value):
        if value == "" and path.startswith(("/api/v1/items//", "/api/v1/users//")):
            # An empty path segment matches no route: the API's JSON 404.
            response = Client().get(path, query)
            assert response.status_code == 404
            assert response.json() == {"detail": "Not found."}
            continue
        assert_invalid(Client().get(path, query), field)


def test_the_largest_id_is_accepted() -> None:
    for path, query, _ in _id_requests(MAX_ID):
        response = Client().get(path, query)
        assert response.status_code == 200, (path, query, response.content[:200])
        assert response.json()["request_id"]


@pytest.mark.parametrize("limit", ["0", "101", "-1", "ten", "1.5", "", "+5", " 7"])
@pytest.mark.parametrize(
    "path", ["/api/v1/popular", "/api/v1/recommendations/for-you", "/api/v1/items/1/similar"]
)
def test_a_limit_outside_1_to_100_or_not_a_number_is_a_400(path: str, limit: str) -> None:
    assert_invalid(Client().get(path, {"user_id": "1", "limit": limit}), "limit")


@pytest.mark.parametrize("limit", ["1", "100"])
def test_the_limit_bounds_themselves_are_accepted(limit: str) -> None:
    response = Client().get("/api/v1/popular", {"limit": limit})
    assert response.status_code == 200


def test_an_id_with_a_slash_is_a_json_404_not_an_html_page() -> None:
    response = Client().get("/api/v1/items/1%2F2/similar")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}
    # Outside the API, Django's own page
    assert "json" not in Client().get("/no-such-page")["Content-Type"]


FEEDBACK = "/api/v1/feedback"
EVENT = {"request_id": "r-1", "event": "click", "item_id": 10}


@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
def test_a_body_over_the_upload_limit_is_a_413_json(settings, content_type: str) -> None:  # type: ignore[no-untyped-def]
    # Given Django's request-size limit (2.5 MB by default)
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    padding = "x" * (limit + 1)
    if content_type == "application/json":
        body = json.dumps({**EVENT, "visitor_id": padding})
    else:
        body = f"request_id=r-1&event=click&item_id=10&visitor_id={padding}"
    # When a body over it is posted
    response = Client().post(FEEDBACK, body, content_type=content_type)
    # Then it is refused as a JSON 413 (Django's own answer was an HTML 400 page)
    assert response.status_code == 413
    assert response["Content-Type"].startswith("application/json")
    assert str(limit) in response.json()["detail"]


def test_the_upload_limit_is_configurable_and_smaller_bodies_pass(settings) -> None:  # type: ignore[no-untyped-def]
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024
    small = Client().post(FEEDBACK, EVENT, content_type="application/json")
    big = Client().post(
        FEEDBACK, {**EVENT, "visitor_id": "v" * 2000}, content_type="application/json"
    )
    assert small.status_code == 202
    assert big.status_code == 413


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        ("{not json", "application/json", 400),
        ('["a", "list"]', "application/json", 400),
        ("null", "application/json", 400),
        ("item_id=10", "text/plain", 415),
        # No file uploads: multipart is not accepted at all.
        ("--b\r\n\r\n--b--", "multipart/form-data; boundary=b", 415),
        # Over DATA_UPLOAD_MAX_NUMBER_FIELDS (1000): Django's SuspiciousOperation, as a JSON 400.
        ("&".join(f"f{n}=1" for n in range(1001)), "application/x-www-form-urlencoded", 400),
    ],
)
def test_a_malformed_feedback_body_is_a_json_4xx(body: str, content_type: str, status: int) -> None:
    response = Client().post(FEEDBACK, body, content_type=content_type)
    assert response.status_code == status
    assert response["Content-Type"].startswith("application/json")
    assert "detail" in response.json()
    if status == 400:
        assert response.json()["error"] == "invalid_request"
