"""The request path's one-pass fusion gives exactly what training's per-channel fusion gives.

`fuse_arrays` (serving, one pass over all channels' rows) must agree with `recall.fuse` (the
fusion training used to build the ranker's candidates) on ids, fused scores and shown
channels, and with a plain dictionary walk on every candidate's per-channel score and rank:
a difference would be a train/serve skew in the ranker's `recall_*` features.
"""

from __future__ import annotations

import numpy as np
import pytest

from apps.pipeline import features as ft
from apps.serving.engine.rank import CandidateSet, fuse_arrays, fuse_lists, pair_arrays


def _random_lists(rng: np.random.Generator) -> dict[str, list[tuple[int, float]]]:
    names = [*ft.RECALL_CHANNELS, "not_a_feature_channel"]
    chosen = rng.choice(names, size=rng.integers(1, len(names) + 1), replace=False)
    lists: dict[str, list[tuple[int, float]]] = {}
    for name in chosen:
        n = int(rng.integers(0, 60))
        # Few distinct ids: overlaps across channels and repeats within one are common.
        ids = rng.integers(1, 120, size=n)
        scores = np.round(rng.random(n), 2).astype(np.float32)  # ties included
        lists[str(name)] = list(zip(ids.tolist(), scores.tolist(), strict=True))
    return lists


def _arrays(lists):  # type: ignore[no-untyped-def]
    return {c: pair_arrays(v) for c, v in lists.items()}


@pytest.mark.parametrize("seed", range(40))
def test_one_pass_fusion_equals_the_per_channel_fusion(seed: int):
    rng = np.random.default_rng(seed)
    lists = _random_lists(rng)
    weights = {c: float(rng.choice([0.0, 0.5, 1.0, 2.0])) for c in lists if rng.random() < 0.6}
    k = int(rng.choice([5, 50, 200]))
    expected = CandidateSet.from_candidates(fuse_lists(lists, weights, k))
    got = fuse_arrays(_arrays(lists), weights, k)
    np.testing.assert_array_equal(got.ids, expected.ids)
    np.testing.assert_array_equal(got.fused, expected.fused)
    assert got.channels == expected.channels
    np.testing.assert_array_equal(got.scores, expected.scores)
    np.testing.assert_array_equal(got.ranks, expected.ranks)
    np.testing.assert_array_equal(got.hit, expected.hit)


def test_a_repeated_item_counts_at_its_first_mention_and_zero_weight_still_gives_features():
    lists = {
        "itemcf": [(7, 0.9), (8, 0.8), (7, 0.1)],
        "usercf": [(9, 0.5), (7, 0.4)],
    }
    got = fuse_arrays(_arrays(lists), {"usercf": 0.0}, 10)
    # usercf is switched off for fusion: item 9 (only there) is not a candidate...
    assert got.ids.tolist() == [7, 8]
    # ...but its score and rank still describe item 7, as training's candidate_pairs does.
    slot = {c: k for k, c in enumerate(ft.RECALL_CHANNELS)}
    assert got.scores[slot["usercf"], 0] == pytest.approx(0.4)
    assert got.ranks[slot["usercf"], 0] == 2.0
    assert got.ranks[slot["itemcf"], 0] == 1.0  # the first mention, not the repeat at 3
    assert got.channels == ["itemcf", "itemcf"]


def test_a_negative_weight_is_refused_like_fuse_does():
    with pytest.raises(ValueError, match="weight of channel"):
        fuse_arrays(_arrays({"itemcf": [(1, 1.0)]}), {"itemcf": -1.0}, 10)


def test_nothing_to_fuse_gives_an_empty_set():
    assert len(fuse_arrays({}, {}, 10)) == 0
    assert len(fuse_arrays(_arrays({"itemcf": [(1, 1.0)]}), {"itemcf": 0.0}, 10)) == 0
