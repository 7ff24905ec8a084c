"""The compiled scanner alone (``daedalus.etl.l2scan.scan``), channel by channel.

Reads one raw Coinbase segment (plain NDJSON), splits its lines by channel, and times the
scanner over each channel's lines in memory (no I/O, no DuckDB, no output): MB per CPU-s,
CPU-us per line, and how many lines it accepted and handed back. Best of ``--rounds``.

    .venv/bin/python bench/etl.py --gb 0.3 --segment-mb 256 --keep /tmp/seg --rounds 1 \
        --baseline-mb 0 --scan-baseline-mb 0
    .venv/bin/python bench/scanner.py /tmp/seg/raw/ready/coinbase/segment_*_00001.ndjson

Use it to see a change to the scanner in isolation (run it in both trees, alternately).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from daedalus.etl import fastpath, l2scan

CHANNELS = ("l2_data", "market_trades")
MB = 1_000_000


def lines_of(segment: Path, channel: str, limit: int) -> bytes:
    """The segment's lines of ``channel`` (its name in the first 120 bytes), at most ``limit`` bytes."""
    marker = f'"channel":"{channel}"'.encode()
    out, size = [], 0
    with segment.open("rb") as handle:
        for line in handle:
            if marker in line[:120]:
                out.append(line)
                size += len(line)
                if size >= limit:
                    break
    return b"".join(out)


def scan_once(data: np.ndarray) -> tuple[float, np.ndarray]:
    """CPU seconds of one scan of ``data`` (outputs sized to hold all of it) and its counters."""
    lines = int(np.count_nonzero(data == 10)) + 1
    out = fastpath._Out(lines, 8 * lines + 1024, 2 * lines, 2 * lines)
    segment = fastpath.ScanSegment(Path(), Path(), None, 0)
    meta = np.zeros(l2scan.N_META, np.int64)
    started = time.process_time()
    out.scan(data, data.shape[0], True, 1 << 62, time.time_ns(), segment, meta)
    return time.process_time() - started, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("segment", type=Path, help="a raw Coinbase segment (.ndjson)")
    parser.add_argument("--mb", type=float, default=100, help="MB of each channel's lines to scan, at most")
    parser.add_argument("--rounds", type=int, default=3, help="scans per channel (best kept)")
    args = parser.parse_args()
    fastpath.warm_up()  # numba's cache loaded before any clock starts
    for channel in CHANNELS:
        text = lines_of(args.segment, channel, int(args.mb * MB))
        if not text:
            print(f"{channel:>14}: no lines")
            continue
        data = np.frombuffer(text, np.uint8).copy()
        best, meta = min((scan_once(data) for _ in range(args.rounds)), key=lambda r: r[0])
        n = int(meta[l2scan.M_FRAMES] + meta[l2scan.M_FALLBACK])
        print(f"{channel:>14}: {len(text) / MB:,.1f} MB, {n:,} lines in {best:.3f} CPU-s: "
              f"{len(text) / MB / best:,.0f} MB per CPU-s, {best / n * 1e6:.2f} CPU-us a line; "
              f"accepted {int(meta[l2scan.M_FRAMES]):,}, handed back {int(meta[l2scan.M_FALLBACK]):,}")  # fmt: skip


if __name__ == "__main__":
    main()
