"""Beat schedules: code owns what and when, the admin owns enabled/disabled."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django_celery_beat.models import PeriodicTask

from apps.pipeline import schedules
from recoplatform.celery import app

pytestmark = pytest.mark.django_db


def test_sync_creates_every_schedule_with_a_registered_task():
    outcome = schedules.schedules_sync()
    assert set(outcome.values()) == {"created"}
    tasks = {t.name: t for t in PeriodicTask.objects.all()}
    assert set(tasks) == {s.name for s in schedules.SCHEDULES}
    app.loader.import_default_modules()
    for task in tasks.values():
        assert task.task in app.tasks, task.task
    hourly = tasks["pipeline: incremental"]
    assert (hourly.crontab.minute, hourly.crontab.hour) == ("5", "*")


def test_a_disabled_schedule_stays_disabled_and_code_changes_win(monkeypatch):
    # Given synced schedules, one disabled by an operator and one edited by hand
    schedules.schedules_sync()
    PeriodicTask.objects.filter(name="pipeline: full retrain").update(enabled=False)
    PeriodicTask.objects.filter(name="pipeline: incremental").update(kwargs='{"kind": "full"}')
    # When the code's schedules are synced again
    outcome = schedules.schedules_sync()
    # Then the operator's switch is kept and the code's definition is restored
    assert PeriodicTask.objects.get(name="pipeline: full retrain").enabled is False
    assert (
        PeriodicTask.objects.get(name="pipeline: incremental").kwargs == '{"kind": "incremental"}'
    )
    assert outcome["pipeline: incremental"] == "updated"
    assert outcome["pipeline: quality snapshot"] == "unchanged"


def test_the_command_reports_what_it_did(capsys):
    call_command("sync_schedules")
    assert "created   pipeline: incremental" in capsys.readouterr().out
    call_command("sync_schedules")
    assert "unchanged pipeline: incremental" in capsys.readouterr().out


def test_a_scheduled_run_is_skipped_while_one_of_its_kind_runs():
    from apps.pipeline import tasks
    from apps.pipeline.models import PipelineRun, RunStatus

    PipelineRun.objects.create(kind="incremental", status=RunStatus.RUNNING)
    result = tasks.pipeline_scheduled_task.delay("incremental").get()
    assert result.startswith("skipped")
    assert PipelineRun.objects.filter(kind="incremental").count() == 1
