"""Capture throughput: `daedalus ingest` beside the ccxt.pro coinbase client, same stream.

1. Generates a stream with the simulator's market model (level2 snapshots, then level2
   updates and trades for BTC-USD and ETH-USD) and writes it as a raw segment.
2. Serves it with `bench/ws_feeder.py` (its own process: the frames pre-encoded once and
   written straight to the socket, paced to the offered rate in 1 ms batches, or
   `--frames-per-write N` frames a write, 1 = frame by frame, or as fast as the client
   reads); `--feeder sim` serves it with `daedalus sim --replay` instead, which tops out
   near 200,000 frames/s here. Every client gets the identical frames. At low rates the
   cost per frame is mostly a cost per network read, so how the frames are paced matters
   as much as the rate: the header says which pacing was used.
3. Runs `daedalus ingest` (defaults: batch 100, fsync per flush) in its own process and
   measures, from its statistics block and psutil: frames/s until every frame is
   durable, CPU seconds per 100k frames (the whole process, all threads, from the
   connection on; and "steady", between 10 % and 90 % of the frames written, which leaves
   out the start and the last partial batch waiting for the flush interval), peak RSS,
   overflow, recv-to-durable latency.
   `--idle S` also measures each ingest connected to a silent feed for S seconds (CPU-s
   per minute: what a quiet connection costs around the clock).
4. Runs ccxt.pro coinbase (`watch_order_book_for_symbols` + `watch_trades_for_symbols`)
   on the same stream (REST from the simulator, the stream from the feeder) and measures
   frames/s until its books reflect the last frame.

    .venv/bin/python bench/capture.py [--frames 300000] [--speeds 1,0,1,0] [--against DIR]
        [--frames-per-write N] [--idle S]

``--against DIR`` also runs the ingest of another checkout (e.g. ``git worktree add
/tmp/base HEAD~3``) on the same stream, alternating with this one at each speed, so a
change on the hot path is measured side by side in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from simproc import start_feeder, start_sim

from daedalus.capture.records import frame_line, iter_lines, split_frame_record
from daedalus.sim import protocol as wire
from daedalus.sim.market import MarketModel, product_spec

REPO = Path(__file__).resolve().parents[1]
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


async def start_replay(
    recording: Path, speed: float, feeder: str = "ws", frames_per_write: int = 0
) -> tuple[asyncio.subprocess.Process, str]:
    """The stream at ``speed`` (1 = 100,000 frames/s, 0 = as fast as the client reads);
    ``frames_per_write``: the ws feeder's pacing (0: the frames of 1 ms a write, 1: frame by frame)."""
    if feeder == "ws":
        return await start_feeder(recording, RATE_AT_SPEED_1 * speed, frames_per_write=frames_per_write)
    return await start_sim("--replay", str(recording), "--speed", str(speed))


async def start_ingest(
    ws_url: str, workdir: Path, tree: Path | None, ingestion: dict[str, object], stats_interval: float | None
) -> tuple[asyncio.subprocess.Process, psutil.Process]:
    """``daedalus ingest`` of ``tree`` (None: this checkout) on ``ws_url``, returned once connected."""
    config = {
        "data_dir": str(workdir / "data"),
        "logging": {"level": "WARNING"},
        "coinbase": {"ws_url": ws_url, "rest_url": ws_url.replace("ws://", "http://").removesuffix("/ws")},
        "ingestion": ingestion,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "ingest.yaml"
    path.write_text(yaml.safe_dump(config))
    stats = ["--stats-interval", str(stats_interval)] if stats_interval else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daedalus",
        "ingest",
        "--config",
        str(path),
        *stats,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(tree)} if tree else None,
        # `python -m` puts the working folder first on sys.path, before PYTHONPATH: run from
        # the tree itself, or the other checkout would import this one's daedalus
        cwd=str(tree or REPO),
    )
    ps = psutil.Process(proc.pid)
    port = int(ws_url.rsplit(":", 1)[1].split("/")[0])
    while not any(c.raddr and c.raddr.port == port for c in ps.net_connections()):
        await asyncio.sleep(0.005)
    return proc, ps


def cpu_seconds(ps: psutil.Process) -> float:
    times = ps.cpu_times()
    return times.user + times.system


async def run_ingest(
    ws_url: str, workdir: Path, total: int, tree: Path | None = None, fsync: bool = True
) -> dict[str, float]:
    """One ingest process on the stream; ``tree``: import ``daedalus`` from that checkout."""
    proc, ps = await start_ingest(ws_url, workdir, tree, {"fsync": fsync}, 0.25)
    assert proc.stdout is not None
    cpu_start = ps.cpu_times()  # connected: from here on the CPU goes to the stream
    peak_rss = 0
    written = 0
    match = None
    dropped = 0
    steady: list[tuple[int, float]] = []  # (written, CPU-s) at 10 % and at 90 % of the frames
    async with asyncio.timeout(600):
        while written + dropped < total:
            line = (await proc.stdout.readline()).decode()
            if not line:
                raise RuntimeError("daedalus ingest exited early")
            peak_rss = max(peak_rss, ps.memory_info().rss)
            if match := STATS.search(line):
                written = int(match.group(1).replace(",", ""))
                dropped = int(match.group(2).replace(",", ""))
                if len(steady) < 2 and written >= total * (0.1, 0.9)[len(steady)]:
                    steady.append((written, cpu_seconds(ps)))
    cpu_end = ps.cpu_times()
    proc.terminate()
    await proc.wait()
    assert match is not None
    segments = sorted((workdir / "data/raw/ready/coinbase").iterdir())
    records = (split_frame_record(line) for f in segments for line in iter_lines(f))
    recv = [record[0] for record in records if record is not None]
    cpu = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
    spread = (max(recv) - min(recv)) / 1e9
    (w0, c0), (w1, c1) = steady if len(steady) == 2 else ((0, 0.0), (total, cpu))
    return {
        "frames_per_s": written / spread,
        "cpu_per_100k": cpu / total * 100_000,
        "steady_per_100k": (c1 - c0) / max(w1 - w0, 1) * 100_000,
        "cpu_share": cpu / spread,
        "sys_share": (cpu_end.system - cpu_start.system) / cpu if cpu else 0.0,
        "rss_mb": peak_rss / 1e6,
        "overflow": dropped,
        "p50_ms": float(match.group(3)),
        "p99_ms": float(match.group(4)),
    }


async def run_idle(ws_url: str, workdir: Path, seconds: float, tree: Path | None = None) -> float:
    """CPU-s per minute of an ingest connected to a feed that sends nothing (the watchdog
    raised out of the way, no statistics block): its timers and threads at rest."""
    proc, ps = await start_ingest(ws_url, workdir, tree, {"watchdog_timeout_seconds": 3600}, None)
    try:
        await asyncio.sleep(5.0)  # subscribed and settled (the first flush, the first heartbeats)
        before = cpu_seconds(ps)
        await asyncio.sleep(seconds)
        return (cpu_seconds(ps) - before) / seconds * 60
    finally:
        proc.terminate()
        await proc.wait()


async def run_ccxt(ws_url: str, total: int, last_l2: dict[str, str], rest: str | None = None) -> dict[str, float]:
    rest = rest or ws_url.replace("ws://", "http://").removesuffix("/ws")
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


async def stop(proc: asyncio.subprocess.Process) -> None:
    """Terminate a feeder or simulator (the feeder may have ended with its connection)."""
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    await proc.wait()


def disk_ceiling(workdir: Path, seconds: float = 1.5) -> float:
    """MB/s of 1 MB appends, each fsynced, in the benchmark's folder (what the disk allows)."""
    path = workdir / "disk-probe"
    chunk = b"x" * (1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    written, started = 0, time.perf_counter()
    try:
        while time.perf_counter() - started < seconds:
            os.write(fd, chunk)
            os.fsync(fd)
            written += len(chunk)
    finally:
        os.close(fd)
        path.unlink()
    return written / 1e6 / (time.perf_counter() - started)


RATE_AT_SPEED_1 = 100_000  # the generated stream is stamped 10 us apart


def feeder_pacing(feeder: str, frames_per_write: int = 0) -> str:
    """What serves the stream and how paced runs are cut into writes (printed with the results)."""
    if feeder != "ws":
        return "daedalus sim --replay (frame by frame, a send each; it sleeps only when over 1 ms ahead)"
    if frames_per_write == 1:
        return "bench/ws_feeder.py, paced frame by frame (a write per frame, TCP_NODELAY)"
    if frames_per_write > 1:
        return f"bench/ws_feeder.py, paced {frames_per_write} frames a write (TCP_NODELAY)"
    return "bench/ws_feeder.py, paced in 1 ms batches (a write per millisecond, TCP_NODELAY)"


async def main(
    frames: int,
    speeds: list[float],
    against: Path | None = None,
    feeder: str = "ws",
    with_ccxt: bool = True,
    unsynced: bool = False,
    frames_per_write: int = 0,
    idle: float = 0.0,
) -> None:
    with tempfile.TemporaryDirectory(prefix="daedalus-bench-") as tmp:
        workdir = Path(tmp)
        recording = workdir / "segment_20260809T21_00001.ndjson"
        started = time.perf_counter()
        total, last_l2 = generate(recording, frames)
        size_mb = recording.stat().st_size / 1e6
        print(f"stream: {total:,} frames, {size_mb:.0f} MB, generated in {time.perf_counter() - started:.1f}s")
        print(f"machine: {platform.machine()} {psutil.cpu_count()} cpus, Python {platform.python_version()}")
        print(f"feeder: {feeder_pacing(feeder, frames_per_write)}")
        disk = disk_ceiling(workdir)
        print(
            f"disk: 1 MB appends + fsync: {disk:,.0f} MB/s = {disk * 1e6 * total / recording.stat().st_size:,.0f} "
            "frames/s of this stream (the ceiling of any fsync-per-flush capture here)"
        )
        print(
            f"{'':28}{'offered/s':>10}{'received/s':>12}{'overflow':>10}{'CPU s/100k':>12}{'steady':>8}{'CPU':>6}"
            f"{'RSS MB':>8}{'p50 ms':>8}{'p99 ms':>8}"
        )
        sustained = 0.0
        results: dict[str | None, list[dict[str, float]]] = {}
        trees: list[tuple[str, Path | None]] = [("daedalus ingest", None)]
        if against:
            trees.append((f"  {against.name} (--against)", against))
        for run, speed in enumerate(speeds):
            for label, tree in trees if run % 2 == 0 else trees[::-1]:  # alternate who goes first
                sim, ws_url = await start_replay(recording, speed, feeder, frames_per_write)
                try:
                    r = await run_ingest(ws_url, workdir / f"ingest-{run}-{tree is None}", total, tree)
                finally:
                    await stop(sim)
                results.setdefault(str(tree) if tree else None, []).append({**r, "speed": speed})
                offered = f"{RATE_AT_SPEED_1 * speed:,.0f}" if speed else "max"
                print(
                    f"{label[:27]:28}{offered:>10}{r['frames_per_s']:>12,.0f}{r['overflow']:>10,}"
                    f"{r['cpu_per_100k']:>12.2f}{r['steady_per_100k']:>8.2f}{r['cpu_share']:>6.0%}"
                    f"{r['rss_mb']:>8.0f}{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}"
                )
                if r["overflow"] == 0 and tree is None:
                    sustained = max(sustained, r["frames_per_s"])
        for label, tree in trees if unsynced else []:  # ingest's own ceiling: the disk out of the way
            sim, ws_url = await start_replay(recording, 0, feeder)
            try:
                r = await run_ingest(ws_url, workdir / f"unsynced-{tree is None}", total, tree, fsync=False)
            finally:
                await stop(sim)
            print(
                f"{(label.strip() + ', fsync off')[:27]:28}{'max':>10}{r['frames_per_s']:>12,.0f}{r['overflow']:>10,}"
                f"{r['cpu_per_100k']:>12.2f}{r['steady_per_100k']:>8.2f}{r['cpu_share']:>6.0%}"
                f"{r['rss_mb']:>8.0f}{r['p50_ms']:>8.1f}{r['p99_ms']:>8.1f}"
            )
        if idle:
            silent = workdir / "silent.ndjson"
            silent.write_bytes(b"")
            for round_ in range(2):  # twice each, alternating: an idle process is a small, noisy figure
                for _label, tree in trees if round_ % 2 == 0 else trees[::-1]:
                    sim, ws_url = await start_replay(silent, 0.01, "ws")
                    try:
                        per_minute = await run_idle(ws_url, workdir / f"idle-{round_}-{tree is None}", idle, tree)
                    finally:
                        await stop(sim)
                    name = "daedalus ingest" if tree is None else tree.name
                    print(f"{(name + ', idle')[:27]:28}{'silent':>10}  {per_minute:.3f} CPU-s per minute "
                          f"({per_minute / 60:.2%} of a core, {idle:g} s connected, nothing received)")  # fmt: skip
        if not with_ccxt:
            c = {"frames_per_s": float("nan"), "cpu_per_100k": float("nan"), "cpu_share": float("nan")}
        elif feeder == "ws":  # ccxt loads its markets over REST: the simulator serves that part
            rest_sim, rest_ws = await start_sim()
            sim, ws_url = await start_replay(recording, 0, feeder)
            try:
                c = await run_ccxt(ws_url, total, last_l2, rest_ws.replace("ws://", "http://").removesuffix("/ws"))
            finally:
                for proc in (sim, rest_sim):
                    await stop(proc)
        else:
            sim, ws_url = await start_replay(recording, 0, feeder)
            try:
                c = await run_ccxt(ws_url, total, last_l2)
            finally:
                await stop(sim)
        print(
            f"{'ccxt.pro coinbase (books+trades)':28}{'max':>10}{c['frames_per_s']:>12,.0f}{'-':>10}"
            f"{c['cpu_per_100k']:>12.2f}{c['cpu_share']:>6.0%}"
        )
    print(f"ingest sustained with zero overflow: {sustained:,.0f} frames/s (target >= 400,000)")
    print(f"ingest / ccxt: {sustained / c['frames_per_s']:.1f}x frames/s (target >= 8x)")
    mine = results.get(None, [])
    if mine:
        best = min(r["cpu_per_100k"] for r in mine)
        print(
            f"ingest CPU s / 100k frames, best: {best:.2f} (target <= 0.25); ccxt / ingest per CPU-s: "
            f"{c['cpu_per_100k'] / best:.1f}x"
        )
    for tree, rows in results.items():
        if tree is None:
            continue
        for speed in sorted({r["speed"] for r in rows}):
            old = [r["cpu_per_100k"] for r in rows if r["speed"] == speed]
            new = [r["cpu_per_100k"] for r in mine if r["speed"] == speed]
            offered = f"{RATE_AT_SPEED_1 * speed:,.0f}/s" if speed else "max"
            print(
                f"CPU s / 100k at {offered}: this tree {', '.join(f'{x:.2f}' for x in new)}; "
                f"{Path(tree).name} {', '.join(f'{x:.2f}' for x in old)} "
                f"(ratio of means {sum(old) / len(old) / (sum(new) / len(new)):.2f}x)"
            )
            old = [r["steady_per_100k"] for r in rows if r["speed"] == speed]
            new = [r["steady_per_100k"] for r in mine if r["speed"] == speed]
            print(
                f"  steady (10-90 % written): this tree {', '.join(f'{x:.2f}' for x in new)}; "
                f"{Path(tree).name} {', '.join(f'{x:.2f}' for x in old)} "
                f"(ratio of means {sum(old) / len(old) / (sum(new) / len(new)):.2f}x)"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300_000)
    parser.add_argument("--speeds", default="1,2,4,0", help="replay speeds; 1 = 100,000 frames/s, 0 = max")
    parser.add_argument("--against", type=Path, help="another checkout whose ingest runs on the same stream")
    parser.add_argument("--feeder", choices=("ws", "sim"), default="ws",
                        help="ws: bench/ws_feeder.py (default); sim: daedalus sim --replay")  # fmt: skip
    parser.add_argument("--no-ccxt", action="store_true", help="skip the ccxt.pro run")
    parser.add_argument("--unsynced", action="store_true", help="also run each ingest at max with fsync off")
    parser.add_argument("--frames-per-write", type=int, default=0,
                        help="ws feeder, paced: frames per write (0: those of 1 ms; 1: frame by frame)")  # fmt: skip
    parser.add_argument("--idle", type=float, default=0.0, metavar="S",
                        help="also measure each ingest connected to a silent feed for S seconds")  # fmt: skip
    args = parser.parse_args()
    against = args.against.resolve() if args.against else None
    speeds = [float(x) for x in args.speeds.split(",")]
    asyncio.run(main(args.frames, speeds, against, args.feeder, not args.no_ccxt, args.unsynced,
                     args.frames_per_write, args.idle))  # fmt: skip
