"""Map raw extracted tables to canonical users, items and interactions. Pure core.

The mapping follows the ``canonical:`` section of the source contract (config/sources.yaml).
Input frames are keyed ``"source.table"`` and carry the contract's columns with the lake's
dtypes (integers as ``Int64``, strings as ``string``, naive-UTC datetimes, ``idvisitor`` as
``bytes``). A missing table is read as an empty one, so a platform without Matomo produces
business-only output.

Matomo rules (see ../shared/reference/matomo.md, sections 4 and 7):

- Identity comes from ``log_visit`` through ``idvisit``: setting a User ID mid-visit rewrites
  ``log_visit.idvisitor`` but not the action rows written before it.
- A detail view is a pageview row (type-1 URL, no event category) with a product SKU. Events
  fired on a product page inherit the SKU, so they never count as detail views. A pageview
  without a SKU is a detail view when its URL names an item, otherwise a plain ``view``.
- Strings are resolved once per distinct ``log_action`` row (HTML-unescaping and regex
  extraction run on the dictionary, not on the action rows) and then looked up by id, so the
  cost per action row is a hash lookup.

Not done here, on purpose: deduplicating Matomo orders against business orders, dropping
interactions of unknown users or items, and any other repair. That is cleaning's job, which
needs the data as delivered to report what it repaired.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from apps.pipeline import schema

if TYPE_CHECKING:
    from apps.pipeline.sources.contract import Contract

MATOMO = "matomo"

# log_action.type values (core/Tracker/Action.php).
TYPE_PAGE_URL = 1
TYPE_ECOMMERCE_SKU = 5
TYPE_SITE_SEARCH = 8
TYPE_EVENT_CATEGORY = 10
TYPE_EVENT_ACTION = 11
TYPE_EVENT_NAME = 12

# log_conversion.idgoal of an ecommerce order (-1 is the cart).
IDGOAL_ORDER = 0

# The Matomo columns this module reads, with the lake dtype an absent table gets. A contract may
# list more columns; it must list at least these for the tables it declares.
MATOMO_COLUMNS: Mapping[str, Mapping[str, str]] = {
    "log_visit": {
        "idvisit": "Int64",
        "idsite": "Int64",
        "idvisitor": "object",
        "user_id": "string",
    },
    "log_link_visit_action": {
        "idlink_va": "Int64",
        "idsite": "Int64",
        "idvisit": "Int64",
        "server_time": "datetime64[ns]",
        "idaction_url": "Int64",
        "idaction_name": "Int64",
        "idaction_product_sku": "Int64",
        "idaction_event_category": "Int64",
        "idaction_event_action": "Int64",
    },
    "log_action": {"idaction": "Int64", "name": "string", "type": "Int64"},
    "log_conversion": {
        "idvisit": "Int64",
        "idsite": "Int64",
        "server_time": "datetime64[ns]",
        "idgoal": "Int64",
        "buster": "Int64",
        "idorder": "string",
    },
    "log_conversion_item": {
        "idvisit": "Int64",
        "idsite": "Int64",
        "server_time": "datetime64[ns]",
        "idorder": "string",
        "idaction_sku": "Int64",
        "price": "float64",
        "quantity": "Int64",
        "deleted": "Int64",
    },
}

# Primary keys of the Matomo tables (matomo_schema.sql); a row read twice is kept once.
MATOMO_KEYS: Mapping[str, tuple[str, ...]] = {
    "log_visit": ("idvisit",),
    "log_link_visit_action": ("idlink_va",),
    "log_action": ("idaction",),
    "log_conversion": ("idvisit", "idgoal", "buster"),
    "log_conversion_item": ("idvisit", "idorder", "idaction_sku"),
}

_LAKE_DTYPES: Mapping[str, str] = {
    "integer": "Int64",
    "float": "float64",
    "decimal": "float64",
    "string": "string",
    "text": "string",
    "datetime": "datetime64[ns]",
    "binary": "object",
    "boolean": "boolean",
}

_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


@dataclass(frozen=True)
class CanonicalFrames:
    """Canonical users, items and interactions (schema-conformed) plus counts per mapping rule."""

    users: pd.DataFrame
    items: pd.DataFrame
    interactions: pd.DataFrame
    stats: dict[str, int]


@dataclass(frozen=True)
class MatomoSpec:
    """The ``canonical.matomo`` block of the contract, validated."""

    sites: tuple[int, ...]
    item_from_sku: str | None
    item_from_url: str | None
    user_from_user_id: str | None
    events: tuple[tuple[str, str, str], ...]  # (category, action, canonical event)
    site_search_event: str
    orders_event: str
    cart_add_event: str

    @classmethod
    def unconfigured(cls) -> MatomoSpec:
        """A spec that reads no site, for a contract without Matomo."""
        return cls.from_contract({"idsite": []})

    @classmethod
    def from_contract(cls, block: Mapping[str, Any]) -> MatomoSpec:
        """Read ``canonical.matomo``; raise ``ValueError`` when it cannot be used."""
        idsite = block.get("idsite")
        if idsite is None:
            raise ValueError("canonical.matomo.idsite is required: which Matomo site to read")
        sites = tuple(int(s) for s in (idsite if isinstance(idsite, list) else [idsite]))
        events = []
        for i, entry in enumerate(block.get("events") or []):
            if not isinstance(entry, Mapping) or not {"category", "action", "event"} <= set(entry):
                raise ValueError(
                    f"canonical.matomo.events[{i}] must be {{category: ..., action: ..., event: ...}}"
                )
            events.append((str(entry["category"]), str(entry["action"]), str(entry["event"])))
        return cls(
            sites=sites,
            item_from_sku=block.get("item_from_sku"),
            item_from_url=block.get("item_from_url"),
            user_from_user_id=block.get("user_from_user_id"),
            events=tuple(events),
            site_search_event=str(block.get("site_search_event", "search")),
            orders_event=str(block.get("orders_event", "purchase")),
            cart_add_event=str(block.get("cart_add_event", "add_to_cart")),
        )


def build_canonical(raw: Mapping[str, pd.DataFrame], contract: Contract) -> CanonicalFrames:
    """Map raw ``"source.table"`` frames to canonical frames as the contract's mapping says.

    Interactions are sorted by time; each has a unique ``ref`` naming the source row it came
    from. ``stats`` counts what each mapping rule produced, dropped or ignored.
    """
    spec: Mapping[str, Any] = contract.canonical
    stats: dict[str, int] = {}

    users = _users(raw, contract, spec.get("users"), stats)
    items = _items(raw, contract, spec.get("items"), stats)

    parts = _business_events(raw, contract, spec.get("business_events") or [], stats)
    if spec.get(MATOMO) and MATOMO in contract.sources:
        parts += _matomo(raw, MatomoSpec.from_contract(spec[MATOMO]), stats)
    else:
        # Mapping nothing still fills every Matomo count (with zeros): same keys every run.
        parts += _matomo({}, MatomoSpec.unconfigured(), stats)

    interactions = _combine(parts, items, stats)
    return CanonicalFrames(users=users, items=items, interactions=interactions, stats=stats)


# --- business users and items -------------------------------------------------------------------


def _users(
    raw: Mapping[str, pd.DataFrame],
    contract: Contract,
    block: Mapping[str, Any] | None,
    stats: dict[str, int],
) -> pd.DataFrame:
    if not block:
        stats["users"] = 0
        return schema.empty_frame(schema.USERS)
    table = _business_table(raw, contract, block["table"], stats)
    users = _renamed(table, block.get("columns") or {})
    stats["users"] = len(users)
    return schema.conform(users, schema.USERS)


def _items(
    raw: Mapping[str, pd.DataFrame],
    contract: Contract,
    block: Mapping[str, Any] | None,
    stats: dict[str, int],
) -> pd.DataFrame:
    if not block:
        stats["items"] = stats["items.active"] = 0
        return schema.empty_frame(schema.ITEMS)
    table = _business_table(raw, contract, block["table"], stats)
    items = _renamed(table, block.get("columns") or {})
    if "tags" in items.columns:
        items["tags"] = normalise_tags(items["tags"], str(block.get("tag_separator", ",")))
    active = block.get("active")
    if active:
        items["is_active"] = _matches(table[active["column"]], _as_list(active.get("values")))
    else:
        items["is_active"] = True
    items = schema.conform(items, schema.ITEMS)
    stats["items"] = len(items)
    stats["items.active"] = int(items["is_active"].sum())
    return items


def normalise_tags(tags: pd.Series, separator: str = ",") -> pd.Series:
    """Split on ``separator``, trim, lower-case, drop empty and repeated tags, join with ``,``.

    An item without any tag gets null rather than an empty string, so "no tags" is one value.
    """
    parts = tags.astype("string").str.lower().str.split(separator, regex=False).explode()
    parts = parts.astype("string").str.strip()
    parts = parts[parts.fillna("").ne("").to_numpy(dtype=bool)]
    pairs = pd.DataFrame({"row": parts.index, "tag": parts.to_numpy()}).drop_duplicates()
    joined = pairs.groupby("row", sort=False)["tag"].agg(",".join)
    return joined.reindex(tags.index).astype("string")


# --- business events ----------------------------------------------------------------------------


def _business_events(
    raw: Mapping[str, pd.DataFrame],
    contract: Contract,
    blocks: Iterable[Mapping[str, Any]],
    stats: dict[str, int],
) -> list[pd.DataFrame]:
    blocks = list(blocks)
    tables = [str(block["table"]) for block in blocks]
    parts = []
    for block in blocks:
        dotted = str(block["table"])
        event = str(block["event"])
        table = _business_table(raw, contract, dotted, stats)
        keep = np.ones(len(table), dtype=bool)
        for column, values in (block.get("where") or {}).items():
            keep &= _matches(table[column], _as_list(values))
        rows = table[keep]
        prefix = f"business.{dotted.partition('.')[2]}"
        # Two mappings of one table may pick the same row; the event keeps their refs apart.
        suffix = f"#{event}" if tables.count(dotted) > 1 else ""
        stats[f"{prefix}.rows"] = len(table)
        stats[f"{prefix}.{event}"] = len(rows)
        stats[f"{prefix}.{event}.filtered_out"] = int((~keep).sum())
        parts.append(
            _interactions(
                rows.index,
                event=event,
                source="business",
                ts=rows[block["ts"]],
                user_id=_column(rows, block.get("user")),
                item_id=_column(rows, block.get("item")),
                value=_column(rows, block.get("value"), default=0.0),
                order_id=_column(rows, block.get("order_id")),
                ref=_ref(prefix, rows, contract.table(dotted).primary_key) + suffix,
            )
        )
    return parts


# --- Matomo -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Dictionary:
    """``log_action`` resolved once: per role, a Series indexed by idaction."""

    page_urls: pd.Index  # idactions of type-1 page URLs
    keywords: pd.Series  # type 8, unescaped
    categories: pd.Series  # type 10, unescaped
    actions: pd.Series  # type 11, unescaped
    sku_items: pd.Series  # type 5 (stored raw) -> item id through item_from_sku
    url_items: pd.Series  # type 1 -> item id through item_from_url
    event_name_items: pd.Series  # type 12, unescaped -> item id through item_from_sku

    @classmethod
    def build(cls, log_action: pd.DataFrame, spec: MatomoSpec) -> _Dictionary:
        def names(action_type: int, *, unescape: bool) -> pd.Series:
            rows = log_action[log_action["type"].eq(action_type).fillna(False).to_numpy(dtype=bool)]
            values = _unescape(rows["name"]) if unescape else rows["name"].astype("string")
            return pd.Series(values.array, index=pd.Index(rows["idaction"].array, dtype="Int64"))

        page_urls = names(TYPE_PAGE_URL, unescape=False)
        return cls(
            page_urls=page_urls.index,
            keywords=names(TYPE_SITE_SEARCH, unescape=True),
            categories=names(TYPE_EVENT_CATEGORY, unescape=True),
            actions=names(TYPE_EVENT_ACTION, unescape=True),
            sku_items=extract_id(names(TYPE_ECOMMERCE_SKU, unescape=False), spec.item_from_sku),
            url_items=extract_id(page_urls, spec.item_from_url),
            event_name_items=extract_id(names(TYPE_EVENT_NAME, unescape=True), spec.item_from_sku),
        )


@dataclass(frozen=True)
class _Visits:
    """Identity per visit, looked up by idvisit."""

    ids: pd.Index
    visitor_id: pd.Series
    user_id: pd.Series

    def identity(self, idvisit: pd.Series) -> dict[str, pd.Series]:
        return {
            "visitor_id": _lookup(idvisit, self.visitor_id),
            "user_id": _lookup(idvisit, self.user_id),
            "session_id": "m" + idvisit.astype("string"),
        }


def _matomo(
    raw: Mapping[str, pd.DataFrame], spec: MatomoSpec, stats: dict[str, int]
) -> list[pd.DataFrame]:
    tables = {name: _matomo_table(raw, name, stats) for name in MATOMO_COLUMNS}
    other_site = 0
    for name in ("log_visit", "log_link_visit_action", "log_conversion", "log_conversion_item"):
        on_site = tables[name]["idsite"].isin(spec.sites).fillna(False).to_numpy(dtype=bool)
        other_site += int((~on_site).sum())
        tables[name] = tables[name][on_site]
    stats["matomo.other_site_rows"] = other_site

    dictionary = _Dictionary.build(tables["log_action"], spec)
    visits = _visits(tables["log_visit"], spec, stats)
    parts = _matomo_actions(tables["log_link_visit_action"], dictionary, visits, spec, stats)
    parts.append(_cart_adds(tables["log_conversion_item"], dictionary, visits, spec, stats))
    parts.append(
        _purchases(
            tables["log_conversion"], tables["log_conversion_item"], dictionary, visits, spec, stats
        )
    )
    stats["matomo.dropped_unmapped_item"] = (
        stats["matomo.events.unmapped_item"]
        + stats["matomo.cart_adds.unmapped_sku"]
        + stats["matomo.order_lines.unmapped_sku"]
    )
    return parts


def _visits(log_visit: pd.DataFrame, spec: MatomoSpec, stats: dict[str, int]) -> _Visits:
    index = pd.Index(log_visit["idvisit"].array, dtype="Int64")
    raw_user = log_visit["user_id"].astype("string")
    user_id = extract_id(raw_user, spec.user_from_user_id)
    has_raw_user = raw_user.fillna("").ne("").to_numpy(dtype=bool)
    stats["matomo.visits"] = len(log_visit)
    stats["matomo.visits.stitched"] = int(user_id.notna().sum())
    stats["matomo.visits.user_id_unparsed"] = int((has_raw_user & user_id.isna().to_numpy()).sum())
    return _Visits(
        ids=index,
        visitor_id=pd.Series(lower_hex(log_visit["idvisitor"]).array, index=index),
        user_id=pd.Series(user_id.array, index=index),
    )


def _matomo_actions(
    actions: pd.DataFrame,
    dictionary: _Dictionary,
    visits: _Visits,
    spec: MatomoSpec,
    stats: dict[str, int],
) -> list[pd.DataFrame]:
    is_event = _present(actions["idaction_event_category"])
    is_search = ~is_event & actions["idaction_name"].isin(dictionary.keywords.index).to_numpy(
        dtype=bool
    )
    is_page = (
        ~is_event
        & ~is_search
        & actions["idaction_url"].isin(dictionary.page_urls).to_numpy(dtype=bool)
    )
    stats["matomo.actions"] = len(actions)
    stats["matomo.actions.without_visit"] = int(
        (~actions["idvisit"].isin(visits.ids).to_numpy(dtype=bool)).sum()
    )
    # Outlinks, downloads, content interactions, and rows whose log_action is not extracted yet.
    stats["matomo.actions.ignored"] = int((~(is_event | is_search | is_page)).sum())
    return [
        _pageviews(actions[is_page], dictionary, visits, stats),
        _events(actions[is_event], dictionary, visits, spec, stats),
        _searches(actions[is_search], dictionary, visits, spec, stats),
    ]


def _pageviews(
    rows: pd.DataFrame, dictionary: _Dictionary, visits: _Visits, stats: dict[str, int]
) -> pd.DataFrame:
    """Detail views by SKU, else by URL; other pageviews are kept as item-less ``view`` rows.

    Plain views are kept because activity features (pages per session, recency) count them. A
    pageview whose SKU does not map to an item is not a detail view, and the URL is not tried:
    the page declared a product we do not know, so a URL match would credit the wrong item.
    """
    has_sku = _present(rows["idaction_product_sku"])
    sku_item = _lookup(rows["idaction_product_sku"], dictionary.sku_items)
    url_item = _lookup(rows["idaction_url"], dictionary.url_items)
    item = sku_item.where(has_sku, url_item)
    is_detail = item.notna().to_numpy(dtype=bool)
    stats["matomo.detail_views"] = int(is_detail.sum())
    stats["matomo.detail_views.from_url"] = int((is_detail & ~has_sku).sum())
    stats["matomo.detail_views.unmapped_sku"] = int((has_sku & ~is_detail).sum())
    stats["matomo.views"] = int((~is_detail).sum())
    return _interactions(
        rows.index,
        event=pd.Series(np.where(is_detail, "detail_view", "view"), index=rows.index),
        source=MATOMO,
        ts=rows["server_time"],
        item_id=item,
        ref=_ref("matomo.log_link_visit_action", rows, ("idlink_va",)),
        **visits.identity(rows["idvisit"]),
    )


def _events(
    rows: pd.DataFrame,
    dictionary: _Dictionary,
    visits: _Visits,
    spec: MatomoSpec,
    stats: dict[str, int],
) -> pd.DataFrame:
    """Map (category, action) to a canonical event; the event name is the item's SKU.

    When the name gives no item, the item is the page's product: the tracker copies the
    product view's SKU onto every later request of the page. Events without a mapping or
    without an item are dropped (and counted): every mapped event is about an item.
    """
    keys = pd.DataFrame(
        {
            "category": _lookup(rows["idaction_event_category"], dictionary.categories).array,
            "action": _lookup(rows["idaction_event_action"], dictionary.actions).array,
        }
    )
    mapping = pd.DataFrame(
        list(spec.events), columns=["category", "action", "event"], dtype="string"
    )
    # The first mapping of a pair wins; a duplicate must not multiply rows in the merge.
    mapping = mapping.drop_duplicates(["category", "action"])
    event = pd.Series(
        keys.merge(mapping, how="left", on=["category", "action"])["event"].array,
        index=rows.index,
        dtype="string",
    )
    name_item = _lookup(rows["idaction_name"], dictionary.event_name_items)
    page_item = _lookup(rows["idaction_product_sku"], dictionary.sku_items)
    item = name_item.where(name_item.notna(), page_item)

    mapped = event.notna().to_numpy(dtype=bool)
    has_item = item.notna().to_numpy(dtype=bool)
    keep = mapped & has_item
    stats["matomo.events"] = len(rows)
    stats["matomo.events.unmapped"] = int((~mapped).sum())
    stats["matomo.events.unmapped_item"] = int((mapped & ~has_item).sum())
    stats["matomo.events.item_from_page"] = int((keep & name_item.isna().to_numpy()).sum())
    for name in sorted({e for _, _, e in spec.events}):
        stats[f"matomo.events_by_type.{name}"] = int(
            (keep & event.eq(name).fillna(False).to_numpy()).sum()
        )
    rows = rows[keep]
    return _interactions(
        rows.index,
        event=event[keep],
        source=MATOMO,
        ts=rows["server_time"],
        item_id=item[keep],
        ref=_ref("matomo.log_link_visit_action", rows, ("idlink_va",)),
        **visits.identity(rows["idvisit"]),
    )


def _searches(
    rows: pd.DataFrame,
    dictionary: _Dictionary,
    visits: _Visits,
    spec: MatomoSpec,
    stats: dict[str, int],
) -> pd.DataFrame:
    stats["matomo.searches"] = len(rows)
    return _interactions(
        rows.index,
        event=spec.site_search_event,
        source=MATOMO,
        ts=rows["server_time"],
        query=_lookup(rows["idaction_name"], dictionary.keywords),
        ref=_ref("matomo.log_link_visit_action", rows, ("idlink_va",)),
        **visits.identity(rows["idvisit"]),
    )


def _cart_adds(
    items: pd.DataFrame,
    dictionary: _Dictionary,
    visits: _Visits,
    spec: MatomoSpec,
    stats: dict[str, int],
) -> pd.DataFrame:
    """One cart addition per (visit, SKU) that ever sat in the visit's cart.

    Matomo has no add-to-cart action; a cart update sends the whole cart, so additions are
    the differences between cart snapshots. The lake keeps only the latest state of a visit's
    conversion items, not the snapshots in between, so this is an approximation: any item row
    of the visit (the open cart, idorder '0', or a cart re-tagged to an order, deleted or not)
    means the SKU was added at some point. A SKU added and later removed still counts, which is
    what happened. A SKU added again after an order in the same visit counts once. The time is
    the earliest ``server_time`` among the SKU's rows; Matomo moves it on every cart update, so
    it is the last update that still held the SKU rather than the moment of the click.

    The ref ``matomo.log_conversion_item:<idvisit>:<idaction_sku>`` leaves out ``idorder`` on
    purpose: it stays the same when the cart row is re-tagged to an order.
    """
    first = items.sort_values(["idvisit", "idaction_sku", "server_time"], kind="stable")
    first = first.drop_duplicates(["idvisit", "idaction_sku"], keep="first")
    item = _lookup(first["idaction_sku"], dictionary.sku_items)
    mapped = item.notna().to_numpy(dtype=bool)
    stats["matomo.cart_adds"] = int(mapped.sum())
    stats["matomo.cart_adds.unmapped_sku"] = int((~mapped).sum())
    rows = first[mapped]
    return _interactions(
        rows.index,
        event=spec.cart_add_event,
        source=MATOMO,
        ts=rows["server_time"],
        item_id=item[mapped],
        quantity=rows["quantity"].fillna(1),
        ref=_ref("matomo.log_conversion_item", rows, ("idvisit", "idaction_sku")),
        **visits.identity(rows["idvisit"]),
    )


def _purchases(
    conversions: pd.DataFrame,
    items: pd.DataFrame,
    dictionary: _Dictionary,
    visits: _Visits,
    spec: MatomoSpec,
    stats: dict[str, int],
) -> pd.DataFrame:
    """Order lines: ``idgoal = 0`` conversions joined to their live (``deleted = 0``) items.

    The line value is unit price x quantity: ``log_conversion.revenue`` is a FLOAT column and
    covers the whole order (tax, shipping, discount), so it cannot be split over lines.
    """
    is_order = conversions["idgoal"].eq(IDGOAL_ORDER).fillna(False).to_numpy(dtype=bool)
    orders = conversions.loc[is_order, ["idvisit", "idorder", "server_time"]]
    orders = orders.drop_duplicates(["idvisit", "idorder"], keep="last")
    live = items["deleted"].fillna(0).eq(0).to_numpy(dtype=bool)
    lines = items.loc[live, ["idvisit", "idorder", "idaction_sku", "price", "quantity"]]
    lines = lines.merge(orders, on=["idvisit", "idorder"], how="inner")
    order_keys = pd.MultiIndex.from_frame(orders[["idvisit", "idorder"]])
    deleted_lines = items.loc[~live, ["idvisit", "idorder"]]
    item = _lookup(lines["idaction_sku"], dictionary.sku_items)
    mapped = item.notna().to_numpy(dtype=bool)
    stats["matomo.orders"] = len(orders)
    stats["matomo.orders.without_lines"] = int(
        (~order_keys.isin(pd.MultiIndex.from_frame(lines[["idvisit", "idorder"]]))).sum()
    )
    stats["matomo.order_lines"] = int(mapped.sum())
    stats["matomo.order_lines.deleted"] = int(
        pd.MultiIndex.from_frame(deleted_lines).isin(order_keys).sum()
    )
    stats["matomo.order_lines.unmapped_sku"] = int((~mapped).sum())
    rows = lines[mapped]
    quantity = rows["quantity"].fillna(1)
    return _interactions(
        rows.index,
        event=spec.orders_event,
        source=MATOMO,
        ts=rows["server_time"],
        item_id=item[mapped],
        value=rows["price"] * quantity.astype("float64"),
        quantity=quantity,
        order_id=rows["idorder"],
        ref=_ref("matomo.log_conversion_item", rows, ("idvisit", "idorder", "idaction_sku")),
        **visits.identity(rows["idvisit"]),
    )


# --- assembling ---------------------------------------------------------------------------------


def _interactions(index: pd.Index, **columns: Any) -> pd.DataFrame:
    """One canonical interactions frame; scalars broadcast, absent columns are null."""
    columns.setdefault("value", 0.0)
    columns.setdefault("quantity", 1)
    frame = pd.DataFrame(columns, index=index)
    return schema.conform(frame, schema.INTERACTIONS)


def _combine(parts: list[pd.DataFrame], items: pd.DataFrame, stats: dict[str, int]) -> pd.DataFrame:
    non_empty = [p for p in parts if len(p)]
    if not non_empty:
        frame = schema.empty_frame(schema.INTERACTIONS)
    else:
        frame = pd.concat(non_empty, ignore_index=True)
    # Refs are unique by construction: every source table was deduplicated on its key.
    frame = frame.sort_values("ts", kind="stable", ignore_index=True)
    stats["interactions"] = len(frame)
    for event, count in frame["event"].value_counts(dropna=False).sort_index().items():
        stats[f"interactions_by_event.{event}"] = int(count)
    unknown = frame["item_id"].notna() & ~frame["item_id"].isin(items["item_id"])
    stats["interactions.item_not_in_catalogue"] = int(unknown.sum())
    return frame


# --- helpers ------------------------------------------------------------------------------------


def lower_hex(values: pd.Series) -> pd.Series:
    """``LOWER(HEX(idvisitor))`` for a Series of ``bytes`` (null stays null), vectorised."""
    out = np.full(len(values), None, dtype=object)
    present = values.notna().to_numpy(dtype=bool)
    if present.any():
        packed = np.array(values[present].tolist(), dtype="S")
        # MySQL right-pads BINARY(8) with 0x00, and numpy pads shorter values the same way.
        width = max(packed.dtype.itemsize, 8)
        octets = packed.astype(f"S{width}").view(np.uint8).reshape(-1, width)
        chars = np.empty((len(octets), 2 * width), dtype=np.uint8)
        chars[:, 0::2] = _HEX_DIGITS[octets >> 4]
        chars[:, 1::2] = _HEX_DIGITS[octets & 0x0F]
        out[present] = chars.view(f"S{2 * width}").ravel().astype(f"U{2 * width}")
    return pd.Series(pd.array(out, dtype="string"), index=values.index)


def extract_id(values: pd.Series, pattern: str | None) -> pd.Series:
    """The integer id captured by ``pattern``'s one group (``re.search``); null when none.

    A capture that is not 1-18 digits (too big for int64, or not a number) is null too.
    """
    if pattern is None or values.empty:
        return pd.Series(pd.NA, index=values.index, dtype="Int64")
    captured = values.astype("string").str.extract(pattern, expand=False).astype("string")
    digits = captured.str.fullmatch(r"[0-9]{1,18}").fillna(False).to_numpy(dtype=bool)
    return captured.where(digits).astype("Int64")


def _unescape(names: pd.Series) -> pd.Series:
    """``html.unescape`` where a name holds an entity (Matomo escapes titles, keywords, events)."""
    names = names.astype("string")
    escaped = names.str.contains("&", regex=False).fillna(False).to_numpy(dtype=bool)
    if not escaped.any():
        return names
    out = names.copy()
    # Runs once per distinct log_action string, never per action row.
    out[escaped] = names[escaped].map(html.unescape)
    return out


def _lookup(keys: pd.Series, table: pd.Series) -> pd.Series:
    """``table[key]`` for every key, aligned to ``keys``; null for null or unknown keys."""
    positions = table.index.get_indexer(keys.astype("Int64"))
    return pd.Series(table.array.take(positions, allow_fill=True), index=keys.index)


def _present(ids: pd.Series) -> np.ndarray:
    """An ``idaction_*`` reference is set: not null and not 0 (Matomo writes 0 for empty)."""
    return ids.fillna(0).ne(0).to_numpy(dtype=bool)


def _matches(series: pd.Series, values: list[Any]) -> np.ndarray:
    """``series`` is one of ``values``, comparing natively and as text (YAML ``1`` vs ``"1"``)."""
    native = series.isin(values).fillna(False).to_numpy(dtype=bool)
    text = series.astype("string").isin([str(v) for v in values]).fillna(False)
    return native | text.to_numpy(dtype=bool)


def _as_list(values: Any) -> list[Any]:
    if values is None:
        return []
    return list(values) if isinstance(values, list | tuple | set) else [values]


def _renamed(table: pd.DataFrame, columns: Mapping[str, str]) -> pd.DataFrame:
    """Canonical name -> source column, as the contract maps them."""
    return pd.DataFrame(
        {canon: table[source] for canon, source in columns.items()}, index=table.index
    )


def _column(rows: pd.DataFrame, name: str | None, default: Any = None) -> Any:
    return rows[name] if name else default


def _ref(prefix: str, rows: pd.DataFrame, key: Iterable[str]) -> pd.Series:
    """``<prefix>:<k1>:<k2>...``; unambiguous because only the middle part can hold ``:``."""
    ref = pd.Series(prefix, index=rows.index, dtype="string")
    for column in key:
        ref = ref + ":" + rows[column].astype("string")
    return ref


def _business_table(
    raw: Mapping[str, pd.DataFrame], contract: Contract, dotted: str, stats: dict[str, int]
) -> pd.DataFrame:
    spec = contract.table(dotted)
    columns = {name: _LAKE_DTYPES[kind] for name, kind in spec.columns.items()}
    return _table(raw, dotted, columns, spec.primary_key, stats)


def _matomo_table(
    raw: Mapping[str, pd.DataFrame], name: str, stats: dict[str, int]
) -> pd.DataFrame:
    return _table(raw, f"{MATOMO}.{name}", MATOMO_COLUMNS[name], MATOMO_KEYS[name], stats)


def _table(
    raw: Mapping[str, pd.DataFrame],
    dotted: str,
    columns: Mapping[str, str],
    key: tuple[str, ...],
    stats: dict[str, int],
) -> pd.DataFrame:
    """The raw table deduplicated on its key, or an empty one when it was never extracted.

    A consistent lake holds each key once; a batch read twice (say, a lookback re-read
    before compaction) must not count behaviour twice. The latest copy wins.
    """
    frame = raw.get(dotted)
    if frame is None:
        frame = pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in columns.items()})
    missing = [name for name in (*columns, *key) if name not in frame.columns]
    if missing:
        raise ValueError(f"{dotted}: missing column(s) {', '.join(dict.fromkeys(missing))}")
    duplicate = frame.duplicated(list(key), keep="last").to_numpy(dtype=bool)
    stats[f"raw_duplicates.{dotted}"] = int(duplicate.sum())
    return frame[~duplicate].reset_index(drop=True)
