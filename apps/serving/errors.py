"""Error answers of the API besides the `invalid_request` 400, and their schema entries.

They keep DRF's shape, one human-readable `detail` (`{"detail": "..."}`), so a client handles
every 401/403/404/405/409/413/415/429 the same way. Documented per operation with
`extend_schema(responses=...)` so that the schema lists what the API really answers.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers
from rest_framework import views as drf_views
from rest_framework.exceptions import APIException, ParseError
from rest_framework.response import Response


class DetailOutput(serializers.Serializer):
    """DRF's error shape: one human-readable `detail`."""

    detail = serializers.CharField()


class PayloadTooLarge(APIException):
    """A request body over DATA_UPLOAD_MAX_MEMORY_SIZE."""

    status_code = 413
    default_detail = "Request body too large."
    default_code = "payload_too_large"


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, plus Django's refusals of a request body as JSON: over
    DATA_UPLOAD_MAX_MEMORY_SIZE is a 413, too many form fields (any other
    SuspiciousOperation) a 400. Django answered both with an HTML 400 page."""
    if isinstance(exc, RequestDataTooBig):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        exc = PayloadTooLarge(f"Request body too large: the limit is {limit} bytes.")
    elif isinstance(exc, SuspiciousOperation):
        exc = ParseError(str(exc))
    return drf_views.exception_handler(exc, context)


def _detail(description: str) -> OpenApiResponse:
    return OpenApiResponse(DetailOutput, description=description)


UNAUTHENTICATED = _detail(
    "Not authenticated: no credentials, or an unknown, expired or revoked token "
    "(`WWW-Authenticate: Token`)."
)
FORBIDDEN = _detail(
    "Not active staff with this endpoint's permission, or a session without its CSRF token."
)
THROTTLED = _detail(
    "Too many admin requests from this address; `Retry-After` says when to try again."
)
NOT_FOUND = _detail("No such resource.")
TOO_LARGE = _detail("The request body is over the size limit (DATA_UPLOAD_MAX_MEMORY_SIZE).")
UNSUPPORTED_MEDIA_TYPE = _detail("The request body's Content-Type is not accepted.")

# Every admin endpoint: token or session + CSRF, staff with a permission, a throttle.
ADMIN_ERRORS = {401: UNAUTHENTICATED, 403: FORBIDDEN, 429: THROTTLED}
# Every endpoint that reads a request body.
BODY_ERRORS = {413: TOO_LARGE, 415: UNSUPPORTED_MEDIA_TYPE}


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """handler404: a JSON 404 under /api/ (an id with a slash in it matches no route), Django's
    page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found."}, status=404)
    return defaults.page_not_found(request, exception)  # type: ignore[arg-type]
