"""docker-compose.yml refers only to files, services and env files that exist.

A static check: there is no Docker engine on the development machines (nor in CI), so the
stack is never started here. The file is parsed with PyYAML (which also resolves the `x-app`
anchor the application services share) and every reference is checked against the repository.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


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
