"""Database engines for the sources (SQLAlchemy over mysqlclient or sqlite3). Pure core."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

# Seconds before a connection attempt or a query to a source gives up. Extraction retries the
# stage; it never hangs a worker forever on a dead source.
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 600


def make_engine(url: str, *, read_only: bool = False, **kwargs: Any) -> sa.Engine:
    """Create an engine for a source URL (``sqlite:///path`` or ``mysql://user:pw@host/db``).

    ``read_only`` opens a SQLite file in read-only mode, so a wrong path fails with "unable to
    open database file" instead of silently creating an empty database.
    """
    if read_only and url.startswith("sqlite:///") and "mode=ro" not in url:
        path = url[len("sqlite:///") :]
        url = f"sqlite:///file:{path}?mode=ro&uri=true"
    if url.startswith(("mysql://", "mariadb://")):
        url = "mysql+mysqldb://" + url.split("://", 1)[1]
    if url.startswith("mysql+mysqldb://"):
        connect_args = {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            "charset": "utf8mb4",
        }
        connect_args.update(kwargs.pop("connect_args", {}))
        return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args, **kwargs)
    if url.startswith("sqlite:"):
        connect_args = {"timeout": 30}
        connect_args.update(kwargs.pop("connect_args", {}))
        return sa.create_engine(url, connect_args=connect_args, **kwargs)
    return sa.create_engine(url, **kwargs)


def source_now(conn: sa.Connection) -> dt.datetime:
    """The source database's current UTC time, naive (source DATETIMEs are naive UTC)."""
    if conn.dialect.name == "sqlite":
        value = conn.execute(sa.text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")).scalar_one()
        return dt.datetime.fromisoformat(value)
    value = conn.execute(sa.text("SELECT UTC_TIMESTAMP(6)")).scalar_one()
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value)
    return value
