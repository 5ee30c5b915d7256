"""The Parquet lake: merge semantics, stable dtypes, durability, compaction and fencing."""

from __future__ import annotations

import datetime as dt
import os
from decimal import Decimal

import pandas as pd
import pyarrow as pa
import pytest

from apps.pipeline.lake import (
    Lake,
    StaleFenceToken,
    TableNotInLake,
    rows_to_arrow,
)
from apps.pipeline.sources.contract import CursorSpec, TableSpec

ROWS = TableSpec(
    source="biz",
    name="item",
    physical="item",
    primary_key=("id",),
    cursor=CursorSpec(column="updated_at", kind="timestamp"),
    columns={
        "id": "integer",
        "title": "string",
        "body": "text",
        "price": "decimal",
        "score": "float",
        "updated_at": "datetime",
        "raw": "binary",
        "active": "boolean",
    },
    deletes="reconcile",
)

CONVERSIONS = TableSpec(
    source="matomo",
    name="log_conversion",
    physical="matomo_log_conversion",
    primary_key=("idvisit", "idgoal", "buster"),
    cursor=CursorSpec(column="server_time", kind="timestamp"),
    columns={
        "idvisit": "integer",
        "idgoal": "integer",
        "buster": "integer",
        "revenue": "float",
        "server_time": "datetime",
    },
    replace_by="idvisit",
    deletes="reconcile",
)


def ts(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


def item(id_: int, title: str, when: str = "2024-01-01 10:00:00") -> dict[str, object]:
    return {
        "id": id_,
        "title": title,
        "body": f"body of {title}",
        "price": Decimal("9.90"),
        "score": 0.5,
        "updated_at": ts(when),
        "raw": title.encode(),
        "active": True,
    }


def frame(*rows: dict[str, object]) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def conversion(idvisit: int, idgoal: int, buster: int, revenue: float) -> dict[str, object]:
    return {
        "idvisit": idvisit,
        "idgoal": idgoal,
        "buster": buster,
        "revenue": revenue,
        "server_time": ts("2024-01-01 10:00:00"),
    }


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(tmp_path / "raw")


def test_the_latest_version_of_a_key_wins_and_columns_are_exactly_the_contract(lake):
    # given two batches where the second updates key 2
    lake.append_upsert(ROWS, frame(item(1, "a"), item(2, "b")), token=1)
    lake.append_upsert(ROWS, frame(item(2, "b2", "2024-01-01 11:00:00")), token=1)

    # when the table is read
    view = lake.read_table("biz", "item").sort_values("id")

    # then one row per key, the newest version, and nothing but the contract's columns
    assert list(view.columns) == list(ROWS.columns)
    assert view["id"].tolist() == [1, 2]
    assert view["title"].tolist() == ["a", "b2"]
    assert view.loc[view["id"] == 2, "updated_at"].item() == pd.Timestamp("2024-01-01 11:00:00")


def test_dtypes_are_stable_whatever_the_driver_returned(lake):
    # given rows as a driver hands them over: Decimal, str datetimes (SQLite), ints for bools
    rows = [
        (1, "a", "long text", Decimal("1.25"), 3, "2024-01-01 10:00:00", b"\x00\x01", 1),
        (2, None, None, None, None, "2024-01-01 10:00:00.5", None, 0),
    ]
    table = rows_to_arrow(rows, list(ROWS.columns), ROWS.columns)

    # when written and read back
    lake.append_upsert(ROWS, table, token=1)
    view = lake.read_table("biz", "item").sort_values("id").reset_index(drop=True)

    # then every contract type has its one pandas dtype
    assert view.dtypes.to_dict() == {
        "id": pd.Int64Dtype(),
        "title": pd.StringDtype(),
        "body": pd.StringDtype(),
        "price": "float64",
        "score": "float64",
        "updated_at": "datetime64[ns]",
        "raw": "object",
        "active": pd.BooleanDtype(),
    }
    assert view.loc[0, "price"] == 1.25
    assert view.loc[1, "updated_at"] == pd.Timestamp("2024-01-01 10:00:00.5")
    assert view.loc[0, "raw"] == b"\x00\x01"
    assert view["active"].tolist() == [True, False]
    assert pd.isna(view.loc[1, "title"])


def test_an_empty_table_reads_as_an_empty_frame_with_the_same_dtypes(lake):
    lake.append_upsert(ROWS, rows_to_arrow([], list(ROWS.columns), ROWS.columns), token=1)

    view = lake.read_table("biz", "item")

    assert view.empty
    assert view.dtypes["id"] == pd.Int64Dtype()
    assert view.dtypes["updated_at"] == "datetime64[ns]"


def test_reading_a_table_never_extracted_is_a_clear_error(lake):
    with pytest.raises(TableNotInLake, match=r"biz\.item"):
        lake.read_table("biz", "item")


def test_a_tombstone_removes_a_key_and_a_later_upsert_brings_it_back(lake):
    # given keys 1 and 2, then key 2 deleted at the source
    lake.append_upsert(ROWS, frame(item(1, "a"), item(2, "b")), token=1)
    lake.append_tombstones(ROWS, pd.DataFrame({"id": [2]}), token=1)
    assert lake.keys("biz", "item")["id"].tolist() == [1]

    # when key 2 is inserted again
    lake.append_upsert(ROWS, frame(item(2, "again")), token=1)

    # then it is back with its new content
    view = lake.read_table("biz", "item").sort_values("id")
    assert view["title"].tolist() == ["a", "again"]


def test_a_replace_batch_drops_the_old_rows_of_its_groups_even_when_keys_changed(lake):
    # given visit 1 with a cart row (idgoal -1) and visit 2 with a cart row
    lake.append_replace(
        CONVERSIONS,
        frame(conversion(1, -1, 0, 30.0), conversion(2, -1, 0, 5.0)),
        groups=[1, 2],
        token=1,
    )

    # when visit 1's cart becomes an order (its primary key changes) and only visit 1 is sent
    lake.append_replace(CONVERSIONS, frame(conversion(1, 0, 777, 30.0)), groups=[1], token=1)

    # then visit 1 holds only the order row and visit 2 is untouched
    view = lake.read_table("matomo", "log_conversion").sort_values("idvisit")
    assert view[["idvisit", "idgoal", "buster"]].values.tolist() == [[1, 0, 777], [2, -1, 0]]


def test_a_replace_batch_naming_a_group_without_rows_empties_that_group(lake):
    lake.append_replace(CONVERSIONS, frame(conversion(1, -1, 0, 30.0)), groups=[1], token=1)

    lake.append_replace(CONVERSIONS, frame(conversion(2, -1, 0, 1.0)), groups=[1, 2], token=1)

    assert lake.keys("matomo", "log_conversion")["idvisit"].tolist() == [2]


def test_an_upsert_batch_with_a_repeated_key_keeps_the_last_row(lake):
    lake.append_upsert(ROWS, frame(item(1, "first"), item(1, "second")), token=1)

    view = lake.read_table("biz", "item")

    assert view["title"].tolist() == ["second"]
    assert lake.row_count("biz", "item") == 1


def test_compaction_keeps_the_view_and_replaces_the_batches_with_one_snapshot(lake):
    # given upserts, a replace-free table with a tombstone, several files
    lake.append_upsert(ROWS, frame(item(1, "a"), item(2, "b"), item(3, "c")), token=1)
    lake.append_upsert(ROWS, frame(item(2, "b2")), token=1)
    lake.append_tombstones(ROWS, pd.DataFrame({"id": [3]}), token=2)
    before = lake.read_table("biz", "item").sort_values("id").reset_index(drop=True)

    # when compacted
    snapshot = lake.compact("biz", "item", token=2)

    # then a single snapshot holds the same view, and nothing else is left in the directory
    assert snapshot is not None
    assert snapshot.kind == "snapshot"
    assert snapshot.token == 2
    assert os.listdir(lake.table_dir("biz", "item")) == [snapshot.path.name]
    after = lake.read_table("biz", "item").sort_values("id").reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)
    assert lake.row_count("biz", "item") == 2
    assert lake.compact("biz", "item", token=2) is None


def test_batches_after_a_snapshot_apply_on_top_of_it(lake):
    lake.append_upsert(ROWS, frame(item(1, "a"), item(2, "b")), token=1)
    lake.compact("biz", "item", token=1)

    lake.append_upsert(ROWS, frame(item(1, "a2")), token=1)
    lake.append_tombstones(ROWS, pd.DataFrame({"id": [2]}), token=1)

    view = lake.read_table("biz", "item")
    assert view["title"].tolist() == ["a2"]


def test_a_compaction_that_crashed_before_deleting_leaves_a_consistent_view(lake):
    # given a snapshot written while the merged batches are still on disk (crash mid-delete)
    lake.append_upsert(ROWS, frame(item(1, "a"), item(2, "b")), token=1)
    lake.append_tombstones(ROWS, pd.DataFrame({"id": [1]}), token=1)
    directory = lake.table_dir("biz", "item")
    kept = {p.name: p.read_bytes() for p in directory.iterdir()}
    lake.compact("biz", "item", token=1)
    for name, content in kept.items():
        (directory / name).write_bytes(content)

    # then readers ignore the batches the snapshot already covers
    assert lake.keys("biz", "item")["id"].tolist() == [2]
    # and a second compaction cleans up
    lake.compact("biz", "item", token=1)
    assert len(os.listdir(directory)) == 1


def test_a_half_written_temporary_file_is_invisible_to_readers(lake):
    lake.append_upsert(ROWS, frame(item(1, "a")), token=1)
    (lake.table_dir("biz", "item") / ".tmp-crashed.parquet").write_bytes(b"PAR1 garbage")

    assert lake.read_table("biz", "item")["title"].tolist() == ["a"]
    assert lake.file_count("biz", "item") == 1


def test_batch_files_get_increasing_numbers_and_no_temporary_file_is_left(lake):
    first = lake.append_upsert(ROWS, frame(item(1, "a")), token=1)
    second = lake.append_tombstones(ROWS, pd.DataFrame({"id": [1]}), token=1)

    assert (first.seq, second.seq) == (1, 2)
    assert sorted(os.listdir(lake.table_dir("biz", "item"))) == [
        "batch-0000000001-upsert-t1.parquet",
        "batch-0000000002-delete-t1.parquet",
    ]


def test_a_writer_whose_lock_was_taken_over_cannot_write_after_the_new_holder(lake):
    # given the new lock holder (token 5) has written a batch
    lake.append_upsert(ROWS, frame(item(1, "fresh")), token=5)

    # when the old holder (token 4) wakes up and writes stale rows
    with pytest.raises(StaleFenceToken, match="token 5"):
        lake.append_upsert(ROWS, frame(item(1, "stale")), token=4)

    # then its batch is gone and the view keeps the fresh row
    assert lake.read_table("biz", "item")["title"].tolist() == ["fresh"]
    assert lake.file_count("biz", "item") == 1


def test_a_stale_batch_that_slipped_in_is_ignored_by_readers(lake):
    # given a stale batch on disk after a newer token's batch (a crash between link and check)
    lake.append_upsert(ROWS, frame(item(1, "fresh")), token=5)
    stale = Lake(lake.root / "elsewhere")
    written = stale.append_upsert(ROWS, frame(item(1, "stale")), token=4)
    os.link(written.path, lake.table_dir("biz", "item") / "batch-0000000002-upsert-t4.parquet")

    # then the merged view ignores it, and so does compaction
    assert lake.read_table("biz", "item")["title"].tolist() == ["fresh"]
    lake.compact("biz", "item", token=5)
    assert lake.read_table("biz", "item")["title"].tolist() == ["fresh"]


def test_a_column_added_to_the_contract_later_is_null_in_older_batches(lake):
    narrow = TableSpec(
        source="biz",
        name="item",
        physical="item",
        primary_key=("id",),
        cursor=ROWS.cursor,
        columns={"id": "integer", "title": "string", "updated_at": "datetime"},
    )
    lake.append_upsert(
        narrow, pd.DataFrame([{k: item(1, "a")[k] for k in narrow.columns}]), token=1
    )
    lake.append_upsert(ROWS, frame(item(2, "b")), token=1)

    view = lake.read_table("biz", "item").sort_values("id")

    assert list(view.columns) == list(ROWS.columns)
    assert view["price"].isna().tolist() == [True, False]


def test_manifest_lists_the_live_files_schema_and_row_counts(lake):
    lake.append_upsert(ROWS, frame(item(1, "a"), item(2, "b")), token=1)
    lake.append_tombstones(ROWS, pd.DataFrame({"id": [1]}), token=1)

    manifest = lake.manifest("biz", "item")

    assert manifest.primary_key == ("id",)
    assert [f.kind for f in manifest.files] == ["upsert", "delete"]
    assert sum(manifest.file_rows.values()) == 3
    assert lake.tables() == [("biz", "item")]


def test_rows_missing_a_contract_column_are_refused(lake):
    with pytest.raises(Exception, match="title"):
        lake.append_upsert(ROWS, pd.DataFrame({"id": [1]}), token=1)


def test_arrow_tables_are_accepted_as_they_are(lake):
    table = pa.table({"id": [1], "title": ["x"], "updated_at": [ts("2024-01-01 00:00:00")]})
    spec = TableSpec(
        source="biz",
        name="t",
        physical="t",
        primary_key=("id",),
        cursor=ROWS.cursor,
        columns={"id": "integer", "title": "string", "updated_at": "datetime"},
    )

    lake.append_upsert(spec, table, token=0)

    assert lake.read_table("biz", "t")["title"].tolist() == ["x"]


def test_a_batch_is_fsynced_before_it_becomes_visible_and_its_directory_after(lake, monkeypatch):
    # given a recorder of fsync and link calls (the durability protocol)
    events: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        events.append("fsync")
        real_fsync(fd)

    def link(src: object, dst: object) -> None:
        events.append("link")
        real_link(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)

    lake.append_upsert(ROWS, frame(item(1, "a")), token=1)

    # then the file's data is on disk before its name appears, and the name after
    link = events.index("link")
    assert "fsync" in events[:link]
    assert "fsync" in events[link + 1 :]
