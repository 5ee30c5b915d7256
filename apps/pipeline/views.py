"""Staff-only views of pipeline artefacts."""

from __future__ import annotations

from pathlib import Path

from django.contrib.admin.views.decorators import staff_member_required
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render

from apps.pipeline.models import DataQualityReport


def _report_file(path: str) -> Path:
    file = Path(path)
    if not path or not file.is_file():
        raise Http404("The report file is missing; re-run the quality stage.")
    return file


@staff_member_required
def quality_report_html(request: HttpRequest, pk: int) -> HttpResponse:
    """The rendered HTML quality report, as written by the quality stage."""
    report = get_object_or_404(DataQualityReport, pk=pk)
    return FileResponse(_report_file(report.html_path).open("rb"), content_type="text/html")


@staff_member_required
def quality_report_json(request: HttpRequest, pk: int) -> HttpResponse:
    """The quality report as JSON."""
    report = get_object_or_404(DataQualityReport, pk=pk)
    return FileResponse(_report_file(report.json_path).open("rb"), content_type="application/json")


@staff_member_required
def feature_catalogue(request: HttpRequest) -> HttpResponse:
    """Every feature the ranker sees: name, entity, definition, type (generated from code)."""
    from apps.pipeline.features import catalogue

    return render(
        request,
        "pipeline/feature_catalogue.html",
        {"features": catalogue(), "title": "Feature catalogue", "site_header": "recoplatform"},
    )
