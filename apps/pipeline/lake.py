"""The raw lake: append-only Parquet batches per source table, merged into a current view.

Pure core: no Django. Layout::

    <root>/<source>/<table>/batch-0000000042-upsert-t7.parquet
    <root>/<source>/<table>/snapshot-0000000040-t7.parquet

Every file carries the contract columns plus an ``_op`` column:

* ``upsert`` batches hold whole rows (op 0); the latest version of a primary key wins.
* ``replace`` batches (tables with ``replace_by``) hold the complete current row set of every
  group they name: one marker row per group (op 2) and the group's rows (op 0). Older rows of
  those groups disappear, whatever their keys, because the source rewrites keys in place.
* ``delete`` batches hold tombstones (op 1): keys deleted at the source.
* a ``snapshot`` is the merged view of every file up to its sequence number (``compact``).

Files appear only through an exclusive hard link of an fsynced temporary file, so a reader
sees a batch either complete or not at all, and two writers never share a sequence number.

The name carries the writer's fencing token (from the extraction lock). A batch written with a
lower token than an earlier file was written by a run that lost its lock (a paused process
whose lease expired): it is refused at write time and ignored at read time, so a stale run can
never overwrite newer rows. Its watermark write is fenced the same way, so the rows it failed
to land are re-read by the run that holds the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from apps.pipeline.sources.contract import ColumnType, TableSpec

FileKind = Literal["upsert", "replace", "delete", "snapshot"]

OP_COLUMN = "_op"
OP_UPSERT = 0
OP_DELETE = 1
OP_CLEAR_GROUP = 2

FORMAT_VERSION = 1
_META_KEY = b"recoplatform.lake"

_ARROW_TYPES: Mapping[str, pa.DataType] = {
    "integer": pa.int64(),
    "float": pa.float64(),
    "decimal": pa.float64(),
    "string": pa.string(),
    "text": pa.string(),
    # Microseconds on disk: MySQL DATETIME(6) fits and year 9999 does not overflow.
    "datetime": pa.timestamp("us"),
    "binary": pa.binary(),
    "boolean": pa.bool_(),
}

_PANDAS_TYPES: Mapping[pa.DataType, Any] = {
    pa.int64(): pd.Int64Dtype(),
    pa.string(): pd.StringDtype(),
    pa.bool_(): pd.BooleanDtype(),
}

_BATCH_RE = re.compile(r"^batch-(\d{10})-(upsert|replace|delete)-t(\d+)\.parquet$")
_SNAPSHOT_RE = re.compile(r"^snapshot-(\d{10})-t(\d+)\.parquet$")
_TMP_PREFIX = ".tmp-"
# A temporary file older than this is debris from a crashed writer; younger ones may be a
# write in progress and are left alone by compaction.
_TMP_MAX_AGE_S = 3600
# A reader that finds a file gone (compaction deleted it after writing its snapshot) lists
# the directory again; the new listing is consistent.
_READ_ATTEMPTS = 5


class LakeError(Exception):
    """The lake cannot do what was asked."""


class TableNotInLake(LakeError):
    """Nothing has been extracted for this table yet."""


class StaleFenceToken(LakeError):
    """A writer whose lock was taken over tried to write after the new holder."""


@dataclass(frozen=True)
class LakeFile:
    """One file of a lake table, as its name describes it."""

    path: Path
    seq: int
    kind: FileKind
    token: int


@dataclass(frozen=True)
class TableManifest:
    """What a lake table holds: its schema and the files that make up the current view."""

    source: str
    table: str
    columns: Mapping[str, ColumnType]
    primary_key: tuple[str, ...]
    replace_by: str | None
    files: tuple[LakeFile, ...]
    file_rows: Mapping[str, int]
    bytes: int


@dataclass(frozen=True)
class _Schema:
    columns: Mapping[str, ColumnType]
    primary_key: tuple[str, ...]
    replace_by: str | None


# --- conversion ---------------------------------------------------------------------------


def arrow_type(column_type: ColumnType) -> pa.DataType:
    """The Parquet (Arrow) type a contract column type is stored as."""
    return _ARROW_TYPES[column_type]


def to_arrow_array(
    values: Sequence[Any] | pa.Array | pa.ChunkedArray, column_type: ColumnType
) -> pa.Array:
    """Convert driver values (or an Arrow array) to the stored type of a contract column.

    Drivers disagree: mysqlclient returns ``Decimal`` for DECIMAL, SQLite returns text for
    DATETIME and integers for BOOLEAN. The strict conversion is tried first (fast path); the
    fallback infers the driver's type and casts, which fails loudly on values that do not fit.
    """
    target = _ARROW_TYPES[column_type]
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return _cast(values, target)
    try:
        return pa.array(values, type=target)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return _cast(pa.array(values), target)


def _cast(array: pa.Array, target: pa.DataType) -> pa.Array:
    if array.type == target:
        return array
    if pa.types.is_timestamp(target) and pa.types.is_timestamp(array.type):
        # Aware timestamps are stored as their UTC wall time; nanoseconds are truncated.
        return array.cast(target, safe=False)
    if pa.types.is_null(array.type):
        return pa.nulls(len(array), target)
    return array.cast(target)


def rows_to_arrow(
    rows: Sequence[Sequence[Any]], columns: Sequence[str], types: Mapping[str, ColumnType]
) -> pa.Table:
    """Turn driver rows (tuples in ``columns`` order) into an Arrow table of stored types."""
    transposed: list[Sequence[Any]] = (
        list(zip(*rows, strict=True)) if rows else [() for _ in columns]
    )
    return pa.table(
        {
            name: to_arrow_array(values, types[name])
            for name, values in zip(columns, transposed, strict=True)
        }
    )


def frame_to_arrow(data: pd.DataFrame | pa.Table, types: Mapping[str, ColumnType]) -> pa.Table:
    """Select and convert the contract columns of a DataFrame or Arrow table."""
    present = set(data.column_names if isinstance(data, pa.Table) else data.columns)
    missing = [c for c in types if c not in present]
    if missing:
        raise LakeError(f"rows lack contract column(s) {missing}")
    if isinstance(data, pd.DataFrame):
        data = pa.Table.from_pandas(data[list(types)], preserve_index=False)
    return pa.table({c: to_arrow_array(data.column(c), t) for c, t in types.items()})


def to_frame(table: pa.Table, types: Mapping[str, ColumnType]) -> pd.DataFrame:
    """Arrow table of stored types -> DataFrame with the lake's stable dtypes."""
    table = table.select(list(types))
    for name, column_type in types.items():
        if column_type == "datetime":
            # Cast in Arrow (vectorised, overflow-checked): pandas' astype is ~5x slower.
            index = table.schema.get_field_index(name)
            table = table.set_column(index, name, table.column(name).cast(pa.timestamp("ns")))
    return table.to_pandas(types_mapper=_PANDAS_TYPES.get)


# --- the lake -----------------------------------------------------------------------------


class Lake:
    """Parquet lake rooted at ``DATA_DIR/raw``. One writer per table at a time (the lock)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def table_dir(self, source: str, table: str) -> Path:
        """Directory holding one table's files."""
        return self.root / source / table

    # writes

    def append_upsert(
        self, spec: TableSpec, data: pd.DataFrame | pa.Table, *, token: int
    ) -> LakeFile:
        """Durably append rows to be upserted by primary key."""
        rows = _latest_per_key(frame_to_arrow(data, spec.columns), spec.primary_key)
        return self._append(spec, _with_op(rows, OP_UPSERT), "upsert", token)

    def append_replace(
        self,
        spec: TableSpec,
        data: pd.DataFrame | pa.Table,
        groups: Iterable[Any],
        *,
        token: int,
    ) -> LakeFile:
        """Durably append the complete current rows of ``groups`` (plus any group in ``data``)."""
        if spec.replace_by is None:
            raise LakeError(f"{spec.key} has no replace_by column")
        rows = frame_to_arrow(data, spec.columns)
        group_type = spec.columns[spec.replace_by]
        named = to_arrow_array(list(groups), group_type)
        all_groups = pa.concat_arrays(
            [named, rows.column(spec.replace_by).combine_chunks()]
        ).unique()
        markers = _partial_rows(spec.columns, {spec.replace_by: all_groups}, len(all_groups))
        # Markers precede the rows so that, in merge order, the rows come after their clear.
        table = pa.concat_tables([_with_op(markers, OP_CLEAR_GROUP), _with_op(rows, OP_UPSERT)])
        return self._append(spec, table, "replace", token)

    def append_tombstones(
        self, spec: TableSpec, keys: pd.DataFrame | pa.Table, *, token: int
    ) -> LakeFile:
        """Durably record that these primary keys were deleted at the source."""
        pk_types = {c: spec.columns[c] for c in spec.primary_key}
        key_table = frame_to_arrow(keys, pk_types)
        values = {c: key_table.column(c).combine_chunks() for c in spec.primary_key}
        table = _partial_rows(spec.columns, values, key_table.num_rows)
        return self._append(spec, _with_op(table, OP_DELETE), "delete", token)

    def _append(self, spec: TableSpec, table: pa.Table, kind: FileKind, token: int) -> LakeFile:
        directory = self.table_dir(spec.source, spec.name)
        _make_dirs(directory)
        tmp = _write_temp(directory, table, _metadata(spec, kind, token))
        try:
            for _ in range(1000):
                files = _list_files(directory)
                seq = max((f.seq for f in files), default=0) + 1
                final = directory / _batch_name(seq, kind, token)
                try:
                    os.link(tmp, final)
                except FileExistsError:
                    continue
                _fsync_dir(directory)
                after = _list_files(directory)
                verdict = _check_new_batch(after, seq, token)
                if verdict == "ok":
                    return LakeFile(path=final, seq=seq, kind=kind, token=token)
                final.unlink()
                _fsync_dir(directory)
                if verdict == "fenced":
                    newest = max(f.token for f in after)
                    raise StaleFenceToken(
                        f"{spec.key}: refusing a batch fenced by token {token}: the lake already "
                        f"holds files written under token {newest}, so this run's lock was taken "
                        "over. (If the lock table was reset, delete this table's lake directory "
                        "and its watermark to re-extract it.)"
                    )
            raise LakeError(f"{spec.key}: could not allocate a batch number in {directory}")
        finally:
            tmp.unlink(missing_ok=True)

    # reads

    def exists(self, source: str, table: str) -> bool:
        """True if at least one file exists for the table."""
        return bool(_list_files(self.table_dir(source, table)))

    def tables(self) -> list[tuple[str, str]]:
        """Every ``(source, table)`` with files in the lake."""
        if not self.root.is_dir():
            return []
        found = []
        for source_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for table_dir in sorted(p for p in source_dir.iterdir() if p.is_dir()):
                if _list_files(table_dir):
                    found.append((source_dir.name, table_dir.name))
        return found

    def read_table(self, source: str, table: str) -> pd.DataFrame:
        """The current view: latest row per key, groups replaced, tombstoned keys removed."""
        merged, schema = self._merged(source, table, keys_only=False)
        return to_frame(merged, schema.columns)

    def keys(self, source: str, table: str) -> pd.DataFrame:
        """Primary keys of the current view (reads only the key columns)."""
        merged, schema = self._merged(source, table, keys_only=True)
        pk_types = {c: schema.columns[c] for c in schema.primary_key}
        return to_frame(merged, pk_types)

    def file_count(self, source: str, table: str) -> int:
        """Files that make up the current view (a compaction policy reads this)."""
        return len(_live_files(_list_files(self.table_dir(source, table))))

    def row_count(self, source: str, table: str) -> int:
        """Rows in the current view."""
        live = _live_files(_list_files(self.table_dir(source, table)))
        if len(live) == 1 and live[0].kind in ("snapshot", "upsert"):
            # One snapshot, or one upsert batch (append_upsert keeps one row per key), has
            # unique keys: the Parquet footer has the count without reading any data.
            return int(pq.ParquetFile(live[0].path).metadata.num_rows)
        return len(self.keys(source, table))

    def manifest(self, source: str, table: str) -> TableManifest:
        """Schema and live files of a table (for reports and the admin)."""
        directory = self.table_dir(source, table)
        live = _live_files(_list_files(directory))
        if not live:
            raise TableNotInLake(f"{source}.{table}: nothing extracted yet ({directory})")
        schema = _read_schema(live[-1].path)
        rows = {f.path.name: int(pq.ParquetFile(f.path).metadata.num_rows) for f in live}
        return TableManifest(
            source=source,
            table=table,
            columns=schema.columns,
            primary_key=schema.primary_key,
            replace_by=schema.replace_by,
            files=tuple(live),
            file_rows=rows,
            bytes=sum(f.path.stat().st_size for f in live),
        )

    def _merged(self, source: str, table: str, *, keys_only: bool) -> tuple[pa.Table, _Schema]:
        directory = self.table_dir(source, table)
        for attempt in range(_READ_ATTEMPTS):
            live = _live_files(_list_files(directory))
            if not live:
                raise TableNotInLake(f"{source}.{table}: nothing extracted yet ({directory})")
            try:
                schema = _read_schema(live[-1].path)
                columns = list(schema.primary_key) if keys_only else None
                return _merge(live, schema, columns), schema
            except FileNotFoundError:
                if attempt == _READ_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    # maintenance

    def compact(self, source: str, table: str, *, token: int = 0) -> LakeFile | None:
        """Merge the live files into one snapshot, then delete what it replaced.

        The snapshot appears atomically (hard link of an fsynced file) before anything is
        deleted, and readers always prefer the newest snapshot, so a reader sees either the old
        files or the snapshot, never a mix. Returns None when there was nothing to merge.
        """
        directory = self.table_dir(source, table)
        files = _list_files(directory)
        live = _live_files(files)
        if not live or (len(live) == 1 and live[0].kind == "snapshot" and len(files) == 1):
            return None
        schema = _read_schema(live[-1].path)
        merged = _merge(live, schema, columns=None)
        seq = max(f.seq for f in files)
        snap_token = max([token, *(f.token for f in live)])
        meta = {
            "format": FORMAT_VERSION,
            "kind": "snapshot",
            "token": snap_token,
            "columns": dict(schema.columns),
            "primary_key": list(schema.primary_key),
            "replace_by": schema.replace_by,
        }
        tmp = _write_temp(directory, _with_op(merged, OP_UPSERT), meta)
        final = directory / f"snapshot-{seq:010d}-t{snap_token}.parquet"
        try:
            # Already there: an earlier compaction of exactly these files crashed mid-delete.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, final)
            _fsync_dir(directory)
        finally:
            tmp.unlink(missing_ok=True)
        for old in files:
            if old.seq <= seq and old.path != final:
                old.path.unlink(missing_ok=True)
        cutoff = time.time() - _TMP_MAX_AGE_S
        for debris in directory.glob(f"{_TMP_PREFIX}*"):
            if debris.stat().st_mtime < cutoff:
                debris.unlink(missing_ok=True)
        _fsync_dir(directory)
        return LakeFile(path=final, seq=seq, kind="snapshot", token=snap_token)


# --- internals ----------------------------------------------------------------------------


def _with_op(table: pa.Table, op: int) -> pa.Table:
    return table.append_column(OP_COLUMN, pa.array(np.full(table.num_rows, op, dtype=np.int8)))


def _latest_per_key(table: pa.Table, primary_key: Sequence[str]) -> pa.Table:
    """Keep the last row of each key, so every upsert file has unique keys (merge fast path)."""
    keys = table.select(list(primary_key)).to_pandas(types_mapper=_PANDAS_TYPES.get)
    duplicated = keys.duplicated(keep="last").to_numpy()
    if not duplicated.any():
        return table
    return table.filter(pa.array(~duplicated))


def _partial_rows(
    columns: Mapping[str, ColumnType], values: Mapping[str, pa.Array], n: int
) -> pa.Table:
    """Rows where only ``values`` are set (tombstones, group markers); the rest are null."""
    return pa.table(
        {c: values[c] if c in values else pa.nulls(n, _ARROW_TYPES[t]) for c, t in columns.items()}
    )


def _metadata(spec: TableSpec, kind: FileKind, token: int) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "kind": kind,
        "token": token,
        "columns": dict(spec.columns),
        "primary_key": list(spec.primary_key),
        "replace_by": spec.replace_by,
    }


def _batch_name(seq: int, kind: FileKind, token: int) -> str:
    return f"batch-{seq:010d}-{kind}-t{token}.parquet"


def _write_temp(directory: Path, table: pa.Table, meta: Mapping[str, Any]) -> Path:
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    tmp = directory / f"{_TMP_PREFIX}{uuid.uuid4().hex}.parquet"
    with open(tmp, "wb") as fh:
        pq.write_table(table, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


def _make_dirs(directory: Path) -> None:
    # A new directory's own entry must be durable too, or a power cut right after the first
    # batch (and its watermark) could lose the whole table.
    missing = []
    probe = directory
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    directory.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        _fsync_dir(created.parent)


def _fsync_dir(directory: Path) -> None:
    # The link (or unlink) is only durable once the directory entry itself is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _list_files(directory: Path) -> list[LakeFile]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    files = []
    for name in names:
        if m := _BATCH_RE.match(name):
            files.append(LakeFile(directory / name, int(m[1]), m[2], int(m[3])))  # type: ignore[arg-type]
        elif m := _SNAPSHOT_RE.match(name):
            files.append(LakeFile(directory / name, int(m[1]), "snapshot", int(m[2])))
    # At equal seq a snapshot includes the batch, so it sorts first and hides it.
    files.sort(key=lambda f: (f.seq, f.kind != "snapshot"))
    return files


def _live_files(files: Sequence[LakeFile]) -> list[LakeFile]:
    """The newest snapshot plus the later batches not fenced out, in merge order."""
    snapshots = [f for f in files if f.kind == "snapshot"]
    base = snapshots[-1] if snapshots else None
    live = [base] if base else []
    highest = base.token if base else 0
    for f in files:
        if f.kind == "snapshot" or (base is not None and f.seq <= base.seq):
            continue
        if f.token < highest:
            continue  # written after a newer lock holder's batch: a stale run's late write
        highest = f.token
        live.append(f)
    return live


def _check_new_batch(
    files: Sequence[LakeFile], seq: int, token: int
) -> Literal["ok", "retry", "fenced"]:
    if any(f.kind == "snapshot" and f.seq >= seq for f in files):
        # A compaction deleted the batch we raced for and already covers this number.
        return "retry"
    if any(f.seq < seq and f.token > token for f in files):
        return "fenced"
    return "ok"


def _read_schema(path: Path) -> _Schema:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(_META_KEY)
    if raw is None:
        raise LakeError(f"{path} is not a recoplatform lake file (no metadata)")
    info = json.loads(raw)
    return _Schema(
        columns=dict(info["columns"]),
        primary_key=tuple(info["primary_key"]),
        replace_by=info.get("replace_by"),
    )


def _read_file(path: Path, wanted: Mapping[str, ColumnType]) -> pa.Table:
    parquet = pq.ParquetFile(path)
    present = set(parquet.schema_arrow.names)
    table = parquet.read(columns=[c for c in [*wanted, OP_COLUMN] if c in present])
    n = table.num_rows
    # A column added to the contract later is null in older files; types follow the newest.
    columns = {
        c: _cast(table.column(c).combine_chunks(), _ARROW_TYPES[t])
        if c in present
        else pa.nulls(n, _ARROW_TYPES[t])
        for c, t in wanted.items()
    }
    columns[OP_COLUMN] = table.column(OP_COLUMN).combine_chunks()
    return pa.table(columns)


def _merge(live: Sequence[LakeFile], schema: _Schema, columns: Sequence[str] | None) -> pa.Table:
    """Apply the files in order; return the surviving upsert rows (without ``_op``)."""
    needed = list(schema.primary_key)
    if schema.replace_by and schema.replace_by not in needed:
        needed.append(schema.replace_by)
    if columns is None:
        columns = list(schema.columns)
    wanted_names = list(dict.fromkeys([*columns, *needed]))
    wanted = {c: schema.columns[c] for c in wanted_names}
    parts = [_read_file(f.path, wanted) for f in live]
    table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    out_columns = [c for c in schema.columns if c in columns]

    if len(live) == 1 and live[0].kind in ("snapshot", "upsert"):
        # One snapshot is already a view; one upsert batch is a keyset page with unique keys.
        return table.select(out_columns)

    ops = table.column(OP_COLUMN).to_numpy()
    order = np.arange(table.num_rows)
    keep = ops != OP_CLEAR_GROUP
    if schema.replace_by is not None and not keep.all():
        groups = table.column(schema.replace_by).to_pandas(types_mapper=_PANDAS_TYPES.get)
        is_marker = ~keep
        marker_groups = groups[is_marker].reset_index(drop=True)
        last_clear = pd.Series(order[is_marker]).groupby(marker_groups).max()
        cleared_at = groups.map(last_clear).to_numpy(dtype="float64", na_value=np.nan)
        # A row written before its group's latest clear belongs to a replaced row set.
        keep &= ~(cleared_at > order)
    candidates = np.flatnonzero(keep)
    keys = (
        table.select(list(schema.primary_key))
        .take(candidates)
        .to_pandas(types_mapper=_PANDAS_TYPES.get)
    )
    latest = ~keys.duplicated(keep="last").to_numpy()
    survivors = candidates[latest]
    survivors = survivors[ops[survivors] == OP_UPSERT]
    return table.take(survivors).select(out_columns)
