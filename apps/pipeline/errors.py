"""Which pipeline failures are worth another try, and how long to wait before it.

A stage is retried only when the error says a dependency went away for a moment (a lost or
refused database connection, a deadlock, Redis unreachable). Everything else — a programming
error, a contract mismatch, a quality gate, a missing file — fails the run at once: trying
again would fail the same way and only delay the alert.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import redis.exceptions
import sqlalchemy.exc
from django.db import utils as django_db

try:  # mysqlclient is installed wherever a MySQL source or database is configured
    import MySQLdb
except ImportError:  # pragma: no cover - SQLite-only installs
    MySQLdb = None


class TransientSourceError(Exception):
    """A source database was unreachable or dropped the connection during extraction.

    Raised instead of ``SourceExtractionFailed`` when every failed table failed that way: no
    watermark moved, so the whole stage can simply run again.
    """


class StageFailed(Exception):
    """A pipeline stage failed for good; its run is already marked failed.

    The stage task raises it so that Celery records a failed task and the chain stops.
    """


# MySQL/MariaDB error codes that describe the connection or a lock conflict, not the
# statement: 1053 server shutting down, 1205 lock wait timeout, 1213 deadlock, 2002/2003
# cannot connect, 2006 server has gone away, 2013 lost connection during a query,
# 2055 lost connection at a system error.
MYSQL_TRANSIENT_CODES = frozenset({1053, 1205, 1213, 2002, 2003, 2006, 2013, 2055})

# Classes that may be transient; database errors among them are checked by code below.
_ALWAYS_TRANSIENT: tuple[type[BaseException], ...] = (
    TransientSourceError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
_DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    django_db.OperationalError,
    *((MySQLdb.OperationalError,) if MySQLdb is not None else ()),
)
# Every class a transient error can belong to (is_transient() narrows the database ones).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (*_ALWAYS_TRANSIENT, *_DATABASE_ERRORS)

_CODE = re.compile(r"\((\d{4}),")


def _mysql_code(exc: BaseException) -> int | None:
    """The MySQL error code carried by a MySQLdb, Django or SQLAlchemy exception, if any."""
    for candidate in (exc, getattr(exc, "orig", None), exc.__cause__):
        args = getattr(candidate, "args", ())
        if args and isinstance(args[0], int):
            return args[0]
    return None


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` says a dependency was briefly unavailable, so a retry may succeed."""
    if isinstance(exc, _ALWAYS_TRANSIENT):
        return True
    if not isinstance(exc, _DATABASE_ERRORS):
        return False
    if getattr(exc, "connection_invalidated", False):  # SQLAlchemy saw a disconnect
        return True
    if _mysql_code(exc) in MYSQL_TRANSIENT_CODES:
        return True
    # SQLite's only transient condition: another connection held the write lock too long.
    return "database is locked" in str(exc)


def failure_is_transient(error_type: str, error: str) -> bool:
    """The same test for a failure known only by its type name and message.

    Extraction records a failed table as text (``TableFailure``), not as the exception.
    """
    if error_type not in {"OperationalError", "InterfaceError"}:
        return False
    match = _CODE.search(error)
    if match and int(match.group(1)) in MYSQL_TRANSIENT_CODES:
        return True
    return "database is locked" in error


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter.

    Retry ``n`` (0-based) waits between half and all of ``min(cap, base * 2**n)`` seconds: the
    random half spreads out workers that failed together, the fixed half keeps the delay
    growing.
    """

    max_retries: int = 4
    base_seconds: float = 2.0
    cap_seconds: float = 60.0

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0 for the first)."""
        ceiling = min(self.cap_seconds, self.base_seconds * 2**retry)
        return round(ceiling / 2 + (rng or random).uniform(0, ceiling / 2), 3)


# Four retries over about 2 + 4 + 8 + 16 s (at most 30 s): long enough to ride out a
# database failover or a Redis restart, short enough that a real outage fails the run (and
# alerts) within a minute.
STAGE_RETRY = RetryPolicy()
