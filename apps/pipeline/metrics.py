"""Prometheus gauges of the pipeline, read from the database at scrape time.

A collector (rather than a gauge set by the quality stage) keeps the value right in every
web process and under a multi-process server: each scrape reads the latest report.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class PipelineCollector(Collector):
    """Exports the latest data-quality score and its pass/fail state."""

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Without describe(), registering calls collect() and touches the database at start-up.
        yield GaugeMetricFamily("recoplatform_data_quality_score", "")
        yield GaugeMetricFamily("recoplatform_data_quality_passed", "")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from apps.pipeline.models import DataQualityReport

        score = GaugeMetricFamily(
            "recoplatform_data_quality_score", "Latest data-quality score (0-100)."
        )
        passed = GaugeMetricFamily(
            "recoplatform_data_quality_passed",
            "1 if the latest data-quality report passes the gate.",
        )
        try:
            report = (
                DataQualityReport.objects.order_by("-created_at").only("score", "passed").first()
            )
        except Exception:  # a scrape must never fail because the database is briefly away
            report = None
        if report is not None:
            score.add_metric([], report.score)
            passed.add_metric([], 1.0 if report.passed else 0.0)
        yield score
        yield passed


_registered = False


def register_collector() -> None:
    """Register the collector once per process (Django may call ready() more than once)."""
    global _registered
    if not _registered:
        REGISTRY.register(PipelineCollector())
        _registered = True
