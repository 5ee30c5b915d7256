"""Ranking features: a documented catalogue and a point-in-time ``FeatureBuilder``. Pure core.

The catalogue (``catalogue()``) is the single source of truth for the ranker's input: every
column of the matrix that ``FeatureBuilder.transform_pairs`` returns is one ``FeatureSpec``, in
catalogue order, and ``feature_schema()`` is what a model bundle records and the promotion gate
compares. Four entities:

- ``user``: behaviour counts by event group and window, recency, frequency, spend, price
  preferences, category/tag diversity, ratios, tenure;
- ``item``: popularity by window, trend, smoothed conversion rates, revenue, price and price
  band, age and freshness, text statistics, category code, active flag;
- ``user_item``: cross features of a candidate pair (category/company/tag affinity, price
  distance, repeat signals, co-visitation with the user's recent items) and the recall scores
  and ranks that the caller passes in (``recall_score_<channel>``, ``recall_rank_<channel>``);
- ``context``: hour, day of week and weekend flag of the request time, scene code.

Point in time: ``FeatureBuilder(cutoff=T).fit(...)`` learns only from interactions with
``ts < T``; windows are measured back from ``T``. Features that are a number of days since
something (``relative_to_now`` in the catalogue) are advanced to the request time ``now`` at
transform time, so a model trained with ``now == T`` sees the same meaning online a few hours
later. User and item *attributes* (signup date, price, tags, ``is_active``) come from the
snapshot tables as given: the platform keeps no history of them.

Unknown users and items get the catalogue's defaults (0, or ``NEVER_DAYS`` for "days since"
features), so the matrix is always finite.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp

from apps.pipeline import schema
from apps.pipeline.train.base import TrainingSet

Entity = Literal["user", "item", "user_item", "context"]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# "Days since" for something that never happened; also the cap of every "days since" feature,
# so a ten-year-old item and a never-seen user do not stretch the ranker's split points.
NEVER_DAYS = 3650.0
# Rank given to a candidate that a recall channel did not return.
MISSING_RANK = 1000.0
# Floor of a user's log-price spread in the price distance (log units; 0.25 ~ a 28 % price
# step), so that a user who bought at one price does not make every other price "infinitely" far.
PRICE_STD_FLOOR = 0.25

RECALL_CHANNELS: tuple[str, ...] = (
    "itemcf",
    "usercf",
    "content",
    "semantic",
    "vector",
    "tag",
    "category",
    "price_band",
    "popular",
    "trending",
    "ease",
)
# Code 0 is "unknown"; append new scenes at the end so existing codes keep their meaning.
SCENES: tuple[str, ...] = (
    "unknown",
    "for_you",
    "similar",
    "detail",
    "popular",
    "trending",
    "search",
    "cart",
    "home",
)
SCENE_CODES: Mapping[str, int] = {name: code for code, name in enumerate(SCENES)}

WINDOWS: tuple[tuple[str, float | None], ...] = (
    ("1d", 1.0),
    ("7d", 7.0),
    ("30d", 30.0),
    ("all", None),
)
# Event groups counted per user. ``task`` (an API task run on a dataset) is engagement, not a
# sale: it carries no revenue in the source.
EVENT_GROUPS: Mapping[str, tuple[str, ...]] = {
    "views": ("view", "detail_view"),
    "searches": ("search", "search_click"),
    "engagements": ("favorite", "sample_download", "task"),
    "carts": ("add_to_cart",),
    "purchases": ("purchase",),
}
_GROUP_INDEX = {name: k for k, name in enumerate(EVENT_GROUPS)}

_DAY_NS = 86_400 * 10**9
_NO_ID = np.iinfo(np.int64).min


@dataclass(frozen=True)
class FeatureSpec:
    """One documented feature: a column of the ranker's matrix.

    ``dtype`` is the logical type (the matrix itself is float32 throughout); ``default`` is the
    value for an unknown user/item/pair; ``relative_to_now`` marks "days since" features that
    are advanced from the cutoff to the request time; ``categorical`` marks codes.
    """

    name: str
    entity: Entity
    definition: str
    dtype: Literal["float32", "int32"] = "float32"
    default: float = 0.0
    relative_to_now: bool = False
    categorical: bool = False


def _build_catalogue() -> tuple[FeatureSpec, ...]:
    specs: list[FeatureSpec] = []

    def add(name: str, entity: Entity, definition: str, **kw: Any) -> None:
        specs.append(FeatureSpec(name, entity, definition, **kw))

    # --- user ---------------------------------------------------------------------------------
    for window, days in WINDOWS:
        span = "all events before the cutoff" if days is None else f"the {window} before the cutoff"
        add(
            f"user_events_{window}",
            "user",
            f"Number of events of the user in {span}.",
            dtype="int32",
        )
        for group, events in EVENT_GROUPS.items():
            add(
                f"user_{group}_{window}",
                "user",
                f"Number of {'/'.join(events)} events of the user in {span}.",
                dtype="int32",
            )
    add(
        "user_weighted_events_30d",
        "user",
        "Sum of event strengths (1 + signal weight) of the user's events in the 30d before the cutoff.",
    )
    add(
        "user_days_since_last_event",
        "user",
        "Days from the user's latest event to the request time (NEVER_DAYS if none).",
        default=NEVER_DAYS,
        relative_to_now=True,
    )
    add(
        "user_days_since_last_purchase",
        "user",
        "Days from the user's latest purchase to the request time (NEVER_DAYS if none).",
        default=NEVER_DAYS,
        relative_to_now=True,
    )
    add(
        "user_days_since_first_event",
        "user",
        "Days from the user's first event to the request time (0 if none): length of the history.",
        relative_to_now=True,
    )
    add(
        "user_active_days_30d",
        "user",
        "Distinct UTC calendar days with an event in the 30d before the cutoff.",
        dtype="int32",
    )
    add(
        "user_active_days_all",
        "user",
        "Distinct UTC calendar days with an event before the cutoff.",
        dtype="int32",
    )
    add(
        "user_sessions_30d",
        "user",
        "Distinct sessions in the 30d before the cutoff (a row without session_id counts its user-day as one session).",
        dtype="int32",
    )
    add("user_sessions_all", "user", "Distinct sessions before the cutoff.", dtype="int32")
    add(
        "user_events_per_session",
        "user",
        "user_events_all / user_sessions_all (0 without sessions).",
    )
    add(
        "user_purchase_value_sum",
        "user",
        "Sum of purchase values (revenue) of the user before the cutoff.",
    )
    add(
        "user_purchase_value_mean", "user", "Mean purchase value of the user (0 without purchases)."
    )
    add("user_purchase_value_max", "user", "Largest single purchase value of the user.")
    add(
        "user_price_mean",
        "user",
        "Mean price of the items the user interacted with, weighted by event strength (1 + signal weight).",
    )
    add(
        "user_price_median",
        "user",
        "Weighted (lower) median price of the items the user interacted with.",
    )
    add(
        "user_price_std",
        "user",
        "Weighted standard deviation of the prices of the items the user interacted with.",
    )
    add(
        "user_log_price_mean",
        "user",
        "Weighted mean of log1p(price) of the items the user interacted with.",
    )
    add(
        "user_log_price_std",
        "user",
        "Weighted standard deviation of log1p(price) of the items the user interacted with.",
    )
    add("user_distinct_items", "user", "Distinct items the user interacted with.", dtype="int32")
    add(
        "user_repeat_ratio",
        "user",
        "1 - distinct items / events with an item: how much the user returns to the same items.",
    )
    add(
        "user_distinct_categories",
        "user",
        "Distinct item categories the user interacted with.",
        dtype="int32",
    )
    add(
        "user_category_entropy",
        "user",
        "Shannon entropy (nats) of the user's strength-weighted category shares: diversity of interest.",
    )
    add(
        "user_top_category_share",
        "user",
        "Share of the user's strength-weighted events that fall in their most frequent category.",
    )
    add(
        "user_distinct_tags",
        "user",
        "Distinct tags over the items the user interacted with.",
        dtype="int32",
    )
    add(
        "user_tag_entropy",
        "user",
        "Shannon entropy (nats) of the user's strength-weighted tag profile.",
    )
    add("user_purchase_view_ratio", "user", "user_purchases_all / max(user_views_all, 1).")
    add("user_cart_view_ratio", "user", "user_carts_all / max(user_views_all, 1).")
    add(
        "user_days_since_signup",
        "user",
        "Days from the user's created_at to the request time (0 if unknown or later).",
        relative_to_now=True,
    )

    # --- item ---------------------------------------------------------------------------------
    for window, days in WINDOWS:
        span = "before the cutoff" if days is None else f"in the {window} before the cutoff"
        add(
            f"item_events_{window}",
            "item",
            f"Events on the item {span} (visitors included).",
            dtype="int32",
        )
        add(
            f"item_users_{window}",
            "item",
            f"Distinct users or anonymous visitors with an event on the item {span}.",
            dtype="int32",
        )
    add(
        "item_views_30d",
        "item",
        "view/detail_view events on the item in the 30d before the cutoff.",
        dtype="int32",
    )
    add(
        "item_carts_30d",
        "item",
        "add_to_cart events on the item in the 30d before the cutoff.",
        dtype="int32",
    )
    add(
        "item_purchases_30d",
        "item",
        "purchase events of the item in the 30d before the cutoff.",
        dtype="int32",
    )
    add(
        "item_purchases_all",
        "item",
        "purchase events of the item before the cutoff.",
        dtype="int32",
    )
    add(
        "item_trend_7d",
        "item",
        "log((events in the last 7d + 1) / (events in the 7d before those + 1)).",
    )
    add(
        "item_weighted_popularity_30d",
        "item",
        "Sum of event strengths on the item in the 30d before the cutoff.",
    )
    add(
        "item_view_to_cart_rate",
        "item",
        "Smoothed (carts + a*p) / (views + a), p the global rate, a = smoothing; clipped to [0, 1].",
    )
    add(
        "item_cart_to_order_rate",
        "item",
        "Smoothed (purchases + a*p) / (carts + a); clipped to [0, 1].",
    )
    add(
        "item_view_to_order_rate",
        "item",
        "Smoothed (purchases + a*p) / (views + a); clipped to [0, 1].",
    )
    add("item_revenue_all", "item", "Sum of purchase values of the item before the cutoff.")
    add(
        "item_revenue_30d",
        "item",
        "Sum of purchase values of the item in the 30d before the cutoff.",
    )
    add(
        "item_days_since_last_event",
        "item",
        "Days from the item's latest event to the request time (NEVER_DAYS if none).",
        default=NEVER_DAYS,
        relative_to_now=True,
    )
    add("item_price", "item", "Item price (0 if unknown).")
    add("item_log_price", "item", "log1p(item price).")
    add(
        "item_price_band",
        "item",
        "Price quantile bucket 0..price_bands-1, edges learned over the item table at fit time.",
        dtype="int32",
    )
    add(
        "item_log_price_vs_category",
        "item",
        "log1p(price) minus the median log1p(price) of the item's category.",
    )
    add(
        "item_age_days",
        "item",
        "Days from the item's created_at to the request time.",
        relative_to_now=True,
    )
    add(
        "item_days_since_update",
        "item",
        "Days from the item's updated_at to the request time.",
        relative_to_now=True,
    )
    add("item_title_length", "item", "Characters in the title.", dtype="int32")
    add("item_description_length", "item", "Characters in the description.", dtype="int32")
    add("item_tag_count", "item", "Number of distinct tags of the item.", dtype="int32")
    add(
        "item_category_code",
        "item",
        "Ordinal code of the category learned at fit time (1..K by sorted name; 0 unknown).",
        dtype="int32",
        categorical=True,
    )
    add("item_is_active", "item", "1 if the item is active (for sale), else 0.", dtype="int32")
    add(
        "item_category_popularity_30d",
        "item",
        "Share of all item events in the 30d before the cutoff that fall in the item's category.",
    )

    # --- user x item --------------------------------------------------------------------------
    add(
        "ui_category_affinity",
        "user_item",
        "Share of the user's strength-weighted events (on items with a category) in the item's category.",
    )
    add(
        "ui_industry_match",
        "user_item",
        "1 if the user's declared industry equals the item's category (case-insensitive).",
        dtype="int32",
    )
    add(
        "ui_company_affinity",
        "user_item",
        "Share of the user's strength-weighted events on items of the item's company (provider).",
    )
    add(
        "ui_tag_jaccard",
        "user_item",
        "Jaccard index between the set of tags in the user's profile and the item's tags.",
    )
    add(
        "ui_tag_affinity",
        "user_item",
        "Share of the user's strength-weighted tag profile that falls on the item's tags.",
    )
    add(
        "ui_tag_overlap",
        "user_item",
        "Number of the item's tags present in the user's tag profile.",
        dtype="int32",
    )
    add(
        "ui_price_distance",
        "user_item",
        f"|log1p(item price) - user_log_price_mean| / max(user_log_price_std, {PRICE_STD_FLOOR}) (0 without price history).",
    )
    add(
        "ui_log_price_diff",
        "user_item",
        "log1p(item price) - user_log_price_mean (signed; 0 without price history).",
    )
    add(
        "ui_past_interactions",
        "user_item",
        "Events of the user on this item before the cutoff (repeat signal).",
        dtype="int32",
    )
    add(
        "ui_past_weight",
        "user_item",
        "Sum of event strengths of the user on this item before the cutoff.",
    )
    add(
        "ui_past_purchases",
        "user_item",
        "Purchases of this item by the user before the cutoff.",
        dtype="int32",
    )
    add(
        "ui_days_since_last_interaction",
        "user_item",
        "Days from the user's latest event on this item to the request time (NEVER_DAYS if none).",
        default=NEVER_DAYS,
        relative_to_now=True,
    )
    add(
        "ui_covisit_score",
        "user_item",
        "Sum over the user's recent_n most recent distinct items j of cos(j, item): co-session count / sqrt(sessions(j) * sessions(item)), each j keeping its covisit_top_k neighbours.",
    )
    add(
        "ui_covisit_max",
        "user_item",
        "Largest single cos(j, item) over the user's recent items (see ui_covisit_score).",
    )
    for channel in RECALL_CHANNELS:
        add(
            f"recall_score_{channel}",
            "user_item",
            f"Score given by the {channel} recall channel (filled by the caller; 0 if not recalled).",
        )
        add(
            f"recall_rank_{channel}",
            "user_item",
            f"1-based rank in the {channel} recall list (filled by the caller; MISSING_RANK if not recalled).",
            default=MISSING_RANK,
        )
    for channel in RECALL_CHANNELS:
        add(
            f"recall_norm_{channel}",
            "user_item",
            f"recall_score_{channel} divided by the largest {channel} score among the same user's candidates in the call (0 if not recalled): comparable across users and across models fitted on more or less history.",
        )
    add(
        "recall_fused_rank",
        "user_item",
        "1-based position in the fused candidate list the ranker re-orders (filled by the caller from `fused_rank`; MISSING_RANK if absent).",
        default=MISSING_RANK,
    )
    add(
        "recall_channels_hit",
        "user_item",
        "Number of recall channels that returned the item.",
        dtype="int32",
    )
    add(
        "recall_best_rank",
        "user_item",
        "Best (smallest) rank over the recall channels (MISSING_RANK if none).",
        default=MISSING_RANK,
    )

    # --- context ------------------------------------------------------------------------------
    add(
        "ctx_hour",
        "context",
        "Hour of day (0-23) of the request time in the builder's timezone.",
        dtype="int32",
    )
    add("ctx_day_of_week", "context", "Day of week of the request time, Monday = 0.", dtype="int32")
    add("ctx_is_weekend", "context", "1 on Saturday and Sunday.", dtype="int32")
    add(
        "ctx_scene_code",
        "context",
        "Code of the request scene (features.SCENES; 0 unknown).",
        dtype="int32",
        categorical=True,
    )
    return tuple(specs)


_CATALOGUE: tuple[FeatureSpec, ...] = _build_catalogue()
FEATURE_NAMES: tuple[str, ...] = tuple(spec.name for spec in _CATALOGUE)
_POSITION: Mapping[str, int] = {name: k for k, name in enumerate(FEATURE_NAMES)}


def catalogue() -> list[FeatureSpec]:
    """Every feature, in matrix column order."""
    return list(_CATALOGUE)


def catalogue_frame() -> pd.DataFrame:
    """The catalogue as a table (for the admin and the docs)."""
    return pd.DataFrame([asdict(spec) for spec in _CATALOGUE])


def feature_names(entity: Entity | None = None) -> list[str]:
    """Names in catalogue order, optionally of one entity only."""
    return [s.name for s in _CATALOGUE if entity is None or s.entity == entity]


def default_vector(entity: Entity | None = None) -> npt.NDArray[np.float32]:
    """The default values (unknown user/item/pair) in catalogue order."""
    return np.array(
        [s.default for s in _CATALOGUE if entity is None or s.entity == entity], dtype=np.float32
    )


def feature_schema() -> list[dict[str, str]]:
    """Ordered ``[{"name", "dtype"}]`` of the matrix; JSON round-trips to an equal value."""
    return [{"name": s.name, "dtype": s.dtype} for s in _CATALOGUE]


def feature_schema_hash() -> str:
    """sha256 of ``feature_schema()``: a short token for "same columns, same order"."""
    text = json.dumps(feature_schema(), separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class FeatureTables:
    """User and item feature tables as of ``cutoff`` (index = id, float32 catalogue columns)."""

    user: pd.DataFrame
    item: pd.DataFrame
    cutoff: pd.Timestamp

    def frame(self, entity: Literal["user", "item"]) -> pd.DataFrame:
        """The table of ``entity``."""
        return self.user if entity == "user" else self.item


class FeatureBuilder:
    """Learns user/item tables and cross-feature state before ``cutoff``; builds pair matrices.

    Parameters (scikit-learn style, stored as given): ``cutoff`` (None: the training set's
    cutoff, or one second after the newest event of plain frames), ``recent_n`` (recent items
    per user for co-visitation), ``covisit_top_k`` (neighbours kept per item), ``session_cap``
    (most recent distinct items per session used for co-visitation; bounds the quadratic
    pair count), ``smoothing`` (pseudo-count of the conversion rates), ``price_bands``,
    ``timezone`` (of the context features), ``weights`` (event -> signal strength; None: the
    training set's or ``schema.EVENTS``), ``chunk_size`` (pairs per sparse batch).
    """

    def __init__(
        self,
        cutoff: pd.Timestamp | str | None = None,
        *,
        recent_n: int = 20,
        covisit_top_k: int = 100,
        session_cap: int = 30,
        smoothing: float = 20.0,
        price_bands: int = 10,
        timezone: str = "UTC",
        weights: Mapping[str, float] | None = None,
        chunk_size: int = 65_536,
    ) -> None:
        self.cutoff = cutoff
        self.recent_n = recent_n
        self.covisit_top_k = covisit_top_k
        self.session_cap = session_cap
        self.smoothing = smoothing
        self.price_bands = price_bands
        self.timezone = timezone
        self.weights = weights
        self.chunk_size = chunk_size

    # ------------------------------------------------------------------------------ fit

    def fit(self, data: TrainingSet | Mapping[str, pd.DataFrame]) -> Self:
        """Learn every table from interactions with ``ts < cutoff`` only; returns self."""
        self._validate_params()
        inter, items, users, cutoff, weights = self._inputs(data)
        self.cutoff_ = cutoff
        row_users, row_items = _ids(inter["user_id"]), _ids(inter["item_id"])
        self.user_ids_ = _id_universe(users["user_id"], row_users)
        self.item_ids_ = _id_universe(items["item_id"], row_items)
        ev = _Events.build(
            inter,
            u=_lookup(self.user_ids_, row_users),
            i=_lookup(self.item_ids_, row_items),
            n_users=len(self.user_ids_),
            n_items=len(self.item_ids_),
            cutoff=cutoff,
            weights=weights,
        )
        pairs = ev.subset((ev.u >= 0) & (ev.i >= 0))  # rows with a known user and item
        item_table = _aligned(items, "item_id", self.item_ids_)
        user_table = _aligned(users, "user_id", self.user_ids_)
        item_price, item_category = self._fit_vocabularies(item_table, user_table)
        user_columns = self._fit_users(ev, pairs, user_table, item_price, item_category)
        item_columns = self._fit_items(ev, item_table, item_price, item_category)
        self.recent_items_ = _recent_items(pairs, self.recent_n)
        self.covisit_ = _covisitation(ev, session_cap=self.session_cap, top_k=self.covisit_top_k)
        self.user_features_ = _table(user_columns, "user", self.user_ids_, "user_id")
        self.item_features_ = _table(item_columns, "item", self.item_ids_, "item_id")
        self._prepare()
        return self

    def _fit_vocabularies(
        self, item_table: pd.DataFrame, user_table: pd.DataFrame
    ) -> tuple[FloatArray, IntArray]:
        """Learn category/company/tag vocabularies; return item prices and category codes."""
        category_key = _normalised(_column(item_table, "category"))
        self.categories_ = _vocabulary(category_key)
        item_category = _codes(self.categories_, category_key)
        company_key = _normalised(_column(item_table, "company"))
        self.companies_ = _vocabulary(company_key)
        self.item_company_code_ = _codes(self.companies_, company_key)
        # A user's declared industry is compared with item categories, so it uses their codes.
        self.user_industry_code_ = _codes(
            self.categories_, _normalised(_column(user_table, "industry"))
        )
        self.item_tags_, self.tags_ = _tag_matrix(_column(item_table, "tags"))
        price = _column(item_table, "price").to_numpy(dtype=np.float64, na_value=np.nan)
        # NaN marks "no price": such items stay out of price statistics instead of counting as 0.
        return np.where(np.isfinite(price), np.maximum(price, 0.0), np.nan), item_category

    def _fit_users(
        self,
        ev: _Events,
        pairs: _Events,
        user_table: pd.DataFrame,
        price: FloatArray,
        category: IntArray,
    ) -> dict[str, FloatArray]:
        n = ev.n_users
        f: dict[str, FloatArray] = {}
        known = ev.u >= 0
        for window, days in WINDOWS:
            in_window = known if days is None else known & (ev.age <= days)
            f[f"user_events_{window}"] = _count(ev.u[in_window], n)
            for name, k in _GROUP_INDEX.items():
                f[f"user_{name}_{window}"] = _count(ev.u[in_window & (ev.group == k)], n)
        recent = known & (ev.age <= 30.0)
        bought = known & ev.purchase
        f["user_weighted_events_30d"] = _count(ev.u[recent], n, ev.strength[recent])
        f["user_days_since_last_event"] = _min_by(ev.u[known], ev.age[known], n, NEVER_DAYS)
        f["user_days_since_last_purchase"] = _min_by(ev.u[bought], ev.age[bought], n, NEVER_DAYS)
        f["user_days_since_first_event"] = _max_by(ev.u[known], ev.age[known], n, 0.0)
        f["user_active_days_30d"] = _distinct(ev.u[recent], ev.day[recent], n)
        f["user_active_days_all"] = _distinct(ev.u[known], ev.day[known], n)
        f["user_sessions_30d"] = _distinct(ev.u[recent], ev.session[recent], n)
        f["user_sessions_all"] = _distinct(ev.u[known], ev.session[known], n)
        f["user_events_per_session"] = _ratio(f["user_events_all"], f["user_sessions_all"])
        spend = _count(ev.u[bought], n, ev.value[bought])
        f["user_purchase_value_sum"] = spend
        f["user_purchase_value_mean"] = _ratio(spend, f["user_purchases_all"])
        f["user_purchase_value_max"] = _max_by(ev.u[bought], ev.value[bought], n, 0.0)

        ru, ri, rw = pairs.u, pairs.i, pairs.strength
        priced = np.isfinite(price[ri])
        pu, pw, pp = ru[priced], rw[priced], price[ri][priced]
        f["user_price_mean"], f["user_price_std"] = _weighted_mean_std(pu, pp, pw, n)
        f["user_log_price_mean"], f["user_log_price_std"] = _weighted_mean_std(
            pu, np.log1p(pp), pw, n
        )
        f["user_price_median"] = _weighted_median(pu, pp, pw, n)

        # Repeat signals: one sorted table of (user, item) keys with several value columns.
        self.ui_pairs_ = _KeyedValues.build(
            ru * ev.n_items + ri,
            ev.n_items,
            {"count": np.ones(len(ru)), "weight": rw, "purchases": pairs.purchase * 1.0},
            minimum={"last_age": pairs.age},
        )
        distinct_items = _count(self.ui_pairs_.keys // ev.n_items, n)
        f["user_distinct_items"] = distinct_items
        f["user_repeat_ratio"] = np.where(
            distinct_items > 0, 1.0 - _ratio(distinct_items, _count(ru, n)), 0.0
        )

        user_category = _share_matrix(ru, category[ri], rw, n, len(self.categories_))
        self.user_category_ = _KeyedValues.from_csr(user_category)
        f["user_distinct_categories"] = np.diff(user_category.indptr).astype(np.float64)
        f["user_category_entropy"] = _row_entropy(user_category)
        f["user_top_category_share"] = _row_max(user_category)
        self.user_company_ = _KeyedValues.from_csr(
            _share_matrix(ru, self.item_company_code_[ri], rw, n, len(self.companies_))
        )

        user_item = sp.csr_matrix((rw, (ru, ri)), shape=(n, ev.n_items))
        self.user_tags_ = _row_normalise(sp.csr_matrix(user_item @ self.item_tags_))
        f["user_distinct_tags"] = np.diff(self.user_tags_.indptr).astype(np.float64)
        f["user_tag_entropy"] = _row_entropy(self.user_tags_)
        f["user_purchase_view_ratio"] = f["user_purchases_all"] / np.maximum(f["user_views_all"], 1)
        f["user_cart_view_ratio"] = f["user_carts_all"] / np.maximum(f["user_views_all"], 1)
        signup = _ns(_column(user_table, "created_at"))
        f["user_days_since_signup"] = _days_before(ev.cutoff_ns, signup)
        return f

    def _fit_items(
        self, ev: _Events, item_table: pd.DataFrame, price: FloatArray, category: IntArray
    ) -> dict[str, FloatArray]:
        n = ev.n_items
        g: dict[str, FloatArray] = {}
        known = ev.i >= 0  # anonymous visitors count too
        for window, days in WINDOWS:
            in_window = known if days is None else known & (ev.age <= days)
            g[f"item_events_{window}"] = _count(ev.i[in_window], n)
            has_actor = in_window & (ev.actor >= 0)
            g[f"item_users_{window}"] = _distinct(ev.i[has_actor], ev.actor[has_actor], n)
        recent = known & (ev.age <= 30.0)
        views = known & (ev.group == _GROUP_INDEX["views"])
        carts = known & (ev.group == _GROUP_INDEX["carts"])
        bought = known & ev.purchase
        g["item_views_30d"] = _count(ev.i[views & recent], n)
        g["item_carts_30d"] = _count(ev.i[carts & recent], n)
        g["item_purchases_30d"] = _count(ev.i[bought & recent], n)
        g["item_purchases_all"] = _count(ev.i[bought], n)
        last7 = _count(ev.i[known & (ev.age <= 7.0)], n)
        prev7 = _count(ev.i[known & (ev.age > 7.0) & (ev.age <= 14.0)], n)
        g["item_trend_7d"] = np.log((last7 + 1.0) / (prev7 + 1.0))
        g["item_weighted_popularity_30d"] = _count(ev.i[recent], n, ev.strength[recent])
        views_all, carts_all = _count(ev.i[views], n), _count(ev.i[carts], n)
        a = float(self.smoothing)
        g["item_view_to_cart_rate"] = _smoothed_rate(carts_all, views_all, a)
        g["item_cart_to_order_rate"] = _smoothed_rate(g["item_purchases_all"], carts_all, a)
        g["item_view_to_order_rate"] = _smoothed_rate(g["item_purchases_all"], views_all, a)
        g["item_revenue_all"] = _count(ev.i[bought], n, ev.value[bought])
        g["item_revenue_30d"] = _count(ev.i[bought & recent], n, ev.value[bought & recent])
        g["item_days_since_last_event"] = _min_by(ev.i[known], ev.age[known], n, NEVER_DAYS)

        has_price = np.isfinite(price)
        known_price = np.where(has_price, price, 0.0)
        log_price = np.log1p(known_price)
        g["item_price"] = known_price
        g["item_log_price"] = log_price
        self.price_band_edges_ = _band_edges(price[has_price], self.price_bands)
        bands = np.searchsorted(self.price_band_edges_, known_price, side="right")
        g["item_price_band"] = bands.astype(np.float64)
        g["item_log_price_vs_category"] = _minus_group_median(log_price, category, has_price)
        created = _ns(_column(item_table, "created_at"))
        updated = _ns(_column(item_table, "updated_at"))
        g["item_age_days"] = _days_before(ev.cutoff_ns, created)
        g["item_days_since_update"] = np.where(
            updated != _NO_ID, _days_before(ev.cutoff_ns, updated), g["item_age_days"]
        )
        g["item_title_length"] = _text_length(_column(item_table, "title"))
        g["item_description_length"] = _text_length(_column(item_table, "description"))
        g["item_tag_count"] = np.diff(self.item_tags_.indptr).astype(np.float64)
        g["item_category_code"] = category.astype(np.float64)
        g["item_is_active"] = _column(item_table, "is_active").eq(True).to_numpy(np.float64)
        per_category = np.bincount(category[ev.i[recent]], minlength=len(self.categories_) + 1)
        per_category[0] = 0  # "unknown" is not a category whose popularity means anything
        g["item_category_popularity_30d"] = _ratio(
            per_category[category], np.full(n, per_category.sum())
        )
        return g

    # ------------------------------------------------------------------------ transform

    def transform_pairs(
        self,
        pairs: pd.DataFrame | Mapping[str, Any],
        now: pd.Timestamp | str | None = None,
        *,
        scene: str | None = None,
    ) -> tuple[npt.NDArray[np.float32], list[str]]:
        """The float32 feature matrix of ``pairs`` and its column names (catalogue order).

        ``pairs`` has ``user_id`` and ``item_id``, optionally ``recall_score_<channel>`` /
        ``recall_rank_<channel>`` columns, a ``scene`` column and a ``ts`` column (request time
        per pair, used by the context features only). ``now`` (default: the cutoff) must not
        precede the cutoff: tables learned at the cutoff cannot describe an earlier moment.

        ``pairs`` is a DataFrame or a mapping of column name -> equal-length array: the serving
        path passes numpy arrays and skips building a DataFrame (most of the cost for one
        request's 200 candidates); both give the same matrix.
        """
        self._check_fitted()
        now_ts = self.cutoff_ if now is None else _utc(now)
        if now_ts < self.cutoff_:
            raise ValueError(f"now ({now_ts}) is before the cutoff ({self.cutoff_})")
        if isinstance(pairs, pd.DataFrame):
            pairs = {name: pairs[name] for name in pairs.columns}
        for column in ("user_id", "item_id"):
            if column not in pairs:
                raise ValueError(f"pairs needs a {column!r} column")
        n = len(pairs["user_id"])
        # Start from the defaults: absent recall columns then cost nothing.
        out = np.tile(_DEFAULT_ROW, (n, 1))
        u = _lookup(self.user_ids_, _ids(pairs["user_id"]))
        i = _lookup(self.item_ids_, _ids(pairs["item_id"]))
        delta = (now_ts - self.cutoff_) / pd.Timedelta(days=1)

        # Entity blocks: index -1 (unknown) picks the appended default row.
        for block, codes, (start, stop), shift in (
            (self._user_block, u, self._user_span, self._user_shift),
            (self._item_block, i, self._item_span, self._item_shift),
        ):
            values = np.take(block, codes, axis=0)
            if delta and len(shift):
                # 0 means "unknown / no history" and NEVER_DAYS "never": neither ages.
                current = values[:, shift]
                ages = (codes >= 0)[:, None] & (current > 0) & (current < NEVER_DAYS)
                values[:, shift] = np.where(ages, np.minimum(current + delta, NEVER_DAYS), current)
            out[:, start:stop] = values

        for name, column in self._cross(u, i, delta).items():
            out[:, _POSITION[name]] = column
        for name, column in _recall_columns(pairs).items():
            out[:, _POSITION[name]] = column
        for name, column in self._context(pairs, now_ts, scene).items():
            out[:, _POSITION[name]] = column
        return out, list(FEATURE_NAMES)

    def tables(self) -> FeatureTables:
        """The learned user and item tables, for the feature stores."""
        self._check_fitted()
        return FeatureTables(
            user=self.user_features_, item=self.item_features_, cutoff=self.cutoff_
        )

    def _cross(self, u: IntArray, i: IntArray, delta: float) -> dict[str, FloatArray]:
        n = len(u)
        cols = {name: np.full(n, _DEFAULTS[name]) for name in _CROSS_NAMES}
        k = np.flatnonzero((u >= 0) & (i >= 0))
        if not len(k):
            return cols
        uk, ik = u[k], i[k]
        n_items = len(self.item_ids_)

        item_category = self._item_category[ik]
        has_category = item_category > 0
        cols["ui_category_affinity"][k] = np.where(
            has_category,
            self.user_category_.get(uk, np.maximum(item_category - 1, 0), "value"),
            0.0,
        )
        cols["ui_industry_match"][k] = (
            has_category & (self.user_industry_code_[uk] == item_category)
        ).astype(np.float64)
        item_company = self.item_company_code_[ik]
        cols["ui_company_affinity"][k] = np.where(
            item_company > 0,
            self.user_company_.get(uk, np.maximum(item_company - 1, 0), "value"),
            0.0,
        )

        overlap, affinity, score, best = (np.zeros(len(k)) for _ in range(4))
        one_user = len(k) <= self.chunk_size and bool((uk == uk[0]).all())
        for start in range(0, len(k), self.chunk_size):
            part = slice(start, start + self.chunk_size)
            cu, ci = uk[part], ik[part]
            # Each of the item's tags, looked up in the user's tag profile.
            owner, tag = _expand_rows(self.item_tags_, ci)
            share = self._user_tags.get(cu[owner], tag, "value")
            overlap[part] = np.bincount(owner, share > 0, minlength=len(cu))
            affinity[part] = np.bincount(owner, share, minlength=len(cu))
            if one_user:  # a request: walk the user's covisit rows once, not once per item
                score[part], best[part] = self._covisit_of_one_user(int(cu[0]), ci)
                continue
            # Each of the user's recent items j, looked up as covisit_[j, item].
            owner, recent = _expand_rows(self.recent_items_, cu)
            similarity = self._covisit.get(recent, ci[owner], "value")
            score[part] = np.bincount(owner, similarity, minlength=len(cu))
            np.maximum.at(best[part], owner, similarity)
        union = self._user_tag_count[uk] + self._item_tag_count[ik] - overlap
        cols["ui_tag_overlap"][k] = overlap
        cols["ui_tag_jaccard"][k] = _ratio(overlap, union)
        cols["ui_tag_affinity"][k] = affinity
        cols["ui_covisit_score"][k] = score
        cols["ui_covisit_max"][k] = best

        has_prices = self._user_distinct_items[uk] > 0
        diff = self._item_log_price[ik] - self._user_log_price_mean[uk]
        spread = np.maximum(self._user_log_price_std[uk], PRICE_STD_FLOOR)
        cols["ui_log_price_diff"][k] = np.where(has_prices, diff, 0.0)
        cols["ui_price_distance"][k] = np.where(has_prices, np.abs(diff) / spread, 0.0)

        pos = self.ui_pairs_.positions(uk * n_items + ik)
        seen = pos >= 0
        for name, column in (
            ("ui_past_interactions", "count"),
            ("ui_past_weight", "weight"),
            ("ui_past_purchases", "purchases"),
        ):
            cols[name][k] = self.ui_pairs_.take(column, pos, 0.0)
        last = self.ui_pairs_.take("last_age", pos, NEVER_DAYS) + np.where(seen, delta, 0.0)
        cols["ui_days_since_last_interaction"][k] = np.minimum(last, NEVER_DAYS)
        return cols

    def _covisit_of_one_user(self, user: int, items: IntArray) -> tuple[FloatArray, FloatArray]:
        """Sum and maximum over the user's recent items j of covisit_[j, item], per item.

        The same numbers as the general path (terms added in the same order: recent items in
        order, absent pairs adding nothing), from the stored entries of the user's ~20 covisit
        rows instead of one sorted-key lookup per (recent item, candidate): ~4,000 lookups for
        200 candidates, the largest cost of a request's feature rows.
        """
        table = self._covisit
        n = len(items)
        recent = self.recent_items_.indices[
            self.recent_items_.indptr[user] : self.recent_items_.indptr[user + 1]
        ].astype(np.int64)
        if not len(recent) or not len(table.keys):
            return np.zeros(n), np.zeros(n)
        base = recent * table.n_cols
        lo = np.searchsorted(table.keys, base)
        lengths = np.searchsorted(table.keys, base + table.n_cols) - lo
        offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        at = np.repeat(lo, lengths) + offsets
        columns = table.keys[at] - np.repeat(base, lengths)
        values = table.values["value"][at]
        unique, inverse = np.unique(items, return_inverse=True)
        slot = np.minimum(np.searchsorted(unique, columns), len(unique) - 1)
        hit = unique[slot] == columns
        slot, values = slot[hit], values[hit]
        total = np.bincount(slot, values, minlength=len(unique))
        best = np.zeros(len(unique))
        np.maximum.at(best, slot, values)
        return total[inverse], best[inverse]

    def _context(
        self, pairs: Mapping[str, Any], now: pd.Timestamp, scene: str | None
    ) -> dict[str, FloatArray]:
        n = len(pairs["user_id"])
        if "ts" in pairs:
            ts = _as_utc(pd.Series(pairs["ts"])).fillna(now)
            local = pd.DatetimeIndex(ts).tz_convert(self.timezone)
            hour = local.hour.to_numpy(dtype=np.float64)
            dow = local.dayofweek.to_numpy(dtype=np.float64)
        else:
            local_now = now.tz_convert(self.timezone)
            hour = np.full(n, float(local_now.hour))
            dow = np.full(n, float(local_now.dayofweek))
        if "scene" in pairs:
            codes = pd.Series(pairs["scene"]).astype("object").map(SCENE_CODES).fillna(0)
            scene_code = codes.to_numpy(dtype=np.float64)
        else:
            scene_code = np.full(n, float(SCENE_CODES.get(scene or "unknown", 0)))
        return {
            "ctx_hour": hour,
            "ctx_day_of_week": dow,
            "ctx_is_weekend": (dow >= 5).astype(np.float64),
            "ctx_scene_code": scene_code,
        }

    # ------------------------------------------------------------------ persistence

    def save(self, directory: Path) -> None:
        """Write the learned state as JSON, Parquet and npz (no pickle) into ``directory``."""
        self._check_fitted()
        directory.mkdir(parents=True, exist_ok=True)
        manifest = {
            "params": self._params(),
            "cutoff": self.cutoff_.isoformat(),
            "categories": [str(c) for c in self.categories_],
            "companies": [str(c) for c in self.companies_],
            "tags": [str(t) for t in self.tags_],
            "price_band_edges": [float(x) for x in self.price_band_edges_],
            "feature_schema": feature_schema(),
        }
        (directory / "features.json").write_text(json.dumps(manifest, indent=1))
        self.user_features_.reset_index().to_parquet(
            directory / "user_features.parquet", index=False
        )
        self.item_features_.reset_index().to_parquet(
            directory / "item_features.parquet", index=False
        )
        arrays: dict[str, np.ndarray] = {
            "item_company_code": self.item_company_code_,
            "user_industry_code": self.user_industry_code_,
        }
        for name in ("item_tags_", "user_tags_", "recent_items_", "covisit_"):
            arrays.update(_csr_arrays(name.rstrip("_"), getattr(self, name)))
        for name in ("ui_pairs_", "user_category_", "user_company_"):
            arrays.update(getattr(self, name).arrays(name.rstrip("_")))
        np.savez(directory / "features.npz", **arrays)

    @classmethod
    def load(cls, directory: Path) -> FeatureBuilder:
        """Read a state written by ``save``; raises ValueError on a different feature schema."""
        manifest = json.loads((directory / "features.json").read_text())
        if manifest["feature_schema"] != feature_schema():
            raise ValueError(f"{directory} was built for another feature schema")
        builder = cls(**manifest["params"])
        builder.cutoff_ = pd.Timestamp(manifest["cutoff"])
        builder.categories_ = np.array(manifest["categories"], dtype=object)
        builder.companies_ = np.array(manifest["companies"], dtype=object)
        builder.tags_ = np.array(manifest["tags"], dtype=object)
        builder.price_band_edges_ = np.array(manifest["price_band_edges"], dtype=np.float64)
        users = pd.read_parquet(directory / "user_features.parquet").set_index("user_id")
        items = pd.read_parquet(directory / "item_features.parquet").set_index("item_id")
        builder.user_features_, builder.item_features_ = users, items
        builder.user_ids_ = users.index.to_numpy(dtype=np.int64)
        builder.item_ids_ = items.index.to_numpy(dtype=np.int64)
        with np.load(directory / "features.npz", allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        builder.item_company_code_ = arrays["item_company_code"]
        builder.user_industry_code_ = arrays["user_industry_code"]
        builder.item_tags_ = _csr_from_arrays("item_tags", arrays)
        builder.user_tags_ = _csr_from_arrays("user_tags", arrays)
        builder.recent_items_ = _csr_from_arrays("recent_items", arrays)
        builder.covisit_ = _csr_from_arrays("covisit", arrays)
        builder.ui_pairs_ = _KeyedValues.from_arrays("ui_pairs", arrays)
        builder.user_category_ = _KeyedValues.from_arrays("user_category", arrays)
        builder.user_company_ = _KeyedValues.from_arrays("user_company", arrays)
        builder._prepare()
        return builder

    # ---------------------------------------------------------------------- helpers

    def _params(self) -> dict[str, Any]:
        cutoff = None if self.cutoff is None else _utc(self.cutoff).isoformat()
        return {
            "cutoff": cutoff,
            "recent_n": self.recent_n,
            "covisit_top_k": self.covisit_top_k,
            "session_cap": self.session_cap,
            "smoothing": self.smoothing,
            "price_bands": self.price_bands,
            "timezone": self.timezone,
            "weights": None if self.weights is None else dict(self.weights),
            "chunk_size": self.chunk_size,
        }

    def _validate_params(self) -> None:
        for name in ("recent_n", "covisit_top_k", "session_cap", "price_bands", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer (got {value!r})")
        if not self.smoothing >= 0:
            raise ValueError(f"smoothing must be >= 0 (got {self.smoothing!r})")
        pd.Timestamp("2024-01-01", tz=self.timezone)  # raises on an unknown zone

    def _inputs(
        self, data: TrainingSet | Mapping[str, pd.DataFrame]
    ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.Timestamp, Mapping[str, float]]:
        if isinstance(data, TrainingSet):
            inter, items, users = data.interactions, data.items, data.users
            cutoff = _utc(data.cutoff)
            if self.cutoff is not None:
                wanted = _utc(self.cutoff)
                if wanted > cutoff:
                    raise ValueError(
                        f"cutoff {wanted} is after the training set's cutoff {cutoff}: "
                        "the events in between are missing from it"
                    )
                cutoff = wanted
            weights = self.weights if self.weights is not None else data.weights
        else:
            missing = {"users", "items", "interactions"} - set(data)
            if missing:
                raise ValueError(f"frames lack {sorted(missing)}")
            inter, items, users = data["interactions"], data["items"], data["users"]
            ts = _as_utc(inter["ts"])
            if self.cutoff is not None:
                cutoff = _utc(self.cutoff)
            elif ts.notna().any():
                cutoff = ts.max() + pd.Timedelta(seconds=1)
            else:
                cutoff = pd.Timestamp.now(tz="UTC")
            weights = self.weights if self.weights is not None else schema.EVENTS
        missing_columns = {"user_id", "item_id", "event", "ts"} - set(inter.columns)
        if missing_columns:
            raise ValueError(f"interactions lack columns {sorted(missing_columns)}")
        ts = _as_utc(inter["ts"])
        inter = inter[ts.notna() & (ts < cutoff)]
        return inter, items, users, cutoff, weights

    def _check_fitted(self) -> None:
        if not hasattr(self, "user_features_"):
            raise RuntimeError("FeatureBuilder is not fitted: call fit() or load() first")

    def _prepare(self) -> None:
        """Derive the arrays ``transform_pairs`` gathers from (not part of the saved state)."""
        user_names, item_names = feature_names("user"), feature_names("item")
        self._user_span = (_POSITION[user_names[0]], _POSITION[user_names[-1]] + 1)
        self._item_span = (_POSITION[item_names[0]], _POSITION[item_names[-1]] + 1)
        users = self.user_features_[user_names].to_numpy(dtype=np.float32)
        items = self.item_features_[item_names].to_numpy(dtype=np.float32)
        # C order: np.take on a Fortran-ordered frame export copies the whole table first.
        self._user_block = np.ascontiguousarray(np.vstack([users, default_vector("user")[None, :]]))
        self._item_block = np.ascontiguousarray(np.vstack([items, default_vector("item")[None, :]]))
        self._user_shift = np.array(
            [k for k, s in enumerate(_specs("user")) if s.relative_to_now], dtype=np.int64
        )
        self._item_shift = np.array(
            [k for k, s in enumerate(_specs("item")) if s.relative_to_now], dtype=np.int64
        )
        self._user_log_price_mean = self.user_features_["user_log_price_mean"].to_numpy(np.float64)
        self._user_log_price_std = self.user_features_["user_log_price_std"].to_numpy(np.float64)
        self._user_distinct_items = self.user_features_["user_distinct_items"].to_numpy(np.float64)
        self._item_log_price = self.item_features_["item_log_price"].to_numpy(np.float64)
        self._item_category = self.item_features_["item_category_code"].to_numpy(np.int64)
        self._user_tags = _KeyedValues.from_csr(self.user_tags_)
        self._covisit = _KeyedValues.from_csr(self.covisit_)
        self._user_tag_count = np.diff(self.user_tags_.indptr).astype(np.float64)
        self._item_tag_count = np.diff(self.item_tags_.indptr).astype(np.float64)


# ----------------------------------------------------------------------------- module helpers

_CROSS_NAMES: tuple[str, ...] = tuple(
    s.name for s in _CATALOGUE if s.entity == "user_item" and not s.name.startswith("recall_")
)
_DEFAULTS: Mapping[str, float] = {s.name: s.default for s in _CATALOGUE}
_DEFAULT_ROW = np.array([s.default for s in _CATALOGUE], dtype=np.float32)


def spec_default(name: str) -> float:
    """The catalogue default of feature ``name`` (KeyError for an unknown name)."""
    return _DEFAULTS[name]


def _specs(entity: Entity) -> list[FeatureSpec]:
    return [s for s in _CATALOGUE if s.entity == entity]


@dataclass(frozen=True)
class _Events:
    """Interaction rows before the cutoff as aligned arrays of positions, not ids."""

    u: IntArray  # position in user_ids_; -1 for anonymous rows
    i: IntArray  # position in item_ids_; -1 for rows without an item (site search)
    age: FloatArray  # days before the cutoff, > 0
    day: IntArray  # UTC calendar day, 0 = the first day in the data
    group: IntArray  # index into EVENT_GROUPS; -1 for other events
    strength: FloatArray  # 1 + signal weight of the event
    purchase: npt.NDArray[np.bool_]
    value: FloatArray
    actor: IntArray  # user position, or n_users + visitor code; -1 when neither is known
    session: IntArray  # a session key; -1 when no actor is known
    n_users: int
    n_items: int
    cutoff_ns: int

    @classmethod
    def build(
        cls,
        inter: pd.DataFrame,
        *,
        u: IntArray,
        i: IntArray,
        n_users: int,
        n_items: int,
        cutoff: pd.Timestamp,
        weights: Mapping[str, float],
    ) -> _Events:
        """Encode interaction rows (already cut at the cutoff)."""
        cutoff_ns = int(cutoff.value)
        ts_ns = _ns(inter["ts"])
        day = ts_ns // _DAY_NS
        day = day - (day.min() if len(day) else 0)
        day_span = int(day.max()) + 1 if len(day) else 1
        # Map the few distinct event names once, then gather per row.
        events = pd.Categorical(inter["event"].astype("object"))
        names = [str(e) for e in events.categories]
        group_of = np.array([_group_of(e) for e in names] + [-1], dtype=np.int64)
        weight_of = np.array([1.0 + float(weights.get(e, 0.0)) for e in names] + [1.0])
        codes = np.asarray(events.codes, dtype=np.int64)  # -1 (missing) picks the sentinel
        group = group_of[codes]
        visitor = pd.factorize(_column(inter, "visitor_id"))[0].astype(np.int64)
        actor = np.where(u >= 0, u, np.where(visitor >= 0, n_users + visitor, -1))
        # A session is a Matomo visit, or (actor, UTC day) for rows without session_id.
        session_codes, session_names = pd.factorize(_column(inter, "session_id"))
        session_codes = session_codes.astype(np.int64)
        fallback = len(session_names) + actor * day_span + day
        session = np.where(session_codes >= 0, session_codes, np.where(actor >= 0, fallback, -1))
        return cls(
            u=u,
            i=i,
            age=(cutoff_ns - ts_ns) / _DAY_NS,
            day=day,
            group=group,
            strength=weight_of[codes],
            purchase=group == _GROUP_INDEX["purchases"],
            value=_column(inter, "value").to_numpy(dtype=np.float64, na_value=0.0),
            actor=actor,
            session=session,
            n_users=n_users,
            n_items=n_items,
            cutoff_ns=cutoff_ns,
        )

    def subset(self, mask: npt.NDArray[np.bool_]) -> _Events:
        """The rows where ``mask`` holds."""
        arrays = {
            f.name: getattr(self, f.name)[mask]
            for f in fields(self)
            if isinstance(getattr(self, f.name), np.ndarray)
        }
        return replace(self, **arrays)


def _id_universe(table_ids: pd.Series, row_ids: IntArray) -> IntArray:
    """Sorted ids of the entity table plus any id the interactions mention."""
    table = _ids(table_ids)
    return np.union1d(table[table != _NO_ID], row_ids[row_ids != _NO_ID])


def _aligned(frame: pd.DataFrame, key: str, ids: IntArray) -> pd.DataFrame:
    """``frame`` indexed by ``key``, one row per id of ``ids`` in order (NaN where missing)."""
    table = frame.drop_duplicates(key, keep="last").copy()
    table[key] = _ids(table[key])
    return table.set_index(key).reindex(ids)


def _normalised(series: pd.Series) -> pd.Series:
    """Stripped lower-case strings, NA for missing or blank (category/company/industry keys)."""
    text = series.astype("string").str.strip().str.lower()
    return text.mask(text == "")


def _vocabulary(keys: pd.Series) -> np.ndarray:
    return np.array(sorted(keys.dropna().unique()), dtype=object)


def _share_matrix(
    rows: IntArray, codes: IntArray, weights: FloatArray, n_rows: int, n_codes: int
) -> sp.csr_matrix:
    """Row-normalised ``rows x (codes - 1)`` weights, ignoring code 0 (unknown)."""
    known = codes > 0
    matrix = sp.csr_matrix(
        (weights[known], (rows[known], codes[known] - 1)), shape=(n_rows, max(n_codes, 1))
    )
    return _row_normalise(matrix)


class _KeyedValues:
    """A sparse (row, col) -> values table as sorted int64 keys ``row * n_cols + col``.

    Looking up candidate pairs is one ``np.searchsorted`` (no per-pair Python, no scipy
    fancy-indexing overhead), which is what the 200-candidate online path needs.
    """

    def __init__(self, keys: IntArray, n_cols: int, values: dict[str, FloatArray]) -> None:
        self.keys = keys
        self.n_cols = n_cols
        self.values = values

    @classmethod
    def build(
        cls,
        keys: IntArray,
        n_cols: int,
        sums: Mapping[str, FloatArray],
        minimum: Mapping[str, FloatArray],
    ) -> _KeyedValues:
        unique, inverse = np.unique(keys, return_inverse=True)
        values = {
            name: np.bincount(inverse, col, minlength=len(unique)) for name, col in sums.items()
        }
        for name, col in minimum.items():
            low = np.full(len(unique), np.inf)
            np.minimum.at(low, inverse, col)
            values[name] = low
        return cls(unique.astype(np.int64), n_cols, values)

    @classmethod
    def from_csr(cls, matrix: sp.csr_matrix) -> _KeyedValues:
        rows = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))
        keys = rows * matrix.shape[1] + matrix.indices.astype(np.int64)
        return cls(keys, int(matrix.shape[1]), {"value": matrix.data.astype(np.float64)})

    def positions(self, keys: IntArray) -> IntArray:
        """Index of each key in the table, -1 where absent."""
        if not len(self.keys):
            return np.full(len(keys), -1, dtype=np.int64)
        pos = np.searchsorted(self.keys, keys)
        pos = np.minimum(pos, len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, pos, -1).astype(np.int64)

    def take(self, name: str, pos: IntArray, default: float) -> FloatArray:
        """Column ``name`` at positions from ``positions``; ``default`` where -1."""
        if not len(self.keys):
            return np.full(len(pos), default)
        return np.where(pos >= 0, self.values[name][np.maximum(pos, 0)], default)

    def get(self, rows: IntArray, cols: IntArray, name: str) -> FloatArray:
        """Values at (row, col), 0 where absent."""
        return self.take(name, self.positions(rows * self.n_cols + cols), 0.0)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {
            f"{prefix}.keys": self.keys,
            f"{prefix}.n_cols": np.array([self.n_cols]),
        }
        out.update({f"{prefix}.value.{name}": col for name, col in self.values.items()})
        return out

    @classmethod
    def from_arrays(cls, prefix: str, arrays: Mapping[str, np.ndarray]) -> _KeyedValues:
        head = f"{prefix}.value."
        values = {key[len(head) :]: arrays[key] for key in arrays if key.startswith(head)}
        return cls(arrays[f"{prefix}.keys"], int(arrays[f"{prefix}.n_cols"][0]), values)


def _utc(value: pd.Timestamp | str) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _ids(series: pd.Series | npt.ArrayLike) -> IntArray:
    """Integer ids with nulls as ``_NO_ID`` (never a real id)."""
    if getattr(series, "dtype", None) == np.int64:  # the common case; the request path's
        return np.asarray(series)
    numeric = pd.to_numeric(pd.Series(series), errors="coerce").astype("Int64")
    return numeric.to_numpy(dtype=np.int64, na_value=_NO_ID)


def _lookup(sorted_ids: IntArray, ids: IntArray) -> IntArray:
    """Position of each id in ``sorted_ids``; -1 where absent."""
    if not len(sorted_ids):
        return np.full(len(ids), -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1).astype(np.int64)


def _as_utc(series: pd.Series) -> pd.Series:
    """``series`` as UTC timestamps; canonical frames already are, and skip the parser."""
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        return series.dt.tz_convert("UTC")
    return pd.to_datetime(series, utc=True)


def _ns(series: pd.Series) -> IntArray:
    """Epoch nanoseconds; NaT as ``_NO_ID``."""
    ts = _as_utc(series)
    values = ts.dt.as_unit("ns").astype("int64").to_numpy()
    return np.where(ts.notna().to_numpy(), values, _NO_ID).astype(np.int64)


def _days_before(cutoff_ns: int, ts_ns: IntArray) -> FloatArray:
    """Days from ``ts`` to the cutoff, in [0, NEVER_DAYS]; unknown or later -> 0."""
    known = ts_ns != _NO_ID
    days = np.where(known, (cutoff_ns - np.where(known, ts_ns, cutoff_ns)) / _DAY_NS, 0.0)
    return np.clip(days, 0.0, NEVER_DAYS)


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """``frame[name]``, or all-null when a hand-made frame lacks the optional column."""
    if name in frame.columns:
        return frame[name]
    return pd.Series(pd.NA, index=frame.index, dtype="object")


def _group_of(event: str) -> int:
    for name, events in EVENT_GROUPS.items():
        if event in events:
            return _GROUP_INDEX[name]
    return -1


def _codes(vocabulary: np.ndarray, keys: pd.Series) -> IntArray:
    """1-based position of each key in the sorted ``vocabulary``; 0 for None/unknown."""
    if not len(vocabulary):
        return np.zeros(len(keys), dtype=np.int64)
    values = keys.astype("object").where(keys.notna(), "").to_numpy(dtype=object)
    pos = np.minimum(np.searchsorted(vocabulary, values), len(vocabulary) - 1)
    return np.where(vocabulary[pos] == values, pos + 1, 0).astype(np.int64)


def _count(codes: IntArray, n: int, weights: FloatArray | None = None) -> FloatArray:
    return np.bincount(codes, weights, minlength=n).astype(np.float64)


def _ratio(num: FloatArray, den: FloatArray) -> FloatArray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def _min_by(codes: IntArray, values: FloatArray, n: int, empty: float) -> FloatArray:
    """Smallest age (days) per code, capped at NEVER_DAYS; ``empty`` where a code has none."""
    out = np.full(n, np.inf)
    np.minimum.at(out, codes, values)
    return np.where(np.isfinite(out), np.minimum(out, NEVER_DAYS), empty)


def _max_by(codes: IntArray, values: FloatArray, n: int, empty: float) -> FloatArray:
    out = np.full(n, -np.inf)
    np.maximum.at(out, codes, values)
    return np.where(np.isfinite(out), out, empty)


def _distinct(codes: IntArray, keys: IntArray, n: int) -> FloatArray:
    """Number of distinct ``keys`` per code."""
    if not len(codes):
        return np.zeros(n)
    # Compact the keys first so that code * n_keys + key cannot overflow int64. factorize and
    # a sort: numpy 2's hash-based np.unique was ten times slower on a million rows.
    compact, uniques = pd.factorize(keys)
    width = max(len(uniques), 1)
    pairs = np.sort(codes.astype(np.int64) * width + compact)
    pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]]
    return _count(pairs // width, n)


def _weighted_mean_std(
    codes: IntArray, x: FloatArray, w: FloatArray, n: int
) -> tuple[FloatArray, FloatArray]:
    total = _count(codes, n, w)
    mean = _ratio(_count(codes, n, w * x), total)
    # Two passes: E[x^2] - E[x]^2 loses everything to cancellation at large prices.
    var = _ratio(_count(codes, n, w * (x - mean[codes]) ** 2), total)
    return mean, np.sqrt(np.maximum(var, 0.0))


def _weighted_median(codes: IntArray, x: FloatArray, w: FloatArray, n: int) -> FloatArray:
    """Lower weighted median per code: the smallest x whose cumulative weight reaches half."""
    out = np.zeros(n)
    if not len(codes):
        return out
    order = np.lexsort((x, codes))
    c, xs, ws = codes[order], x[order], w[order]
    cumulative = np.cumsum(ws)
    present, first = np.unique(c, return_index=True)
    before = np.zeros(n)
    before[present] = cumulative[first] - ws[first]
    within = cumulative - before[c]
    total = _count(c, n, ws)
    reached = within >= 0.5 * total[c] * (1 - 1e-12)
    hit_codes, hit_first = np.unique(c[reached], return_index=True)
    out[hit_codes] = xs[np.flatnonzero(reached)[hit_first]]
    return out


def _row_normalise(matrix: sp.csr_matrix) -> sp.csr_matrix:
    m = sp.csr_matrix(matrix, dtype=np.float64)
    m.sum_duplicates()
    m.eliminate_zeros()
    sums = np.asarray(m.sum(axis=1)).ravel()
    m.data = m.data / np.repeat(sums, np.diff(m.indptr))
    return m


def _row_entropy(shares: sp.csr_matrix) -> FloatArray:
    rows = np.repeat(np.arange(shares.shape[0]), np.diff(shares.indptr))
    p = shares.data
    return np.bincount(rows, -p * np.log(p), minlength=shares.shape[0]).astype(np.float64) + 0.0


def _row_max(matrix: sp.csr_matrix) -> FloatArray:
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    out = np.zeros(matrix.shape[0])
    np.maximum.at(out, rows, matrix.data)
    return out


def _tag_matrix(tags: pd.Series) -> tuple[sp.csr_matrix, np.ndarray]:
    """Binary item x tag matrix and the sorted tag vocabulary."""
    split = tags.astype("object").where(tags.notna(), "").astype(str).str.split(",")
    exploded = split.explode()
    exploded = exploded.str.strip()
    rows = np.repeat(np.arange(len(tags)), split.str.len().to_numpy())
    keep = (exploded != "").to_numpy()
    names = exploded.to_numpy(dtype=object)[keep]
    vocabulary = np.array(sorted(set(names)), dtype=object)
    cols = np.searchsorted(vocabulary, names) if len(vocabulary) else np.zeros(0, dtype=np.int64)
    matrix = sp.csr_matrix(
        (np.ones(len(cols)), (rows[keep], cols)), shape=(len(tags), max(len(vocabulary), 1))
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0  # a tag listed twice is still one tag
    return matrix, vocabulary


def _recent_items(pairs: _Events, n: int) -> sp.csr_matrix:
    """Binary user x item matrix of each user's ``n`` most recent distinct items."""
    order = np.lexsort((pairs.age, pairs.u))  # per user, most recent first
    users, items = pairs.u[order], pairs.i[order]
    _, first = np.unique(users * pairs.n_items + items, return_index=True)
    first = np.sort(first)  # back to (user, recency) order, one row per distinct item
    users, items = users[first], items[first]
    keep = _rank_within(users) < n
    return sp.csr_matrix(
        (np.ones(keep.sum()), (users[keep], items[keep])), shape=(pairs.n_users, pairs.n_items)
    )


def _rank_within(groups: IntArray) -> IntArray:
    """0-based position of each element within its run of equal, contiguous ``groups``."""
    if not len(groups):
        return np.zeros(0, dtype=np.int64)
    start = np.r_[True, groups[1:] != groups[:-1]]
    first = np.flatnonzero(start)
    return np.arange(len(groups)) - np.repeat(first, np.diff(np.r_[first, len(groups)]))


def _covisitation(ev: _Events, *, session_cap: int, top_k: int) -> sp.csr_matrix:
    """Item x item cosine of co-session counts, keeping each row's ``top_k`` neighbours."""
    n_items = ev.n_items
    ok = (ev.session >= 0) & (ev.i >= 0)
    s = np.unique(ev.session[ok], return_inverse=True)[1].astype(np.int64)
    i, a = ev.i[ok], ev.age[ok]
    order = np.lexsort((a, s))  # per session, most recent first
    key = s[order] * n_items + i[order]
    _, first = np.unique(key, return_index=True)
    first = np.sort(first)
    s, i = s[order][first], i[order][first]
    keep = _rank_within(s) < session_cap
    s, i = s[keep], i[keep]
    sessions_of_item = np.bincount(i, minlength=n_items).astype(np.float64)
    size = np.bincount(s)
    multi = size[s] >= 2
    frame = pd.DataFrame({"s": s[multi], "i": i[multi]})
    joined = frame.merge(frame, on="s", suffixes=("", "_other"))
    joined = joined[joined["i"] != joined["i_other"]]
    left = joined["i"].to_numpy(np.int64)
    right = joined["i_other"].to_numpy(np.int64)
    counts = sp.csr_matrix((np.ones(len(left)), (left, right)), shape=(n_items, n_items))
    counts.sum_duplicates()
    rows = np.repeat(np.arange(n_items), np.diff(counts.indptr))
    cols = counts.indices.astype(np.int64)
    cosine = counts.data / np.sqrt(sessions_of_item[rows] * sessions_of_item[cols])
    order = np.lexsort((-cosine, rows))
    rank = np.arange(len(order)) - counts.indptr[rows[order]]
    top = order[rank < top_k]
    return sp.csr_matrix((cosine[top], (rows[top], cols[top])), shape=(n_items, n_items))


def _expand_rows(matrix: sp.csr_matrix, rows: IntArray) -> tuple[IntArray, IntArray]:
    """Column indices stored in ``matrix[rows]``, each with the index in ``rows`` it came from."""
    starts = matrix.indptr[rows].astype(np.int64)
    lengths = matrix.indptr[rows + 1].astype(np.int64) - starts
    owner = np.repeat(np.arange(len(rows)), lengths)
    offsets = np.arange(len(owner)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return owner, matrix.indices[np.repeat(starts, lengths) + offsets].astype(np.int64)


def _smoothed_rate(num: FloatArray, den: FloatArray, a: float) -> FloatArray:
    prior = float(num.sum() / den.sum()) if den.sum() > 0 else 0.0
    prior = min(max(prior, 0.0), 1.0)
    rate = _ratio(num + a * prior, den + a) if a > 0 else _ratio(num, den)
    return np.clip(rate, 0.0, 1.0)


def _band_edges(prices: FloatArray, bands: int) -> FloatArray:
    if not len(prices) or bands < 2:
        return np.zeros(0)
    return np.unique(np.quantile(prices, np.arange(1, bands) / bands))


def _minus_group_median(
    values: FloatArray, groups: IntArray, valid: npt.NDArray[np.bool_]
) -> FloatArray:
    frame = pd.DataFrame({"g": groups[valid], "v": values[valid]})
    medians = frame.groupby("g")["v"].median()
    median_of = np.zeros(int(groups.max()) + 1 if len(groups) else 1)
    median_of[medians.index.to_numpy(np.int64)] = medians.to_numpy()
    out = values - median_of[groups]
    # No category, or no price: nothing to compare with.
    return np.where((groups > 0) & valid, out, 0.0)


def _text_length(series: pd.Series) -> FloatArray:
    return series.astype("string").str.len().fillna(0).to_numpy(dtype=np.float64)


def _table(
    columns: Mapping[str, FloatArray], entity: Entity, ids: IntArray, index: str
) -> pd.DataFrame:
    names = feature_names(entity)
    # nan_to_num is a last guard for dirty snapshot attributes (an inf price, say): the stores
    # and the ranker must never see a non-finite value.
    data = {
        name: np.nan_to_num(np.asarray(columns[name], np.float64), posinf=0.0, neginf=0.0).astype(
            np.float32
        )
        for name in names
    }
    return pd.DataFrame(data, index=pd.Index(ids, name=index, dtype=np.int64))


def _recall_columns(pairs: Mapping[str, Any]) -> dict[str, FloatArray]:
    """The recall columns present in ``pairs``, sanitised, and the derived ones.

    ``recall_norm_<channel>`` divides a channel's score by the largest score that channel gave
    among the same user's rows of ``pairs`` (one user per call online, a block of users in
    training): raw scores grow with the history a model was fitted on, ratios do not.

    All present channels are cleaned as one (channels x rows) block: on the request path the
    per-channel form was ~15 small numpy calls per channel, most of the cost for 200 rows.
    """
    n = len(pairs["user_id"])
    present = set(pairs)
    channels = [
        c
        for c in RECALL_CHANNELS
        if f"recall_score_{c}" in present or f"recall_rank_{c}" in present
    ]
    cols: dict[str, FloatArray] = {}
    if channels:
        scores = np.vstack([_numeric(pairs, f"recall_score_{c}", 0.0, nan=True) for c in channels])
        ranks = np.vstack(
            [_numeric(pairs, f"recall_rank_{c}", MISSING_RANK, nan=True) for c in channels]
        )
        # Caller-supplied values: NaN/inf/absurd ranks become "not recalled" rather than poison.
        scores = np.where(np.isfinite(scores), scores, 0.0)
        ranks = np.where(
            np.isfinite(ranks) & (ranks >= 1), np.minimum(ranks, MISSING_RANK), MISSING_RANK
        )
        hits = ((ranks < MISSING_RANK) | (scores > 0)).sum(axis=0).astype(np.float64)
        best = np.minimum(ranks.min(axis=0), MISSING_RANK)
        normed = [k for k, c in enumerate(channels) if f"recall_score_{c}" in present]
        norms = _recall_norms(pairs, scores[normed]) if normed and n else None
        for k, channel in enumerate(channels):
            cols[f"recall_score_{channel}"] = scores[k]
            cols[f"recall_rank_{channel}"] = ranks[k]
        if norms is not None:
            for row, k in enumerate(normed):
                cols[f"recall_norm_{channels[k]}"] = norms[row]
    else:
        hits, best = np.zeros(n), np.full(n, MISSING_RANK)
    cols["recall_channels_hit"] = hits
    cols["recall_best_rank"] = best
    if "fused_rank" in present:
        fused = _numeric(pairs, "fused_rank", MISSING_RANK)
        cols["recall_fused_rank"] = np.where(
            np.isfinite(fused) & (fused >= 1), np.minimum(fused, MISSING_RANK), MISSING_RANK
        )
    return cols


def _recall_norms(pairs: Mapping[str, Any], scores: FloatArray) -> FloatArray:
    """Each row of ``scores`` (channels x pairs) over its user's largest score, 0 where that
    largest score is not positive."""
    groups = _user_groups(pairs)
    if not groups.any():  # one user (every request online): one maximum per channel
        top = np.maximum(scores.max(axis=1, keepdims=True), 0.0)
    else:
        by_user = np.zeros((len(scores), int(groups.max()) + 1))
        for row in range(len(scores)):
            np.maximum.at(by_user[row], groups, scores[row])
        top = by_user[:, groups]
    return np.where(top > 0, scores / np.where(top > 0, top, 1.0), 0.0)


def _user_groups(pairs: Mapping[str, Any]) -> IntArray:
    """A dense group code per row, one per distinct user id (0..n_users-1)."""
    users = np.asarray(pairs["user_id"])
    if len(users) and (users == users[0]).all():
        return np.zeros(len(users), dtype=np.intp)
    return pd.factorize(users)[0].astype(np.intp)


def _numeric(
    pairs: Mapping[str, Any], name: str, default: float, *, nan: bool = False
) -> FloatArray:
    """Column ``name`` as float64 (``default`` where absent); NaN (also non-numeric text)
    becomes ``default`` too unless ``nan``, where the caller cleans the values itself."""
    if name not in pairs:
        return np.full(len(pairs["user_id"]), default)
    column = pairs[name]
    kind = getattr(getattr(column, "dtype", None), "kind", "O")
    if kind in "fiu":
        values = np.asarray(column, dtype=np.float64)
    else:
        values = pd.to_numeric(pd.Series(column), errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan
        )
    return values if nan else np.where(np.isnan(values), default, values)


def _csr_arrays(prefix: str, matrix: sp.csr_matrix) -> dict[str, np.ndarray]:
    return {
        f"{prefix}.data": matrix.data,
        f"{prefix}.indices": matrix.indices,
        f"{prefix}.indptr": matrix.indptr,
        f"{prefix}.shape": np.array(matrix.shape, dtype=np.int64),
    }


def _csr_from_arrays(prefix: str, arrays: Mapping[str, np.ndarray]) -> sp.csr_matrix:
    shape = tuple(int(x) for x in arrays[f"{prefix}.shape"])
    return sp.csr_matrix(
        (arrays[f"{prefix}.data"], arrays[f"{prefix}.indices"], arrays[f"{prefix}.indptr"]),
        shape=shape,
    )
