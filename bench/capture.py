"""Capture throughput: `daedalus ingest` beside the ccxt.pro coinbase client, same stream.

1. Generates a stream with the simulator's market model (level2 snapshots, then level2
   updates and trades for BTC-USD and ETH-USD) and writes it as a raw segment.
2. Serves it with `daedalus sim --replay ... --speed 0`: every client gets the identical
   frames, as fast as it reads them (TCP back-pressure paces the simulator).
3. Runs `daedalus ingest` (defaults: batch 100, fsync per flush) in its own process and
   measures, from its statistics block and psutil: frames/s until every frame is
   durable, CPU seconds per 100k frames, peak RSS, overflow, recv-to-durable latency.
4. Runs ccxt.pro coinbase (`watch_order_book_for_symbols` + `watch_trades_for_symbols`)
   on the same stream and measures frames/s until its books reflect the last frame.

    .venv/bin/python bench/capture.py [--frames 300000]

``--against DIR`` also runs the ingest of another checkout (e.g. ``git worktree add
/tmp/base HEAD~3``) on the same stream, alternating with this one at each speed, so a
change on the hot path is measured side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import ccxt.pro
import psutil
import yaml
from simproc import start_sim

from daedalus.capture.records import frame_line, iter_lines, split_frame_record
from daedalus.sim import protocol as wire
from daedalus.sim.market import MarketModel, product_spec

PRODUCTS = ("BTC-USD", "ETH-USD")
SYMBOLS = ["BTC/USD", "ETH/USD"]
STATS = re.compile(r"\[writer\] written=([\d,]+).*overflow=([\d,]+).*latency p50=([\d.]+)ms p99=([\d.]+)ms")


def generate(path: Path, frames: int, seed: int = 1) -> tuple[int, dict[str, str]]:
    """Write ``frames`` market frames as a raw segment; returns (frames, last l2 timestamp per product)."""
    rng = random.Random(seed)
    models = [MarketModel(product_spec(p), random.Random(seed + i)) for i, p in enumerate(PRODUCTS)]
    t = 1_786_309_200_000_000_000
    lines: list[bytes] = []
    last_l2: dict[str, str] = {}

    def add(channel: str, events: str) -> None:
        nonlocal t
        t += 10_000
        stamp = wire.rfc3339(t)
        lines.append(frame_line(t, 1, wire.envelope(channel, stamp, len(lines), events, None).decode()))
        if channel == "l2_data":
            last_l2[events.split('"product_id":"', 1)[1].split('"', 1)[0]] = stamp

    for model in models:
        add("l2_data", wire.l2_snapshot_events(model, t))
    while len(lines) < frames:
        model = rng.choice(models)
        step = model.step(t)
        if step.changes:
            add("l2_data", wire.l2_update_events(model, step))
        if step.trade:
            add("market_trades", wire.trades_events(model, [step.trade], "update"))
    path.write_bytes(b"".join(lines))
    return len(lines), last_l2


async def start_replay(recording: Path, speed: float) -> tuple[asyncio.subprocess.Process, str]:
    return await start_sim("--replay", str(recording), "--speed", str(speed))


async def run_ingest(ws_url: str, workdir: Path, total: int, tree: Path | None = None) -> dict[str, float]:
    """One ingest process on the stream; ``tree``: import ``daedalus`` from that checkout."""
    config = {
        "data_dir": str(workdir / "data"),
        "logging": {"level": "WARNING"},
        "coinbase": {"ws_url": ws_url, "rest_url": ws_url.replace("ws://", "http://").removesuffix("/ws")},
    }
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "ingest.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daedalus",
        "ingest",
        "--config",
        str(path),
        "--stats-interval",
        "0.25",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(tree)} if tree else None,
    )
    assert proc.stdout is not None
    ps = psutil.Process(proc.pid)
    port = int(ws_url.rsplit(":", 1)[1].split("/")[0])
    while not any(c.raddr and c.raddr.port == port for c in ps.net_connections()):
        await asyncio.sleep(0.005)
    cpu_start = ps.cpu_times()  # connected: from here on the CPU goes to the stream
    peak_rss = 0
    written = 0
    match = None
    dropped = 0
    async with asyncio.timeout(600):
        while written + dropped < total:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise RuntimeError("daedalus ingest exited early")
            peak_rss = max(peak_rss, ps.memory_info().rss)
            if match := STATS.search(line):
                written = int(match.group(1).replace(",", ""))
                dropped = int(match.group(2).replace(",", ""))
    cpu_end = ps.cpu_times()
    proc.terminate()
    await proc.wait()
    assert match is not None
    segments = sorted((workdir / "data/raw/ready/coinbase").iterdir())
    records = (split_frame_record(line) for f in segments for line in iter_lines(f))
    recv = [record[0] for record in records if record is not None]
    cpu = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
    spread = (max(recv) - min(recv)) / 1e9
    return {
        "frames_per_s": written / spread,
        "cpu_per_100k": cpu / total * 100_000,
        "cpu_share": cpu / spread,
        "rss_mb": peak_rss / 1e6,
        "overflow": dropped,
        "p50_ms": float(match.group(3)),
        "p99_ms": float(match.group(4)),
    }


async def run_ccxt(ws_url: str, total: int, last_l2: dict[str, str]) -> dict[str, float]:
    rest = ws_url.replace("ws://", "http://").removesuffix("/ws")
    exchange = ccxt.pro.coinbase({"urls": {"api": {"rest": rest, "ws": ws_url}}})
    me = psutil.Process()
    try:
        await exchange.load_markets()
        cpu0, t0 = me.cpu_times(), time.perf_counter()
        books = asyncio.create_task(_drain(exchange.watch_order_book_for_symbols, SYMBOLS))
        trades = asyncio.create_task(_drain(exchange.watch_trades_for_symbols, SYMBOLS))
        wanted = {s: last_l2[s.replace("/", "-")] for s in SYMBOLS}
        async with asyncio.timeout(900):
            while any(exchange.orderbooks.get(s, {}).get("datetime") != wanted[s] for s in SYMBOLS):
                await asyncio.sleep(0.01)
        elapsed, cpu1 = time.perf_counter() - t0, me.cpu_times()
        books.cancel()
        trades.cancel()
    finally:
        await exchange.close()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {"frames_per_s": total / elapsed, "cpu_per_100k": cpu / total * 100_000, "cpu_share": cpu / elapsed}


async def _drain(watch, symbols: list[str]) -> None:  # type: ignore[no-untyped-def]
    while True:
        await watch(symbols)


RATE_AT_SPEED_1 = 100_000  # the generated stream is stamped 10 us apart


async def main(frames: int, speeds: list[float], against: Path | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="daedalus-bench-") as tmp:
        workdir = Path(tmp)
        recording = workdir / "segment_20260809T21_00001.ndjson"
        started = time.perf_counter()
        total, last_l2 = generate(recording, frames)
        size_mb = recording.stat().st_size / 1e6
        print(f"stream: {total:,} frames, {size_mb:.0f} MB, generated in {time.perf_counter() - started:.1f}s")
        print(f"machine: {platform.machine()} {psutil.cpu_count()} cpus, Python {platform.python_version()}")
        print(
            f"{'':28}{'offered/s':>10}{'received/s':>12}{'overflow':>10}{'CPU s/100k':>12}{'CPU':>6}"
            f"{'RSS MB':>8}{'p50 ms':>8}{'p99 ms':>8}"
        )
        sustained = 0.0
        trees: list[tuple[str, Path | None]] = [("daedalus ingest", None)]
        if against:
            trees.append((f"  {against.name} (--against)", against))
        for run, speed in enumerate(speeds):
            for label, tree in trees if run % 2 == 0 else trees[::-1]:  # alternate who goes first
                sim, ws_url = await start_replay(recording, speed)
                try:
                    r = await run_ingest(ws_url, workdir / f"ingest-{run}-{tree is None}", total, tree)
                finally:
                    sim.terminate()
                    await sim.wait()
                offered = f"{RATE_AT_SPEED_1 * speed:,.0f}" if speed else "max"
                print(
                    f"{label[:27]:28}{offered:>10}{r['frames_per_s']:>12,.0f}{r['overflow']:>10,}"
                    f"{r['cpu_per_100k']:>12.2f}{r['cpu_share']:>6.0%}{r['rss_mb']:>8.0f}{r['p50_ms']:>8.1f}"
                    f"{r['p99_ms']:>8.1f}"
                )
                if r["overflow"] == 0 and tree is None:
                    sustained = max(sustained, r["frames_per_s"])
        sim, ws_url = await start_replay(recording, 0)
        try:
            c = await run_ccxt(ws_url, total, last_l2)
        finally:
            sim.terminate()
            await sim.wait()
        print(
            f"{'ccxt.pro coinbase (books+trades)':28}{'max':>10}{c['frames_per_s']:>12,.0f}{'-':>10}"
            f"{c['cpu_per_100k']:>12.2f}{c['cpu_share']:>6.0%}"
        )
    print(f"ingest sustained with zero overflow: {sustained:,.0f} frames/s (target >= 100,000)")
    print(f"ingest / ccxt: {sustained / c['frames_per_s']:.1f}x (target >= 5x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300_000)
    parser.add_argument("--speeds", default="1,1.5,2,0", help="replay speeds; 1 = 100,000 frames/s, 0 = max")
    parser.add_argument("--against", type=Path, help="another checkout whose ingest runs on the same stream")
    args = parser.parse_args()
    against = args.against.resolve() if args.against else None
    asyncio.run(main(args.frames, [float(x) for x in args.speeds.split(",")], against))
