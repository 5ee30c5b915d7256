"""Validate config/sources.yaml against the live source databases."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from apps.pipeline import services
from apps.pipeline.sources.contract import ContractError


class Command(BaseCommand):
    help = "Check the source contract against the business and Matomo databases."

    def handle(self, *args, **opts):
        try:
            lines = services.sources_check()
        except ContractError as exc:
            raise CommandError(str(exc)) from None
        for line in lines:
            self.stdout.write(line)
        self.stdout.write(self.style.SUCCESS("source contract OK"))
