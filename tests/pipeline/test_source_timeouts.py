"""Source connections carry connect and read timeouts, and an unreachable source fails fast.

The timeouts themselves (a hung source failing within them) are exercised against a real,
SIGSTOPped MariaDB in tests/reliability/test_source_faults.py; here, without any server: the
settings, what reaches the driver, and how extraction classifies and short-cuts a source it
cannot connect to.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import MySQLdb
import pytest
import sqlalchemy as sa

from apps.pipeline import errors
from apps.pipeline.extract import (
    InMemoryLockManager,
    InMemoryWatermarkStore,
    SourceExtractionFailed,
    extract_source,
)
from apps.pipeline.lake import Lake
from apps.pipeline.sources import db
from apps.pipeline.sources.contract import load_contract

CONTRACT = Path(__file__).resolve().parents[2] / "config" / "sources.yaml"


class _Stop(Exception):
    """Raised from the driver hook: the test only wanted to see the connect arguments."""


def connect_params(engine: sa.Engine) -> dict[str, Any]:
    """The keyword arguments the engine hands to MySQLdb.connect (no connection is made)."""
    seen: dict[str, Any] = {}

    @sa.event.listens_for(engine, "do_connect")
    def capture(dialect, conn_rec, cargs, cparams):  # type: ignore[no-untyped-def]
        seen.update(cparams)
        raise _Stop

    with pytest.raises(_Stop):
        engine.connect()
    return seen


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(autouse=True)
def _no_operator_overrides(monkeypatch):
    monkeypatch.delenv(db.CONNECT_TIMEOUT_ENV, raising=False)
    monkeypatch.delenv(db.READ_TIMEOUT_ENV, raising=False)


# --- settings -------------------------------------------------------------------------------


def test_source_connections_default_to_a_5_s_connect_and_a_120_s_read_timeout():
    assert db.source_timeouts() == (5, 120)


def test_operators_set_the_timeouts_through_the_environment(monkeypatch):
    monkeypatch.setenv(db.CONNECT_TIMEOUT_ENV, "2")
    monkeypatch.setenv(db.READ_TIMEOUT_ENV, "45")
    assert db.source_timeouts() == (2, 45)


def test_zero_disables_a_timeout(monkeypatch):
    monkeypatch.setenv(db.READ_TIMEOUT_ENV, "0")
    assert db.source_timeouts() == (5, None)


@pytest.mark.parametrize("raw", ["1.5", "soon", "-1"])
def test_a_timeout_that_is_not_a_whole_number_of_seconds_is_refused_by_name(monkeypatch, raw):
    monkeypatch.setenv(db.READ_TIMEOUT_ENV, raw)
    with pytest.raises(ValueError, match=db.READ_TIMEOUT_ENV):
        db.source_timeouts()


# --- what reaches the driver ------------------------------------------------------------------


def test_a_mysql_source_engine_passes_both_timeouts_to_the_driver(monkeypatch):
    # Given an operator's shorter read timeout
    monkeypatch.setenv(db.READ_TIMEOUT_ENV, "30")
    # When a source engine is made, then MySQLdb.connect receives both timeouts
    engine = db.make_engine("mysql://reader@127.0.0.1:1/shop", read_only=True)
    params = connect_params(engine)
    assert params["connect_timeout"] == 5
    assert params["read_timeout"] == 30
    assert params["charset"] == "utf8mb4"


def test_a_disabled_timeout_is_not_passed_at_all(monkeypatch):
    monkeypatch.setenv(db.READ_TIMEOUT_ENV, "0")
    params = connect_params(db.make_engine("mysql://reader@127.0.0.1:1/shop"))
    assert "read_timeout" not in params
    assert params["connect_timeout"] == 5


def test_a_caller_can_pass_the_timeouts_explicitly(monkeypatch):
    # Given an environment that says otherwise
    monkeypatch.setenv(db.READ_TIMEOUT_ENV, "45")
    # When the caller (a settings-driven service) passes its own values, then they win
    engine = db.make_engine("mysql://r@127.0.0.1:1/shop", connect_timeout_s=3, read_timeout_s=0)
    params = connect_params(engine)
    assert params["connect_timeout"] == 3
    assert "read_timeout" not in params


def test_explicit_connect_args_override_the_settings():
    engine = db.make_engine("mysql://reader@127.0.0.1:1/shop", connect_args={"read_timeout": 7})
    assert connect_params(engine)["read_timeout"] == 7


def test_sqlite_sources_keep_their_busy_timeout_and_get_no_network_timeouts(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path / 's.sqlite3'}")
    params = connect_params(engine)
    assert params["timeout"] == 30
    assert "read_timeout" not in params


# --- classification ---------------------------------------------------------------------------

REFUSED = MySQLdb.OperationalError(2002, "Can't connect to server on '127.0.0.1' (115)")
HANDSHAKE_TIMEOUT = MySQLdb.OperationalError(
    2013,
    "Lost connection to server at 'handshake: reading initial communication packet', "
    "system error: 110",
)
READ_TIMEOUT = MySQLdb.OperationalError(2013, "Lost connection to server during query")
DEADLOCK = MySQLdb.OperationalError(1213, "Deadlock found when trying to get lock")


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (REFUSED, True),
        (MySQLdb.OperationalError(2003, "Can't connect to MySQL server on 'db' (113)"), True),
        (HANDSHAKE_TIMEOUT, True),
        # A query that timed out or lost its connection says nothing about the next table:
        # one slow table must not stop the others.
        (READ_TIMEOUT, False),
        (DEADLOCK, False),
        (sa.exc.OperationalError("SELECT 1", {}, REFUSED), True),
        (sa.exc.OperationalError("SELECT 1", {}, READ_TIMEOUT), False),
        (RuntimeError("(2002, 'looks like a code')"), False),
    ],
)
def test_only_a_failure_to_open_a_connection_counts_as_a_connect_failure(exc, expected):
    assert db.is_connect_failure(exc) is expected


def test_every_source_timeout_and_refusal_is_a_transient_error():
    for exc in (REFUSED, HANDSHAKE_TIMEOUT, READ_TIMEOUT):
        wrapped = sa.exc.OperationalError("SELECT 1", {}, exc)
        assert errors.is_transient(wrapped)
        assert errors.failure_is_transient("OperationalError", str(wrapped))


# --- extraction of an unreachable source --------------------------------------------------------


def test_an_unreachable_source_is_tried_once_and_every_table_fails_as_transient(tmp_path):
    # Given the business source (four tables) at a loopback port nothing listens on
    source = load_contract(CONTRACT).sources["business"]
    engine = db.make_engine(f"mysql://reader@127.0.0.1:{closed_port()}/shop", read_only=True)
    attempts: list[int] = []
    sa.event.listen(engine, "do_connect", lambda *args: attempts.append(1))
    store = InMemoryWatermarkStore()
    # When it is extracted
    with pytest.raises(SourceExtractionFailed) as caught:
        extract_source(
            engine, source, Lake(tmp_path / "lake"), store, InMemoryLockManager(), holder="t"
        )
    engine.dispose()
    result = caught.value.result
    # Then one connection was attempted, not one per table
    assert len(attempts) == 1
    # and every table is reported failed, unmoved, with an error the stage retries
    assert [f.table for f in result.failures] == list(source.tables)
    assert not result.tables
    assert all(f.watermark is None for f in result.failures)
    assert all(errors.failure_is_transient(f.error_type, f.error) for f in result.failures)
    assert all("not attempted" in f.error for f in result.failures[1:])
    assert all(store.get("business", table) == (None, 0) for table in source.tables)
