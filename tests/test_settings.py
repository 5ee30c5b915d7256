"""Start-up configuration: bad environment values fail fast with the variable's name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _start(env_overrides: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("DATABASE_URL", "REDIS_URL", "CELERY_", "BUSINESS_DB_URL", "MATOMO_DB_URL")
        )
    }
    env.update(
        {"DATA_DIR": str(tmp_path / "data"), "DJANGO_SETTINGS_MODULE": "recoplatform.settings"}
    )
    env.update(env_overrides)
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", "oracle://db/x"),
        ("BUSINESS_DB_URL", "ftp://nowhere"),
        ("MATOMO_DB_URL", "postgres://x/y"),
        ("REDIS_URL", "http://127.0.0.1:6379"),
        ("CELERY_BROKER_URL", "kafka://broker"),
        ("RECO_QUALITY_THRESHOLD", "high"),
        ("RECO_EXTRACT_BATCH_ROWS", "0"),
        ("DJANGO_DEBUG", "maybe"),
    ],
)
def test_a_bad_variable_stops_start_up_with_its_name(variable, value, tmp_path):
    # Given one badly configured variable
    # When Django starts
    result = _start({variable: value}, tmp_path)
    # Then start-up fails and the message names the variable
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert variable in result.stderr


def test_embedded_defaults_start_without_any_variable(tmp_path):
    # Given no configuration at all
    # When Django starts
    result = _start({}, tmp_path)
    # Then the checks pass and DATA_DIR was created
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data").is_dir()


def test_celery_runs_eagerly_only_without_a_broker(settings):
    # The test process has no broker configured, so tasks execute in-process.
    assert settings.CELERY_BROKER_URL == ""
    assert settings.CELERY_TASK_ALWAYS_EAGER is True


def test_secret_key_is_required_when_debug_is_off(tmp_path):
    result = _start({"DJANGO_DEBUG": "0"}, tmp_path)
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY" in result.stderr
