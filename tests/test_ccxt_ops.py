"""How the ops surface sees a ccxt source: health's backlog of nested Parquet segments, the
ETL watcher it names (``etl-ccxt``), freshness per ``<exchange>:<symbol>`` from the heartbeat,
from ccxt NDJSON tails and from Parquet footers, and one failing exchange beside a working one,
with the real ingest pipeline against the simulator."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from daedalus.capture.pipeline import IngestPipeline
from daedalus.capture.record_writer import SCHEMAS, record_row, rows_to_batch
from daedalus.config import parse_config
from daedalus.ops.health import check_health
from daedalus.ops.tails import newest_in_tail
from daedalus.ops.web import capture_summary
from tests.capture_helpers import async_wait_until
from tests.test_ccxt_collector import closed_port, loopback_urls

NOW = 1_790_000_000.0


def settings(data: Path, **ccxt_exchanges: Any) -> dict[str, Any]:
    return {
        "data_dir": str(data),
        "coinbase": {"enabled": False},
        "ingestion": {"raw_format": "parquet", "flush_interval_seconds": 0.1},
        "supervisor": {"heartbeat_seconds": 0.2},
        "health": {"backlog_warning_segments": 1, "backlog_critical_segments": 1000},
        "ccxt": {"enabled": True,
                 "exchanges": ccxt_exchanges or {"coinbase": {"channels": {"watchTrades": ["BTC/USD"]}}}},
    }


def trade(recv_s: float, trade_id: str, symbol: str = "BTC/USD") -> tuple[int, dict[str, Any]]:
    recv_ns = int(recv_s * 1e9)
    return recv_ns, {"id": trade_id, "symbol": symbol, "timestamp": recv_ns // 1_000_000, "price": 100.0,
                     "amount": 1.0, "side": "buy"}  # fmt: skip


def write_parquet_segment(data: Path, name: str, records: list[tuple[int, dict[str, Any]]],
                          symbol_dir: str = "BTC-USD") -> Path:  # fmt: skip
    folder = (data / "raw" / "ready" / "ccxt" / "trades" / "exchange=coinbase" / f"symbol={symbol_dir}"
              / "year=2026" / "month=09" / "day=21" / "hour=10")  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    batch = rows_to_batch("trades", [record_row("trades", ns, rec) for ns, rec in records])
    pq.write_table(pa.Table.from_batches([batch], schema=SCHEMAS["trades"]), folder / name)
    return folder / name


def test_nested_parquet_backlog_is_counted_and_its_advice_names_etl_ccxt(tmp_path: Path) -> None:
    data = tmp_path / "data"
    config = parse_config(settings(data))
    write_parquet_segment(data, "segment_20260921T10_00001.parquet", [trade(NOW - 30, "1")])
    write_parquet_segment(data, "segment_20260921T10_00002.parquet", [trade(NOW - 10, "2")])
    report = check_health(config, supervisor_running=False, now=NOW)
    backlog = report.sources["ccxt"]["backlog"]
    assert backlog["segments"] == 2 and backlog["bytes"] > 0 and backlog["level"] == "warning"
    assert report.sources["ccxt"]["states"]["ready"]["files"] == 2
    advice = next(f.recommendation for f in report.findings if f.check == "backlog")
    assert advice is not None and "--source ccxt" in advice
    # freshness from the newest segment's footer, named as the heartbeat names the market
    fresh = report.freshness["coinbase:BTC/USD"]
    assert fresh["from"] == "segment segment_20260921T10_00002.parquet"
    assert abs(fresh["age_seconds"] - 10) < 1e-3


def test_ccxt_ndjson_tail_tells_each_markets_newest_record(tmp_path: Path) -> None:
    segment = tmp_path / "segment_20260921T10_00001.ndjson"
    lines = []
    for recv_s, symbol in ((NOW - 20, "BTC/USD"), (NOW - 5, "ETH/USD"), (NOW - 3, "BTC/USD")):
        recv_ns, record = trade(recv_s, "x", symbol)
        msg = {"channel": "trades", "exchange": "coinbase", "symbol": symbol, "record": record}
        lines.append(orjson.dumps({"recv_ns": recv_ns, "conn": 1, "msg": msg}))
    segment.write_bytes(b"\n".join(lines) + b"\n")
    times, used = newest_in_tail(segment, ["coinbase:BTC/USD", "coinbase:ETH/USD", "kraken:BTC/USD"])
    assert used > 0
    assert times == {"coinbase:BTC/USD": int((NOW - 3) * 1e9) / 1e9, "coinbase:ETH/USD": int((NOW - 5) * 1e9) / 1e9}


def test_an_open_arrow_segment_is_not_read_as_lines(tmp_path: Path) -> None:
    ipc = tmp_path / "segment_20260921T10_00001.arrow"
    ipc.write_bytes(b"\xff" * 4096 + b"\n" + b'{"recv_ns":1,"conn":1,"msg":{"product_id":"BTC-USD"}}\n')
    assert newest_in_tail(ipc, ["BTC-USD"]) == ({}, 0)


async def test_live_ccxt_ingest_health_shows_fresh_markets_a_failing_exchange_and_the_backlog(make_sim, tmp_path):
    sim = await make_sim(rate=200)
    data = tmp_path / "data"
    exchanges = {
        "coinbase": {"urls": {"api": {"rest": sim.rest_url, "ws": sim.ws_url}},
                     "channels": {"watchTrades": ["BTC/USD"], "watchOrderBook": ["BTC/USD"]}},
        "kraken": {"urls": loopback_urls("kraken", closed_port()), "channels": {"watchTrades": ["BTC/USD"]}},
    }  # fmt: skip
    config = parse_config(settings(data, **exchanges))
    pipeline = IngestPipeline(config, source="ccxt")
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop))
    beat_file = config.layout.heartbeat_file("ingest-ccxt")

    def published() -> dict[str, Any] | None:
        if not beat_file.exists():
            return None
        beat = orjson.loads(beat_file.read_bytes())
        ok = "coinbase:BTC/USD" in beat["products"] and beat["gauges"].get("failing", {}).get("kraken") == 1
        return beat if ok else None

    try:
        await async_wait_until(lambda: published() is not None, timeout=30, what="a heartbeat with both exchanges")
        beat = published()
        assert beat is not None and beat["gauges"]["connected"] == {"coinbase": 1, "kraken": 0}
        report = await asyncio.to_thread(check_health, config, supervisor_running=False)
        assert report.freshness["coinbase:BTC/USD"]["from"] == "heartbeat"
        assert report.freshness["coinbase:BTC/USD"]["level"] == "ok"
        assert report.freshness["kraken:BTC/USD"]["age_seconds"] is None
        failing = [f for f in report.findings if f.check == "ingest" and f.subject == "ingest-ccxt"]
        assert failing and "kraken" in failing[0].message and "coinbase" not in failing[0].message
    finally:
        stop.set()
        await task
    # closed segments wait for the ETL in nested partitions: counted, and still tell freshness
    report = check_health(config, supervisor_running=False)
    assert report.sources["ccxt"]["backlog"]["segments"] >= 1  # (before: 0, the nested folders were not listed)
    assert report.freshness["coinbase:BTC/USD"]["from"].startswith("segment segment_")
    assert report.freshness["coinbase:BTC/USD"]["level"] == "ok"


def test_status_page_counts_failing_exchanges() -> None:
    from daedalus.ops.records import ChildStatus

    child = ChildStatus("ingest-ccxt", "ingest", "ccxt", [], "running", NOW,
                        counters={"frames_received": {"coinbase": 5, "kraken": 0}},
                        gauges={"connected": {"coinbase": 1, "kraken": 0}, "failing": {"coinbase": 0, "kraken": 1}})
    summary = capture_summary([child])["ccxt"]
    assert summary["connections"] == 2 and summary["connected"] == 1 and summary["failing"] == 1
