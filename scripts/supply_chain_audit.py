"""Supply-chain audit of the pinned requirements with pip-audit, reported honestly.

pip-audit needs its vulnerability database (PyPI's JSON API / OSV). Offline it cannot audit a
package; without `--strict` it would still print "No known vulnerabilities found" and exit 0.
This script runs it with `--strict` and classifies the outcome:

- ``clean``: every requirement was audited and none has a known vulnerability (exit 0);
- ``vulnerable``: pip-audit reported vulnerabilities (exit 1);
- ``not_run``: it could not reach its database or audit a package (exit 2) — never green.

    python scripts/supply_chain_audit.py [--requirements requirements.txt]

Writes benchmarks/results/supply_chain_audit.json (tool, version, status, reason, output tail).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "supply_chain_audit.json"
UNREACHABLE = (
    "could not be audited",
    "ConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Failed to establish a new connection",
)


def classify(returncode: int, output: str) -> tuple[str, str]:
    """(status, reason) of one pip-audit --strict run."""
    for marker in UNREACHABLE:
        if marker in output:
            line = next((x for x in output.splitlines() if marker in x), marker)
            return (
                "not_run",
                f"pip-audit could not reach its vulnerability database: {line.strip()}",
            )
    if returncode == 0:
        return "clean", "every requirement audited, no known vulnerability"
    if "Found" in output and "vulnerabilit" in output:
        return "vulnerable", next(x for x in output.splitlines() if x.startswith("Found"))
    return "not_run", f"pip-audit exited {returncode} without a verdict"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requirements", default=str(ROOT / "requirements.txt"))
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    tool = shutil.which("pip-audit") or str(Path(sys.executable).parent / "pip-audit")
    if not Path(tool).exists():
        status, reason, output, version = "not_run", "pip-audit is not installed", "", None
    else:
        version = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip()
        run = subprocess.run(
            [tool, "--strict", "--progress-spinner", "off", "-r", args.requirements],
            capture_output=True,
            text=True,
            timeout=900,
        )
        output = run.stdout + run.stderr
        status, reason = classify(run.returncode, output)
    report = {
        "tool": "pip-audit",
        "version": version,
        "requirements": args.requirements,
        "status": status,
        "reason": reason,
        "output_tail": output[-3000:],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"supply-chain audit: {status.upper()} - {reason}")
    return {"clean": 0, "vulnerable": 1}.get(status, 2)


if __name__ == "__main__":
    raise SystemExit(main())
