"""Evaluation protocols (apps/pipeline/train/protocols.py) and the quality benchmark's loaders
(benchmarks/quality.py), on small synthetic data sets with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apps.pipeline import schema
from apps.pipeline.train import protocols
from apps.pipeline.train.trainer import TrainConfig
from benchmarks import quality

T0 = pd.Timestamp("2024-01-01", tz="UTC")


def _interactions(rows: list[tuple[int, int, str, int]]) -> pd.DataFrame:
    """(user, item, event, hour offset) rows as a canonical interactions frame."""
    frame = pd.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "event": [r[2] for r in rows],
            "ts": [T0 + pd.Timedelta(hours=r[3]) for r in rows],
            "value": 0.0,
            "quantity": 1,
            "source": "business",
            "ref": [f"business.t:{n}" for n in range(len(rows))],
        }
    )
    return schema.conform(frame, schema.INTERACTIONS)


def _pairs(frame: pd.DataFrame) -> set[tuple[int, int]]:
    known = frame.dropna(subset=["user_id", "item_id"])
    return set(zip(known["user_id"].astype(int), known["item_id"].astype(int), strict=True))


@pytest.fixture
def eight_pairs_per_user() -> pd.DataFrame:
    # given 20 users with 8 distinct items each; every pair is viewed, and a few are also
    # bought (two rows of one pair); plus a search row without an item
    rows: list[tuple[int, int, str, int]] = []
    for user in range(1, 21):
        for j in range(8):
            item = (user * 3 + j) % 30 + 1
            rows.append((user, item, "detail_view", user * 10 + j))
            if j % 3 == 0:
                rows.append((user, item, "purchase", user * 10 + j + 1))
    frame = _interactions(rows)
    search = frame.iloc[:1].assign(item_id=pd.NA, event="search", ref="matomo.x:1")
    return pd.concat([frame, schema.conform(search, schema.INTERACTIONS)], ignore_index=True)


def test_the_stratified_split_holds_out_a_quarter_of_each_users_pairs(
    eight_pairs_per_user: pd.DataFrame,
) -> None:
    # when split 75/25 per user
    split = protocols.split_stratified(eight_pairs_per_user, 0.25, seed=42)
    train, test = _pairs(split.train), _pairs(split.holdout)
    # then every user keeps 6 pairs and has 2 held out, and no pair is on both sides
    for user in range(1, 21):
        assert len({p for p in train if p[0] == user}) == 6
        assert len({p for p in test if p[0] == user}) == 2
    assert not train & test
    # and the rows of one pair stay together: a held-out purchase takes its view with it
    held_rows = split.holdout.groupby(["user_id", "item_id"]).size()
    bought = eight_pairs_per_user[eight_pairs_per_user["event"] == "purchase"]
    for pair in _pairs(bought) & test:
        assert held_rows[pair] == 2
    # and the item-less search row stays in train; the cutoff sees every event
    assert (split.train["event"] == "search").sum() == 1
    assert split.cutoff > eight_pairs_per_user["ts"].max()


def test_the_stratified_split_is_deterministic_for_a_seed(
    eight_pairs_per_user: pd.DataFrame,
) -> None:
    first = protocols.split_stratified(eight_pairs_per_user, seed=42)
    again = protocols.split_stratified(eight_pairs_per_user, seed=42)
    other = protocols.split_stratified(eight_pairs_per_user, seed=7)
    assert _pairs(first.holdout) == _pairs(again.holdout)
    assert first.train.equals(again.train)
    assert _pairs(first.holdout) != _pairs(other.holdout)


def test_the_time_split_drops_repeat_pairs_and_cold_users_from_the_truth() -> None:
    # given user 1 bought item 1 early and again late, and item 2 late; user 9 only acts late
    inter = _interactions(
        [
            (1, 1, "purchase", 0),
            (1, 3, "detail_view", 1),
            (1, 1, "purchase", 100),
            (1, 2, "purchase", 101),
            (9, 2, "purchase", 102),
        ]
    )
    # when the last 2 days are held out
    split = protocols.split_by_time(inter, days=2)
    # then only the new pair of the known user is relevant, and both drops are counted
    assert _pairs(split.holdout) == {(1, 2)}
    assert _pairs(split.train) == {(1, 1), (1, 3)}
    assert split.dropped == {"holdout_rows_cold_user": 1, "holdout_rows_repeat_pair": 1}


def test_popularity_ranks_items_by_distinct_users_then_by_id() -> None:
    rows = [(1, 5, "purchase", 0), (1, 5, "purchase", 1), (2, 5, "purchase", 2)]
    rows += [(3, 4, "view", 3), (1, 7, "purchase", 4), (2, 7, "purchase", 5), (3, 9, "task", 6)]
    inter = _interactions(rows)
    # items 5 and 7 have two users each (the repeat does not count), 4 and 9 one each
    assert protocols.popularity_ranking(inter).tolist() == [5, 7, 4, 9]


# --------------------------------------------------------------------- protocol end to end


def _two_taste_world(seed: int = 3) -> dict[str, pd.DataFrame]:
    """60 users in two taste groups over 40 items: group A buys from items 1-20, B from 21-40,
    each user 12 distinct items with a few skewed favourites, so the held-out items are
    predictable from the group (the known answer: personalised beats popularity)."""
    rng = np.random.default_rng(seed)
    rows: list[tuple[int, int, str, int]] = []
    for user in range(1, 61):
        base = 0 if user <= 30 else 20
        weights = np.linspace(2.0, 1.0, 20)
        items = rng.choice(
            np.arange(1, 21) + base, size=12, replace=False, p=weights / weights.sum()
        )
        for n, item in enumerate(items):
            rows.append((user, int(item), "detail_view", user * 20 + n))
            if n % 2 == 0:
                rows.append((user, int(item), "purchase", user * 20 + n))
    inter = _interactions(rows)
    items = schema.conform(
        pd.DataFrame(
            {
                "item_id": np.arange(1, 41),
                "title": [f"item {i} {'alpha' if i <= 20 else 'beta'}" for i in range(1, 41)],
                "category": ["a" if i <= 20 else "b" for i in range(1, 41)],
                "price": 10.0,
                "created_at": T0,
                "updated_at": T0,
                "is_active": True,
            }
        ),
        schema.ITEMS,
    )
    users = schema.conform(
        pd.DataFrame({"user_id": np.arange(1, 61), "created_at": T0}), schema.USERS
    )
    return {"users": users, "items": items, "interactions": inter}


SMALL = TrainConfig(
    channels=("itemcf", "ease", "popular", "category"),
    per_channel=20,
    fused=30,
    n_estimators=30,
    max_users=60,
    label_days=0.5,
)


@pytest.fixture(scope="module")
def stratified() -> tuple[dict[str, pd.DataFrame], protocols.ProtocolResult]:
    frames = _two_taste_world()
    return frames, protocols.run_stratified(frames, SMALL, seed=42, k=5, log=lambda _: None)


def test_the_protocol_never_recommends_a_training_item(stratified) -> None:
    frames, result = stratified
    # given the same split the protocol made
    seen = protocols.split_stratified(frames["interactions"], 0.25, 42).train
    seen_by_user: dict[int, set[int]] = {}
    for user, item in _pairs(seen):
        seen_by_user.setdefault(user, set()).add(item)
    # then no system's list holds an item the user had in training, and lists are at most k
    for system, recs in result.recommendations.items():
        for user, items in recs.items():
            assert len(items) <= 5, system
            assert not set(items) & seen_by_user.get(user, set()), (system, user)


def test_every_system_is_scored_on_the_same_test_users(stratified) -> None:
    _, result = stratified
    systems = set(result.table)
    assert {"popularity", "itemcf", "ease", "popular", "category", "fused", "ranked"} == systems
    n_users = {row["n_users"] for row in result.table.values()}
    assert n_users == {float(len(result.truth))}
    # and the ranked system produced a list for every test user, like the baselines
    for system in ("popularity", "fused", "ranked"):
        assert set(result.recommendations[system]) == set(result.truth), system
    assert result.counts["test_users"] == len(result.truth)
    assert result.counts["ranker_users_train"] > 0
    assert result.counts["ranker_users_valid"] > 0


def test_personalised_systems_find_the_taste_group_that_popularity_misses(stratified) -> None:
    _, result = stratified
    ndcg = {name: row["ndcg@5"] for name, row in result.table.items()}
    # the known answer: held-out items come from the user's group, which popularity ignores
    assert ndcg["ranked"] > ndcg["popularity"]
    assert ndcg["fused"] > ndcg["popularity"]
    # every held-out pair is in the truth: 60 users x 12 pairs x 0.25
    assert sum(len(v) for v in result.truth.values()) == 60 * 3
    # and the tuning record says what was chosen on the inner split
    assert result.tuning["fusion_chosen"] in result.tuning["fusion_candidates"]
    assert len(result.tuning["ranker_grid"]) == len(protocols.RANKER_GRID)


# ------------------------------------------------------------ loaders through the contracts


def _uci_rows() -> pd.DataFrame:
    """A tiny UCI-shaped file: two sales (one in summer time), a cancellation, a return, a guest
    line, a free line and a duplicate of the same product in the same invoice."""
    rows = [
        ("536365", "85123A", "WHITE HEART ", 6, "2010-12-01 08:26:00", 2.55, 17850.0, "UK"),
        ("536365", "71053", "WHITE LANTERN", 6, "2010-12-01 08:26:00", 3.39, 17850.0, "UK"),
        ("C536379", "85123A", "WHITE HEART", -1, "2010-12-01 09:41:00", 2.55, 17850.0, "UK"),
        ("536380", "71053", "WHITE LANTERN", -2, "2010-12-01 09:45:00", 3.39, 13047.0, "UK"),
        ("536381", "71053", "nan", 1, "2010-12-01 09:50:00", 3.39, np.nan, "UK"),
        ("536382", "POST", "POSTAGE", 1, "2011-06-01 10:00:00", 0.0, 12583.0, "France"),
        ("536383", "71053", "WHITE LANTERN", 2, "2011-06-01 10:00:00", 3.39, 12583.0, "France"),
    ]
    frame = pd.DataFrame(
        rows,
        columns=[
            "InvoiceNo",
            "StockCode",
            "Description",
            "Quantity",
            "InvoiceDate",
            "UnitPrice",
            "CustomerID",
            "Country",
        ],
    )
    frame["InvoiceDate"] = pd.to_datetime(frame["InvoiceDate"])
    return frame


def test_uci_data_round_trips_through_its_contract_extract_canonical_and_clean(
    tmp_path: Path,
) -> None:
    # given a UCI-shaped parquet file
    path = tmp_path / "online_retail.parquet"
    _uci_rows().to_parquet(path)
    # when it is loaded through the shop database and the contract
    loaded = quality.load_uci(path, tmp_path)
    inter, items, users = (loaded.frames[k] for k in ("interactions", "items", "users"))
    # then every row reached the lake, and only the sales became purchases, in file order
    # (the guest's line too, without a user: the protocols leave it out)
    assert loaded.sizes["extracted_rows"]["business.invoice_line"] == 7
    assert inter["event"].tolist() == ["purchase"] * 4
    assert inter["user_id"].tolist() == [17850, 17850, pd.NA, 12583]
    assert inter["order_id"].tolist() == ["536365", "536365", "536381", "536383"]
    assert inter["value"].tolist() == pytest.approx([6 * 2.55, 6 * 3.39, 3.39, 2 * 3.39])
    # and winter times are UTC already while summer times move back one hour (BST)
    assert inter["ts"].iloc[0] == pd.Timestamp("2010-12-01 08:26", tz="UTC")
    assert inter["ts"].iloc[3] == pd.Timestamp("2011-06-01 09:00", tz="UTC")
    # and ids are preserved: customers by CustomerID, products by stock code order
    assert sorted(users["user_id"]) == [12583, 13047, 17850]
    titles = items.set_index("item_id")["title"]
    assert titles[inter["item_id"].iloc[0]] == "85123A WHITE HEART"
    assert titles[inter["item_id"].iloc[1]] == "71053 WHITE LANTERN"
    assert len(items) == 3
    assert items["is_active"].all()
    assert loaded.sizes["dataset"]["pairs"] == 3


def test_movielens_ratings_become_purchases_and_detail_views_through_the_contract(
    tmp_path: Path,
) -> None:
    # given a MovieLens-100K directory with ratings from 1997-98
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "u.data").write_text(
        "196\t242\t3\t881250949\n186\t302\t4\t891717742\n196\t302\t5\t881250950\n"
    )
    flags = "|".join(["0"] * 19)
    (tmp_path / "ml" / "u.item").write_bytes(
        f"242|Kolya (1996)|24-Jan-1997||http://x|{flags}\n".encode("latin-1")
    )
    loaded = quality.load_movielens(tmp_path / "ml", tmp_path)
    inter = loaded.frames["interactions"]
    # then every rating survives, in file order, as an event by its value
    assert inter[["user_id", "item_id"]].values.tolist() == [[196, 242], [186, 302], [196, 302]]
    assert inter["event"].tolist() == ["detail_view", "purchase", "purchase"]
    assert inter["ts"].iloc[0] == pd.Timestamp(881250949, unit="s", tz="UTC")
    # and movies keep their titles (a movie missing from u.item gets a placeholder) at price 0
    items = loaded.frames["items"].set_index("item_id")
    assert items.loc[242, "title"] == "Kolya (1996)"
    assert items.loc[302, "title"] == "movie 302"
    assert (items["price"] == 0).all()


def test_a_given_split_keeps_its_test_rows_through_the_contract(tmp_path: Path) -> None:
    header = "userID\titemID\trating\ttimestamp\n"
    (tmp_path / "train.tsv").write_text(header + "1\t10\t5\t881250949\n2\t10\t2\t881250950\n")
    (tmp_path / "test.tsv").write_text(header + "1\t11\t4\t881250951\n")
    loaded = quality.load_split(tmp_path / "train.tsv", tmp_path / "test.tsv", tmp_path)
    inter = loaded.frames["interactions"]
    ids = inter["ref"].str.extract(r":(\d+)(?:#.*)?$", expand=False).astype(int)
    test = inter[ids.isin(loaded.test_ids or set())]
    assert test[["user_id", "item_id"]].values.tolist() == [[1, 11]]
    assert len(inter) == 3
