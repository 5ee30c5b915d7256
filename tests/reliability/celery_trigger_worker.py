"""`python -m celery` with test-only patches, for tests/reliability/test_celery_faults.py.

Environment (tests only):
- TEST_TRIGGER_WINDOW_SECONDS: every run creation sleeps this long first, so concurrent
  triggers all fall inside the window between "is a run active?" and "create one".
- TEST_NAIVE_TRIGGER=1: beat's trigger is the old check-then-create (running runs only, no
  lock): the control that shows the concurrency test detects duplicate runs.

The patches are applied before Celery starts, so the prefork pool's children inherit them.
"""

from __future__ import annotations

import os
import sys
import time


def _patch() -> None:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "recoplatform.settings")
    django.setup()
    from apps.pipeline import services
    from apps.pipeline.models import PipelineRun, RunStatus

    window = float(os.environ.get("TEST_TRIGGER_WINDOW_SECONDS", "0"))
    create = services.pipeline_run_create

    def slow_create(**kwargs):  # type: ignore[no-untyped-def]
        time.sleep(window)
        return create(**kwargs)

    services.pipeline_run_create = slow_create

    if os.environ.get("TEST_NAIVE_TRIGGER") == "1":

        def naive(*, kind: str, trigger_id: str = ""):  # type: ignore[no-untyped-def]
            if PipelineRun.objects.filter(kind=kind, status=RunStatus.RUNNING).exists():
                return None
            return services.pipeline_run_create(kind=kind, triggered_by="beat")

        services.pipeline_run_create_scheduled = naive


if __name__ == "__main__":
    _patch()
    from celery.__main__ import main

    sys.argv = ["celery", *sys.argv[1:]]
    sys.exit(main())
