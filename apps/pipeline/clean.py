"""Cleaning: turn extracted, possibly dirty canonical frames into frames that conform exactly
to ``schema``. Pure core (no Django).

Every rule counts what it changed, per entity, in a ``CleanReport``; nothing is dropped or
rewritten silently. The rules run in this order, because each one relies on the previous:

1. **Type coercion** (``coerce_failed.<column>``): numeric strings, Decimals, mixed objects
   are coerced to the canonical dtype; a present value that cannot be coerced becomes null and
   is counted. Blank strings and textual nulls ("null", "None", "nan", "\\N") are missing
   values, not failures.
2. **String normalisation** (``strings_normalised.<column>``): whitespace is stripped (and
   collapsed in short text), events/sources/visitor ids are lower-cased, tags are split on
   commas and semicolons (ASCII and full-width), ``|`` and the ideographic comma,
   lower-cased, de-duplicated and re-joined with ``,``; blanks become null.
3. **Timestamp repair**: naive values are read in the source's time zone and converted to UTC
   (``ts_localised.<column>``); zero dates (``0000-00-00``) and dates before ``min_valid_date``
   (1970-01-01 from a zeroed epoch, say) become null (``ts_invalid.<column>``) and are then
   filled from the entity's fallback where one exists (``ts_fallback.<column>``: an item's
   created_at <-> updated_at, a user's first interaction); values later than ``now`` plus
   ``max_future_skew`` are clipped to ``now`` (``ts_future_clipped.<column>``).
4. **Outliers**: a negative price becomes null (or 0, see ``negative_price``)
   (``price_negative``); a price above the upper bound is clipped to it (``price_clipped``).
   The upper bound is ``min(price_max, price_clip_factor * quantile(price_clip_quantile))`` of
   the non-negative prices: a multiple of a high quantile, so that clean data is never clipped
   while an absurd value (a price typed in cents, 1e9) is. Interaction values likewise
   (``value_negative`` -> 0, ``value_null_filled`` -> 0, ``value_clipped``; the quantile is
   taken over positive values, i.e. purchases). Quantity null or <= 0 -> 1 (``quantity_fixed``).
5. **De-duplication**: exact duplicate rows (``duplicate_rows``); then duplicate primary keys
   (``duplicate_keys``), keeping the latest ``updated_at`` where the entity has one, otherwise
   the last row delivered (the extractor appends newer batches last); for interactions also
   the same (user_id, visitor_id, item_id, event, ts, session_id) (``duplicate_events``), and a
   Matomo purchase whose (order_id, item_id) also arrived from the business database
   (``duplicate_purchases``: the business row is the record of the sale and wins).
6. **Drops**: rows missing a ``schema.REQUIRED`` column (``missing_required.<column>``, each
   dropped row counted once, under its first missing column), interactions with an event not
   in ``schema.EVENTS`` (``unknown_event``) and interactions whose item is not among the
   cleaned items (``orphan_item``).

So for every entity: ``rows_out == rows_in - sum(counts of the dropping rules)``, where the
dropping rules are ``DROP_RULES`` plus every ``missing_required.*``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from apps.pipeline import schema

FrameName = Literal["users", "items", "interactions"]
ENTITY_NAMES: tuple[FrameName, ...] = ("users", "items", "interactions")

# Rules that remove rows (besides missing_required.<column>); see the module docstring.
DROP_RULES: tuple[str, ...] = (
    "duplicate_rows",
    "duplicate_keys",
    "duplicate_events",
    "duplicate_purchases",
    "unknown_event",
    "orphan_item",
)

# How each string column is normalised. "text": strip and collapse inner whitespace (short
# human text); "strip": strip only (long text keeps its line breaks, ids keep their case);
# "lower": strip + lower-case; "token": lower-case with spaces/hyphens as "_" (so
# "Detail View" and "detail-view" both become "detail_view"); "hex": bytes -> hex, lower-case.
_STRING_STYLE: Mapping[str, Mapping[str, str]] = {
    "users": {
        "username": "text",
        "company": "text",
        "industry": "text",
        "province": "text",
        "city": "text",
    },
    "items": {
        "title": "text",
        "description": "strip",
        "tags": "tags",
        "category": "text",
        "company": "text",
    },
    "interactions": {
        "visitor_id": "hex",
        "event": "token",
        "source": "lower",
        "session_id": "strip",
        "order_id": "strip",
        "query": "text",
        "ref": "strip",
    },
}

# Where an invalid timestamp can be recovered from. "first_interaction" is the user's earliest
# valid interaction: a user cannot have signed up later than they first acted.
_TS_FALLBACK: Mapping[str, Mapping[str, str]] = {
    "users": {"created_at": "first_interaction"},
    "items": {"created_at": "updated_at", "updated_at": "created_at"},
    "interactions": {},
}

_EVENT_KEY = ("user_id", "visitor_id", "item_id", "event", "ts", "session_id")
_TEXTUAL_NULL_SET = pa.array(["", "null", "none", "nan", "nat", "n/a", "\\n"], type=pa.string())
_TAG_SPLIT = re.compile("[,;|\uff0c\uff1b\u3001]")
_WHITESPACE = re.compile(r"\s+")
_OFFSET_SUFFIX = r"(?:[zZ]|[+-]\d{2}:?\d{2})$"
_ZERO_DATE = r"^0{4}-0{1,2}-0{1,2}"
_TRUE = frozenset({"1", "true", "t", "yes", "y"})
_FALSE = frozenset({"0", "false", "f", "no", "n"})


@dataclass(frozen=True)
class CleanReport:
    """What cleaning changed: ``rules[entity][rule] = count`` and row counts per entity.

    Every rule key of an entity is always present (zero when nothing happened), so reports of
    different runs have the same shape and can be charted side by side.
    """

    rules: Mapping[str, Mapping[str, int]]
    rows_in: Mapping[str, int]
    rows_out: Mapping[str, int]

    def dropped(self, entity: str) -> int:
        """Rows removed from ``entity``."""
        return self.rows_in[entity] - self.rows_out[entity]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return {
            "rules": {entity: dict(counts) for entity, counts in self.rules.items()},
            "rows_in": dict(self.rows_in),
            "rows_out": dict(self.rows_out),
        }


@dataclass(frozen=True, eq=False)
class CleanResult:
    """Clean canonical frames (exact ``schema`` columns and dtypes) and the report."""

    users: pd.DataFrame
    items: pd.DataFrame
    interactions: pd.DataFrame
    report: CleanReport

    @property
    def frames(self) -> dict[str, pd.DataFrame]:
        """The frames by entity name, as ``clean()`` and ``assess_quality()`` take them."""
        return {"users": self.users, "items": self.items, "interactions": self.interactions}


@dataclass(frozen=True)
class _Context:
    """The validated time bounds of one ``clean()`` call."""

    now: pd.Timestamp
    min_valid: pd.Timestamp
    skew: pd.Timedelta


class _Counts:
    """Per-entity rule counters with a fixed vocabulary (a typo in a rule name raises)."""

    def __init__(self, entity: str) -> None:
        columns = schema.ENTITIES[entity]
        keys: list[str] = []
        for name, dtype in columns.items():
            if dtype == schema.UTC_TS:
                keys += [f"coerce_failed.{name}", f"ts_localised.{name}", f"ts_invalid.{name}"]
                if name in _TS_FALLBACK[entity]:
                    keys.append(f"ts_fallback.{name}")
                keys.append(f"ts_future_clipped.{name}")
            elif dtype == "string":
                keys.append(f"strings_normalised.{name}")
            else:
                keys.append(f"coerce_failed.{name}")
        if entity == "items":
            keys += ["price_negative", "price_clipped"]
        if entity == "interactions":
            keys += ["value_negative", "value_null_filled", "value_clipped", "quantity_fixed"]
        keys += ["duplicate_rows", "duplicate_keys"]
        if entity == "interactions":
            keys += ["duplicate_events", "duplicate_purchases"]
        keys += [f"missing_required.{name}" for name in schema.REQUIRED[entity]]
        if entity == "interactions":
            keys += ["unknown_event", "orphan_item"]
        self.counts: dict[str, int] = dict.fromkeys(keys, 0)

    def add(self, rule: str, n: int | np.integer[Any]) -> None:
        if rule not in self.counts:
            raise KeyError(f"unknown cleaning rule {rule!r}")
        self.counts[rule] += int(n)


class DataCleaner:
    """Cleans users, items and interactions; see the module docstring for the rules.

    Parameters (stored as given; validated when ``clean`` runs):
        now: the reference time for future timestamps (timezone-aware); None = wall clock at
            ``clean()``. Pass it explicitly in tests and backfills.
        max_future_skew: how far past ``now`` a timestamp may be before it is clipped
            (source clocks drift by seconds, not hours).
        min_valid_date: timestamps before this are invalid (zero dates, epoch 0).
        source_timezone: the zone of naive timestamps (users and items come from the
            business database; interactions use their ``source`` column).
        source_timezones: per-source overrides, e.g. ``{"business": "Asia/Shanghai"}``.
        price_clip_quantile, price_clip_factor, price_max: the upper price bound (see above).
        negative_price: "null" (the row is then dropped as missing a required price) or
            "zero" (keep the item as free).
        value_clip_quantile, value_clip_factor, value_max: the same for interaction values.
    """

    def __init__(
        self,
        *,
        now: datetime | pd.Timestamp | str | None = None,
        max_future_skew: timedelta = timedelta(minutes=5),
        min_valid_date: str = "2000-01-01",
        source_timezone: str = "UTC",
        source_timezones: Mapping[str, str] | None = None,
        price_clip_quantile: float = 0.99,
        price_clip_factor: float = 10.0,
        price_max: float | None = None,
        negative_price: Literal["null", "zero"] = "null",
        value_clip_quantile: float = 0.99,
        value_clip_factor: float = 10.0,
        value_max: float | None = None,
    ) -> None:
        self.now = now
        self.max_future_skew = max_future_skew
        self.min_valid_date = min_valid_date
        self.source_timezone = source_timezone
        self.source_timezones = source_timezones
        self.price_clip_quantile = price_clip_quantile
        self.price_clip_factor = price_clip_factor
        self.price_max = price_max
        self.negative_price = negative_price
        self.value_clip_quantile = value_clip_quantile
        self.value_clip_factor = value_clip_factor
        self.value_max = value_max

    # -- entry point -----------------------------------------------------------------------

    def clean(self, frames: Mapping[str, pd.DataFrame]) -> CleanResult:
        """Clean ``frames`` (keys users, items, interactions; a missing one counts as empty)."""
        now, min_valid = self._validate()
        raw: dict[str, pd.DataFrame] = {}
        for entity in ENTITY_NAMES:
            frame = frames.get(entity)
            if frame is None:
                frame = schema.empty_frame(schema.ENTITIES[entity])
            if not isinstance(frame, pd.DataFrame):
                raise TypeError(f"frames[{entity!r}] is {type(frame).__name__}, not a DataFrame")
            raw[entity] = frame
        counts = {entity: _Counts(entity) for entity in ENTITY_NAMES}
        rows_in: dict[str, int] = {entity: len(raw[entity]) for entity in ENTITY_NAMES}
        ctx = _Context(now=now, min_valid=min_valid, skew=pd.Timedelta(self.max_future_skew))

        # Interactions are typed first: a user's first interaction repairs their created_at.
        interactions, _ = self._coerce(
            raw["interactions"], "interactions", counts["interactions"], ctx
        )
        first_seen = (
            interactions.loc[interactions["user_id"].notna()].groupby("user_id")["ts"].min()
        )
        users, invalid = self._coerce(raw["users"], "users", counts["users"], ctx)
        users = self._fill_ts(users, "users", counts["users"], invalid, first_seen=first_seen)
        users = self._finish_entity(users, "users", counts["users"])

        items, invalid = self._coerce(raw["items"], "items", counts["items"], ctx)
        items = self._fill_ts(items, "items", counts["items"], invalid)
        items = self._clip_prices(items, counts["items"])
        items = self._finish_entity(items, "items", counts["items"])

        interactions = self._clip_interaction_values(interactions, counts["interactions"])
        interactions = self._finish_interactions(interactions, items, counts["interactions"])

        out = {
            "users": schema.conform(users, schema.USERS),
            "items": schema.conform(items, schema.ITEMS),
            "interactions": schema.conform(interactions, schema.INTERACTIONS),
        }
        report = CleanReport(
            rules={entity: counts[entity].counts for entity in ENTITY_NAMES},
            rows_in=rows_in,
            rows_out={entity: len(out[entity]) for entity in ENTITY_NAMES},
        )
        return CleanResult(report=report, **out)

    def _validate(self) -> tuple[pd.Timestamp, pd.Timestamp]:
        now = pd.Timestamp.now(tz="UTC") if self.now is None else pd.Timestamp(self.now)
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware: a naive 'now' is ambiguous")
        for name in ("price_clip_quantile", "value_clip_quantile"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1]")
        for name in ("price_clip_factor", "value_clip_factor"):
            if getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be >= 1 (a factor below 1 clips clean data)")
        if self.negative_price not in ("null", "zero"):
            raise ValueError("negative_price must be 'null' or 'zero'")
        if pd.Timedelta(self.max_future_skew) < pd.Timedelta(0):
            raise ValueError("max_future_skew must not be negative")
        return now.tz_convert("UTC"), pd.Timestamp(self.min_valid_date, tz="UTC")

    def _timezone_for(self, source: str) -> str:
        return (self.source_timezones or {}).get(source, self.source_timezone)

    # -- per-column coercion ---------------------------------------------------------------

    def _coerce(
        self, frame: pd.DataFrame, entity: str, c: _Counts, ctx: _Context
    ) -> tuple[pd.DataFrame, dict[str, pd.Series]]:
        """Every canonical column at its canonical dtype (nullable where a value failed), and
        per timestamp column the rows whose value was invalid (for the fallback)."""
        columns = schema.ENTITIES[entity]
        frame = frame.reset_index(drop=True)
        out: dict[str, pd.Series] = {}
        invalid: dict[str, pd.Series] = {}
        for name, dtype in columns.items():
            series = frame[name] if name in frame.columns else pd.Series(pd.NA, index=frame.index)
            if dtype == schema.UTC_TS:
                out[name], invalid[name] = self._repair_ts(series, entity, name, frame, c, ctx)
            elif dtype == "string":
                style = _STRING_STYLE[entity].get(name, "strip")
                normalised, changed = _normalise_strings(series, style)
                c.add(f"strings_normalised.{name}", changed)
                out[name] = normalised
            elif dtype == "bool":
                values, failed = _coerce_bool(series)
                c.add(f"coerce_failed.{name}", failed)
                out[name] = values
            else:
                integer = dtype in ("int64", "Int64")
                values, failed = _coerce_numeric(series, integer=integer)
                c.add(f"coerce_failed.{name}", failed)
                out[name] = values
        return pd.DataFrame(out, index=frame.index), invalid

    def _repair_ts(
        self,
        series: pd.Series,
        entity: str,
        name: str,
        frame: pd.DataFrame,
        c: _Counts,
        ctx: _Context,
    ) -> tuple[pd.Series, pd.Series]:
        def zones() -> pd.Series:
            # Only naive values need a zone; tz-aware columns (the usual case) never pay this.
            if entity == "interactions" and "source" in frame.columns:
                sources = frame["source"].astype("string").str.strip().str.lower()
                zone_of = {s: self._timezone_for(s) for s in sources.dropna().unique()}
                return sources.map(zone_of).fillna(self.source_timezone).astype(object)
            return pd.Series(self._timezone_for("business"), index=series.index, dtype=object)

        parsed, failed, localised, zero = _parse_timestamps(series, zones)
        c.add(f"coerce_failed.{name}", failed)
        c.add(f"ts_localised.{name}", localised)

        invalid = zero | (parsed < ctx.min_valid)
        c.add(f"ts_invalid.{name}", invalid.sum())
        parsed = parsed.mask(invalid)

        future = parsed > ctx.now + ctx.skew
        c.add(f"ts_future_clipped.{name}", future.sum())
        return parsed.mask(future, ctx.now), invalid

    def _fill_ts(
        self,
        frame: pd.DataFrame,
        entity: str,
        c: _Counts,
        invalid: Mapping[str, pd.Series],
        *,
        first_seen: pd.Series | None = None,
    ) -> pd.DataFrame:
        """Fill timestamps that ``_repair_ts`` invalidated from the entity's fallback.

        Only values that were present but invalid are filled, never values that were null at
        the source: a fallback repairs a known-bad value, it does not invent missing data.
        """
        for name, fallback in _TS_FALLBACK[entity].items():
            if not invalid[name].any():
                continue
            if fallback == "first_interaction":
                if first_seen is None:
                    raise ValueError("the users fallback needs first interactions")
                source = frame["user_id"].map(first_seen)
            else:
                source = frame[fallback]
            fill = invalid[name] & source.notna()
            frame.loc[fill, name] = source[fill]
            c.add(f"ts_fallback.{name}", fill.sum())
        return frame

    # -- outliers --------------------------------------------------------------------------

    def _clip_prices(self, items: pd.DataFrame, c: _Counts) -> pd.DataFrame:
        price = items["price"]
        negative = price < 0
        c.add("price_negative", negative.sum())
        price = price.mask(negative, np.nan if self.negative_price == "null" else 0.0)
        bound = _upper_bound(
            price[price >= 0], self.price_clip_quantile, self.price_clip_factor, self.price_max
        )
        above = price > bound
        c.add("price_clipped", above.sum())
        items["price"] = price.mask(above, bound)
        return items

    def _clip_interaction_values(self, frame: pd.DataFrame, c: _Counts) -> pd.DataFrame:
        value = frame["value"]
        negative = value < 0
        c.add("value_negative", negative.sum())
        missing = value.isna()
        c.add("value_null_filled", missing.sum())
        value = value.mask(negative | missing, 0.0)
        bound = _upper_bound(
            value[value > 0], self.value_clip_quantile, self.value_clip_factor, self.value_max
        )
        above = value > bound
        c.add("value_clipped", above.sum())
        frame["value"] = value.mask(above, bound)

        quantity = frame["quantity"]
        bad = quantity.isna() | (quantity <= 0)
        c.add("quantity_fixed", bad.sum())
        frame["quantity"] = quantity.mask(bad, 1)
        return frame

    # -- de-duplication and drops ----------------------------------------------------------

    def _finish_entity(self, frame: pd.DataFrame, entity: str, c: _Counts) -> pd.DataFrame:
        frame = _drop_duplicates(frame, entity, c)
        return _drop_missing_required(frame, entity, c)

    def _finish_interactions(
        self, frame: pd.DataFrame, items: pd.DataFrame, c: _Counts
    ) -> pd.DataFrame:
        frame = _drop_duplicates(frame, "interactions", c)
        frame = _drop_counted(frame, _duplicate_events(frame), c, "duplicate_events")
        frame = _drop_counted(
            frame, _matomo_copies_of_business_orders(frame), c, "duplicate_purchases"
        )
        frame = _drop_missing_required(frame, "interactions", c)
        unknown = ~frame["event"].isin(list(schema.EVENTS))
        frame = _drop_counted(frame, unknown, c, "unknown_event")
        orphan = frame["item_id"].notna() & ~frame["item_id"].isin(items["item_id"].dropna())
        return _drop_counted(frame, orphan, c, "orphan_item")


# -- helpers (vectorised; the only Python-level loops run over unique tag strings) -----------


def _arrow_strings(series: pd.Series) -> pa.Array:
    """``series`` as an Arrow string array: Arrow's string kernels are an order of magnitude
    faster than pandas' per-object loops on millions of rows."""
    if not isinstance(series.dtype, pd.StringDtype):
        series = series.astype("string")
    return pa.array(series.array, type=pa.string())


def _from_arrow(array: pa.Array, index: pd.Index) -> pd.Series:
    return pd.Series(array.to_numpy(zero_copy_only=False), index=index).astype("string")


def _textual_null(strings: pd.Series) -> pd.Series:
    """True where a (stripped) string is a blank or a spelled-out null."""
    array = pc.utf8_lower(pc.utf8_trim_whitespace(_arrow_strings(strings)))
    nullish = pc.fill_null(pc.is_in(array, value_set=_TEXTUAL_NULL_SET), False)
    return pd.Series(nullish.to_numpy(zero_copy_only=False), index=strings.index)


def _coerce_numeric(series: pd.Series, *, integer: bool) -> tuple[pd.Series, int]:
    """``series`` as float64 (or Int64 when ``integer``) and the count of failed values."""
    if pd.api.types.is_bool_dtype(series):
        series = series.astype("Int64")
    if pd.api.types.is_numeric_dtype(series):
        present = series.notna()
        numbers = series
    else:
        as_text = series.astype("string").str.strip()
        present = series.notna() & ~_textual_null(as_text)
        numbers = pd.to_numeric(as_text.mask(~present), errors="coerce")
    if integer:
        as_float = numbers.astype("float64")
        whole = as_float.notna() & np.isfinite(as_float) & (as_float == np.floor(as_float))
        if pd.api.types.is_integer_dtype(numbers):
            result = numbers.astype("Int64")
        else:
            # A fractional id is a mapping error, not an id to round.
            result = as_float.where(whole).astype("Int64")
    else:
        result = numbers.astype("float64")
        result = result.where(np.isfinite(result))
    failed = int((present & result.isna()).sum())
    return result, failed


def _coerce_bool(series: pd.Series) -> tuple[pd.Series, int]:
    """``series`` as a nullable boolean and the count of values that are not booleans."""
    if pd.api.types.is_bool_dtype(series):
        return series.astype("boolean"), 0
    text = series.astype("string").str.strip().str.lower()
    # 1.0 from a float column reads as "1.0"; treat whole numbers like their integer text.
    text = text.str.replace(r"^(-?\d+)\.0+$", r"\1", regex=True)
    present = series.notna() & ~_textual_null(text)
    result = pd.Series(pd.NA, index=series.index, dtype="boolean")
    result[text.isin(_TRUE).fillna(False).astype(bool)] = True
    result[text.isin(_FALSE).fillna(False).astype(bool)] = False
    failed = int((present & result.isna()).sum())
    return result, failed


def _normalise_strings(series: pd.Series, style: str) -> tuple[pd.Series, int]:
    """Normalised strings (blank -> null) and the count of values that changed."""
    converted = 0
    if style == "hex" and series.dtype == object:
        # Matomo's idvisitor is BINARY(8); a raw value is a representation change, counted.
        is_bytes = series.map(lambda v: isinstance(v, bytes | bytearray))
        converted = int(is_bytes.sum())
        series = series.mask(is_bytes, series[is_bytes].map(lambda v: v.hex()))
    original = _arrow_strings(series)
    if original.null_count == len(original):
        return pd.Series(pd.NA, index=series.index, dtype="string"), 0
    text = pc.utf8_trim_whitespace(original)
    if style in ("text", "token"):
        text = pc.replace_substring_regex(text, pattern=r"\s+", replacement=" ")
    if style in ("lower", "token", "hex"):
        text = pc.utf8_lower(text)
    if style == "token":
        text = pc.replace_substring_regex(text, pattern=r"[\s\-]+", replacement="_")
    nullish = pc.fill_null(pc.is_in(pc.utf8_lower(text), value_set=_TEXTUAL_NULL_SET), False)
    text = pc.if_else(nullish, pa.scalar(None, pa.string()), text)
    if style == "tags":
        tags = _normalise_tags(_from_arrow(text, series.index))
        text = pa.array(tags.array, type=pa.string())
    changed = pc.or_(
        pc.and_(pc.is_valid(original), pc.is_null(text)),
        pc.fill_null(pc.not_equal(original, text), False),
    )
    n_changed = int(pc.sum(changed).as_py() or 0) + converted
    if n_changed == 0:
        # Converting back to Python strings is the expensive step; clean columns skip it.
        return series if isinstance(series.dtype, pd.StringDtype) else series.astype("string"), 0
    return _from_arrow(text, series.index), n_changed


def _normalise_tags(text: pd.Series) -> pd.Series:
    def one(value: str) -> str:
        seen: dict[str, None] = {}
        for raw in _TAG_SPLIT.split(value):
            tag = _WHITESPACE.sub(" ", raw).strip().lower()
            if tag:
                seen[tag] = None
        return ",".join(seen)

    uniques = text.dropna().unique()
    mapping = {value: one(value) for value in uniques}
    tags = text.map(mapping).astype("string")
    return tags.mask(tags == "")  # only separators: no tags at all


def _parse_timestamps(
    series: pd.Series, zones: Callable[[], pd.Series]
) -> tuple[pd.Series, int, int, pd.Series]:
    """Parse to UTC: (timestamps, failed count, naive values localised, zero-date mask).

    Naive values are read in their row's zone. Zero dates and unparseable values become NaT;
    zero dates are reported separately because they are a source convention, not garbage.
    """
    no_zero = pd.Series(False, index=series.index)
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        return series.dt.tz_convert("UTC"), 0, 0, no_zero
    if pd.api.types.is_datetime64_dtype(series):
        naive = series.notna()
        return _localise(series, naive, zones()), 0, int(naive.sum()), no_zero
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        # Epoch seconds (SQLite and some exports store time as a number); never naive.
        parsed = pd.to_datetime(series, unit="s", utc=True, errors="coerce")
        return parsed, int((series.notna() & parsed.isna()).sum()), 0, no_zero

    # Object or string: python datetimes and strings, possibly a mix of naive and aware.
    text = series.astype("string").str.strip()
    present = series.notna() & ~_textual_null(text)
    zero = present & text.str.contains(_ZERO_DATE, regex=True).fillna(False).astype(bool)
    candidates = text.where(present & ~zero)
    parsed = pd.to_datetime(candidates, utc=True, errors="coerce", format="ISO8601")
    retry = candidates.notna() & parsed.isna()
    if retry.any():
        # Non-ISO spellings ("01/02/2024 10:00") need the slow per-value parser; only the
        # values the fast parser rejected pay for it.
        parsed[retry] = pd.to_datetime(candidates[retry], utc=True, errors="coerce", format="mixed")
    aware = text.str.contains(_OFFSET_SUFFIX, regex=True).fillna(False).astype(bool)
    naive = parsed.notna() & ~aware
    # Parsing with utc=True read naive values as UTC wall time; re-read them in their zone.
    parsed = _localise(parsed.dt.tz_localize(None), naive, zones()).where(naive, parsed)
    failed = int((candidates.notna() & parsed.isna()).sum())
    return parsed, failed, int(naive.sum()), zero


def _localise(wall: pd.Series, naive: pd.Series, zones: pd.Series) -> pd.Series:
    """Naive wall times (datetime64[ns]) read in ``zones`` -> UTC; other rows NaT."""
    out = pd.Series(pd.NaT, index=wall.index, dtype=schema.UTC_TS)
    for zone in zones[naive].unique():
        rows = naive & (zones == zone)
        values = wall[rows]
        if zone == "UTC":
            out[rows] = values.dt.tz_localize("UTC")
            continue
        # In the repeated hour of a DST change, take standard time: a fixed, documented
        # choice beats dropping the row; a skipped hour moves forward to the valid time.
        out[rows] = values.dt.tz_localize(
            zone, ambiguous=np.zeros(len(values), dtype=bool), nonexistent="shift_forward"
        ).dt.tz_convert("UTC")
    return out


def _upper_bound(
    values: pd.Series, quantile: float, factor: float, absolute: float | None
) -> float:
    bound = np.inf if absolute is None else float(absolute)
    if len(values):
        q = float(values.quantile(quantile))
        if q > 0:
            bound = min(bound, factor * q)
    return bound


def _drop_counted(frame: pd.DataFrame, mask: pd.Series, c: _Counts, rule: str) -> pd.DataFrame:
    mask = mask.reindex(frame.index, fill_value=False).fillna(False).astype(bool)
    dropped = int(mask.sum())
    c.add(rule, dropped)
    # Filtering copies every column; clean data (the usual case) skips the copy.
    return frame.loc[~mask] if dropped else frame


def _drop_duplicates(frame: pd.DataFrame, entity: str, c: _Counts) -> pd.DataFrame:
    """Drop exact duplicate rows, then duplicate primary keys (latest ``updated_at`` wins)."""
    keys = list(schema.PRIMARY_KEYS[entity])
    # Exact duplicates and key duplicates both repeat the key (a null key repeats as null), so
    # only those rows are hashed in full: hashing every column of millions of rows is slow.
    suspects = frame.loc[frame.duplicated(subset=keys, keep=False)]
    exact = suspects.duplicated()
    frame = _drop_counted(frame, exact, c, "duplicate_rows")
    suspects = suspects.loc[~exact]
    if "updated_at" in suspects.columns:
        # Stable sort so that, among equal updated_at, the row delivered last still wins;
        # NaT sorts first so a dated version beats an undated one.
        suspects = suspects.sort_values("updated_at", kind="stable", na_position="first")
    has_key = suspects[keys].notna().all(axis=1)
    # Rows without a key are not versions of one another; missing_required drops them.
    duplicated = suspects.duplicated(subset=keys, keep="last") & has_key
    return _drop_counted(frame, duplicated, c, "duplicate_keys")


def _duplicate_events(frame: pd.DataFrame) -> pd.Series:
    """Rows repeating an earlier row's (user_id, visitor_id, item_id, event, ts, session_id)."""
    # Pre-filter on the numeric part of the key (cheap to hash); only rows that repeat it can
    # repeat the whole key, and they are few.
    suspects = frame.loc[frame.duplicated(subset=["user_id", "item_id", "ts"], keep=False)]
    return suspects.duplicated(subset=list(_EVENT_KEY))


def _drop_missing_required(frame: pd.DataFrame, entity: str, c: _Counts) -> pd.DataFrame:
    already = pd.Series(False, index=frame.index)
    for name in schema.REQUIRED[entity]:
        missing = frame[name].isna() & ~already
        c.add(f"missing_required.{name}", missing.sum())
        already |= missing
    return frame.loc[~already]


def _matomo_copies_of_business_orders(frame: pd.DataFrame) -> pd.Series:
    purchase = (frame["event"] == "purchase").fillna(False) & frame["order_id"].notna()
    business = purchase & (frame["source"] == "business").fillna(False)
    matomo = purchase & (frame["source"] == "matomo").fillna(False)
    if not business.any() or not matomo.any():
        return pd.Series(False, index=frame.index[:0])
    keys = ["order_id", "item_id"]
    business_keys = pd.MultiIndex.from_frame(frame.loc[business, keys])
    candidate_keys = pd.MultiIndex.from_frame(frame.loc[matomo, keys])
    return pd.Series(candidate_keys.isin(business_keys), index=frame.index[matomo])
