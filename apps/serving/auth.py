"""Who may call the admin API endpoints, how often, and the record of every attempt.

DRF views are CSRF-exempt except under session authentication (RELIABILITY.md, Security), so
the admin endpoints accept exactly two schemes: a DRF token (`Authorization: Token ...`, no
CSRF needed, nothing a browser sends by itself) and the admin session, for which DRF's
`SessionAuthentication` enforces the CSRF token. The token scheme comes first so that an
anonymous caller gets a 401 with `WWW-Authenticate: Token`. DRF's tokens never expire; ours
do after RECO["API_TOKEN_MAX_AGE_DAYS"] (re-issue with `manage.py drf_create_token -r USER`),
and deleting a token revokes it.

`AdminAPIView` is the base of every admin endpoint (reload, promote, rollback, retrain): it
throttles per client address *before* authenticating (so a caller guessing tokens is limited
as well as a runaway script), requires active staff holding the view's `required_permission`,
and writes one audit line per attempt, whatever the answer (2xx, 401, 403, 405, 409, 429).
The audit goes synchronously to the JSON-lines audit log (`exposure.write_now`); the
registry's own `ModelAudit` rows are written by the services for the requests that reach
them.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib import auth
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone
from redis.exceptions import RedisError
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle, ScopedRateThrottle
from rest_framework.views import APIView

from apps.serving import metrics
from apps.serving.exposure import AUDIT, get_writer

logger = logging.getLogger(__name__)

RELOAD_PERMISSION = "registry.change_modelversion"
# Promote and rollback change what serves, like a reload: the same registry permission.
MODEL_PERMISSION = RELOAD_PERMISSION
# The admin's "Run pipeline now" button asks for the change permission on pipeline runs.
PIPELINE_PERMISSION = "pipeline.change_pipelinerun"

DEFAULT_TOKEN_MAX_AGE_DAYS = 30.0
ADMIN_THROTTLE_SCOPE = "admin"
# A path is logged up to this length: a 10 kB URL must not become a 10 kB audit line.
MAX_AUDIT_PATH = 256


def token_max_age() -> timedelta:
    """RECO["API_TOKEN_MAX_AGE_DAYS"] (default 30 days) as a timedelta."""
    days = getattr(settings, "RECO", {}).get("API_TOKEN_MAX_AGE_DAYS", DEFAULT_TOKEN_MAX_AGE_DAYS)
    return timedelta(days=float(days))


class ExpiringTokenAuthentication(TokenAuthentication):
    """DRF's token scheme, refusing tokens older than `token_max_age()` (401)."""

    # What audit lines call this scheme (they said "TokenAuthentication" before expiry).
    audit_name = "TokenAuthentication"

    def authenticate_credentials(self, key: str) -> tuple[Any, Any]:
        user, token = super().authenticate_credentials(key)
        if timezone.now() - token.created > token_max_age():
            raise AuthenticationFailed("Token has expired.")
        return user, token


ADMIN_AUTHENTICATION: list[Any] = [ExpiringTokenAuthentication, SessionAuthentication]


class IsStaffWithPermission(BasePermission):
    """Active staff holding the view's `required_permission`."""

    def has_permission(self, request: Request, view: Any) -> bool:
        wanted = view.required_permission
        # DRF instantiates permissions per request, so the message can name this view's right.
        self.message = f"Staff with the {wanted} permission only."
        user = request.user
        return bool(
            user
            and user.is_authenticated
            and user.is_active
            and user.is_staff
            and user.has_perm(wanted)
        )


def client_address(request: Any) -> str | None:
    """The caller's address as the throttle sees it: REMOTE_ADDR, or the X-Forwarded-For entry
    that `REST_FRAMEWORK["NUM_PROXIES"]` trusted proxies put there (settings default: 0, so a
    client cannot choose its own address by sending the header)."""
    return BaseThrottle().get_ident(request) or None


class AdminRateThrottle(ScopedRateThrottle):
    """`ScopedRateThrottle` keyed on the client address only, so it can run before
    authentication; rates are read at call time (DRF binds them at import), and a cache that
    does not answer lets the request through (the throttle is not the security boundary,
    authentication and permissions are; an operator must be able to roll back while Redis is
    down)."""

    def get_rate(self) -> str | None:
        rates = api_settings.DEFAULT_THROTTLE_RATES or {}
        if self.scope not in rates:
            raise ImproperlyConfigured(
                f'REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"] has no rate for scope {self.scope!r}'
            )
        return rates[self.scope]

    def get_cache_key(self, request: Request, view: Any) -> str:
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}

    def allow_request(self, request: Request, view: Any) -> bool:
        try:
            return super().allow_request(request, view)
        except (RedisError, OSError):
            logger.warning(
                "admin throttle: the cache does not answer; not throttling", exc_info=True
            )
            return True


def audit_admin_attempt(
    request: Request, response: Response, *, action: str, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write one audit line for an admin API attempt (allowed or refused) and return it.

    Synchronous: audit lines are rare and must not be dropped. An unwritable audit file is
    logged loudly but does not change the answer.
    """
    # `_user` rather than `user`: reading `user` after a failed authentication would run the
    # authenticators again.
    user = getattr(request, "_user", None)
    if user is None or not user.is_authenticated:
        # A session whose CSRF check failed is not authenticated for DRF (which also resets
        # the Django request's user), but the audit should still say whose session tried.
        user = auth.get_user(request._request)
    actor = user.get_username() if user is not None and user.is_authenticated else ""
    authenticator = getattr(request, "_authenticator", None)
    allowed = response.status_code < 400
    data = getattr(response, "data", None)
    data = data if isinstance(data, dict) else {}
    record = {
        "ts": timezone.now().isoformat(),
        "action": action,
        "outcome": "applied" if allowed else "refused",
        "status": response.status_code,
        "method": request.method,
        "path": request.path[:MAX_AUDIT_PATH],
        "actor": actor or "anonymous",
        "auth": (
            getattr(authenticator, "audit_name", type(authenticator).__name__)
            if authenticator is not None
            else None
        ),
        "address": client_address(request),
        "reason": "" if allowed else str(data.get("detail", "")),
        **(details or {}),
    }
    try:
        get_writer().write_now(AUDIT, record)
    except Exception:  # the audit file is unwritable: say so loudly, keep the answer
        logger.exception("admin API: cannot write the audit line %s", record)
    logger.info(
        "admin API %s %s by %s: %s", action, record["outcome"], record["actor"], record["status"]
    )
    return record


class AdminAPIView(APIView):
    """Base of the admin endpoints: token or session + CSRF, staff with `required_permission`,
    a per-address throttle checked first, request metrics, and one audit line per attempt.

    Subclasses set `required_permission`, `audit_action`, `endpoint` (the metrics label) and
    may add fields to the audit line with `audit_details()`.
    """

    authentication_classes = ADMIN_AUTHENTICATION
    permission_classes = [IsStaffWithPermission]
    # Checked in `initial()` before authentication, not by DRF after the permissions.
    throttle_classes: list[Any] = []
    admin_throttle_class = AdminRateThrottle
    throttle_scope = ADMIN_THROTTLE_SCOPE
    required_permission = RELOAD_PERMISSION
    audit_action = ""
    endpoint = ""

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        throttle = self.admin_throttle_class()
        if not throttle.allow_request(request, self):
            self.throttled(request, throttle.wait())
        super().initial(request, *args, **kwargs)

    def dispatch(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        response = super().dispatch(request, *args, **kwargs)
        metrics.observe_request(self.endpoint, response.status_code, time.perf_counter() - started)
        return response

    def finalize_response(
        self, request: Request, response: Response, *args: Any, **kwargs: Any
    ) -> Response:
        response = super().finalize_response(request, response, *args, **kwargs)
        audit_admin_attempt(
            request, response, action=self.audit_action, details=self.audit_details(response)
        )
        return response

    def audit_details(self, response: Response) -> dict[str, Any]:
        """Extra fields of this endpoint's audit line (e.g. the version it served)."""
        return {}
