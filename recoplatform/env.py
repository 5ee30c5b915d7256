"""Small typed readers for environment variables.

Each reader raises ``ImproperlyConfigured`` naming the variable, so a bad deployment fails at
start-up with one clear line instead of deep inside a request or a task.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "") -> str:
    """Return the variable's value stripped of surrounding blanks, or ``default``."""
    return os.environ.get(name, default).strip()


def env_bool(name: str, default: bool = False) -> bool:
    """Parse a boolean flag; anything but a known spelling is a configuration error."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no)")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    """Parse an integer, optionally bounded below."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} must be at least {minimum}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    """Parse a float, optionally bounded below."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} must be at least {minimum}")
    return value


def env_url(name: str, default: str, *, schemes: tuple[str, ...]) -> str:
    """Return a URL whose scheme is one of ``schemes`` (empty string means "not configured")."""
    value = env_str(name, default)
    if value == "":
        return ""
    scheme = urlsplit(value).scheme.split("+", 1)[0].lower()
    if scheme not in schemes:
        allowed = ", ".join(f"{s}://" for s in schemes)
        raise ImproperlyConfigured(
            f"{name}={value!r} has an unsupported scheme (expected {allowed})"
        )
    return value


def env_dir(name: str, default: Path) -> Path:
    """Return a directory path, created if missing; fails if it cannot be created."""
    raw = env_str(name)
    path = Path(raw).expanduser().resolve() if raw else default
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImproperlyConfigured(
            f"{name}={str(path)!r} cannot be created: {exc.strerror}"
        ) from None
    return path
