"""Watermarks and extraction locks as database rows: one conditional UPDATE per decision."""

from __future__ import annotations

import datetime as dt

import pytest

from apps.pipeline.extract import (
    ExtractionAlreadyRunning,
    extract_source,
    lock_name,
)
from apps.pipeline.lake import Lake
from apps.pipeline.models import ExtractionLock, Watermark
from apps.pipeline.sources.contract import CursorSpec, SourceSpec, TableSpec
from apps.pipeline.sources.db import make_engine
from apps.pipeline.stores import DjangoLockManager, DjangoWatermarkStore

pytestmark = pytest.mark.django_db

T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def test_a_first_compare_and_set_creates_the_watermark():
    store = DjangoWatermarkStore()
    assert store.get("biz", "user") == (None, 0)

    assert store.compare_and_set("biz", "user", 0, {"kind": "id", "id": 5}, 1, 5)

    assert store.get("biz", "user") == ({"kind": "id", "id": 5}, 1)
    row = Watermark.objects.get(source="biz", table="user")
    assert (row.fence_token, row.rows_total) == (1, 5)


def test_the_compare_and_set_refuses_a_stale_version():
    # given a watermark at version 1
    store = DjangoWatermarkStore()
    assert store.compare_and_set("biz", "user", 0, {"kind": "id", "id": 5}, 1, 5)

    # when a run that read version 0 tries to write
    moved = store.compare_and_set("biz", "user", 0, {"kind": "id", "id": 9}, 1, 9)

    # then nothing changes
    assert not moved
    assert store.get("biz", "user") == ({"kind": "id", "id": 5}, 1)


def test_the_compare_and_set_refuses_a_stale_fencing_token():
    # given a watermark last written under token 7
    store = DjangoWatermarkStore()
    assert store.compare_and_set("biz", "user", 0, {"kind": "id", "id": 5}, 7, 5)

    # when a run holding the older token 6 writes with the right version
    moved = store.compare_and_set("biz", "user", 1, {"kind": "id", "id": 9}, 6, 9)

    # then it is refused, while the current token (or a newer one) succeeds
    assert not moved
    assert store.get("biz", "user") == ({"kind": "id", "id": 5}, 1)
    assert store.compare_and_set("biz", "user", 1, {"kind": "id", "id": 9}, 8, 9)
    assert Watermark.objects.get(source="biz", table="user").fence_token == 8


def test_the_compare_and_set_stamps_updated_at_although_update_skips_auto_now():
    clock_before = dt.datetime.now(dt.UTC)
    store = DjangoWatermarkStore()
    store.compare_and_set("biz", "user", 0, None, 1, 0)
    Watermark.objects.filter(source="biz").update(updated_at=T0)

    store.compare_and_set("biz", "user", 1, None, 1, 0)

    assert Watermark.objects.get(source="biz").updated_at >= clock_before


def test_mark_reconciled_stamps_the_watermark_row():
    store = DjangoWatermarkStore()
    store.compare_and_set("biz", "user", 0, None, 1, 0)

    store.mark_reconciled("biz", "user")

    assert Watermark.objects.get(source="biz", table="user").last_reconciled_at is not None


def test_the_lock_refuses_a_second_holder():
    locks = DjangoLockManager(clock=Clock())

    first = locks.acquire("extract:biz", "A", 60)
    second = locks.acquire("extract:biz", "B", 60)

    assert first == 1
    assert second is None
    assert ExtractionLock.objects.get(name="extract:biz").holder == "A"


def test_an_expired_lease_is_taken_over_with_a_higher_token():
    # given A's lease of 60 s
    clock = Clock()
    locks = DjangoLockManager(clock=clock)
    first = locks.acquire("extract:biz", "A", 60)

    # when 61 s pass, B takes over
    clock.advance(61)
    second = locks.acquire("extract:biz", "B", 60)

    # then B holds a higher token, and A's late release does not free B's lease
    assert first is not None
    assert second is not None
    assert second > first
    locks.release("extract:biz", first)
    assert ExtractionLock.objects.get(name="extract:biz").holder == "B"
    assert locks.acquire("extract:biz", "C", 60) is None


def test_a_released_lock_can_be_taken_again_with_a_new_token():
    locks = DjangoLockManager(clock=Clock())
    first = locks.acquire("extract:biz", "A", 60)
    assert first is not None

    locks.release("extract:biz", first)

    assert locks.acquire("extract:biz", "B", 60) == first + 1


def test_the_token_of_a_taken_over_lease_fences_the_old_holders_watermark_write():
    # given A extracted under token 1, then lost its lease to B (token 2), which wrote first
    clock = Clock()
    locks, store = DjangoLockManager(clock=clock), DjangoWatermarkStore()
    old = locks.acquire("extract:biz", "A", 60)
    clock.advance(61)
    new = locks.acquire("extract:biz", "B", 60)
    assert store.compare_and_set("biz", "user", 0, {"kind": "id", "id": 9}, new, 9)

    # when A finally tries to commit what it read, at the version it saw
    late = store.compare_and_set("biz", "user", 1, {"kind": "id", "id": 5}, old, 5)

    # then it is refused
    assert not late
    assert store.get("biz", "user")[0] == {"kind": "id", "id": 9}


def test_a_second_extraction_is_refused_by_the_database_lock(tmp_path):
    # given another worker holds the source's lock
    locks = DjangoLockManager()
    assert locks.acquire(lock_name("biz"), "worker-1", 600) is not None
    spec = TableSpec(
        source="biz",
        name="t",
        physical="t",
        primary_key=("id",),
        cursor=CursorSpec(column="id", kind="id"),
        columns={"id": "integer"},
    )
    source = SourceSpec(name="biz", url_setting="X", table_prefix="", tables={"t": spec})
    engine = make_engine(f"sqlite:///{tmp_path / 'src.sqlite3'}")

    # when this worker tries to extract the same source, then it is refused before reading
    try:
        with pytest.raises(ExtractionAlreadyRunning, match="biz"):
            extract_source(
                engine,
                source,
                Lake(tmp_path / "raw"),
                DjangoWatermarkStore(),
                locks,
                holder="worker-2",
            )
    finally:
        engine.dispose()
    assert not Lake(tmp_path / "raw").exists("biz", "t")
