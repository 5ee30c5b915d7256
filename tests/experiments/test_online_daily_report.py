"""The daily online report end to end: clean interactions on disk, the service, the JSON file, the
before/after comparison, the daily task's recomputation and the HTML page in the admin.

The logs and interactions are those of ``test_online_attribution`` (window 2026-01-10 UTC), whose
answers are worked out there by hand; here the question is whether they reach the report, the
file and the pages intact.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from django.urls import reverse

from apps.experiments import services, tasks
from apps.experiments.models import OnlineEvaluationReport
from apps.models.choices import ModelStatus
from apps.models.models import ModelVersion
from tests.experiments.test_online_attribution import INTERACTIONS, t, write_logs

pytestmark = pytest.mark.django_db

DAY = date(2026, 1, 10)
LATER = datetime(2026, 1, 12, 6, tzinfo=UTC)


@pytest.fixture
def data_dir(tmp_path, settings) -> Path:
    """A private DATA_DIR with the attribution logs as the exposure log and the hand-made
    interactions as the clean frame (written now, long after the 10th's window closed)."""
    settings.DATA_DIR = tmp_path / "data"
    log = write_logs(tmp_path / "data" / "exposures")
    settings.RECO = {**settings.RECO, "EXPOSURE_LOG": str(log)}
    clean = tmp_path / "data" / "clean"
    clean.mkdir(parents=True)
    INTERACTIONS.to_parquet(clean / "interactions.parquet")
    return tmp_path / "data"


def set_clean_time(data_dir: Path, when: datetime) -> None:
    stamp = when.timestamp()
    os.utime(data_dir / "clean" / "interactions.parquet", (stamp, stamp))


def compute(day: date = DAY, **kwargs) -> OnlineEvaluationReport:
    return services.online_report_compute(day=day, now=kwargs.pop("now", LATER), **kwargs)


def test_the_report_stores_attributed_totals_and_every_dimension(data_dir):
    report = compute()
    attributed = report.results["totals"]["attributed"]["counts"]
    # hand-computed in test_online_attribution: 3 clicks, 3 purchases worth 15 + 100
    assert (attributed["impressions"], attributed["clicks"], attributed["purchases"]) == (7, 3, 3)
    assert attributed["gmv"] == 115.0
    positions = report.results["breakdown"]["attributed"]["position"]
    assert list(positions) == ["1", "2", "3", "4-5", "6-10", "11+"]
    assert positions["6-10"]["counts"]["gmv"] == 100.0
    assert set(report.results["breakdown"]["attributed"]) == {
        "day",
        "scene",
        "channel",
        "position",
        "variant",
        "model_version",
    }
    # the feedback basis keeps its old place for the experiment results
    assert report.results["by_variant"]["exp:b"]["counts"]["purchases"] == 1
    assert report.summary["attribution"]["credited_total"] == 7
    assert report.summary["attribution"]["window_hours"] == 24.0


def test_the_report_is_written_as_json_under_data_dir_evaluation(data_dir):
    report = compute(triggered_by="test")
    path = data_dir / "evaluation" / "online-2026-01-10.json"
    data = json.loads(path.read_text())
    assert data["date"] == "2026-01-10"
    assert data["triggered_by"] == "test"
    assert data["results"] == json.loads(json.dumps(report.results))
    assert data["summary"]["attribution"]["credited"] == {
        "add_to_cart": 1,
        "click": 3,
        "purchase": 3,
    }
    # no temporary file is left beside it
    assert [p.name for p in path.parent.iterdir()] == ["online-2026-01-10.json"]


def test_the_attribution_window_comes_from_the_settings(data_dir, settings):
    settings.RECO = {**settings.RECO, "ONLINE_ATTRIBUTION_HOURS": 2}
    report = compute()
    # within 2 h only i1, i2, i8, i9 (see test_a_shorter_window_credits_less)
    attributed = report.results["totals"]["attributed"]["counts"]
    assert (attributed["clicks"], attributed["purchases"], attributed["gmv"]) == (2, 2, 115.0)
    assert report.summary["attribution"]["window_hours"] == 2.0
    settings.RECO = {**settings.RECO, "ONLINE_ATTRIBUTION_HOURS": 0}
    with pytest.raises(services.ExperimentError, match="ONLINE_ATTRIBUTION_HOURS"):
        compute()


def test_a_report_is_complete_only_once_the_clean_data_covers_the_window(data_dir):
    # Given the clean stage last ran before the 10th's window (up to the 12th 00:00) closed
    set_clean_time(data_dir, t(11, 23))
    report = compute()
    assert report.summary["attribution"]["complete"] is False
    assert report.summary["attribution"]["complete_after"] == "2026-01-12T00:00:00+00:00"
    # When it has run since
    set_clean_time(data_dir, t(12, 1))
    assert compute().summary["attribution"]["complete"] is True


def test_without_clean_data_the_report_still_counts_exposures_and_feedback(data_dir):
    (data_dir / "clean" / "interactions.parquet").unlink()
    report = compute()
    assert report.results["totals"]["attributed"]["counts"]["impressions"] == 7
    assert report.results["totals"]["attributed"]["counts"]["clicks"] == 0
    assert report.results["totals"]["feedback"]["counts"]["clicks"] == 1
    assert report.summary["attribution"]["interactions_as_of"] is None
    assert report.summary["attribution"]["complete"] is False


def test_the_report_compares_before_and_after_the_primary_was_promoted(data_dir, settings):
    # Given v2 promoted at 12:00 on the 10th and a 6-hour comparison
    settings.RECO = {**settings.RECO, "ONLINE_PROMOTION_WINDOW_DAYS": 0.25}
    ModelVersion.objects.create(
        version="v2", status=ModelStatus.PRIMARY, bundle_path="/nowhere", promoted_at=t(10, 12)
    )
    # When the day is computed two days later
    promotion = compute().results["promotion"]
    # Then the windows are [06:00, 12:00) and [12:00, 18:00), as in test_online_attribution
    assert (promotion["status"], promotion["model_version"], promotion["hours"]) == (
        "ready",
        "v2",
        6.0,
    )
    before = promotion["before"]["totals"]["attributed"]["counts"]
    after = promotion["after"]["totals"]["attributed"]["counts"]
    assert (before["impressions"], before["clicks"]) == (4, 2)
    assert (after["impressions"], after["purchases"], after["gmv"]) == (2, 1, 15.0)
    assert promotion["difference"]["attributed"]["ctr"]["value"] == pytest.approx(-0.5)


def test_a_comparison_over_its_full_span_is_reused_not_read_again(data_dir, settings):
    # Given a 6-hour comparison that already has its full span (18 hours were available)
    settings.RECO = {**settings.RECO, "ONLINE_PROMOTION_WINDOW_DAYS": 0.25}
    ModelVersion.objects.create(
        version="v2", status=ModelStatus.PRIMARY, bundle_path="/nowhere", promoted_at=t(10, 12)
    )
    first = compute().results["promotion"]
    # When the logs are gone and another day is computed
    (data_dir / "exposures" / "exposures.jsonl").unlink()
    report = compute(date(2026, 1, 11))
    # Then the day has nothing, but the comparison is the stored one
    assert report.results["totals"]["attributed"]["counts"]["impressions"] == 0
    assert report.results["promotion"] == first
    assert first["after"]["totals"]["attributed"]["counts"]["gmv"] == 15.0


def test_without_a_promoted_primary_there_is_no_comparison(data_dir):
    assert compute().results["promotion"] is None


def test_the_daily_run_recomputes_earlier_days_whose_window_was_open(data_dir):
    # Given the 10th computed at 06:00 on the 11th, before the clean data covered its window
    set_clean_time(data_dir, t(11, 5))
    first = compute(now=t(11, 6))
    assert first.summary["attribution"]["complete"] is False
    # When the daily run of the 12th computes the 11th, the clean stage having run since
    set_clean_time(data_dir, t(12, 0, 10))
    report, recomputed = services.online_report_daily(now=t(12, 0, 20))
    # Then the 10th is recomputed in place, now complete, with i3 left to the 11th
    assert report.date == date(2026, 1, 11)
    assert [r.date for r in recomputed] == [DAY]
    again = OnlineEvaluationReport.objects.get(date=DAY)
    assert again.pk == first.pk
    assert again.summary["attribution"]["complete"] is True
    assert again.results["totals"]["attributed"]["counts"]["purchases"] == 3
    assert report.results["totals"]["attributed"]["counts"]["purchases"] == 1  # i3 on r4
    # and a second run does not recompute what is now complete
    assert services.online_report_daily(now=t(12, 0, 30))[1] == []


def test_the_task_reports_what_it_recomputed(data_dir, monkeypatch):
    calls = []

    def daily(**kwargs):
        calls.append(kwargs)
        return compute(), [compute(date(2026, 1, 9))]

    monkeypatch.setattr(services, "online_report_daily", daily)
    result = tasks.online_report_compute_task.delay().get()
    assert calls == [{"triggered_by": "beat"}]
    assert (result["date"], result["recomputed"]) == ("2026-01-10", ["2026-01-09"])


# --- admin pages --------------------------------------------------------------------------------


def test_the_daily_report_page_shows_the_dimensions_charts_and_comparison(admin_client, data_dir):
    ModelVersion.objects.create(
        version="v2", status=ModelStatus.PRIMARY, bundle_path="/nowhere", promoted_at=t(10, 12)
    )
    report = compute()
    url = reverse("admin:experiments_onlineevaluationreport_report", args=[report.pk])
    page = admin_client.get(url)
    assert page.status_code == 200
    html = page.content.decode()
    assert "Online evaluation of 2026-01-10" in html
    # totals: attributed CTR 3/7 = 42.86%, GMV 115.00
    assert "42.86%" in html
    assert "115.00" in html
    # every dimension, with position buckets in rank order
    for dimension in ("day", "scene", "channel", "position", "variant", "model_version"):
        assert f'id="dimension-{dimension}"' in html
    section = html[html.index('id="dimension-position"') : html.index('id="dimension-variant"')]
    order = [section.index(f'data-group="{b}"') for b in ("1", "2", "3", "4-5", "6-10", "11+")]
    assert order == sorted(order)
    # inline SVG charts, and nothing fetched from elsewhere
    assert html.count("<svg") >= 7
    assert "cdn" not in html.lower()
    assert 'src="http' not in html
    # the comparison around v2's promotion: 18 hours on each side (the after side ends 24 h
    # before now, so its exposures have had their whole window)
    assert 'id="promotion"' in html
    assert "v2 was promoted at" in html
    assert "18.0 hours on each side" in html
    # the accounting of the interactions
    assert 'id="interactions-credited">7' in html


def test_a_report_page_for_an_old_report_without_breakdown_says_to_recompute(admin_client):
    old = OnlineEvaluationReport.objects.create(
        date=DAY,
        window_start=t(10, 0),
        window_end=t(11, 0),
        computed_at=t(11, 1),
        results={"by_variant": {}, "by_model_version": {}},
        summary={},
    )
    html = admin_client.get(
        reverse("admin:experiments_onlineevaluationreport_report", args=[old.pk])
    ).content.decode()
    assert 'id="no-breakdown"' in html
    assert "online_report --date 2026-01-10" in html


def test_the_json_view_serves_the_written_file(admin_client, data_dir):
    report = compute()
    response = admin_client.get(
        reverse("admin:experiments_onlineevaluationreport_json", args=[report.pk])
    )
    assert response.status_code == 200
    data = json.loads(b"".join(response.streaming_content))
    assert data["results"]["totals"]["attributed"]["counts"]["gmv"] == 115.0
    (data_dir / "evaluation" / "online-2026-01-10.json").unlink()
    missing = admin_client.get(
        reverse("admin:experiments_onlineevaluationreport_json", args=[report.pk])
    )
    assert missing.status_code == 404


def test_the_report_list_change_page_and_dashboard_link_to_the_daily_report(admin_client, data_dir):
    report = compute()
    url = reverse("admin:experiments_onlineevaluationreport_report", args=[report.pk])
    listing = admin_client.get(
        reverse("admin:experiments_onlineevaluationreport_changelist")
    ).content.decode()
    assert url in listing
    assert "42.86%" in listing  # the attributed CTR column
    change = admin_client.get(
        reverse("admin:experiments_onlineevaluationreport_change", args=[report.pk])
    ).content.decode()
    assert 'id="daily-report-link"' in change
    assert url in change
    assert "7 of 11 interactions credited" in change
    dashboard = admin_client.get("/admin/dashboard/").content.decode()
    assert f'href="{url}" id="online-daily-report"' in dashboard


def test_the_daily_report_page_is_for_staff_only(client, data_dir):
    report = compute()
    url = reverse("admin:experiments_onlineevaluationreport_report", args=[report.pk])
    response = client.get(url)
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_the_experiment_results_show_the_attributed_outcomes_per_variant(admin_client, data_dir):
    experiment = services.experiment_create(
        name="exp",
        scene="for_you",
        variants=[{"name": "a", "allocation": 5000}, {"name": "b", "allocation": 5000}],
        starts_at=datetime(2026, 1, 9, tzinfo=UTC),
    )
    compute()
    html = admin_client.get(
        reverse("admin:experiments_experiment_results", args=[experiment.pk])
    ).content.decode()
    section = html[html.index('id="results-attributed"') :]
    # exp:a attributed: 3 shown, 2 clicked (66.67%); exp:b: 2 shown, 1 bought for 15
    assert "66.67%" in section
    assert "15.00" in section
