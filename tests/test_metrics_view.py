"""/metrics under a multi-process server still exports the platform's own collectors."""

from __future__ import annotations

import pytest

from apps.pipeline.models import DataQualityReport

pytestmark = pytest.mark.django_db


def test_multiprocess_metrics_include_the_quality_score(client, monkeypatch, tmp_path):
    # Given a quality report and a server running in Prometheus multi-process mode
    DataQualityReport.objects.create(score=93.5, threshold=90.0, passed=True)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    # When Prometheus scrapes
    body = client.get("/metrics").content.decode()
    # Then the database-backed gauge is there (django-prometheus's own view would drop it)
    assert "recoplatform_data_quality_score 93.5" in body


def test_single_process_metrics_include_process_metrics_and_the_quality_score(client):
    DataQualityReport.objects.create(score=88.0, threshold=90.0, passed=False)
    body = client.get("/metrics").content.decode()
    assert "python_info" in body
    assert "recoplatform_data_quality_passed 0.0" in body
