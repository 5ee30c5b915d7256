"""Enumerations of experiments: the scenes they run on and their lifecycle statuses."""

from __future__ import annotations

from django.db import models


class Scene(models.TextChoices):
    """The recommendation surface an experiment changes (one running experiment per scene)."""

    FOR_YOU = "for_you", "For you"
    SIMILAR = "similar", "Similar items"
    DETAIL = "detail", "Detail page"
    POPULAR = "popular", "Popular"


class ExperimentStatus(models.TextChoices):
    """Where an experiment is in its lifecycle.

    draft -> running <-> paused -> stopped. Only ``running`` experiments are served; a stopped
    experiment never runs again (its exposure logs would mix two periods): create a new one.
    """

    DRAFT = "draft", "Draft"
    RUNNING = "running", "Running"
    PAUSED = "paused", "Paused"
    STOPPED = "stopped", "Stopped"
