"""Compute and store one day's online evaluation (exposures joined to feedback, per variant)."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from apps.experiments.services import ExperimentError, online_report_compute


def _day(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise CommandError(f"--date must be a date as YYYY-MM-DD, not {value!r}") from None


class Command(BaseCommand):
    help = "Compute the online evaluation of one UTC day (default: yesterday) and store it."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--date", help="the UTC day, YYYY-MM-DD (default: yesterday)")

    def handle(self, *args: Any, **options: Any) -> None:
        raw = options["date"]
        day = _day(raw) if raw else timezone.now().date() - timedelta(days=1)
        try:
            report = online_report_compute(day=day, triggered_by="command")
        except ExperimentError as exc:
            raise CommandError(str(exc)) from None
        variants = report.results.get("by_variant", {})
        requests = sum(g["counts"]["requests"] for g in variants.values())
        feedback = report.summary.get("feedback", {})
        self.stdout.write(
            f"online report {day.isoformat()}: {requests} requests in {len(variants)} "
            f"variant(s), {feedback.get('matched', 0)} items with feedback joined, "
            f"{feedback.get('unmatched', 0)} unmatched ({report.seconds:.2f} s)"
        )
        for label, group in sorted(variants.items()):
            counts, ctr = group["counts"], group["metrics"]["ctr"]
            rate = f"{ctr['value']:.4f}" if ctr else "-"
            self.stdout.write(
                f"  {label}: {counts['requests']} requests, {counts['impressions']} shown, "
                f"{counts['clicks']} clicks, {counts['purchases']} purchases, ctr {rate}"
            )
