"""Public data sets as canonical-like frames, for offline evaluation and benchmarks. Pure core.

Each loader returns users, items and interactions with the canonical columns and dtypes of
``schema`` (interactions: ``user_id``, ``item_id``, ``event``, ``ts`` in UTC, ``value``, ...),
plus a few extra columns a data set has and the schema does not (``stock_code``, ``country``).
They are "canonical-like": columns the data set cannot fill stay null (MovieLens has no
prices), so they are meant for the training core and evaluation, not for the cleaning gate.

Row order follows the files: the benchmark split protocol shuffles within groups of rows, so
reproducing a published split needs the rows in the order the publisher read them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from apps.pipeline import schema
from apps.pipeline.evaluate import Split

# shared/ sits beside the checkout (on developer machines and in CI alike).
UCI_ONLINE_RETAIL = (
    Path(__file__).resolve().parents[3] / "shared/data/uci-online-retail/online_retail.parquet"
)

# Genres of MovieLens-100K in the column order of u.item (also listed in u.genre).
ML100K_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)

__all__ = [
    "ML100K_GENRES",
    "UCI_ONLINE_RETAIL",
    "Dataset",
    "load_movielens",
    "load_online_retail",
    "load_split_files",
]


@dataclass(frozen=True)
class Dataset:
    """A loaded data set: canonical-like frames, the event weights that suit it, and how many
    source rows each loading rule dropped."""

    name: str
    users: pd.DataFrame
    items: pd.DataFrame
    interactions: pd.DataFrame
    weights: Mapping[str, float] = field(default_factory=lambda: dict(schema.EVENTS))
    dropped: Mapping[str, int] = field(default_factory=dict)

    def frames(self) -> dict[str, pd.DataFrame]:
        """The frames by entity name, as ``TrainingSet.from_frames`` takes them."""
        return {"users": self.users, "items": self.items, "interactions": self.interactions}


# ------------------------------------------------------------------------------ shared bits


def _from_unix(values: pd.Series) -> pd.Series:
    """Epoch seconds (or date-time strings) as UTC timestamps."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        return pd.to_datetime(numeric, unit="s", utc=True)
    return pd.to_datetime(values, utc=True)


def _interactions(
    users: pd.Series,
    items: pd.Series,
    ts: pd.Series,
    value: pd.Series,
    *,
    event: str,
    source: str,
    quantity: pd.Series | int = 1,
    order_id: pd.Series | None = None,
    refs: pd.Series | np.ndarray | None = None,
) -> pd.DataFrame:
    n = len(users)
    frame = pd.DataFrame(
        {
            "user_id": np.asarray(users, dtype=np.int64),
            "item_id": np.asarray(items, dtype=np.int64),
            "event": event,
            "ts": pd.Series(ts).reset_index(drop=True),
            "value": np.asarray(value, dtype=np.float64),
            "quantity": np.asarray(quantity, dtype=np.int64)
            if not isinstance(quantity, int)
            else quantity,
            "source": source,
            "order_id": None if order_id is None else np.asarray(order_id, dtype=object),
            # The row of the source file: a stable primary key, as clean.py expects.
            "ref": [f"{source}:{r}" for r in (np.arange(n) if refs is None else refs)],
        }
    )
    return schema.conform(frame, schema.INTERACTIONS)


def _users_from(interactions: pd.DataFrame) -> pd.DataFrame:
    """One user per id, ``created_at`` = first interaction (the data sets have no sign-up)."""
    first = interactions.groupby("user_id", sort=True)["ts"].min().reset_index()
    return schema.conform(first.rename(columns={"ts": "created_at"}), schema.USERS)


# -------------------------------------------------------------------------------- MovieLens


def load_movielens(directory: Path) -> Dataset:
    """MovieLens from its directory, in whichever format it holds.

    - 100K: ``u.data`` (tab-separated user, item, rating, timestamp; no header) and ``u.item``
      (pipe-separated, latin-1: id, title, release date, video date, URL, 19 genre flags);
    - 1M/10M: ``ratings.dat`` (``::``-separated) and ``movies.dat`` (id::title::genres);
    - 20M/25M/latest: ``ratings.csv`` (userId,movieId,rating,timestamp) and ``movies.csv``.

    Every rating is one interaction with event ``"rating"`` and ``value`` = the rating, the
    benchmark's view (every rating is relevant); ``weights`` is ``{"rating": 1.0}``. Items get
    ``title``, ``tags`` (lower-case genres, comma-joined), ``category`` (the first genre) and,
    for 100K, ``created_at`` from the release date. The movies file is optional.
    """
    directory = Path(directory)
    if (directory / "u.data").exists():
        ratings = pd.read_csv(
            directory / "u.data",
            sep="\t",
            header=None,
            names=["user", "item", "rating", "timestamp"],
        )
        items = _ml100k_items(directory)
    elif (directory / "ratings.dat").exists():
        ratings = pd.read_csv(
            directory / "ratings.dat",
            sep="::",
            engine="python",
            header=None,
            names=["user", "item", "rating", "timestamp"],
        )
        items = _movies_file(directory / "movies.dat", sep="::")
    elif (directory / "ratings.csv").exists():
        ratings = pd.read_csv(directory / "ratings.csv").rename(
            columns={"userId": "user", "movieId": "item"}
        )
        items = _movies_file(directory / "movies.csv", sep=",")
    else:
        raise FileNotFoundError(f"no u.data, ratings.dat or ratings.csv in {directory}")

    interactions = _interactions(
        ratings["user"],
        ratings["item"],
        _from_unix(ratings["timestamp"]),
        ratings["rating"],
        event="rating",
        source="movielens",
    )
    known = set(items["item_id"]) if items is not None else set()
    missing = sorted(set(interactions["item_id"].astype("int64")) - known)
    extra = pd.DataFrame({"item_id": missing})
    items = pd.concat([items, extra], ignore_index=True) if items is not None else extra
    items["is_active"] = True
    items["price"] = np.nan  # MovieLens has no prices
    return Dataset(
        name=f"movielens:{directory.name}",
        users=_users_from(interactions),
        items=schema.conform(items.sort_values("item_id"), schema.ITEMS),
        interactions=interactions,
        weights={"rating": 1.0},
    )


def _genre_columns(genres: list[list[str]]) -> dict[str, list[str | None]]:
    return {
        "tags": [",".join(g.lower() for g in gs) or None for gs in genres],
        "category": [gs[0] if gs else None for gs in genres],
    }


def _ml100k_items(directory: Path) -> pd.DataFrame | None:
    path = directory / "u.item"
    if not path.exists():
        return None
    names = list(ML100K_GENRES)
    genre_file = directory / "u.genre"
    if genre_file.exists():
        listed = pd.read_csv(
            genre_file, sep="|", header=None, names=["genre", "id"], encoding="latin-1"
        )
        names = listed.dropna().sort_values("id")["genre"].tolist()
    raw = pd.read_csv(
        path,
        sep="|",
        header=None,
        encoding="latin-1",
        names=["item_id", "title", "release", "video_release", "url", *names],
    )
    flags = raw[names].fillna(0).astype(int).to_numpy()
    genres = [[names[j] for j in np.flatnonzero(row)] for row in flags]
    return pd.DataFrame(
        {
            "item_id": raw["item_id"].astype("int64"),
            "title": raw["title"],
            "created_at": pd.to_datetime(
                raw["release"], format="%d-%b-%Y", errors="coerce", utc=True
            ),
            **_genre_columns(genres),
        }
    )


def _movies_file(path: Path, *, sep: str) -> pd.DataFrame | None:
    if not path.exists():
        return None
    if sep == "::":
        raw = pd.read_csv(
            path,
            sep="::",
            engine="python",
            header=None,
            names=["movieId", "title", "genres"],
            encoding="latin-1",
        )
    else:
        raw = pd.read_csv(path)
    genres = [
        [] if g == "(no genres listed)" or pd.isna(g) else str(g).split("|") for g in raw["genres"]
    ]
    return pd.DataFrame(
        {"item_id": raw["movieId"].astype("int64"), "title": raw["title"], **_genre_columns(genres)}
    )


# ------------------------------------------------------------------------ UCI Online Retail


def load_online_retail(path: Path = UCI_ONLINE_RETAIL) -> Dataset:
    """The UCI Online Retail invoice lines as purchases (see the file's README).

    Dropped, in this order, each counted in ``dropped``: cancellations (``InvoiceNo`` starting
    with ``C``), ``Quantity <= 0`` (returns), a missing ``CustomerID``, ``UnitPrice <= 0``
    (adjustments and free lines). What remains is the "usual clean purchase view" whose
    figures the README gives (397,884 lines). Stock codes become dense ids 1..n in code order;
    an item's title is ``"<code> <description>"`` (its most frequent description), its price
    the median unit price. Invoice dates are UK local time and are converted to UTC.
    """
    raw = pd.read_parquet(path)
    dropped: dict[str, int] = {}
    rules: tuple[tuple[str, Callable[[pd.DataFrame], pd.Series]], ...] = (
        ("cancelled", lambda df: df["InvoiceNo"].astype(str).str.startswith("C")),
        ("quantity_not_positive", lambda df: df["Quantity"] <= 0),
        ("customer_missing", lambda df: df["CustomerID"].isna()),
        ("price_not_positive", lambda df: df["UnitPrice"] <= 0),
    )
    df = raw
    for name, rule in rules:
        mask = rule(df)
        dropped[name] = int(mask.sum())
        df = df[~mask]

    description = df["Description"].where(df["Description"] != "nan").str.strip()
    codes = df["StockCode"].astype(str).str.strip()
    catalogue = np.sort(codes.unique())
    item_of = pd.Series(np.arange(1, len(catalogue) + 1, dtype=np.int64), index=catalogue)
    # The README's dates are naive UK local time; shop hours (06:00-20:59) never fall in a
    # daylight-saving gap or overlap, so localising cannot be ambiguous.
    ts = df["InvoiceDate"].dt.tz_localize("Europe/London").dt.tz_convert("UTC")

    interactions = _interactions(
        df["CustomerID"].astype("int64"),
        codes.map(item_of),
        ts,
        df["Quantity"] * df["UnitPrice"],
        event="purchase",
        source="uci_online_retail",
        quantity=df["Quantity"],
        order_id=df["InvoiceNo"].astype(str),
        refs=df.index.to_numpy(),
    )

    # All four series share the filtered frame's index, so they align row by row.
    lines = pd.DataFrame(
        {"code": codes, "description": description, "ts": ts, "price": df["UnitPrice"]}
    )
    by_code = lines.groupby("code", sort=True)
    # The most frequent description per code (ties: the alphabetically first, for stability).
    common = (
        lines.dropna(subset=["description"])
        .groupby(["code", "description"])
        .size()
        .reset_index(name="n")
        .sort_values(["code", "n", "description"], ascending=[True, False, True])
        .drop_duplicates("code")
        .set_index("code")["description"]
    )
    items = pd.DataFrame(
        {
            "item_id": item_of[catalogue].to_numpy(),
            "price": by_code["price"].median().to_numpy(),
            "created_at": by_code["ts"].min().to_numpy(),
            "updated_at": by_code["ts"].max().to_numpy(),
            "is_active": True,
        }
    )
    items["description"] = common.reindex(catalogue).to_numpy()
    items["title"] = [
        f"{code} {text}" if isinstance(text, str) else code
        for code, text in zip(catalogue, items["description"], strict=True)
    ]
    items = schema.conform(items, schema.ITEMS)
    items["stock_code"] = pd.array(catalogue, dtype="string")

    users = _users_from(interactions)
    country = (
        pd.DataFrame(
            {"user_id": df["CustomerID"].astype("int64").to_numpy(), "c": df["Country"].to_numpy()}
        )
        .groupby("user_id")["c"]
        .first()
    )
    users["country"] = pd.array(
        country.reindex(users["user_id"].to_numpy()).to_numpy(), dtype="string"
    )
    return Dataset(
        name="uci_online_retail",
        users=users,
        items=items,
        interactions=interactions,
        dropped=dropped,
    )


# ---------------------------------------------------------------------- published split files


SPLIT_COLUMNS = ("userID", "itemID", "rating", "timestamp")


def load_split_files(train_path: Path, test_path: Path, *, source: str = "split") -> Split:
    """A ready-made train/test pair (tab-separated, header ``userID itemID rating timestamp``)
    as canonical interaction frames, so a published split is reused exactly, row for row.

    ``timestamp`` may be epoch seconds or a date-time string; event is ``"rating"`` and
    ``value`` the rating, as in ``load_movielens``.
    """
    frames = []
    for path in (train_path, test_path):
        raw = pd.read_csv(path, sep="\t")
        missing = [c for c in SPLIT_COLUMNS if c not in raw.columns]
        if missing:
            raise ValueError(f"{path}: missing columns {missing} (have {list(raw.columns)})")
        frames.append(
            _interactions(
                raw["userID"],
                raw["itemID"],
                _from_unix(raw["timestamp"]),
                raw["rating"],
                event="rating",
                source=f"{source}:{Path(path).stem}",
            )
        )
    return Split(frames[0], frames[1])
