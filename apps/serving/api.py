"""The recommendation API (read endpoints): input serializer -> engine -> output serializer.

Bad input is a 400 JSON `{"error": "invalid_request", "detail": {field: [messages]}}`. A
dependency failure is never a 5xx: the engine's degradation chain answers from the next source
and the response says so (`degraded`, `degrade_reason`, `source`).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ParseError
from rest_framework.parsers import FormParser, JSONParser
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.experiments.choices import Scene
from apps.experiments.params import VariantParams
from apps.models.selectors import model_version_serving_state
from apps.serving import metrics
from apps.serving.auth import RELOAD_PERMISSION, AdminAPIView
from apps.serving.engine import diversity, recommend
from apps.serving.engine.degrade import Deadline, Outcome
from apps.serving.engine.recommend import Options, RecItem, Stores
from apps.serving.engine.snapshot import ServingSnapshot
from apps.serving.engine.sources import Reason
from apps.serving.errors import ADMIN_ERRORS, BODY_ERRORS
from apps.serving.exposure import EXPOSURES, FEEDBACK, get_writer
from apps.serving.fastinput import fast_validate
from apps.serving.serializers import (
    DEFAULT_LIMIT,
    MAX_ID,
    MAX_LIMIT,
    SANE_TOKEN,
    AssignmentInput,
    AssignmentOutput,
    DetailInput,
    ErrorOutput,
    FeedbackAcceptedOutput,
    FeedbackInput,
    ForYouInput,
    PopularInput,
    RecommendationOutput,
    ReloadOutput,
    SimilarInput,
)
from apps.serving.shadow import ShadowJob, get_pool
from apps.serving.state import Current, get_state, stores_with_deadline

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "HTTP_X_REQUEST_ID"
# A client's request id is echoed only when it is a short, printable token (SANE_TOKEN): it
# ends up in log lines and response headers, so no spaces, newlines or markup.
DEFAULT_VARIANT = "default"
# Not a `Reason` of the chain: there is no bundle to ask at all (an empty registry, or the
# primary's bundle never loaded).
NO_MODEL = "no_model"
# The whole request's budget for the engine (Redis, local store, ranker); later steps see what
# is left and a step that would start after it is skipped (RECO["SERVING_BUDGET_MS"]).
DEFAULT_BUDGET_MS = 150
# How many more items than `limit` a diversity re-ranking chooses from.
DIVERSITY_POOL = 3


def _budget_seconds() -> float:
    from django.conf import settings

    return float(getattr(settings, "RECO", {}).get("SERVING_BUDGET_MS", DEFAULT_BUDGET_MS)) / 1e3


class RequestContext:
    """What `answer()` needs besides the snapshot: stores with this request's deadline, the
    variant's parameters, and the ranker-failure note the response reports."""

    __slots__ = ("current", "params", "ranker_error", "stores")

    def __init__(self, current: Current, stores: Stores, params: VariantParams) -> None:
        self.current = current
        self.params = params
        self.stores = stores
        self.ranker_error: str | None = None

    @classmethod
    def for_request(
        cls, current: Current, snapshot: ServingSnapshot, params: VariantParams
    ) -> RequestContext:
        """The context of one request: `snapshot`'s stores under the request's budget."""
        deadline = Deadline.after(_budget_seconds())
        return cls(current, stores_with_deadline(current.stores_for(snapshot), deadline), params)

    def _ranker_failed(self, error: str) -> None:
        self.ranker_error = error

    def options(self) -> Options:
        """Engine options from the variant (None = the snapshot's defaults)."""
        return Options(
            channel_weights=self.params.channel_weights,
            use_ranker=self.params.ranker is not False,
            on_ranker_failed=self._ranker_failed,
            on_lists=metrics.observe_candidates,
        )

    def pool_limit(self, limit: int) -> int:
        """How many items to ask the engine for: more when a diversity pass will choose."""
        method = self.params.diversity.method if self.params.diversity else None
        if method in (None, diversity.NONE):
            return limit
        return min(100, limit * DIVERSITY_POOL)


_NO_PARAMS = VariantParams()


def request_id(request: Request) -> str:
    """The client's X-Request-ID when it is a sane token, else a new uuid4."""
    given = request.META.get(REQUEST_ID_HEADER, "")
    return given if SANE_TOKEN.match(given) else uuid.uuid4().hex


def invalid(errors: Any, request_id_: str) -> Response:
    """The one shape of a 400."""
    return Response(
        {"error": "invalid_request", "detail": errors, "request_id": request_id_},
        status=400,
        headers={"X-Request-ID": request_id_},
    )


def request_body(request: Request, rid: str) -> tuple[Any, Response | None]:
    """The parsed request body, or the 400 for a malformed one (bad JSON, too many form
    fields) in the API's shape: DRF's own answer has a string `detail`. A body that is too
    large (413) or of an unsupported type (415) propagates to DRF's JSON answers."""
    try:
        return request.data, None
    except RequestDataTooBig:
        raise
    except (ParseError, SuspiciousOperation) as exc:
        return None, invalid({"body": [str(getattr(exc, "detail", exc))]}, rid)


BAD_REQUEST = OpenApiResponse(ErrorOutput, description="Invalid input (`invalid_request`).")
REQUEST_ID_PARAMETER = OpenApiParameter(
    "X-Request-ID",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    required=False,
    description="Echoed when it is a short printable token; otherwise a new id is made.",
)
# The bounds the input serializers enforce, in the schema too (clients and the fuzzer see them).
ID_SCHEMA = {"type": "integer", "format": "int64", "minimum": 1, "maximum": MAX_ID}
LIMIT_SCHEMA = {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}
TOKEN_SCHEMA = {"type": "string", "pattern": SANE_TOKEN.pattern}
LIMIT_PARAMETERS = [
    OpenApiParameter("limit", LIMIT_SCHEMA, description="1..100, default 10."),
    OpenApiParameter("visitor_id", TOKEN_SCHEMA, description="Anonymous visitor id (logged only)."),
    REQUEST_ID_PARAMETER,
]


class RecommendationView(APIView):
    """Shared flow of the read endpoints; subclasses name the input, scene and engine call."""

    # Public, anonymous reads: no session lookup, no CSRF, nothing to authenticate.
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    input_class: type[serializers.Serializer] = serializers.Serializer
    scene: str = ""

    def answer(
        self, snapshot: ServingSnapshot, ctx: RequestContext, data: dict[str, Any]
    ) -> Outcome[RecItem]:
        raise NotImplementedError

    def unit_id(self, data: dict[str, Any]) -> int | str | None:
        """Who experiments and the canary bucket on: the user, else the anonymous visitor."""
        user = data.get("user_id")
        return user if user is not None else data.get("visitor_id")

    def respond(self, request: Request, params: dict[str, Any]) -> Response:
        started = time.perf_counter()
        response = self._respond(request, params, started)
        metrics.observe_request(self.scene, response.status_code, time.perf_counter() - started)
        return response

    def _respond(self, request: Request, params: dict[str, Any], started: float) -> Response:
        rid = request_id(request)
        data = fast_validate(self.input_class, params)
        if data is None:  # unusual or invalid input: the serializer decides (and explains)
            form = self.input_class(data=params)
            if not form.is_valid():
                return invalid(form.errors, rid)
            data = dict(form.validated_data)
        current = get_state().current()
        variant = DEFAULT_VARIANT
        variant_params = _NO_PARAMS
        unit = self.unit_id(data)
        if unit is not None:
            assignment = current.experiments.assign(self.scene, unit, now=timezone.now())
            if assignment is not None:
                variant = assignment.label
                variant_params = assignment.variant.params
        snapshot = current.route(unit, variant_params.model_version)
        prices: dict[int, float | None] = {}
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
            ctx = RequestContext.for_request(current, snapshot, variant_params)
            outcome = self.answer(snapshot, ctx, data)
            items = self._diversify(snapshot, ctx, outcome.items, data)
            reason = str(outcome.reason) if outcome.degraded else None
            if reason is None and ctx.ranker_error is not None:
                reason = (
                    Reason.RANKER_TIMEOUT
                    if ctx.ranker_error == "budget_exceeded"
                    else Reason.RANKER_FAILED
                )
            body = {
                "request_id": rid,
                "model_version": snapshot.model_version,
                "variant": variant,
                "source": str(outcome.source),
                "degraded": reason is not None,
                "degrade_reason": None if reason is None else str(reason),
                "items": [item.__dict__ for item in items],
            }
            prices = {item.item_id: item.price for item in items}
            metrics.ROUTED.labels(role=self._role(current, snapshot)).inc()
            self._shadow(current, snapshot, ctx, data, body)
        metrics.set_model_version(current.snapshot.model_version if current.snapshot else None)
        if body["degraded"]:
            metrics.observe_degraded(body["degrade_reason"])
        self.log_exposure(body, data, started, prices)
        # `body` already has RecommendationOutput's shape (the serializer documents it in the
        # schema); serialising 20 items through DRF fields cost ~1.2 ms of a ~2 ms request.
        return Response(body, headers={"X-Request-ID": rid})

    @staticmethod
    def _role(current: Current, snapshot: ServingSnapshot) -> str:
        if snapshot is current.snapshot:
            return "primary"
        if snapshot is current.canary:
            return "canary"
        return "pinned"

    @staticmethod
    def _diversify(
        snapshot: ServingSnapshot,
        ctx: RequestContext,
        items: Any,
        data: dict[str, Any],
    ) -> list[RecItem]:
        chosen = ctx.params.diversity
        limit = data.get("limit", 10)
        if chosen is None or chosen.method == diversity.NONE:
            return list(items[:limit])

        def category_of(item: RecItem) -> str:
            info = snapshot.catalogue.get(item.item_id)
            return info.category if info is not None else ""

        return diversity.diversify(
            list(items),
            category_of,
            limit,
            method=chosen.method,
            lambda_=chosen.lambda_,
            max_per_category=chosen.max_per_category,
        )

    def _shadow(
        self,
        current: Current,
        snapshot: ServingSnapshot,
        ctx: RequestContext,
        data: dict[str, Any],
        body: dict[str, Any],
    ) -> None:
        """Hand a sample of requests to the shadow model (never blocks, never fails)."""
        shadow = current.shadow
        if shadow is None or shadow is snapshot or self.scene == Scene.POPULAR:
            return
        pool = get_pool()
        if not pool.wanted():
            return
        # Off the request path: the shadow has no request budget, only the ranker's own.
        shadow_ctx = RequestContext(
            current, stores_with_deadline(current.stores_for(shadow), None), ctx.params
        )
        pool.submit(
            ShadowJob(
                request_id=body["request_id"],
                scene=self.scene,
                served_version=snapshot.model_version,
                shadow_version=shadow.model_version,
                served_items=tuple(item["item_id"] for item in body["items"]),
                run=lambda: self.answer(shadow, shadow_ctx, data),
            )
        )

    def log_exposure(
        self,
        body: dict[str, Any],
        data: dict[str, Any],
        started: float,
        prices: dict[int, float | None] | None = None,
    ) -> None:
        """Queue the exposure line (never blocks; a full queue drops and counts it)."""
        prices = prices or {}
        get_writer().submit(
            EXPOSURES,
            {
                "ts": timezone.now().isoformat(),
                "request_id": body["request_id"],
                "user_id": data.get("user_id"),
                "visitor_id": data.get("visitor_id"),
                "scene": self.scene,
                "variant": body["variant"],
                "model_version": body["model_version"],
                "degraded": body["degraded"],
                "degrade_reason": body["degrade_reason"],
                "source": body["source"],
                "latency_ms": round((time.perf_counter() - started) * 1000, 3),
                "items": [
                    {
                        "item_id": item["item_id"],
                        "position": position,
                        "channel": item["channel"],
                        "price": prices.get(item["item_id"]),
                    }
                    for position, item in enumerate(body["items"], start=1)
                ],
            },
        )


class ForYouView(RecommendationView):
    """GET /api/v1/recommendations/for-you?user_id=&limit=: the user's ranked list; an unknown
    user gets the popular list (cold start: not an error, not degraded)."""

    input_class = ForYouInput
    scene = Scene.FOR_YOU

    @extend_schema(
        operation_id="recommendations_for_you",
        summary="Personalised recommendations for a user",
        parameters=[
            OpenApiParameter("user_id", ID_SCHEMA, required=True, description="1..2^63-1"),
            *LIMIT_PARAMETERS,
        ],
        responses={200: RecommendationOutput, 400: BAD_REQUEST},
    )
    def get(self, request: Request) -> Response:
        return self.respond(request, request.query_params.dict())

    def answer(
        self, snapshot: ServingSnapshot, ctx: RequestContext, data: dict[str, Any]
    ) -> Outcome[RecItem]:
        return recommend.for_you(
            snapshot,
            ctx.stores,
            data["user_id"],
            ctx.pool_limit(data["limit"]),
            options=ctx.options(),
        )


class SimilarView(RecommendationView):
    """GET /api/v1/items/<item_id>/similar?limit=&user_id=: items like this one; an unknown
    item gets the popular list."""

    input_class = SimilarInput
    scene = Scene.SIMILAR

    @extend_schema(
        operation_id="items_similar",
        summary="Items similar to an item",
        parameters=[
            OpenApiParameter("item_id", ID_SCHEMA, OpenApiParameter.PATH, description="1..2^63-1"),
            OpenApiParameter(
                "user_id", ID_SCHEMA, description="For experiment bucketing (optional)."
            ),
            *LIMIT_PARAMETERS,
        ],
        responses={200: RecommendationOutput, 400: BAD_REQUEST},
    )
    def get(self, request: Request, item_id: str) -> Response:
        return self.respond(request, {**request.query_params.dict(), "item_id": item_id})

    def answer(
        self, snapshot: ServingSnapshot, ctx: RequestContext, data: dict[str, Any]
    ) -> Outcome[RecItem]:
        return recommend.similar(
            snapshot, ctx.stores, data["item_id"], ctx.pool_limit(data["limit"])
        )


class DetailView(RecommendationView):
    """GET /api/v1/items/<item_id>/for-user?user_id=&limit=: the item page personalised for a
    user: the item's similar items ordered by the ranker for this user (similar order for a
    user the bundle does not know, or without a ranker)."""

    input_class = DetailInput
    scene = Scene.DETAIL

    @extend_schema(
        operation_id="items_for_user",
        summary="Detail-page recommendations for an item, personalised for a user",
        parameters=[
            OpenApiParameter("item_id", ID_SCHEMA, OpenApiParameter.PATH, description="1..2^63-1"),
            OpenApiParameter("user_id", ID_SCHEMA, required=True, description="1..2^63-1"),
            *LIMIT_PARAMETERS,
        ],
        responses={200: RecommendationOutput, 400: BAD_REQUEST},
    )
    def get(self, request: Request, item_id: str) -> Response:
        return self.respond(request, {**request.query_params.dict(), "item_id": item_id})

    def answer(
        self, snapshot: ServingSnapshot, ctx: RequestContext, data: dict[str, Any]
    ) -> Outcome[RecItem]:
        return recommend.detail(
            snapshot,
            ctx.stores,
            data["item_id"],
            data["user_id"],
            ctx.pool_limit(data["limit"]),
            options=ctx.options(),
        )


class PopularView(RecommendationView):
    """GET /api/v1/popular?limit=&category=: the popular list, optionally one category."""

    input_class = PopularInput
    scene = Scene.POPULAR

    @extend_schema(
        operation_id="popular",
        summary="Popular items, optionally within one category",
        parameters=[
            OpenApiParameter(
                "category",
                {"type": "string", "minLength": 1, "maxLength": 100},
                description="Category name.",
            ),
            *LIMIT_PARAMETERS,
        ],
        responses={200: RecommendationOutput, 400: BAD_REQUEST},
    )
    def get(self, request: Request) -> Response:
        return self.respond(request, request.query_params.dict())

    def answer(
        self, snapshot: ServingSnapshot, ctx: RequestContext, data: dict[str, Any]
    ) -> Outcome[RecItem]:
        return recommend.popular(snapshot, ctx.pool_limit(data["limit"]), data.get("category"))


class FeedbackView(APIView):
    """POST /api/v1/feedback: one event on a recommended item, appended to the feedback log."""

    # Public like the reads (a storefront posts it for anonymous visitors): no session, so no
    # CSRF, and the event only ever lands in a log.
    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    # No multipart: an event has no files, and Django streams multipart files to disk
    # whatever DATA_UPLOAD_MAX_MEMORY_SIZE says (a public endpoint must not take them).
    parser_classes = [JSONParser, FormParser]
    endpoint = "feedback"

    @extend_schema(
        operation_id="feedback",
        summary="Record a user event on a recommended item",
        request=FeedbackInput,
        parameters=[REQUEST_ID_PARAMETER],
        responses={202: FeedbackAcceptedOutput, 400: BAD_REQUEST, **BODY_ERRORS},
    )
    def post(self, request: Request) -> Response:
        started = time.perf_counter()
        rid = request_id(request)
        data, malformed = request_body(request, rid)
        form = FeedbackInput(data=data)
        if malformed is not None:
            response = malformed
        elif not form.is_valid():
            response = invalid(form.errors, rid)
        else:
            record = {"ts": timezone.now().isoformat(), **form.validated_data}
            queued = get_writer().submit(FEEDBACK, record)
            response = Response(
                {"status": "accepted", "request_id": rid, "queued": queued},
                status=202,
                headers={"X-Request-ID": rid},
            )
        metrics.observe_request(self.endpoint, response.status_code, time.perf_counter() - started)
        return response


class AssignmentView(APIView):
    """GET /api/v1/users/<user_id>/assignment: the model version and experiment variants this
    user gets now, and the registry's canary and shadow."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    endpoint = "assignment"

    @extend_schema(
        operation_id="users_assignment",
        summary="What a user is served: model version and experiment variant per scene",
        parameters=[
            OpenApiParameter("user_id", ID_SCHEMA, OpenApiParameter.PATH, description="1..2^63-1"),
            REQUEST_ID_PARAMETER,
        ],
        responses={200: AssignmentOutput, 400: BAD_REQUEST},
    )
    def get(self, request: Request, user_id: str) -> Response:
        started = time.perf_counter()
        rid = request_id(request)
        form = AssignmentInput(data={"user_id": user_id})
        if not form.is_valid():
            response = invalid(form.errors, rid)
        else:
            response = Response(
                AssignmentOutput(self.body(rid, form.validated_data["user_id"])).data,
                headers={"X-Request-ID": rid},
            )
        metrics.observe_request(self.endpoint, response.status_code, time.perf_counter() - started)
        return response

    @staticmethod
    def body(rid: str, user_id: int) -> dict[str, Any]:
        current = get_state().current()
        live = model_version_serving_state()  # one query
        now = timezone.now()
        variants: dict[str, str] = {}
        params: dict[str, dict[str, Any]] = {}
        served: dict[str, str | None] = {}
        for scene in Scene.values:
            assignment = current.experiments.assign(scene, user_id, now=now)
            variants[scene] = assignment.label if assignment is not None else DEFAULT_VARIANT
            chosen = assignment.variant.params if assignment is not None else _NO_PARAMS
            params[scene] = _params_json(chosen)
            snapshot = current.route(user_id, chosen.model_version)
            served[scene] = snapshot.model_version if snapshot is not None else None

        def version(row: dict[str, Any] | None) -> dict[str, Any] | None:
            if row is None:
                return None
            return {"version": row["version"], "traffic_share": row.get("traffic_share")}

        return {
            "request_id": rid,
            "user_id": user_id,
            "model_version": current.snapshot.model_version if current.snapshot else None,
            "primary": live["primary"]["version"] if live["primary"] else None,
            "canary": version(live["canary"]),
            "shadow": version(live["shadow"]),
            "variants": variants,
            "params": params,
            "served_version": served,
        }


def _params_json(params: VariantParams) -> dict[str, Any]:
    """A variant's overrides as JSON (only the keys it sets)."""
    out: dict[str, Any] = {}
    if params.channel_weights is not None:
        out["channel_weights"] = dict(params.channel_weights)
    if params.ranker is not None:
        out["ranker"] = params.ranker
    if params.model_version is not None:
        out["model_version"] = params.model_version
    if params.diversity is not None:
        chosen = params.diversity
        out["diversity"] = {
            "method": chosen.method,
            **({"lambda": chosen.lambda_} if chosen.lambda_ is not None else {}),
            **(
                {"max_per_category": chosen.max_per_category}
                if chosen.max_per_category is not None
                else {}
            ),
        }
    return out


class ReloadView(AdminAPIView):
    """POST /api/v1/admin/reload: refresh this process's serving state now.

    Staff with `registry.change_modelversion` only, by token or by session + CSRF. Every
    attempt, allowed or refused, is written synchronously to the audit log (`AdminAPIView`).
    """

    required_permission = RELOAD_PERMISSION
    audit_action = "serving_reload"
    endpoint = "reload"

    @extend_schema(
        operation_id="admin_reload",
        summary="Reload the serving state of this worker (staff only)",
        request=None,
        responses={200: ReloadOutput, **ADMIN_ERRORS},
    )
    def post(self, request: Request) -> Response:
        state = get_state()
        changed = state.refresh()
        current = state.current()
        body = {
            "changed": changed,
            "model_version": current.snapshot.model_version if current.snapshot else None,
            "experiments_version": current.experiments.version,
            # False when no Redis is configured: nothing is published anywhere.
            "redis_published": current.stores.redis is not None and current.stores.redis_published,
            "pid": os.getpid(),
        }
        metrics.set_model_version(body["model_version"])
        return Response(ReloadOutput(body).data)

    def audit_details(self, response: Response) -> dict[str, Any]:
        data = getattr(response, "data", None)
        served = data.get("model_version") if isinstance(data, dict) else None
        return {"model_version": served if response.status_code < 400 else None}
