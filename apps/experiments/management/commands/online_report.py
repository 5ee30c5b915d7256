"""Compute and store one day's online evaluation: exposures joined to client feedback and to the
clean interactions (last touch), by day, scene, channel, position, variant and model version."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from apps.experiments.services import (
    ExperimentError,
    online_report_compute,
    online_report_json_path,
)


def _day(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise CommandError(f"--date must be a date as YYYY-MM-DD, not {value!r}") from None


class Command(BaseCommand):
    help = (
        "Compute the online evaluation of one UTC day (default: yesterday): store it and write "
        "DATA_DIR/evaluation/online-<date>.json."
    )

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
        attributed = (report.results.get("totals") or {}).get("attributed")
        found = report.summary.get("attribution") or {}
        if attributed:
            counts = attributed["counts"]
            state = "complete" if found.get("complete") else "open"
            self.stdout.write(
                f"attributed (last touch within {found.get('window_hours', 0):g} h, {state}): "
                f"{found.get('credited_total', 0)} of {found.get('interactions', 0)} interactions "
                f"credited, {counts['clicks']} clicks, {counts['purchases']} purchases, "
                f"GMV {counts['gmv']:.2f}"
            )
        self.stdout.write(f"JSON: {online_report_json_path(day)}")
        for label, group in sorted(variants.items()):
            counts, ctr = group["counts"], group["metrics"]["ctr"]
            rate = f"{ctr['value']:.4f}" if ctr else "-"
            self.stdout.write(
                f"  {label}: {counts['requests']} requests, {counts['impressions']} shown, "
                f"{counts['clicks']} clicks, {counts['purchases']} purchases, ctr {rate}"
            )
