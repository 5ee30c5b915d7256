"""The demo data generator: real Matomo layout and behaviour, determinism, latent structure."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import zlib
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa
from django.core.management import call_command
from django.core.management.base import CommandError

from apps.pipeline import demo
from apps.pipeline.sources.contract import load_contract, validate_live
from apps.pipeline.sources.db import make_engine

REPO = Path(__file__).resolve().parents[2]
END = dt.datetime(2025, 3, 31, 12, 0, 0, tzinfo=dt.UTC).replace(tzinfo=None)
SMALL = demo.DemoConfig(users=150, items=60, actions=8000, days=20, seed=7, end=END)
TINY = demo.DemoConfig(users=40, items=25, actions=1500, days=10, seed=3, end=END)


def _engines(directory: Path) -> tuple[sa.Engine, sa.Engine]:
    return (
        make_engine(f"sqlite:///{directory / 'business.sqlite3'}"),
        make_engine(f"sqlite:///{directory / 'matomo.sqlite3'}"),
    )


def _rows(engine: sa.Engine, sql: str) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql(sql).fetchall()]


def _table_digests(engine: sa.Engine) -> dict[str, str]:
    """A digest of every row of every table, in a fixed order."""
    digests = {}
    for table in sorted(sa.inspect(engine).get_table_names()):
        rows = sorted(repr(r) for r in _rows(engine, f'SELECT * FROM "{table}"'))
        digests[table] = hashlib.sha256("\n".join(rows).encode()).hexdigest()
    return digests


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """One small demo dataset shared by the read-only tests of this module."""
    business, matomo = _engines(tmp_path_factory.mktemp("demo"))
    summary = demo.generate(business, matomo, SMALL)
    yield business, matomo, summary
    business.dispose()
    matomo.dispose()


# --- layout ------------------------------------------------------------------------------------


def _ddl_columns(path: Path) -> dict[str, list[str]]:
    """Column names per CREATE TABLE, read straight from the DDL file."""
    tables: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        if m := re.match(r"CREATE TABLE `(\w+)`", line):
            current = tables.setdefault(m.group(1), [])
        elif current is not None and (m := re.match(r"\s+`(\w+)` ", line)):
            current.append(m.group(1))
        elif line.startswith(")"):
            current = None
    return tables


def test_the_tables_have_exactly_the_columns_of_the_real_ddl_in_order(small):
    business, matomo, _ = small
    # Given the column lists of the real Matomo and business DDL files
    expected = _ddl_columns(REPO / "apps/pipeline/sources/ddl/matomo_schema.sql")
    expected.update(_ddl_columns(REPO / "apps/pipeline/sources/ddl/business_schema.sql"))
    # Then every created table has the same columns in the same order
    for engine, tables in ((matomo, demo.MATOMO_TABLES), (business, demo.BUSINESS_TABLES)):
        inspector = sa.inspect(engine)
        assert set(inspector.get_table_names()) == set(tables)
        for table in tables:
            assert [c["name"] for c in inspector.get_columns(table)] == expected[table], table


def test_sqlite_keeps_the_keys_and_secondary_indexes_of_the_ddl(small):
    business, matomo, _ = small
    inspector = sa.inspect(matomo)
    # Then composite primary keys, the unique order key and the DESC visitor index exist
    pk = inspector.get_pk_constraint("matomo_log_conversion")["constrained_columns"]
    assert pk == ["idvisit", "idgoal", "buster"]
    conv_indexes = {i["name"]: i for i in inspector.get_indexes("matomo_log_conversion")}
    assert conv_indexes["matomo_log_conversion__unique_idsite_idorder"]["unique"]
    visit_indexes = {i["name"] for i in inspector.get_indexes("matomo_log_visit")}
    assert "matomo_log_visit__index_idsite_idvisitor_time" in visit_indexes
    orders = {i["name"]: i for i in sa.inspect(business).get_indexes("api_order")}
    assert orders["api_order__uniq_order_no"]["unique"]


def test_the_source_contract_validates_against_the_generated_databases(small):
    business, matomo, _ = small
    contract = load_contract(REPO / "config/sources.yaml")
    # When the contract is compared with the live schemas, then nothing is reported
    validate_live(contract, {"business": business, "matomo": matomo})


# --- determinism --------------------------------------------------------------------------------


def test_the_same_seed_and_end_give_identical_data_and_another_seed_does_not(tmp_path):
    # Given the same config generated twice, and once with another seed
    digests = []
    for name, config in (
        ("a", TINY),
        ("b", TINY),
        ("c", demo.DemoConfig(**{**TINY.__dict__, "seed": 4})),
    ):
        (tmp_path / name).mkdir()
        business, matomo = _engines(tmp_path / name)
        demo.generate(business, matomo, config)
        digests.append({**_table_digests(business), **_table_digests(matomo)})
    # Then the first two are identical, table by table
    assert digests[0] == digests[1]
    # and another seed changes the simulated tables
    for table in ("user", "dataset", "matomo_log_link_visit_action", "matomo_log_visit"):
        assert digests[0][table] != digests[2][table], table


def test_the_action_count_is_the_requested_one_and_activity_ends_just_before_end(small):
    _, matomo, summary = small
    # Then exactly the requested number of action rows exists
    assert summary.rows["matomo_log_link_visit_action"] == SMALL.actions
    assert _rows(matomo, "SELECT COUNT(*) FROM matomo_log_link_visit_action") == [(SMALL.actions,)]
    # and the newest action is within the last hour before END, the oldest within --days
    newest, oldest = _rows(
        matomo, "SELECT MAX(server_time), MIN(server_time) FROM matomo_log_link_visit_action"
    )[0]
    newest, oldest = dt.datetime.fromisoformat(newest), dt.datetime.fromisoformat(oldest)
    assert END - dt.timedelta(hours=1) <= newest < END
    assert oldest >= END - dt.timedelta(days=SMALL.days)


# --- Matomo facts ----------------------------------------------------------------------------------


def test_product_views_are_pageviews_with_a_dataset_url_and_matching_sku(small):
    _, matomo, _ = small
    # Given product-view rows: a SKU, no event category
    rows = _rows(
        matomo,
        """SELECT u.type, u.name, u.url_prefix, s.type, s.name, c.type, n.type, a.product_price
           FROM matomo_log_link_visit_action a
           JOIN matomo_log_action s ON s.idaction = a.idaction_product_sku
           LEFT JOIN matomo_log_action u ON u.idaction = a.idaction_url
           LEFT JOIN matomo_log_action c ON c.idaction = a.idaction_product_cat
           LEFT JOIN matomo_log_action n ON n.idaction = a.idaction_product_name
           WHERE a.idaction_event_category IS NULL""",
    )
    assert len(rows) > 1000
    for url_type, url, prefix, sku_type, sku, cat_type, name_type, price in rows:
        # Then each has a type-1 https URL of the same dataset, and SKU/name/category/price
        assert (url_type, prefix, sku_type, cat_type, name_type) == (1, 2, 5, 7, 6)
        assert re.fullmatch(r"DS-(\d+)", sku)
        assert url == f"data.example.com/datasets/{sku[3:]}"
        assert price > 0


def test_events_on_product_pages_carry_the_sku_of_the_page(small):
    _, matomo, _ = small
    rows = _rows(
        matomo,
        """SELECT ec.name, ea.name, en.name, s.name, u.type, u.name
           FROM matomo_log_link_visit_action a
           JOIN matomo_log_action ec ON ec.idaction = a.idaction_event_category
           JOIN matomo_log_action ea ON ea.idaction = a.idaction_event_action
           JOIN matomo_log_action en ON en.idaction = a.idaction_name
           LEFT JOIN matomo_log_action s ON s.idaction = a.idaction_product_sku
           JOIN matomo_log_action u ON u.idaction = a.idaction_url""",
    )
    # Then events use exactly the contract's categories/actions, with the SKU as name and a type-10 URL
    contract = load_contract(REPO / "config/sources.yaml")
    wanted = {(e["category"], e["action"]) for e in contract.canonical["matomo"]["events"]}
    assert {(c, a) for c, a, *_ in rows} == wanted
    for category, _action, name, sku, url_type, url in rows:
        assert url_type == 10
        assert re.fullmatch(r"DS-\d+", name)
        if category == "Dataset":
            # and an event on a product page also carries that page's SKU (the tracker copies _pks)
            assert sku == name
            assert url == f"data.example.com/datasets/{name[3:]}"
        else:
            assert sku is None


def test_orders_follow_matomo_and_match_business_orders(small):
    business, matomo, _ = small
    orders = _rows(
        matomo,
        "SELECT idvisit, idorder, buster, revenue, items FROM matomo_log_conversion WHERE idgoal = 0",
    )
    api = {
        r[0]: r[1:]
        for r in _rows(business, "SELECT order_no, dataset_id, amount, status FROM api_order")
    }
    assert len(orders) >= 20
    # Then order ids are the business order numbers, one to one
    assert {o[1] for o in orders} == set(api)
    lines = _rows(
        matomo,
        """SELECT i.idvisit, i.idorder, s.name, i.price, i.quantity FROM matomo_log_conversion_item i
           JOIN matomo_log_action s ON s.idaction = i.idaction_sku
           WHERE i.idorder != '0' AND i.deleted = 0""",
    )
    bought = {(v, order): (sku, price, qty) for v, order, sku, price, qty in lines}
    assert len(bought) == len(lines)  # one live line per order: each order buys one dataset
    for idvisit, order_no, buster, revenue, items in orders:
        # and buster = CONV(SUBSTR(MD5(idorder),1,8),16,10)
        assert buster == int(hashlib.md5(order_no.encode()).hexdigest()[:8], 16)
        # and the order's one live line is the business order's dataset and amount
        sku, price, qty = bought[(idvisit, order_no)]
        dataset_id, amount, _status = api[order_no]
        assert (sku, qty, items) == (f"DS-{dataset_id}", 1, 1)
        assert price == pytest.approx(float(amount)) == pytest.approx(revenue)
    statuses = Counter(s for _, _, s in api.values())
    assert statuses["paid"] > statuses["pending"] + statuses["refunded"]


def test_a_cart_turned_into_an_order_leaves_no_cart_row_behind(small):
    _, matomo, _ = small
    # Given visits with both an order and a cart row
    rows = _rows(
        matomo,
        """SELECT c.idvisit, MAX(CASE WHEN c.idgoal = 0 THEN c.server_time END),
                  MIN(CASE WHEN c.idgoal = -1 THEN c.server_time END), COUNT(*), v.visit_goal_buyer
           FROM matomo_log_conversion c JOIN matomo_log_visit v ON v.idvisit = c.idvisit
           GROUP BY c.idvisit, v.visit_goal_buyer""",
    )
    for _idvisit, last_order, cart, _n, buyer in rows:
        # Then a surviving cart row is always newer than the visit's orders (a later cart update)
        if last_order and cart:
            assert cart > last_order
            assert buyer == 3
        elif last_order:
            assert buyer == 1
        else:
            assert buyer == 2
    # and carts are idgoal -1 / buster 0 / no idorder, with at most one per visit
    carts = _rows(
        matomo, "SELECT idvisit, buster, idorder FROM matomo_log_conversion WHERE idgoal = -1"
    )
    assert carts
    assert all(buster == 0 and idorder is None for _, buster, idorder in carts)
    assert len({v for v, *_ in carts}) == len(carts)
    # and open-cart lines (idorder '0') exist only in visits that still have a cart row
    orphan = _rows(
        matomo,
        """SELECT COUNT(*) FROM matomo_log_conversion_item i WHERE i.idorder = '0' AND NOT EXISTS
           (SELECT 1 FROM matomo_log_conversion c WHERE c.idvisit = i.idvisit AND c.idgoal = -1)""",
    )
    assert orphan == [(0,)]


def test_a_mid_visit_login_leaves_the_cookie_id_on_earlier_actions(small):
    _, matomo, _ = small
    visits = _rows(
        matomo, "SELECT idvisit, idvisitor, user_id FROM matomo_log_visit WHERE user_id IS NOT NULL"
    )
    # Then every logged-in visit has idvisitor = sha1(user_id)[:8 bytes]
    assert visits
    for _, idvisitor, user_id in visits:
        assert idvisitor == hashlib.sha1(user_id.encode()).digest()[:8]
    # and some visits logged in mid-visit: their first actions carry another (cookie) idvisitor
    mixed = _rows(
        matomo,
        """SELECT v.idvisit, MIN(a.idlink_va), MAX(a.idlink_va)
           FROM matomo_log_visit v JOIN matomo_log_link_visit_action a ON a.idvisit = v.idvisit
           WHERE a.idvisitor != v.idvisitor AND v.user_id IS NOT NULL GROUP BY v.idvisit""",
    )
    assert mixed
    idvisit, _, last_cookie_row = mixed[0]
    later = _rows(
        matomo,
        f"""SELECT COUNT(*) FROM matomo_log_link_visit_action a JOIN matomo_log_visit v USING (idvisit)
            WHERE a.idvisit = {idvisit} AND a.idvisitor = v.idvisitor AND a.idlink_va > {last_cookie_row}""",
    )
    assert later[0][0] >= 1
    # and anonymous visits exist too
    assert _rows(matomo, "SELECT COUNT(*) FROM matomo_log_visit WHERE user_id IS NULL")[0][0] > 0


def test_visit_rows_agree_with_their_actions(small):
    _, matomo, _ = small
    mismatched = _rows(
        matomo,
        """SELECT COUNT(*) FROM matomo_log_visit v JOIN (
             SELECT idvisit, COUNT(*) n, MIN(server_time) first, MAX(server_time) last, MAX(idlink_va) last_id
             FROM matomo_log_link_visit_action GROUP BY idvisit) a ON a.idvisit = v.idvisit
           WHERE v.visit_total_actions != a.n OR v.visit_first_action_time != a.first
              OR v.visit_last_action_time != a.last""",
    )
    assert mismatched == [(0,)]
    # and ecommerce requests never fall after the visit's last action
    late = _rows(
        matomo,
        """SELECT COUNT(*) FROM matomo_log_conversion c JOIN matomo_log_visit v ON v.idvisit = c.idvisit
           WHERE c.server_time > v.visit_last_action_time OR c.server_time < v.visit_first_action_time""",
    )
    assert late == [(0,)]


def test_log_action_strings_are_unique_hashed_and_escaped_like_matomo(small):
    _, matomo, _ = small
    actions = _rows(matomo, "SELECT name, hash, type, url_prefix FROM matomo_log_action")
    # Then (type, name) is unique and hash = CRC32(name)
    assert len({(t, n) for n, _, t, _ in actions}) == len(actions)
    assert all(h == zlib.crc32(n.encode()) for n, h, _, _ in actions)
    # and only URL types carry a url_prefix
    assert all(
        (p is None) == (t not in (1, 10) or not n.startswith("data.example.com"))
        for n, _, t, p in actions
    )
    # and site-search keywords and page titles are HTML-escaped (no bare & or ')
    bare = re.compile(r"&(?!amp;|lt;|gt;|quot;|#039;)|'")
    assert not [n for n, _, t, _ in actions if t in (4, 8) and bare.search(n)]
    assert any(t == 8 for _, _, t, _ in actions)
    # and site searches put the keyword in idaction_name, with no page URL
    searches = _rows(
        matomo,
        """SELECT a.idaction_url, k.type FROM matomo_log_link_visit_action a
           JOIN matomo_log_action k ON k.idaction = a.idaction_name WHERE k.type = 8""",
    )
    assert searches
    assert all(url is None for url, _ in searches)


def test_default_data_is_clean(small):
    business, matomo, _ = small
    users = {r[0] for r in _rows(business, "SELECT id FROM user")}
    datasets = {r[0] for r in _rows(business, "SELECT id FROM dataset")}
    # Then business interactions refer to existing users and datasets
    for table in ("api_order", "task"):
        for user_id, dataset_id in _rows(business, f"SELECT user_id, dataset_id FROM {table}"):
            assert user_id in users
            assert dataset_id in datasets
    # and every Matomo SKU and User ID refers to an existing dataset / user
    skus = _rows(matomo, "SELECT name FROM matomo_log_action WHERE type = 5")
    assert {int(name[3:]) for (name,) in skus} <= datasets
    uids = _rows(matomo, "SELECT DISTINCT user_id FROM matomo_log_visit WHERE user_id IS NOT NULL")
    assert {int(u) for (u,) in uids} <= users
    # and optional attributes are filled
    assert _rows(
        business, "SELECT COUNT(*) FROM dataset WHERE description IS NULL OR tag IS NULL"
    ) == [(0,)]
    assert _rows(business, "SELECT COUNT(*) FROM user WHERE industry IS NULL") == [(0,)]
    # and no timestamp lies in the future of END, and nothing happens before it was created
    end = END.isoformat(sep=" ")
    for engine, table, column in (
        (business, "user", "updated_at"),
        (business, "dataset", "updated_at"),
        (business, "task", "updated_at"),
        (business, "api_order", "updated_at"),
        (matomo, "matomo_log_visit", "visit_last_action_time"),
        (matomo, "matomo_log_conversion", "server_time"),
        (matomo, "matomo_log_conversion_item", "server_time"),
    ):
        assert _rows(engine, f"SELECT COUNT(*) FROM {table} WHERE {column} > '{end}'") == [(0,)], (
            table
        )
    early = _rows(
        business,
        """SELECT COUNT(*) FROM api_order o JOIN user u ON u.id = o.user_id JOIN dataset d ON d.id = o.dataset_id
           WHERE o.created_at < u.created_at OR o.created_at < d.created_at""",
    )
    assert early == [(0,)]


def test_noise_adds_defects_the_clean_default_does_not_have(tmp_path):
    # Given data generated with 20 % noise
    business, matomo = _engines(tmp_path)
    demo.generate(business, matomo, demo.DemoConfig(**{**TINY.__dict__, "noise": 0.2}))
    datasets = {r[0] for r in _rows(business, "SELECT id FROM dataset")}
    skus = {
        int(n[3:]) for (n,) in _rows(matomo, "SELECT name FROM matomo_log_action WHERE type = 5")
    }
    # Then some SKUs point at missing datasets, some User IDs are not user ids, profiles have gaps
    assert skus - datasets
    assert (
        _rows(matomo, "SELECT COUNT(*) FROM matomo_log_visit WHERE user_id LIKE 'guest-%'")[0][0]
        > 0
    )
    assert _rows(business, "SELECT COUNT(*) FROM user WHERE industry IS NULL")[0][0] > 0


# --- latent structure ---------------------------------------------------------------------------------


def test_purchases_concentrate_on_each_users_top_industry(small):
    business, _, _ = small
    # Given the ground-truth tastes behind the data
    top = demo.build_world(SMALL).user_top_industry()
    orders = _rows(
        business,
        "SELECT o.user_id, d.industry FROM api_order o JOIN dataset d ON d.id = o.dataset_id",
    )
    assert len(orders) >= 20
    # Then far more purchases fall in the buyer's top industry than the 1-in-10 of chance
    share = sum(top[user - 1] == industry for user, industry in orders) / len(orders)
    assert share > 0.5


def test_item_text_reflects_industry_and_tags(small):
    business, _, _ = small
    for title, description, tags, industry in _rows(
        business, "SELECT dataset_name, description, tag, industry FROM dataset"
    ):
        label = demo.INDUSTRIES[industry][0]
        # Then the title names the industry and the description names the tags
        assert label in title
        assert 2 <= len(tags.split(",")) <= 4
        assert all(tag.replace("-", " ") in description for tag in tags.split(","))


# --- sizes and errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["users", "items", "actions", "days", "seed"])
def test_negative_sizes_are_rejected_by_name(field):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        demo.DemoConfig(**{field: -1})


def test_more_actions_than_the_calendar_allows_are_refused_with_a_hint(tmp_path):
    business, matomo = _engines(tmp_path)
    with pytest.raises(demo.DemoDataError, match="raise --users or --days"):
        demo.generate(
            business, matomo, demo.DemoConfig(users=2, items=5, actions=100_000, days=1, end=END)
        )


# --- the command ---------------------------------------------------------------------------------------


def _command_args(tmp_path: Path) -> list[str]:
    return [
        "--business-url",
        f"sqlite:///{tmp_path / 'b.sqlite3'}",
        "--matomo-url",
        f"sqlite:///{tmp_path / 'm.sqlite3'}",
        "--users=30",
        "--items=20",
        "--actions=600",
        "--days=5",
        "--end=2025-03-31T12:00:00",
        "--no-progress",
    ]


def test_the_command_writes_both_databases_and_prints_one_summary_line(tmp_path, capsys):
    # When the command runs
    call_command("make_demo_data", *_command_args(tmp_path))
    # Then it prints one line with rows per table and the time
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    assert "user=30" in out
    assert "matomo_log_link_visit_action=600" in out
    assert re.search(r"in \d+\.\ds$", out)


def test_the_command_refuses_tables_with_data_unless_reset(tmp_path, capsys):
    # Given a first run
    call_command("make_demo_data", *_command_args(tmp_path))
    # When it runs again without --reset, then it refuses in one line and names --reset
    with pytest.raises(CommandError, match="pass --reset") as excinfo:
        call_command("make_demo_data", *_command_args(tmp_path))
    assert "\n" not in str(excinfo.value)
    # and with --reset it replaces the data
    call_command("make_demo_data", *_command_args(tmp_path), "--reset", "--seed=5")
    engine = make_engine(f"sqlite:///{tmp_path / 'm.sqlite3'}")
    assert _rows(engine, "SELECT COUNT(*) FROM matomo_log_link_visit_action") == [(600,)]
    engine.dispose()


def test_the_command_writes_to_the_configured_source_urls_by_default(tmp_path, settings, capsys):
    settings.BUSINESS_DB_URL = f"sqlite:///{tmp_path / 'business.sqlite3'}"
    settings.MATOMO_DB_URL = f"sqlite:///{tmp_path / 'matomo.sqlite3'}"
    call_command(
        "make_demo_data", "--users=10", "--items=5", "--actions=50", "--days=2", "--no-progress"
    )
    assert (tmp_path / "business.sqlite3").exists()
    assert (tmp_path / "matomo.sqlite3").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--users=-3"], r"^--users must be a positive integer \(got -3\)$"),
        (["--actions=-1"], r"^--actions must be"),
        (["--noise=2"], r"^--noise must be between 0 and 1"),
        (["--end=yesterday"], r"^--end must be an ISO date-time"),
        (
            ["--business-url=mysql://root@127.0.0.1:1/nowhere"],
            r"^cannot connect to the business database",
        ),
        (
            ["--matomo-url=sqlite:////nonexistent-dir/m.sqlite3"],
            r"^cannot connect to the matomo database",
        ),
        (["--matomo-url=postgresql://u:secret@localhost/x"], r"must be SQLite or MySQL/MariaDB"),
    ],
)
def test_bad_input_is_a_one_line_command_error(tmp_path, args, message):
    with pytest.raises(CommandError, match=message) as excinfo:
        call_command("make_demo_data", *_command_args(tmp_path), *args)
    assert "\n" not in str(excinfo.value)
    assert "secret" not in str(excinfo.value)


# --- MariaDB ---------------------------------------------------------------------------------------------


@pytest.mark.mariadb
def test_mariadb_gets_the_real_ddl_and_agrees_with_matomos_own_sql(mariadb_url):
    # Given both sources in one fresh MariaDB database
    engine = make_engine(mariadb_url)
    try:
        demo.generate(engine, engine, TINY)
        # Then the contract validates there
        validate_live(
            load_contract(REPO / "config/sources.yaml"), {"business": engine, "matomo": engine}
        )
        # and MariaDB's own functions agree with the hash, buster and User-ID rules
        checks = {
            "hash": "SELECT COUNT(*) FROM matomo_log_action WHERE hash != CRC32(name)",
            "buster": "SELECT COUNT(*) FROM matomo_log_conversion WHERE idgoal = 0 AND buster != CONV(SUBSTR(MD5(idorder), 1, 8), 16, 10)",
            "idvisitor": "SELECT COUNT(*) FROM matomo_log_visit WHERE user_id IS NOT NULL AND LOWER(HEX(idvisitor)) != SUBSTR(SHA1(user_id), 1, 16)",
        }
        for name, sql in checks.items():
            assert _rows(engine, sql) == [(0,)], name
        assert _rows(engine, "SELECT COUNT(*) FROM matomo_log_link_visit_action") == [
            (TINY.actions,)
        ]
        # and the tables were created from the real DDL (MySQL types, DESC index)
        columns = {c["name"]: c for c in sa.inspect(engine).get_columns("matomo_log_visit")}
        assert str(columns["idvisitor"]["type"]).upper().startswith("BINARY")
        create = _rows(engine, "SHOW CREATE TABLE matomo_log_visit")[0][1]
        assert "`visit_last_action_time` DESC" in create
    finally:
        engine.dispose()


@pytest.mark.mariadb
def test_mariadb_bulk_insert_keeps_quotes_percents_backslashes_and_bytes(mariadb_url):
    # Given values that break naive SQL formatting
    engine = make_engine(mariadb_url)
    rows = [("it's 100% a\\b", b"\x00'\\x"), ("Xi'an &amp; 中文", b""), ("plain", None)]
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (s VARCHAR(50), b VARBINARY(8))")
        # When the demo loader writes them
        with engine.connect() as conn, conn.begin():
            demo._Loader(conn).insert("t", ("s", "b"), rows)
        # Then they read back unchanged
        assert sorted(_rows(engine, "SELECT s, b FROM t")) == sorted(rows)
    finally:
        engine.dispose()


def test_a_failed_bulk_insert_surfaces_as_a_sqlalchemy_error(tmp_path):
    # Given a table with a primary key
    engine = make_engine(f"sqlite:///{tmp_path / 'x.sqlite3'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    # When the loader writes a duplicate key, then the driver error arrives wrapped by SQLAlchemy
    with pytest.raises(sa.exc.IntegrityError), engine.connect() as conn, conn.begin():
        demo._Loader(conn).insert("t", ("id",), [(1,), (1,)])
    engine.dispose()
