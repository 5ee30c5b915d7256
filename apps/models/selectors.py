"""Registry reads: which versions serve traffic now, and what a rollback would restore."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet

from apps.models.choices import ModelStatus
from apps.models.models import ModelAudit, ModelVersion


def model_version_primary() -> ModelVersion | None:
    """The version serving all traffic not sent to a canary, if any."""
    return ModelVersion.objects.filter(status=ModelStatus.PRIMARY).first()


def model_version_canary() -> ModelVersion | None:
    """The version serving ``traffic_share`` of users, if any."""
    return ModelVersion.objects.filter(status=ModelStatus.CANARY).first()


def model_version_shadow() -> ModelVersion | None:
    """The version scoring a sample in the background, if any."""
    return ModelVersion.objects.filter(status=ModelStatus.SHADOW).first()


def model_version_rollback_target() -> ModelVersion | None:
    """The most recently archived version that was once primary (what a rollback restores).

    Rejected versions are never restored: rejecting an archived version takes it out of the
    rollback chain.
    """
    return (
        ModelVersion.objects.filter(status=ModelStatus.ARCHIVED, promoted_at__isnull=False)
        .order_by("-archived_at", "-promoted_at", "-id")
        .first()
    )


def model_version_serving_state() -> dict[str, Any]:
    """What serving workers load: version, bundle and share of the primary, canary and shadow.

    One query; the result is plain data that a worker can compare with its snapshot.
    """
    live = ModelVersion.objects.filter(
        status__in=[ModelStatus.PRIMARY, ModelStatus.CANARY, ModelStatus.SHADOW]
    ).values("id", "version", "status", "bundle_path", "traffic_share", "promoted_at")
    state: dict[str, Any] = {"primary": None, "canary": None, "shadow": None}
    for row in live:
        state[row.pop("status")] = row
    return state


def model_version_servable(versions: list[str]) -> dict[str, dict[str, Any]]:
    """Versions an experiment variant may pin, by name: any registered version that has not
    been rejected (a pinned name that is unknown or rejected serves the normal routing)."""
    rows = (
        ModelVersion.objects.filter(version__in=versions)
        .exclude(status=ModelStatus.REJECTED)
        .values("id", "version", "bundle_path", "traffic_share")
    )
    return {row["version"]: row for row in rows}


def model_audit_for_version(*, version_id: int) -> QuerySet[ModelAudit]:
    """The audit trail of one version, newest first."""
    return ModelAudit.objects.filter(model_version_id=version_id).order_by("-created_at", "-id")
