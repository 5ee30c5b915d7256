"""YAML import/export: the seed file, round trips, idempotence, and one error for all problems."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.core.management import CommandError, call_command

from apps.experiments.choices import ExperimentStatus
from apps.experiments.models import Experiment, Variant
from apps.experiments.selectors import experiments_config_version, experiments_with_variants
from apps.experiments.services import (
    ExperimentError,
    experiment_create,
    experiment_start,
    experiments_import,
)
from apps.experiments.yaml_io import dump_experiments_yaml
from apps.models.models import ModelVersion

pytestmark = pytest.mark.django_db

SEED = Path(settings.BASE_DIR) / "config" / "experiments.yaml"


def doc(*experiments: dict) -> str:
    return yaml.safe_dump({"experiments": list(experiments)}, sort_keys=False)


def exp(name: str = "home-weights", scene: str = "for_you", status: str = "running", **kw) -> dict:
    variants = kw.pop(
        "variants",
        [
            {"name": "control", "allocation": 5000, "params": {}},
            {"name": "b", "allocation": 5000, "params": {"ranker": False}},
        ],
    )
    return {"name": name, "scene": scene, "status": status, **kw, "variants": variants}


def export() -> str:
    return dump_experiments_yaml(experiments_with_variants())


def problems(text: str) -> list[str]:
    with pytest.raises(ExperimentError) as info:
        experiments_import(text=text)
    return info.value.problems


def test_the_seed_file_runs_home_weights_on_for_you_half_and_half():
    report = experiments_import(text=SEED.read_text())
    assert "home-weights" in report.created
    experiment = Experiment.objects.get(name="home-weights")
    assert experiment.status == ExperimentStatus.RUNNING
    assert experiment.scene == "for_you"
    assert list(experiment.variants.values_list("name", "allocation")) == [
        ("control", 5000),
        ("more-ease", 5000),
    ]


def test_importing_the_same_file_twice_changes_nothing_the_second_time():
    text = SEED.read_text()
    experiments_import(text=text)
    version = experiments_config_version()
    stamps = list(Experiment.objects.values_list("updated_at", flat=True))
    # When the same file is imported again
    report = experiments_import(text=text)
    # Then nothing changed: no write, no version bump
    assert not report.changed
    assert sorted(report.unchanged) == ["home-weights", "similar-diversity"]
    assert experiments_config_version() == version
    assert list(Experiment.objects.values_list("updated_at", flat=True)) == stamps


def test_export_then_import_into_an_empty_database_round_trips():
    # Given experiments made through the services
    experiment_create(
        name="home-weights",
        scene="for_you",
        description="weights",
        variants=[
            {"name": "control", "allocation": 2500},
            {
                "name": "cap",
                "allocation": 2500,
                "params": {"diversity": {"method": "category_cap", "max_per_category": 2}},
            },
            {
                "name": "off",
                "allocation": 1000,
                "params": {"diversity": None, "model_version": "v1"},
            },
        ],
    )
    ModelVersion.objects.create(version="v1", bundle_path="/nowhere")
    experiment_start(experiment_id=Experiment.objects.get(name="home-weights").pk)
    experiment_create(name="draft", scene="similar", salt="pepper")
    first = export()
    # When everything is deleted and the export imported back
    Experiment.objects.all().delete()
    report = experiments_import(text=first)
    assert sorted(report.created) == ["draft", "home-weights"]
    # Then the state exports identically, and importing it again is a no-op
    assert export() == first
    assert not experiments_import(text=first).changed


def test_one_error_names_every_problem_by_experiment_variant_and_field():
    text = doc(
        exp(
            variants=[
                {
                    "name": "control",
                    "allocation": 6000,
                    "params": {"channel_weights": {"ease": -1}},
                },
                {"name": "b", "allocation": 6000, "params": {"rankr": True}},
            ]
        ),
        exp("second", scene="kitchen", status="flying", colour="red"),
        {"scene": "similar"},
    )
    found = problems(text)
    expected = [
        "experiment 'home-weights', variant 'control', field params.channel_weights.ease: must be >= 0",
        "experiment 'home-weights', variant 'b', field params: unknown key 'rankr'",
        "experiment 'home-weights', field variants: allocations sum to 12000 basis points (120%)",
        "experiment 'second', field colour: unknown field",
        "experiment 'second', field scene: must be one of",
        "experiment 'second', field status: must be one of",
        "experiments[2], field name: must be a slug",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in found), (start, found)
    assert len(found) == len(expected)
    assert not Experiment.objects.exists()


def test_timestamps_need_a_timezone():
    [problem] = problems(doc(exp(starts_at="2025-01-01T00:00:00")))
    assert problem == (
        "experiment 'home-weights', field starts_at: needs a timezone, e.g. 2025-01-01T00:00:00Z"
    )


def test_a_file_cannot_run_two_experiments_on_one_scene():
    found = problems(doc(exp("one"), exp("two")))
    assert found == ["experiment 'two', field status: 'one' is already running on for_you"]


def test_a_file_cannot_start_an_experiment_on_a_scene_where_another_runs():
    experiments_import(text=doc(exp("one")))
    [problem] = problems(doc(exp("two")))
    assert problem == "experiment 'two', field status: 'one' is already running on for_you"


def test_one_import_can_stop_an_experiment_and_start_its_successor_on_the_scene():
    experiments_import(text=doc(exp("one")))
    experiments_import(text=doc(exp("two"), exp("one", status="stopped")))
    statuses = dict(Experiment.objects.values_list("name", "status"))
    assert statuses == {"one": "stopped", "two": "running"}


def test_a_stopped_experiment_cannot_be_restarted_by_import():
    experiments_import(text=doc(exp(status="stopped")))
    [problem] = problems(doc(exp(status="running")))
    assert problem == "experiment 'home-weights', field status: cannot go from stopped to running"


def test_the_salt_of_a_started_experiment_cannot_change():
    experiments_import(text=doc(exp()))
    [problem] = problems(doc(exp(salt="new-salt")))
    assert problem.startswith("experiment 'home-weights', field salt: cannot change once")


def test_variants_left_out_of_the_file_are_deleted_and_others_updated_in_place():
    experiments_import(text=doc(exp(status="draft")))
    control = Variant.objects.get(name="control")
    report = experiments_import(
        text=doc(exp(status="draft", variants=[{"name": "control", "allocation": 7000}]))
    )
    assert report.updated == ["home-weights"]
    assert list(Variant.objects.values_list("pk", "name", "allocation")) == [
        (control.pk, "control", 7000)
    ]


def test_experiments_missing_from_the_file_are_left_alone():
    experiments_import(text=doc(exp("one"), exp("two", scene="similar")))
    experiments_import(text=doc(exp("one")))
    assert Experiment.objects.get(name="two").status == ExperimentStatus.RUNNING


def test_a_dry_run_writes_nothing():
    report = experiments_import(text=SEED.read_text(), dry_run=True)
    assert len(report.created) == 2
    assert not Experiment.objects.exists()
    assert experiments_config_version() == 0


def test_the_import_command_lists_every_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(doc(exp(scene="kitchen", variants=[{"name": "a", "allocation": -5}])))
    with pytest.raises(CommandError) as info:
        call_command("experiments_import", str(path))
    message = str(info.value)
    assert "2 problem(s)" in message
    assert "experiment 'home-weights', field scene" in message
    assert "experiment 'home-weights', variant 'a', field allocation" in message


def test_the_commands_round_trip_through_a_file(tmp_path, capsys):
    call_command("experiments_import")  # the seed file
    out = tmp_path / "out.yaml"
    call_command("experiments_export", "--output", str(out))
    Experiment.objects.all().delete()
    call_command("experiments_import", str(out))
    assert export() == out.read_text()


def test_exporting_an_unknown_experiment_is_an_error():
    with pytest.raises(CommandError, match="no such experiment: nope"):
        call_command("experiments_export", "nope")
