"""Export experiments as YAML (to stdout, or a file) in the format experiments_import reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.experiments.selectors import experiments_with_variants
from apps.experiments.yaml_io import dump_experiments_yaml


class Command(BaseCommand):
    help = "Write experiments (all, or those named) as YAML."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("names", nargs="*", help="experiment names (default: all)")
        parser.add_argument("--output", "-o", type=Path, help="write to this file, not stdout")

    def handle(self, *args: Any, **options: Any) -> None:
        names: list[str] = options["names"]
        experiments = list(experiments_with_variants(names or None))
        missing = sorted(set(names) - {e.name for e in experiments})
        if missing:
            raise CommandError(f"no such experiment: {', '.join(missing)}")
        text = dump_experiments_yaml(experiments)
        output: Path | None = options["output"]
        if output is None:
            self.stdout.write(text, ending="")
            return
        output.write_text(text, encoding="utf-8")
        self.stdout.write(f"wrote {len(experiments)} experiment(s) to {output}")
