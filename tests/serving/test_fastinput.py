"""The read endpoints' fast input path never disagrees with the serializers."""

from __future__ import annotations

import itertools

import pytest

from apps.serving.fastinput import fast_validate
from apps.serving.serializers import DetailInput, ForYouInput, PopularInput, SimilarInput

IDS = [
    "1",
    "42",
    "9223372036854775807",
    "9223372036854775808",
    "0",
    "-1",
    "12.0",
    " 7",
    "7 ",
    "١٢",
    "1_000",
    "0x10",
    "abc",
    "",
    "1" * 40,
    "+5",
]
LIMITS = [None, "1", "10", "100", "101", "0", "-1", "ten", "5.0"]
TOKENS = [None, "v-9", "a.b:c_d", "has space", "x" * 128, "x" * 129, "é", ""]
CATEGORIES = [
    None,
    "books",
    "Électronique",
    " books",
    "books ",
    "",
    "x" * 100,
    "x" * 101,
    "a\x00b",
    "line\nbreak",
]


def _same(serializer_class, params) -> None:  # type: ignore[no-untyped-def]
    fast = fast_validate(serializer_class, params)
    form = serializer_class(data=params)
    valid = form.is_valid()
    if fast is not None:
        # whatever the fast path accepts, the serializer accepts with the same values
        assert valid, (params, form.errors)
        assert fast == dict(form.validated_data), params


@pytest.mark.parametrize("user_id", IDS)
def test_for_you_agrees_with_its_serializer(user_id: str) -> None:
    for limit, visitor in itertools.product(LIMITS, TOKENS):
        params = {"user_id": user_id}
        if limit is not None:
            params["limit"] = limit
        if visitor is not None:
            params["visitor_id"] = visitor
        _same(ForYouInput, params)


@pytest.mark.parametrize("item_id", IDS)
def test_similar_and_detail_agree_with_their_serializers(item_id: str) -> None:
    for user_id, limit in itertools.product([None, *IDS[:6]], LIMITS[:5]):
        params = {"item_id": item_id}
        if user_id is not None:
            params["user_id"] = user_id
        if limit is not None:
            params["limit"] = limit
        _same(SimilarInput, params)
        _same(DetailInput, params)


@pytest.mark.parametrize("category", CATEGORIES)
def test_popular_agrees_with_its_serializer(category: str | None) -> None:
    for limit in LIMITS:
        params = {} if category is None else {"category": category}
        if limit is not None:
            params["limit"] = limit
        _same(PopularInput, params)


def test_plain_valid_input_takes_the_fast_path_and_anything_odd_does_not() -> None:
    assert fast_validate(ForYouInput, {"user_id": "5"}) == {"user_id": 5, "limit": 10}
    assert fast_validate(ForYouInput, {"user_id": "5", "limit": "3", "visitor_id": "v-1"}) == {
        "user_id": 5,
        "limit": 3,
        "visitor_id": "v-1",
    }
    assert fast_validate(ForYouInput, {"user_id": "12.0"}) is None  # the serializer refuses it
    assert fast_validate(ForYouInput, {"user_id": "0"}) is None
    assert fast_validate(ForYouInput, {}) is None
    assert fast_validate(PopularInput, {"category": " x"}) is None
