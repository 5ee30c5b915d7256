"""Offline metrics against hand-computed values, and the split protocols."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from apps.pipeline.evaluate import (
    auc,
    catalogue_coverage,
    channel_hit_share,
    evaluate,
    exclude_seen,
    hit_rate_at_k,
    intra_list_diversity,
    map_at_k,
    mrr_at_k,
    ndcg_at_k,
    ndcg_grouped,
    novelty,
    popularity_from,
    precision_at_k,
    recall_at_k,
    stratified_split,
    time_split,
    truth_from,
)

# User 1 gets four items (fewer than k=5) with hits at ranks 2 and 4 out of 3 relevant items;
# user 2 gets three items and no hit; user 3 has no relevant item and must not count.
RECS = {1: ["a", "b", "c", "d"], 2: ["x", "y", "z"], 3: ["a"]}
TRUTH = {1: {"b", "d", "e"}, 2: {"q"}, 3: set()}
LOG2_3 = math.log2(3)


def test_precision_divides_by_k_even_for_short_lists() -> None:
    # user 1: 2 hits / k=5; user 2: 0
    assert precision_at_k(RECS, TRUTH, k=5) == pytest.approx((2 / 5 + 0) / 2)


def test_recall_divides_by_the_number_of_relevant_items() -> None:
    assert recall_at_k(RECS, TRUTH, k=5) == pytest.approx((2 / 3 + 0) / 2)


def test_ndcg_uses_log2_discount_and_ideal_over_min_k_and_relevant() -> None:
    # given hits at ranks 2 and 4, and 3 relevant items (ideal: ranks 1, 2, 3)
    dcg = 1 / LOG2_3 + 1 / math.log2(5)
    idcg = 1 + 1 / LOG2_3 + 1 / 2
    assert ndcg_at_k(RECS, TRUTH, k=5) == pytest.approx((dcg / idcg + 0) / 2)
    # when k=3 only the rank-2 hit counts and the ideal still has 3 slots
    assert ndcg_at_k(RECS, TRUTH, k=3) == pytest.approx((1 / LOG2_3) / idcg / 2)
    # when k=1 the ideal is one relevant item at rank 1: a hit there is perfect
    assert ndcg_at_k({1: ["b"]}, {1: {"b", "d"}}, k=1) == pytest.approx(1.0)


def test_map_averages_precision_at_hits_over_min_k_and_relevant() -> None:
    ap_user1 = (1 / 2 + 2 / 4) / min(5, 3)
    assert map_at_k(RECS, TRUTH, k=5) == pytest.approx(ap_user1 / 2)
    # when k=2, the normaliser is min(2, 3) = 2
    assert map_at_k(RECS, TRUTH, k=2) == pytest.approx((1 / 2) / 2 / 2)


def test_hit_rate_and_mrr_look_at_the_first_hit() -> None:
    assert hit_rate_at_k(RECS, TRUTH, k=5) == pytest.approx(0.5)
    assert mrr_at_k(RECS, TRUTH, k=5) == pytest.approx((1 / 2 + 0) / 2)
    # when k=1 user 1's first hit (rank 2) is out of reach
    assert hit_rate_at_k(RECS, TRUTH, k=1) == 0.0
    assert mrr_at_k(RECS, TRUTH, k=1) == 0.0


def test_a_user_without_recommendations_scores_zero_rather_than_disappearing() -> None:
    truth = {1: {"a"}, 2: {"b"}}
    assert precision_at_k({1: ["a"]}, truth, k=1) == pytest.approx(0.5)
    assert ndcg_at_k({1: ["a"]}, truth, k=1) == pytest.approx(0.5)


def test_perfect_lists_score_one_on_every_accuracy_metric() -> None:
    recs = {1: ["a", "b"], 2: ["c"]}
    truth = {1: {"a", "b"}, 2: {"c"}}
    for metric in (recall_at_k, ndcg_at_k, map_at_k, hit_rate_at_k, mrr_at_k):
        assert metric(recs, truth, 2) == pytest.approx(1.0), metric.__name__


def test_k_below_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k(RECS, TRUTH, k=0)


def test_coverage_counts_distinct_items_in_the_top_k() -> None:
    # top-2 lists: {a, b}, {x, y}, {a} -> 4 distinct of 10
    assert catalogue_coverage(RECS, n_items=10, k=2) == pytest.approx(0.4)


def test_popularity_is_the_share_of_users_who_interacted() -> None:
    frame = pd.DataFrame({"user_id": [1, 1, 2, 3, 3], "item_id": [10, 10, 10, 11, 10]})
    assert popularity_from(frame) == pytest.approx({10: 1.0, 11: 1 / 3})


def test_novelty_is_mean_self_information_with_unknown_items_as_rarest() -> None:
    popularity = {"a": 0.5, "b": 0.25}
    # a: 1 bit, b: 2 bits, c unknown -> as rare as b: 2 bits
    assert novelty({1: ["a", "b"], 2: ["c"]}, popularity, k=10) == pytest.approx(5 / 3)


def test_diversity_from_categories_is_one_minus_mean_pairwise_similarity() -> None:
    categories = {"a": "x", "b": "x", "c": "y"}
    # pairs ab=1, ac=0, bc=0 -> 1 - 1/3
    assert intra_list_diversity({1: ["a", "b", "c"]}, item_categories=categories) == pytest.approx(
        2 / 3
    )
    # a list of one known item has no pair and does not count; unknown items are skipped
    assert intra_list_diversity(
        {1: ["a", "b", "c"], 2: ["a", "zz"]}, item_categories=categories
    ) == pytest.approx(2 / 3)


def test_diversity_from_vectors_uses_cosine_similarity() -> None:
    vectors = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 2.0]), "c": np.array([1.0, 1.0])}
    # ab=0, ac=bc=1/sqrt(2)
    expected = 1 - (0 + 2 / math.sqrt(2)) / 3
    assert intra_list_diversity({1: ["a", "b", "c"]}, item_vectors=vectors) == pytest.approx(
        expected
    )


def test_diversity_of_category_sets_uses_jaccard() -> None:
    categories = {"a": frozenset({"x", "y"}), "b": frozenset({"y", "z"})}
    assert intra_list_diversity({1: ["a", "b"]}, item_categories=categories) == pytest.approx(
        1 - 1 / 3
    )


def test_channel_hit_share_attributes_each_hit_to_its_channel() -> None:
    channels = {1: ["pop", "itemcf", "pop", "content"], 2: ["itemcf", "itemcf", "pop"]}
    # hits: user 1 "b" (itemcf) and "d" (content); user 2 none
    assert channel_hit_share(RECS, TRUTH, channels, k=5) == {
        "content": 0.5,
        "itemcf": 0.5,
        "pop": 0.0,
    }


def test_channel_lists_must_align_with_recommendations() -> None:
    with pytest.raises(ValueError, match="channels"):
        channel_hit_share(RECS, TRUTH, {1: ["pop"], 2: ["pop"] * 3}, k=5)


def test_evaluate_collects_every_metric_in_one_flat_dict() -> None:
    metrics = evaluate(
        RECS,
        TRUTH,
        k=5,
        item_popularity={"a": 0.5, "b": 0.5},
        n_items=10,
        item_categories={"a": "x", "b": "y"},
        channels={1: ["p"] * 4, 2: ["q"] * 3},
    )
    assert metrics["ndcg@5"] == pytest.approx(ndcg_at_k(RECS, TRUTH, 5))
    assert metrics["precision@5"] == pytest.approx(0.2)
    assert metrics["coverage@5"] == pytest.approx(0.7)
    assert metrics["n_users"] == 2
    assert metrics["hit_share@5/p"] == 1.0
    assert metrics["hit_share@5/q"] == 0.0
    assert "diversity@5" in metrics
    assert all(isinstance(v, float) for v in metrics.values())


def test_auc_matches_hand_value_and_sklearn_with_ties() -> None:
    # every (positive, negative) pair ordered right: 0.4 and 0.8 beat 0.1 and 0.35
    assert auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(1.0)
    # one positive below one negative: 3 of 4
    assert auc(np.array([0, 1, 0, 1]), np.array([0.5, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 500)
    s = rng.integers(0, 10, 500).astype(float)  # many ties
    assert auc(y, s) == pytest.approx(roc_auc_score(y > 0, s))
    assert math.isnan(auc(np.ones(3), np.arange(3)))


def test_grouped_ndcg_uses_graded_gains_and_skips_groups_without_positives() -> None:
    # group 1: labels [0, 3, 1], scores rank them [1, 3, 0] -> order: label 1, label 3, label 0
    labels = np.array([0, 3, 1, 0, 0])
    scores = np.array([0.1, 0.5, 0.9, 0.3, 0.2])
    dcg = (2**1 - 1) / 1 + (2**3 - 1) / LOG2_3
    idcg = (2**3 - 1) / 1 + (2**1 - 1) / LOG2_3
    # group 2 (two negatives) is skipped, not counted as 1
    assert ndcg_grouped(labels, scores, [3, 2], k=10) == pytest.approx(dcg / idcg)
    with pytest.raises(ValueError, match="groups sum"):
        ndcg_grouped(labels, scores, [3, 3])


# ----------------------------------------------------------------------------------- splits


def _interactions(sizes: dict[int, int]) -> pd.DataFrame:
    rows = [(user, 100 * user + i) for user, n in sizes.items() for i in range(n)]
    return pd.DataFrame(rows, columns=["user_id", "item_id"]).assign(rating=1.0)


def test_stratified_split_keeps_three_quarters_of_each_user_with_python_rounding() -> None:
    # given users with 2, 4, 6, 10 and 13 interactions
    data = _interactions({1: 2, 2: 4, 3: 6, 4: 10, 5: 13})
    train, test = stratified_split(data, test_size=0.25, seed=42)
    per_user = train.groupby("user_id").size()
    # then each user trains on round(0.75 n), and Python rounds halves to even (as the
    # benchmark code does): 1.5 -> 2, 4.5 -> 4, 7.5 -> 8, 9.75 -> 10
    assert per_user.to_dict() == {1: 2, 2: 3, 3: 4, 4: 8, 5: 10}
    assert len(train) + len(test) == len(data)
    assert set(train.index).isdisjoint(test.index)
    assert set(train.index) | set(test.index) == set(data.index)


def test_stratified_split_is_deterministic_for_a_seed_and_changes_with_it() -> None:
    data = _interactions(dict.fromkeys(range(1, 30), 20))
    first = stratified_split(data, seed=7)
    again = stratified_split(data, seed=7)
    other = stratified_split(data, seed=8)
    pd.testing.assert_frame_equal(first.test, again.test)
    assert set(first.test.index) != set(other.test.index)


def test_stratified_split_reproduces_the_recommenders_split_row_for_row() -> None:
    # given users 1 (9 rows, two blocks), 2 (4 rows) and 3 (2 rows) in this file order
    data = pd.DataFrame({"user_id": [1] * 6 + [2] * 4 + [3] * 2 + [1] * 3, "item_id": range(15)})
    # when split like Recommenders 1.2.1 python_stratified_split(ratio=0.75, seed=42)
    train, test = stratified_split(data, test_size=0.25, seed=42)
    # then the rows and their order are the ones that function returned for this input
    assert list(train.index) == [5, 4, 14, 13, 0, 3, 2, 6, 8, 9, 10, 11]
    assert list(test.index) == [12, 1, 7]


def test_stratified_split_filters_small_groups_and_can_stratify_by_item() -> None:
    data = _interactions({1: 2, 2: 8})
    train, test = stratified_split(data, min_rating=3)
    assert set(train.user_id) | set(test.user_id) == {2}
    # by item: every item has one row -> round(0.75) = 1 -> everything trains
    by_item = stratified_split(data, filter_by="item")
    assert len(by_item.train) == len(data)
    assert by_item.test.empty
    with pytest.raises(ValueError, match="filter_by"):
        stratified_split(data, filter_by="session")  # type: ignore[arg-type]


def test_time_split_holds_out_the_last_days_for_users_with_history() -> None:
    ts = pd.Timestamp("2024-01-31", tz="UTC")
    data = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 3, 3],
            "item_id": [10, 11, 12, 13, 14],
            "ts": [ts - pd.Timedelta(days=d) for d in (20, 1, 2, 10, 0)],
        }
    )
    train, test = time_split(data, days=3)
    assert sorted(train.item_id) == [10, 13]
    # user 2 has nothing before the cutoff: a cold-start user is not a test user
    assert sorted(test.item_id) == [11, 14]


def test_truth_and_seen_filtering_use_every_held_out_interaction() -> None:
    train = pd.DataFrame({"user_id": [1, 1], "item_id": [10, 11]})
    test = pd.DataFrame({"user_id": np.array([1, 2], dtype=np.int64), "item_id": [12, 13]})
    truth = truth_from(test)
    assert truth == {1: {12}, 2: {13}}
    assert all(type(u) is int for u in truth)
    recs = exclude_seen({1: [10, 12, 11, 14, 15]}, train, k=2)
    assert recs == {1: [12, 14]}
