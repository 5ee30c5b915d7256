"""The source contract (config/sources.yaml): load, validate, and compare with a live schema.

Pure core: no Django. Every problem is collected and reported together in one readable
``ContractError`` so an operator fixes a contract in one pass rather than one error at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
import yaml

ColumnType = Literal[
    "integer", "float", "decimal", "string", "text", "datetime", "binary", "boolean"
]
COLUMN_TYPES: tuple[str, ...] = (
    "integer",
    "float",
    "decimal",
    "string",
    "text",
    "datetime",
    "binary",
    "boolean",
)
CursorKind = Literal["timestamp", "id"]


class ContractError(ValueError):
    """The contract is malformed or does not match the live source schema."""

    def __init__(self, problems: Iterable[str], *, where: str = "config/sources.yaml") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{where}: {len(self.problems)} problem(s):\n{lines}")


@dataclass(frozen=True)
class CursorSpec:
    """How a table is read incrementally."""

    column: str
    kind: CursorKind
    lag_seconds: int = 0
    lookback_seconds: int = 0
    lookback_rows: int = 0


@dataclass(frozen=True)
class TableSpec:
    """One source table as the contract describes it."""

    source: str
    name: str  # logical name, e.g. "log_visit"
    physical: str  # name in the database, e.g. "matomo_log_visit"
    primary_key: tuple[str, ...]
    cursor: CursorSpec
    columns: Mapping[str, ColumnType]
    replace_by: str | None = None
    deletes: Literal["reconcile", "none"] = "none"

    @property
    def key(self) -> str:
        """``source.table``, the name used in watermarks, the lake and reports."""
        return f"{self.source}.{self.name}"


@dataclass(frozen=True)
class SourceSpec:
    """A source database: which setting holds its URL and which tables it contributes."""

    name: str
    url_setting: str
    table_prefix: str
    tables: Mapping[str, TableSpec]


@dataclass(frozen=True)
class Contract:
    """The whole contract: sources plus the canonical mapping (kept as plain data)."""

    sources: Mapping[str, SourceSpec]
    canonical: Mapping[str, Any] = field(default_factory=dict)

    def table(self, dotted: str) -> TableSpec:
        """Look up ``"source.table"``."""
        source, _, name = dotted.partition(".")
        return self.sources[source].tables[name]


def load_contract(path: str | Path) -> Contract:
    """Read and validate a contract file; raise ``ContractError`` listing every problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ContractError([f"file not found: {path}"], where=str(path)) from None
    except yaml.YAMLError as exc:
        raise ContractError([f"not valid YAML: {exc}"], where=str(path)) from None
    return parse_contract(raw, where=str(path))


def parse_contract(raw: Any, *, where: str = "config/sources.yaml") -> Contract:
    """Validate an already-parsed contract document."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ContractError(
            ["the document must be a mapping with 'version' and 'sources'"], where=where
        )
    if raw.get("version") != 1:
        problems.append(f"version must be 1 (got {raw.get('version')!r})")
    sources_raw = raw.get("sources")
    if not isinstance(sources_raw, dict) or not sources_raw:
        problems.append("'sources' must be a non-empty mapping")
        sources_raw = {}
    sources: dict[str, SourceSpec] = {}
    for source_name, source_raw in sources_raw.items():
        spec = _parse_source(str(source_name), source_raw, problems)
        if spec is not None:
            sources[spec.name] = spec
    canonical = raw.get("canonical") or {}
    if not isinstance(canonical, dict):
        problems.append("'canonical' must be a mapping")
        canonical = {}
    _check_canonical_refs(canonical, _declared_columns(sources_raw), problems)
    if problems:
        raise ContractError(problems, where=where)
    return Contract(sources=sources, canonical=canonical)


def _parse_source(name: str, raw: Any, problems: list[str]) -> SourceSpec | None:
    if not isinstance(raw, dict):
        problems.append(f"sources.{name} must be a mapping")
        return None
    url_setting = raw.get("url_setting")
    if not isinstance(url_setting, str) or not url_setting:
        problems.append(
            f"sources.{name}.url_setting must name the setting holding the database URL"
        )
        url_setting = ""
    prefix = raw.get("table_prefix", "") or ""
    tables_raw = raw.get("tables")
    if not isinstance(tables_raw, dict) or not tables_raw:
        problems.append(f"sources.{name}.tables must be a non-empty mapping")
        return None
    tables: dict[str, TableSpec] = {}
    for table_name, table_raw in tables_raw.items():
        table = _parse_table(name, str(table_name), str(prefix), table_raw, problems)
        if table is not None:
            tables[table.name] = table
    return SourceSpec(name=name, url_setting=url_setting, table_prefix=str(prefix), tables=tables)


def _parse_table(
    source: str, name: str, prefix: str, raw: Any, problems: list[str]
) -> TableSpec | None:
    where = f"sources.{source}.tables.{name}"
    if not isinstance(raw, dict):
        problems.append(f"{where} must be a mapping")
        return None
    columns_raw = raw.get("columns")
    columns: dict[str, ColumnType] = {}
    if not isinstance(columns_raw, dict) or not columns_raw:
        problems.append(f"{where}.columns must map column names to types")
    else:
        for col, typ in columns_raw.items():
            if typ not in COLUMN_TYPES:
                problems.append(
                    f"{where}.columns.{col}: unknown type {typ!r} (one of {', '.join(COLUMN_TYPES)})"
                )
            else:
                columns[str(col)] = typ
    pk = raw.get("primary_key")
    if not isinstance(pk, list) or not pk or not all(isinstance(c, str) for c in pk):
        problems.append(f"{where}.primary_key must be a non-empty list of column names")
        pk = []
    for col in pk:
        if columns and col not in columns:
            problems.append(f"{where}.primary_key column {col!r} is not listed in columns")
    cursor_raw = raw.get("cursor")
    cursor: CursorSpec | None = None
    if not isinstance(cursor_raw, dict) or "column" not in cursor_raw or "kind" not in cursor_raw:
        problems.append(f"{where}.cursor must be {{column: ..., kind: timestamp|id}}")
    else:
        kind = cursor_raw["kind"]
        col = str(cursor_raw["column"])
        if kind not in ("timestamp", "id"):
            problems.append(f"{where}.cursor.kind must be 'timestamp' or 'id' (got {kind!r})")
        elif columns and col not in columns:
            problems.append(f"{where}.cursor column {col!r} is not listed in columns")
        elif columns and kind == "timestamp" and columns[col] != "datetime":
            problems.append(
                f"{where}.cursor column {col!r} has kind timestamp but type {columns[col]}"
            )
        elif columns and kind == "id" and columns[col] != "integer":
            problems.append(f"{where}.cursor column {col!r} has kind id but type {columns[col]}")
        else:
            numbers = {}
            for opt in ("lag_seconds", "lookback_seconds", "lookback_rows"):
                value = raw.get(opt, 0)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    problems.append(f"{where}.{opt} must be a non-negative integer (got {value!r})")
                    value = 0
                numbers[opt] = value
            cursor = CursorSpec(column=col, kind=kind, **numbers)
    replace_by = raw.get("replace_by")
    if replace_by is not None and columns and replace_by not in columns:
        problems.append(f"{where}.replace_by column {replace_by!r} is not listed in columns")
    deletes = raw.get("deletes", "none")
    if deletes not in ("reconcile", "none"):
        problems.append(f"{where}.deletes must be 'reconcile' or 'none' (got {deletes!r})")
    if cursor is None or not pk or not columns:
        return None
    return TableSpec(
        source=source,
        name=name,
        physical=f"{prefix}{name}",
        primary_key=tuple(pk),
        cursor=cursor,
        columns=columns,
        replace_by=replace_by,
        deletes=deletes,
    )


def _declared_columns(sources_raw: dict[str, Any]) -> dict[str, set[str]]:
    """Column names as written, per ``source.table`` - even for tables that failed to parse,
    so one mistake in a table does not cascade into errors about every mapping that uses it."""
    declared: dict[str, set[str]] = {}
    for source, source_raw in sources_raw.items():
        tables = source_raw.get("tables") if isinstance(source_raw, dict) else None
        for table, table_raw in (tables or {}).items():
            columns = table_raw.get("columns") if isinstance(table_raw, dict) else None
            declared[f"{source}.{table}"] = set(columns) if isinstance(columns, dict) else set()
    return declared


def _check_canonical_refs(
    canonical: dict[str, Any], declared: dict[str, set[str]], problems: list[str]
) -> None:
    """Every ``table:`` reference and mapped column in the canonical section must exist."""

    def check(where: str, dotted: Any, cols: Iterable[Any]) -> None:
        if not isinstance(dotted, str) or "." not in dotted:
            problems.append(f"{where}.table must be 'source.table' (got {dotted!r})")
            return
        known = declared.get(dotted)
        if known is None:
            problems.append(f"{where}.table {dotted!r} is not a table of the contract")
            return
        for col in cols:
            if col is not None and col not in known:
                problems.append(f"{where}: column {col!r} is not listed in {dotted}")

    for entity in ("users", "items"):
        block = canonical.get(entity)
        if isinstance(block, dict):
            cols = list((block.get("columns") or {}).values())
            active = block.get("active") or {}
            cols.append(active.get("column"))
            check(f"canonical.{entity}", block.get("table"), cols)
    for i, block in enumerate(canonical.get("business_events") or []):
        if not isinstance(block, dict):
            problems.append(f"canonical.business_events[{i}] must be a mapping")
            continue
        cols = [block.get(k) for k in ("user", "item", "ts", "value", "order_id")]
        cols += list((block.get("where") or {}).keys())
        check(f"canonical.business_events[{i}]", block.get("table"), cols)
    matomo = canonical.get("matomo") or {}
    for key in ("item_from_sku", "item_from_url", "user_from_user_id"):
        pattern = matomo.get(key)
        if pattern is None:
            continue
        try:
            if re.compile(pattern).groups != 1:
                problems.append(f"canonical.matomo.{key} must have exactly one capturing group")
        except re.error as exc:
            problems.append(f"canonical.matomo.{key} is not a valid regular expression: {exc}")


# --- comparison with a live database ----------------------------------------------------------


def generic_type(sql_type: sa.types.TypeEngine[Any]) -> str:
    """Map a reflected SQLAlchemy type to a contract type name."""
    # Order matters: Boolean before Integer, DateTime before String, and so on.
    checks: list[tuple[type[Any], str]] = [
        (sa.Boolean, "boolean"),
        (sa.DateTime, "datetime"),
        (sa.Date, "datetime"),
        (sa.Integer, "integer"),
        (sa.Numeric, "decimal"),
        (sa.Float, "float"),
        (sa.LargeBinary, "binary"),
        (sa.types._Binary, "binary"),
        (sa.Text, "text"),
        (sa.String, "string"),
    ]
    for cls, name in checks:
        if isinstance(sql_type, cls):
            if name == "decimal" and isinstance(sql_type, sa.Float):
                return "float"
            if name == "string" and type(sql_type).__name__.upper() in {"BINARY", "VARBINARY"}:
                return "binary"
            return name
    text = str(sql_type).upper()
    if "INT" in text:
        return "integer"
    if "BINARY" in text or "BLOB" in text:
        return "binary"
    if "CHAR" in text or "TEXT" in text:
        return "string"
    if "DATE" in text or "TIME" in text:
        return "datetime"
    if any(t in text for t in ("DOUBLE", "FLOAT", "REAL")):
        return "float"
    if "DEC" in text or "NUMERIC" in text:
        return "decimal"
    return text.lower()


# Types a contract type accepts from the live database. SQLite reports loose types
# (e.g. DECIMAL(12,2) -> NUMERIC), so compatible families are accepted.
_COMPATIBLE: dict[str, set[str]] = {
    "integer": {"integer", "boolean"},
    "float": {"float", "decimal"},
    "decimal": {"decimal", "float"},
    "string": {"string", "text"},
    "text": {"text", "string"},
    "datetime": {"datetime"},
    "binary": {"binary"},
    "boolean": {"boolean", "integer"},
}


def check_live_schema(source: SourceSpec, engine: sa.Engine) -> list[str]:
    """Compare a source's tables with the live database; return one line per mismatch."""
    problems: list[str] = []
    try:
        inspector = sa.inspect(engine)
        existing = set(inspector.get_table_names())
    except sa.exc.SQLAlchemyError as exc:
        return [
            f"source {source.name!r}: cannot connect to read its schema: {exc.__class__.__name__}: {exc.args[0] if exc.args else exc}"
        ]
    for table in source.tables.values():
        if table.physical not in existing:
            problems.append(
                f"{table.key}: table {table.physical!r} is missing from the {source.name} database"
            )
            continue
        live = {c["name"]: c for c in inspector.get_columns(table.physical)}
        for col, wanted in table.columns.items():
            if col not in live:
                problems.append(f"{table.key}: column {col!r} is missing from {table.physical}")
                continue
            got = generic_type(live[col]["type"])
            if got not in _COMPATIBLE[wanted]:
                problems.append(
                    f"{table.key}.{col}: contract says {wanted} but the database has {live[col]['type']} ({got})"
                )
    return problems


def validate_live(contract: Contract, engines: Mapping[str, sa.Engine]) -> None:
    """Raise one ``ContractError`` listing every mismatch between the contract and the sources."""
    problems: list[str] = []
    for name, source in contract.sources.items():
        engine = engines.get(name)
        if engine is None:
            problems.append(f"source {name!r}: no database configured ({source.url_setting})")
            continue
        problems.extend(check_live_schema(source, engine))
    if problems:
        raise ContractError(problems, where="live source schema")
