"""Read a processed dataset back with DuckDB and Polars; print one JSON line of facts.

Run by ``make pi-check`` twice: under ``qemu-aarch64 -cpu cortex-a72`` on the emulated ETL's
output and natively on the native ETL's output; the two lines must be equal. Inside one run
DuckDB and Polars must agree with each other, so both engines are exercised on the Pi's CPU.
Standalone (no daedalus import) so it also checks the two libraries without the project.

Usage: python readback.py PROCESSED_DIR   (PROCESSED_DIR holds coinbase/<channel>/...)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import duckdb
import polars as pl


def _duckdb_facts(root: Path, channels: list[str]) -> dict[str, object]:
    con = duckdb.connect()
    counts = {}
    for channel in channels:
        glob = str(root / channel / "**" / "*.parquet")
        query = f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning=true)"
        counts[channel] = con.execute(query).fetchone()[0]
    glob = str(root / "level2" / "**" / "*.parquet")
    rows = con.execute(
        f"""SELECT product_id, arg_max(best_bid, (ts_recv, seq)), arg_max(best_ask, (ts_recv, seq))
            FROM read_parquet('{glob}', hive_partitioning=true) GROUP BY product_id ORDER BY product_id"""
    ).fetchall()
    return {"rows": counts, "final_bbo": {p: [bid, ask] for p, bid, ask in rows}}


def _polars_facts(root: Path, channels: list[str]) -> dict[str, object]:
    counts = {}
    for channel in channels:
        frame = pl.scan_parquet(root / channel / "**" / "*.parquet", hive_partitioning=True)
        counts[channel] = frame.select(pl.len()).collect().item()
    level2 = pl.scan_parquet(root / "level2" / "**" / "*.parquet", hive_partitioning=True)
    last = (
        level2.sort("ts_recv", "seq")
        .group_by("product_id")
        .agg(pl.col("best_bid").last(), pl.col("best_ask").last())
        .sort("product_id")
        .collect()
    )
    return {"rows": counts, "final_bbo": {r[0]: [r[1], r[2]] for r in last.iter_rows()}}


def main() -> int:
    root = Path(sys.argv[1]) / "coinbase"
    channels = sorted(p.name for p in root.iterdir() if p.is_dir())
    by_duckdb, by_polars = _duckdb_facts(root, channels), _polars_facts(root, channels)
    if by_duckdb != by_polars:
        print(f"DuckDB and Polars disagree:\n  duckdb {by_duckdb}\n  polars {by_polars}", file=sys.stderr)
        return 1
    facts = {**by_duckdb, "duckdb": duckdb.__version__, "polars": pl.__version__}
    print(json.dumps(facts, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
