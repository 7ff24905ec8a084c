"""The Databento source end to end: the gateway simulator's MBO market, captured by the real
``daedalus ingest`` (twice: a SIGKILL and a restart in between), turned into tables by the real
``daedalus etl``, read back with DuckDB and ``daedalus query``.

The truth is the simulator's own book: its truth file holds the top of every instrument's book
after each MBO record the market generated, so the ETL's ``level2`` best bid/ask is compared
after every record it holds, keyed by (instrument, sequence).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import orjson
import yaml

from daedalus.sim.databento import TEST_API_KEY, DatabentoGateway, GatewayConfig, instrument_id_for
from tests.conftest import REPO
from tests.test_databento_capture import segments, start_ingest, wait_until

DATASET = "GLBX.MDP3"
SYMBOLS = ("ESM6", "NQM6")
UNDEF_PRICE = 2**63 - 1


def write_config(path: Path, data: Path, port: int) -> None:
    subscriptions = [
        {"dataset": DATASET, "schema": "mbo", "symbols": list(SYMBOLS), "snapshot": True},
        {"dataset": DATASET, "schema": "trades", "symbols": list(SYMBOLS)},
    ]
    settings = {
        "data_dir": str(data),
        "coinbase": {"enabled": False},
        "databento": {"enabled": True, "api_key": TEST_API_KEY, "gateway": "127.0.0.1", "port": port,
                      "heartbeat_interval_s": 5, "subscriptions": subscriptions},
        "ingestion": {"flush_interval_seconds": 0.1, "reconnect_delay": 0.05, "max_reconnect_delay": 0.2,
                      "segment_max_mb": 0.05, "batch_size": 50},
        "etl": {"decimal_strategy": "pips"},
        "supervisor": {"heartbeat_seconds": 0.2},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(settings))


async def capture_twice(tmp_path: Path, data: Path, config: Path, truth: Path) -> None:
    """Two runs of ingest against one market: the first SIGKILLed with a segment open."""
    gateway_config = GatewayConfig(symbols=SYMBOLS, rate=1500, seed=11, truth=truth)
    async with DatabentoGateway(gateway_config) as gateway:
        write_config(config, data, gateway.port)
        proc = await start_ingest(config)
        await wait_until(lambda: len(segments(data)) >= 2 and segments(data, "active"), what="segments")
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 15)
        before = gateway.started_sessions
        proc = await start_ingest(config)
        await wait_until(lambda: gateway.started_sessions > before, what="the restarted session")
        ready = len(segments(data))
        await wait_until(lambda: len(segments(data)) > ready + 2, what="segments of the second run")
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err.decode()[-3000:]


def daedalus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daedalus", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)  # fmt: skip


async def test_captured_mbo_books_equal_the_simulators_true_book_after_every_record(tmp_path):
    data, config, truth = tmp_path / "data", tmp_path / "config.yaml", tmp_path / "truth.ndjson"
    await capture_twice(tmp_path, data, config, truth)

    etl = daedalus("etl", "--config", str(config), "--source", "databento")
    assert etl.returncode == 0, etl.stderr[-3000:]
    assert not list((data / "raw" / "ready").rglob("segment_*"))  # every segment processed
    # nothing the ETL refused (recovery may have cut a torn tail off the killed run's segment: *.tail-*)
    assert [p.name for p in (data / "raw" / "quarantine").rglob("segment_*") if ".tail-" not in p.name] == []

    true_top = {}
    for line in truth.read_bytes().splitlines():
        row = orjson.loads(line)
        true_top[(row["instrument_id"], row["sequence"])] = (row["bid_px"], row["ask_px"])
    level2 = str(data / "processed" / "databento" / "level2" / "**" / "*.parquet")
    rows = duckdb.sql(
        f"select instrument_id, sequence, best_bid, best_ask, book_valid, is_snapshot, symbol, dataset "
        f"from read_parquet('{level2}', hive_partitioning=true)"
    ).fetchall()
    ids = {instrument_id_for(symbol): symbol for symbol in SYMBOLS}
    compared = 0
    for iid, seq, best_bid, best_ask, valid, is_snapshot, symbol, dataset in rows:
        assert (symbol, dataset) == (ids[iid], DATASET)
        if is_snapshot:
            continue  # the book the gateway sent at subscription: its records are not market events
        # every market record after a session's snapshot lands on a known book
        assert valid, (iid, seq)
        bid, ask = true_top[(iid, seq)]
        assert (best_bid, best_ask) == (None if bid == UNDEF_PRICE else bid, None if ask == UNDEF_PRICE else ask)
        compared += 1
    assert compared > 1000
    # both runs' books were rebuilt from their own snapshots (the restart is a gap: never continued)
    snapshots = duckdb.sql(f"select count(distinct ts_recv) from read_parquet('{level2}') where is_snapshot").fetchall()
    assert snapshots[0][0] >= 2

    # the tables are views of daedalus query, with dataset and symbol as columns
    sql = "select dataset, symbol, count(*) > 0 from databento_market_trades group by all order by 2"
    query = daedalus("query", "--config", str(config), "--format", "csv", sql)
    assert query.returncode == 0, query.stderr[-2000:]
    assert query.stdout.splitlines()[1:] == [f'"{DATASET}","{symbol}",true' for symbol in SYMBOLS]


async def test_daedalus_run_supervises_the_databento_source_and_health_sees_it(tmp_path):
    """The supervisor starts ``ingest-databento`` and ``etl-databento`` for the enabled source;
    level2 lands while it runs, and health judges each subscribed symbol fresh."""
    from tests.supervisor_helpers import Supervised, cli, up, write_yaml

    data = tmp_path / "data"
    async with DatabentoGateway(GatewayConfig(symbols=SYMBOLS, rate=300, seed=3)) as gateway:
        config_path = tmp_path / "config.yaml"
        write_config(config_path, data, gateway.port)
        settings = yaml.safe_load(config_path.read_text())
        settings["etl"] = {"poll_interval_seconds": 0.2}
        settings["supervisor"] = {"status_port": 0, "start_seconds": 0.5, "heartbeat_seconds": 0.3,
                                  "backoff_initial_seconds": 0.2, "backoff_max_seconds": 1.0}  # fmt: skip
        write_yaml(config_path, settings)
        sup = await Supervised(tmp_path, config_path, data).start()
        try:
            for child in ("ingest-databento", "etl-databento"):
                await sup.wait_child(child, up, f"{child} running", timeout=60)
            level2 = data / "processed" / "databento" / "level2"
            await sup.wait(lambda: level2.is_dir() and any(level2.rglob("*.parquet")), "level2 files", timeout=60)
            _code, out, _err = await cli("health", "--config", str(config_path), "--json")
        finally:
            assert await sup.stop() == 0, sup.text()[-3000:]
    report = orjson.loads(out)
    wanted = {f"{DATASET}:{symbol}" for symbol in SYMBOLS}
    assert set(report["freshness"]) == wanted, report["freshness"]
    assert {(f["source"], f["level"], f["from"]) for f in report["freshness"].values()} == {
        ("databento", "ok", "heartbeat")
    }
    assert not [f for f in report["findings"] if f["check"] == "freshness"], report["findings"]
    assert report["sources"]["databento"]["backlog"]["level"] == "ok"
