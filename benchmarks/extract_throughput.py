"""Rows per second the real extractor pulls from MariaDB into the lake.

Creates its own database (``reco_bench_extract``) with the business ``api_order`` table from
the shipped DDL, loads N rows (many share an ``updated_at`` second, as in production), then
times with the contract's own settings for ``business.api_order``:

* the initial load (no watermark: keyset pages of ``--batch-rows`` over the whole table),
* an incremental run after updating ``--updates`` rows (reads the lag/lookback window),
* a delete reconcile after deleting ``--deletes`` rows,
* reading the merged view back and compacting it.

Writes ``benchmarks/results/extract_throughput.json`` and drops the database.

    .venv/bin/python -m benchmarks.extract_throughput [--rows 1000000] [--batch-rows 50000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import MySQLdb
import sqlalchemy as sa

from apps.pipeline.extract import InMemoryWatermarkStore, extract_table, reconcile_deletes
from apps.pipeline.lake import Lake
from apps.pipeline.sources.contract import load_contract
from apps.pipeline.sources.db import make_engine

ROOT = Path(__file__).resolve().parents[1]
DATABASE = "reco_bench_extract"
RESULTS = ROOT / "benchmarks" / "results" / "extract_throughput.json"


def ddl(table: str) -> str:
    text = (ROOT / "apps/pipeline/sources/ddl/business_schema.sql").read_text(encoding="utf-8")
    match = re.search(rf"CREATE TABLE `{table}` \(.*?\) ENGINE=[^;]*;", text, re.DOTALL)
    if match is None:
        raise SystemExit(f"no DDL for {table}")
    return match.group(0)


def timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-rows", type=int, default=50_000)
    parser.add_argument("--updates", type=int, default=10_000)
    parser.add_argument("--deletes", type=int, default=1_000)
    parser.add_argument("--host", default=os.environ.get("TEST_MARIADB_HOST", "127.0.0.1"))
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("TEST_MARIADB_PORT", "3306"))
    )
    parser.add_argument("--user", default="root")
    args = parser.parse_args()

    spec = load_contract(ROOT / "config/sources.yaml").table("business.api_order")
    admin = MySQLdb.connect(host=args.host, port=args.port, user=args.user, passwd="")
    admin.cursor().execute(f"DROP DATABASE IF EXISTS `{DATABASE}`")
    admin.cursor().execute(f"CREATE DATABASE `{DATABASE}` CHARACTER SET utf8mb4")
    engine = make_engine(f"mysql://{args.user}@{args.host}:{args.port}/{DATABASE}")
    try:
        with engine.begin() as conn:
            version = conn.execute(sa.text("SELECT VERSION()")).scalar_one()
            conn.execute(sa.text(ddl("api_order")))
        # updated_at spans one day: about a dozen rows share every second (ties).
        load_sql = sa.text(
            "INSERT INTO api_order (order_no, user_id, dataset_id, amount, status, created_at,"
            " updated_at) SELECT CONCAT('ORD-', seq), 1 + seq % 50000, 1 + seq % 5000,"
            " (seq % 100000) / 100, ELT(1 + seq % 3, 'pending', 'paid', 'refunded'),"
            " UTC_TIMESTAMP() - INTERVAL 2 DAY + INTERVAL (seq % 86400) SECOND,"
            " UTC_TIMESTAMP() - INTERVAL 1 DAY - INTERVAL (seq % 86400) SECOND"
            f" FROM seq_1_to_{args.rows}"
        )

        def load() -> None:
            with engine.begin() as conn:
                conn.execute(load_sql)

        _, load_s = timed(load)

        with tempfile.TemporaryDirectory(prefix="reco-bench-lake-") as tmp:
            lake, store = Lake(tmp), InMemoryWatermarkStore()

            def extract() -> Any:
                return extract_table(
                    engine, spec, lake, store, fence_token=1, batch_rows=args.batch_rows
                )

            initial, initial_s = timed(extract)
            lake_bytes = sum(p.stat().st_size for p in Path(tmp).rglob("*.parquet"))

            with engine.begin() as conn:
                conn.execute(
                    sa.text(
                        "UPDATE api_order SET status = 'paid',"
                        " updated_at = UTC_TIMESTAMP() - INTERVAL 60 SECOND"
                        f" ORDER BY id LIMIT {args.updates}"
                    )
                )
            incremental, incremental_s = timed(extract)

            with engine.begin() as conn:
                conn.execute(
                    sa.text(f"DELETE FROM api_order ORDER BY id DESC LIMIT {args.deletes}")
                )
            deleted, reconcile_s = timed(
                lambda: reconcile_deletes(
                    engine, spec, lake, fence_token=1, batch_rows=args.batch_rows
                )
            )
            view, read_s = timed(lambda: lake.read_table("business", "api_order"))
            _, compact_s = timed(lambda: lake.compact("business", "api_order", token=1))
            _, read_compacted_s = timed(lambda: lake.read_table("business", "api_order"))

        expected_rows = args.rows - args.deletes
        if len(view) != expected_rows:
            raise SystemExit(f"lake has {len(view)} rows, source {expected_rows}")
        result = {
            "benchmark": "extract_throughput",
            "command": "python -m benchmarks.extract_throughput "
            f"--rows {args.rows} --batch-rows {args.batch_rows}",
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
                "source": f"MariaDB {version} on {args.host}:{args.port} (shared, loopback)",
            },
            "table": spec.key,
            "columns": len(spec.columns),
            "rows": args.rows,
            "batch_rows": args.batch_rows,
            "load_seconds": round(load_s, 2),
            "initial": {
                "rows": initial.rows_read,
                "batches": initial.batches,
                "seconds": round(initial_s, 2),
                "rows_per_second": round(initial.rows_read / initial_s),
                "lake_mib": round(lake_bytes / 2**20, 1),
            },
            "incremental": {
                "rows_updated": args.updates,
                "rows_read": incremental.rows_read,
                "seconds": round(incremental_s, 2),
                "note": "reads the whole lookback window (900 s for api_order), not just the updates",
            },
            "reconcile": {
                "rows_deleted": deleted,
                "seconds": round(reconcile_s, 2),
                "keys_per_second": round(args.rows / reconcile_s),
            },
            "read_table_seconds": {
                "batches": round(read_s, 2),
                "compacted": round(read_compacted_s, 2),
            },
            "compact_seconds": round(compact_s, 2),
        }
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(result, indent=2))
    finally:
        engine.dispose()
        admin.cursor().execute(f"DROP DATABASE IF EXISTS `{DATABASE}`")
        admin.close()


if __name__ == "__main__":
    main()
