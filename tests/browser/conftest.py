"""Real-browser fixtures: headless Chromium driven by Selenium against pytest-django's
``live_server`` (a threaded server in this process, so settings and the serving state set here
are the ones it serves with).

Chromium and ChromeDriver come from Debian (``make system-deps``); ``Service`` is given an
explicit driver path so Selenium Manager never tries to download one. When either is missing
the tests are skipped, except with CI=true, where that is a failure. Screenshots of failed
tests go to a temporary directory, never into the repository.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("CHROMIUM_BINARY", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
IN_CI = os.environ.get("CI", "").lower() == "true"
SCREENSHOTS = Path(tempfile.gettempdir()) / "recoplatform-browser-screenshots"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    # Containers often have a 64 MB /dev/shm; Chromium then crashes on large pages.
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements-dev.txt)"
    for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            return f"{name} is not installed at {path} (make system-deps)"
    return None


@pytest.fixture(scope="session")
def chrome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the session (starting one costs about a second)."""
    problem = _missing()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"{problem} (CI=true: browser tests must not be skipped)")
        pytest.skip(problem)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    profile = tmp_path_factory.mktemp("chromium-profile")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)  # waits are explicit (WebDriverWait) where a page loads
    try:
        yield driver
    finally:
        driver.quit()


_OUTCOME = pytest.StashKey[pytest.TestReport]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_OUTCOME] = report
    return report


@pytest.fixture
def browser(chrome: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """The session's browser with no cookies (so no admin session) left by another test; a
    screenshot of the last page is saved under the temp directory when the test fails."""
    chrome.delete_all_cookies()
    yield chrome
    report = request.node.stash.get(_OUTCOME, None)
    if report is not None and report.failed:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{request.node.name}.png"
        chrome.save_screenshot(str(path))
        print(f"screenshot of the failed page: {path}")


@pytest.fixture
def exposure_writer(tmp_path: Path, settings: Any) -> Iterator[Any]:
    """Exposure and feedback lines of API calls go to a temporary directory (and the dashboard
    reads them from there)."""
    from apps.serving import exposure

    path = tmp_path / "exposures" / "exposures.jsonl"
    settings.RECO = {**settings.RECO, "EXPOSURE_LOG": str(path)}
    writer = exposure.ExposureWriter(path)
    previous = exposure.set_writer(writer)
    try:
        yield writer
    finally:
        exposure.set_writer(previous)
        writer.close()


@pytest.fixture
def serving(exposure_writer: Any) -> Iterator[Any]:
    """A serving state that polls the registry and experiments on every request (no Redis), so
    an admin change shows in the very next API answer, as it would after one poll interval."""
    from apps.serving.state import ServingState, set_state

    state = ServingState(redis_url="", poll_seconds=0, background=False)
    set_state(state)
    try:
        yield state
    finally:
        set_state(None)
