"""Canonical entities: the column sets every stage after extraction agrees on. Pure core.

Timestamps are timezone-aware UTC (``datetime64[ns, UTC]``). Ids of business entities are
integers; an interaction of an anonymous Matomo visitor has a null ``user_id`` and a
``visitor_id``. Tags are one lower-case string with tags separated by ``,``.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

UTC_TS = "datetime64[ns, UTC]"

USERS: Mapping[str, str] = {
    "user_id": "int64",
    "username": "string",
    "company": "string",
    "industry": "string",
    "province": "string",
    "city": "string",
    "created_at": UTC_TS,
}

ITEMS: Mapping[str, str] = {
    "item_id": "int64",
    "title": "string",
    "description": "string",
    "tags": "string",
    "category": "string",
    "price": "float64",
    "company": "string",
    "created_at": UTC_TS,
    "updated_at": UTC_TS,
    "is_active": "bool",
}

INTERACTIONS: Mapping[str, str] = {
    "user_id": "Int64",  # null for anonymous visitors
    "visitor_id": "string",  # Matomo visitor id (16 hex chars); null for business rows
    "item_id": "Int64",  # null for events without an item (site search)
    "event": "string",
    "ts": UTC_TS,
    "value": "float64",  # revenue of purchases, 0 otherwise
    "quantity": "int64",
    "source": "string",  # "business" or "matomo"
    "session_id": "string",  # "m<idvisit>" for Matomo rows
    "order_id": "string",
    "query": "string",  # site-search keyword
    "ref": "string",  # key of the source row, e.g. "matomo.log_link_visit_action:123"
}

EXPOSURES: Mapping[str, str] = {
    "request_id": "string",
    "user_id": "Int64",
    "item_id": "int64",
    "position": "int64",
    "scene": "string",
    "variant": "string",
    "model_version": "string",
    "channel": "string",
    "degraded": "bool",
    "ts": UTC_TS,
}

# Canonical events and the strength of the signal each carries (used as default label weights).
EVENTS: Mapping[str, float] = {
    "view": 0.0,
    "detail_view": 1.0,
    "search": 0.0,
    "search_click": 1.0,
    "favorite": 2.0,
    "sample_download": 2.0,
    "add_to_cart": 3.0,
    "task": 3.0,
    "purchase": 5.0,
}

ENTITIES: Mapping[str, Mapping[str, str]] = {
    "users": USERS,
    "items": ITEMS,
    "interactions": INTERACTIONS,
}

# The columns that must never be null, per entity (checked by quality, enforced by clean).
REQUIRED: Mapping[str, tuple[str, ...]] = {
    "users": ("user_id", "created_at"),
    "items": ("item_id", "title", "price", "created_at"),
    "interactions": ("event", "ts", "source"),
}

PRIMARY_KEYS: Mapping[str, tuple[str, ...]] = {
    "users": ("user_id",),
    "items": ("item_id",),
    "interactions": ("ref",),
}


def empty_frame(columns: Mapping[str, str]) -> pd.DataFrame:
    """An empty frame with exactly the canonical columns and dtypes."""
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns.items()})


def conform(df: pd.DataFrame, columns: Mapping[str, str]) -> pd.DataFrame:
    """Return ``df`` with exactly the canonical columns, in order, cast to canonical dtypes.

    Missing columns are added as nulls. Casting is strict: a value that cannot be represented
    raises, because silently coercing would hide a mapping bug (clean.py coerces on purpose).
    """
    out = {}
    for name, dtype in columns.items():
        if name in df.columns:
            series = df[name]
        else:
            series = pd.Series(pd.NA, index=df.index, dtype="object")
        if dtype == UTC_TS:
            series = pd.to_datetime(series, utc=True)
        elif dtype == "bool":
            series = series.fillna(False).astype(bool)
        else:
            series = series.astype(dtype)
        out[name] = series
    return pd.DataFrame(out, index=df.index).reset_index(drop=True)
