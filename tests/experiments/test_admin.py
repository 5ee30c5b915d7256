"""The experiments admin through the test client: list, change form validation, actions, export."""

from __future__ import annotations

import pytest
import yaml
from django.contrib import messages
from django.contrib.admin.models import LogEntry
from django.contrib.messages import get_messages
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from apps.experiments.choices import ExperimentStatus, Scene
from apps.experiments.models import Experiment, Variant
from apps.experiments.selectors import experiments_config_version
from apps.experiments.services import experiment_create, experiment_start

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:experiments_experiment_changelist"
ADD = "admin:experiments_experiment_add"
CHANGE = "admin:experiments_experiment_change"


def make(name: str = "home-weights", scene: str = Scene.FOR_YOU, allocations=(5000, 5000)):
    variants = [{"name": f"v{i}", "allocation": a} for i, a in enumerate(allocations)]
    return experiment_create(name=name, scene=scene, variants=variants)


def act(client, action: str, *experiments: Experiment):
    data = {"action": action, "_selected_action": [e.pk for e in experiments]}
    return client.post(reverse(CHANGELIST), data)


def notices(response) -> list[tuple[int, str]]:
    return [(m.level, m.message) for m in get_messages(response.wsgi_request)]


def form_data(variants: list[dict], **experiment) -> dict:
    """POST data for the change form: the experiment's fields and the variants inline."""
    data = {
        "name": "home-weights",
        "scene": "for_you",
        "salt": "",
        "starts_at_0": "",
        "starts_at_1": "",
        "ends_at_0": "",
        "ends_at_1": "",
        "description": "",
        "variants-TOTAL_FORMS": str(len(variants)),
        "variants-INITIAL_FORMS": str(sum(1 for v in variants if v.get("id"))),
        "variants-MIN_NUM_FORMS": "0",
        "variants-MAX_NUM_FORMS": "1000",
        **experiment,
    }
    for i, variant in enumerate(variants):
        fields = {"id": "", "name": "", "percent": "", "position": "0", "params": "{}", **variant}
        data.update({f"variants-{i}-{key}": value for key, value in fields.items()})
    return data


def test_the_changelist_shows_scene_status_and_allocated_percent(admin_client):
    experiment_start(experiment_id=make(allocations=(2500, 2500)).pk)
    make("draft-one", scene=Scene.SIMILAR, allocations=(3333,))
    html = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert "Running" in html
    assert "Draft" in html
    assert "50%" in html
    assert "33.33%" in html
    assert "For you" in html


def test_the_changelist_query_count_does_not_grow_with_the_number_of_experiments(
    admin_client, django_assert_num_queries
):
    # Given two experiments, measure the page once
    for i in range(2):
        make(f"a{i}")
    admin_client.get(reverse(CHANGELIST))  # warm the session and content types
    with CaptureQueriesContext(connection) as baseline:
        assert admin_client.get(reverse(CHANGELIST)).status_code == 200
    # When ten more exist, each with variants
    for i in range(10):
        make(f"b{i}", allocations=(1000, 2000, 3000))
    # Then the page costs exactly the same number of queries
    with django_assert_num_queries(len(baseline.captured_queries)):
        response = admin_client.get(reverse(CHANGELIST))
    assert response.content.decode().count('name="_selected_action"') == 12


def test_adding_an_experiment_stores_percent_as_basis_points_and_bumps_the_version(admin_client):
    variants = [
        {"name": "control", "percent": "33.33"},
        {
            "name": "more-ease",
            "percent": "25",
            "position": "1",
            "params": '{"channel_weights": {"ease": 2}}',
        },
    ]
    response = admin_client.post(reverse(ADD), form_data(variants))
    assert response.status_code == 302, response.context["adminform"].form.errors
    experiment = Experiment.objects.get(name="home-weights")
    assert experiment.salt == "home-weights"  # defaulted to the name
    assert experiment.status == ExperimentStatus.DRAFT
    assert list(experiment.variants.values_list("name", "allocation", "params")) == [
        ("control", 3333, {}),
        ("more-ease", 2500, {"channel_weights": {"ease": 2.0}}),
    ]
    assert experiments_config_version() == 1


def test_the_change_form_shows_allocations_in_percent(admin_client):
    experiment = make(allocations=(2525, 7475))
    html = admin_client.get(reverse(CHANGE, args=[experiment.pk])).content.decode()
    assert 'name="variants-0-percent" value="25.25"' in html
    assert 'name="variants-1-percent" value="74.75"' in html


def test_allocations_over_100_percent_are_an_error_on_the_form(admin_client):
    variants = [{"name": "a", "percent": "60"}, {"name": "b", "percent": "40.01"}]
    response = admin_client.post(reverse(ADD), form_data(variants))
    assert response.status_code == 200
    assert "The allocations add up to 100.01%; together they must not exceed 100%." in (
        response.content.decode()
    )
    assert not Experiment.objects.exists()


def test_a_deleted_variant_does_not_count_toward_the_total(admin_client):
    experiment = make(allocations=(5000, 5000))
    a, b = experiment.variants.order_by("position")
    variants = [
        {"id": str(a.pk), "name": "v0", "percent": "90", "experiment": str(experiment.pk)},
        {
            "id": str(b.pk),
            "name": "v1",
            "percent": "50",
            "DELETE": "on",
            "experiment": str(experiment.pk),
        },
    ]
    response = admin_client.post(reverse(CHANGE, args=[experiment.pk]), form_data(variants))
    assert response.status_code == 302
    assert list(Variant.objects.values_list("name", "allocation")) == [("v0", 9000)]


def test_invalid_params_are_an_error_on_the_form(admin_client):
    variants = [{"name": "a", "percent": "50", "params": '{"channel_weights": {"eas": 1}}'}]
    response = admin_client.post(reverse(ADD), form_data(variants))
    assert response.status_code == 200
    assert "params.channel_weights.eas: unknown channel" in response.content.decode()
    assert not Experiment.objects.exists()


def test_salt_and_scene_are_read_only_once_started(admin_client):
    experiment = make()
    html = admin_client.get(reverse(CHANGE, args=[experiment.pk])).content.decode()
    assert 'name="salt"' in html
    experiment_start(experiment_id=experiment.pk)
    html = admin_client.get(reverse(CHANGE, args=[experiment.pk])).content.decode()
    assert 'name="salt"' not in html
    assert 'name="scene"' not in html


def test_the_start_action_starts_and_says_so(admin_client):
    experiment = make()
    response = act(admin_client, "start_experiments", experiment)
    assert response.status_code == 302
    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.RUNNING
    assert notices(response) == [(messages.SUCCESS, "Started: 1 experiment (home-weights).")]
    assert LogEntry.objects.filter(object_id=str(experiment.pk)).exists()


def test_a_refused_start_is_reported_with_its_reason(admin_client):
    experiment_start(experiment_id=make("first").pk)
    second = make("second")
    response = act(admin_client, "start_experiments", second)
    [(level, text)] = notices(response)
    assert level == messages.ERROR
    assert text == (
        "Could not start second: experiment 'second', field scene: 'first' is already "
        "running on for_you; stop or pause it first"
    )
    second.refresh_from_db()
    assert second.status == ExperimentStatus.DRAFT


def test_the_stop_action_stops(admin_client):
    experiment = make()
    experiment_start(experiment_id=experiment.pk)
    response = act(admin_client, "stop_experiments", experiment)
    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.STOPPED
    assert notices(response) == [(messages.SUCCESS, "Stopped: 1 experiment (home-weights).")]


def test_the_export_action_downloads_the_selected_experiments_as_yaml(admin_client):
    wanted = make("wanted")
    make("other", scene=Scene.SIMILAR)
    response = act(admin_client, "export_yaml", wanted)
    assert response.status_code == 200
    assert response["Content-Disposition"] == 'attachment; filename="experiments.yaml"'
    data = yaml.safe_load(response.content)
    assert [e["name"] for e in data["experiments"]] == ["wanted"]
    assert [v["allocation"] for v in data["experiments"][0]["variants"]] == [5000, 5000]


def test_deleting_an_experiment_bumps_the_config_version(admin_client):
    experiment = make()
    version = experiments_config_version()
    response = admin_client.post(
        reverse("admin:experiments_experiment_delete", args=[experiment.pk]), {"post": "yes"}
    )
    assert response.status_code == 302
    assert not Experiment.objects.exists()
    assert experiments_config_version() == version + 1
