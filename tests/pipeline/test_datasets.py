"""Data set loaders on tiny files in each format, and on the real UCI Online Retail file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from apps.pipeline import schema
from apps.pipeline.datasets import (
    UCI_ONLINE_RETAIL,
    load_movielens,
    load_online_retail,
    load_split_files,
)
from apps.pipeline.evaluate import stratified_split
from apps.pipeline.train.base import TrainingSet


def _flags(*on: int) -> str:
    return "|".join("1" if i in on else "0" for i in range(19))


@pytest.fixture
def ml100k(tmp_path: Path) -> Path:
    (tmp_path / "u.data").write_text(
        "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t5\t881250950\n22\t999\t1\t878887116\n"
    )
    # latin-1 like the real file; genres 1 = Action, 5 = Comedy
    (tmp_path / "u.item").write_bytes(
        (
            f"242|Kolya (1996)|24-Jan-1997||http://x|{_flags(5)}\n"
            f"302|L.A. Confidential (1997)|01-Jan-1997||http://y|{_flags(1, 16)}\n"
            f"303|Café au lait (1993)|01-Jan-1993||http://z|{_flags()}\n"
        ).encode("latin-1")
    )
    return tmp_path


def test_movielens_100k_reads_ratings_in_file_order_and_genres(ml100k: Path) -> None:
    data = load_movielens(ml100k)
    inter = data.interactions
    assert list(inter.columns) == list(schema.INTERACTIONS)
    assert inter[["user_id", "item_id"]].values.tolist() == [
        [196, 242],
        [186, 302],
        [196, 302],
        [22, 999],
    ]
    assert inter["value"].tolist() == [3.0, 3.0, 5.0, 1.0]
    assert set(inter["event"]) == {"rating"}
    assert inter["ts"].iloc[0] == pd.Timestamp(881250949, unit="s", tz="UTC")
    assert data.weights == {"rating": 1.0}

    items = data.items.set_index("item_id")
    assert items.loc[242, "title"] == "Kolya (1996)"
    assert items.loc[242, "tags"] == "comedy"
    assert items.loc[302, "tags"] == "action,thriller"
    assert items.loc[302, "category"] == "Action"
    assert items.loc[303, "title"] == "Café au lait (1993)"
    assert pd.isna(items.loc[303, "tags"])
    assert items.loc[242, "created_at"] == pd.Timestamp("1997-01-24", tz="UTC")
    # an item rated but missing from u.item is still in the catalogue
    assert 999 in items.index
    assert pd.isna(items.loc[999, "title"])
    assert sorted(data.users["user_id"]) == [22, 186, 196]


def test_loaded_frames_feed_the_training_set(ml100k: Path) -> None:
    data = load_movielens(ml100k)
    training = TrainingSet.from_frames(data.frames(), weights=data.weights)
    assert len(training.interactions) == 4
    assert training.weights == {"rating": 1.0}


def test_movielens_1m_double_colon_format(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text("1::1193::5::978300760\n2::661::3::978302109\n")
    (tmp_path / "movies.dat").write_text(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
    )
    data = load_movielens(tmp_path)
    assert data.interactions["item_id"].tolist() == [1193, 661]
    items = data.items.set_index("item_id")
    assert items.loc[661, "tags"] == "animation,children's,musical"
    assert items.loc[1193, "category"] == "Drama"


def test_movielens_csv_format_with_quoted_titles(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,11,4.5,964982703\n1,5,3.0,964982224\n"
    )
    (tmp_path / "movies.csv").write_text(
        'movieId,title,genres\n11,"American President, The (1995)",Comedy|Drama|Romance\n'
        "5,Father of the Bride Part II (1995),(no genres listed)\n"
    )
    data = load_movielens(tmp_path)
    assert data.interactions["value"].tolist() == [4.5, 3.0]
    items = data.items.set_index("item_id")
    assert items.loc[11, "title"] == "American President, The (1995)"
    assert pd.isna(items.loc[5, "tags"])


def test_movielens_without_ratings_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"u\.data"):
        load_movielens(tmp_path)


def test_a_published_split_is_reused_row_for_row(tmp_path: Path) -> None:
    header = "userID\titemID\trating\ttimestamp\n"
    (tmp_path / "train.tsv").write_text(header + "5\t7\t4.0\t881250949\n1\t2\t3.0\t881250950\n")
    (tmp_path / "test.tsv").write_text(header + "5\t9\t5.0\t881250951\n")
    train, test = load_split_files(tmp_path / "train.tsv", tmp_path / "test.tsv")
    assert train[["user_id", "item_id"]].values.tolist() == [[5, 7], [1, 2]]
    assert test[["user_id", "item_id", "value"]].values.tolist() == [[5, 9, 5.0]]
    assert test["ts"].iloc[0] == pd.Timestamp(881250951, unit="s", tz="UTC")
    assert train["ref"].is_unique

    (tmp_path / "bad.tsv").write_text("user\titem\n1\t2\n")
    with pytest.raises(ValueError, match="missing columns"):
        load_split_files(tmp_path / "bad.tsv", tmp_path / "test.tsv")


def test_split_files_accept_date_time_strings(tmp_path: Path) -> None:
    header = "userID\titemID\trating\ttimestamp\n"
    (tmp_path / "a.tsv").write_text(header + "1\t2\t1\t2024-01-02 03:04:05\n")
    train, _ = load_split_files(tmp_path / "a.tsv", tmp_path / "a.tsv")
    assert train["ts"].iloc[0] == pd.Timestamp("2024-01-02 03:04:05", tz="UTC")


@pytest.mark.slow
def test_uci_online_retail_gives_the_usual_clean_purchase_view() -> None:
    if not UCI_ONLINE_RETAIL.exists():
        pytest.skip(f"{UCI_ONLINE_RETAIL} is not here")
    data = load_online_retail()
    inter = data.interactions
    # the figures the data set's README gives for the clean purchase view
    assert len(inter) == 397_884
    assert inter["user_id"].nunique() == 4_338
    assert inter["item_id"].nunique() == 3_665
    assert inter["order_id"].nunique() == 18_532
    assert len(inter[["user_id", "item_id"]].drop_duplicates()) == 266_792
    assert data.dropped["cancelled"] == 9_288
    assert not inter["order_id"].str.startswith("C").any()
    assert (inter["quantity"] > 0).all()
    assert set(inter["event"]) == {"purchase"}
    assert str(inter["ts"].dtype) == schema.UTC_TS
    # the first line: 2010-12-01 08:26 UK winter time = UTC, 6 x 2.55
    first = inter.iloc[0]
    assert first["ts"] == pd.Timestamp("2010-12-01 08:26", tz="UTC")
    assert first["value"] == pytest.approx(15.3)

    items = data.items
    assert items["item_id"].tolist() == list(range(1, 3_666))
    row = items[items["stock_code"] == "85123A"].iloc[0]
    assert row["title"].startswith("85123A ")
    assert "T-LIGHT HOLDER" in row["title"]
    assert (items["price"] > 0).all()
    assert data.users["country"].notna().all()
    assert set(data.users["user_id"]) == set(inter["user_id"])

    # the benchmark protocol runs on it: 75 % of each customer's lines train
    train, test = stratified_split(inter, seed=42)
    assert len(train) + len(test) == len(inter)
