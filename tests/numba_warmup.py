"""Fill numba's on-disk cache (``cache=True``) for the test suite, one part per process.

``python -m tests.numba_warmup PART DATA_DIR``. ``tests/conftest.py`` runs every part at once
before the xdist workers start: each part compiles different functions (~10 CPU-s each on a
fresh clone), so on 2 cores they take about half as long side by side as one after another,
and the workers and the `daedalus etl` children they start then load the cache instead of
compiling the same functions at the same time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from daedalus.backfill.intermediate import compact_frames
from daedalus.config import parse_config
from daedalus.etl import fastpath
from daedalus.etl.job import EtlJob
from tests.etl_helpers import place_databento_fixtures, recording_lines, write_segments


def book_engine(data: Path) -> None:
    """The Coinbase ETL on DuckDB's path: the book engine, the decoders, the bars."""
    write_segments(data, [recording_lines()[:300]])
    EtlJob(parse_config({"data_dir": str(data), "etl": {"l2_scanner": "duckdb"}})).run()


def level2_scanner(_data: Path) -> None:
    """The compiled level2 scanner (its one signature, as the ETL calls it)."""
    fastpath.warm_up()


def databento(data: Path) -> None:
    """The Databento ETL (record walker, MBO order map and book) in both decimal strategies,
    and the backfill's frame compaction."""
    compact_frames(np.zeros(2, np.int64), np.zeros(2, np.int8), np.arange(2, dtype=np.int64), np.zeros(2, np.bool_))
    for strategy in ("float", "pips"):
        root = data / strategy
        place_databento_fixtures(root)
        config = parse_config({"data_dir": str(root), "etl": {"decimal_strategy": strategy}})
        EtlJob(config, "databento").run()


PARTS = {"book_engine": book_engine, "level2_scanner": level2_scanner, "databento": databento}


def main() -> int:
    part, data = sys.argv[1], Path(sys.argv[2])
    data.mkdir(parents=True, exist_ok=True)
    PARTS[part](data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
