"""Admin API endpoints besides reload: promote, rollback, retrain.

Thin views over the existing services (`apps.models.services`, `apps.pipeline.services` and
`tasks`), with the reload endpoint's access rules (`apps.serving.auth.AdminAPIView`): a DRF
token or the admin session + CSRF, active staff holding the action's permission, a throttle
per client address, and an audit line for every attempt. GET answers 405. The registry
services also write their own `ModelAudit` row (applied or refused) for every request that
reaches them.

- `POST /api/v1/admin/models/<version>/promote` (`registry.change_modelversion`): every
  gate runs; a refusal is a 409 with the reasons and each gate's result.
- `POST /api/v1/admin/models/rollback` (`registry.change_modelversion`): restore the most
  recently archived former primary; `expected_primary` makes it conditional.
- `POST /api/v1/admin/pipeline/retrain` (`pipeline.change_pipelinerun`): create a full
  pipeline run and enqueue it exactly as the admin's "Run pipeline now" does (202).
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import NotFound
from rest_framework.parsers import JSONParser
from rest_framework.request import Request
from rest_framework.response import Response

from apps.models import services as registry
from apps.models.models import ModelVersion
from apps.pipeline import services as pipeline
from apps.pipeline import tasks as pipeline_tasks
from apps.serving.api import BAD_REQUEST, invalid, request_body, request_id
from apps.serving.auth import MODEL_PERMISSION, PIPELINE_PERMISSION, AdminAPIView, client_address
from apps.serving.errors import ADMIN_ERRORS, BODY_ERRORS, NOT_FOUND

MAX_VERSION = 64  # ModelVersion.version's length
MAX_REASON = 500
RETRAIN_KIND = "full"


class StrictInput(serializers.Serializer):
    """Unknown fields are refused: a typo (`expected_primay`) must not be silently ignored."""

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if hasattr(self.initial_data, "keys"):
            unknown = sorted(set(self.initial_data.keys()) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return attrs


class PromoteInput(StrictInput):
    """Optional body of a promotion."""

    reason = serializers.CharField(max_length=MAX_REASON, required=False, allow_blank=True)


class RollbackInput(StrictInput):
    """Optional body of a rollback."""

    reason = serializers.CharField(max_length=MAX_REASON, required=False, allow_blank=True)
    expected_primary = serializers.CharField(
        max_length=MAX_VERSION,
        required=False,
        help_text="Refuse (409) unless this version is still the primary, so a rollback never "
        "undoes a change someone else made meanwhile.",
    )


class RetrainInput(StrictInput):
    """A retrain takes no parameters (the body may be absent or `{}`; any field is refused)."""


class GateOutput(serializers.Serializer):
    """One promotion gate's result."""

    name = serializers.CharField()
    passed = serializers.BooleanField()
    reason = serializers.CharField(allow_blank=True)
    skipped = serializers.BooleanField()


class TransitionOutput(serializers.Serializer):
    """An applied promotion or rollback."""

    action = serializers.CharField()
    model_version = serializers.CharField(help_text="The primary now.")
    replaced = serializers.CharField(allow_null=True, help_text="The primary it archived.")
    audit_id = serializers.IntegerField(help_text="The registry's ModelAudit row.")
    gates = GateOutput(many=True)


class RefusedOutput(serializers.Serializer):
    """A refused promotion or rollback: the registry is unchanged, a ModelAudit row says why."""

    error = serializers.CharField()
    detail = serializers.CharField()
    reasons = serializers.ListField(child=serializers.CharField())
    gates = GateOutput(many=True)


class RetrainOutput(serializers.Serializer):
    """A queued pipeline run."""

    run_id = serializers.IntegerField()
    kind = serializers.CharField()
    status = serializers.CharField()
    queued = serializers.CharField(help_text="How it runs: on the broker, or in the background.")


REFUSED = OpenApiResponse(RefusedOutput, description="Refused; the registry is unchanged.")


class RunActiveOutput(serializers.Serializer):
    """A retrain refused because a run of that kind is already pending or running."""

    error = serializers.CharField()
    detail = serializers.CharField()
    run_id = serializers.IntegerField(allow_null=True)


RUN_ACTIVE = OpenApiResponse(
    RunActiveOutput, description="A full run is already pending or running; nothing was queued."
)


def _actor(request: Request) -> str:
    return request.user.get_username()


class _BodyMixin:
    """Read an optional JSON body through an input serializer; a bad body is the API's 400."""

    # A JSON body or none; a form or multipart body is a 415 (the fuzzer found an empty
    # multipart body read as "no options", which applied a rollback).
    parser_classes = [JSONParser]
    input_class: type[serializers.Serializer] = serializers.Serializer

    def read_input(self, request: Request) -> tuple[dict[str, Any] | None, Response | None]:
        rid = request_id(request)
        payload, malformed = request_body(request, rid)
        if malformed is not None:
            return None, malformed
        if not hasattr(payload, "keys"):  # a JSON list, string or number
            return None, invalid({"body": ["Expected a JSON object."]}, rid)
        form = self.input_class(data=payload)
        if not form.is_valid():
            return None, invalid(form.errors, rid)
        return dict(form.validated_data), None


def _transition(action: str, transition: registry.Transition) -> Response:
    return Response(
        TransitionOutput(
            {
                "action": action,
                "model_version": transition.version.version,
                "replaced": transition.replaced.version if transition.replaced else None,
                "audit_id": transition.audit.pk,
                "gates": [r.to_dict() for r in transition.results],
            }
        ).data
    )


def _refused(exc: registry.ModelActionRefused) -> Response:
    return Response(
        RefusedOutput(
            {
                "error": "refused",
                "detail": "; ".join(exc.reasons),
                "reasons": exc.reasons,
                "gates": [r.to_dict() for r in exc.results],
            }
        ).data,
        status=409,
    )


def _served(response: Response) -> dict[str, Any]:
    data = getattr(response, "data", None)
    ok = response.status_code < 400 and isinstance(data, dict)
    return {"model_version": data.get("model_version") if ok else None}


class PromoteView(_BodyMixin, AdminAPIView):
    """POST /api/v1/admin/models/<version>/promote: make a version the primary, through every
    gate (staff with `registry.change_modelversion`)."""

    required_permission = MODEL_PERMISSION
    audit_action = "model_promote"
    endpoint = "admin_promote"
    input_class = PromoteInput

    @extend_schema(
        operation_id="admin_models_promote",
        summary="Promote a model version to primary through every gate (staff only)",
        parameters=[
            OpenApiParameter(
                "version",
                OpenApiTypes.STR,
                OpenApiParameter.PATH,
                description="The version name (ModelVersion.version, at most 64 characters).",
            )
        ],
        request=PromoteInput,
        responses={
            200: TransitionOutput,
            400: BAD_REQUEST,
            404: NOT_FOUND,
            409: REFUSED,
            **ADMIN_ERRORS,
            **BODY_ERRORS,
        },
    )
    def post(self, request: Request, version: str) -> Response:
        data, error = self.read_input(request)
        if error is not None:
            return error
        assert data is not None
        version_id = (
            ModelVersion.objects.filter(version=version).values_list("pk", flat=True).first()
            if len(version) <= MAX_VERSION
            else None
        )
        if version_id is None:
            raise NotFound(f"No model version named {version[:MAX_VERSION]!r}.")
        try:
            transition = registry.model_version_promote(
                version_id=version_id,
                actor=_actor(request),
                address=client_address(request),
                reason=data.get("reason") or "promoted through the admin API",
            )
        except registry.ModelActionRefused as exc:
            return _refused(exc)
        return _transition("promote", transition)

    def audit_details(self, response: Response) -> dict[str, Any]:
        version = self.kwargs.get("version", "")
        return {"version": version[:MAX_VERSION], **_served(response)}


class RollbackView(_BodyMixin, AdminAPIView):
    """POST /api/v1/admin/models/rollback: archive the primary and restore the previous one
    (staff with `registry.change_modelversion`)."""

    required_permission = MODEL_PERMISSION
    audit_action = "model_rollback"
    endpoint = "admin_rollback"
    input_class = RollbackInput

    @extend_schema(
        operation_id="admin_models_rollback",
        summary="Roll the primary back to the previous one (staff only)",
        request=RollbackInput,
        responses={
            200: TransitionOutput,
            400: BAD_REQUEST,
            409: REFUSED,
            **ADMIN_ERRORS,
            **BODY_ERRORS,
        },
    )
    def post(self, request: Request) -> Response:
        data, error = self.read_input(request)
        if error is not None:
            return error
        assert data is not None
        expected_id: int | None = None
        expected = data.get("expected_primary")
        if expected:
            # An unknown name can never be the primary: -1 makes the service refuse (409).
            expected_id = (
                ModelVersion.objects.filter(version=expected).values_list("pk", flat=True).first()
                or -1
            )
        try:
            transition = registry.model_version_rollback(
                actor=_actor(request),
                address=client_address(request),
                reason=data.get("reason") or "rolled back through the admin API",
                expected_primary_id=expected_id,
            )
        except registry.ModelActionRefused as exc:
            return _refused(exc)
        return _transition("rollback", transition)

    def audit_details(self, response: Response) -> dict[str, Any]:
        return _served(response)


class RetrainView(_BodyMixin, AdminAPIView):
    """POST /api/v1/admin/pipeline/retrain: queue a full pipeline run (extract ... train), as
    the admin's "Run pipeline now" does (staff with `pipeline.change_pipelinerun`)."""

    required_permission = PIPELINE_PERMISSION
    audit_action = "pipeline_retrain"
    endpoint = "admin_retrain"
    input_class = RetrainInput

    @extend_schema(
        operation_id="admin_pipeline_retrain",
        summary="Queue a full pipeline run: extract, clean, train (staff only)",
        request=None,
        responses={
            202: RetrainOutput,
            400: BAD_REQUEST,
            409: RUN_ACTIVE,
            **ADMIN_ERRORS,
            **BODY_ERRORS,
        },
    )
    def post(self, request: Request) -> Response:
        _, error = self.read_input(request)
        if error is not None:
            return error
        # The atomic trigger: a second retrain while one is pending or running queues nothing.
        run = pipeline.pipeline_run_trigger(
            kind=RETRAIN_KIND, triggered_by=f"api:{_actor(request)}"
        )
        if run is None:
            active = pipeline.pipeline_run_active(kind=RETRAIN_KIND)
            body = {
                "error": "run_active",
                "detail": f"a {RETRAIN_KIND} pipeline run is already pending or running",
                "run_id": active.pk if active else None,
            }
            return Response(RunActiveOutput(body).data, status=409)
        # Never train inside the request: on the broker, or a background thread without one.
        how = pipeline_tasks.enqueue_pipeline_run(run.pk)
        body = {"run_id": run.pk, "kind": run.kind, "status": run.status, "queued": how}
        return Response(RetrainOutput(body).data, status=202)

    def audit_details(self, response: Response) -> dict[str, Any]:
        data = getattr(response, "data", None)
        ok = response.status_code < 400 and isinstance(data, dict)
        return {"run_id": data.get("run_id") if ok else None}
