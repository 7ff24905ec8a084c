"""The ccxt ETL on both raw formats, side by side: records/s, CPU seconds and peak RSS.

The same unified records (trades, tickers and 20-level order books cut to 10, over a few
exchanges and symbols) are written once as Parquet raw segments (the record writer) and once
as NDJSON (zstd) segments (the segment writer through ``NdjsonRecordSink``), each in its own data
directory; then ``EtlJob(config, "ccxt").run()`` processes each in a child process (RSS is per
process) and the figures are printed beside each other. Both children run in the same
invocation, one after the other, so they share the machine's load.

    .venv/bin/python bench/ccxt_etl.py [--records 200000]
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
from typing import Any

from daedalus.capture.record_writer import RecordWriter
from daedalus.capture.segments import SegmentWriter
from daedalus.config import parse_config
from daedalus.sources.ccxt_raw import NdjsonRecordSink

MARKETS = [(f"ex{k % 3}", f"S{k}/USD") for k in range(13)]  # 13: every market gets every channel


def records(count: int) -> list[tuple[str, str, str, int, dict[str, Any]]]:
    """(channel, exchange, symbol, recv_ns, record): half trades, a quarter tickers, a quarter books."""
    t0 = time.time_ns() - 600 * 10**9
    out = []
    for i in range(count):
        exchange, symbol = MARKETS[i % len(MARKETS)]
        recv_ns, ms = t0 + i * 1000, (t0 + i * 1000) // 1_000_000
        kind = i % 4
        if kind < 2:
            record = {"id": str(i), "symbol": symbol, "timestamp": ms, "price": 65000.0 + i % 100, "amount": 0.01,
                      "cost": 650.0, "side": "buy" if i % 3 else "sell", "takerOrMaker": "taker", "type": None}
            out.append(("trades", exchange, symbol, recv_ns, record))
        elif kind == 2:
            record = {"symbol": symbol, "timestamp": ms, "bid": 64999.5, "ask": 65000.5, "last": 65000.0,
                      "bidVolume": 1.0, "askVolume": 2.0, "baseVolume": 1234.5, "quoteVolume": 8.0e7}
            out.append(("ticker", exchange, symbol, recv_ns, record))
        else:
            bids = [[64999.5 - j, 0.1 + j] for j in range(10)]
            asks = [[65000.5 + j, 0.2 + j] for j in range(10)]
            out.append(("orderbook", exchange, symbol, recv_ns,
                        {"symbol": symbol, "timestamp": ms, "nonce": i, "bids": bids, "asks": asks}))
    return out


def settings(data: Path, raw_format: str) -> dict[str, Any]:
    return {"data_dir": str(data), "coinbase": {"enabled": False},
            "ingestion": {"raw_format": raw_format, "raw_compression": "zstd", "segment_max_mb": 64, "fsync": False},
            "ccxt": {"enabled": True, "exchanges": {"ex0": {"channels": {"watchTrades": ["S0/USD"]}}}}}  # fmt: skip


def write(data: Path, raw_format: str, recs: list[tuple[str, str, str, int, dict[str, Any]]]) -> int:
    """Raw segments of ``raw_format`` in ``data``; returns their bytes."""
    config = parse_config(settings(data, raw_format))
    if raw_format == "parquet":
        writer: Any = RecordWriter(config.layout, config.ingestion, max_queued_bytes=2**40)
        sink: Any = writer
        writer.start()
    else:
        writer = SegmentWriter(config.layout, "ccxt", config.ingestion.model_copy(update={"queue_maxsize": 10**7}))
        config.layout.ensure("ccxt")
        writer.start()
        sink = NdjsonRecordSink(writer)
    for channel, exchange, symbol, recv_ns, record in recs:
        while not sink.put_record(channel=channel, exchange=exchange, symbol=symbol, recv_ns=recv_ns, record=record):
            time.sleep(0.001)  # the queue is full: let the writer drain
    assert writer.close(600)
    return sum(p.stat().st_size for p in (data / "raw" / "ready" / "ccxt").rglob("segment_*"))


def child(data: Path, raw_format: str) -> None:
    """Runs in its own process: the ETL over ``data``, figures as one JSON line."""
    from daedalus.etl.job import EtlJob

    config = parse_config(settings(data, raw_format))
    wall, cpu = time.perf_counter(), time.process_time()
    summary = EtlJob(config, "ccxt").run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rows = sum(summary.rows.values())
    print("RESULT " + json.dumps({"segments": summary.segments, "rows": rows, "wall_s": wall, "cpu_s": cpu,
                                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                  "quarantined": summary.quarantined_lines + summary.quarantined_segments}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1])
        return
    recs = records(args.records)
    print(f"{args.records:,} records over {len(MARKETS)} markets (1/2 trades, 1/4 tickers, 1/4 books of 10 levels)")
    print(f"{'raw format':<12}{'raw MB':>8}{'segments':>10}{'rows':>10}{'wall s':>8}{'CPU s':>7}"
          f"{'records/s':>11}{'records/CPU-s':>15}{'peak RSS MB':>13}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-ccxt-etl-") as tmp:
        for raw_format in ("parquet", "ndjson"):
            data = Path(tmp) / raw_format
            size = write(data, raw_format, recs)
            proc = subprocess.run([sys.executable, __file__, "--child", str(data), raw_format], capture_output=True,
                                  text=True, check=True)  # fmt: skip
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            r = json.loads(line.removeprefix("RESULT "))
            assert r["quarantined"] == 0, r
            print(f"{raw_format:<12}{size / 1e6:>8.1f}{r['segments']:>10,}{r['rows']:>10,}{r['wall_s']:>8.2f}"
                  f"{r['cpu_s']:>7.2f}{args.records / r['wall_s']:>11,.0f}{args.records / r['cpu_s']:>15,.0f}"
                  f"{r['peak_rss_mb']:>13.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
