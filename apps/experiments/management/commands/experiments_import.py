"""Import experiments from a YAML file (default: config/experiments.yaml); idempotent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.experiments.services import ExperimentError, experiments_import


def default_path() -> Path:
    return Path(settings.BASE_DIR) / "config" / "experiments.yaml"


class Command(BaseCommand):
    help = "Make the experiments match a YAML file; every problem is reported before any write."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", nargs="?", type=Path, help="default: config/experiments.yaml")
        parser.add_argument("--dry-run", action="store_true", help="report, write nothing")

    def handle(self, *args: Any, **options: Any) -> None:
        path: Path = options["path"] or default_path()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc}") from exc
        try:
            report = experiments_import(text=text, dry_run=options["dry_run"])
        except ExperimentError as exc:
            problems = "\n".join(f"  - {p}" for p in exc.problems)
            raise CommandError(f"{path}: {len(exc.problems)} problem(s):\n{problems}") from exc
        prefix = "dry run: would have " if options["dry_run"] else ""
        self.stdout.write(
            f"{prefix}created {len(report.created)}, updated {len(report.updated)}, "
            f"unchanged {len(report.unchanged)}"
            + (f" (config version {report.version})" if report.version is not None else "")
        )
        for label, names in (("created", report.created), ("updated", report.updated)):
            for name in names:
                self.stdout.write(f"  {label}: {name}")
