"""Fixtures of the operations tests: the Prometheus and Alertmanager command-line tools.

promtool and amtool come from the Debian packages `prometheus` and `prometheus-alertmanager`
(`make system-deps`). On a developer machine without them the tests that run them skip with
the reason; when CI=true a missing tool is a failure, so CI can never pass them silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
IN_CI = os.environ.get("CI", "").lower() == "true"


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed (Debian package {package}; `make system-deps`)"
    if IN_CI:
        pytest.fail(f"{message}; CI=true: monitoring checks must not be skipped")
    pytest.skip(message)
    raise AssertionError("unreachable")  # pytest.skip raises


@pytest.fixture(scope="session")
def promtool() -> str:
    return _tool("promtool", "prometheus")


@pytest.fixture(scope="session")
def amtool() -> str:
    return _tool("amtool", "prometheus-alertmanager")


Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def run() -> Run:
    """Run a command from the repository root. With ``merge`` (the default) stderr is folded
    into ``.stdout``, so an assertion message shows everything the tool said."""

    def _run(*args: str | Path, merge: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge else subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )

    return _run
