"""ETL throughput: raw NDJSON segments -> Parquet, beside a naive orjson + dict-book baseline.

What is measured, on one generated dataset:

1. **Generation** (not timed as a result). The simulator's market model (BTC-USD with a
   deep book of ~40,000 levels, like the real one, and ETH-USD) is stepped directly, no
   sockets, and its frames are written as raw records into ``raw/ready/coinbase/`` cut into
   segments of ``--segment-mb``. It is one continuous stream: a connect control line, the
   subscribe lines, subscriptions ack, level2 snapshots (the BTC one is a ~4 MB frame), a
   trades snapshot, then level2 updates, trades, tickers and heartbeats, with
   ``sequence_num`` counting per connection without gaps. Level2 changes are batched into
   frames as Coinbase does, ``--updates-per-frame`` on average (6.3 in the reference
   recording; ``1`` gives the worst case, a frame per change). Every ``RESNAP_EVERY`` rounds the
   connection drops and reconnects (sequence restarts at 0, fresh snapshots follow), as a
   long capture does. Segments are cut at line boundaries wherever the size says, so
   books and sequence positions cross segment boundaries and the ETL must carry them in
   its checkpoint. Frames are 200 µs apart (5,000 frames/s, a busy hour of BTC+ETH).
   The model is fast enough (~50 MB/s) that no frame is reused.
2. **ETL end-to-end**: ``EtlJob(config).run()`` over every segment, in a child process
   (``bench/etl.py --child-etl DATA_DIR``) so peak RSS and CPU time are its own. Default
   settings: zstd Parquet, every channel, book samples every second. Reported: level2
   rows/s (updates and snapshot levels, the rows of the ``level2`` dataset), raw MB/s
   (uncompressed NDJSON), CPU seconds and peak RSS (the child's ``VmHWM``). The compiled
   code (book engine, string parsers) is loaded from numba's cache before the clock starts,
   as a long-running ``etl --watch`` has it.
3. **Book engine alone**: the first segment is decoded once (reader + Coinbase parser) and
   its frames concatenated into one ``FrameBatch``; after a warm-up call, only
   ``BookSet.apply`` is timed (best of three, each on fresh books). Also shown: the same
   rows applied as the ETL does, one call per reader batch.
4. **Naive baselines**, in this process, on a prefix of the stream: ``orjson.loads`` per
   line, a Python dict per book side (float prices), per-row best bid/ask appended to
   lists. The naive one (the issue's definition, ``--scan-baseline-mb``, 60 MB: it is slow)
   finds the best bid/ask with ``max()``/``min()`` over the book after every frame; the
   stronger one (``--baseline-mb``) keeps the best by comparison and scans only when the
   best level goes. Both write nothing, so end-to-end ratios are conservative. Rates are
   per level2 row (snapshot levels included, as in the ETL's count).

Run (data under /tmp, removed afterwards unless ``--keep``):

    .venv/bin/python bench/etl.py [--gb 2] [--segment-mb 512] [--updates-per-frame 6.3] [--zstd]

The ETL runs ``--rounds`` times with each ``etl.l2_scanner`` (``compiled``: the level2
scanner, other lines through DuckDB; ``duckdb``: every line through DuckDB, the reference),
alternately, on hard-linked copies of the same segments, and both are printed side by side
(best run of each by CPU; the child uses one core, so rows per CPU-second are per core).

``--profile`` then runs one more child per path under cProfile and prints where the time
goes by stage and the top functions (timings inflated; use it to find hot spots).

``--against DIR`` compares with another checkout instead (e.g. ``git worktree add
/tmp/old <commit>``): the ETL child of each tree runs ``--rounds`` times, alternately, on
identical copies of the same generated data, and the rows per CPU-second of both and
their ratio are printed (machines here are shared: a side-by-side ratio is steadier than
absolute figures). Only the child's ``--child-etl`` mode is needed in the other tree.

``--as-installed`` runs the ETL children as on an install without the ``dev`` or
``databento`` extras (``deploy/setup_pi.sh`` installs none): there pandas is absent, while
in the dev venv pyarrow imports it at its first conversion (+33 MB of RSS, nothing used).
"""
# ruff: noqa: E402
# (imports below the hook: with --as-installed, the child hides pandas before pyarrow is imported)

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import os
import platform
import pstats
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HIDE_PANDAS = "DAEDALUS_BENCH_HIDE_PANDAS"


class _NoPandas:
    """An import hook that makes pandas look uninstalled (pyarrow then runs without it)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError(f"{name} is hidden (bench/etl.py --as-installed)")


if os.environ.get(HIDE_PANDAS):
    sys.meta_path.insert(0, _NoPandas())

import numpy as np
import orjson
import pyarrow as pa
import zstandard

from daedalus.capture.records import control_line, frame_line, iter_lines
from daedalus.config import DaedalusConfig
from daedalus.etl import fastpath
from daedalus.etl.book import BookSet, FrameBatch
from daedalus.etl.coinbase import parse_batch
from daedalus.etl.decode import parse_times, parse_units
from daedalus.etl.reader import connect, read_batches
from daedalus.layout import segment_name
from daedalus.sim import protocol as wire
from daedalus.sim.market import MarketModel, product_spec

PRODUCTS = ("BTC-USD", "ETH-USD")
DEPTH = {"BTC-USD": 20_000, "ETH-USD": 1_000}  # model levels; the BTC book holds ~40k levels like the real one
START_NS = 1_786_309_200_000_000_000  # 2026-08-09T21:00:00Z
SPACING_NS = 200_000  # between frames
RESNAP_EVERY = 100_000  # update rounds per connection (~130 MB), then disconnect + reconnect + snapshots
TICKER_EVERY = 53
HEARTBEAT_EVERY = 997
WRITE_CHUNK = 16 << 20  # bytes per write; with --zstd each chunk is one independent zstd frame
CONN = 1
MB = 1_000_000

TARGET_E2E = 2_500_000  # issue 15, per core, realistic stream (1,500,000 on --updates-per-frame 1)
TARGET_E2E_WORST = 1_500_000
TARGET_MB_S = 350
TARGET_ENGINE = 30_000_000
TARGET_RATIO = 20
TARGET_RSS_MB = 400
SCANNERS = ("compiled", "duckdb")  # etl.l2_scanner: the new path and the reference, run alternately
#: where the time goes (--profile): functions by file or name -> a stage, by own time
STAGES = (("scanner (compiled: level2, trades)", ("l2scan.py",)),
          ("DuckDB read_json (the other lines)", ("read_batches", "_seam.py", "fetch_record_batch", "_decode")),
          ("parse_batch (the other lines)", ("coinbase.py", "decode.py")),
          ("book engine", ("book.py",)),
          ("Parquet encoding + zstd", ("write_table", "ParquetWriter", "parquet/core.py")),
          ("fsync", ("fsync",)),
          ("reading the segment", ("readinto",)),
          ("level2 table, partitioning, take", ("processors.py", "output.py", "compute.py", "take")))  # fmt: skip


# ---- generation ----------------------------------------------------------------------------
class SegmentSink:
    """Writes record lines into numbered segments of about ``segment_bytes`` (raw) each."""

    def __init__(self, folder: Path, segment_bytes: int, zstd: bool) -> None:
        self.folder, self.segment_bytes, self.zstd = folder, segment_bytes, zstd
        self.compressor = zstandard.ZstdCompressor(level=3)
        self.paths: list[Path] = []
        self.raw_bytes = 0
        self._handle: io.BufferedWriter | None = None
        self._in_segment = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def add(self, recv_ns: int, line: bytes) -> None:
        if self._handle is None or self._in_segment >= self.segment_bytes:
            self._roll(recv_ns)
        self._pending.append(line)
        self._pending_bytes += len(line)
        self._in_segment += len(line)
        self.raw_bytes += len(line)
        if self._pending_bytes >= WRITE_CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._handle is not None and self._pending:
            data = b"".join(self._pending)
            self._handle.write(self.compressor.compress(data) if self.zstd else data)
        self._pending, self._pending_bytes = [], 0

    def _roll(self, recv_ns: int) -> None:
        self.close()
        first = datetime.fromtimestamp(recv_ns / 1e9, UTC)
        suffix = ".ndjson.zst" if self.zstd else ".ndjson"
        path = self.folder / segment_name(first, len(self.paths) + 1, suffix)
        self.paths.append(path)
        self._handle = path.open("wb")
        self._in_segment = 0

    def close(self) -> None:
        self._flush()
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@dataclass
class Dataset:
    segments: list[Path]
    raw_bytes: int
    frames: int
    connections: int
    seconds: float


def generate(
    folder: Path, total_bytes: int, segment_bytes: int, zstd: bool, updates_per_frame: float, seed: int = 1
) -> Dataset:
    """Write about ``total_bytes`` of raw records (see the module docstring)."""
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    models = [MarketModel(product_spec(p), random.Random(seed + i), levels=DEPTH[p]) for i, p in enumerate(PRODUCTS)]
    sink = SegmentSink(folder, segment_bytes, zstd)
    t = START_NS
    seq = 0
    frames = 0
    connections = 0

    def frame(channel: str, events: str) -> None:
        nonlocal t, seq, frames
        t += SPACING_NS
        sink.add(t, frame_line(t, CONN, wire.envelope(channel, wire.rfc3339(t), seq, events, None).decode()))
        seq += 1
        frames += 1

    def control(event: str, fields: dict[str, Any]) -> None:
        nonlocal t
        t += SPACING_NS
        sink.add(t, control_line(t, CONN, event, fields))

    def session_start() -> None:
        nonlocal seq, connections
        seq = 0
        connections += 1
        control("connect", {"url": "wss://advanced-trade-ws.coinbase.com", "products": list(PRODUCTS)})
        for channel in ("level2", "market_trades", "ticker", "heartbeats"):
            control("subscribe", {"message": {"type": "subscribe", "product_ids": list(PRODUCTS), "channel": channel}})
        frame("subscriptions", wire.subscriptions_events({"level2": list(PRODUCTS), "market_trades": list(PRODUCTS)}))
        for model in models:
            frame("l2_data", wire.l2_snapshot_events(model, t))
            frame("market_trades", wire.trades_events(model, list(model.trades), "snapshot"))
            frame("ticker", wire.ticker_events(model, "snapshot"))

    session_start()
    in_session = 0
    heartbeat = 0
    while sink.raw_bytes < total_bytes:
        model = rng.choice(models)
        # Coinbase batches level2 changes: one frame carries all a product's changes of a short
        # window. Steps are gathered until a drawn count (mean ``updates_per_frame``) is reached.
        wanted = rng.randint(1, max(1, round(2 * updates_per_frame) - 1))
        changes: list[tuple[bool, int, int]] = []
        trades = []
        while len(changes) < wanted:
            step = model.step(t)
            changes += step.changes
            if step.trade:
                trades.append(step.trade)
        if changes:
            frame("l2_data", wire.l2_update_events(model, replace(step, changes=changes)))
        for trade in trades:
            frame("market_trades", wire.trades_events(model, [trade], "update"))
        in_session += 1
        if in_session % TICKER_EVERY == 0:
            frame("ticker", wire.ticker_events(model, "update"))
        if in_session % HEARTBEAT_EVERY == 0:
            heartbeat += 1
            frame("heartbeats", wire.heartbeat_events(t, t - START_NS + 10**9, heartbeat))
        if in_session >= RESNAP_EVERY:
            control("disconnect", {"reason": "bench: periodic reconnect"})
            session_start()
            in_session = 0
    sink.close()
    return Dataset(sink.paths, sink.raw_bytes, frames, connections, time.perf_counter() - started)


# ---- ETL end-to-end (child process) ----------------------------------------------------------
def _empty_batch() -> FrameBatch:
    i64, i8 = np.zeros(0, np.int64), np.zeros(0, np.int8)
    return FrameBatch(i64, i8, i64, i64, i64, i64, i64, i64, i8, i64, i64, np.zeros(0, np.bool_))


def child_etl(data_dir: Path, profile: bool, scanner: str = "compiled") -> None:
    """Run the ETL over ``data_dir`` and print one JSON line of figures (in the child)."""
    from daedalus.etl.job import EtlJob

    warm = time.perf_counter()
    BookSet(10**9).apply(_empty_batch())  # load the compiled code (numba cache) before the clock:
    parse_units(pa.array(["1.5"]))  # the engine and the two string parsers
    parse_times(pa.array(["2026-08-09T21:05:48.1Z"]))
    fastpath.warm_up()  # and the level2 scanner
    warm = time.perf_counter() - warm
    config = DaedalusConfig.model_validate({"data_dir": str(data_dir), "etl": {"l2_scanner": scanner}})
    job = EtlJob(config)
    profiler = cProfile.Profile() if profile else None
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    summary = job.run()
    if profiler is not None:
        profiler.disable()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    if profiler is not None:
        _print_profile(profiler)
    out = {
        "wall": wall,
        "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "peak_rss_mb": peak_rss_mb(),
        "ru_maxrss_mb": after.ru_maxrss / 1024,
        "warmup_s": warm,
        "segments": summary.segments,
        "bytes": summary.bytes,
        "job_seconds": summary.seconds,
        "rows": dict(summary.rows),
        "counts": {k: v for k, v in summary.counts.items() if v},
        "quarantined_lines": summary.quarantined_lines,
        "quarantined_segments": summary.quarantined_segments,
        "output_mb": sum(p.stat().st_size for p in config.processed_dir.rglob("*.parquet")) / MB,
    }
    print("RESULT " + json.dumps(out), flush=True)


def peak_rss_mb() -> float:
    """This process's peak RSS. ``VmHWM`` belongs to the process image: ``ru_maxrss`` would also
    count the parent's RSS at fork time (Linux carries it across exec), which is not the ETL's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _print_stages(profiler: cProfile.Profile) -> None:
    """Own time of every function, summed by stage (:data:`STAGES`; the first match wins)."""
    stats = pstats.Stats(profiler)
    totals: dict[str, float] = {}
    total = 0.0
    for (filename, _, name), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        total += tottime
        stage = next((label for label, keys in STAGES if any(k in filename or k in name for k in keys)), "other")
        totals[stage] = totals.get(stage, 0.0) + tottime
    print("---- where the time goes (own time by stage, profiled run) ----")
    for label, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{label:<40} {seconds:7.3f}s {100 * seconds / total:5.1f} %")
    print(f"{'total':<40} {total:7.3f}s", flush=True)


def _print_profile(profiler: cProfile.Profile) -> None:
    _print_stages(profiler)
    for sort in ("cumulative", "tottime"):
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats(sort).print_stats(25)
        print(f"---- profile, top 25 by {sort} ----\n" + text.getvalue(), flush=True)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats("daedalus/etl", 15)
    print("---- profile, daedalus/etl only, by cumulative ----\n" + text.getvalue(), flush=True)


def run_etl(data_dir: Path, profile: bool, tree: Path | None = None, scanner: str | None = None) -> dict[str, Any]:
    """The ETL over ``data_dir`` in a child process of this checkout (or of ``tree``; both see
    the parent's environment, ``DAEDALUS_BENCH_HIDE_PANDAS`` of ``--as-installed`` included)."""
    script = (tree / "bench" / "etl.py") if tree else Path(__file__).resolve()
    cmd = [sys.executable, str(script), "--child-etl", str(data_dir)]
    if scanner is not None:
        cmd += ["--scanner", scanner]
    if profile:
        cmd.append("--profile")
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree else None  # import that tree's daedalus
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=tree)
    sys.stderr.write(proc.stderr)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line.removeprefix("RESULT "))
        elif profile:
            print(line)
    if proc.returncode != 0 or result is None:
        raise RuntimeError(f"ETL child failed (exit {proc.returncode})")
    return result


# ---- book engine alone -------------------------------------------------------------------
def decode_segment(path: Path) -> tuple[BookSet, list[FrameBatch]]:
    """The engine's input for one segment: the parser's frame batches (books only name slots)."""
    books = BookSet(10**9)
    batches = []
    con = connect()
    try:
        line = 0
        for batch in read_batches(con, path):
            parsed = parse_batch(batch, line)
            batches.append(books.bind(parsed.frames, parsed.products))
            line += batch.num_rows
    finally:
        con.close()
    return books, batches


def concat_batches(batches: list[FrameBatch]) -> FrameBatch:
    offsets = np.cumsum([0] + [b.r_prod.shape[0] for b in batches[:-1]])
    parts: dict[str, np.ndarray] = {}
    for name in FrameBatch.__dataclass_fields__:
        arrays = [getattr(b, name) for b in batches]
        if name in ("f_rs", "f_re"):
            arrays = [a + off for a, off in zip(arrays, offsets, strict=True)]
        parts[name] = np.concatenate(arrays)
    return FrameBatch(**parts)


def fresh_books(like: BookSet) -> BookSet:
    books = BookSet(like.interval_ns, like.depth)
    for name in like.products:
        books.product_slot(name)
    for conn in like.conns:
        books.conn_slot(conn)
    return books


def engine_alone(path: Path, repeats: int = 3) -> dict[str, float]:
    slots, batches = decode_segment(path)
    whole = concat_batches(batches)
    rows = int(whole.r_prod.shape[0])
    fresh_books(slots).apply(batches[0])  # warm-up: numba compile or cache load
    best = float("inf")
    for _ in range(repeats):
        books = fresh_books(slots)
        started = time.perf_counter()
        books.apply(whole)
        best = min(best, time.perf_counter() - started)
    books = fresh_books(slots)
    started = time.perf_counter()
    for batch in batches:
        books.apply(batch)
    batched = time.perf_counter() - started
    return {
        "rows": rows,
        "snapshot_rows": int(whole.r_snap.sum()),
        "frames": int(whole.f_conn.shape[0]),
        "seconds": best,
        "rate": rows / best,
        "batched_seconds": batched,
        "batched_rate": rows / batched,
        "batches": len(batches),
    }


# ---- naive baseline ----------------------------------------------------------------------
@dataclass
class NaiveBook:
    bids: dict[float, float] = field(default_factory=dict)
    asks: dict[float, float] = field(default_factory=dict)
    best_bid: float | None = None
    best_ask: float | None = None


def naive_baseline(paths: list[Path], limit_bytes: int, scan: bool) -> dict[str, float]:
    """orjson per line + dict books; per-row best bid/ask in lists. ``scan``: best bid/ask by
    ``max()``/``min()`` over the book after every frame (the naive way, as the issue puts it);
    otherwise kept by comparison and scanned for only when the best level goes (a stronger
    baseline, shown beside it). Reads the segments in order until ``limit_bytes``."""
    started = time.perf_counter()
    books: dict[str, NaiveBook] = {}
    last_seq: dict[int, int] = {}
    gaps = 0
    ts_recv: list[int] = []
    seqs: list[int] = []
    product_ids: list[str] = []
    sides: list[bool] = []
    prices: list[float] = []
    sizes: list[float] = []
    snapshots: list[bool] = []
    best_bids: list[float | None] = []
    best_asks: list[float | None] = []
    read = 0
    for line in itertools.chain.from_iterable(iter_lines(path) for path in paths):
        read += len(line) + 1
        if read > limit_bytes:
            break
        record = orjson.loads(line)
        msg = record.get("msg")
        conn = record["conn"]
        if msg is None:
            if record.get("event") == "connect":
                last_seq.pop(conn, None)
            continue
        seq = msg["sequence_num"]
        if conn in last_seq and seq != last_seq[conn] + 1:
            gaps += 1
        last_seq[conn] = seq
        if msg["channel"] != "l2_data":
            continue
        recv = record["recv_ns"]
        for event in msg["events"]:
            product = event["product_id"]
            snapshot = event["type"] == "snapshot"
            book = books.get(product)
            if book is None or snapshot:
                book = books[product] = NaiveBook()
            first = len(prices)
            for update in event["updates"]:
                price = float(update["price_level"])
                size = float(update["new_quantity"])
                is_bid = update["side"] == "bid"
                if is_bid:
                    if size == 0.0:
                        book.bids.pop(price, None)
                        if price == book.best_bid:
                            book.best_bid = max(book.bids) if book.bids else None
                    else:
                        book.bids[price] = size
                        if book.best_bid is None or price > book.best_bid:
                            book.best_bid = price
                else:
                    if size == 0.0:
                        book.asks.pop(price, None)
                        if price == book.best_ask:
                            book.best_ask = min(book.asks) if book.asks else None
                    else:
                        book.asks[price] = size
                        if book.best_ask is None or price < book.best_ask:
                            book.best_ask = price
                ts_recv.append(recv)
                seqs.append(seq)
                product_ids.append(product)
                sides.append(is_bid)
                prices.append(price)
                sizes.append(size)
                snapshots.append(snapshot)
            if scan:
                book.best_bid = max(book.bids) if book.bids else None
                book.best_ask = min(book.asks) if book.asks else None
            n = len(prices) - first
            best_bids.extend([book.best_bid] * n)
            best_asks.extend([book.best_ask] * n)
    seconds = time.perf_counter() - started
    rows = len(prices)
    return {"rows": rows, "snapshot_rows": sum(snapshots), "bytes": min(read, limit_bytes), "seconds": seconds,
            "rate": rows / seconds, "gaps": gaps}  # fmt: skip


# ---- report ------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    uname = platform.uname()
    return (
        f"{cpu}, {os.cpu_count()} CPUs, {uname.system} {uname.release}, "
        f"{platform.python_implementation()} {platform.python_version()}"
    )


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="raw NDJSON to generate, GB (1e9 bytes)")
    parser.add_argument("--segment-mb", type=float, default=512, help="raw size of each segment, MB")
    parser.add_argument("--baseline-mb", type=float, default=300,
                        help="prefix the incremental baseline reads, MB (0: skip it)")  # fmt: skip
    parser.add_argument(
        "--scan-baseline-mb", type=float, default=60, help="prefix the max/min-scan baseline reads, MB (0: skip it)"
    )
    parser.add_argument(
        "--updates-per-frame",
        type=float,
        default=6.3,
        help="mean level2 updates per update frame (6.3 in the reference recording; 1 = worst case)",
    )
    parser.add_argument("--zstd", action="store_true", help="write .ndjson.zst segments (16 MB zstd frames)")
    parser.add_argument("--keep", type=Path, help="generate into this directory and keep it")
    parser.add_argument("--profile", action="store_true", help="run the ETL child under cProfile (slower)")
    parser.add_argument("--against", type=Path, help="another checkout to compare the ETL with, side by side")
    parser.add_argument("--rounds", type=int, default=2, help="ETL runs per path (or tree, --against), alternating")
    parser.add_argument("--as-installed", action="store_true",
                        help="ETL children without pandas, as on an install without the dev/databento extras")
    parser.add_argument("--child-etl", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scanner", choices=["compiled", "duckdb"], default="compiled", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_etl:
        child_etl(args.child_etl, args.profile, args.scanner)
        return

    print(f"machine: {machine()}")
    if args.as_installed:
        os.environ[HIDE_PANDAS] = "1"  # for the children (this process imported pyarrow already)
        print("ETL children as installed: pandas hidden")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="daedalus-bench-etl-", dir="/tmp"))
    try:
        ready = workdir / "raw" / "ready" / "coinbase"
        data = generate(ready, int(args.gb * 1e9), int(args.segment_mb * MB), args.zstd, args.updates_per_frame)
        on_disk = sum(p.stat().st_size for p in data.segments)
        print(f"generated {data.raw_bytes / MB:,.0f} MB raw ({on_disk / MB:,.0f} MB on disk) in {len(data.segments)} "
              f"segments: {data.frames:,} frames, {data.connections} connections, {data.seconds:.1f}s")  # fmt: skip

        if args.against:
            compare_trees(workdir, args.against.resolve(), args.rounds)
            return
        first = data.segments[0]
        engine = engine_alone(first)
        print(f"engine alone: {engine['rows']:,} rows ({engine['snapshot_rows']:,} snapshot levels) in "
              f"{engine['frames']:,} frames of {first.name} in {engine['seconds']:.3f}s")  # fmt: skip
        naive = strong = None
        if args.scan_baseline_mb > 0:
            naive = naive_baseline(data.segments, int(args.scan_baseline_mb * MB), scan=True)
            print(f"naive baseline (max/min scans): {naive['rows']:,} rows from the first {naive['bytes'] / MB:,.0f} "
                  f"MB in {naive['seconds']:.1f}s")  # fmt: skip
        if args.baseline_mb > 0:
            strong = naive_baseline(data.segments, int(args.baseline_mb * MB), scan=False)
            print(f"incremental-best baseline: {strong['rows']:,} rows from the first {strong['bytes'] / MB:,.0f} MB "
                  f"in {strong['seconds']:.1f}s")  # fmt: skip
        runs = side_by_side(workdir, args.rounds)
        if args.profile:
            for scanner in SCANNERS:
                print(f"\n==== profiled run, etl.l2_scanner: {scanner} (timings inflated by cProfile) ====")
                run_copy(workdir, scanner, profile=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(args, data, runs, engine, naive, strong)


def run_copy(workdir: Path, scanner: str, profile: bool = False) -> dict[str, Any]:
    """The ETL child over a hard-linked copy of the generated segments (the ETL deletes what
    it processed), with ``etl.l2_scanner: scanner``."""
    run_dir = workdir / f"run-{scanner}"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(workdir / "raw", run_dir / "raw", copy_function=os.link)
    try:
        return run_etl(run_dir, profile, scanner=scanner)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def side_by_side(workdir: Path, rounds: int) -> dict[str, list[dict[str, Any]]]:
    """Both paths ``rounds`` times each, alternately, on the same segments (same run, same
    machine state: the shared machine's noise hits both alike)."""
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SCANNERS}
    for _ in range(rounds):
        for scanner in SCANNERS:
            result = run_copy(workdir, scanner)
            runs[scanner].append(result)
            rows = result["rows"].get("level2", 0)
            counts = result["counts"]
            print(f"{scanner:>8}: {rows:,} level2 rows, wall {result['wall']:.2f}s, CPU {result['cpu']:.2f}s "
                  f"({rows / result['cpu']:,.0f} rows per CPU-s), peak RSS {result['peak_rss_mb']:,.0f} MB, "
                  f"output {result['output_mb']:,.1f} MB; scanner frames {counts.get('l2_scanner_lines', 0):,}, "
                  f"handed back {counts.get('l2_scanner_fallback_l2', 0):,}")  # fmt: skip
    reference = {k: v for k, v in runs["duckdb"][0]["rows"].items()}
    for result in runs["compiled"]:
        assert result["rows"] == reference, f"the two paths wrote different row counts: {result['rows']} {reference}"
    return runs


def report(args: argparse.Namespace, data: Dataset, runs: dict[str, list[dict[str, Any]]], engine: dict[str, float],
           naive: dict[str, float] | None, strong: dict[str, float] | None) -> None:  # fmt: skip
    """Best of the rounds (by CPU) of each path, side by side, against the issue's targets."""
    best = {s: min(rs, key=lambda r: r["cpu"]) for s, rs in runs.items()}
    fast, ref = best["compiled"], best["duckdb"]
    rows = fast["rows"].get("level2", 0)
    worst = args.updates_per_frame <= 1
    target = TARGET_E2E_WORST if worst else TARGET_E2E
    print()
    print(f"{data.raw_bytes / MB:,.0f} MB raw in {len(data.segments)} segments of {args.segment_mb:g} MB, "
          f"{args.updates_per_frame:g} updates per level2 frame; {rows:,} level2 rows; best of {args.rounds} "
          "alternating runs each (by CPU)")  # fmt: skip
    print("rows: " + ", ".join(f"{k}={v:,}" for k, v in sorted(fast["rows"].items())))
    print(f"quarantined: lines={fast['quarantined_lines']} segments={fast['quarantined_segments']}")

    def per(r: dict[str, Any]) -> dict[str, float]:  # the child runs on one core: CPU-s is the per-core unit
        return {"rows_cpu": rows / r["cpu"], "rows_wall": rows / r["wall"], "mb_cpu": data.raw_bytes / MB / r["cpu"],
                "mb_wall": data.raw_bytes / MB / r["wall"]}  # fmt: skip

    pf, pr = per(fast), per(ref)
    table = [
        ("level2 rows per CPU-s (per core)", f"{pf['rows_cpu']:,.0f}", f"{pr['rows_cpu']:,.0f}",
         f"{pf['rows_cpu'] / pr['rows_cpu']:.2f}x", f">= {target:,}: {verdict(pf['rows_cpu'] >= target)}"),
        ("level2 rows/s (wall)", f"{pf['rows_wall']:,.0f}", f"{pr['rows_wall']:,.0f}",
         f"{pf['rows_wall'] / pr['rows_wall']:.2f}x", ""),
        ("raw MB per CPU-s", f"{pf['mb_cpu']:,.1f}", f"{pr['mb_cpu']:,.1f}", f"{pf['mb_cpu'] / pr['mb_cpu']:.2f}x",
         f">= {TARGET_MB_S}: {verdict(pf['mb_cpu'] >= TARGET_MB_S)}"),
        ("raw MB/s (wall)", f"{pf['mb_wall']:,.1f}", f"{pr['mb_wall']:,.1f}", "", ""),
        ("CPU s", f"{fast['cpu']:.2f}", f"{ref['cpu']:.2f}", "", ""),
        ("wall s", f"{fast['wall']:.2f}", f"{ref['wall']:.2f}", "", ""),
        ("peak RSS, MB", f"{fast['peak_rss_mb']:,.0f}", f"{ref['peak_rss_mb']:,.0f}", "",
         f"<= {TARGET_RSS_MB}: {verdict(fast['peak_rss_mb'] <= TARGET_RSS_MB)}"),
        ("Parquet output, MB", f"{fast['output_mb']:,.1f}", f"{ref['output_mb']:,.1f}", "", ""),
        ("book engine alone, rows/s", f"{engine['rate']:,.0f}", "", "",
         f">= {TARGET_ENGINE:,}: {verdict(engine['rate'] >= TARGET_ENGINE)}"),
        ("book engine, one call per reader batch", f"{engine['batched_rate']:,.0f}", "", "", ""),
    ]  # fmt: skip
    if naive is not None:
        ratio = pf["rows_cpu"] / naive["rate"]
        table.append(("end to end / naive baseline", f"{ratio:.1f}x", f"{pr['rows_cpu'] / naive['rate']:.1f}x", "",
                      f">= {TARGET_RATIO}x: {verdict(ratio >= TARGET_RATIO)}"))  # fmt: skip
    if strong is not None:
        table.append(("end to end / incremental-best baseline", f"{pf['rows_cpu'] / strong['rate']:.1f}x",
                      f"{pr['rows_cpu'] / strong['rate']:.1f}x", "", ""))  # fmt: skip
    width = max(len(name) for name, *_ in table)
    print(f"\n{'':<{width}}  {'compiled':>14}  {'duckdb':>14}  {'ratio':>7}  target")
    for name, a, b, ratio_text, target_text in table:
        print(f"{name:<{width}}  {a:>14}  {b:>14}  {ratio_text:>7}  {target_text}")
    print(f"\nall runs (CPU s): compiled {[round(r['cpu'], 2) for r in runs['compiled']]}, "
          f"duckdb {[round(r['cpu'], 2) for r in runs['duckdb']]}")  # fmt: skip


def compare_trees(workdir: Path, other: Path, rounds: int) -> None:
    """Run the ETL of this checkout and of ``other`` alternately on copies of the same data."""
    here = Path(__file__).resolve().parents[1]
    figures: dict[str, list[dict[str, Any]]] = {"this": [], "other": []}
    for _ in range(rounds):
        for label, tree in (("other", other), ("this", None)):
            run_dir = workdir / f"run-{label}"
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(workdir / "raw", run_dir / "raw")
            result = run_etl(run_dir, False, tree)
            shutil.rmtree(run_dir, ignore_errors=True)
            figures[label].append(result)
            print(f"{label:>5} ({tree or here}): {result['rows'].get('level2', 0):,} level2 rows, "
                  f"wall {result['wall']:.2f}s, CPU {result['cpu']:.2f}s, "
                  f"peak RSS {result['peak_rss_mb']:,.0f} MB")  # fmt: skip
    best = {k: max(r["rows"].get("level2", 0) / r["cpu"] for r in v) for k, v in figures.items()}
    print()
    print(f"level2 rows per CPU-s, best of {rounds}: this {best['this']:,.0f}, other {best['other']:,.0f}, "
          f"this/other {best['this'] / best['other']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
