"""Write the pipeline's beat schedules (defined in apps/pipeline/schedules.py) to the database."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from apps.pipeline.schedules import schedules_sync


class Command(BaseCommand):
    help = (
        "Create or update the django-celery-beat entries of the pipeline (keeps enabled/disabled)."
    )

    def handle(self, *args, **opts):
        for name, what in schedules_sync().items():
            self.stdout.write(f"{what:<9} {name}")
