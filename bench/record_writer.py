"""Parquet record writer (``raw_format: parquet``): records/s sustained and RSS with 350 partitions.

Each configuration runs in its own process (RSS is per process): the producer thread stands in
for the collectors, putting ccxt unified records round-robin over 350 partitions (150 trades,
100 ticker, 100 order book with 20 levels a side) as fast as the queue accepts them (retrying
on overflow), then ``close()`` finalises every segment into ready/. Reported:

- records/s from the first put to the end of ``close()`` (every record in Parquet in ready/),
- RSS after imports and a warm-up (baseline), the peak sampled every 20 ms while writing, and
  the writer's memory as peak - baseline (the seeds' figure to compare: < 10 MB), also split
  into the peak while records are fed and the peak during ``close()`` (flush + 350 conversions),
- the writer's own account of buffered rows: flushes forced early by its buffer budget and the
  peak of buffered bytes (``RecordWriterStats.peak_buffered_bytes``), and of its input queue
  (peak entries and estimated bytes, when the writer has a queue byte budget).

``--fresh`` hands the writer a new copy of each record (new dict, new level lists), as a collector
does; without it the records come from a small shared pool allocated before the baseline, so the
records waiting in the writer's queue cost nothing measurable (the queue's entries only).

``--before FILE`` also runs every configuration with the RecordWriter of FILE (e.g. the previous
commit's ``record_writer.py``), each pair back to back, so both columns share the machine's load.

    .venv/bin/python bench/record_writer.py [--records 200000] [--fresh] [--before /tmp/record_writer_before.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from daedalus.capture.record_writer import RecordWriter
from daedalus.config import IngestionConfig
from daedalus.layout import DataLayout

SEEDS_WRITER_MB = 10  # the seeds' figure: < 10 MB writer memory
PARTITIONS = [("trades", f"ex{k % 5}", f"T{k}/USD") for k in range(150)] + \
    [("ticker", f"ex{k % 5}", f"K{k}/USD") for k in range(100)] + \
    [("orderbook", f"ex{k % 5}", f"B{k}/USD") for k in range(100)]  # fmt: skip


def sample_records(channel: str, count: int = 64) -> list[dict[str, Any]]:
    """A pool of unified records, reused (the writer never mutates them), so the producer's
    cost stays small beside the writer's."""
    ms = int(time.time() * 1000)
    if channel == "trades":
        return [{"id": str(i), "symbol": "X/USD", "timestamp": ms + i, "price": 65000.0 + i, "amount": 0.01,
                 "cost": 650.0, "side": "buy", "takerOrMaker": "taker", "type": None} for i in range(count)]
    if channel == "ticker":
        return [{"symbol": "X/USD", "timestamp": ms + i, "bid": 64999.0, "ask": 65001.0, "last": 65000.0 + i,
                 "bidVolume": 1.5, "askVolume": 2.5, "baseVolume": 1000.0, "quoteVolume": 6.5e7}
                for i in range(count)]
    return [{"symbol": "X/USD", "timestamp": ms + i, "nonce": i,
             "bids": [[65000.0 - k, 0.1 + k] for k in range(20)], "asks": [[65001.0 + k, 0.2 + k] for k in range(20)]}
            for i in range(count)]  # fmt: skip


def writer_class(path: str | None) -> type[RecordWriter]:
    """RecordWriter, or the one defined in the file ``path`` (another version, for comparison)."""
    if not path:
        return RecordWriter
    spec = importlib.util.spec_from_file_location("record_writer_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.RecordWriter


def copy_record(record: dict[str, Any]) -> dict[str, Any]:
    """A new dict (and new [price, amount] lists for a book), the objects a collector hands over."""
    fresh = dict(record)
    for side in ("bids", "asks"):
        if side in fresh:
            fresh[side] = [[price, amount] for price, amount in fresh[side]]
    return fresh


def run_one(records: int, max_open_writers: int, fsync: bool, module: str | None = None,
            fresh: bool = False) -> dict[str, Any]:  # fmt: skip
    RecordWriter = writer_class(module)
    process = psutil.Process()
    pools = {channel: sample_records(channel) for channel in ("trades", "ticker", "orderbook")}
    with tempfile.TemporaryDirectory(prefix="bench-rw-", dir=os.environ.get("BENCH_DIR")) as tmp:
        layout = DataLayout(Path(tmp))
        config = IngestionConfig(fsync=fsync, max_open_writers=max_open_writers)  # batch 100, flush 5 s
        warm = RecordWriter(layout, config, source="warmup")
        feed(warm, pools, 3 * len(PARTITIONS), fresh)
        warm.close(60)
        baseline = process.memory_info().rss
        peak = {"feed": baseline, "close": baseline}
        phase = ["feed"]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                peak[phase[0]] = max(peak[phase[0]], process.memory_info().rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        writer = RecordWriter(layout, config)
        writer.start()
        started = time.perf_counter()
        feed(writer, pools, records, fresh)
        phase[0] = "close"
        assert writer.close(600)
        elapsed = time.perf_counter() - started
        done.set()
        sampler.join()
        top = max(peak.values())
        stats = writer.stats
        assert stats.records_written == records, stats
        files = list(layout.ready("ccxt").rglob("*.parquet"))
        size = sum(f.stat().st_size for f in files)
    return {"records": records, "max_open_writers": max_open_writers, "fsync": fsync,
            "records_per_s": round(records / elapsed), "seconds": round(elapsed, 2),
            "rss_baseline_mb": round(baseline / 2**20, 1), "rss_peak_mb": round(top / 2**20, 1),
            "writer_mb": round((top - baseline) / 2**20, 1),
            "feed_mb": round((peak["feed"] - baseline) / 2**20, 1),
            "close_mb": round((peak["close"] - baseline) / 2**20, 1), "files": len(files),
            "parquet_mb": round(size / 2**20, 1), "overflow_retries": stats.overflow,
            "evictions": stats.evictions, "flushes": stats.flushes, "early_flushes": getattr(stats, "early_flushes", 0),
            "compactions": getattr(stats, "compactions", 0),
            "peak_buffered_mb": round(getattr(stats, "peak_buffered_bytes", 0) / 2**20, 1),
            "peak_queue": getattr(stats, "peak_queue_depth", None),
            "peak_queued_mb": round(getattr(stats, "peak_queued_bytes", 0) / 2**20, 1),
            "fresh_records": fresh, "target_met": top - baseline < SEEDS_WRITER_MB * 2**20}  # fmt: skip


def feed(writer: RecordWriter, pools: dict[str, list[dict[str, Any]]], records: int, fresh: bool = False) -> None:
    recv = time.time_ns()
    count = len(PARTITIONS)
    for i in range(records):
        channel, exchange, symbol = PARTITIONS[i % count]
        pool = pools[channel]
        record = copy_record(pool[i % len(pool)]) if fresh else pool[i % len(pool)]
        while not writer.put_record(channel=channel, exchange=exchange, symbol=symbol, recv_ns=recv + i,
                                    record=record):  # fmt: skip
            time.sleep(0.0005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=400_000)
    parser.add_argument("--before", help="a record_writer.py to run beside the current one")
    parser.add_argument("--fresh", action="store_true", help="a new copy of each record, as a collector hands over")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # max_open_writers,fsync: run in this process
    args = parser.parse_args()
    if args.one:
        writers, fsync = args.one.split(",")
        print(json.dumps(run_one(args.records, int(writers), fsync == "1", args.before, args.fresh)))
        return
    print(f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}, "
          f"{len(PARTITIONS)} partitions, {args.records} records, fresh records: {args.fresh}")  # fmt: skip
    header = ("version", "max_open_writers", "fsync", "records_per_s", "seconds", "rss_baseline_mb", "rss_peak_mb",
              "writer_mb", "feed_mb", "close_mb", "seeds_target_mb", "target_met", "files", "parquet_mb", "evictions",
              "flushes", "early_flushes", "compactions", "peak_buffered_mb", "peak_queue",
              "peak_queued_mb")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    versions = [("before", args.before), ("current", None)] if args.before else [("current", None)]
    for writers, fsync in ((350, 0), (350, 1), (64, 1)):
        for version, module in versions:
            command = [sys.executable, __file__, "--records", str(args.records), "--one", f"{writers},{fsync}"]
            command += ["--fresh"] if args.fresh else []
            out = subprocess.run(command + (["--before", module] if module else []),
                                 check=True, capture_output=True, text=True).stdout  # fmt: skip
            result = json.loads(out.strip().splitlines()[-1]) | {"version": version, "seeds_target_mb": "< 10"}
            print("| " + " | ".join(str(result[k]) for k in header) + " |", flush=True)


if __name__ == "__main__":
    main()
