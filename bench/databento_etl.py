"""The Databento ETL on a large generated MBO segment: records/s, MB/s, CPU seconds, peak RSS.

One segment in the capture's format (metadata frame, then per 16,384 records a stamps frame and
a zstd data frame) holding ``--records`` MBO records over four instruments, generated with numpy
(the official dtype, no per-record Python): per step an Add, a Modify that moves an earlier order
by a tick, a full Cancel of an older order, and a Trade, so ~2,500 orders rest per book. Then
``EtlJob(config, "databento").run()`` processes it in a child process (RSS is per process) and
prints the figures. With ``--schema trades`` the same number of trade records instead
(``market_trades``: the decode and write path without the book).

    .venv/bin/python bench/databento_etl.py [--records 2000000] [--schema mbo|trades] [--strategy float]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zstandard

from daedalus.sources.databento_raw import stamps_frame

FRAME_RECORDS = 16_384
INSTRUMENTS = 4
LAG = 10_000  # an order is cancelled this many steps after its add (~LAG/INSTRUMENTS resting per book)
TICK = 250_000_000


def mbo_records(count: int) -> np.ndarray:
    """A consistent MBO stream: step k = Add(k), Modify(k - LAG/2) one tick away, Cancel(k - LAG), Trade."""
    import databento_dbn as dbn

    steps = count // 4
    k = np.arange(steps, dtype=np.int64)
    rng = np.random.default_rng(1)
    side = np.where(rng.random(steps) < 0.5, ord("B"), ord("A")).astype(np.uint8)
    offset = rng.integers(1, 40, steps)
    base = 5000 * TICK + (k % INSTRUMENTS) * 1000 * TICK
    price = np.where(side == ord("B"), base - offset * TICK, base + offset * TICK)
    size = rng.integers(1, 30, steps).astype(np.uint32)
    out = np.zeros((steps, 4), np.dtype(dbn.MBOMsg._dtypes))
    ts = 1_767_225_600_000_000_000 + np.arange(steps * 4, dtype=np.uint64).reshape(steps, 4) * 1000
    out["length"], out["rtype"], out["publisher_id"] = 56 // 4, 160, 1
    out["ts_event"], out["ts_recv"] = ts, ts + 500
    out["sequence"] = np.arange(steps * 4, dtype=np.uint32).reshape(steps, 4)
    out["flags"] = 128

    def fill(col: int, ids: np.ndarray, action: str, px: np.ndarray, sz: np.ndarray, sd: np.ndarray) -> None:
        out["instrument_id"][:, col] = 1 + ids % INSTRUMENTS
        out["order_id"][:, col] = ids
        out["action"][:, col] = action.encode()
        out["side"][:, col] = sd.view("S1")
        out["price"][:, col] = px
        out["size"][:, col] = sz

    moved = np.maximum(k - LAG // 2, 0)
    old = np.maximum(k - LAG, 0)
    fill(0, k, "A", price, size, side)
    fill(1, moved, "M", price[moved] + TICK * np.where(side[moved] == ord("B"), -1, 1), size[moved], side[moved])
    fill(2, old, "C", price[old] + TICK * np.where(side[old] == ord("B"), -1, 1), size[old], side[old])
    fill(3, k, "T", price, np.ones(steps, np.uint32), side)
    out[:LAG, 2]["action"] = b"N"  # nothing to cancel yet
    out[: LAG // 2, 1]["action"] = b"N"
    return out.reshape(-1)


def trade_records(count: int) -> np.ndarray:
    import databento_dbn as dbn

    out = np.zeros(count, np.dtype(dbn.TradeMsg._dtypes))
    ts = 1_767_225_600_000_000_000 + np.arange(count, dtype=np.uint64) * 1000
    out["length"], out["rtype"], out["publisher_id"] = 48 // 4, 0, 1
    out["instrument_id"] = 1 + np.arange(count) % INSTRUMENTS
    out["ts_event"], out["ts_recv"] = ts, ts + 500
    out["price"] = 5000 * TICK + (np.arange(count) % 7) * TICK
    out["size"], out["action"], out["side"], out["sequence"] = 1, b"T", b"B", np.arange(count)
    return out


def write_segment(data_dir: Path, records: np.ndarray) -> Path:
    """The segment, in the capture's layout, with symbol mappings at its head."""
    import databento_dbn as dbn

    cctx = zstandard.ZstdCompressor(level=3)
    header = dbn.Metadata("GLBX.MDP3", 0, None, dbn.SType.INSTRUMENT_ID, None).encode()
    maps = [bytes(dbn.SymbolMappingMsg(0, i, 0, dbn.SType.RAW_SYMBOL, f"SYM{i}", dbn.SType.INSTRUMENT_ID, f"SYM{i}",
                                       2**64 - 1, 2**64 - 1)) for i in range(1, INSTRUMENTS + 1)]  # fmt: skip
    path = data_dir / "raw" / "ready" / "databento" / "GLBX.MDP3" / "segment_20260101T00_00001.dbn.zst"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        out.write(cctx.compress(header))
        out.write(stamps_frame([(1, len(maps), 0)]) + cctx.compress(b"".join(maps)))
        for start in range(0, records.shape[0], FRAME_RECORDS):
            part = records[start : start + FRAME_RECORDS]
            out.write(stamps_frame([(start + 1, part.shape[0], 1)]))
            out.write(cctx.compress(part.tobytes()))
    return path


def child(data_dir: str, strategy: str) -> None:
    from daedalus.config import parse_config
    from daedalus.etl.job import EtlJob

    config = parse_config({"data_dir": data_dir, "etl": {"decimal_strategy": strategy}})
    EtlJob(config, "databento").prepare()  # numba compiled (cached) outside the timing
    wall, cpu = time.perf_counter(), time.process_time()
    summary = EtlJob(config, "databento").run()
    result = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
              "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "rows": dict(summary.rows), "counts": dict(summary.counts)}  # fmt: skip
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=2_000_000)
    parser.add_argument("--schema", choices=["mbo", "trades"], default="mbo")
    parser.add_argument("--strategy", choices=["float", "pips", "decimal"], default="float")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.strategy)
        return
    with tempfile.TemporaryDirectory(prefix="bench-dbn-") as tmp:
        records = mbo_records(args.records) if args.schema == "mbo" else trade_records(args.records)
        # warm the numba cache on a small segment first, so compile time is not counted
        warm = Path(tmp) / "warm"
        write_segment(warm, records[:50_000])
        subprocess.run([sys.executable, __file__, "--child", str(warm), "--strategy", args.strategy], check=True,
                       capture_output=True)  # fmt: skip
        path = write_segment(Path(tmp) / "data", records)
        raw_mb, file_mb = records.nbytes / 1e6, path.stat().st_size / 1e6
        command = [sys.executable, __file__, "--child", str(Path(tmp) / "data"), "--strategy", args.strategy]
        out = subprocess.run(command, check=True, capture_output=True, text=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        n = records.shape[0]
        print(f"{args.schema}: {n:,} records, {raw_mb:,.1f} MB DBN ({file_mb:,.1f} MB zstd segment), "
              f"strategy {args.strategy}")  # fmt: skip
        print(f"wall {result['wall_s']:.2f}s  cpu {result['cpu_s']:.2f}s  peak RSS {result['rss_mb']:.0f} MB")
        print(f"{n / result['wall_s']:,.0f} records/s  {raw_mb / result['wall_s']:,.1f} MB/s DBN  "
              f"{n / result['cpu_s']:,.0f} records per CPU-s")  # fmt: skip
        print("rows: " + ", ".join(f"{k}={v:,}" for k, v in sorted(result["rows"].items())))
        print("counts: " + ", ".join(f"{k}={v:,}" for k, v in sorted(result["counts"].items())))


if __name__ == "__main__":
    main()
