"""Validation of variant parameters: what is accepted, its canonical form, and the messages."""

from __future__ import annotations

import pytest

from apps.experiments.params import (
    CHANNELS,
    Diversity,
    ParamsError,
    VariantParams,
    clean_params,
    parse_params,
)


def problems(raw) -> list[str]:
    with pytest.raises(ParamsError) as info:
        clean_params(raw)
    return info.value.problems


def test_the_channel_list_matches_the_trainers_channels():
    from apps.pipeline.train.trainer import DEFAULT_CHANNELS

    assert CHANNELS == DEFAULT_CHANNELS


def test_empty_or_missing_params_override_nothing():
    assert clean_params(None) == {}
    assert clean_params({}) == {}
    assert parse_params({}) == VariantParams()


def test_full_params_come_back_canonical():
    raw = {
        "diversity": {"lambda": 1, "method": "mmr"},
        "model_version": "  v2025-01 ",
        "ranker": False,
        "channel_weights": {"popular": 0, "ease": 2},
    }
    clean = clean_params(raw)
    assert clean == {
        "channel_weights": {"ease": 2.0, "popular": 0.0},
        "ranker": False,
        "model_version": "v2025-01",
        "diversity": {"method": "mmr", "lambda": 1.0},
    }
    assert list(clean) == ["channel_weights", "ranker", "model_version", "diversity"]
    assert list(clean["channel_weights"]) == ["ease", "popular"]
    assert clean_params(clean) == clean  # canonical is a fixed point


def test_an_unknown_key_is_rejected_with_a_suggestion():
    [message] = problems({"rankr": True})
    assert message.startswith("params: unknown key 'rankr'")
    assert "did you mean 'ranker'?" in message


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"eas": 1.0}, "params.channel_weights.eas: unknown channel 'eas'"),
        ({"ease": -0.5}, "params.channel_weights.ease: must be >= 0"),
        ({"ease": True}, "params.channel_weights.ease: must be a number"),
        ({"ease": "2"}, "params.channel_weights.ease: must be a number"),
        ({"ease": float("nan")}, "params.channel_weights.ease: must be a number"),
        (["ease"], "params.channel_weights: must be a mapping"),
    ],
)
def test_bad_channel_weights_are_rejected(weights, expected):
    [message] = problems({"channel_weights": weights})
    assert message.startswith(expected)


@pytest.mark.parametrize("value", ["on", 1, "true"])
def test_the_ranker_switch_must_be_a_boolean(value):
    [message] = problems({"ranker": value})
    assert message.startswith("params.ranker: must be true (on) or false (off)")


@pytest.mark.parametrize(
    ("diversity", "expected"),
    [
        ({"method": "mmr", "lambda": 1.5}, "params.diversity.lambda: must be a number from 0 to 1"),
        ({"method": "mmr"}, "params.diversity.lambda: must be a number from 0 to 1"),
        (
            {"method": "category_cap", "max_per_category": 0},
            "params.diversity.max_per_category: must be an integer >= 1",
        ),
        (
            {"method": "category_cap", "max_per_category": 2.5},
            "params.diversity.max_per_category: must be an integer >= 1",
        ),
        ({"method": "shuffle"}, "params.diversity.method: unknown method 'shuffle'"),
        ({"lambda": 0.5}, "params.diversity.method: unknown method 'None'"),
        ("mmr", "params.diversity: must be null or a mapping"),
    ],
)
def test_bad_diversity_settings_are_rejected(diversity, expected):
    assert problems({"diversity": diversity})[0].startswith(expected)


def test_a_diversity_key_of_another_method_is_rejected():
    [message] = problems({"diversity": {"method": "mmr", "lambda": 0.5, "max_per_category": 2}})
    assert message.startswith("params.diversity.max_per_category: unknown mmr key")


def test_every_problem_is_reported_at_once():
    found = problems(
        {"channel_weights": {"nope": 1.0}, "ranker": "yes", "model_version": "", "extra": 1}
    )
    assert len(found) == 4
    assert {p.split(":")[0] for p in found} == {
        "params",
        "params.channel_weights.nope",
        "params.ranker",
        "params.model_version",
    }


def test_params_must_be_a_mapping():
    assert problems([1, 2]) == ["params: must be a mapping, not list"]


def test_parsed_params_distinguish_diversity_off_from_the_default():
    assert parse_params({}).diversity is None  # serving default
    assert parse_params({"diversity": None}).diversity == Diversity(method="none")
    assert parse_params(
        {"diversity": {"method": "category_cap", "max_per_category": 3}}
    ).diversity == (Diversity(method="category_cap", max_per_category=3))


def test_parsed_channel_weights_are_read_only():
    params = parse_params({"channel_weights": {"ease": 2.0}})
    assert params.channel_weights == {"ease": 2.0}
    with pytest.raises(TypeError):
        params.channel_weights["ease"] = 3.0  # type: ignore[index]
