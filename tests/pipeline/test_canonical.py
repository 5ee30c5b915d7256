"""build_canonical: raw business and Matomo tables -> canonical users, items, interactions.

One small hand-built world with a known answer (``world()``); each test changes only what its
rule needs. The Matomo rows follow how Matomo really records behaviour
(../shared/reference/matomo.md): event rows on a product page carry the page's SKU, a User ID
set mid-visit rewrites only log_visit.idvisitor, an order re-tags the cart's item rows.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from apps.pipeline import schema
from apps.pipeline.canonical import (
    CanonicalFrames,
    build_canonical,
    extract_id,
    lower_hex,
    normalise_tags,
)
from apps.pipeline.sources.contract import Contract, load_contract

CONTRACT_PATH = Path(__file__).resolve().parents[2] / "config" / "sources.yaml"

LAKE_DTYPES = {
    "integer": "Int64",
    "float": "float64",
    "decimal": "float64",
    "string": "string",
    "text": "string",
    "datetime": "datetime64[ns]",
    "binary": "object",
    "boolean": "boolean",
}

Rows = dict[str, list[dict[str, Any]]]

# Naive UTC, as the lake delivers source DATETIMEs.
T0 = dt.datetime(2024, 5, 1, 10, 0, 0, tzinfo=dt.UTC).replace(tzinfo=None)


def at(minutes: int) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


# The visit's idvisitor after login (sha1(user_id)[:16]) and the cookie id the earlier action
# rows keep (visit 81 of Matomo's OmniFixture behaves exactly like this).
VISITOR_AFTER_LOGIN = "9395988394d4568d"
COOKIE_BEFORE_LOGIN = "6be121d126d93581"
ANONYMOUS_VISITOR = "00000000000000ff"


@pytest.fixture(scope="module")
def contract() -> Contract:
    return load_contract(CONTRACT_PATH)


def world() -> Rows:
    """Business: 2 users, 2 datasets, 2 orders (1 paid), 1 task. Matomo site 1, plus site 2."""
    return {
        "business.user": [
            {"id": 1, "username": "alice", "company_name": "Acme", "created_at": at(-999)},
            {"id": 2, "username": "bob", "company_name": "Bobco", "created_at": at(-998)},
        ],
        "business.dataset": [
            {
                "id": 10,
                "dataset_name": "Weather",
                "tag": " Climate, WEATHER ,,climate",
                "price": 9.5,
                "status": 1,
                "created_at": at(-900),
                "updated_at": at(-800),
            },
            {
                "id": 11,
                "dataset_name": "Traffic",
                "tag": None,
                "price": 5.0,
                "status": 0,
                "created_at": at(-900),
                "updated_at": at(-800),
            },
        ],
        "business.api_order": [
            {
                "id": 100,
                "order_no": "ORD-1",
                "user_id": 1,
                "dataset_id": 10,
                "amount": 20.0,
                "status": "paid",
                "created_at": at(30),
            },
            {
                "id": 101,
                "order_no": "ORD-2",
                "user_id": 2,
                "dataset_id": 11,
                "amount": 5.0,
                "status": "pending",
                "created_at": at(31),
            },
        ],
        "business.task": [{"id": 200, "user_id": 2, "dataset_id": 11, "created_at": at(40)}],
        "matomo.log_action": [
            {"idaction": 1, "type": 1, "name": "shop.example.com/datasets/10", "url_prefix": 2},
            {
                "idaction": 2,
                "type": 1,
                "name": "shop.example.com/search?q=weather",
                "url_prefix": 2,
            },
            {"idaction": 3, "type": 5, "name": "DS-10"},
            {"idaction": 4, "type": 5, "name": "SKU-XYZ"},
            {"idaction": 5, "type": 10, "name": "Dataset"},
            {"idaction": 6, "type": 11, "name": "Favorite"},
            {"idaction": 7, "type": 12, "name": "DS-10"},
            {"idaction": 8, "type": 8, "name": "weather &amp; climate"},
            # An event's page URL is stored with type 10, not 1.
            {"idaction": 9, "type": 10, "name": "shop.example.com/datasets/10", "url_prefix": 2},
            {"idaction": 10, "type": 4, "name": "Weather dataset"},
            {"idaction": 11, "type": 1, "name": "shop.example.com/plans/pro", "url_prefix": 2},
            {"idaction": 12, "type": 5, "name": "DS-11"},
            {"idaction": 13, "type": 11, "name": "Share"},
        ],
        "matomo.log_visit": [
            {
                "idvisit": 500,
                "idsite": 1,
                "idvisitor": bytes.fromhex(VISITOR_AFTER_LOGIN),
                "user_id": "1",
            },
            {
                "idvisit": 501,
                "idsite": 1,
                "idvisitor": bytes.fromhex(ANONYMOUS_VISITOR),
                "user_id": None,
            },
            {"idvisit": 502, "idsite": 2, "idvisitor": b"\x01" * 8, "user_id": "2"},
            {
                "idvisit": 503,
                "idsite": 1,
                "idvisitor": b"\x02" * 8,
                "user_id": "alice@example.com",
            },
        ],
        "matomo.log_link_visit_action": [
            # Product page viewed before login: the row keeps the cookie idvisitor.
            _action(1000, 500, 0, url=1, name=10, sku=3, visitor=COOKIE_BEFORE_LOGIN),
            # Favorite clicked on that page: the tracker copied the page's SKU onto the event.
            _action(1001, 500, 1, url=9, name=7, sku=3, category=5, action=6),
            _action(1002, 501, 2, name=8),  # site search: no URL, keyword in idaction_name
            _action(1003, 501, 3, url=2),  # search results page: no product
            _action(1004, 501, 4, url=1),  # dataset page without setEcommerceView
            _action(1005, 501, 5, url=11, sku=4),  # product view whose SKU names no dataset
            _action(1006, 502, 6, url=1, sku=3, site=2),
            _action(1007, 501, 7, url=9, name=7, category=5, action=13),  # unmapped event
            _action(1008, 503, 8, url=1, sku=12),
        ],
        "matomo.log_conversion": [
            # The visit's cart row, rewritten in place into the order row.
            {
                "idvisit": 500,
                "idsite": 1,
                "idgoal": 0,
                "buster": 7,
                "idorder": "ORD-1",
                "revenue": 30.0,
                "server_time": at(30),
            },
            {
                "idvisit": 501,
                "idsite": 1,
                "idgoal": -1,
                "buster": 0,
                "idorder": None,
                "revenue": 10.0,
                "server_time": at(20),
            },
            {
                "idvisit": 502,
                "idsite": 2,
                "idgoal": 0,
                "buster": 9,
                "idorder": "ORD-X",
                "revenue": 10.0,
                "server_time": at(21),
            },
        ],
        "matomo.log_conversion_item": [
            _item(500, "ORD-1", sku=3, price=10.0, quantity=2, minutes=30),
            # Removed from the cart before checkout: re-tagged to the order with deleted = 1.
            _item(500, "ORD-1", sku=12, price=5.0, quantity=1, minutes=30, deleted=1),
            _item(501, "0", sku=3, price=10.0, quantity=1, minutes=20),
            _item(501, "0", sku=4, price=3.0, quantity=1, minutes=20),
            _item(502, "ORD-X", sku=3, price=10.0, quantity=1, minutes=21, site=2),
        ],
    }


def _action(
    idlink_va: int,
    idvisit: int,
    minutes: int,
    *,
    url: int | None = None,
    name: int | None = None,
    sku: int | None = None,
    category: int | None = None,
    action: int | None = None,
    site: int = 1,
    visitor: str = "aaaaaaaaaaaaaaaa",
) -> dict[str, Any]:
    return {
        "idlink_va": idlink_va,
        "idsite": site,
        "idvisitor": bytes.fromhex(visitor),
        "idvisit": idvisit,
        "server_time": at(minutes),
        "idaction_url": url,
        "idaction_name": name,
        "idaction_product_sku": sku,
        "idaction_event_category": category,
        "idaction_event_action": action,
    }


def _item(
    idvisit: int,
    idorder: str,
    *,
    sku: int,
    price: float,
    quantity: int,
    minutes: int,
    deleted: int = 0,
    site: int = 1,
) -> dict[str, Any]:
    return {
        "idsite": site,
        "idvisitor": b"\x00" * 8,
        "server_time": at(minutes),
        "idvisit": idvisit,
        "idorder": idorder,
        "idaction_sku": sku,
        "price": price,
        "quantity": quantity,
        "deleted": deleted,
    }


def to_raw(contract: Contract, rows: Rows) -> dict[str, pd.DataFrame]:
    """Frames with exactly the contract's columns and the lake's dtypes."""
    raw = {}
    for dotted, records in rows.items():
        columns = contract.table(dotted).columns
        raw[dotted] = pd.DataFrame(
            {
                col: pd.Series([r.get(col) for r in records], dtype=LAKE_DTYPES[kind])
                for col, kind in columns.items()
            }
        )
    return raw


def build(contract: Contract, rows: Rows) -> CanonicalFrames:
    return build_canonical(to_raw(contract, rows), contract)


def by_ref(result: CanonicalFrames) -> pd.DataFrame:
    return result.interactions.set_index("ref")


def with_matomo(contract: Contract, **overrides: Any) -> Contract:
    canonical = copy.deepcopy(dict(contract.canonical))
    canonical["matomo"].update(overrides)
    return dataclasses.replace(contract, canonical=canonical)


ACTION = "matomo.log_link_visit_action:"


# --- business -----------------------------------------------------------------------------------


def test_users_and_items_are_mapped_with_normalised_tags_and_the_active_flag(contract):
    # given the world's two users and two datasets (one with messy tags, one inactive)
    # when it is mapped
    result = build(contract, world())

    # then users and items carry canonical names, UTC timestamps and normalised tags
    assert result.users["user_id"].tolist() == [1, 2]
    assert result.users["company"].tolist() == ["Acme", "Bobco"]
    items = result.items.set_index("item_id")
    assert items.loc[10, "tags"] == "climate,weather"
    assert pd.isna(items.loc[11, "tags"])
    assert items["is_active"].to_dict() == {10: True, 11: False}
    assert items.loc[10, "price"] == 9.5
    assert str(result.items["created_at"].dtype) == schema.UTC_TS
    assert items.loc[10, "created_at"] == pd.Timestamp(at(-900), tz="UTC")
    assert result.stats["items.active"] == 1


def test_business_events_are_filtered_by_where_and_refer_to_their_source_rows(contract):
    # given one paid and one pending order, and one task
    # when it is mapped
    result = build(contract, world())
    business = result.interactions[result.interactions["source"] == "business"]

    # then only the paid order is a purchase, and the task is a task event
    assert sorted(business["ref"]) == ["business.api_order:100", "business.task:200"]
    purchase = by_ref(result).loc["business.api_order:100"]
    assert purchase["event"] == "purchase"
    assert (purchase["user_id"], purchase["item_id"]) == (1, 10)
    assert purchase["value"] == 20.0
    assert purchase["order_id"] == "ORD-1"
    assert purchase["ts"] == pd.Timestamp(at(30), tz="UTC")
    task = by_ref(result).loc["business.task:200"]
    assert (task["event"], task["value"], task["quantity"]) == ("task", 0.0, 1)
    assert result.stats["business.api_order.purchase.filtered_out"] == 1


def test_tags_are_split_trimmed_lower_cased_and_deduplicated_in_order():
    # given tags with padding, mixed case, repeats and empty parts
    tags = pd.Series(["B, a ,b", " , ", None, "Solo"], dtype="string")

    # when they are normalised with ',' as the separator
    out = normalise_tags(tags, ",")

    # then each item has one lower-case comma-joined string, null when it has no tag
    assert out.tolist()[0] == "b,a"
    assert pd.isna(out[1])
    assert pd.isna(out[2])
    assert out[3] == "solo"


# --- Matomo: detail views -----------------------------------------------------------------------


def test_a_product_pageview_is_a_detail_view_of_the_item_its_sku_names(contract):
    # given pageview 1000 on a product page with SKU DS-10
    # when it is mapped
    row = by_ref(build(contract, world())).loc[ACTION + "1000"]

    # then it is a detail view of dataset 10 in session m500
    assert (row["event"], row["item_id"]) == ("detail_view", 10)
    assert (row["source"], row["session_id"]) == ("matomo", "m500")


def test_an_event_on_a_product_page_carrying_the_sku_is_not_a_detail_view(contract):
    # given favourite event 1001 whose row carries the page's SKU (as the tracker does)
    # when it is mapped
    result = build(contract, world())
    interactions = by_ref(result)

    # then it is a favourite, and the page has exactly one detail view, from its pageview
    assert interactions.loc[ACTION + "1001", "event"] == "favorite"
    assert interactions.loc[ACTION + "1001", "item_id"] == 10
    views_in_visit = interactions[
        (interactions["session_id"] == "m500") & (interactions["event"] == "detail_view")
    ]
    assert views_in_visit.index.tolist() == [ACTION + "1000"]
    assert result.stats["matomo.events_by_type.favorite"] == 1


def test_a_pageview_without_sku_is_a_detail_view_when_its_url_names_an_item(contract):
    # given a dataset page without setEcommerceView, and a search results page
    # when it is mapped
    interactions = by_ref(build(contract, world()))

    # then the dataset page is a detail view of dataset 10, the other page an item-less view
    assert interactions.loc[ACTION + "1004", "event"] == "detail_view"
    assert interactions.loc[ACTION + "1004", "item_id"] == 10
    assert interactions.loc[ACTION + "1003", "event"] == "view"
    assert pd.isna(interactions.loc[ACTION + "1003", "item_id"])


def test_a_sku_that_does_not_match_the_pattern_is_counted_and_yields_no_item(contract):
    # given product views and a cart line whose SKU 'SKU-XYZ' does not match ^DS-(\d+)$, one
    # of the views on a URL that names dataset 10
    rows = world()
    rows["matomo.log_link_visit_action"].append(_action(1040, 501, 9, url=1, sku=4))

    # when it is mapped
    result = build(contract, rows)
    interactions = by_ref(result)

    # then the product views are not detail views (the URL does not override the declared SKU;
    # they are kept as plain views) and the cart line is dropped; all are counted
    for ref in (ACTION + "1005", ACTION + "1040"):
        assert interactions.loc[ref, "event"] == "view"
        assert pd.isna(interactions.loc[ref, "item_id"])
    assert "matomo.log_conversion_item:501:4" not in interactions.index
    assert result.stats["matomo.detail_views.unmapped_sku"] == 2
    assert result.stats["matomo.cart_adds.unmapped_sku"] == 1
    assert result.stats["matomo.dropped_unmapped_item"] == 1


# --- Matomo: identity ---------------------------------------------------------------------------


def test_actions_before_a_mid_visit_login_are_attributed_to_the_visit_user(contract):
    # given pageview 1000 whose row carries the pre-login cookie id, in visit 500 of user 1
    # when it is mapped
    row = by_ref(build(contract, world())).loc[ACTION + "1000"]

    # then identity comes from log_visit: user 1 and the visit's (post-login) visitor id
    assert row["user_id"] == 1
    assert row["visitor_id"] == VISITOR_AFTER_LOGIN
    assert row["visitor_id"] != COOKIE_BEFORE_LOGIN


def test_an_unparseable_user_id_leaves_the_user_null_but_keeps_the_visitor(contract):
    # given visit 503 whose user_id is an e-mail address, not a business id
    # when it is mapped
    result = build(contract, world())
    row = by_ref(result).loc[ACTION + "1008"]

    # then the detail view is anonymous but still has the visitor id
    assert pd.isna(row["user_id"])
    assert row["visitor_id"] == "0202020202020202"
    assert row["item_id"] == 11
    assert result.stats["matomo.visits.stitched"] == 1
    assert result.stats["matomo.visits.user_id_unparsed"] == 1


def test_the_visitor_id_is_the_lower_hex_of_the_binary_idvisitor():
    # given BINARY(8) values, one ending in zero bytes, and a null
    values = pd.Series([bytes.fromhex("9395988394D4568D"), b"\xab\x00\x00", None], dtype=object)

    # when they are converted
    out = lower_hex(values)

    # then each is 16 lower-case hex chars (BINARY pads with 0x00), null stays null
    assert out.tolist()[:2] == ["9395988394d4568d", "ab00000000000000"]
    assert pd.isna(out[2])


def test_an_id_is_extracted_only_when_the_capture_is_a_number():
    # given SKUs that match, do not match, or capture something that is no number
    values = pd.Series(["DS-12", "SKU-1", "DS-", None, "DS-0007"], dtype="string")

    # when ids are extracted with the contract's kind of pattern
    out = extract_id(values, r"^DS-(\d*)$")

    # then only numeric captures become ids
    assert out.tolist()[0] == 12
    assert out.isna().tolist() == [False, True, True, True, False]
    assert out[4] == 7


# --- Matomo: events and site search --------------------------------------------------------------


def test_html_escaped_event_categories_and_search_keywords_are_unescaped(contract):
    # given an event category stored escaped ('Data &amp; AI') mapped as 'Data & AI'
    rows = world()
    rows["matomo.log_action"].append({"idaction": 20, "type": 10, "name": "Data &amp; AI"})
    rows["matomo.log_link_visit_action"].append(
        _action(1020, 501, 9, url=9, name=7, category=20, action=6)
    )
    events = [*contract.canonical["matomo"]["events"]]
    events.append({"category": "Data & AI", "action": "Favorite", "event": "favorite"})

    # when it is mapped
    interactions = by_ref(build(with_matomo(contract, events=events), rows))

    # then the event maps, and the site-search keyword is unescaped too
    assert interactions.loc[ACTION + "1020", "event"] == "favorite"
    search = interactions.loc[ACTION + "1002"]
    assert (search["event"], search["query"]) == ("search", "weather & climate")
    assert pd.isna(search["item_id"])


def test_unmapped_events_are_dropped_and_counted(contract):
    # given event 1007 'Dataset' / 'Share', which the contract does not map
    # when it is mapped
    result = build(contract, world())

    # then it produces no interaction and is counted
    assert ACTION + "1007" not in by_ref(result).index
    assert result.stats["matomo.events"] == 2
    assert result.stats["matomo.events.unmapped"] == 1


def test_an_event_without_a_usable_name_takes_the_item_of_the_page_product(contract):
    # given a favourite without an event name on the DS-11 product page
    rows = world()
    rows["matomo.log_link_visit_action"].append(
        _action(1030, 501, 9, url=9, sku=12, category=5, action=6)
    )

    # when it is mapped
    result = build(contract, rows)

    # then the favourite is of dataset 11, the page's product
    assert by_ref(result).loc[ACTION + "1030", "item_id"] == 11
    assert result.stats["matomo.events.item_from_page"] == 1


# --- Matomo: cart and orders --------------------------------------------------------------------


def test_a_cart_turned_into_an_order_makes_a_deleted_line_an_add_to_cart_but_not_a_purchase(
    contract,
):
    # given visit 500's cart, turned into order ORD-1 with DS-10 bought and DS-11 deleted
    # when it is mapped
    result = build(contract, world())
    interactions = by_ref(result)
    visit = interactions[interactions["session_id"] == "m500"]

    # then both SKUs were added to the cart, but only DS-10 was purchased
    adds = visit[visit["event"] == "add_to_cart"]
    assert sorted(adds["item_id"]) == [10, 11]
    purchases = visit[(visit["event"] == "purchase")]
    assert purchases.index.tolist() == ["matomo.log_conversion_item:500:ORD-1:3"]
    assert result.stats["matomo.order_lines.deleted"] == 1


def test_an_open_cart_line_is_an_add_to_cart_attributed_through_the_visit(contract):
    # given visit 501's open cart (idorder '0') holding DS-10
    # when it is mapped
    row = by_ref(build(contract, world())).loc["matomo.log_conversion_item:501:3"]

    # then it is an addition of dataset 10 by the anonymous visitor, at the cart's time
    assert (row["event"], row["item_id"], row["quantity"]) == ("add_to_cart", 10, 1)
    assert row["visitor_id"] == ANONYMOUS_VISITOR
    assert row["ts"] == pd.Timestamp(at(20), tz="UTC")


def test_a_sku_in_an_order_and_again_in_a_new_cart_is_one_add_to_cart_at_the_earliest_time(
    contract,
):
    # given DS-10 ordered at +30 min and put in a new cart of the same visit at +50 min
    rows = world()
    rows["matomo.log_conversion_item"].append(
        _item(500, "0", sku=3, price=10.0, quantity=4, minutes=50)
    )

    # when it is mapped
    interactions = build(contract, rows).interactions
    adds = interactions[
        (interactions["event"] == "add_to_cart") & (interactions["session_id"] == "m500")
    ]

    # then there is one addition per (visit, SKU), dated by the earliest row
    ds10 = adds[adds["item_id"] == 10]
    assert len(ds10) == 1
    assert ds10["ts"].iloc[0] == pd.Timestamp(at(30), tz="UTC")


def test_a_purchase_is_valued_at_item_price_times_quantity_not_order_revenue(contract):
    # given order ORD-1 with revenue 30.0 (incl. shipping) and one line 2 x 10.0
    # when it is mapped
    row = by_ref(build(contract, world())).loc["matomo.log_conversion_item:500:ORD-1:3"]

    # then the line is worth 20.0, keeps its order id and is the visit user's
    assert (row["event"], row["source"]) == ("purchase", "matomo")
    assert (row["value"], row["quantity"]) == (20.0, 2)
    assert (row["order_id"], row["user_id"], row["item_id"]) == ("ORD-1", 1, 10)


def test_an_order_without_lines_is_counted_and_emits_nothing(contract):
    # given an order of visit 501 with no conversion items
    rows = world()
    rows["matomo.log_conversion"].append(
        {
            "idvisit": 501,
            "idsite": 1,
            "idgoal": 0,
            "buster": 3,
            "idorder": "EMPTY",
            "revenue": 0.0,
            "server_time": at(25),
        }
    )

    # when it is mapped
    result = build(contract, rows)

    # then no purchase carries that order id and the order is counted as line-less
    assert "EMPTY" not in set(result.interactions["order_id"].dropna())
    assert result.stats["matomo.orders"] == 2
    assert result.stats["matomo.orders.without_lines"] == 1


# --- Matomo: scope ------------------------------------------------------------------------------


def test_rows_of_another_matomo_site_are_ignored(contract):
    # given site-2 rows: a visit, a detail view, an order and its line
    # when the contract's site 1 is mapped
    result = build(contract, world())
    interactions = by_ref(result)

    # then nothing of site 2 appears
    assert ACTION + "1006" not in interactions.index
    assert "m502" not in set(interactions["session_id"].dropna())
    assert "ORD-X" not in set(interactions["order_id"].dropna())
    assert result.stats["matomo.other_site_rows"] == 4


@pytest.mark.parametrize("absence", ["missing", "empty"])
def test_missing_or_empty_matomo_tables_give_business_only_output(contract, absence):
    # given the business tables and Matomo tables that are absent or have no rows
    rows = world()
    for dotted in [key for key in rows if key.startswith("matomo.")]:
        if absence == "missing":
            del rows[dotted]
        else:
            rows[dotted] = []

    # when it is mapped
    result = build(contract, rows)

    # then the output holds the business rows only, and Matomo counts are zero
    assert sorted(result.interactions["ref"]) == ["business.api_order:100", "business.task:200"]
    assert len(result.items) == 2
    assert result.stats["matomo.detail_views"] == 0
    assert result.stats["interactions"] == 2


def test_a_contract_without_a_matomo_mapping_gives_business_only_output(contract):
    # given a contract whose canonical section has no matomo block
    canonical = {k: v for k, v in contract.canonical.items() if k != "matomo"}
    no_matomo = dataclasses.replace(contract, canonical=canonical)

    # when the full world is mapped
    result = build(no_matomo, world())

    # then Matomo rows are not read at all, yet every Matomo count is reported (as zero)
    assert set(result.interactions["source"]) == {"business"}
    assert result.stats["matomo.actions"] == 0
    configured = build(contract, world()).stats
    matomo_keys = {k for k in configured if k.startswith("matomo.") and ".events_by_type." not in k}
    assert matomo_keys <= set(result.stats)


# --- the whole output ---------------------------------------------------------------------------


def test_the_whole_world_maps_to_the_known_interactions_with_unique_refs(contract):
    # given the world
    # when it is mapped
    result = build(contract, world())
    interactions = result.interactions

    # then every expected interaction is there once, sorted by time, in the canonical schema
    assert sorted(interactions["ref"]) == sorted(
        [
            "business.api_order:100",
            "business.task:200",
            ACTION + "1000",
            ACTION + "1001",
            ACTION + "1002",
            ACTION + "1003",
            ACTION + "1004",
            ACTION + "1005",
            ACTION + "1008",
            "matomo.log_conversion_item:500:3",
            "matomo.log_conversion_item:500:12",
            "matomo.log_conversion_item:501:3",
            "matomo.log_conversion_item:500:ORD-1:3",
        ]
    )
    assert interactions["ref"].is_unique
    assert interactions["ts"].is_monotonic_increasing
    assert {c: str(t) for c, t in interactions.dtypes.items()} == dict(schema.INTERACTIONS)
    assert interactions["event"].value_counts().to_dict() == {
        "detail_view": 3,
        "add_to_cart": 3,
        "purchase": 2,
        "view": 2,
        "task": 1,
        "favorite": 1,
        "search": 1,
    }
    assert result.stats["interactions_by_event.detail_view"] == 3
    assert result.stats["matomo.detail_views.from_url"] == 1


def test_a_table_read_twice_does_not_duplicate_interactions(contract):
    # given the action table delivered with every row twice (a lake read without compaction)
    raw = to_raw(contract, world())
    actions = raw["matomo.log_link_visit_action"]
    raw["matomo.log_link_visit_action"] = pd.concat([actions, actions], ignore_index=True)

    # when it is mapped
    result = build_canonical(raw, contract)

    # then each ref appears once and the duplicates are counted
    assert result.interactions["ref"].is_unique
    assert len(result.interactions) == 13
    assert result.stats["raw_duplicates.matomo.log_link_visit_action"] == 9


def test_two_mappings_of_one_business_table_keep_their_refs_apart(contract):
    # given a second mapping of api_order (every order as a cart addition) next to purchases
    canonical = copy.deepcopy(dict(contract.canonical))
    canonical["business_events"].append(
        {
            "table": "business.api_order",
            "event": "add_to_cart",
            "user": "user_id",
            "item": "dataset_id",
            "ts": "created_at",
        }
    )
    two_mappings = dataclasses.replace(contract, canonical=canonical)

    # when it is mapped
    result = build(two_mappings, world())

    # then the paid order appears under both events with distinct refs
    business = result.interactions[result.interactions["source"] == "business"]
    assert business["ref"].is_unique
    assert sorted(business.loc[business["order_id"].isna(), "event"]) == [
        "add_to_cart",
        "add_to_cart",
        "task",
    ]
    assert "business.api_order:100#purchase" in set(business["ref"])


def test_interactions_with_an_item_missing_from_the_catalogue_are_kept_and_counted(contract):
    # given a detail view of DS-99, which is not a dataset of the business database
    rows = world()
    rows["matomo.log_action"].append({"idaction": 30, "type": 5, "name": "DS-99"})
    rows["matomo.log_link_visit_action"].append(_action(1050, 501, 9, url=11, sku=30))

    # when it is mapped
    result = build(contract, rows)

    # then it is kept for cleaning to judge, and counted
    assert by_ref(result).loc[ACTION + "1050", "item_id"] == 99
    assert result.stats["interactions.item_not_in_catalogue"] == 1


def test_a_raw_table_missing_a_needed_column_is_rejected_with_its_name(contract):
    # given a log_visit frame without its idvisitor column
    raw = to_raw(contract, world())
    raw["matomo.log_visit"] = raw["matomo.log_visit"].drop(columns=["idvisitor"])

    # when it is mapped, then the error names the table and the column
    with pytest.raises(ValueError, match=r"matomo\.log_visit: missing column\(s\) idvisitor"):
        build_canonical(raw, contract)
