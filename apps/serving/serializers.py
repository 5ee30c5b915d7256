"""Input and output serializers of the recommendation API.

Inputs: ids are integers in 1..2**63-1 (the range of a signed 64-bit key; path converters do
not bound them, RELIABILITY.md), `limit` is 1..100 (default 10). Query parameters that a
serializer does not declare are ignored.
"""

from __future__ import annotations

import math
import re
from typing import Any

from rest_framework import serializers

MAX_ID = 2**63 - 1
MAX_POSITION = 10_000
# Client-supplied tokens end up in log lines: short and printable only.
SANE_TOKEN = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
FEEDBACK_EVENTS = ("exposure", "click", "add_to_cart", "purchase")
MAX_LIMIT = 100
DEFAULT_LIMIT = 10


# An integer in a query string or path: optional minus sign, then ASCII digits (at most 20).
ASCII_INTEGER = re.compile(r"-?[0-9]{1,20}")


class AsciiIntegerField(serializers.IntegerField):
    """An integer; as text, ASCII digits only. DRF's IntegerField goes through Python's
    `int()`, which also reads Arabic-Indic and full-width digits, '1_000', '+5', ' 12 ' and
    '12.0' as numbers, so one id had many spellings (in logs, caches and experiment units)."""

    def to_internal_value(self, data: Any) -> int:
        # JSON true/false are not numbers, though Python's int() would read them as 1/0.
        if isinstance(data, bool) or (isinstance(data, str) and not ASCII_INTEGER.fullmatch(data)):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictFloatField(serializers.FloatField):
    """A number; JSON true/false are refused (DRF's FloatField reads them as 1.0/0.0)."""

    def to_internal_value(self, data: Any) -> float:
        if isinstance(data, bool):
            self.fail("invalid")
        return super().to_internal_value(data)


def _id_field(**kwargs: object) -> serializers.IntegerField:
    return AsciiIntegerField(min_value=1, max_value=MAX_ID, **kwargs)  # type: ignore[arg-type]


def _token_field(**kwargs: object) -> serializers.RegexField:
    return serializers.RegexField(SANE_TOKEN, max_length=128, **kwargs)  # type: ignore[arg-type]


class LimitInput(serializers.Serializer):
    """`limit`: how many items to return; `visitor_id`: the anonymous visitor, logged only."""

    limit = AsciiIntegerField(
        min_value=1, max_value=MAX_LIMIT, required=False, default=DEFAULT_LIMIT
    )
    visitor_id = _token_field(required=False)


class ForYouInput(LimitInput):
    """GET /recommendations/for-you."""

    user_id = _id_field()


class SimilarInput(LimitInput):
    """GET /items/<item_id>/similar (the path's item_id is validated here too)."""

    item_id = _id_field()
    user_id = _id_field(required=False)


class DetailInput(LimitInput):
    """GET /items/<item_id>/for-user: the item page, personalised for `user_id`."""

    item_id = _id_field()
    user_id = _id_field()


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


class ErrorOutput(serializers.Serializer):
    """The one shape of a 400: `detail` maps each bad field to its messages."""

    error = serializers.CharField()
    detail = serializers.DictField(child=serializers.ListField(child=serializers.CharField()))
    request_id = serializers.CharField()


class FeedbackInput(serializers.Serializer):
    """POST /feedback: one user event on a recommended item. Unknown fields are refused, so a
    client typo (`itemId`) fails loudly instead of logging half an event."""

    request_id = _token_field()
    event = serializers.ChoiceField(choices=FEEDBACK_EVENTS)
    item_id = _id_field()
    user_id = _id_field(required=False)
    visitor_id = _token_field(required=False)
    position = AsciiIntegerField(min_value=0, max_value=MAX_POSITION, required=False)
    value = StrictFloatField(required=False, min_value=-1e12, max_value=1e12)

    def validate_value(self, value: float) -> float:
        if not math.isfinite(value):
            raise serializers.ValidationError("Must be a finite number.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if isinstance(self.initial_data, dict):
            unknown = sorted(set(self.initial_data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return attrs


class FeedbackAcceptedOutput(serializers.Serializer):
    """202: the event is queued for the feedback log (`queued` false: dropped, queue full)."""

    status = serializers.CharField()
    request_id = serializers.CharField()
    queued = serializers.BooleanField()


class AssignmentInput(serializers.Serializer):
    """GET /users/<user_id>/assignment."""

    user_id = _id_field()


class LiveVersionOutput(serializers.Serializer):
    """A registry version receiving traffic (canary) or scoring in the background (shadow)."""

    version = serializers.CharField()
    traffic_share = serializers.FloatField(allow_null=True)


class AssignmentOutput(serializers.Serializer):
    """What a user is served: the model version, the registry's live versions, and the
    experiment variant per scene (`default` outside any experiment)."""

    request_id = serializers.CharField()
    user_id = serializers.IntegerField()
    model_version = serializers.CharField(allow_null=True)
    primary = serializers.CharField(allow_null=True)
    canary = LiveVersionOutput(allow_null=True)
    shadow = LiveVersionOutput(allow_null=True)
    variants = serializers.DictField(child=serializers.CharField())
    params = serializers.DictField(
        child=serializers.DictField(),
        help_text="Per scene, the variant's parameter overrides ({} outside an experiment).",
    )
    served_version = serializers.DictField(
        child=serializers.CharField(allow_null=True),
        help_text="Per scene, the model version that answers this user (variant pin, canary"
        " bucket or primary).",
    )


class ReloadOutput(serializers.Serializer):
    """What this process serves after the reload (other workers pick it up at their poll)."""

    changed = serializers.BooleanField()
    model_version = serializers.CharField(allow_null=True)
    experiments_version = serializers.IntegerField()
    redis_published = serializers.BooleanField()
    pid = serializers.IntegerField()
