"""Experiment services and selectors: lifecycle, checks, config version, publish, snapshot."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from apps.experiments import services
from apps.experiments.bucketing import assign
from apps.experiments.choices import ExperimentStatus, Scene
from apps.experiments.models import Experiment, Variant
from apps.experiments.params import Diversity
from apps.experiments.selectors import experiments_config_version, experiments_snapshot
from apps.experiments.services import (
    ExperimentError,
    experiment_create,
    experiment_pause,
    experiment_start,
    experiment_stop,
    variant_set_allocation,
    variant_set_params,
)
from apps.models.choices import ModelStatus
from apps.models.models import ModelVersion

pytestmark = pytest.mark.django_db

HALVES = (
    {"name": "control", "allocation": 5000, "params": {}},
    {"name": "more-ease", "allocation": 5000, "params": {"channel_weights": {"ease": 2.0}}},
)


def make(
    name: str = "home-weights", scene: str = Scene.FOR_YOU, variants=HALVES, **kw
) -> Experiment:
    return experiment_create(name=name, scene=scene, variants=variants, **kw)


def running(name: str = "home-weights", scene: str = Scene.FOR_YOU, **kw) -> Experiment:
    experiment = make(name, scene, **kw)
    return experiment_start(experiment_id=experiment.pk)


def refusal(call, *args, **kwargs) -> list[str]:
    with pytest.raises(ExperimentError) as info:
        call(*args, **kwargs)
    return info.value.problems


@pytest.fixture
def published(monkeypatch):
    """Record publish calls instead of talking to Redis."""
    calls: list[dict] = []
    monkeypatch.setattr(services, "on_experiments_change", lambda **kw: calls.append(kw))
    return calls


# --- create ----------------------------------------------------------------------------------


def test_create_makes_a_draft_whose_salt_defaults_to_its_name():
    experiment = make()
    assert experiment.status == ExperimentStatus.DRAFT
    assert experiment.salt == "home-weights"
    variants = list(experiment.variants.order_by("position"))
    assert [(v.name, v.position, v.allocation) for v in variants] == [
        ("control", 0, 5000),
        ("more-ease", 1, 5000),
    ]
    assert variants[1].params == {"channel_weights": {"ease": 2.0}}


def test_create_names_the_experiment_variant_and_field_of_each_problem_and_writes_nothing():
    variants = [
        {"name": "a", "allocation": 6000, "params": {"channel_weights": {"eas": 1}}},
        {"name": "b", "allocation": 6000, "params": {"ranker": "on"}},
    ]
    found = refusal(make, variants=variants)
    assert "experiment 'home-weights', variant 'a', field params.channel_weights.eas" in found[0]
    assert any(
        p.startswith("experiment 'home-weights', variant 'b', field params.ranker") for p in found
    )
    assert any("allocations sum to 12000 basis points (120%)" in p for p in found)
    assert not Experiment.objects.exists()


def test_create_refuses_a_name_in_use():
    make()
    assert refusal(make) == ["experiment 'home-weights', field name: an experiment has this name"]


# --- lifecycle -------------------------------------------------------------------------------


def test_start_runs_the_experiment_and_stamps_its_start():
    experiment = running()
    assert experiment.status == ExperimentStatus.RUNNING
    assert experiment.starts_at is not None


def test_start_refuses_an_experiment_that_allocates_no_traffic():
    experiment = make(variants=[{"name": "a", "allocation": 0}])
    [problem] = refusal(experiment_start, experiment_id=experiment.pk)
    assert "no variant has an allocation above 0" in problem
    experiment.refresh_from_db()
    assert experiment.status == ExperimentStatus.DRAFT


def test_only_one_experiment_runs_per_scene():
    running("first")
    second = make("second")
    [problem] = refusal(experiment_start, experiment_id=second.pk)
    assert "'first' is already running on for_you" in problem
    # Another scene is free
    other = make("third", scene=Scene.SIMILAR)
    assert experiment_start(experiment_id=other.pk).status == ExperimentStatus.RUNNING


def test_start_refuses_a_model_version_that_is_not_registered():
    variants = [{"name": "a", "allocation": 5000, "params": {"model_version": "v9"}}]
    experiment = make(variants=variants)
    [problem] = refusal(experiment_start, experiment_id=experiment.pk)
    assert problem == (
        "experiment 'home-weights', variant 'a', field params.model_version: 'v9' is not a "
        "registered (non-rejected) model version"
    )
    # Once registered, it starts
    ModelVersion.objects.create(version="v9", bundle_path="/nowhere", status=ModelStatus.CANDIDATE)
    assert experiment_start(experiment_id=experiment.pk).status == ExperimentStatus.RUNNING


def test_start_refuses_an_experiment_whose_end_is_past():
    now = timezone.now()
    experiment = make(starts_at=now - timedelta(days=2), ends_at=now - timedelta(days=1))
    [problem] = refusal(experiment_start, experiment_id=experiment.pk)
    assert "field ends_at" in problem
    assert "already past" in problem


def test_pause_and_start_again_keep_the_original_start():
    experiment = running()
    started = experiment.starts_at
    assert experiment_pause(experiment_id=experiment.pk).status == ExperimentStatus.PAUSED
    again = experiment_start(experiment_id=experiment.pk)
    assert again.status == ExperimentStatus.RUNNING
    assert again.starts_at == started


def test_a_stopped_experiment_ends_now_and_never_runs_again():
    experiment = running()
    stopped = experiment_stop(experiment_id=experiment.pk)
    assert stopped.status == ExperimentStatus.STOPPED
    assert stopped.ends_at is not None
    [problem] = refusal(experiment_start, experiment_id=experiment.pk)
    assert problem == "experiment 'home-weights', field status: cannot go from stopped to running"


def test_starting_twice_is_harmless():
    experiment = running()
    version = experiments_config_version()
    assert experiment_start(experiment_id=experiment.pk).status == ExperimentStatus.RUNNING
    assert experiments_config_version() == version


def test_a_missing_experiment_is_a_refusal():
    assert refusal(experiment_stop, experiment_id=999) == ["experiment #999 does not exist"]


# --- variants --------------------------------------------------------------------------------


def test_variant_params_are_validated_and_stored_canonical():
    experiment = make()
    variant = experiment.variants.get(name="control")
    variant_set_params(variant_id=variant.pk, params={"diversity": {"lambda": 1, "method": "mmr"}})
    variant.refresh_from_db()
    assert variant.params == {"diversity": {"method": "mmr", "lambda": 1.0}}
    [problem] = refusal(variant_set_params, variant_id=variant.pk, params={"colour": "red"})
    assert problem.startswith(
        "experiment 'home-weights', variant 'control', field params: unknown key"
    )


def test_allocations_cannot_exceed_100_percent():
    experiment = running()
    control = experiment.variants.get(name="control")
    [problem] = refusal(variant_set_allocation, variant_id=control.pk, allocation=5001)
    assert "allocations sum to 10001 basis points" in problem
    variant_set_allocation(variant_id=control.pk, allocation=2500)
    assert Variant.objects.get(pk=control.pk).allocation == 2500


# --- config version and publish -----------------------------------------------------------------


def test_the_config_version_starts_at_zero_and_is_one_query(django_assert_num_queries):
    with django_assert_num_queries(1):
        assert experiments_config_version() == 0


def test_every_change_bumps_the_config_version():
    experiment = make()
    after_create = experiments_config_version()
    experiment_start(experiment_id=experiment.pk)
    after_start = experiments_config_version()
    variant = experiment.variants.get(name="control")
    variant_set_params(variant_id=variant.pk, params={"ranker": False})
    after_params = experiments_config_version()
    experiment_stop(experiment_id=experiment.pk)
    assert 0 < after_create < after_start < after_params < experiments_config_version()


def test_changes_are_published_after_commit_only(published, django_capture_on_commit_callbacks):
    experiment = make()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        experiment_start(experiment_id=experiment.pk)
    # Not before the transaction commits
    assert published == []
    for callback in callbacks:
        callback()
    assert published == [
        {"event": "start", "names": ["home-weights"], "version": experiments_config_version()}
    ]


def test_a_refused_change_publishes_nothing(published, django_capture_on_commit_callbacks):
    experiment = make(variants=[{"name": "a", "allocation": 0}])
    with django_capture_on_commit_callbacks(execute=True):
        refusal(experiment_start, experiment_id=experiment.pk)
    assert published == []


def test_publishing_without_redis_configured_does_nothing(settings):
    settings.REDIS_URL = ""
    assert services.on_experiments_change(event="start", names=["x"], version=1) is False


def test_publishing_to_an_unreachable_redis_never_raises(settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    assert services.on_experiments_change(event="start", names=["x"], version=1) is False


@pytest.mark.redis
def test_a_change_reaches_subscribers_on_redis(
    settings, redis_url, django_capture_on_commit_callbacks
):
    import redis

    settings.REDIS_URL = redis_url
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    pubsub.subscribe(services.CHANGED_CHANNEL)
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    experiment = make()
    with django_capture_on_commit_callbacks(execute=True):
        experiment_start(experiment_id=experiment.pk)
    message = pubsub.get_message(timeout=2)
    assert message is not None
    body = json.loads(message["data"])
    assert body == {
        "event": "start",
        "experiments": ["home-weights"],
        "version": experiments_config_version(),
    }
    assert int(client.get(services.VERSION_KEY)) == experiments_config_version()
    pubsub.close()
    client.close()


# --- snapshot --------------------------------------------------------------------------------


def test_the_snapshot_holds_running_experiments_only_with_parsed_params():
    running(
        "home-weights",
        variants=[
            {"name": "control", "allocation": 5000},
            {
                "name": "mmr",
                "allocation": 5000,
                "params": {"diversity": {"method": "mmr", "lambda": 0.5}},
            },
        ],
    )
    make("draft-one", scene=Scene.SIMILAR)
    snapshot = experiments_snapshot()
    assert snapshot.version == experiments_config_version()
    [experiment] = snapshot.experiments
    assert experiment.name == "home-weights"
    assert [v.name for v in experiment.variants] == ["control", "mmr"]
    assert experiment.variants[1].params.diversity == Diversity(method="mmr", lambda_=0.5)
    assert snapshot.for_scene(Scene.SIMILAR) is None


def test_the_snapshot_assigns_units_as_the_bucketing_function_does():
    running()
    snapshot = experiments_snapshot()
    now = timezone.now() + timedelta(seconds=1)
    for unit in ["v-anon-1", 7, 8, 9]:
        assignment = snapshot.assign(Scene.FOR_YOU, unit, now=now)
        assert assignment is not None
        assert assignment.variant.name == assign(
            "home-weights", unit, [("control", 5000), ("more-ease", 5000)]
        )


def test_the_snapshot_costs_three_queries_however_many_experiments_run(
    django_assert_num_queries,
):
    for scene in Scene.values:
        running(f"exp-{scene}", scene=scene)
    with django_assert_num_queries(3):
        snapshot = experiments_snapshot()
    assert len(snapshot.experiments) == len(Scene.values)
    assert all(len(e.variants) == 2 for e in snapshot.experiments)
