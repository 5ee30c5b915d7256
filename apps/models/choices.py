"""Enumerations of the model registry: lifecycle statuses, audit actions, evaluation protocols."""

from __future__ import annotations

from django.db import models


class ModelStatus(models.TextChoices):
    """Where a model version is in its lifecycle.

    candidate -> shadow / canary -> primary -> archived; any non-primary version may be
    rejected. Only ``primary`` and ``canary`` receive user traffic; ``shadow`` scores a sample
    in the background and is never shown.
    """

    CANDIDATE = "candidate", "Candidate"
    SHADOW = "shadow", "Shadow"
    CANARY = "canary", "Canary"
    PRIMARY = "primary", "Primary"
    ARCHIVED = "archived", "Archived"
    REJECTED = "rejected", "Rejected"


class AuditAction(models.TextChoices):
    """What a lifecycle service was asked to do."""

    REGISTER = "register", "Register"
    PROMOTE = "promote", "Promote to primary"
    SHADOW = "shadow", "Start shadow"
    CANARY = "canary", "Set canary"
    ROLLBACK = "rollback", "Roll back"
    REJECT = "reject", "Reject"


class AuditOutcome(models.TextChoices):
    """Whether the request changed the registry or was refused (and left it untouched)."""

    APPLIED = "applied", "Applied"
    REFUSED = "refused", "Refused"


class EvaluationProtocol(models.TextChoices):
    """How an offline evaluation split the data."""

    TIME = "time", "Time split"
    STRATIFIED = "stratified", "Stratified split"
