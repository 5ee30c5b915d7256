"""docker-compose.yml refers only to files, services, env files and commands that exist.

A static check: there is no Docker engine on the development machines (nor in CI), so the
stack is never started here. The file is parsed with PyYAML (which also resolves the `x-app`
anchor the application services share) and every reference is checked against the repository:
bind mounts, env files, volumes, dependencies, and the command of every service built from
the application image (Dockerfile) against what that image installs: the console scripts of the
packages pinned in requirements.txt, Django's management commands, the Celery app that
`celery -A recoplatform` finds, the WSGI application gunicorn loads.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
REQUIREMENTS = ROOT / "requirements.txt"
APP_IMAGE = "recoplatform:latest"


@pytest.fixture(scope="module")
def compose() -> dict:
    with COMPOSE.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def bind_mounts(service: dict) -> list[tuple[str, str]]:
    """(host path, container path) of each bind mount; named volumes are skipped."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):  # long syntax
            if volume.get("type") == "bind":
                mounts.append((volume["source"], volume["target"]))
            continue
        source, _, rest = volume.partition(":")
        if source.startswith((".", "/", "~")):
            mounts.append((source, rest.split(":")[0]))
    return mounts


def env_files(service: dict) -> list[str]:
    value = service.get("env_file", [])
    entries = [value] if isinstance(value, str | dict) else list(value)
    return [entry["path"] if isinstance(entry, dict) else entry for entry in entries]


def test_every_bind_mounted_host_path_exists_in_the_repository(compose):
    missing = [
        f"{name}: {source}"
        for name, service in compose["services"].items()
        for source, _target in bind_mounts(service)
        if not (ROOT / source).resolve().exists()
    ]
    assert missing == []


def test_the_monitoring_services_mount_their_configuration_where_each_tool_reads_it(compose):
    mounts = {name: dict(bind_mounts(s)) for name, s in compose["services"].items()}
    # Prometheus loads alerts/*.yml relative to its config file: both must land side by side.
    assert mounts["prometheus"]["./monitoring/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["prometheus"]["./monitoring/alerts"] == "/etc/prometheus/alerts"
    assert (
        mounts["alertmanager"]["./monitoring/alertmanager.yml"]
        == "/etc/alertmanager/alertmanager.yml"
    )
    assert mounts["grafana"]["./monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"
    # The dashboard provider's path is where the dashboards directory is mounted.
    provider = yaml.safe_load(
        (ROOT / "monitoring/grafana/provisioning/dashboards/recoplatform.yml").read_text()
    )
    provider_path = provider["providers"][0]["options"]["path"]
    assert mounts["grafana"]["./monitoring/grafana/dashboards"] == provider_path
    assert list((ROOT / "monitoring/grafana/dashboards").glob("*.json"))


def test_every_depends_on_names_an_existing_service(compose):
    services = set(compose["services"])
    dangling = []
    for name, service in compose["services"].items():
        depends = service.get("depends_on", [])
        # short syntax is a list of names, long syntax a mapping of name to condition
        for dependency in depends if isinstance(depends, list) else depends.keys():
            if dependency not in services:
                dangling.append(f"{name} -> {dependency}")
    assert dangling == []
    assert "alertmanager" in compose["services"]["prometheus"]["depends_on"]


def test_every_env_file_exists_or_ships_as_an_example(compose):
    # `.env` holds secrets and is git-ignored; the repository ships `.env.example` to copy.
    referenced = {path for s in compose["services"].values() for path in env_files(s)}
    assert referenced, "the application services read an env file"
    missing = [
        path
        for path in sorted(referenced)
        if not (ROOT / path).exists() and not (ROOT / f"{path}.example").exists()
    ]
    assert missing == []


def test_every_named_volume_is_declared(compose):
    declared = set(compose.get("volumes") or {})
    used = {
        volume.split(":")[0]
        for service in compose["services"].values()
        for volume in service.get("volumes", [])
        if isinstance(volume, str) and not volume.startswith((".", "/", "~"))
    }
    assert used - declared == set()
    assert {"prometheus-data", "grafana-data"} <= used


# --- commands of the application image ----------------------------------------------------------


def command_of(service: dict) -> list[str]:
    """A service's command as an argument list (compose accepts a string or a list)."""
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def app_services(compose: dict) -> dict[str, dict]:
    """The services built from this repository's Dockerfile (the `x-app` anchor)."""
    return {
        name: service
        for name, service in compose["services"].items()
        if "build" in service or service.get("image") == APP_IMAGE
    }


def pinned_requirements() -> dict[str, str]:
    """Normalised distribution name -> pinned version, from requirements.txt."""
    pins = {}
    for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def console_scripts(distribution: str) -> set[str]:
    return {
        entry.name
        for entry in importlib.metadata.distribution(distribution).entry_points
        if entry.group == "console_scripts"
    }


def dockerfile_cmd() -> list[str]:
    [line] = [x for x in DOCKERFILE.read_text().splitlines() if x.startswith("CMD ")]
    return yaml.safe_load(line[len("CMD ") :])  # the exec form is a JSON (so YAML) list


# Executables the image has besides console scripts: the base image's interpreter.
INTERPRETERS = {"python", "python3"}
# Executables run by the app services -> the distribution that installs them.
PROVIDED_BY = {"gunicorn": "gunicorn", "celery": "celery"}


def test_the_app_services_are_the_ones_built_from_the_dockerfile(compose):
    assert set(app_services(compose)) == {"migrate", "web", "worker", "beat"}
    assert all(s.get("build") == "." for s in app_services(compose).values())


def test_every_app_service_runs_an_executable_the_image_installs(compose):
    # Given what requirements.txt pins (the Dockerfile pip-installs exactly that file)
    assert "requirements.txt" in DOCKERFILE.read_text()
    pins = pinned_requirements()
    commands = {name: command_of(s) for name, s in app_services(compose).items()}
    commands["Dockerfile CMD"] = dockerfile_cmd()
    for name, command in commands.items():
        executable = command[0]
        if executable in INTERPRETERS:
            continue
        # Then each other executable is a console script of a pinned, installed distribution
        assert executable in PROVIDED_BY, f"{name}: {executable} is not known to the image"
        distribution = PROVIDED_BY[executable]
        assert distribution in pins, f"{name}: {distribution} is not pinned in requirements.txt"
        assert importlib.metadata.version(distribution) == pins[distribution]
        assert executable in console_scripts(distribution), f"{name}: no {executable} script"


def test_every_manage_py_command_is_a_real_management_command(compose):
    from django.core.management import get_commands

    available = get_commands()
    found = []
    for name, service in app_services(compose).items():
        command = command_of(service)
        if command[:2] == ["python", "manage.py"]:
            found.append(command[2])
            assert command[2] in available, f"{name}: manage.py {command[2]} does not exist"
    assert (ROOT / "manage.py").is_file()
    assert found, "the stack migrates with manage.py"


def test_celery_commands_name_an_app_celery_finds_and_a_real_subcommand(compose):
    from celery.app.utils import find_app
    from celery.bin.celery import celery as celery_cli

    celery_commands = {
        name: command_of(s)
        for name, s in app_services(compose).items()
        if command_of(s)[0] == "celery"
    }
    assert set(celery_commands) == {"worker", "beat"}
    recoplatform_celery = importlib.import_module("recoplatform.celery")
    for name, command in celery_commands.items():
        assert command[1] in ("-A", "--app"), f"{name}: celery without -A"
        # `celery -A recoplatform` resolves the way the celery CLI resolves it
        app = find_app(command[2])
        assert app is recoplatform_celery.app, f"{name}: -A {command[2]} finds {app!r}"
        assert command[3] in celery_cli.commands, f"{name}: celery {command[3]} does not exist"


def test_gunicorn_loads_the_wsgi_application_with_a_config_file_in_the_image(compose):
    for name, command in (
        ("web", command_of(compose["services"]["web"])),
        ("CMD", dockerfile_cmd()),
    ):
        assert command[0] == "gunicorn"
        # The application is the one `module:attribute` argument (a bind address starts with a
        # digit or a host name followed by a port number).
        [target] = [a for a in command if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", a)]
        module, _, attribute = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute)), f"{name}: {target}"
        if "-c" in command:
            config = command[command.index("-c") + 1]
            assert (ROOT / config).is_file(), f"{name}: {config} is not in the image"


# --- health checks and the one beat -------------------------------------------------------------


@pytest.mark.parametrize("name", ["mysql", "redis", "web"])
def test_the_stateful_services_and_web_have_health_checks(compose, name):
    check = compose["services"][name].get("healthcheck") or {}
    assert check.get("test"), f"{name} has no health check"
    assert check["test"][0] in ("CMD", "CMD-SHELL")
    assert not check.get("disable", False)


def test_the_web_health_check_requests_a_url_the_app_serves(compose):
    from django.urls import resolve

    test = " ".join(compose["services"]["web"]["healthcheck"]["test"])
    [url] = re.findall(r"http://127\.0\.0\.1:8000(/[^'\"\s]*)", test)
    assert resolve(url).url_name == "health"
    # and the port is the one gunicorn binds in the container
    assert compose["services"]["web"]["environment"]["RECO_BIND"].endswith(":8000")


def test_every_service_waited_on_as_healthy_has_a_health_check(compose):
    services = compose["services"]
    for name, service in services.items():
        depends = service.get("depends_on", {})
        if isinstance(depends, dict):
            for dependency, spec in depends.items():
                if (spec or {}).get("condition") == "service_healthy":
                    assert services[dependency].get("healthcheck"), f"{name} -> {dependency}"


def test_exactly_one_beat_replica_runs(compose):
    beats = {
        name: service
        for name, service in compose["services"].items()
        if "beat" in command_of(service) or any(a in ("-B", "--beat") for a in command_of(service))
    }
    # One service runs beat (no worker embeds one with -B), with one replica
    assert list(beats) == ["beat"]
    assert beats["beat"].get("deploy", {}).get("replicas") == 1
    assert "scale" not in beats["beat"]
    # and it keeps its schedule in the database, where the admin toggles it
    # (a subclass: apps/pipeline/beat.py adds a leader lease, so a second beat only stands by)
    from celery.utils.imports import symbol_by_name
    from django.conf import settings
    from django_celery_beat.schedulers import DatabaseScheduler

    assert issubclass(symbol_by_name(settings.CELERY_BEAT_SCHEDULER), DatabaseScheduler)
