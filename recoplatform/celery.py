"""Celery application. Settings come from Django's settings under the CELERY_ namespace.

With no CELERY_BROKER_URL, settings turn on ``task_always_eager`` so tasks run in-process.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "recoplatform.settings")

app = Celery("recoplatform")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
