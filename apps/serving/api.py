"""The recommendation API (read endpoints): input serializer -> engine -> output serializer.

Bad input is a 400 JSON `{"error": "invalid_request", "detail": {field: [messages]}}`. A
dependency failure is never a 5xx: the engine's degradation chain answers from the next source
and the response says so (`degraded`, `degrade_reason`, `source`).
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from django.utils import timezone
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.experiments.choices import Scene
from apps.serving.engine import recommend
from apps.serving.engine.degrade import Outcome
from apps.serving.engine.recommend import RecItem
from apps.serving.engine.snapshot import ServingSnapshot
from apps.serving.serializers import (
    ForYouInput,
    PopularInput,
    RecommendationOutput,
    SimilarInput,
)
from apps.serving.state import Current, get_state

exposure_log = logging.getLogger("apps.serving.exposure")

REQUEST_ID_HEADER = "HTTP_X_REQUEST_ID"
# A client's request id is echoed only when it is a short, printable token: it ends up in log
# lines and response headers, so no spaces, newlines or markup.
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
DEFAULT_VARIANT = "default"
# Not a `Reason` of the chain: there is no bundle to ask at all (an empty registry, or the
# primary's bundle never loaded).
NO_MODEL = "no_model"


def request_id(request: Request) -> str:
    """The client's X-Request-ID when it is a sane token, else a new uuid4."""
    given = request.META.get(REQUEST_ID_HEADER, "")
    return given if _SANE_REQUEST_ID.match(given) else uuid.uuid4().hex


def invalid(errors: Any, request_id_: str) -> Response:
    """The one shape of a 400."""
    return Response(
        {"error": "invalid_request", "detail": errors, "request_id": request_id_},
        status=400,
        headers={"X-Request-ID": request_id_},
    )


class RecommendationView(APIView):
    """Shared flow of the read endpoints; subclasses name the input, scene and engine call."""

    # Public, anonymous reads: no session lookup, no CSRF, nothing to authenticate.
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    input_class: type[serializers.Serializer] = serializers.Serializer
    scene: str = ""

    def answer(
        self, snapshot: ServingSnapshot, current: Current, data: dict[str, Any]
    ) -> Outcome[RecItem]:
        raise NotImplementedError

    def unit_id(self, data: dict[str, Any]) -> int | None:
        """Who experiments bucket on (the user), when known."""
        return data.get("user_id")

    def respond(self, request: Request, params: dict[str, Any]) -> Response:
        rid = request_id(request)
        form = self.input_class(data=params)
        if not form.is_valid():
            return invalid(form.errors, rid)
        data = dict(form.validated_data)
        current = get_state().current()
        variant = DEFAULT_VARIANT
        unit = self.unit_id(data)
        if unit is not None:
            assignment = current.experiments.assign(self.scene, unit, now=timezone.now())
            if assignment is not None:
                variant = assignment.label
        snapshot = current.snapshot
        if snapshot is None:
            body = {
                "request_id": rid,
                "model_version": None,
                "variant": variant,
                "source": "none",
                "degraded": True,
                "degrade_reason": NO_MODEL,
                "items": [],
            }
        else:
            outcome = self.answer(snapshot, current, data)
            body = {
                "request_id": rid,
                "model_version": snapshot.model_version,
                "variant": variant,
                "source": str(outcome.source),
                "degraded": outcome.degraded,
                "degrade_reason": str(outcome.reason) if outcome.degraded else None,
                "items": [item.__dict__ for item in outcome.items],
            }
        exposure_log.info(
            "exposure scene=%s request_id=%s variant=%s model_version=%s source=%s items=%d",
            self.scene,
            rid,
            variant,
            body["model_version"],
            body["source"],
            len(body["items"]),
        )
        return Response(RecommendationOutput(body).data, headers={"X-Request-ID": rid})


class ForYouView(RecommendationView):
    """GET /api/v1/recommendations/for-you?user_id=&limit=: the user's ranked list; an unknown
    user gets the popular list (cold start: not an error, not degraded)."""

    input_class = ForYouInput
    scene = Scene.FOR_YOU

    def get(self, request: Request) -> Response:
        return self.respond(request, request.query_params.dict())

    def answer(
        self, snapshot: ServingSnapshot, current: Current, data: dict[str, Any]
    ) -> Outcome[RecItem]:
        return recommend.for_you(snapshot, current.stores, data["user_id"], data["limit"])


class SimilarView(RecommendationView):
    """GET /api/v1/items/<item_id>/similar?limit=&user_id=: items like this one; an unknown
    item gets the popular list."""

    input_class = SimilarInput
    scene = Scene.SIMILAR

    def get(self, request: Request, item_id: str) -> Response:
        return self.respond(request, {**request.query_params.dict(), "item_id": item_id})

    def answer(
        self, snapshot: ServingSnapshot, current: Current, data: dict[str, Any]
    ) -> Outcome[RecItem]:
        return recommend.similar(snapshot, current.stores, data["item_id"], data["limit"])


class PopularView(RecommendationView):
    """GET /api/v1/popular?limit=&category=: the popular list, optionally one category."""

    input_class = PopularInput
    scene = Scene.POPULAR

    def get(self, request: Request) -> Response:
        return self.respond(request, request.query_params.dict())

    def answer(
        self, snapshot: ServingSnapshot, current: Current, data: dict[str, Any]
    ) -> Outcome[RecItem]:
        return recommend.popular(snapshot, data["limit"], data.get("category"))
