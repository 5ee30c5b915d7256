"""Registry actions for the reliability scenarios, run in a child process of the test.

The servers under test read a registry database the test gave them (DATABASE_URL in the
environment); the actions must change that database exactly as an operator's would, through
the services, so this runs as its own Django process with the server's environment:

    python -m tests.reliability.registry_ops register-copy <source-version> <new-version>
    python -m tests.reliability.registry_ops serve

`serve` sets Django up once, then reads one command a line from stdin (`promote <version>`,
`rollback`) and answers one JSON line each with `done_at` (a `time.monotonic()` value taken
after the commit and the change message, comparable with the load generator's clock). Setting
up Django in advance keeps its start-up cost out of the measured window.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path


def _setup() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "recoplatform.settings")
    import django

    django.setup()


def register_copy(source: str, new: str) -> dict:
    """Copy `source`'s bundle to a sibling directory as version `new` (manifest rewritten,
    every checksum recomputed) and register it as a candidate with the same metrics."""
    from apps.models.bundle import MANIFEST_NAME, write_manifest
    from apps.models.models import ModelVersion
    from apps.models.services import model_version_register

    row = ModelVersion.objects.get(version=source)
    source_dir = Path(row.bundle_path)
    target = source_dir.parent / new
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source_dir, target, ignore=shutil.ignore_patterns(MANIFEST_NAME))
    manifest = json.loads((source_dir / MANIFEST_NAME).read_text())
    write_manifest(
        target,
        version=new,
        created_at=manifest["created_at"],
        data_snapshot=manifest["data_snapshot"],
        features=manifest["features"],
        params=manifest["params"],
        metrics=manifest["metrics"],
    )
    registered = model_version_register(
        bundle_path=str(target),
        version=new,
        metrics=row.metrics,
        feature_schema=row.feature_schema,
        quality_report_id=row.quality_report_id,
        actor="reliability-test",
    )
    return {"version": registered.version, "id": registered.pk, "bundle_path": str(target)}


def serve() -> None:
    from apps.models.models import ModelVersion
    from apps.models.services import model_version_promote, model_version_rollback

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        started = time.monotonic()
        try:
            if words[0] == "promote":
                version = ModelVersion.objects.get(version=words[1])
                done = model_version_promote(
                    version_id=version.pk, actor="reliability-test", reason="S9"
                )
            elif words[0] == "rollback":
                done = model_version_rollback(actor="reliability-test", reason="S9")
            else:
                raise ValueError(f"unknown command {words[0]!r}")
            answer = {"ok": True, "primary": done.version.version}
        except Exception as exc:
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        answer.update(started_at=started, done_at=time.monotonic())
        print(json.dumps(answer), flush=True)


def main(argv: list[str]) -> int:
    _setup()
    if argv[:1] == ["register-copy"] and len(argv) == 3:
        print(json.dumps(register_copy(argv[1], argv[2])))
        return 0
    if argv == ["serve"]:
        serve()
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
