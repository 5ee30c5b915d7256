"""Run one pipeline stage on its own, with a progress bar."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from apps.pipeline import services
from apps.pipeline.management.commands._progress import StageProgress
from apps.pipeline.models import RunStatus


class Command(BaseCommand):
    help = "Run one pipeline stage: " + ", ".join(services.STAGES)

    def add_arguments(self, parser):
        parser.add_argument("stage", choices=list(services.STAGES))
        parser.add_argument("--no-progress", action="store_true")

    def handle(self, *args, **opts):
        progress = StageProgress(disable=opts["no_progress"])
        try:
            stage_run = services.stage_run_execute(
                stage=opts["stage"], progress=progress(opts["stage"])
            )
        finally:
            progress.close()
        if stage_run.status == RunStatus.FAILED:
            raise CommandError(f"stage {stage_run.stage} failed: {stage_run.error.splitlines()[0]}")
        self.stdout.write(
            self.style.SUCCESS(
                f"{stage_run.stage} {stage_run.status}: in={stage_run.rows_in:,} out={stage_run.rows_out:,} "
                f"({stage_run.detail.get('seconds', 0):.2f}s)"
            )
        )
