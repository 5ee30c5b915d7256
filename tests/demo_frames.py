"""Clean canonical frames of a small demo marketplace, through the real pure stages.

demo -> extract (in-memory watermarks and lock) -> lake -> canonical -> clean; shared by the
tests that need realistic data without Django.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from apps.pipeline import canonical, demo
from apps.pipeline.clean import DataCleaner
from apps.pipeline.extract import InMemoryLockManager, InMemoryWatermarkStore, extract_source
from apps.pipeline.lake import Lake
from apps.pipeline.sources.contract import load_contract
from apps.pipeline.sources.db import make_engine

CONTRACT = Path(__file__).resolve().parent.parent / "config" / "sources.yaml"


def write_demo_sources(root: Path, config: demo.DemoConfig) -> dict[str, str]:
    """Generate ``config`` into business + Matomo SQLite files under ``root``; their URLs."""
    urls = {
        "business": f"sqlite:///{root / 'business.sqlite3'}",
        "matomo": f"sqlite:///{root / 'matomo.sqlite3'}",
    }
    b_engine, m_engine = make_engine(urls["business"]), make_engine(urls["matomo"])
    try:
        demo.generate(b_engine, m_engine, config)
    finally:
        b_engine.dispose()
        m_engine.dispose()
    return urls


def demo_clean_frames(root: Path, config: demo.DemoConfig) -> dict[str, pd.DataFrame]:
    """Generate ``config`` into SQLite files under ``root`` and return the clean frames."""
    engines = {
        "business": make_engine(f"sqlite:///{root / 'business.sqlite3'}"),
        "matomo": make_engine(f"sqlite:///{root / 'matomo.sqlite3'}"),
    }
    demo.generate(engines["business"], engines["matomo"], config)
    contract = load_contract(CONTRACT)
    lake = Lake(root / "raw")
    raw = {}
    try:
        for name, source in contract.sources.items():
            extract_source(
                engines[name],
                source,
                lake,
                InMemoryWatermarkStore(),
                InMemoryLockManager(),
                holder="test",
            )
            for spec in source.tables.values():
                if lake.exists(spec.source, spec.name):
                    raw[spec.key] = lake.read_table(spec.source, spec.name)
    finally:
        for engine in engines.values():
            engine.dispose()
    built = canonical.build_canonical(raw, contract)
    frames = {"users": built.users, "items": built.items, "interactions": built.interactions}
    return DataCleaner(now=pd.Timestamp(config.resolved_end(), tz="UTC")).clean(frames).frames
