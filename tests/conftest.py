"""Shared fixtures: throw-away MariaDB databases, Redis, and a temporary DATA_DIR.

Tests that need MariaDB or Redis run whenever the service answers on loopback. When CI=true
they are never skipped: a missing service is a failure there, not a silent pass.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

MARIADB_HOST = os.environ.get("TEST_MARIADB_HOST", "127.0.0.1")
MARIADB_PORT = int(os.environ.get("TEST_MARIADB_PORT", "3306"))
REDIS_HOST = os.environ.get("TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("TEST_REDIS_PORT", "6379"))
IN_CI = os.environ.get("CI", "").lower() == "true"


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _require(service: str, host: str, port: int) -> None:
    if _answers(host, port):
        return
    message = f"{service} does not answer on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: service tests must not be skipped)")
    pytest.skip(message)


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """A fresh, empty MariaDB database on the shared server; dropped afterwards."""
    _require("MariaDB", MARIADB_HOST, MARIADB_PORT)
    import MySQLdb

    name = f"reco_test_{uuid.uuid4().hex[:12]}"
    admin = MySQLdb.connect(host=MARIADB_HOST, port=MARIADB_PORT, user="root", passwd="")
    try:
        admin.cursor().execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        yield f"mysql://root@{MARIADB_HOST}:{MARIADB_PORT}/{name}"
    finally:
        admin.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
        admin.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The shared Redis on a database index tests may flush (15)."""
    yield from flushed_redis_db(15)


def flushed_redis_db(db: int) -> Iterator[str]:
    """Yield the URL of database `db` of the shared Redis, flushed before and after."""
    _require("Redis", REDIS_HOST, REDIS_PORT)
    import redis

    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def data_dir(tmp_path, settings):
    """A private DATA_DIR for one test."""
    path = tmp_path / "data"
    path.mkdir()
    settings.DATA_DIR = path
    return path
