"""Who may call the serving admin endpoints.

DRF views are CSRF-exempt except under session authentication (RELIABILITY.md, Security), so
the admin endpoints accept exactly two schemes: a DRF token (`Authorization: Token ...`, no
CSRF needed, nothing a browser sends by itself) and the admin session, for which DRF's
`SessionAuthentication` enforces the CSRF token. The token scheme comes first so that an
anonymous caller gets a 401 with `WWW-Authenticate: Token`.
"""

from __future__ import annotations

from typing import Any

from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

RELOAD_PERMISSION = "registry.change_modelversion"

ADMIN_AUTHENTICATION: list[Any] = [TokenAuthentication, SessionAuthentication]


class IsStaffWithReloadPermission(BasePermission):
    """Active staff holding `registry.change_modelversion` (the right to change what serves)."""

    message = f"Staff with the {RELOAD_PERMISSION} permission only."

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        return bool(
            user
            and user.is_authenticated
            and user.is_active
            and user.is_staff
            and user.has_perm(RELOAD_PERMISSION)
        )
