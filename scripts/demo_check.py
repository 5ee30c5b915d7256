"""Start the demo server, probe its endpoints, stop it; exit non-zero if anything failed.

Used by `make demo-check` so CI and reviewers can run the main job unattended.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Endpoints that must answer 200, with a check on the body. Recommendation endpoints join this
# list as the serving API grows.
PROBES: list[tuple[str, str]] = [
    ("/health", '"status": "ok"'),
    ("/ready", '"status": "ready"'),
    ("/admin/login/", "Django"),
    ("/metrics", "python_info"),
    ("/api/v1/popular?limit=5", '"items":[{'),
    ("/api/v1/recommendations/for-you?user_id=1&limit=5", '"degraded":false'),
    ("/api/v1/items/1/similar?limit=5", '"request_id"'),
]


def fetch(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--startup-timeout", type=float, default=60.0)
    args = parser.parse_args()
    base = f"http://{args.host}:{args.port}"
    server = subprocess.Popen(
        [sys.executable, "manage.py", "runserver", "--noreload", f"{args.host}:{args.port}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    failures: list[str] = []
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if server.poll() is not None:
                out = server.stdout.read() if server.stdout else ""
                print(out[-4000:], file=sys.stderr)
                print(
                    f"demo-check: the server exited with code {server.returncode}", file=sys.stderr
                )
                return 1
            try:
                if fetch(base + "/health", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                print(
                    f"demo-check: no answer from {base}/health after {args.startup_timeout:.0f}s",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.3)
        for path, expected in PROBES:
            status, body = fetch(base + path)
            ok = status == 200 and expected in body
            print(f"{'ok  ' if ok else 'FAIL'} {status} {path}")
            if not ok:
                failures.append(f"{path}: {status} {body[:200]!r}")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    if failures:
        print("demo-check failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(json.dumps({"demo_check": "ok", "probes": len(PROBES)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
