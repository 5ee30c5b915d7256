"""A bare DRF endpoint for benchmarks: a fixed list from one Redis GET (or from memory).

`benchmarks/serving_load.py` measures it beside the real recommendation path in the same run,
so the cost of recall, ranking and logging is read as a ratio on one machine.
"""

from __future__ import annotations

import json

from django.conf import settings
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

FIXED = [{"item_id": i, "score": 1.0 / i} for i in range(1, 21)]
KEY = "reco:baseline"

_client = None


def _redis():
    global _client
    if _client is None and settings.REDIS_URL:
        from apps.serving.engine.redis_store import make_serving_client

        _client = make_serving_client(settings.REDIS_URL)
        _client.set(KEY, json.dumps(FIXED), nx=True)
    return _client


@extend_schema(exclude=True)
class BaselineView(APIView):
    """GET /api/v1/_baseline: 20 fixed items, read with one Redis GET when Redis is configured."""

    authentication_classes: list = []
    permission_classes: list = []

    def get(self, request: Request) -> Response:
        client = _redis()
        items = FIXED
        if client is not None:
            try:
                raw = client.get(KEY)
                items = json.loads(raw) if raw else FIXED
            except Exception:  # a benchmark baseline must not fail either
                items = FIXED
        return Response({"items": items})
