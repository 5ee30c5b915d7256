"""Database engines for the sources (SQLAlchemy over mysqlclient or sqlite3). Pure core."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import sqlalchemy as sa

# Seconds before a connection attempt (TCP connect + the server's handshake) or a read from a
# source gives up, so extraction fails with a transient error and the stage is retried instead
# of hanging a worker on a dead or hung source (a SIGSTOPped server, a silently dropped route:
# the socket stays open and nothing ever arrives). Operators override them with the variables
# below; 0 disables a timeout (only the control of tests/reliability/test_source_faults.py
# does that, to show the hang it prevents).
CONNECT_TIMEOUT_ENV = "RECO_SOURCE_CONNECT_TIMEOUT_S"
READ_TIMEOUT_ENV = "RECO_SOURCE_READ_TIMEOUT_S"
# A handshake on a LAN takes milliseconds; 5 s leaves room for a loaded server.
DEFAULT_CONNECT_TIMEOUT_S = 5
# The read timeout bounds the wait for the first bytes of a query's answer (mysqlclient applies
# it to each socket read, so a long result that keeps streaming never trips it). The slowest
# legitimate wait is a page of Matomo's ``log_visit`` window: no index starts with its cursor
# (they start with ``idsite``), so each page is a scan and a sort, tens of seconds on a large
# installation. 120 s leaves room for that. A source that hangs mid-query then fails its attempt
# within 120 s plus one connect timeout (extract_source stops at the first table it cannot
# connect to), and each later attempt within the connect timeout, so the run fails (and
# alerts) within about three minutes of retries.
DEFAULT_READ_TIMEOUT_S = 120

# MySQL client errors raised while *opening* a connection: 2002/2003 nothing listens or the
# host is unreachable; 2013 at the handshake: something accepted the TCP connection but the
# server never answered (hung, or a blackholed route). Every table of that source would fail
# the same way this instant.
_CONNECT_CODES = frozenset({2002, 2003})
_HANDSHAKE_MARKERS = ("handshake", "initial communication packet", "authorization packet")


def _timeout_setting(name: str, default: int) -> int | None:
    """Whole seconds from environment variable ``name`` (``default`` when unset); None for 0."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number of seconds (got {raw!r})") from None
    if value < 0:
        raise ValueError(f"{name} must be 0 (no timeout) or more (got {raw!r})")
    return value or None


def source_timeouts() -> tuple[int | None, int | None]:
    """The (connect, read) timeouts in seconds for source connections; None means none."""
    return (
        _timeout_setting(CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT_S),
        _timeout_setting(READ_TIMEOUT_ENV, DEFAULT_READ_TIMEOUT_S),
    )


def make_engine(
    url: str,
    *,
    read_only: bool = False,
    connect_timeout_s: int | None = None,
    read_timeout_s: int | None = None,
    **kwargs: Any,
) -> sa.Engine:
    """Create an engine for a source URL (``sqlite:///path`` or ``mysql://user:pw@host/db``).

    ``read_only`` opens a SQLite file in read-only mode, so a wrong path fails with "unable to
    open database file" instead of silently creating an empty database. MySQL connections get
    a connect and a read timeout: ``connect_timeout_s`` / ``read_timeout_s`` when given (0 for
    none), else those of ``source_timeouts()``; ``connect_args`` overrides both.
    """
    if read_only and url.startswith("sqlite:///") and "mode=ro" not in url:
        path = url[len("sqlite:///") :]
        url = f"sqlite:///file:{path}?mode=ro&uri=true"
    if url.startswith(("mysql://", "mariadb://")):
        url = "mysql+mysqldb://" + url.split("://", 1)[1]
    if url.startswith("mysql+mysqldb://"):
        configured = source_timeouts()
        connect_timeout = configured[0] if connect_timeout_s is None else connect_timeout_s or None
        read_timeout = configured[1] if read_timeout_s is None else read_timeout_s or None
        connect_args: dict[str, Any] = {"charset": "utf8mb4"}
        if connect_timeout is not None:
            connect_args["connect_timeout"] = connect_timeout
        if read_timeout is not None:
            connect_args["read_timeout"] = read_timeout
        connect_args.update(kwargs.pop("connect_args", {}))
        return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)
    if url.startswith("sqlite:"):
        connect_args = {"timeout": 30}
        connect_args.update(kwargs.pop("connect_args", {}))
        return sa.create_engine(url, connect_args=connect_args, **kwargs)
    return sa.create_engine(url, **kwargs)


def _mysql_error(exc: BaseException) -> tuple[int | None, str]:
    """The MySQL error code and message carried by ``exc`` (SQLAlchemy wraps the driver's)."""
    for candidate in (exc, getattr(exc, "orig", None), exc.__cause__):
        args = getattr(candidate, "args", ())
        if len(args) >= 2 and isinstance(args[0], int):
            return args[0], str(args[1])
    return None, str(exc)


def is_connect_failure(exc: BaseException) -> bool:
    """True when ``exc`` says a connection to a MySQL/MariaDB source could not be opened.

    Unlike a query that fails or times out on an open connection (one slow table must not
    stop the others), this says the source cannot be reached at all right now.
    """
    code, message = _mysql_error(exc)
    if code in _CONNECT_CODES:
        return True
    return code == 2013 and any(marker in message for marker in _HANDSHAKE_MARKERS)


def source_now(conn: sa.Connection) -> dt.datetime:
    """The source database's current UTC time, naive (source DATETIMEs are naive UTC)."""
    if conn.dialect.name == "sqlite":
        value = conn.execute(sa.text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
        return dt.datetime.fromisoformat(value)
    value = conn.execute(sa.text("SELECT UTC_TIMESTAMP(6)")).scalar_one()
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value)
    return value
