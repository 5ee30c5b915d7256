"""Data quality of the canonical frames, measured *before* cleaning. Pure core (no Django).

Cleaning repairs what it can, so a score measured after it would hide a source that went bad;
measured before, the score falls when the data as delivered falls, and training is gated on it.

Checks are named ``<table>.<kind>[.<column>]``, a fixed set (so Prometheus labels stay
bounded). Per check: the violation ``v`` it measures, the default warn / fail thresholds, its
weight ``w`` and whether it is critical:

- ``<table>.schema``: required columns missing or of an incompatible dtype (a count);
  0 / 1; w 3; critical. Optional columns missing only warn, at no cost.
- ``<table>.null_rate.<required column>``: share of null or blank values; 0.1% / 5%; w 2;
  critical.
- ``<table>.duplicate_keys.<primary key>``: share of rows repeating a key; 0 / 1%; w 2;
  critical.
- ``users.range.created_at``, ``items.range.created_at``: share before 2000-01-01 or after
  now; 0 / 1%; w 1.
- ``items.range.price``: share < 0 or > ``price_max``; 0 / 1%; w 1.
- ``interactions.range.ts``: share before 2000-01-01 or after now; 0 / 1%; w 2; critical.
- ``interactions.range.value``: share < 0 or > ``value_max``; 0 / 1%; w 1.
- ``interactions.freshness.ts``: hours since the newest valid interaction; 24 / 48 h (warn
  defaults to half the maximum age); w 3; critical.
- ``<table>.volume.rows``: relative drop in rows against the previous run (1 for an empty
  table; unmeasured without a previous run); 25% / 50%; w 2; critical.
- ``interactions.referential_integrity.item_id``: share of non-null item ids not in items;
  0.5% / 5%; w 3; critical.
- ``interactions.referential_integrity.user_id``: share of non-null user ids not in users;
  1% / 10%; w 1; not critical, because users are extracted on their own schedule and lag.

"After now" allows ``max_future_skew_seconds`` of clock skew.

Score
-----
Each check has a violation ``v >= 0``, a warn threshold ``u`` and a fail threshold ``t > u``.
Its status is *pass* when ``v <= u``, *warn* when ``u < v < t`` and *fail* when ``v >= t``.
Its score decays linearly with the size of the violation::

    s = clamp(1 - v / t, 0, 1)

(a null rate of 0.1% against t = 5% keeps 98% of the weight; 5% loses all of it). The
schema check scores 0 when it fails and 1 otherwise; a check that cannot be measured (no
previous run for a volume check) scores 1. The report's score is the weighted mean::

    score = 100 * sum(w * s) / sum(w)

and if any *critical* check fails, ``score = min(score, gate - fail_cap_margin)``: one
collapsed source must block training even when the other 25 checks are perfect, and the
margin keeps a blocked run visibly below the gate on a dashboard. ``passed = score >= gate``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from apps.pipeline import schema

Status = Literal["pass", "warn", "fail"]
TABLES: tuple[str, ...] = ("users", "items", "interactions")
STATUS_VALUE: Mapping[str, int] = {"pass": 0, "warn": 1, "fail": 2}

# (critical, weight) per kind of check; see the table in the module docstring.
_KIND: Mapping[str, tuple[bool, float]] = {
    "schema": (True, 3.0),
    "null_rate": (True, 2.0),
    "duplicate_keys": (True, 2.0),
    "range": (False, 1.0),
    "range.critical": (True, 2.0),
    "freshness": (True, 3.0),
    "volume": (True, 2.0),
    "referential_integrity.item_id": (True, 3.0),
    "referential_integrity.user_id": (False, 1.0),
}
# At most this many values are parsed to judge whether a text column holds numbers/dates.
_SCHEMA_SAMPLE = 10_000
_SCHEMA_PARSE_SHARE = 0.99


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of the checks: ``*_warn`` starts a warning, ``*_fail`` fails the check (and
    is the point where its score reaches zero)."""

    gate: float = 90.0
    fail_cap_margin: float = 10.0
    null_rate_warn: float = 0.001
    null_rate_fail: float = 0.05
    duplicate_warn: float = 0.0
    duplicate_fail: float = 0.01
    range_warn: float = 0.0
    range_fail: float = 0.01
    orphan_item_warn: float = 0.005
    orphan_item_fail: float = 0.05
    orphan_user_warn: float = 0.01
    orphan_user_fail: float = 0.10
    # None: half the maximum age, so that setting only the maximum (as settings do) is valid.
    freshness_warn_hours: float | None = None
    freshness_max_age_hours: float = 48.0
    volume_drop_warn: float = 0.25
    volume_drop_fail: float = 0.5
    price_max: float = 1e7
    value_max: float = 1e8
    min_valid_date: str = "2000-01-01"
    max_future_skew_seconds: float = 300.0

    @property
    def freshness_warn(self) -> float:
        """Hours after which a stale source warns."""
        if self.freshness_warn_hours is None:
            return self.freshness_max_age_hours / 2
        return self.freshness_warn_hours

    def validate(self) -> None:
        """Raise ValueError on thresholds that would make the score meaningless."""
        if not 0.0 <= self.gate <= 100.0:
            raise ValueError("gate must be within 0..100")
        pairs = {
            "null_rate": (self.null_rate_warn, self.null_rate_fail),
            "duplicate": (self.duplicate_warn, self.duplicate_fail),
            "range": (self.range_warn, self.range_fail),
            "orphan_item": (self.orphan_item_warn, self.orphan_item_fail),
            "orphan_user": (self.orphan_user_warn, self.orphan_user_fail),
            "freshness": (self.freshness_warn, self.freshness_max_age_hours),
            "volume_drop": (self.volume_drop_warn, self.volume_drop_fail),
        }
        for name, (warn, fail) in pairs.items():
            if not 0.0 <= warn < fail:
                raise ValueError(f"{name}: need 0 <= warn < fail, got {warn} and {fail}")


@dataclass(frozen=True)
class QualityResult:
    """The score (0-100), whether it clears the gate, every check, and a summary of the data.

    ``summary["rows"]`` is what the next run's volume checks compare against (pass this
    run's ``summary`` as ``previous``).
    """

    score: float
    passed: bool
    gate: float
    checks: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def failing(self) -> list[str]:
        """Names of the failed checks."""
        return [c["name"] for c in self.checks if c["status"] == "fail"]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return {
            "score": self.score,
            "passed": self.passed,
            "gate": self.gate,
            "checks": [dict(c) for c in self.checks],
            "summary": self.summary,
        }


# -- assessment ------------------------------------------------------------------------------


def assess_quality(
    frames: Mapping[str, pd.DataFrame],
    *,
    now: datetime | pd.Timestamp,
    previous: Mapping[str, Any] | None = None,
    thresholds: QualityConfig | None = None,
) -> QualityResult:
    """Run every check on the canonical (uncleaned) ``frames`` and score them.

    ``previous`` is the previous report's ``summary`` (or its whole ``to_dict()``); without it
    the volume checks pass unmeasured.
    """
    config = thresholds or QualityConfig()
    config.validate()
    now_ts = pd.Timestamp(now)
    if now_ts.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now_ts = now_ts.tz_convert("UTC")
    data = {}
    for table in TABLES:
        frame = frames.get(table)
        if frame is None:
            frame = schema.empty_frame(schema.ENTITIES[table])
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"frames[{table!r}] is {type(frame).__name__}, not a DataFrame")
        data[table] = frame
    previous_rows = _previous_rows(previous)
    latest = now_ts + pd.Timedelta(seconds=config.max_future_skew_seconds)
    earliest = pd.Timestamp(config.min_valid_date, tz="UTC")

    checks: list[dict[str, Any]] = []
    null_rates: dict[str, dict[str, float]] = {}
    parsed: dict[str, dict[str, pd.Series]] = {}
    for table in TABLES:
        frame = data[table]
        # Timestamps are parsed once per column: text timestamps are slow to parse.
        parsed[table] = {
            column: _timestamps(frame[column])
            for column, dtype in schema.ENTITIES[table].items()
            if dtype == schema.UTC_TS and column in frame
        }
        checks.append(_schema_check(table, frame))
        null_rates[table] = _null_rates(frame, table, parsed[table])
        for column in schema.REQUIRED[table]:
            rate = null_rates[table][column]
            checks.append(
                _check(
                    f"{table}.null_rate.{column}",
                    table,
                    "null_rate",
                    rate,
                    config.null_rate_warn,
                    config.null_rate_fail,
                    "ratio",
                    f"{_pct(rate)} of {table}.{column} values are null or blank",
                )
            )
        checks.append(_duplicate_check(table, frame, config))
        checks.extend(_range_checks(table, frame, parsed[table], config, earliest, latest))
        checks.append(_volume_check(table, len(frame), previous_rows.get(table), config))

    ts = parsed["interactions"].get("ts", pd.Series(dtype=schema.UTC_TS))
    valid_ts = ts[(ts >= earliest) & (ts <= latest)]
    newest = valid_ts.max() if len(valid_ts) else None
    checks.append(_freshness_check(newest, now_ts, config))
    checks.extend(_referential_checks(data, config))

    score = _score(checks, config)
    summary = {
        "now": now_ts.isoformat(),
        "gate": config.gate,
        "rows": {table: len(data[table]) for table in TABLES},
        "newest_interaction_ts": None if newest is None else newest.isoformat(),
        "oldest_interaction_ts": None if not len(valid_ts) else valid_ts.min().isoformat(),
        "null_rates": null_rates,
        "daily_interactions": _daily_counts(valid_ts, now_ts, days=30),
        "status_counts": {s: sum(c["status"] == s for c in checks) for s in STATUS_VALUE},
        "failed_checks": [c["name"] for c in checks if c["status"] == "fail"],
        "warned_checks": [c["name"] for c in checks if c["status"] == "warn"],
    }
    return QualityResult(
        score=score, passed=score >= config.gate, gate=config.gate, checks=checks, summary=summary
    )


def _score(checks: list[dict[str, Any]], config: QualityConfig) -> float:
    total = float(sum(c["weight"] for c in checks))
    score = 100.0 * float(sum(c["weight"] * c["score"] for c in checks)) / total
    if any(c["critical"] and c["status"] == "fail" for c in checks):
        score = min(score, max(0.0, config.gate - config.fail_cap_margin))
    return round(score, 2)


def _check(
    name: str,
    table: str,
    kind: str,
    observed: float | None,
    warn: float,
    fail: float,
    unit: str,
    message: str,
) -> dict[str, Any]:
    """A check as a plain dict; ``observed=None`` means "could not be measured" (pass)."""
    critical, weight = _KIND[kind]
    if observed is None:
        status: Status = "pass"
        score = 1.0
    else:
        status = "fail" if observed >= fail else "warn" if observed > warn else "pass"
        score = min(1.0, max(0.0, 1.0 - observed / fail))
    suffix = {"pass": "", "warn": f" (warn above {_fmt(warn, unit)})"}.get(
        status, f" (fails at {_fmt(fail, unit)})"
    )
    return {
        "name": name,
        "table": table,
        "kind": kind.split(".")[0],
        "status": status,
        "observed": None if observed is None else float(observed),
        "threshold": float(fail),
        "warn_threshold": float(warn),
        "unit": unit,
        "weight": weight,
        "critical": critical,
        "score": round(score, 4),
        "message": f"{message}{suffix}.",
    }


def _schema_check(table: str, frame: pd.DataFrame) -> dict[str, Any]:
    required = set(schema.REQUIRED[table])
    bad_required: list[str] = []
    bad_optional: list[str] = []
    for column, dtype in schema.ENTITIES[table].items():
        problem = _dtype_problem(frame[column], dtype) if column in frame else "missing"
        if problem:
            (bad_required if column in required else bad_optional).append(f"{column} {problem}")
    check = _check(
        f"{table}.schema",
        table,
        "schema",
        float(len(bad_required)),
        0.0,
        1.0,
        "columns",
        f"Required columns of {table} missing or mistyped: {', '.join(bad_required)}"
        if bad_required
        else f"Every required column of {table} is present with a compatible dtype",
    )
    if not bad_required and bad_optional:
        # Optional columns are nullable by contract; a missing one is worth a look, not a cost.
        check["status"] = "warn"
        check["message"] = (
            f"Required columns of {table} are fine; optional ones missing or mistyped: "
            f"{', '.join(bad_optional)}."
        )
    return check


def _dtype_problem(series: pd.Series, dtype: str) -> str | None:
    """None if ``series`` can be cast to ``dtype``, else a few words saying why not."""
    if dtype == "string":
        return None
    if dtype == "bool":
        ok = pd.api.types.is_bool_dtype(series) or pd.api.types.is_numeric_dtype(series)
        return None if ok or series.dtype == object else f"is {series.dtype}"
    if dtype == schema.UTC_TS:
        if pd.api.types.is_datetime64_any_dtype(series):
            return None
        parse = _timestamps
    else:
        if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
            return None
        parse = _numbers
    if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
        return f"is {series.dtype}"
    sample = series.dropna().head(_SCHEMA_SAMPLE)
    if not len(sample):
        return None
    share = float(parse(sample).notna().mean())
    if share >= _SCHEMA_PARSE_SHARE:
        return None
    return f"is {series.dtype} with {_pct(1 - share)} of values not {dtype}"


def _null_rates(
    frame: pd.DataFrame, table: str, timestamps: Mapping[str, pd.Series]
) -> dict[str, float]:
    """Null share of every canonical column; required text columns also count blanks."""
    rates: dict[str, float] = {}
    n = len(frame)
    required = schema.REQUIRED[table]
    for column, dtype in schema.ENTITIES[table].items():
        if column not in frame:
            rates[column] = 1.0
            continue
        if n == 0:
            rates[column] = 0.0
            continue
        series = frame[column]
        if column in required and dtype == "string":
            missing = _blank_or_null(series)
        elif column in required and dtype == schema.UTC_TS:
            # An unparseable timestamp is as missing as a null one.
            missing = int(timestamps[column].isna().sum())
        else:
            missing = int(series.isna().sum())
        rates[column] = missing / n
    return rates


def _blank_or_null(series: pd.Series) -> int:
    text = series if isinstance(series.dtype, pd.StringDtype) else series.astype("string")
    array = pa.array(text.array, type=pa.string())
    blank = pc.sum(pc.equal(pc.utf8_trim_whitespace(array), "")).as_py() or 0
    return int(array.null_count + blank)


def _duplicate_check(table: str, frame: pd.DataFrame, config: QualityConfig) -> dict[str, Any]:
    keys = list(schema.PRIMARY_KEYS[table])
    name = f"{table}.duplicate_keys.{'+'.join(keys)}"
    if any(k not in frame for k in keys):
        check = _check(name, table, "duplicate_keys", None, 0.0, 1.0, "ratio", "")
        check.update(status="warn", message=f"Key column(s) {', '.join(keys)} missing.")
        check.update(threshold=config.duplicate_fail, warn_threshold=config.duplicate_warn)
        return check
    keyed = frame[keys].dropna()
    rate = float(keyed.duplicated().sum()) / len(frame) if len(frame) else 0.0
    return _check(
        name,
        table,
        "duplicate_keys",
        rate,
        config.duplicate_warn,
        config.duplicate_fail,
        "ratio",
        f"{_pct(rate)} of {table} rows repeat a {'+'.join(keys)} already seen",
    )


def _range_checks(
    table: str,
    frame: pd.DataFrame,
    timestamps: Mapping[str, pd.Series],
    config: QualityConfig,
    earliest: pd.Timestamp,
    latest: pd.Timestamp,
) -> Iterable[dict[str, Any]]:
    def out_of_range(
        column: str, kind: str, bad: pd.Series, values: pd.Series, what: str
    ) -> dict[str, Any]:
        rate = float(bad.sum()) / values.notna().sum() if values.notna().any() else 0.0
        return _check(
            f"{table}.range.{column}",
            table,
            kind,
            rate,
            config.range_warn,
            config.range_fail,
            "ratio",
            f"{_pct(rate)} of {table}.{column} values are {what}",
        )

    ts_column = {"users": "created_at", "items": "created_at", "interactions": "ts"}[table]
    if ts_column in frame:
        values = timestamps[ts_column]
        bad = (values < earliest) | (values > latest)
        kind = "range.critical" if table == "interactions" else "range"
        what = f"before {config.min_valid_date} or in the future"
        yield out_of_range(ts_column, kind, bad, values, what)
    numeric = {"items": ("price", config.price_max), "interactions": ("value", config.value_max)}
    if table in numeric and numeric[table][0] in frame:
        column, ceiling = numeric[table]
        values = _numbers(frame[column])
        bad = (values < 0) | (values > ceiling)
        yield out_of_range(column, "range", bad, values, f"negative or above {ceiling:,.0f}")


def _freshness_check(
    newest: pd.Timestamp | None, now: pd.Timestamp, config: QualityConfig
) -> dict[str, Any]:
    name = "interactions.freshness.ts"
    warn, fail = config.freshness_warn, config.freshness_max_age_hours
    if newest is None:
        check = _check(name, "interactions", "freshness", fail, warn, fail, "hours", "")
        check.update(observed=None, message="No interaction has a valid timestamp.")
        return check
    age = max(0.0, (now - newest).total_seconds() / 3600.0)
    return _check(
        name,
        "interactions",
        "freshness",
        age,
        warn,
        fail,
        "hours",
        f"The newest interaction is {_age(age)} old",
    )


def _volume_check(
    table: str, rows: int, previous: int | None, config: QualityConfig
) -> dict[str, Any]:
    name = f"{table}.volume.rows"
    warn, fail = config.volume_drop_warn, config.volume_drop_fail
    if rows == 0:
        return _check(name, table, "volume", 1.0, warn, fail, "ratio", f"{table} is empty")
    if not previous:
        message = f"{rows:,} rows; no previous run to compare with"
        return _check(name, table, "volume", None, warn, fail, "ratio", message)
    drop = max(0.0, 1.0 - rows / previous)
    return _check(
        name,
        table,
        "volume",
        drop,
        warn,
        fail,
        "ratio",
        f"{rows:,} rows against {previous:,} in the previous run, a drop of {_pct(drop)}",
    )


def _referential_checks(
    data: Mapping[str, pd.DataFrame], config: QualityConfig
) -> Iterable[dict[str, Any]]:
    interactions = data["interactions"]
    pairs = (
        ("item_id", "items", config.orphan_item_warn, config.orphan_item_fail),
        ("user_id", "users", config.orphan_user_warn, config.orphan_user_fail),
    )
    for column, parent, warn, fail in pairs:
        name = f"interactions.referential_integrity.{column}"
        kind = f"referential_integrity.{column}"
        key = column
        if column not in interactions or key not in data[parent]:
            message = f"Cannot compare: {column} or {parent}.{key} is missing"
            yield _check(name, "interactions", kind, None, warn, fail, "ratio", message)
            continue
        refs = _numbers(interactions[column]).dropna()
        known = _numbers(data[parent][key]).dropna().unique()
        rate = float((~refs.isin(known)).sum()) / len(refs) if len(refs) else 0.0
        yield _check(
            name,
            "interactions",
            kind,
            rate,
            warn,
            fail,
            "ratio",
            f"{_pct(rate)} of interactions with {column} set point to no known {parent[:-1]}",
        )


def _previous_rows(previous: Mapping[str, Any] | None) -> dict[str, int]:
    if not previous:
        return {}
    summary = previous.get("summary", previous)
    rows = summary.get("rows") if isinstance(summary, Mapping) else None
    if not isinstance(rows, Mapping):
        return {}
    return {str(t): int(n) for t, n in rows.items() if isinstance(n, int | float)}


def _daily_counts(ts: pd.Series, now: pd.Timestamp, *, days: int) -> list[dict[str, Any]]:
    today = now.floor("D")
    dates = pd.date_range(today - pd.Timedelta(days=days - 1), today, freq="D")
    counts = ts[ts >= dates[0]].dt.floor("D").value_counts()
    return [{"date": d.date().isoformat(), "count": int(counts.get(d, 0))} for d in dates]


# -- lenient parsing (quality measures the data as delivered, whatever its dtypes) ----------


def _numbers(series: pd.Series) -> pd.Series:
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        return series.astype("float64")
    return pd.to_numeric(series.astype("string").str.strip(), errors="coerce").astype("float64")


def _timestamps(series: pd.Series) -> pd.Series:
    """UTC timestamps; naive ones are read as UTC (close enough to judge age and range)."""
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        return series.dt.tz_convert("UTC")
    if pd.api.types.is_datetime64_dtype(series):
        return series.dt.tz_localize("UTC")
    if pd.api.types.is_numeric_dtype(series):
        return pd.to_datetime(series, unit="s", utc=True, errors="coerce")
    text = series.astype("string").str.strip()
    return pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")


# -- Prometheus ------------------------------------------------------------------------------


def quality_prometheus_text(result: QualityResult) -> str:
    """The result as Prometheus gauges in the text exposition format (for a textfile
    collector or a push gateway); the ``check`` label takes the fixed check names only."""
    registry = CollectorRegistry()
    Gauge("recoplatform_data_quality_score", "Data-quality score (0-100)", registry=registry).set(
        result.score
    )
    Gauge(
        "recoplatform_data_quality_gate",
        "Score below which training is blocked",
        registry=registry,
    ).set(result.gate)
    Gauge(
        "recoplatform_data_quality_passed", "1 if the score clears the gate", registry=registry
    ).set(1 if result.passed else 0)
    status = Gauge(
        "recoplatform_data_quality_check_status",
        "Check status: 0 pass, 1 warn, 2 fail",
        ["check"],
        registry=registry,
    )
    check_score = Gauge(
        "recoplatform_data_quality_check_score",
        "Check score (0-1) before weighting",
        ["check"],
        registry=registry,
    )
    for check in result.checks:
        status.labels(check=check["name"]).set(STATUS_VALUE[check["status"]])
        check_score.labels(check=check["name"]).set(check["score"])
    rows = Gauge(
        "recoplatform_data_quality_rows", "Rows per canonical table", ["table"], registry=registry
    )
    for table, n in result.summary.get("rows", {}).items():
        rows.labels(table=table).set(n)
    newest = result.summary.get("newest_interaction_ts")
    if newest:
        Gauge(
            "recoplatform_data_quality_newest_interaction_timestamp_seconds",
            "Unix time of the newest valid interaction",
            registry=registry,
        ).set(pd.Timestamp(newest).timestamp())
    return generate_latest(registry).decode("utf-8")


# -- HTML report -----------------------------------------------------------------------------

_COLOURS = {"pass": "#1a7f37", "warn": "#b7791f", "fail": "#c62828"}
_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f6f8;color:#1f2933;
font:14px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1120px;margin:0 auto;padding:24px}
header{display:flex;justify-content:space-between;align-items:center;gap:16px;
background:#fff;border-radius:10px;padding:20px 24px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
h1{margin:0 0 4px;font-size:22px}
h2{font-size:16px;margin:0 0 12px}
.meta{color:#52606d;margin:0}
.verdict{font-size:18px;font-weight:700;color:#fff;padding:10px 18px;border-radius:8px}
.verdict.pass{background:#1a7f37}.verdict.fail{background:#c62828}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:16px;margin-top:16px}
.card{background:#fff;border-radius:10px;padding:18px 20px;box-shadow:0 1px 3px rgba(0,0,0,.08);
margin-top:16px;overflow-x:auto}
.grid .card{margin-top:0}
.kv{display:grid;grid-template-columns:auto 1fr;gap:4px 16px;margin:0}
.kv dt{color:#52606d}.kv dd{margin:0;font-variant-numeric:tabular-nums}
.chip{display:inline-block;min-width:44px;text-align:center;padding:1px 8px;border-radius:10px;
color:#fff;font-size:12px;font-weight:600;text-transform:uppercase}
.chip.pass{background:#1a7f37}.chip.warn{background:#b7791f}.chip.fail{background:#c62828}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid #e4e7eb;vertical-align:top}
th{font-size:12px;color:#52606d;text-transform:uppercase;letter-spacing:.03em}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.name{font-family:SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px;white-space:nowrap}
tr.fail td{background:#fdecea}tr.warn td{background:#fff8e6}
ul.issues{margin:0;padding-left:18px}ul.issues li{margin:4px 0}
svg text{font-family:inherit}
footer{color:#52606d;font-size:12.5px;margin:16px 4px}
code{font-family:SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px}
"""


def render_quality_html(
    result: QualityResult, *, title: str = "Data quality report", created_at: datetime
) -> str:
    """A self-contained HTML page (inline CSS and SVG, no scripts or external files) with the
    score against the gate, every check colour-coded, and charts of check scores, null rates
    and the daily interaction volume of the last 30 days."""
    e = html.escape
    summary = result.summary
    counts = summary.get("status_counts", {})
    verdict = "pass" if result.passed else "fail"
    verdict_text = "PASSED — training allowed" if result.passed else "BLOCKED — below the gate"
    issues = [c for c in result.checks if c["status"] != "pass"]
    issues.sort(key=lambda c: (-STATUS_VALUE[c["status"]], c["name"]))
    issue_items = "".join(
        f'<li><span class="chip {c["status"]}">{e(c["status"])}</span> '
        f"<code>{e(c['name'])}</code> — {e(c['message'])}</li>"
        for c in issues
    )
    rows = summary.get("rows", {})
    facts = [
        ("Score", f"{result.score:.2f} / 100"),
        ("Gate", f"{result.gate:g}"),
        (
            "Checks",
            f"{counts.get('pass', 0)} pass · {counts.get('warn', 0)} warn · "
            f"{counts.get('fail', 0)} fail",
        ),
        *((f"Rows: {t}", f"{n:,}") for t, n in rows.items()),
        ("Newest interaction", summary.get("newest_interaction_ts") or "none"),
        ("Data as of", summary.get("now", "")),
    ]
    facts_html = "".join(f"<dt>{e(k)}</dt><dd>{e(str(v))}</dd>" for k, v in facts)
    table_rows = "".join(
        f'<tr class="{c["status"]}"><td class="name">{e(c["name"])}</td>'
        f'<td><span class="chip {c["status"]}">{e(c["status"])}</span></td>'
        f'<td class="num">{e(_fmt(c["observed"], c["unit"]))}</td>'
        f'<td class="num">{e(_fmt(c["threshold"], c["unit"]))}</td>'
        f'<td class="num">{c["weight"]:g}{" ★" if c["critical"] else ""}</td>'
        f'<td class="num">{100 * c["score"]:.1f}</td>'
        f"<td>{e(c['message'])}</td></tr>"
        for c in result.checks
    )
    null_charts = "".join(
        f'<div class="card"><h2>Null rates — {e(t)}</h2>{_svg_null_rates(t, rates)}</div>'
        for t, rates in summary.get("null_rates", {}).items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{e(title)}</title><style>{_CSS}</style></head>
<body><main>
<header><div><h1>{e(title)}</h1>
<p class="meta">Generated {e(_iso(created_at))} · data as of {e(str(summary.get("now", "")))}
· score <strong>{result.score:.2f}</strong> against a gate of {result.gate:g}</p></div>
<div class="verdict {verdict}">{e(verdict_text)}</div></header>
<div class="grid">
<div class="card"><h2>Score</h2>{_svg_gauge(result.score, result.gate)}</div>
<div class="card"><h2>Summary</h2><dl class="kv">{facts_html}</dl></div>
</div>
<div class="card"><h2>Needs attention ({len(issues)})</h2>
{f'<ul class="issues">{issue_items}</ul>' if issues else "<p>Every check passed.</p>"}</div>
<div class="card"><h2>Check scores</h2>{_svg_check_bars(result.checks)}</div>
<div class="card"><h2>Checks</h2><table><thead><tr><th>Check</th><th>Status</th>
<th>Observed</th><th>Fails at</th><th>Weight</th><th>Score</th><th>Message</th></tr></thead>
<tbody>{table_rows}</tbody></table>
<p class="meta">★ critical: when it fails the score is capped below the gate.</p></div>
<div class="card"><h2>Daily interactions, last 30 days</h2>
{_svg_daily(summary.get("daily_interactions", []))}
<p class="meta">Days in UTC; the last bar is today so far.</p></div>
<div class="grid">{null_charts}</div>
<footer>Score = 100 &times; &Sigma;(weight &times; check score) / &Sigma; weight, where a check's score is
max(0, 1 &minus; observed / fail threshold); any failed critical check caps the score at
the gate minus a margin. Required columns are marked *; other columns may be null by design
(anonymous visitors have no user, only purchases have an order).</footer>
</main></body></html>
"""


def _svg_gauge(score: float, gate: float) -> str:
    cx, cy, r, band = 170.0, 150.0, 110.0, 22.0

    def point(value: float, radius: float) -> tuple[float, float]:
        angle = math.pi * (1.0 - max(0.0, min(100.0, value)) / 100.0)
        return cx + radius * math.cos(angle), cy - radius * math.sin(angle)

    x0, y0 = point(0, r)
    x1, y1 = point(100, r)
    xs, ys = point(score, r)
    ix, iy = point(gate, r - band / 2 - 4)
    ox, oy = point(gate, r + band / 2 + 4)
    lx, ly = point(gate, r + band / 2 + 10)
    anchor = "start" if gate > 55 else "end" if gate < 45 else "middle"
    colour = _COLOURS["pass" if score >= gate else "fail"]
    return f"""<svg viewBox="0 0 340 180" width="340" height="180" role="img"
aria-label="Score {score:.2f} of 100, gate {gate:g}">
<path d="M{x0:.1f},{y0:.1f} A{r},{r} 0 0 1 {x1:.1f},{y1:.1f}" fill="none" stroke="#e4e7eb"
stroke-width="{band}"/>
<path d="M{x0:.1f},{y0:.1f} A{r},{r} 0 0 1 {xs:.1f},{ys:.1f}" fill="none" stroke="{colour}"
stroke-width="{band}"/>
<line x1="{ix:.1f}" y1="{iy:.1f}" x2="{ox:.1f}" y2="{oy:.1f}" stroke="#1f2933" stroke-width="2.5"/>
<text x="{lx:.1f}" y="{ly:.1f}" font-size="11" text-anchor="{anchor}" fill="#52606d">gate {gate:g}</text>
<text x="{cx}" y="{cy - 18}" font-size="40" font-weight="700" text-anchor="middle"
fill="{colour}">{score:.1f}</text>
<text x="{cx}" y="{cy + 4}" font-size="12" text-anchor="middle" fill="#52606d">of 100</text>
<text x="{x0:.1f}" y="{cy + 20}" font-size="11" text-anchor="middle" fill="#52606d">0</text>
<text x="{x1:.1f}" y="{cy + 20}" font-size="11" text-anchor="middle" fill="#52606d">100</text>
</svg>"""


def _svg_check_bars(checks: list[dict[str, Any]]) -> str:
    label_w, bar_w, row_h = 340, 420, 20
    height = row_h * len(checks) + 10
    parts = []
    for i, c in enumerate(checks):
        y = 5 + i * row_h
        w = bar_w * c["score"]
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 14}" font-size="12" text-anchor="end">'
            f"{html.escape(c['name'])}</text>"
            f'<rect x="{label_w}" y="{y + 3}" width="{bar_w}" height="{row_h - 6}" fill="#eef1f4"/>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" '
            f'fill="{_COLOURS[c["status"]]}"><title>{html.escape(c["name"])}: '
            f"{100 * c['score']:.1f}%</title></rect>"
            f'<text x="{label_w + bar_w + 8}" y="{y + 14}" font-size="12">'
            f"{100 * c['score']:.1f}%</text>"
        )
    width = label_w + bar_w + 60
    return (
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="Score of each check">{"".join(parts)}</svg>'
    )


def _svg_null_rates(table: str, rates: Mapping[str, float]) -> str:
    required = set(schema.REQUIRED.get(table, ()))
    label_w, bar_w, row_h = 110, 200, 20
    height = row_h * len(rates) + 10
    parts = []
    for i, (column, rate) in enumerate(rates.items()):
        y = 5 + i * row_h
        colour = "#c62828" if column in required and rate > 0 else "#5b7c99"
        label = f"{column}{' *' if column in required else ''}"
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 14}" font-size="12" text-anchor="end">'
            f"{html.escape(label)}</text>"
            f'<rect x="{label_w}" y="{y + 3}" width="{bar_w}" height="{row_h - 6}" fill="#eef1f4"/>'
            f'<rect x="{label_w}" y="{y + 3}" width="{bar_w * rate:.1f}" height="{row_h - 6}" '
            f'fill="{colour}"/>'
            f'<text x="{label_w + bar_w + 6}" y="{y + 14}" font-size="12">{_pct(rate)}</text>'
        )
    width = label_w + bar_w + 70
    return (
        f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
        f'aria-label="Null rate per column of {html.escape(table)}">{"".join(parts)}</svg>'
    )


def _svg_daily(days: list[dict[str, Any]]) -> str:
    width, height, left, bottom, top = 1020, 220, 56, 28, 12
    plot_w, plot_h = width - left - 10, height - bottom - top
    peak = max((d["count"] for d in days), default=0)
    scale = plot_h / peak if peak else 0.0
    step = plot_w / max(1, len(days))
    parts = [
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" '
        'stroke="#9aa5b1"/>',
        f'<text x="{left - 6}" y="{top + 10}" font-size="11" text-anchor="end">{peak:,}</text>',
        f'<text x="{left - 6}" y="{top + plot_h}" font-size="11" text-anchor="end">0</text>',
    ]
    for i, d in enumerate(days):
        h = d["count"] * scale
        x = left + i * step + 2
        parts.append(
            f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{step - 4:.1f}" '
            f'height="{h:.1f}" fill="#3b6ea5"><title>{html.escape(d["date"])}: '
            f"{d['count']:,}</title></rect>"
        )
        if (len(days) - 1 - i) % 7 == 0:  # weekly ticks, anchored on today
            parts.append(
                f'<text x="{x + (step - 4) / 2:.1f}" y="{height - 8}" font-size="11" '
                f'text-anchor="middle">{html.escape(d["date"][5:])}</text>'
            )
    if not peak:
        parts.append(
            f'<text x="{width / 2}" y="{top + plot_h / 2}" text-anchor="middle" '
            'fill="#c62828">No interactions in the last 30 days</text>'
        )
    return (
        f'<svg viewBox="0 0 {width} {height}" width="100%" height="{height}" role="img" '
        f'aria-label="Interactions per day">{"".join(parts)}</svg>'
    )


def _fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    if unit == "ratio":
        return _pct(value)
    if unit == "hours":
        return f"{value:.1f} h"
    return f"{value:g}"


def _age(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.0f} minutes"
    return f"{hours:.1f} hours"


def _pct(rate: float) -> str:
    return f"{100 * rate:.2f}%"


def _iso(moment: datetime) -> str:
    return str(pd.Timestamp(moment).isoformat())
