"""Republish the primary bundle to Redis without retraining (after a Redis outage or flush)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from apps.pipeline import services


class Command(BaseCommand):
    help = "Publish the current primary model's lists and features to Redis (no training)."

    def handle(self, *args, **opts):
        try:
            outcome = services.primary_sync_to_redis()
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"version {outcome['version']}")
        self.stdout.write(f"lists:    {outcome['lists']}")
        self.stdout.write(f"features: {outcome['features']}")
        if outcome["lists"].startswith("failed"):
            raise CommandError(f"publishing failed: {outcome['lists']}")
