"""Input and output serializers of the recommendation API.

Inputs: ids are integers in 1..2**63-1 (the range of a signed 64-bit key; path converters do
not bound them, RELIABILITY.md), `limit` is 1..100 (default 10). Query parameters that a
serializer does not declare are ignored.
"""

from __future__ import annotations

from rest_framework import serializers

MAX_ID = 2**63 - 1
MAX_LIMIT = 100
DEFAULT_LIMIT = 10


def _id_field(**kwargs: object) -> serializers.IntegerField:
    return serializers.IntegerField(min_value=1, max_value=MAX_ID, **kwargs)  # type: ignore[arg-type]


class LimitInput(serializers.Serializer):
    """`limit`: how many items to return."""

    limit = serializers.IntegerField(
        min_value=1, max_value=MAX_LIMIT, required=False, default=DEFAULT_LIMIT
    )


class ForYouInput(LimitInput):
    """GET /recommendations/for-you."""

    user_id = _id_field()


class SimilarInput(LimitInput):
    """GET /items/<item_id>/similar (the path's item_id is validated here too)."""

    item_id = _id_field()
    user_id = _id_field(required=False)


class PopularInput(LimitInput):
    """GET /popular."""

    category = serializers.CharField(max_length=100, required=False, allow_blank=False)


class ItemOutput(serializers.Serializer):
    """One recommended item."""

    item_id = serializers.IntegerField()
    title = serializers.CharField()
    price = serializers.FloatField(allow_null=True)
    score = serializers.FloatField()
    channel = serializers.CharField()
    reason = serializers.CharField()


class RecommendationOutput(serializers.Serializer):
    """Every recommendation response."""

    request_id = serializers.CharField()
    model_version = serializers.CharField(allow_null=True)
    variant = serializers.CharField()
    source = serializers.CharField()
    degraded = serializers.BooleanField()
    degrade_reason = serializers.CharField(allow_null=True)
    items = ItemOutput(many=True)
