"""Publish a bundle's candidate lists to Redis from its store.sqlite3. Pure core (offline side).

Per-user lists go into one hash field per channel (the Redis layout of `redis_store`): the
bundle's per-channel recall lists (`user_candidates`), which the online ranker fuses and
scores exactly as training did; for older bundles without them, the ranked lists split by
channel (the reader then merges the fields by descending score, restoring the ranked order). Similar-item lists keep their channels; the popular list keeps its rank order.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from urllib.parse import quote

import redis

from apps.pipeline.train.trainer import unpack_candidates
from apps.serving.engine.redis_store import publish_bundle_lists
from apps.serving.engine.snapshot import STORE_FILE

Pairs = list[tuple[int, float]]


def read_bundle_lists(
    store_path: Path,
) -> tuple[dict[int, dict[str, Pairs]], dict[int, dict[str, Pairs]], Pairs]:
    """(user lists by channel, similar lists by channel, popular) from a bundle's store."""
    uri = f"file:{quote(str(store_path.resolve()))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True)
    try:
        users: dict[int, dict[str, Pairs]] = {}
        recall = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'user_candidates'"
        ).fetchone()
        if recall:
            # The per-channel recall lists the online ranker fuses and scores.
            for user_id, channel, blob in conn.execute(
                "SELECT user_id, channel, items FROM user_candidates"
            ):
                ids, scores = unpack_candidates(blob)
                users.setdefault(int(user_id), {})[str(channel)] = list(
                    zip(ids.tolist(), scores.tolist(), strict=True)
                )
        else:  # older bundles: the ranked lists, split by channel
            for user_id, raw in conn.execute("SELECT user_id, items FROM user_recs"):
                lists = users.setdefault(int(user_id), {})
                for item_id, score, channel in json.loads(raw):
                    lists.setdefault(str(channel), []).append((int(item_id), float(score)))
        similar: dict[int, dict[str, Pairs]] = {}
        for item_id, raw in conn.execute("SELECT item_id, channel_items FROM similar_items"):
            doc = json.loads(raw)
            similar.setdefault(int(item_id), {})[str(doc["channel"])] = [
                (int(i), float(s)) for i, s in doc["items"]
            ]
        popular = [
            (int(i), float(s))
            for i, s in conn.execute("SELECT item_id, score FROM popular ORDER BY rank")
        ]
    finally:
        conn.close()
    return users, similar, popular


def publish_from_bundle(
    client: redis.Redis, bundle_dir: str | Path, version: str, *, prefix: str = "reco"
) -> int:
    """Write the bundle's lists under `version` and flip the version pointer last.

    Use a client with ordinary (offline) timeouts. Safe to run twice. Returns the number of
    keys written, the pointer excluded.
    """
    users, similar, popular = read_bundle_lists(Path(bundle_dir) / STORE_FILE)
    return publish_bundle_lists(client, version, users, similar, popular, prefix=prefix)
