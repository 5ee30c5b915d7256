"""The operator dashboard at /admin/dashboard/: pipeline, models, experiments, data quality and
serving health on one page. Staff only (``admin_site.admin_view``); reads live in
``recoplatform.selectors``."""

from __future__ import annotations

import json

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse

from recoplatform.selectors import dashboard_read

KEY_METRICS = ("ndcg@10", "recall@10", "auc")


def _metric(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value:.4f}"


def dashboard_view(request: HttpRequest) -> HttpResponse:
    """Render the dashboard (wrapped in ``admin.site.admin_view`` by the URLconf)."""
    data = dashboard_read()
    models = [
        {
            "version": v,
            "traffic": "none (shadow)" if v.status == "shadow" else f"{v.traffic_share:.0%}",
            "metrics": [_metric((v.metrics or {}).get(k)) for k in KEY_METRICS],
        }
        for v in data.models
    ]
    experiments = [
        {
            "experiment": e,
            "variants": [
                (v, f"{v.allocation / 100:g}%", json.dumps(v.params, sort_keys=True))
                for v in e.variants.all()
            ],
        }
        for e in data.experiments
    ]
    health = data.health
    share = health.degraded_share
    context = {
        **admin.site.each_context(request),
        "title": "Operator dashboard",
        "data": data,
        "models": models,
        "experiments": experiments,
        "key_metrics": KEY_METRICS,
        "degraded_share": f"{share:.1%}" if share is not None else "-",
        "degraded_reasons": [(r, n, f"{s:.1%}") for r, n, s in health.reasons()],
        "latency": [
            (name, f"{value:.1f} ms")
            for name, value in (
                ("p50", health.p50_ms),
                ("p95", health.p95_ms),
                ("p99", health.p99_ms),
            )
            if value is not None
        ],
    }
    return TemplateResponse(request, "admin/dashboard.html", context)
