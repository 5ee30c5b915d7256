"""The supply-chain audit never reports an audit it could not run as green."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("audit", ROOT / "scripts" / "supply_chain_audit.py")
audit = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(audit)  # type: ignore[union-attr]


def test_an_unreachable_database_is_not_run_even_when_pip_audit_exits_zero():
    offline = "ERROR:pip_audit._cli:Django: Dependency not found on PyPI and could not be audited"
    assert audit.classify(1, offline)[0] == "not_run"
    # pip-audit without --strict exits 0 offline: still not a pass.
    assert audit.classify(0, offline + "\nNo known vulnerabilities found")[0] == "not_run"
    assert audit.classify(1, "requests.exceptions.ConnectionError: Max retries exceeded")[0] == (
        "not_run"
    )


def test_a_clean_audit_passes_and_findings_fail():
    assert audit.classify(0, "No known vulnerabilities found")[0] == "clean"
    status, reason = audit.classify(1, "Found 2 known vulnerabilities in 1 package\nName ...")
    assert status == "vulnerable"
    assert reason.startswith("Found 2")
    assert audit.classify(3, "something else")[0] == "not_run"
