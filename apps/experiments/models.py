"""Experiment records: experiments, their variants, and the serving config version.

These rows hold no logic. ``services.py`` changes lifecycle fields and bumps
``ConfigVersion`` on every change, so serving workers notice within one poll.
"""

from __future__ import annotations

from django.core.validators import MaxValueValidator
from django.db import models
from django.db.models import F, Q

from apps.experiments.bucketing import BUCKETS
from apps.experiments.choices import ExperimentStatus, Scene


class Experiment(models.Model):
    """An A/B test on one scene: units (users or visitors) are bucketed by ``salt`` into variants.

    ``starts_at``/``ends_at`` bound when a running experiment is served; ``starts_at`` is set
    when it is first started if empty. ``salt`` defaults to the name and is fixed once the
    experiment has left draft: changing it would reshuffle every unit.
    """

    name = models.SlugField(max_length=64, unique=True)
    scene = models.CharField(max_length=16, choices=Scene.choices, db_index=True)
    status = models.CharField(
        max_length=16,
        choices=ExperimentStatus.choices,
        default=ExperimentStatus.DRAFT,
        db_index=True,
    )
    salt = models.CharField(
        max_length=64, help_text="Bucketing salt; changing it reshuffles every unit."
    )
    starts_at = models.DateTimeField(null=True, blank=True)
    ends_at = models.DateTimeField(null=True, blank=True)
    description = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            # Partial unique index (SQLite, PostgreSQL); on MySQL/MariaDB Django skips it
            # (models.W036) and the services' row locks are the only guard.
            models.UniqueConstraint(
                fields=["scene"],
                condition=Q(status=ExperimentStatus.RUNNING),
                name="experiments_one_running_per_scene",
            ),
            models.CheckConstraint(
                condition=Q(starts_at__isnull=True)
                | Q(ends_at__isnull=True)
                | Q(ends_at__gt=F("starts_at")),
                name="experiments_ends_after_start",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.status})"


class Variant(models.Model):
    """One arm of an experiment: its share of units and the serving parameters it overrides.

    ``allocation`` is in basis points (2500 = 25%); variants take consecutive bucket ranges in
    ``(position, name)`` order, and units beyond the total are not in the experiment.
    ``params`` is validated by ``apps.experiments.params`` (channel weights, ranker, model
    version, diversity).
    """

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="variants")
    name = models.SlugField(max_length=64)
    position = models.PositiveSmallIntegerField(
        default=0, help_text="Bucket ranges follow this order; reordering reshuffles units."
    )
    allocation = models.PositiveSmallIntegerField(
        validators=[MaxValueValidator(BUCKETS)], help_text="Basis points: 2500 = 25%."
    )
    params = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["experiment", "position", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["experiment", "name"], name="experiments_variant_name_unique"
            ),
            models.CheckConstraint(
                condition=Q(allocation__lte=BUCKETS), name="experiments_allocation_0_10000"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.allocation / 100:g}%)"


class ConfigVersion(models.Model):
    """A single row (pk=1) whose counter grows on every experiment change.

    Serving polls it by primary key (one indexed read) and rebuilds its snapshot when it moves.
    """

    version = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"experiments config v{self.version}"


class OnlineEvaluationReport(models.Model):
    """One UTC day of online evaluation: exposures joined to client feedback and to the clean
    interactions attributed by last touch (``apps.experiments.attribution``).

    ``results`` holds ``by_variant`` and ``by_model_version`` (the feedback basis, each
    ``{label: {"counts", "metrics"}}``), ``totals`` and ``breakdown`` (per basis
    ``feedback``/``attributed``, and per dimension: day, scene, channel, position, variant,
    model version) and ``promotion`` (before/after the primary's promotion, or None); counts
    add across days, so an experiment's whole run sums its daily reports. ``summary`` holds the
    join's leftovers (unmatched feedback), the attribution's accounting and whether its window
    had closed, and which log files were read. A report is recomputed in place (one row per
    day), e.g. by "compute now" while the day is still running; the same content is written to
    DATA_DIR/evaluation/online-<date>.json.
    """

    date = models.DateField(unique=True)
    window_start = models.DateTimeField()
    window_end = models.DateTimeField(
        help_text="End of the exposures read: the day's end, or when it was computed."
    )
    computed_at = models.DateTimeField()
    results = models.JSONField(default=dict, blank=True)
    summary = models.JSONField(default=dict, blank=True)
    seconds = models.FloatField(default=0.0)
    triggered_by = models.CharField(max_length=64, default="beat")

    class Meta:
        ordering = ["-date"]

    def __str__(self) -> str:
        return f"Online evaluation {self.date.isoformat()}"
