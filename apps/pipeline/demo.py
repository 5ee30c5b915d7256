"""Demo data: a simulated data marketplace in a business database and a real-layout Matomo database.

Pure core (no Django). ``generate()`` writes the business tables of ``business_schema.sql`` and
the Matomo tables of ``matomo_schema.sql`` (executed as-is on MySQL/MariaDB, translated on
SQLite) and fills them from a simulation with latent tastes:

- items (datasets) belong to an industry, carry 2-4 tags mostly from that industry's pool, a
  log-normal price and a title/description built from industry and tag words;
- people (business users plus never-registered visitors) prefer one or two industries
  (Dirichlet), some tags and a price band, and have a heavy-tailed activity level;
- an item is chosen with probability proportional to ``affinity(person, item) x popularity^beta``;
  favourites, sample downloads, carts and orders get likelier the better the item fits.

Matomo is recorded the way Matomo records it (see /work/shared/reference/matomo.md): product
views on the pageview row, product fields copied onto events of the same page, strings in
``log_action`` deduplicated by (type, name) with ``hash = CRC32(name)``, carts as one rewritten
``idgoal=-1`` row per visit, orders rewriting that row (``buster`` = md5 rule) and re-tagging the
cart items, User ID set mid-visit leaving earlier action rows with the cookie ``idvisitor``.
The final state of every updated row is written directly: the database ends up exactly as if the
tracker had inserted and updated it.

Memory stays flat: visits are planned as a few numpy arrays, then simulated and inserted in
chunks of about ``CHUNK_ACTIONS`` action rows, one transaction per chunk.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import random
import re
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import sqlalchemy as sa

DDL_DIR: Final = Path(__file__).resolve().parent / "sources" / "ddl"
BUSINESS_DDL: Final = DDL_DIR / "business_schema.sql"
MATOMO_DDL: Final = DDL_DIR / "matomo_schema.sql"

BUSINESS_TABLES: Final = ("user", "dataset", "task", "api_order")
MATOMO_TABLES: Final = (
    "matomo_log_action",
    "matomo_log_visit",
    "matomo_log_link_visit_action",
    "matomo_log_conversion",
    "matomo_log_conversion_item",
    "matomo_site",
    "matomo_goal",
    "matomo_custom_dimensions",
)

Which = Literal["business", "matomo"]
Progress = Callable[[int], None] | None
Row = tuple[Any, ...]

IDSITE: Final = 1
SITE_HOST: Final = "data.example.com"
SITE_NAME: Final = "DataMarket"
CURRENCY: Final = "CNY"
URL_PREFIX_HTTPS: Final = 2  # core/Tracker/PageUrl.php: 2 = https://

# Matomo log_action types (core/Tracker/Action.php).
T_URL, T_TITLE, T_SKU, T_PRODUCT_NAME, T_CATEGORY, T_SEARCH = 1, 4, 5, 6, 7, 8
T_EVENT_CATEGORY, T_EVENT_ACTION, T_EVENT_NAME = 10, 11, 12

# Event strings must match config/sources.yaml canonical.matomo.events exactly.
EVENT_FAVORITE: Final = ("Dataset", "Favorite")
EVENT_SAMPLE: Final = ("Dataset", "Download sample")
EVENT_RESULT_CLICK: Final = ("Search", "Result click")

# About this many log_link_visit_action rows are simulated, then inserted in one transaction.
# 20k rows of ~23 columns is ~10 MB of Python objects; larger chunks did not insert faster.
CHUNK_ACTIONS: Final = 20_000
# Rows per executemany call (SQLite).
INSERT_BATCH: Final = 20_000
# Bytes per multi-row INSERT statement (MySQL/MariaDB); well under the 4 MB max_allowed_packet
# of older servers (16 MB since MariaDB 10.2 / MySQL 8).
MYSQL_STATEMENT_BYTES: Final = 1_000_000
# Upper bound on people x items affinity cells computed at once (8 bytes each).
AFFINITY_CELLS: Final = 3_000_000

# A visit ends after 30 min of inactivity (Matomo visit_standard_length); a simulated visit lasts
# at most MAX_VISIT_S, so visits of one person are spaced at least VISIT_SPACING_S apart to stay
# separate visits.
MAX_VISIT_S: Final = 40 * 60
VISIT_SPACING_S: Final = MAX_VISIT_S + 35 * 60
# The newest visit starts this long before --end, so the newest action lands within the last hour.
LAST_START_BEFORE_END_S: Final = 45 * 60
MAX_ACTIONS_PER_VISIT: Final = 60
# Item choice ~ affinity x popularity^beta: below 1, popularity matters less than taste.
POPULARITY_BETA: Final = 0.7

# fmt: off
# Vocabulary tables stay one row per line: they are data, read across.
INDUSTRIES: Final[Mapping[str, tuple[str, tuple[str, ...], tuple[str, ...], float]]] = {
    # key: (label, tag pool, description words, median price in CNY)
    "finance": ("Finance",
        ("credit-risk", "stock-prices", "fraud-detection", "loans", "insurance-claims", "m&a", "payments", "forex"),
        ("bank", "credit", "loan", "equity", "bond", "portfolio", "trading", "investor", "interest", "liquidity"),
        3000.0),
    "healthcare": ("Healthcare",
        ("clinical-trials", "hospital-beds", "drug-prices", "patient-records", "epidemiology", "medical-devices", "genomics", "pharmacy-sales"),
        ("hospital", "patient", "clinical", "diagnosis", "drug", "physician", "treatment", "disease", "vaccine", "pharmacy"),
        2500.0),
    "retail": ("Retail",
        ("foot-traffic", "pos-transactions", "consumer-reviews", "e-commerce", "pricing", "loyalty-programs", "inventory", "basket-analysis"),
        ("store", "shopper", "basket", "sales", "brand", "promotion", "checkout", "merchandise", "footfall", "coupon"),
        800.0),
    "energy": ("Energy",
        ("power-demand", "solar-output", "wind-speed", "oil-prices", "grid-load", "carbon-emissions", "ev-charging", "gas-storage"),
        ("power", "electricity", "grid", "solar", "wind", "fuel", "emission", "turbine", "battery", "megawatt"),
        1500.0),
    "logistics": ("Logistics",
        ("shipping-rates", "port-congestion", "truck-gps", "warehouse-capacity", "delivery-times", "freight-index", "customs", "last-mile"),
        ("shipment", "freight", "container", "warehouse", "route", "carrier", "parcel", "fleet", "port", "delivery"),
        900.0),
    "manufacturing": ("Manufacturing",
        ("factory-output", "sensor-telemetry", "quality-defects", "supply-chain", "machine-downtime", "raw-materials", "r&d", "procurement"),
        ("factory", "assembly", "machine", "defect", "throughput", "supplier", "component", "plant", "sensor", "yield"),
        1200.0),
    "education": ("Education",
        ("enrollment", "test-scores", "online-courses", "school-locations", "graduate-jobs", "teacher-stats", "student-loans", "edtech"),
        ("school", "student", "teacher", "course", "exam", "enrollment", "campus", "curriculum", "graduate", "tuition"),
        400.0),
    "real-estate": ("Real Estate",
        ("housing-prices", "rental-listings", "land-transactions", "mortgage-rates", "construction-permits", "property-tax", "commercial-leases", "vacancy-rates"),
        ("housing", "property", "rent", "mortgage", "lease", "tenant", "building", "zoning", "appraisal", "listing"),
        1800.0),
    "agriculture": ("Agriculture",
        ("crop-yields", "weather", "soil-quality", "livestock", "farmers' markets", "fertilizer", "irrigation", "commodity-prices"),
        ("crop", "harvest", "farm", "soil", "livestock", "rainfall", "seed", "irrigation", "fertilizer", "grain"),
        500.0),
    "telecom": ("Telecom",
        ("network-coverage", "call-records", "subscriber-churn", "5g-towers", "data-usage", "roaming", "signal-quality", "iot-devices"),
        ("network", "subscriber", "tower", "bandwidth", "roaming", "antenna", "signal", "handset", "broadband", "spectrum"),
        1300.0),
}
GENERAL_TAGS: Final = ("time-series", "geospatial", "daily", "api", "historical", "real-time", "survey", "open-data")

PLACES: Final = (
    # province, city, Matomo region code, latitude, longitude
    ("Beijing", "Beijing", "BJ", 39.904200, 116.407400),
    ("Shanghai", "Shanghai", "SH", 31.230400, 121.473700),
    ("Guangdong", "Guangzhou", "GD", 23.129100, 113.264400),
    ("Guangdong", "Shenzhen", "GD", 22.543100, 114.057900),
    ("Zhejiang", "Hangzhou", "ZJ", 30.274100, 120.155100),
    ("Jiangsu", "Nanjing", "JS", 32.060300, 118.796900),
    ("Jiangsu", "Suzhou", "JS", 31.298900, 120.585300),
    ("Sichuan", "Chengdu", "SC", 30.572800, 104.066800),
    ("Hubei", "Wuhan", "HB", 30.592800, 114.305500),
    ("Shaanxi", "Xi'an", "SN", 34.341600, 108.939800),
    ("Shandong", "Qingdao", "SD", 36.067100, 120.382600),
    ("Fujian", "Xiamen", "FJ", 24.479800, 118.089400),
)
COMPANY_ROOTS: Final = (
    "Apex", "Blue River", "Cedar", "Delta", "Evergreen", "Falcon", "Granite", "Harbor", "Ion", "Jade",
    "Kite", "Lumen", "Meridian", "Nova", "Orbit", "Pioneer", "Quantum", "Redwood", "Summit", "Tidal",
)
PROVIDER_KINDS: Final = ("Data", "Analytics", "Insights", "Research", "Labs")
CUSTOMER_KINDS: Final = ("Technology Co., Ltd.", "Group", "Consulting", "Holdings", "Partners")
FIRST_NAMES: Final = ("wei", "fang", "lei", "jing", "min", "tao", "yan", "hui", "jun", "anna", "david", "chen", "ming", "xiao", "hong", "li")
LAST_NAMES: Final = ("zhang", "wang", "li", "liu", "chen", "yang", "huang", "zhao", "wu", "zhou")
TITLE_SCOPES: Final = ("National", "Regional", "Global", "China", "Provincial", "City-level", "Daily", "Monthly", "Quarterly", "Real-time")
TITLE_NOUNS: Final = ("Dataset", "Index", "Panel", "Records", "Statistics", "Time Series", "Database", "Feed")
FREQUENCIES: Final = ("daily", "weekly", "monthly", "quarterly", "in real time")

# (device type, os, os version, browser, engine, browser version, resolution, brand, model, weight)
DEVICES: Final = (
    (0, "WIN", "10", "CH", "Blink", "120.0", "1920x1080", "", "", 0.34),
    (0, "WIN", "11", "EG", "Blink", "121.0", "2560x1440", "", "", 0.12),
    (0, "MAC", "14", "SF", "WebKit", "17.1", "2560x1600", "AP", "MacBook", 0.14),
    (0, "LIN", "", "FF", "Gecko", "121.0", "1920x1080", "", "", 0.04),
    (1, "AND", "14", "CH", "Blink", "121.0", "412x915", "SA", "Galaxy S23", 0.14),
    (1, "IOS", "17.2", "SF", "WebKit", "17.2", "390x844", "AP", "iPhone", 0.16),
    (2, "IOS", "17.1", "SF", "WebKit", "17.1", "820x1180", "AP", "iPad", 0.06),
)
# (referer_type, name, url, keyword, cumulative probability): 1 direct, 2 search engine,
# 3 website, 6 campaign, 7 social (plugins/Referrers).
REFERRERS: Final = (
    (1, None, None, None, 0.40),
    (2, "Baidu", "https://www.baidu.com/", None, 0.60),
    (2, "Google", "https://www.google.com/", None, 0.70),
    (3, "zhihu.com", "https://www.zhihu.com/question/31415926", None, 0.85),
    (6, "newsletter", "https://data.example.com/?mtm_campaign=newsletter", "spring-data-week", 0.95),
    (7, "WeChat", "https://weixin.qq.com/", None, 1.00),
)
# fmt: on

_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class DemoDataError(RuntimeError):
    """A problem the operator can fix: target tables not empty, sizes that cannot fit, ..."""


# --- configuration and results -------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and seed of the demo data. Same seed and same ``end`` give identical data."""

    users: int = 2000
    items: int = 500
    actions: int = 200_000  # target number of matomo_log_link_visit_action rows
    days: int = 60
    seed: int = 42
    end: dt.datetime | None = None  # naive UTC (aware values are converted); None = now
    noise: float = 0.0  # share of rows given realistic defects; 0 = clean
    reset: bool = False  # drop and recreate the tables instead of refusing non-empty ones

    def __post_init__(self) -> None:
        for name in ("users", "items", "days"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer (got {value!r})")
        for name in ("actions", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer (got {value!r})")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be between 0 and 1 (got {self.noise!r})")
        if self.end is not None and self.end.tzinfo is not None:
            object.__setattr__(self, "end", self.end.astimezone(dt.UTC).replace(tzinfo=None))

    def resolved_end(self) -> dt.datetime:
        """``end``, or now (UTC, naive, truncated to the second) when unset."""
        if self.end is not None:
            return self.end.replace(microsecond=0)
        return dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)


@dataclass(frozen=True)
class DemoSummary:
    """What ``generate()`` wrote."""

    rows: Mapping[str, int]
    seconds: float
    end: dt.datetime
    first_activity: dt.datetime | None
    last_activity: dt.datetime | None

    def line(self) -> str:
        """One line for a terminal: rows per table and elapsed time."""
        counts = " ".join(f"{name}={count}" for name, count in self.rows.items())
        return f"demo data: {counts} in {self.seconds:.1f}s"


@dataclass(frozen=True, eq=False)
class DemoWorld:
    """The latent truth behind the demo data; ``build_world(config)`` rebuilds it cheaply.

    Person ``p`` with ``p < users`` is business user ``p + 1``; higher indexes are visitors who
    never register. Item ``i`` is dataset ``i + 1``. Times are epoch seconds (UTC).
    """

    config: DemoConfig
    industries: tuple[str, ...]
    tags: tuple[str, ...]
    item_industry: npt.NDArray[np.int64]
    item_tags: tuple[tuple[int, ...], ...]
    item_tag_matrix: npt.NDArray[np.float64]
    item_price: npt.NDArray[np.float64]
    item_popularity: npt.NDArray[np.float64]
    item_created: npt.NDArray[np.int64]
    item_updated: npt.NDArray[np.int64]
    item_status: npt.NDArray[np.int64]
    item_title: tuple[str, ...]
    item_description: tuple[str, ...]
    item_company: tuple[str, ...]
    person_theta: npt.NDArray[np.float64]
    person_tag_pref: npt.NDArray[np.float64]
    person_price_mu: npt.NDArray[np.float64]
    person_price_sigma: npt.NDArray[np.float64]
    person_activity: npt.NDArray[np.float64]
    person_created: npt.NDArray[np.int64]
    person_place: npt.NDArray[np.int64]
    user_declared_industry: tuple[str, ...]
    user_name: tuple[str, ...]
    user_company: tuple[str, ...]
    user_membership: tuple[str, ...]
    user_updated: npt.NDArray[np.int64]
    span_start: int
    end: int

    @property
    def users(self) -> int:
        """Number of business users."""
        return len(self.user_name)

    def user_top_industry(self) -> list[str]:
        """Each business user's most preferred industry (index ``user_id - 1``)."""
        top = self.person_theta[: self.users].argmax(axis=1)
        return [self.industries[int(k)] for k in top]

    def affinity(self, persons: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        """``affinity x popularity^beta`` of every item for the given people (rows)."""
        theta = self.person_theta[persons][:, self.item_industry] + 0.01
        tag = np.exp(2.5 * (self.person_tag_pref[persons] @ self.item_tag_matrix.T))
        z = (
            np.log(self.item_price)[None, :] - self.person_price_mu[persons, None]
        ) / self.person_price_sigma[persons, None]
        price = np.exp(-0.5 * z * z) + 0.05
        return theta * tag * price * (self.item_popularity**POPULARITY_BETA)[None, :]


# --- public helpers ---------------------------------------------------------------------------------


def order_buster(order_no: str) -> int:
    """``log_conversion.buster`` of an order: ``CONV(SUBSTR(MD5(idorder),1,8),16,10)``."""
    return int(hashlib.md5(order_no.encode("utf-8"), usedforsecurity=False).hexdigest()[:8], 16)


def user_visitor_id(user_id: str) -> bytes:
    """The 8-byte ``idvisitor`` Matomo derives from a User ID: ``substr(sha1(uid), 0, 16)``."""
    return hashlib.sha1(user_id.encode("utf-8"), usedforsecurity=False).digest()[:8]


def action_hash(name: str) -> int:
    """``log_action.hash``: MySQL ``CRC32(name)`` over the UTF-8 bytes."""
    return zlib.crc32(name.encode("utf-8"))


def matomo_escape(text: str) -> str:
    """HTML-escape as Matomo's ``Request::getParam()`` does (PHP ``htmlspecialchars``, ENT_QUOTES)."""
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&#039;")
    )


# --- DDL ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DdlTable:
    """One CREATE TABLE of a MySQL DDL file, parsed just enough to translate it."""

    name: str
    mysql: str  # the statement without comments, as MySQL/MariaDB runs it
    columns: tuple[tuple[str, str], ...]  # (name, definition after the name)
    primary_key: tuple[str, ...]
    indexes: tuple[tuple[str, bool, str], ...]  # (name, unique, column list as written)


_TABLE_RE = re.compile(r"CREATE TABLE `(\w+)`")
_COLUMN_RE = re.compile(r"^`(\w+)`\s+(.*?),?$")
_PK_RE = re.compile(r"^PRIMARY KEY \((.*)\),?$")
_KEY_RE = re.compile(r"^(UNIQUE )?KEY `(\w+)` \((.*)\),?$")


def parse_ddl(text: str) -> list[DdlTable]:
    """Split a MySQL DDL file into its CREATE TABLE statements."""
    lines = [line for line in text.splitlines() if not line.strip().startswith("--")]
    tables = []
    for statement in "\n".join(lines).split(";"):
        statement = statement.strip()
        match = _TABLE_RE.search(statement)
        if not match:
            continue
        columns: list[tuple[str, str]] = []
        pk: tuple[str, ...] = ()
        indexes: list[tuple[str, bool, str]] = []
        for raw in statement.splitlines()[1:]:
            line = raw.strip()
            if m := _COLUMN_RE.match(line):
                columns.append((m.group(1), m.group(2)))
            elif m := _PK_RE.match(line):
                pk = tuple(c.strip().strip("`") for c in m.group(1).split(","))
            elif m := _KEY_RE.match(line):
                indexes.append((m.group(2), bool(m.group(1)), m.group(3)))
        tables.append(DdlTable(match.group(1), statement, tuple(columns), pk, tuple(indexes)))
    return tables


def _sqlite_type(definition: str) -> str:
    out = definition
    out = re.sub(r"\s+CHARACTER SET \w+", "", out)
    out = re.sub(r"\s+COLLATE \w+", "", out)
    out = re.sub(r"\s+unsigned\b", "", out)
    out = re.sub(r"\s+AUTO_INCREMENT\b", "", out)
    # SQLite keeps MySQL integer display widths in the declared type and SQLAlchemy then warns on
    # every reflection; the width never mattered for storage.
    out = re.sub(r"\b(tinyint|smallint|mediumint|int|bigint)\(\d+\)", r"\1", out)
    # SQLite reflects BINARY(n) as NUMERIC, which the contract would read as a number; BLOB keeps
    # the bytes and reflects as binary.
    return re.sub(r"\b(var)?binary\(\d+\)", "BLOB", out)


def sqlite_statements(table: DdlTable) -> list[str]:
    """Translate one MySQL CREATE TABLE to SQLite: same columns, keys as separate indexes."""
    auto = [name for name, definition in table.columns if "AUTO_INCREMENT" in definition]
    parts = []
    for name, definition in table.columns:
        if name in auto and table.primary_key == (name,):
            # The rowid alias: SQLite's only auto-incrementing key, reflected as INTEGER.
            parts.append(f'"{name}" INTEGER PRIMARY KEY')
        else:
            parts.append(f'"{name}" {_sqlite_type(definition)}')
    if table.primary_key and not (len(auto) == 1 and table.primary_key == (auto[0],)):
        parts.append("PRIMARY KEY (" + ", ".join(f'"{c}"' for c in table.primary_key) + ")")
    statements = [f'CREATE TABLE "{table.name}" (\n  ' + ",\n  ".join(parts) + "\n)"]
    for key, unique, cols in table.indexes:
        # Index names are per database in SQLite (per table in MySQL) and Matomo reuses some.
        statements.append(
            f'CREATE {"UNIQUE " if unique else ""}INDEX "{table.name}__{key}" '
            f'ON "{table.name}" ({cols.replace("`", chr(34))})'
        )
    return statements


def ddl_tables(which: Which) -> list[DdlTable]:
    """The tables ``make_demo_data`` creates for one source, in DDL order."""
    path = BUSINESS_DDL if which == "business" else MATOMO_DDL
    wanted = BUSINESS_TABLES if which == "business" else MATOMO_TABLES
    return [t for t in parse_ddl(path.read_text(encoding="utf-8")) if t.name in wanted]


def _quote(conn: sa.Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote_identifier(name)


def nonempty_tables(engine: sa.Engine, tables: Sequence[str]) -> list[str]:
    """The given tables that exist in the database and hold at least one row."""
    existing = set(sa.inspect(engine).get_table_names())
    found = []
    with engine.connect() as conn:
        for table in tables:
            if table in existing:
                row = conn.exec_driver_sql(f"SELECT 1 FROM {_quote(conn, table)} LIMIT 1").first()
                if row is not None:
                    found.append(table)
    return found


def create_tables(engine: sa.Engine, which: Which, *, reset: bool = False) -> None:
    """Create one source's tables; with ``reset`` drop them first. Existing tables are kept."""
    tables = ddl_tables(which)
    with engine.begin() as conn:
        existing = set(sa.inspect(conn).get_table_names())
        for table in tables:
            if reset and table.name in existing:
                conn.exec_driver_sql(f"DROP TABLE {_quote(conn, table.name)}")
                existing.discard(table.name)
            if table.name in existing:
                continue
            if conn.dialect.name == "sqlite":
                for statement in sqlite_statements(table):
                    conn.exec_driver_sql(statement)
            else:
                conn.exec_driver_sql(table.mysql)


# --- the latent world -------------------------------------------------------------------------------


def _epoch(value: dt.datetime) -> int:
    return int((value.replace(tzinfo=dt.UTC) - _EPOCH).total_seconds())


def build_world(config: DemoConfig) -> DemoWorld:
    """Draw items, users and their latent tastes (deterministic in seed, sizes and ``end``)."""
    rng = np.random.default_rng([config.seed, 0])
    pr = random.Random(int(rng.integers(1 << 62)))
    end = _epoch(config.resolved_end())
    span_start = end - config.days * 86400
    industries = tuple(INDUSTRIES)
    n_ind = len(industries)
    tags = tuple(dict.fromkeys(t for v in INDUSTRIES.values() for t in v[1])) + GENERAL_TAGS
    tag_index = {t: k for k, t in enumerate(tags)}
    n_items = config.items

    # Providers specialise: each sells mostly in one industry.
    providers = [f"{root} {kind}" for root in COMPANY_ROOTS for kind in PROVIDER_KINDS[:2]]
    provider_industry = rng.integers(0, n_ind, len(providers))

    item_industry = rng.integers(0, n_ind, n_items)
    item_tags: list[tuple[int, ...]] = []
    item_tag_matrix = np.zeros((n_items, len(tags)))
    titles, descriptions, companies = [], [], []
    medians = np.array([INDUSTRIES[k][3] for k in industries])
    item_price = np.exp(np.log(medians[item_industry]) + rng.normal(0.0, 1.0, n_items))
    item_price = np.clip(np.round(item_price), 50.0, 50_000.0)
    for i in range(n_items):
        key = industries[int(item_industry[i])]
        label, pool, words, _ = INDUSTRIES[key]
        k = pr.randint(2, 4)
        chosen: list[str] = []
        while len(chosen) < k:
            r = pr.random()
            if r < 0.82:
                tag = pr.choice(pool)
            elif r < 0.94:
                tag = pr.choice(GENERAL_TAGS)
            else:
                tag = pr.choice(INDUSTRIES[pr.choice(industries)][1])
            if tag not in chosen:
                chosen.append(tag)
        ids = tuple(tag_index[t] for t in chosen)
        item_tags.append(ids)
        item_tag_matrix[i, list(ids)] = 1.0 / len(ids)
        main = chosen[0].replace("-", " ").title()
        years = f" {pr.randint(2010, 2019)}-{pr.randint(2021, 2025)}" if pr.random() < 0.5 else ""
        title = f"{pr.choice(TITLE_SCOPES)} {label} {main} {pr.choice(TITLE_NOUNS)}{years}"
        same = [c for c, ind in enumerate(provider_industry) if industries[int(ind)] == key]
        company = (
            providers[pr.choice(same)] if same and pr.random() < 0.85 else pr.choice(providers)
        )
        fields = pr.sample(words, 4)
        tag_words = ", ".join(t.replace("-", " ") for t in chosen)
        descriptions.append(
            f"{title}. {label} data on {tag_words}. Fields include {fields[0]}, {fields[1]}, "
            f"{fields[2]} and {fields[3]} records, updated {pr.choice(FREQUENCIES)}. "
            f"Provided by {company} for {label.lower()} {pr.choice(words)} analysis."
        )
        titles.append(title)
        companies.append(company)

    # Most of the catalogue predates the window; the rest is released during it. Item 1 always
    # predates it so that the very first visit has something to look at.
    before = rng.random(n_items) < 0.8
    before[0] = True
    item_created = np.where(
        before,
        span_start - rng.integers(3600, 730 * 86400, n_items),
        span_start + rng.integers(0, max(1, end - span_start - 2 * 86400), n_items),
    ).astype(np.int64)
    item_status = (rng.random(n_items) >= 0.05).astype(np.int64)
    item_status[0] = 1
    item_updated = (
        item_created + (rng.random(n_items) * (end - 60 - item_created)).astype(np.int64)
    ).astype(np.int64)
    item_popularity = rng.lognormal(0.0, 1.0, n_items)

    # People: business users first, then visitors who never register.
    n_users = config.users
    n_anon = n_users // 2
    n_people = n_users + n_anon
    alpha = np.full((n_people, n_ind), 0.1)
    main = rng.integers(0, n_ind, n_people)
    alpha[np.arange(n_people), main] += 6.0
    second = rng.random(n_people) < 0.3
    other = (main + rng.integers(1, n_ind, n_people)) % n_ind
    alpha[np.arange(n_people)[second], other[second]] += 3.0
    theta = rng.gamma(alpha)
    theta /= theta.sum(axis=1, keepdims=True)
    # Tag tastes: random weights on the tags of the industries a person cares about.
    tag_ind = np.array([_tag_industry(t, industries) for t in tags])
    tag_pref = rng.gamma(0.6, 1.0, (n_people, len(tags))) * np.where(
        tag_ind[None, :] >= 0, theta[:, np.maximum(tag_ind, 0)], 0.15
    )
    tag_pref /= tag_pref.max(axis=1, keepdims=True)
    price_mu = rng.normal(np.log(900.0), 1.0, n_people)
    price_sigma = 0.8 + 0.6 * rng.random(n_people)
    activity = np.concatenate([rng.lognormal(0.0, 1.0, n_users), rng.lognormal(-1.0, 0.8, n_anon)])
    registered_before = rng.random(n_people) < 0.85
    person_created = np.where(
        registered_before,
        span_start - rng.integers(86400, 900 * 86400, n_people),
        span_start + rng.integers(0, max(1, end - span_start - 3 * 3600), n_people),
    ).astype(np.int64)
    person_created[n_users:] = span_start  # never-registered visitors can come any time
    person_place = rng.integers(0, len(PLACES), n_people)
    user_updated = (
        person_created[:n_users]
        + (
            rng.random(n_users)
            * (end - 60 - person_created[:n_users])
            * (rng.random(n_users) < 0.5)
        ).astype(np.int64)
    ).astype(np.int64)

    names, user_companies, declared, membership = [], [], [], []
    for u in range(n_users):
        names.append(f"{pr.choice(FIRST_NAMES)}.{pr.choice(LAST_NAMES)}{u + 1}")
        city = PLACES[int(person_place[u])][1]
        user_companies.append(f"{city} {pr.choice(COMPANY_ROOTS)} {pr.choice(CUSTOMER_KINDS)}")
        top = industries[int(theta[u].argmax())]
        declared.append(top if pr.random() < 0.75 else pr.choice(industries))
        r = pr.random()
        membership.append("free" if r < 0.7 else "pro" if r < 0.95 else "enterprise")

    return DemoWorld(
        config=config,
        industries=industries,
        tags=tags,
        item_industry=item_industry.astype(np.int64),
        item_tags=tuple(item_tags),
        item_tag_matrix=item_tag_matrix,
        item_price=item_price,
        item_popularity=item_popularity,
        item_created=item_created,
        item_updated=item_updated,
        item_status=item_status,
        item_title=tuple(titles),
        item_description=tuple(descriptions),
        item_company=tuple(companies),
        person_theta=theta,
        person_tag_pref=tag_pref,
        person_price_mu=price_mu,
        person_price_sigma=price_sigma,
        person_activity=activity,
        person_created=person_created,
        person_place=person_place.astype(np.int64),
        user_declared_industry=tuple(declared),
        user_name=tuple(names),
        user_company=tuple(user_companies),
        user_membership=tuple(membership),
        user_updated=user_updated,
        span_start=span_start,
        end=end,
    )


def _tag_industry(tag: str, industries: Sequence[str]) -> int:
    for k, key in enumerate(industries):
        if tag in INDUSTRIES[key][1]:
            return k
    return -1


# --- the visit plan ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Plan:
    """Every visit as three arrays, sorted by start time (visit i gets idvisit i + 1)."""

    person: npt.NDArray[np.int64]
    start: npt.NDArray[np.int64]
    length: npt.NDArray[np.int64]


def _plan_visits(world: DemoWorld) -> _Plan:
    config = world.config
    rng = np.random.default_rng([config.seed, 1])
    target = config.actions
    if target == 0:
        empty = np.zeros(0, dtype=np.int64)
        return _Plan(empty, empty, empty)
    # Visit lengths: a quarter bounce, the rest heavy-tailed; cut so they sum to the target.
    chunks, total = [], 0
    while total < target:
        n = max(64, int((target - total) / 5.0) + 64)
        bounce = rng.random(n) < 0.25
        longer = 2 + np.floor(rng.lognormal(np.log(4.0), 0.8, n))
        lengths = np.minimum(np.where(bounce, 1, longer), MAX_ACTIONS_PER_VISIT).astype(np.int64)
        chunks.append(lengths)
        total += int(lengths.sum())
    lengths = np.concatenate(chunks)
    cumulative = np.cumsum(lengths)
    n_visits = int(np.searchsorted(cumulative, target)) + 1
    lengths = lengths[:n_visits].copy()
    lengths[-1] -= int(cumulative[n_visits - 1]) - target

    hi = world.end - LAST_START_BEFORE_END_S
    lo = np.maximum(world.span_start, world.person_created + 60)
    capacity = np.where(hi >= lo, (hi - lo) // VISIT_SPACING_S + 1, 0)
    if int(capacity.sum()) < n_visits:
        raise DemoDataError(
            f"{target} actions need about {n_visits} visits, but {config.users} users over "
            f"{config.days} days allow at most {int(capacity.sum())}: raise --users or --days"
        )
    weights = world.person_activity * (capacity > 0)
    counts = rng.multinomial(n_visits, weights / weights.sum())
    # People more active than their calendar allows hand their extra visits to others.
    while (over := counts > capacity).any():
        excess = int((counts - capacity)[over].sum())
        counts = np.minimum(counts, capacity)
        room = weights * (counts < capacity)
        counts = counts + rng.multinomial(excess, room / room.sum())

    person = np.repeat(np.arange(len(counts)), counts)
    # Starts per person: uniform, but at least VISIT_SPACING_S apart (the "spacing" trick: draw
    # in the shortened window, sort, then push the k-th visit k spacings later).
    u = rng.random(n_visits)
    order = np.lexsort((u, person))
    u = u[order]
    first_of_person = np.cumsum(counts) - counts
    rank = np.arange(n_visits) - np.repeat(first_of_person, counts)
    slack = (hi - lo - (counts - 1) * VISIT_SPACING_S)[person]
    start = lo[person] + (u * slack).astype(np.int64) + rank * VISIT_SPACING_S
    by_time = np.lexsort((person, start))
    person, start = person[by_time], start[by_time]
    # Freshness: the newest visit starts at the latest allowed moment (it is its person's last
    # visit, so moving it later keeps the spacing).
    start[-1] = hi
    return _Plan(person.astype(np.int64), start.astype(np.int64), lengths)


# --- simulation ---------------------------------------------------------------------------------------


class _Times:
    """Epoch seconds -> 'YYYY-MM-DD HH:MM:SS' without datetime objects (millions of calls)."""

    def __init__(self) -> None:
        self._hms = [
            f"{h:02d}:{m:02d}:{s:02d}" for h in range(24) for m in range(60) for s in range(60)
        ]
        self._days: dict[int, str] = {}

    def day(self, t: int) -> str:
        """'YYYY-MM-DD '."""
        d = t // 86400
        got = self._days.get(d)
        if got is None:
            got = self._days[d] = (_EPOCH + dt.timedelta(days=d)).strftime("%Y-%m-%d ")
        return got

    def __call__(self, t: int) -> str:
        return (self._days.get(t // 86400) or self.day(t)) + self._hms[t % 86400]

    def clock(self, t: int) -> str:
        """'HH:MM:SS'."""
        return self._hms[t % 86400]


# (url, page title, SKU, product name, category, event URL) log_action ids, SKU string, price.
ProductIds = tuple[int, int, int, int, int, int, str, float]


@functools.cache
def _times() -> _Times:
    return _Times()


@dataclass
class _Line:
    """One matomo_log_conversion_item row while its visit is simulated."""

    sku_id: int
    name_id: int
    cat_id: int
    price: float
    vid: bytes
    t: int
    idorder: str = "0"
    deleted: int = 0
    item: int = 0
    rel: float = 0.0


@dataclass
class _Conv:
    """One matomo_log_conversion row while its visit is simulated (cart or order)."""

    t: int
    vid: bytes
    anchor: int  # chunk-local index of the action row it follows
    url_id: int
    url: str
    pageviews_before: int
    idgoal: int = -1
    buster: int = 0
    idorder: str | None = None
    revenue: float = 0.0
    items: int = 0


@dataclass
class _Chunk:
    """Rows of one chunk, ready to insert (actions get their ids when the chunk closes)."""

    # Action, visit and conversion rows are lists: close_chunk() patches action ids into them.
    log_action: list[Row] = field(default_factory=list)
    log_visit: list[list[Any]] = field(default_factory=list)
    log_link_visit_action: list[list[Any]] = field(default_factory=list)
    log_conversion: list[list[Any]] = field(default_factory=list)
    log_conversion_item: list[Row] = field(default_factory=list)
    api_order: list[Row] = field(default_factory=list)
    task: list[Row] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)  # (server_time << 22) | local index, for ordering


# fmt: off
# The columns each table is written with (all NOT NULL columns included); the rest keep defaults.
LVA_COLUMNS: Final = (
    "idlink_va", "idsite", "idvisitor", "idvisit", "idaction_url_ref", "idaction_name_ref",
    "custom_float", "pageview_position", "server_time", "idpageview", "idaction_name",
    "idaction_url", "search_cat", "search_count", "time_spent_ref_action", "idaction_product_cat",
    "idaction_product_name", "product_price", "idaction_product_sku", "idaction_event_action",
    "idaction_event_category", "time_spent", "custom_dimension_1",
)
VISIT_COLUMNS: Final = (
    "idvisit", "idsite", "idvisitor", "visit_last_action_time", "config_id", "location_ip",
    "profilable", "user_id", "visit_first_action_time", "visit_goal_buyer", "visit_goal_converted",
    "visitor_returning", "visitor_seconds_since_first", "visitor_seconds_since_order",
    "visitor_count_visits", "visit_entry_idaction_name", "visit_entry_idaction_url",
    "visit_exit_idaction_name", "visit_exit_idaction_url", "visit_total_actions",
    "visit_total_interactions", "visit_total_searches", "referer_keyword", "referer_name",
    "referer_type", "referer_url", "location_browser_lang", "config_browser_engine",
    "config_browser_name", "config_browser_version", "config_client_type", "config_device_brand",
    "config_device_model", "config_device_type", "config_os", "config_os_version",
    "visit_total_events", "visitor_localtime", "visitor_seconds_since_last", "config_resolution",
    "config_cookie", "config_flash", "config_java", "config_pdf", "config_quicktime",
    "config_realplayer", "config_silverlight", "config_windowsmedia", "visit_total_time",
    "location_city", "location_country", "location_latitude", "location_longitude",
    "location_region", "last_idlink_va", "custom_dimension_1",
)
CONVERSION_COLUMNS: Final = (
    "idvisit", "idsite", "idvisitor", "server_time", "idaction_url", "idlink_va", "idgoal",
    "buster", "idorder", "items", "url", "revenue", "revenue_shipping", "revenue_subtotal",
    "revenue_tax", "revenue_discount", "pageviews_before", "visitor_returning",
    "visitor_seconds_since_first", "visitor_seconds_since_order", "visitor_count_visits",
    "referer_keyword", "referer_name", "referer_type", "config_browser_name", "config_client_type",
    "config_device_brand", "config_device_model", "config_device_type", "location_city",
    "location_country", "location_latitude", "location_longitude", "location_region",
    "custom_dimension_1",
)
ITEM_COLUMNS: Final = (
    "idsite", "idvisitor", "server_time", "idvisit", "idorder", "idaction_sku", "idaction_name",
    "idaction_category", "idaction_category2", "idaction_category3", "idaction_category4",
    "idaction_category5", "price", "quantity", "deleted",
)
ACTION_COLUMNS: Final = ("idaction", "name", "hash", "type", "url_prefix")
USER_COLUMNS: Final = ("id", "username", "company_name", "industry", "province", "city", "created_at", "updated_at")
DATASET_COLUMNS: Final = (
    "id", "dataset_name", "description", "tag", "industry", "price", "create_company_name",
    "status", "created_at", "updated_at",
)
ORDER_COLUMNS: Final = ("id", "order_no", "user_id", "dataset_id", "amount", "status", "created_at", "updated_at")
TASK_COLUMNS: Final = ("id", "user_id", "dataset_id", "task_type", "status", "created_at", "updated_at")
# fmt: on

# Indexes into an action row (LVA_COLUMNS order).
_A_ID, _A_TIME, _A_SPENT_REF, _A_SPENT = 0, 8, 14, 21
# Visit and conversion rows hold a chunk-local action index here until the chunk closes.
_V_LAST_IDLINK = VISIT_COLUMNS.index("last_idlink_va")
_C_IDLINK = CONVERSION_COLUMNS.index("idlink_va")


class _Simulator:
    """Turns the plan into rows, chunk by chunk; keeps only cross-visit state in memory."""

    def __init__(self, world: DemoWorld, plan: _Plan) -> None:
        self.world = world
        self.plan = plan
        self.config = world.config
        self.noise = world.config.noise
        self.times = _times()
        self.n_users = world.users
        self.n_items = len(world.item_title)
        n_people = len(world.person_activity)
        rng = np.random.default_rng([self.config.seed, 2])
        self.cookies = [bytes(row) for row in rng.integers(0, 256, (n_people, 8), dtype=np.uint8)]
        self.config_ids = [
            bytes(row) for row in rng.integers(0, 256, (n_people, 8), dtype=np.uint8)
        ]
        # IPv4 with the last two bytes zeroed, as Matomo's default IP anonymisation stores them.
        self.ips = [bytes([int(a), int(b), 0, 0]) for a, b in rng.integers(1, 224, (n_people, 2))]
        weights = np.array([d[-1] for d in DEVICES])
        self.devices = rng.choice(len(DEVICES), n_people, p=weights / weights.sum()).tolist()
        self.langs = np.where(rng.random(n_people) < 0.8, "zh-cn,zh", "en-us,en").tolist()
        self.user_vids = [user_visitor_id(str(u + 1)) for u in range(self.n_users)]
        self.places = world.person_place.tolist()
        # Cross-visit state per person.
        self.visits_so_far = [0] * n_people
        self.first_visit = [0] * n_people
        self.last_visit_end = [0] * n_people
        self.last_order = [0] * n_people
        # Dedup of log_action strings, and per-item action ids (looked up on every product view).
        self.action_ids: dict[tuple[int, str], int] = {}
        self.pending_actions: list[tuple[Any, ...]] = []
        self.page_action_ids: dict[str, tuple[int, int]] = {}
        self.item_actions: list[ProductIds | None] = [None] * self.n_items
        self.next_idvisit = 1
        self.next_idlink = 1
        self.next_order_id = 1
        self.next_task_id = 1
        self.order_seq = 0
        self.industry_labels = [INDUSTRIES[k][0] for k in world.industries]
        self.item_industry = world.item_industry.tolist()
        self.item_tags = [[world.tags[k] for k in ids] for ids in world.item_tags]
        self.item_price = world.item_price.tolist()
        self.first_ts: int | None = None
        self.last_ts: int | None = None
        # Tastes do not change over time: compute person x item affinity once when it is small.
        cells = n_people * self.n_items
        self.affinity = world.affinity(np.arange(n_people)) if cells <= AFFINITY_CELLS else None

    # -- log_action -----------------------------------------------------------------------------

    def aid(self, type_: int, name: str, prefix: int | None = None) -> int:
        key = (type_, name)
        got = self.action_ids.get(key)
        if got is None:
            got = len(self.action_ids) + 1
            self.action_ids[key] = got
            self.pending_actions.append((got, name, action_hash(name), type_, prefix))
        return got

    def page_ids(self, path: str, title: str) -> tuple[int, int]:
        """Action ids of a page's URL (type 1) and title (type 4, HTML-escaped as Matomo stores it)."""
        got = self.page_action_ids.get(path)
        if got is None:
            got = self.aid(T_URL, path, URL_PREFIX_HTTPS), self.aid(T_TITLE, matomo_escape(title))
            self.page_action_ids[path] = got
        return got

    def item_ids(self, item: int) -> ProductIds:
        got = self.item_actions[item]
        if got is None:
            dataset_id = item + 1
            path = f"{SITE_HOST}/datasets/{dataset_id}"
            title = self.world.item_title[item]
            sku = f"DS-{dataset_id}"
            got = (
                self.aid(T_URL, path, URL_PREFIX_HTTPS),
                self.aid(T_TITLE, matomo_escape(f"{title} - {SITE_NAME}")),
                self.aid(T_SKU, sku),
                self.aid(T_PRODUCT_NAME, title),
                self.aid(T_CATEGORY, self.world.industries[self.item_industry[item]]),
                self.aid(T_EVENT_CATEGORY, path, URL_PREFIX_HTTPS),
                sku,
                self.item_price[item],
            )
            self.item_actions[item] = got
        return got

    def ghost_ids(self, fake_id: int) -> ProductIds:
        """Action ids of a product page whose dataset does not exist (noise only)."""
        path = f"{SITE_HOST}/datasets/{fake_id}"
        sku = f"DS-{fake_id}"
        return (
            self.aid(T_URL, path, URL_PREFIX_HTTPS),
            self.aid(T_TITLE, f"Dataset {fake_id} - {SITE_NAME}"),
            self.aid(T_SKU, sku),
            self.aid(T_PRODUCT_NAME, f"Dataset {fake_id}"),
            self.aid(T_CATEGORY, "unknown"),
            self.aid(T_EVENT_CATEGORY, path, URL_PREFIX_HTTPS),
            sku,
            99.0,
        )

    # -- chunks ---------------------------------------------------------------------------------------

    def chunk_bounds(self) -> list[tuple[int, int]]:
        lengths = self.plan.length
        n = len(lengths)
        max_visits = max(16, AFFINITY_CELLS // max(1, self.n_items))
        cumulative = np.concatenate([[0], np.cumsum(lengths)])
        bounds = []
        lo = 0
        while lo < n:
            by_actions = (
                int(np.searchsorted(cumulative, cumulative[lo] + CHUNK_ACTIONS, side="right")) - 1
            )
            hi = max(lo + 1, min(lo + max_visits, by_actions, n))
            bounds.append((lo, hi))
            lo = hi
        return bounds

    def chunks(self) -> Iterator[_Chunk]:
        for index, (lo, hi) in enumerate(self.chunk_bounds()):
            yield self.simulate_chunk(index, lo, hi)

    def simulate_chunk(self, index: int, lo: int, hi: int) -> _Chunk:
        world = self.world
        rng = np.random.default_rng([self.config.seed, 3, index])
        pr = random.Random(int(rng.integers(1 << 62)))
        persons = self.plan.person[lo:hi]
        starts = self.plan.start[lo:hi]
        lengths = self.plan.length[lo:hi]
        total = int(lengths.sum())
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])

        # Seconds between actions: a few seconds to ten minutes, a visit squeezed into MAX_VISIT_S.
        gaps = np.minimum(600.0, 2.0 + rng.lognormal(np.log(20.0), 1.0, total))
        gaps[offsets] = 0.0
        duration = np.add.reduceat(gaps, offsets)
        scale = np.minimum(1.0, MAX_VISIT_S / np.maximum(duration, 1.0))
        gaps = np.maximum(2.0, np.floor(gaps * np.repeat(scale, lengths)))
        gaps[offsets] = 0.0
        elapsed = np.cumsum(gaps)
        times = (
            np.repeat(starts, lengths) + elapsed - np.repeat(elapsed[offsets], lengths)
        ).astype(np.int64)

        # Items each visit will look at, drawn from affinity x popularity^beta. Only items on sale
        # when the chunk starts are visible, so nobody views an item before it exists.
        people, row_of_visit = np.unique(persons, return_inverse=True)
        t0 = int(starts[0])
        visible = (world.item_created <= t0) & (
            (world.item_status == 1) | (world.item_updated > t0 + 7200)
        )
        static = self.affinity[people] if self.affinity is not None else world.affinity(people)
        aff = static * visible[None, :]
        row_sum = aff.sum(axis=1)
        cdf = np.cumsum(aff, axis=1) / row_sum[:, None]
        cdf[:, -1] = 1.0
        n_items = aff.shape[1]
        rows = np.repeat(row_of_visit, lengths)
        flat = (cdf + np.arange(len(people))[:, None]).ravel()
        picks = np.searchsorted(flat, rng.random(total) + rows, side="right") - rows * n_items
        picks = np.clip(picks, 0, n_items - 1)
        rel = aff[rows, picks] / aff.max(axis=1)[rows]

        out = _Chunk()
        times_l, picks_l, rel_l = times.tolist(), picks.tolist(), rel.tolist()
        persons_l, lengths_l, offsets_l = persons.tolist(), lengths.tolist(), offsets.tolist()
        for j in range(hi - lo):
            off, length = offsets_l[j], lengths_l[j]
            self.simulate_visit(
                out,
                pr,
                persons_l[j],
                times_l[off : off + length],
                picks_l[off : off + length],
                rel_l[off : off + length],
            )
        self.close_chunk(out)
        return out

    def close_chunk(self, out: _Chunk) -> None:
        """Give actions their ids in server_time order, as concurrent visits would interleave."""
        fmt = self.times
        n = len(out.log_link_visit_action)
        order = np.argsort(np.array(out.keys, dtype=np.int64), kind="stable")
        ids = np.empty(n, dtype=np.int64)
        ids[order] = np.arange(self.next_idlink, self.next_idlink + n)
        ids_l = ids.tolist()
        rows = out.log_link_visit_action
        for local, row in enumerate(rows):
            row[_A_ID] = ids_l[local]
            row[_A_TIME] = fmt(row[_A_TIME])
        out.log_link_visit_action = [rows[i] for i in order.tolist()]
        for visit in out.log_visit:
            visit[_V_LAST_IDLINK] = ids_l[visit[_V_LAST_IDLINK]]
        for conv in out.log_conversion:
            conv[_C_IDLINK] = ids_l[conv[_C_IDLINK]]
        self.next_idlink += n
        out.log_action = self.pending_actions
        self.pending_actions = []
        out.api_order.sort(key=lambda r: (r[5], r[0]))
        out.api_order = [(self.next_order_id + k, *r) for k, r in enumerate(out.api_order)]
        self.next_order_id += len(out.api_order)
        out.task.sort(key=lambda r: r[4])
        out.task = [(self.next_task_id + k, *r) for k, r in enumerate(out.task)]
        self.next_task_id += len(out.task)

    # -- one visit --------------------------------------------------------------------------------------

    def simulate_visit(
        self,
        out: _Chunk,
        pr: random.Random,
        p: int,
        times: list[int],
        picks: list[int],
        rels: list[float],
    ) -> None:
        _Visit(self, out, pr, p, times, picks, rels).run()


_EVENT_STRINGS: Final = {"fav": EVENT_FAVORITE, "sample": EVENT_SAMPLE, "click": EVENT_RESULT_CLICK}


class _Visit:
    """One visit: the tracker's requests in order, ending in the visit's final rows.

    ``times``, ``picks`` and ``rels`` hold, per action, its server time, a drawn item and how
    well that item fits the person (0-1). Ecommerce requests (cart updates, orders) create no
    action row; they fall between two actions.
    """

    def __init__(
        self,
        sim: _Simulator,
        out: _Chunk,
        pr: random.Random,
        p: int,
        times: list[int],
        picks: list[int],
        rels: list[float],
    ) -> None:
        self.sim, self.out, self.pr, self.p = sim, out, pr, p
        self.times, self.picks, self.rels = times, picks, rels
        self.length = len(times)
        self.idvisit = sim.next_idvisit
        sim.next_idvisit += 1
        self.vid = sim.cookies[p]
        self.logged = False
        # Who the tracker knows: logged in from the start, logging in mid-visit, or anonymous.
        self.login_at = self.length + 1
        if p < sim.n_users:
            r = pr.random()
            if r < 0.62:
                self.login_at = 0
            elif r < 0.74 and self.length >= 2:
                self.login_at = pr.randint(1, self.length - 1)
        self.user_id: str | None = None
        if self.login_at <= self.length:
            self.user_id = str(p + 1)
            if sim.noise and pr.random() < sim.noise:
                self.user_id = f"guest-{pr.getrandbits(32):08x}"  # noise: not a business user id
        r = pr.random()
        self.ref = next(x for x in REFERRERS if r <= x[4])
        self.visitor = self.visitor_dimensions()

        self.prev_t = times[0]
        self.prev_url: int | None = 0
        self.prev_name: int | None = None
        self.prev_row: list[Any] | None = None
        self.last_local = 0
        self.pageviews = self.events = self.searches = 0
        self.entry_ids: tuple[int, int] | None = None
        self.exit_ids: tuple[int, int] = (0, 0)
        self.pvid = ""
        self.page_kind = ""
        self.page_url_id = 0
        self.page_url = ""
        self.product: ProductIds | None = None
        self.product_item = -1
        self.queue: list[tuple[str, int, float]] = []
        self.pick = 0
        self.convs: list[_Conv] = []
        self.lines: list[_Line] = []
        self.cart: _Conv | None = None
        self.cart_lines: dict[int, _Line] = {}  # the open cart by SKU action id (idorder '0')
        self.ordered = False

    def visitor_dimensions(self) -> tuple[int, int, int | None, int | None, int]:
        """What the tracker knows about the visitor when the visit starts (copied onto conversions).

        Returns visitor_count_visits, visitor_seconds_since_first/_order/_last, visitor_returning.
        """
        sim, p, first = self.sim, self.p, self.times[0]
        count = sim.visits_so_far[p] + 1
        sim.visits_so_far[p] = count
        if count == 1:
            sim.first_visit[p] = first
        since_last = first - sim.last_visit_end[p] if count > 1 else None
        since_order = first - sim.last_order[p] if sim.last_order[p] else None
        returning = 0 if count == 1 else 2 if since_order is not None else 1
        return count, first - sim.first_visit[p], since_order, since_last, returning

    def run(self) -> None:
        for k in range(self.length):
            if k == self.login_at:
                self.logged = True
                self.vid = self.sim.user_vids[self.p]
            kind, item, rel = self.next_step(k)
            if kind == "search":
                self.search(k, item, rel)
            elif kind in _EVENT_STRINGS:
                self.event(k, kind, item)
            else:
                self.pageview(k, kind, item, rel)
        self.finish()

    def next_step(self, k: int) -> tuple[str, int, float]:
        if self.queue:
            return self.queue.pop(0)
        if k == 0:
            referer_type = self.ref[0]
            kind = (
                "home"
                if referer_type in (1, 7)
                else "product"
                if referer_type in (2, 6)
                else "list"
            )
        else:
            r = self.pr.random()
            if self.cart is not None and self.logged and r < 0.22:
                kind = "checkout"
            elif r < 0.50:
                kind = "product"
            elif r < 0.67:
                kind = "search"
            elif r < 0.87:
                kind = "list"
            else:
                kind = "home"
        if kind in ("product", "search"):
            return (kind, *self.draw())
        return kind, -1, 0.0

    def draw(self) -> tuple[int, float]:
        i = self.pick % self.length
        self.pick += 1
        return self.picks[i], self.rels[i]

    def conv_time(self, k: int) -> int:
        # Between action k and the next one, so the visit's last action stays its last request.
        times = self.times
        if k + 1 < self.length:
            return times[k] + max(1, (times[k + 1] - times[k]) // 2)
        return times[k]

    def emit(
        self,
        k: int,
        name_id: int | None,
        url_id: int | None,
        *,
        position: int | None = None,
        value: float | None = None,
        search: tuple[str | None, int] | None = None,
        product: ProductIds | None = None,
        event: tuple[int, int] | None = None,
    ) -> None:
        """Append one log_link_visit_action row (id and time string are set when the chunk closes)."""
        t = self.times[k]
        spent = t - self.prev_t
        cat = pname = price = sku = None
        if product is not None:
            cat, pname, price, sku = product[4], product[3], product[7], product[2]
        search_cat, search_count = search if search is not None else (None, None)
        event_action, event_category = event if event is not None else (None, None)
        # fmt: off
        row = [
            None, IDSITE, self.vid, self.idvisit, self.prev_url, self.prev_name,
            value, position, t, self.pvid, name_id, url_id, search_cat, search_count, spent,
            cat, pname, price, sku, event_action, event_category,
            None, self.page_kind,
        ]
        # fmt: on
        if self.prev_row is not None:
            self.prev_row[_A_SPENT] = spent
        rows = self.out.log_link_visit_action
        self.out.keys.append((t << 22) | len(rows))
        self.last_local = len(rows)
        rows.append(row)
        self.prev_row, self.prev_t, self.prev_url, self.prev_name = row, t, url_id, name_id

    # -- the kinds of action ----------------------------------------------------------------------

    def pageview(self, k: int, kind: str, item: int, rel: float) -> None:
        sim = self.sim
        self.pageviews += 1
        self.pvid = f"{self.pr.getrandbits(24):06x}"
        self.page_kind = kind
        if kind == "product":
            # setEcommerceView + trackPageView: the product fields sit on the pageview row.
            if sim.noise and self.pr.random() < sim.noise:
                self.product, self.product_item = (
                    sim.ghost_ids(sim.n_items + 1000 + self.pr.randrange(50)),
                    -1,
                )
            else:
                self.product, self.product_item = sim.item_ids(item), item
            url_id, name_id = self.product[0], self.product[1]
            self.page_url = f"https://{SITE_HOST}/datasets/{self.product[6][3:]}"
            self.emit(k, name_id, url_id, position=self.pageviews, product=self.product)
        else:
            self.product, self.product_item = None, -1
            if kind == "home":
                path, title = f"{SITE_HOST}/", f"{SITE_NAME} - Open data marketplace"
            elif kind == "checkout":
                path, title = f"{SITE_HOST}/checkout", f"Checkout - {SITE_NAME}"
            else:
                # Listing pages follow taste too: the industry of the item the visitor goes for next.
                industry = sim.item_industry[self.picks[self.pick % self.length]]
                path = f"{SITE_HOST}/datasets?industry={sim.world.industries[industry]}"
                title = f"{sim.industry_labels[industry]} datasets - {SITE_NAME}"
            url_id, name_id = sim.page_ids(path, title)
            self.page_url = f"https://{path}"
            self.emit(k, name_id, url_id, position=self.pageviews)
        self.page_url_id = url_id
        if self.entry_ids is None:
            self.entry_ids = (name_id, url_id)
        self.exit_ids = (name_id, url_id)
        if self.product_item >= 0:
            self.on_product_page(k, rel)
        elif kind == "checkout":
            self.checkout(k)

    def search(self, k: int, item: int, rel: float) -> None:
        """trackSiteSearch: the keyword (type 8, HTML-escaped) in idaction_name, no page URL."""
        sim, pr = self.sim, self.pr
        keyword = pr.choice(sim.item_tags[item]).replace("-", " ")
        industry = sim.item_industry[item]
        if pr.random() < 0.3:
            keyword = f"{sim.industry_labels[industry].lower()} {keyword}"
        search_cat = sim.world.industries[industry] if pr.random() < 0.3 else None
        self.pvid = f"{pr.getrandbits(24):06x}"
        self.page_kind = "search"
        self.product, self.product_item = None, -1
        name_id = sim.aid(T_SEARCH, matomo_escape(keyword))
        self.emit(k, name_id, None, search=(search_cat, pr.randint(1, 120)))
        self.searches += 1
        if self.length - k - 1 >= 2 and pr.random() < 0.6:
            self.queue += [("click", item, rel), ("product", item, rel)]

    def event(self, k: int, kind: str, item: int) -> None:
        """trackEvent: category/action/name as log_action types 10/11/12, page URL as type 10."""
        sim, pr = self.sim, self.pr
        category, action = _EVENT_STRINGS[kind]
        ids = (sim.aid(T_EVENT_ACTION, action), sim.aid(T_EVENT_CATEGORY, category))
        sent = 2 if sim.noise and pr.random() < sim.noise else 1  # noise: the tracker sent it twice
        for _ in range(sent):
            self.events += 1
            if kind == "click":
                url_id = sim.aid(T_EVENT_CATEGORY, f"{SITE_HOST}/search", URL_PREFIX_HTTPS)
                name_id = sim.aid(T_EVENT_NAME, sim.item_ids(item)[6])
                self.emit(k, name_id, url_id, value=float(pr.randint(1, 10)), event=ids)
            else:
                # The tracker copies the page's product fields onto every later request of the page.
                assert self.product is not None
                name_id = sim.aid(T_EVENT_NAME, self.product[6])
                self.emit(k, name_id, self.product[5], product=self.product, event=ids)
        if kind == "sample" and self.logged:
            self.out.task.append(self.task_row(self.product_item, "download", self.times[k]))

    # -- what a product page leads to -------------------------------------------------------------

    def on_product_page(self, k: int, fits: float) -> None:
        pr = self.pr
        remaining = self.length - k - 1 - len(self.queue)
        if remaining > 0 and pr.random() < 0.03 + 0.12 * fits:
            self.queue.append(("fav", self.product_item, fits))
            remaining -= 1
        if remaining > 0 and pr.random() < 0.02 + 0.10 * fits:
            self.queue.append(("sample", self.product_item, fits))
        if self.logged and pr.random() < 0.01 + 0.04 * fits:
            self.out.task.append(self.task_row(self.product_item, "trial", self.times[k] + 30))
        if pr.random() < 0.015 + 0.10 * fits:
            self.cart_update(k, fits)
        elif self.logged and self.cart is None and pr.random() < 0.004 + 0.025 * fits:
            # "Buy now": an order with no cart before it.
            assert self.product is not None
            t = self.conv_time(k)
            line = _Line(
                *self.product[2:5], self.product[7], self.vid, t, item=self.product_item, rel=fits
            )
            self.lines.append(line)
            order = _Conv(
                t, self.vid, self.last_local, self.page_url_id, self.page_url, self.pageviews
            )
            self.convs.append(order)
            self.place_order(order, line, [])

    def cart_update(self, k: int, fits: float) -> None:
        """trackEcommerceCartUpdate with the whole cart: one cart row per visit, rewritten."""
        assert self.product is not None
        t, vid = self.conv_time(k), self.vid
        sku_id = self.product[2]
        line = self.cart_lines.get(sku_id)
        if line is None:
            line = _Line(
                *self.product[2:5], self.product[7], vid, t, item=self.product_item, rel=fits
            )
            self.cart_lines[sku_id] = line
            self.lines.append(line)
        line.deleted = 0
        live = [ln for ln in self.cart_lines.values() if not ln.deleted]
        if len(live) >= 2 and self.pr.random() < 0.15:
            gone = self.pr.choice([ln for ln in live if ln is not line])
            gone.deleted, gone.t, gone.vid = 1, t, vid  # removed SKUs stay as deleted=1 lines
            live.remove(gone)
        for ln in live:
            ln.t, ln.vid = t, vid
        if self.cart is None:
            self.cart = _Conv(
                t, vid, self.last_local, self.page_url_id, self.page_url, self.pageviews
            )
            self.convs.append(self.cart)
        self.touch(self.cart, k)
        self.cart.revenue = float(sum(ln.price for ln in live))
        self.cart.items = len(live)

    def checkout(self, k: int) -> None:
        if self.cart is None or self.pr.random() >= 0.75:
            return  # no cart, or the visitor leaves the checkout page without paying
        live = [ln for ln in self.cart_lines.values() if not ln.deleted]
        bought = max(live, key=lambda ln: ln.rel)
        self.touch(self.cart, k)
        self.place_order(self.cart, bought, list(self.cart_lines.values()))
        self.cart, self.cart_lines = None, {}

    def touch(self, conv: _Conv, k: int) -> None:
        conv.t, conv.vid, conv.anchor = self.conv_time(k), self.vid, self.last_local
        conv.url_id, conv.url, conv.pageviews_before = (
            self.page_url_id,
            self.page_url,
            self.pageviews,
        )

    def place_order(self, conv: _Conv, bought: _Line, cart_lines: list[_Line]) -> None:
        """Turn ``conv`` (the open cart, or a new row) into an order of one dataset.

        As GoalManager::recordEcommerceGoal: idgoal -1 -> 0, buster 0 -> md5 rule, idorder set;
        the cart's lines are re-tagged with the order id and those not bought get deleted=1.
        """
        sim, pr = self.sim, self.pr
        t = conv.t
        sim.order_seq += 1
        order_no = f"DM{sim.times.day(t).strip().replace('-', '')}{sim.order_seq:08d}"
        conv.idgoal, conv.buster, conv.idorder = 0, order_buster(order_no), order_no
        conv.revenue, conv.items = bought.price, 1
        for line in cart_lines:
            line.idorder, line.t, line.vid, line.deleted = order_no, t, conv.vid, 1
        bought.idorder, bought.t, bought.vid, bought.deleted = order_no, t, conv.vid, 0
        self.ordered = True
        sim.last_order[self.p] = t
        end = sim.world.end
        r = pr.random()
        status, updated = "paid", min(end, t + pr.randint(2, 90))
        if r < 0.04:
            status, updated = "pending", t
        elif r < 0.09 and t + 3600 <= end:
            status, updated = "refunded", min(end, t + pr.randint(3600, 7 * 86400))
        fmt = sim.times
        self.out.api_order.append(
            (
                order_no,
                self.p + 1,
                bought.item + 1,
                round(bought.price, 2),
                status,
                fmt(t),
                fmt(updated),
            )
        )
        if pr.random() < 0.4:
            self.out.task.append(self.task_row(bought.item, "api_test", t + 60))

    def task_row(self, item: int, task_type: str, t: int) -> tuple[Any, ...]:
        """A business task (trial, sample download, API test); recent ones may still run."""
        pr, end, fmt = self.pr, self.sim.world.end, self.sim.times
        t = min(t, end - 1)
        if t > end - 600 and pr.random() < 0.6:
            status, updated = pr.choice(("created", "running")), t
        else:
            status = "failed" if pr.random() < 0.08 else "done"
            updated = min(end, t + pr.randint(20, 1800))
        return (self.p + 1, item + 1, task_type, status, fmt(t), fmt(updated))

    # -- the visit's rows ---------------------------------------------------------------------------

    def finish(self) -> None:
        sim, p, fmt = self.sim, self.p, self.sim.times
        first, last = self.times[0], self.times[-1]
        count, since_first, since_order, since_last, returning = self.visitor
        sim.last_visit_end[p] = last
        sim.first_ts = first if sim.first_ts is None else min(sim.first_ts, first)
        sim.last_ts = last if sim.last_ts is None else max(sim.last_ts, last)

        d = DEVICES[sim.devices[p]]
        place = PLACES[sim.places[p]]
        ref = self.ref
        membership = sim.world.user_membership[p] if self.user_id is not None else None
        buyer = (
            (3 if self.cart is not None else 1)
            if self.ordered
            else (2 if self.cart is not None else 0)
        )
        assert self.entry_ids is not None  # every visit starts with a pageview
        # fmt: off
        self.out.log_visit.append([
            self.idvisit, IDSITE, self.vid, fmt(last), sim.config_ids[p], sim.ips[p], 1,
            self.user_id, fmt(first), buyer, 1 if self.convs else 0, returning, since_first,
            since_order, count, *self.entry_ids, *self.exit_ids, self.length, self.pageviews,
            self.searches, ref[3], ref[1], ref[0], ref[2], sim.langs[p], d[4], d[3], d[5], 1,
            d[7], d[8], d[0], d[1], d[2], self.events,
            fmt.clock(first + 8 * 3600),  # visitor_localtime: visitors are in China (UTC+8)
            since_last, d[6], 1, 0, 0, 1, 0, 0, 0, 0, last - first,
            place[1], "cn", place[3], place[4], place[2], self.last_local, membership,
        ])
        for c in self.convs:
            order = c.idgoal == 0
            self.out.log_conversion.append([
                self.idvisit, IDSITE, c.vid, fmt(c.t), c.url_id, c.anchor, c.idgoal, c.buster,
                c.idorder, c.items, c.url, c.revenue,
                0.0 if order else None, c.revenue if order else None,
                0.0 if order else None, 0.0 if order else None,
                c.pageviews_before, returning, since_first, since_order, count,
                ref[3], ref[1], ref[0], d[3], 1, d[7], d[8], d[0],
                place[1], "cn", place[3], place[4], place[2], membership,
            ])
        for ln in self.lines:
            self.out.log_conversion_item.append((
                IDSITE, ln.vid, fmt(ln.t), self.idvisit, ln.idorder, ln.sku_id, ln.name_id,
                ln.cat_id, 0, 0, 0, 0, ln.price, 1, ln.deleted,
            ))
        # fmt: on


# --- writing ----------------------------------------------------------------------------------------


class _Loader:
    """Bulk inserts over one connection, no ORM.

    SQLite: executemany in batches of INSERT_BATCH. MySQL/MariaDB: multi-row INSERT statements
    of about MYSQL_STATEMENT_BYTES formatted here, because mysqlclient's per-value escaping cost
    about 1 us per value, two thirds of the whole load (profiled at 200k actions).
    """

    def __init__(self, conn: sa.Connection) -> None:
        self.conn = conn
        self.mysql = conn.dialect.name in ("mysql", "mariadb")
        self.counts: dict[str, int] = {}

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.counts[table] = self.counts.get(table, 0) + len(rows)
        if not rows:
            return
        q = self.conn.dialect.identifier_preparer.quote_identifier
        head = f"INSERT INTO {q(table)} ({', '.join(q(c) for c in columns)}) VALUES "
        # The DB-API cursor: rows may stay lists, and a statement without parameters must not go
        # through %-formatting. The transaction is still the SQLAlchemy connection's.
        dbapi = self.conn.dialect.loaded_dbapi
        cursor = self.conn.connection.cursor()
        try:
            if not self.mysql:
                sql = head + "(" + ", ".join("?" * len(columns)) + ")"
                for lo in range(0, len(rows), INSERT_BATCH):
                    cursor.executemany(sql, rows[lo : lo + INSERT_BATCH])
                return
            values: list[str] = []
            size = 0
            for row in rows:
                text = "(" + ",".join(map(_mysql_literal, row)) + ")"
                values.append(text)
                size += len(text) + 1
                if size >= MYSQL_STATEMENT_BYTES:
                    cursor.execute(head + ",".join(values))
                    values, size = [], 0
            if values:
                cursor.execute(head + ",".join(values))
        except dbapi.Error as exc:
            # Raised as SQLAlchemy would have (OperationalError, IntegrityError, ...).
            raise sa.exc.DBAPIError.instance(
                head, None, exc, dbapi.Error, dialect=self.conn.dialect
            ) from exc
        finally:
            cursor.close()


def _mysql_literal(value: Any) -> str:
    """An SQL literal that reads the same whatever the server's sql_mode (NO_BACKSLASH_ESCAPES)."""
    if value is None:
        return "NULL"
    kind = type(value)
    if kind is str:
        if "\\" in value or "\0" in value:
            return "X'" + value.encode("utf-8").hex() + "'"
        return "'" + value.replace("'", "''") + "'"
    if kind is int or kind is float:
        return repr(value)
    if kind is bytes:
        return "X'" + value.hex() + "'"
    if kind is bool:
        return "1" if value else "0"
    raise TypeError(f"no SQL literal for {kind.__name__}")


def _tune(conn: sa.Connection) -> None:
    if conn.dialect.name == "sqlite":
        # A throw-away bulk load: a crash mid-load means rerunning with --reset anyway.
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
        conn.exec_driver_sql("PRAGMA synchronous=OFF")
        conn.commit()


def _business_rows(world: DemoWorld, pr: random.Random) -> tuple[list[Row], list[Row]]:
    fmt = _times()
    noise = world.config.noise
    users: list[Row] = []
    for u in range(world.users):
        province, city = PLACES[int(world.person_place[u])][:2]
        profile = (world.user_company[u], world.user_declared_industry[u], province, city)
        if noise and pr.random() < noise:
            profile = (None, None, None, None)  # noise: a profile never filled in
        created, updated = fmt(int(world.person_created[u])), fmt(int(world.user_updated[u]))
        users.append((u + 1, world.user_name[u], *profile, created, updated))
    datasets: list[Row] = []
    for i in range(len(world.item_title)):
        description: str | None = world.item_description[i]
        tag: str | None = ",".join(world.tags[k] for k in world.item_tags[i])
        price = float(world.item_price[i])
        if noise and pr.random() < noise:
            description, tag = None, None  # noise: a listing without description or tags
        if noise and pr.random() < noise / 2:
            price = 0.0  # noise: no price, stored as the column default
        industry = world.industries[int(world.item_industry[i])]
        created, updated = fmt(int(world.item_created[i])), fmt(int(world.item_updated[i]))
        listing = (world.item_title[i], description, tag, industry, price, world.item_company[i])
        datasets.append((i + 1, *listing, int(world.item_status[i]), created, updated))
    return users, datasets


def _matomo_setup_rows(world: DemoWorld) -> dict[str, list[dict[str, Any]]]:
    """The lookup tables Matomo needs to interpret its log tables: site, goal, custom dimensions."""
    site = {
        "idsite": IDSITE,
        "name": SITE_NAME,
        "main_url": f"https://{SITE_HOST}",
        "ts_created": _times()(world.span_start - 400 * 86400),
        "ecommerce": 1,
        "sitesearch": 1,
        "sitesearch_keyword_parameters": "q",
        "sitesearch_category_parameters": "industry",
        "timezone": "UTC",
        "currency": CURRENCY,
        "exclude_unknown_urls": 0,
        "excluded_ips": "",
        "excluded_parameters": "",
        "excluded_user_agents": "",
        "excluded_referrers": "",
        "group": "",
        "type": "website",
        "keep_url_fragment": 0,
        "creator_login": "admin",
    }
    goal = {
        "idsite": IDSITE,
        "idgoal": 1,
        "name": "Newsletter signup",
        "description": "",
        "match_attribute": "url",
        "pattern": "newsletter/thanks",
        "pattern_type": "contains",
        "case_sensitive": 0,
        "allow_multiple": 0,
        "revenue": 0.0,
        "deleted": 0,
        "event_value_as_revenue": 0,
    }
    dimensions = [
        # visit scope index 1 -> log_visit/log_conversion.custom_dimension_1,
        # action scope index 1 -> log_link_visit_action.custom_dimension_1
        {"idcustomdimension": 1, "name": "Membership", "index": 1, "scope": "visit"},
        {"idcustomdimension": 2, "name": "Page type", "index": 1, "scope": "action"},
    ]
    for dim in dimensions:
        dim.update(idsite=IDSITE, active=1, extractions="[]", case_sensitive=1)
    return {"matomo_site": [site], "matomo_goal": [goal], "matomo_custom_dimensions": dimensions}


def generate(
    business_engine: sa.Engine,
    matomo_engine: sa.Engine,
    config: DemoConfig,
    progress: Progress = None,
) -> DemoSummary:
    """Create the demo tables and fill them; ``progress`` receives counts of action rows written.

    Raises ``DemoDataError`` when a target table already holds rows and ``config.reset`` is off,
    or when the sizes cannot fit (too many actions for the users and days).
    """
    started = time.perf_counter()
    config = replace(config, end=config.resolved_end())
    assert config.end is not None
    world = build_world(config)
    plan = _plan_visits(world)
    if not config.reset:
        for engine, tables in ((business_engine, BUSINESS_TABLES), (matomo_engine, MATOMO_TABLES)):
            full = nonempty_tables(engine, tables)
            if full:
                where = engine.url.render_as_string(hide_password=True)
                raise DemoDataError(
                    f"{', '.join(full)} in {where} already hold data; pass --reset to replace them"
                )
    create_tables(business_engine, "business", reset=config.reset)
    create_tables(matomo_engine, "matomo", reset=config.reset)

    with business_engine.connect() as bconn, matomo_engine.connect() as mconn:
        _tune(bconn)
        _tune(mconn)
        business, matomo = _Loader(bconn), _Loader(mconn)
        users, datasets = _business_rows(world, random.Random(config.seed))
        with bconn.begin():
            business.insert("user", USER_COLUMNS, users)
            business.insert("dataset", DATASET_COLUMNS, datasets)
        del users, datasets
        with mconn.begin():
            for table, records in _matomo_setup_rows(world).items():
                matomo.insert(table, tuple(records[0]), [tuple(r.values()) for r in records])
        simulator = _Simulator(world, plan)
        for chunk in simulator.chunks():
            with mconn.begin():
                matomo.insert("matomo_log_action", ACTION_COLUMNS, chunk.log_action)
                matomo.insert("matomo_log_visit", VISIT_COLUMNS, chunk.log_visit)
                matomo.insert(
                    "matomo_log_link_visit_action", LVA_COLUMNS, chunk.log_link_visit_action
                )
                matomo.insert("matomo_log_conversion", CONVERSION_COLUMNS, chunk.log_conversion)
                matomo.insert("matomo_log_conversion_item", ITEM_COLUMNS, chunk.log_conversion_item)
            with bconn.begin():
                business.insert("api_order", ORDER_COLUMNS, chunk.api_order)
                business.insert("task", TASK_COLUMNS, chunk.task)
            if progress is not None:
                progress(len(chunk.log_link_visit_action))

    rows = {t: business.counts.get(t, 0) for t in BUSINESS_TABLES}
    rows.update({t: matomo.counts.get(t, 0) for t in MATOMO_TABLES})
    first = simulator.first_ts
    last = simulator.last_ts
    return DemoSummary(
        rows=rows,
        seconds=time.perf_counter() - started,
        end=config.end,
        first_activity=None
        if first is None
        else (_EPOCH + dt.timedelta(seconds=first)).replace(tzinfo=None),
        last_activity=None
        if last is None
        else (_EPOCH + dt.timedelta(seconds=last)).replace(tzinfo=None),
    )
