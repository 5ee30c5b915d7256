"""Load a bundle's ranker as a scorer of feature rows (the promotion gate's smoke test). Pure core."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apps.pipeline import features as ft
from apps.pipeline.train import ranker as rk

SMOKE_REQUESTS_FILE = "smoke_requests.json"


def load_scorer(bundle_dir: Path) -> Callable[[list[dict[str, Any]]], Sequence[float]]:
    """Return ``score(rows) -> scores`` for the bundle's ranker, in the manifest's feature order.

    A row is ``{feature name: value}``; a missing feature takes the catalogue default, so the
    scorer sees exactly the matrix the serving path would build.
    """
    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text(encoding="utf-8"))
    names = [f["name"] for f in manifest["features"]]
    defaults = np.array(
        [ft.spec_default(n) if n in ft.FEATURE_NAMES else 0.0 for n in names], dtype=np.float32
    )
    ranker = rk.load_ranker(bundle_dir / "ranker")

    def score(rows: list[dict[str, Any]]) -> Sequence[float]:
        matrix = np.tile(defaults, (len(rows), 1))
        for r, row in enumerate(rows):
            for c, name in enumerate(names):
                if name in row:
                    matrix[r, c] = row[name]
        return ranker.predict(matrix).astype(float).tolist()

    return score


def write_smoke_requests(
    bundle_dir: Path,
    matrix: np.ndarray,
    names: Sequence[str],
    *,
    requests: int = 10,
    rows: int = 50,
) -> None:
    """Save real feature rows from training as the bundle's smoke-test requests."""
    out = []
    for r in range(min(requests, max(1, len(matrix) // rows))):
        block = matrix[r * rows : (r + 1) * rows]
        out.append(
            [{n: round(float(v), 6) for n, v in zip(names, row, strict=True)} for row in block]
        )
    (Path(bundle_dir) / SMOKE_REQUESTS_FILE).write_text(json.dumps(out), encoding="utf-8")
