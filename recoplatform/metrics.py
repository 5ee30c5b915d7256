"""The /metrics endpoint, correct under a multi-process server.

django-prometheus's own view builds a fresh registry in multi-process mode and so drops every
custom collector; this view adds the platform's collectors (which read the database at
scrape time) to the aggregated per-process metrics.
"""

from __future__ import annotations

import os

from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)

from apps.pipeline.metrics import PipelineCollector


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text exposition of every metric of this deployment."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(PipelineCollector())
    else:
        registry = REGISTRY  # PipelineCollector is registered on it at start-up
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
