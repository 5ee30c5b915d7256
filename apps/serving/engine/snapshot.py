"""The immutable serving snapshot of one bundle: built once by `load_snapshot`, swapped by
reference when the registry's primary changes (CONVENTIONS rule 8).

It is a cache of the bundle, never the source of truth: everything here can be rebuilt from the
bundle directory. Pure core: no Django.

Item catalogue: read from the bundle's feature tables (`features/item_features.parquet` for the
price, `features/features.json` for the category names). Bundles carry no titles yet; when a
bundle has an `items.parquet` (item_id, title, price, category), it is preferred, so the
pipeline can add titles without a serving change. Unknown values are "" / None.

Ranker: a bundle with `features/` and `ranker/` gets a `rank.Ranker`, loaded and smoke-tested
here (a failing one refuses the bundle); older or test bundles without them get None, and
for-you then serves the candidate lists without re-ranking. Channel weights for fusing Redis
candidate lists come from `training.json` (`config.weight_<channel>`), 1.0 when absent.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import numpy.typing as npt
import pandas as pd

from apps.serving.engine.breaker import CircuitBreaker
from apps.serving.engine.local_store import LocalStore
from apps.serving.engine.rank import Ranker, has_ranker

STORE_FILE = "store.sqlite3"
ITEMS_FILE = "items.parquet"
TRAINING_FILE = "training.json"
# The popular list is held in memory: it is the last step of the chain and must answer even
# when the local store file cannot be read. 500 covers limit=100 after a category filter on a
# typical catalogue of ten categories.
POPULAR_SIZE = 500
# Catalogues up to this many items are also held as a dict of ItemInfo (see Catalogue).
DICT_LIMIT = 200_000


class SnapshotError(Exception):
    """The bundle cannot be served (missing or unreadable store); the caller keeps the old one."""


@dataclass(frozen=True)
class ItemInfo:
    """What a response shows about an item."""

    title: str
    price: float | None
    category: str


@dataclass(frozen=True, eq=False)
class Catalogue:
    """Item attributes as parallel arrays sorted by id (a binary search per lookup)."""

    ids: npt.NDArray[np.int64]
    titles: tuple[str, ...]
    prices: npt.NDArray[np.float64]
    categories: tuple[str, ...]

    @classmethod
    def empty(cls) -> Catalogue:
        """A catalogue that knows no item."""
        return cls(np.empty(0, dtype=np.int64), (), np.empty(0, dtype=np.float64), ())

    def __post_init__(self) -> None:
        # A dict lookup is ~10x cheaper than searchsorted + building an ItemInfo per item per
        # request; above DICT_LIMIT items the memory (~200 B an item) is not worth it.
        infos: dict[int, ItemInfo] | None = None
        if self.ids.size <= DICT_LIMIT:
            infos = {int(i): self._at(pos) for pos, i in enumerate(self.ids.tolist())}
        object.__setattr__(self, "_infos", infos)

    def __len__(self) -> int:
        return int(self.ids.size)

    def get(self, item_id: int) -> ItemInfo | None:
        """The item's attributes, or None when the bundle does not know it."""
        infos: dict[int, ItemInfo] | None = self._infos  # type: ignore[attr-defined]
        if infos is not None:
            return infos.get(item_id)
        pos = int(np.searchsorted(self.ids, item_id))
        if pos >= self.ids.size or int(self.ids[pos]) != item_id:
            return None
        return self._at(pos)

    def _at(self, pos: int) -> ItemInfo:
        price = float(self.prices[pos])
        return ItemInfo(
            title=self.titles[pos],
            price=None if math.isnan(price) else price,
            category=self.categories[pos],
        )


@dataclass(frozen=True, eq=False)
class ServingSnapshot:
    """One bundle, ready to serve: its local store, popular list, channels and catalogue."""

    model_version: str
    bundle_dir: Path
    local_store: LocalStore
    popular: tuple[tuple[int, float], ...]
    catalogue: Catalogue
    # Channels that appear in the ranked user lists: the Redis per-user hash is read with
    # these field names.
    channels: tuple[str, ...] = field(default=())
    # The bundle's re-ranker (None: no features/ or ranker/ in the bundle) and the channel
    # weights for fusing per-channel candidate lists (absent channel: 1.0).
    ranker: Ranker | None = None
    channel_weights: Mapping[str, float] = field(default_factory=dict)
    # Why the bundle's ranker is not serving although the bundle has one (None: it is, or the
    # bundle has none). Answers then keep recall order and are labelled `ranker_failed`.
    ranker_error: str | None = None
    # True when Redis holds the per-channel recall lists (`user_candidates`): without a ranker
    # they are served in fused order. False (older bundles): Redis holds the ranked lists split
    # by channel, and merging them by score restores the ranked order.
    recall_lists: bool = False

    def close(self) -> None:
        """Release the local store's connections (after a swap)."""
        self.local_store.close()


def _read_catalogue(bundle_dir: Path) -> Catalogue:
    items_file = bundle_dir / ITEMS_FILE
    if items_file.exists():
        frame = pd.read_parquet(items_file)
        ids = frame["item_id"].astype("int64").to_numpy()
        titles = frame["title"].fillna("").astype(str).tolist() if "title" in frame else None
        prices = pd.to_numeric(frame["price"], errors="coerce") if "price" in frame else None
        cats = frame["category"].fillna("").astype(str).tolist() if "category" in frame else None
    else:
        features = bundle_dir / "features" / "item_features.parquet"
        if not features.exists():
            return Catalogue.empty()
        frame = pd.read_parquet(features, columns=None)
        ids = frame["item_id"].astype("int64").to_numpy()
        titles = None
        prices = frame.get("item_price")
        cats = None
        meta_file = bundle_dir / "features" / "features.json"
        if "item_category_code" in frame and meta_file.exists():
            names = [str(c) for c in json.loads(meta_file.read_text()).get("categories", [])]
            codes = frame["item_category_code"].fillna(-1).astype("int64").tolist()
            cats = [names[c] if 0 <= c < len(names) else "" for c in codes]
    n = ids.size
    price_arr = (
        np.full(n, np.nan) if prices is None else np.asarray(prices, dtype=np.float64).copy()
    )
    order = np.argsort(ids, kind="stable")
    title_list = titles if titles is not None else [""] * n
    cat_list = cats if cats is not None else [""] * n
    return Catalogue(
        ids=ids[order].astype(np.int64),
        titles=tuple(title_list[i] for i in order),
        prices=price_arr[order],
        categories=tuple(cat_list[i] for i in order),
    )


def _read_channels(store_path: Path) -> tuple[tuple[str, ...], bool]:
    """The channel names of the lists `publish` puts in Redis, and whether those are the
    per-channel recall lists (`user_candidates`; older bundles: their ranked user lists split
    by channel). One scan, off the request path."""
    uri = f"file:{quote(str(store_path.resolve()))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        recall = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'user_candidates'"
        ).fetchone()
        if recall:
            rows = conn.execute("SELECT DISTINCT channel FROM user_candidates").fetchall()
        else:
            rows = conn.execute(
                "SELECT DISTINCT json_extract(e.value, '$[2]') "
                "FROM user_recs, json_each(user_recs.items) AS e"
            ).fetchall()
    finally:
        conn.close()
    return tuple(sorted(str(c) for (c,) in rows if c is not None)), bool(recall)


def _read_channel_weights(bundle_dir: Path) -> dict[str, float]:
    """`config.weight_<channel>` of `training.json`; empty (all 1.0) when there is none."""
    path = bundle_dir / TRAINING_FILE
    if not path.is_file():
        return {}
    config: dict[str, Any] = json.loads(path.read_text()).get("config", {})
    return {
        key.removeprefix("weight_"): float(value)
        for key, value in config.items()
        if key.startswith("weight_")
    }


def load_snapshot(
    bundle_dir: str | Path,
    version: str,
    *,
    popular_size: int = POPULAR_SIZE,
    load_ranker: bool = True,
    store_breaker: CircuitBreaker | None = None,
    require_ranker: bool = True,
) -> ServingSnapshot:
    """Build the snapshot of the bundle at `bundle_dir`; `SnapshotError` when it cannot serve.

    Reading the popular list and the channels doubles as the smoke test of the store: a
    bundle whose store cannot be read is refused here, before any request sees it. So does
    the ranker's smoke check (a few rows scored, all finite) when the bundle has a ranker;
    `load_ranker=False` skips it (the snapshot then serves without re-ranking).
    `store_breaker` guards the local store's reads: a locked or unreadable file then costs
    its busy timeout only until the breaker opens, not on every request.
    `require_ranker=False` serves a bundle whose ranker cannot load (a feature catalogue that
    changed under an older bundle, a corrupt model file) without it instead of refusing it:
    the local store's lists were ranked at training time, and `ranker_error` says why Redis
    candidates are not re-ranked. Serving workers load that way, so a deploy never leaves a
    registry primary unservable; the promotion gates still refuse such a bundle.
    """
    bundle = Path(bundle_dir)
    store_path = bundle / STORE_FILE
    if not store_path.is_file():
        raise SnapshotError(f"{store_path} does not exist")
    store = LocalStore(store_path, breaker=store_breaker)
    try:
        popular = tuple(store.popular(popular_size))
        channels, recall_lists = _read_channels(store_path)
        catalogue = _read_catalogue(bundle)
        weights = _read_channel_weights(bundle)
    except Exception as exc:
        store.close()
        raise SnapshotError(f"cannot load bundle {version} from {bundle}: {exc}") from exc
    ranker: Ranker | None = None
    ranker_error: str | None = None
    if load_ranker and has_ranker(bundle):
        try:
            ranker = Ranker.load(bundle)
        except Exception as exc:  # RankerLoadError included
            if require_ranker:
                store.close()
                raise SnapshotError(f"cannot load bundle {version} from {bundle}: {exc}") from exc
            ranker_error = f"{type(exc).__name__}: {exc}"[:500]
    return ServingSnapshot(
        model_version=version,
        bundle_dir=bundle,
        local_store=store,
        popular=popular,
        catalogue=catalogue,
        channels=channels,
        ranker=ranker,
        channel_weights=weights,
        ranker_error=ranker_error,
        recall_lists=recall_lists,
    )
