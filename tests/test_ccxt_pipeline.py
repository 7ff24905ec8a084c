"""The ccxt source end to end: ``IngestPipeline(source="ccxt")`` against the simulator (ccxt.pro
coinbase, urls pointed at 127.0.0.1), through both raw formats and the ETL, checked against the
simulator's truth; an ingest writing Parquet SIGKILLed and restarted; the supervisor's plan for
both sources. (One failing exchange beside a working one: test_ccxt_collector.py, test_ccxt_ops.py.)"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from daedalus.capture.pipeline import IngestPipeline
from daedalus.config import parse_config
from daedalus.etl.job import EtlJob
from tests.capture_helpers import async_wait_until

REPO = Path(__file__).resolve().parents[1]
SYMBOLS = {"BTC/USD": "BTC-USD", "ETH/USD": "ETH-USD"}
DEPTH = 10
CHANNELS = ("orderbook", "trades", "ticker")


def ccxt_settings(data: Path, sim: Any, raw_format: str, **ingestion: Any) -> dict[str, Any]:
    methods = ("watchOrderBook", "watchTrades", "watchTicker")
    return {
        "data_dir": str(data),
        "coinbase": {"enabled": False},
        "ingestion": {"raw_format": raw_format, "flush_interval_seconds": 0.1, **ingestion},
        "etl": {"channels": {"book_snapshot": {"levels": DEPTH}}},
        "ccxt": {
            "enabled": True,
            "exchanges": {
                "coinbase": {
                    "urls": {"api": {"rest": sim.rest_url, "ws": sim.ws_url}},
                    "channels": {m: list(SYMBOLS) for m in methods},
                    "max_orderbook_depth": DEPTH,
                }
            },
        },
    }


class Recorder:
    """Sits between the collector and the pipeline's sink: what was handed over, per market."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self.trades: dict[str, list[str]] = {s: [] for s in SYMBOLS}
        self.books: dict[str, dict[str, Any]] = {}
        self.tickers: Counter[str] = Counter()

    def put_record(self, *, channel: str, exchange: str, symbol: str, recv_ns: int, record: dict[str, Any]) -> bool:
        if channel == "trades":
            self.trades[symbol].append(record["id"])
        elif channel == "orderbook":
            self.books[symbol] = record
        else:
            self.tickers[symbol] += 1
        return self.sink.put_record(channel=channel, exchange=exchange, symbol=symbol, recv_ns=recv_ns, record=record)


def sent_trades(sim: Any) -> dict[str, dict[str, tuple[float, float]]]:
    """The simulator's truth: every trade it sent, per product: id -> (price, size)."""
    out: dict[str, dict[str, tuple[float, float]]] = {pid: {} for pid in SYMBOLS.values()}
    for conn in [*sim.connections, *sim.closed_connections]:
        for frame in conn.sent_frames:
            msg = orjson.loads(frame)
            if msg.get("channel") == "market_trades":
                for event in msg["events"]:
                    for t in event["trades"]:
                        out[t["product_id"]][t["trade_id"]] = (float(t["price"]), float(t["size"]))
    return out


def levels(side: list[Any]) -> list[tuple[float, float]]:
    return [(float(px), float(sz)) for px, sz, *_ in side]


def book_row(row: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """A processed order book row's top levels, as (price, size) per side."""
    return {
        side: [(row[f"{side[:3]}_px_{i:02d}"], row[f"{side[:3]}_sz_{i:02d}"]) for i in range(DEPTH)
               if row[f"{side[:3]}_px_{i:02d}"] is not None]
        for side in ("bids", "asks")
    }  # fmt: skip


def processed(data: Path, channel: str) -> str:
    return str(data / "processed" / "ccxt" / channel / "**" / "*.parquet")


@pytest.mark.parametrize("raw_format", ["ndjson", "parquet"])
async def test_two_symbols_three_channels_through_ingest_and_etl_match_the_simulator(make_sim, tmp_path, raw_format):
    sim = await make_sim(rate=300, keep_sent=True, ticker_batch_interval=0.2)
    data = tmp_path / "data"
    config = parse_config(ccxt_settings(data, sim, raw_format))
    pipeline = IngestPipeline(config, source="ccxt")
    recorder = Recorder(pipeline.capture.tap)
    for collector in pipeline.collectors:
        collector.sink = recorder
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop))
    moments: list[tuple[int, dict[str, Any]]] = []  # (a receive time after the pause, true books then)
    try:
        await async_wait_until(lambda: all(len(recorder.trades[s]) >= 130 and recorder.tickers[s] >= 3
                                           and s in recorder.books for s in SYMBOLS),
                               timeout=30, what="records for every (channel, symbol)")  # fmt: skip
        for moment in range(2):
            await sim.pause()
            truth = {pid: sim.true_book(pid, DEPTH) for pid in SYMBOLS.values()}

            def caught_up() -> bool:
                sent = sent_trades(sim)
                return all(
                    set(recorder.trades[s]) == set(sent[pid])
                    and s in recorder.books
                    and levels(recorder.books[s]["bids"]) == levels(truth[pid]["bids"])  # noqa: B023
                    and levels(recorder.books[s]["asks"]) == levels(truth[pid]["asks"])  # noqa: B023
                    for s, pid in SYMBOLS.items()
                )

            await async_wait_until(caught_up, timeout=20, what=f"the capture caught up at moment {moment}")
            moments.append((pipeline.clock(), truth))
            sim.resume()
            seen = sum(len(t) for t in recorder.trades.values())
            await async_wait_until(lambda: sum(len(t) for t in recorder.trades.values()) > seen + 20,  # noqa: B023
                                   what="the market moves again")  # fmt: skip
        await sim.pause()
        await async_wait_until(lambda: all(set(recorder.trades[s]) == set(sent_trades(sim)[p])
                                           for s, p in SYMBOLS.items()), what="every trade captured")  # fmt: skip
    finally:
        stop.set()
        await task
    assert not pipeline.failed
    stats = pipeline.heartbeat_stats()
    assert stats["counters"]["frames_received"]["coinbase"] == stats["counters"]["frames_written"] > 0
    assert set(stats["products"]) == {f"coinbase:{s}" for s in SYMBOLS}
    assert stats["gauges"]["uptime_seconds"]["coinbase"] > 0 and stats["counters"]["errors"] == {"coinbase": 0}
    assert stats["counters"]["reconnects"] == {"coinbase": 0} and stats["gauges"]["failing"] == {"coinbase": 0}

    if raw_format == "parquet":  # every closed segment opens with pyarrow, DuckDB and Polars
        files = sorted((data / "raw" / "ready" / "ccxt").rglob("*.parquet"))
        assert {f.relative_to(data / "raw" / "ready" / "ccxt").parts[0] for f in files} == set(CHANNELS)
        for f in files:
            assert pq.read_table(f).num_rows == duckdb.sql(f"select count(*) from '{f}'").fetchall()[0][0]
            assert pl.read_parquet(f).height > 0

    summary = EtlJob(config, "ccxt").run()
    assert summary.segments > 0 and summary.quarantined_lines == 0 and summary.quarantined_segments == 0
    assert not list((data / "raw" / "ready" / "ccxt").rglob("segment_*"))  # all processed

    sent = sent_trades(sim)
    con = duckdb.connect()
    for pid in SYMBOLS.values():
        trades = con.execute(
            f"select trade_id, price, size from read_parquet('{processed(data, 'trades')}', hive_partitioning=true) "
            "where exchange = 'coinbase' and symbol = ?", [pid]).fetchall()  # fmt: skip
        assert len(trades) == len({t[0] for t in trades})  # de-duplicated
        assert {t[0]: (t[1], t[2]) for t in trades} == sent[pid]  # trades equal to the simulator's
        for received_by, truth in moments:
            row = pl.read_parquet(processed(data, "orderbook"), hive_partitioning=True).filter(
                (pl.col("symbol") == pid) & (pl.col("ts_recv").dt.epoch("ns") <= received_by)
            ).sort("ts_recv").tail(1).to_dicts()[0]
            got = book_row(row)
            assert got["bids"] == levels(truth[pid]["bids"]) and got["asks"] == levels(truth[pid]["asks"])
            assert row["best_bid"] == got["bids"][0][0] and row["best_ask"] == got["asks"][0][0]
            assert row["mid_price"] == pytest.approx((row["best_bid"] + row["best_ask"]) / 2)
            assert row["book_valid"]
        tickers = con.execute(
            f"select count(*), bool_and(best_bid < best_ask) from read_parquet('{processed(data, 'ticker')}', "
            "hive_partitioning=true) where symbol = ?", [pid]).fetchall()[0]  # fmt: skip
        assert tickers[0] >= 3 and tickers[1]

    before = {p: p.read_bytes() for p in (data / "processed" / "ccxt").rglob("*.parquet")}
    again = EtlJob(config, "ccxt").run()  # idempotent: nothing left to do, nothing changes
    assert again.segments == 0
    assert {p: p.read_bytes() for p in (data / "processed" / "ccxt").rglob("*.parquet")} == before


# ---- crash safety of the Parquet raw writer under a real ingest -------------------------------
def durable_keys(data: Path) -> Counter[tuple[Any, ...]]:
    """Every record readable now: ready/ Parquet plus the crash-readable prefix of active/ IPC
    (looked at again when the writer moved a file or a folder away meanwhile)."""
    while True:
        try:
            return _durable_keys(data)
        except FileNotFoundError:
            continue


def _durable_keys(data: Path) -> Counter[tuple[Any, ...]]:
    found: Counter[tuple[Any, ...]] = Counter()
    root = data / "raw"
    for path in sorted((root / "ready" / "ccxt").rglob("segment_*.parquet")):
        found.update(_keys(path.relative_to(root / "ready" / "ccxt").parts[0], pq.read_table(path)))
    for path in sorted((root / "active" / "ccxt").rglob("segment_*.arrow")):
        found.update(_keys(path.relative_to(root / "active" / "ccxt").parts[0], _ipc_prefix(path)))
    return found


def _ipc_prefix(path: Path) -> pa.Table:
    batches = []
    try:
        with pa.OSFile(str(path), "rb") as source:
            reader = pa.ipc.open_stream(source)
            while True:
                try:
                    batches.append(reader.read_next_batch())
                except StopIteration:
                    break
    except (pa.ArrowInvalid, OSError):  # the torn tail of a batch being written
        pass
    return pa.Table.from_batches(batches) if batches else pa.table({})


def _plain(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Timestamps as int64 ns (Python's datetime cannot hold nanoseconds)."""
    return column.cast(pa.int64()) if pa.types.is_timestamp(column.type) else column


def _keys(channel: str, table: pa.Table) -> list[tuple[Any, ...]]:
    if table.num_rows == 0:
        return []
    ident = {"trades": "trade_id", "orderbook": "nonce", "ticker": "ts_event"}[channel]
    columns = [_plain(table.column(c)).to_pylist() for c in ("unified_symbol", "ts_recv", ident)]
    return [(channel, *row) for row in zip(*columns, strict=True)]


def test_sigkilled_parquet_ingest_keeps_every_flushed_record_once(tmp_path):
    asyncio.run(_kill_and_restart(tmp_path, kills=3))


async def _kill_and_restart(tmp_path: Path, kills: int) -> None:
    from daedalus.sim import SimConfig, SimServer

    rng = random.Random(11)
    async with SimServer(SimConfig(rate=500, ticker_batch_interval=0.2)) as sim:
        data = tmp_path / "data"
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump(ccxt_settings(data, sim, "parquet", flush_interval_seconds=0.05,
                                                       max_open_writers=2)))  # fmt: skip
        flushed_before_kills: list[Counter[tuple[Any, ...]]] = []
        for round_ in range(kills + 1):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "daedalus", "ingest", "--config", str(config), "--source", "ccxt",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, cwd=REPO,
            )  # fmt: skip
            start = sum(durable_keys(data).values())
            await async_wait_until(lambda: sum(durable_keys(data).values()) > start + 200,  # noqa: B023
                                   timeout=60, what=f"records flushed in round {round_}")  # fmt: skip
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            if round_ < kills:
                flushed_before_kills.append(durable_keys(data))  # all of it must survive the kill
                proc.send_signal(signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 30)
            stderr = (await proc.stderr.read()).decode() if proc.stderr else ""
            assert code in (-signal.SIGKILL, 0), stderr[-2000:]
    final = durable_keys(data)
    assert not list((data / "raw" / "active" / "ccxt").rglob("*.arrow"))  # every leftover recovered at restart
    duplicated = [key for key, n in final.items() if n > 1]
    assert not duplicated, duplicated[:5]
    for before in flushed_before_kills:
        lost = [key for key in before if key not in final]
        assert not lost, lost[:5]
    files = sorted((data / "raw" / "ready" / "ccxt").rglob("*.parquet"))
    assert len({f.relative_to(data / "raw" / "ready" / "ccxt").parts[0] for f in files}) == 3
    for f in files:  # every file in ready/ opens with pyarrow, DuckDB and Polars
        rows = pq.read_table(f).num_rows
        assert rows == duckdb.sql(f"select count(*) from '{f}'").fetchall()[0][0] == pl.read_parquet(f).height


# ---- one ingest and one ETL watcher per enabled source ---------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daedalus", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO)  # fmt: skip


def test_the_supervisor_plans_one_ingest_and_one_watcher_per_source(tmp_path):
    settings = {"data_dir": str(tmp_path / "data"), "ccxt": {"enabled": True, "exchanges": {
        "kraken": {"channels": {"watchTrades": ["BTC/USD"]}}}}}  # fmt: skip
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(settings))
    planned = _cli("run", "--config", str(config), "--dry-run")
    assert planned.returncode == 0, planned.stderr
    lines = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in planned.stdout.splitlines()}
    assert set(lines) == {"ingest-ccxt", "ingest-coinbase", "etl", "etl-ccxt"}
    assert lines["ingest-ccxt"].endswith("ingest --config " + str(config.resolve()) + " --source ccxt")
    assert lines["etl-ccxt"].endswith("--watch --source ccxt") and lines["etl"].endswith("--watch --source coinbase")
    ambiguous = _cli("ingest", "--config", str(config))  # by hand, two sources: say which
    assert ambiguous.returncode == 2 and "--source: say which source to capture (enabled: " in ambiguous.stderr
    watch_both = _cli("etl", "--config", str(config), "--watch")
    assert watch_both.returncode == 2 and "one watcher per source" in watch_both.stderr
    unknown = _cli("ingest", "--config", str(config), "--source", "kraken")
    assert unknown.returncode == 2 and "unknown source 'kraken' (available: " in unknown.stderr
    assert "Traceback" not in ambiguous.stderr + watch_both.stderr + unknown.stderr
