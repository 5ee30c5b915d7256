"""Run every pipeline stage once, in order, with a progress bar per stage."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from apps.pipeline import services
from apps.pipeline.management.commands._progress import StageProgress
from apps.pipeline.models import RunStatus


class Command(BaseCommand):
    help = "Run the offline pipeline (extract business + Matomo, canonicalize, quality, clean)."

    def add_arguments(self, parser):
        parser.add_argument("--kind", default="incremental", help="label stored on the run")
        parser.add_argument("--triggered-by", default="command")
        parser.add_argument("--no-progress", action="store_true", help="hide progress bars")

    def handle(self, *args, **opts):
        run = services.pipeline_run_create(kind=opts["kind"], triggered_by=opts["triggered_by"])
        progress = StageProgress(disable=opts["no_progress"])
        try:
            run = services.pipeline_run_execute(run_id=run.pk, on_stage=progress)
        finally:
            progress.close()
        for stage in run.stages.order_by("id"):
            seconds = (stage.detail or {}).get("seconds", 0)
            line = f"{stage.stage:<17} {stage.status:<9} in={stage.rows_in:>10,} out={stage.rows_out:>10,} {seconds:>7.2f}s"
            if stage.stage == "quality" and stage.detail.get("score") is not None:
                line += f"  score={stage.detail['score']}"
            self.stdout.write(line)
        if run.status != RunStatus.SUCCEEDED:
            raise CommandError(f"pipeline run #{run.pk} failed: {run.error}")
        self.stdout.write(self.style.SUCCESS(f"pipeline run #{run.pk} succeeded"))
