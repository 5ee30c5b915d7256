"""Read and write sets of canonical frames as Parquet files, atomically. Pure core."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from apps.pipeline import schema


def write_frames(directory: Path, frames: Mapping[str, pd.DataFrame]) -> dict[str, str]:
    """Write each frame to ``directory/<name>.parquet`` via a temp file and an atomic rename.

    A reader never sees a half-written file: it sees the previous version or the new one.
    """
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, frame in frames.items():
        final = directory / f"{name}.parquet"
        tmp = directory / f".{name}.parquet.tmp-{os.getpid()}"
        frame.to_parquet(tmp, index=False)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        paths[name] = str(final)
    return paths


def read_frames(
    directory: Path, names: tuple[str, ...] = ("users", "items", "interactions")
) -> dict[str, pd.DataFrame]:
    """Read canonical frames written by ``write_frames``; a missing file is an empty frame."""
    frames = {}
    for name in names:
        path = directory / f"{name}.parquet"
        if path.is_file():
            frames[name] = pd.read_parquet(path)
        else:
            frames[name] = schema.empty_frame(schema.ENTITIES[name])
    return frames
