"""Daily online reports: the service, the command, the task, the beat entry and the admin pages.

The logs are those of ``test_online`` (window 2026-01-10 UTC), whose answers are worked out
there by hand; here the question is whether they reach the database and the screens intact.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from django.contrib import messages
from django.contrib.admin.models import LogEntry
from django.contrib.messages import get_messages
from django.core.management import CommandError, call_command
from django.urls import reverse

from apps.experiments import services, tasks
from apps.experiments.models import OnlineEvaluationReport
from apps.experiments.selectors import experiment_results
from apps.pipeline import schedules
from tests.experiments.test_online import at, exposure, feedback, write

pytestmark = pytest.mark.django_db

DAY = date(2026, 1, 10)
LATER = datetime(2026, 1, 12, 6, tzinfo=UTC)


@pytest.fixture
def log_dir(tmp_path, settings) -> Path:
    """Exposure and feedback logs of two days of experiment ``home`` (variants a, b) in a private
    DATA_DIR, with a clean catalogue that prices item 1 at 12.5."""
    settings.DATA_DIR = tmp_path / "data"
    directory = tmp_path / "data" / "exposures"
    settings.RECO = {**settings.RECO, "EXPOSURE_LOG": str(directory / "exposures.jsonl")}
    write(
        directory / "exposures.jsonl",
        [
            exposure("r1", "home:a", "v1", [1, 2, 3, 4], at(10, 8)),
            exposure("r2", "home:a", "v1", [1, 2], at(10, 9)),
            exposure("r3", "home:b", "v2", [5, 6, 7, 8, 9], at(10, 10)),
            exposure("r4", "home:b", "v2", [1, 2, 3], at(11, 11)),
            exposure("r5", "default", "v1", [1], at(11, 12)),
        ],
    )
    write(
        directory / "feedback.jsonl",
        [
            feedback("r1", "click", 1, at(10, 8, 1)),
            feedback("r1", "purchase", 1, at(10, 8, 5), value=30.0),
            feedback("r2", "purchase", 1, at(10, 9, 30)),
            feedback("r3", "click", 5, at(10, 10, 1)),
            feedback("r4", "click", 2, at(11, 11, 1)),
        ],
    )
    clean = tmp_path / "data" / "clean"
    clean.mkdir(parents=True)
    pd.DataFrame({"item_id": [1, 2], "price": [12.5, None]}).to_parquet(clean / "items.parquet")
    return directory


def compute(day: date = DAY, **kwargs) -> OnlineEvaluationReport:
    return services.online_report_compute(day=day, now=LATER, **kwargs)


# --- service ------------------------------------------------------------------------------------


def test_the_service_stores_one_report_per_day_with_counts_and_metrics(log_dir):
    report = compute(triggered_by="test")
    assert report.date == DAY
    assert report.window_start == datetime(2026, 1, 10, tzinfo=UTC)
    assert report.window_end == datetime(2026, 1, 11, tzinfo=UTC)
    a = report.results["by_variant"]["home:a"]
    # r1 + r2: 6 shown, 1 click, 2 purchases worth 30 + 12.5 (the catalogue price)
    assert {k: a["counts"][k] for k in ("requests", "impressions", "clicks", "purchases")} == {
        "requests": 2,
        "impressions": 6,
        "clicks": 1,
        "purchases": 2,
    }
    assert a["counts"]["gmv"] == 42.5
    assert a["metrics"]["ctr"]["value"] == pytest.approx(1 / 6)
    assert set(report.results["by_variant"]) == {"home:a", "home:b"}  # r4, r5 are the next day
    assert report.results["by_model_version"]["v2"]["counts"]["impressions"] == 5
    # impressions with feedback: r1 item 1 (click and purchase), r2 item 1, r3 item 5
    assert report.summary["feedback"]["matched"] == 3
    assert report.summary["feedback"]["unmatched"] == 1  # r4's click: its exposure is day 2
    assert report.triggered_by == "test"


def test_computing_a_day_twice_replaces_its_report(log_dir):
    first = compute()
    with (log_dir / "feedback.jsonl").open("a") as handle:
        handle.write(json.dumps(feedback("r3", "click", 6, at(10, 23))) + "\n")
    second = compute()
    assert second.pk == first.pk
    assert OnlineEvaluationReport.objects.count() == 1
    assert second.results["by_variant"]["home:b"]["counts"]["clicks"] == 2


def test_a_day_still_running_is_evaluated_up_to_now_and_a_future_day_is_refused(log_dir):
    now = datetime(2026, 1, 10, 9, 30, tzinfo=UTC)
    report = services.online_report_compute(day=DAY, now=now)
    assert report.window_end == now
    assert report.results["by_variant"]["home:a"]["counts"]["requests"] == 2  # r3 is later
    with pytest.raises(services.ExperimentError, match="has not started yet"):
        services.online_report_compute(day=date(2026, 1, 11), now=now)


# --- command, task, schedule --------------------------------------------------------------------


def test_the_command_computes_the_given_day_and_prints_a_summary(log_dir, capsys):
    call_command("online_report", "--date", "2026-01-10")
    out = capsys.readouterr().out
    assert (
        "online report 2026-01-10: 3 requests in 2 variant(s), 3 items with feedback joined" in out
    )
    assert "home:a: 2 requests, 6 shown, 1 clicks, 2 purchases, ctr 0.1667" in out
    assert OnlineEvaluationReport.objects.get(date=DAY).triggered_by == "command"


@pytest.mark.parametrize("bad", ["2026-13-01", "yesterday", "10/01/2026"])
def test_the_command_refuses_a_bad_date_with_one_line(bad):
    with pytest.raises(CommandError) as error:
        call_command("online_report", "--date", bad)
    assert str(error.value) == f"--date must be a date as YYYY-MM-DD, not {bad!r}"
    assert OnlineEvaluationReport.objects.count() == 0


def test_the_command_refuses_a_future_day(log_dir):
    future = (datetime.now(UTC) + timedelta(days=3)).date().isoformat()
    with pytest.raises(CommandError, match="has not started yet"):
        call_command("online_report", "--date", future)


def test_the_task_defaults_to_yesterday_and_is_safe_to_run_twice(log_dir):
    yesterday = (datetime.now(UTC) - timedelta(days=1)).date()
    first = tasks.online_report_compute_task.delay().get()
    second = tasks.online_report_compute_task.delay().get()
    assert first["date"] == second["date"] == yesterday.isoformat()
    assert OnlineEvaluationReport.objects.filter(date=yesterday).count() == 1
    assert tasks.online_report_compute_task.delay("2026-01-10").get()["date"] == "2026-01-10"


def test_the_beat_schedule_runs_the_report_daily_after_midnight():
    [entry] = [s for s in schedules.SCHEDULES if s.task == "experiments.online_report_compute"]
    assert (entry.minute, entry.hour, entry.kwargs) == ("20", "0", {})
    assert tasks.online_report_compute_task.name == entry.task


# --- selectors and admin ------------------------------------------------------------------------


@pytest.fixture
def experiment():
    home = services.experiment_create(
        name="home",
        scene="for_you",
        variants=[
            {"name": "a", "allocation": 5000},
            {"name": "b", "allocation": 2500, "params": {"channel_weights": {"ease": 2.0}}},
        ],
        starts_at=datetime(2026, 1, 9, tzinfo=UTC),
    )
    return services.experiment_start(experiment_id=home.pk)


def test_experiment_results_sum_the_daily_reports_of_the_run(log_dir, experiment):
    compute(DAY)
    compute(date(2026, 1, 11))
    results = experiment_results(experiment=experiment)
    assert results.days == 2
    assert results.latest.date == date(2026, 1, 11)
    latest = {r.name: r for r in results.latest_rows}
    total = {r.name: r for r in results.total_rows}
    # day 2 has only r4 (variant b); variant a is still listed, with nothing
    assert (latest["a"].counts.requests, latest["b"].counts.requests) == (0, 1)
    assert latest["a"].allocation == 5000
    # the run: r1..r4; b's clicks are r3 item 5 and r4 item 2
    assert (total["a"].counts.requests, total["b"].counts.requests) == (2, 2)
    assert (total["b"].counts.impressions, total["b"].counts.clicks) == (8, 2)
    assert total["b"].metrics["ctr"]["value"] == pytest.approx(2 / 8)


def test_the_results_page_shows_each_variant_with_intervals(admin_client, log_dir, experiment):
    compute()
    url = reverse("admin:experiments_experiment_results", args=[experiment.pk])
    html = admin_client.get(url).content.decode()
    assert "Online results of home" in html
    assert 'data-variant="a"' in html
    # variant a: CTR 1/6 = 16.67%, Wilson interval 3.01% to 56.35%
    assert "16.67%" in html
    assert "3.01% to 56.35%" in html
    # GMV per exposure 42.5 / 6
    assert "7.08" in html
    assert "Whole run: 1 day of reports" in html


def test_the_change_page_links_to_the_results(admin_client, experiment):
    html = admin_client.get(
        reverse("admin:experiments_experiment_change", args=[experiment.pk])
    ).content.decode()
    assert reverse("admin:experiments_experiment_results", args=[experiment.pk]) in html


def test_compute_now_stores_todays_report_logs_it_and_says_so(admin_client, log_dir, experiment):
    url = reverse("admin:experiments_experiment_results", args=[experiment.pk])
    response = admin_client.post(url)
    assert response.status_code == 302
    report = OnlineEvaluationReport.objects.get(date=datetime.now(UTC).date())
    assert report.triggered_by == "admin:admin"
    [(level, text)] = [(m.level, m.message) for m in get_messages(response.wsgi_request)]
    assert level == messages.SUCCESS
    assert text.startswith(f"Computed the online evaluation of {report.date.isoformat()}")
    entry = LogEntry.objects.get(object_id=str(report.pk))
    assert "compute now" in entry.change_message


def test_with_a_broker_compute_now_queues_the_task_instead_of_working_in_the_request(
    admin_client, settings, monkeypatch, experiment
):
    # Given a broker (tasks are not run in-process)
    settings.CELERY_TASK_ALWAYS_EAGER = False
    queued: list[tuple] = []
    monkeypatch.setattr(
        tasks.online_report_compute_task, "delay", lambda *a, **kw: queued.append((a, kw))
    )
    # When the operator clicks "Compute now"
    url = reverse("admin:experiments_experiment_results", args=[experiment.pk])
    response = admin_client.post(url)
    # Then today's report is queued, not computed, and the action is logged on the experiment
    today = datetime.now(UTC).date().isoformat()
    assert queued == [((today,), {"triggered_by": "admin:admin"})]
    assert OnlineEvaluationReport.objects.count() == 0
    [text] = [m.message for m in get_messages(response.wsgi_request)]
    assert text.startswith(f"Queued the online evaluation of {today}")
    assert LogEntry.objects.filter(
        object_id=str(experiment.pk), change_message__contains="compute now"
    ).exists()


def test_the_results_page_needs_staff(client, experiment):
    url = reverse("admin:experiments_experiment_results", args=[experiment.pk])
    response = client.get(url)
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]
    assert client.post(url).status_code == 302
    assert OnlineEvaluationReport.objects.count() == 0


def test_a_viewer_without_change_permission_sees_results_but_cannot_compute(
    client, django_user_model, experiment
):
    from django.contrib.auth.models import Permission

    viewer = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_experiment"))
    client.force_login(viewer)
    url = reverse("admin:experiments_experiment_results", args=[experiment.pk])
    page = client.get(url)
    assert page.status_code == 200
    assert 'id="compute-now"' not in page.content.decode()
    assert client.post(url).status_code == 403
    assert OnlineEvaluationReport.objects.count() == 0


def test_the_report_admin_lists_and_shows_a_report(admin_client, log_dir):
    report = compute()
    listing = admin_client.get(reverse("admin:experiments_onlineevaluationreport_changelist"))
    assert "home:a, home:b" in listing.content.decode()
    page = admin_client.get(
        reverse("admin:experiments_onlineevaluationreport_change", args=[report.pk])
    ).content.decode()
    assert 'data-variant="home:b"' in page
    assert "3 items with feedback joined, 1 without an exposure in the window" in page
