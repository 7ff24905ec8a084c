"""The ETL end to end: real segments (captured by `daedalus ingest` from the simulator, or
cut from the reference recording), real Parquet read back with pyarrow, DuckDB and Polars,
checked against independent reconstructions and the simulator's ground truth."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path

import duckdb
import orjson
import polars as pl
import pytest
import zstandard

from daedalus.capture.records import control_line
from tests.capture_helpers import ingest_config
from tests.conftest import RECORDING, REPO
from tests.etl_helpers import (
    DictBooks,
    channel_table,
    recording_frames,
    recording_lines,
    run_etl,
    write_segments,
)
from tests.test_capture_ingest import Running

pytestmark = pytest.mark.skipif(not RECORDING.exists(), reason=f"reference recording missing: {RECORDING}")
CHANNELS = ["level2", "market_trades", "ticker", "candles", "heartbeats"]


def level2_rows(data_dir: Path) -> dict[str, list[tuple]]:
    table = channel_table(data_dir, "level2")
    rows = defaultdict(list)
    for r in table.to_pylist():
        rows[r["product_id"]].append(r)
    return rows


async def capture_recording(sim, data_dir: Path, **ingestion) -> None:
    """Run `daedalus ingest` (in process) until it has written every frame of the recording."""
    config = ingest_config(data_dir, sim.ws_url, **ingestion)
    config["coinbase"]["channels"] = CHANNELS
    run = Running(config)
    expected = len(recording_frames())
    async with asyncio.timeout(60):
        while sum(len(c.sent_frames) for c in sim.connections) < expected:
            await asyncio.sleep(0.05)
        while run.pipeline.writer.stats.written < expected:
            await asyncio.sleep(0.05)
    await run.close()


async def test_recording_via_sim_and_ingest_matches_an_independent_reconstruction(make_sim, tmp_path):
    sim = await make_sim(replay=RECORDING, speed=0, keep_sent=True)
    await capture_recording(sim, tmp_path, segment_max_mb=1.0)
    assert len(list((tmp_path / "raw" / "ready" / "coinbase").iterdir())) >= 3  # the books cross segments
    summary = run_etl(tmp_path, channels={"book_snapshot": {"snapshot_interval_ms": 1}})  # replayed in < 1 s
    assert summary.counts["gaps"] == 0 and summary.quarantined_lines == 0

    frames = [frame for _, frame, _ in recording_frames()]
    reference = DictBooks()
    expected = defaultdict(list)
    for frame in frames:
        if frame.get("channel") == "l2_data":
            for row in reference.apply(frame):
                expected[row[0]].append(row[1:])
    got = level2_rows(tmp_path)
    assert set(got) == {"BTC-USD", "ETH-USD"}
    for product, rows in got.items():
        seen = [(r["side"], r["price"], r["size"], r["is_snapshot"], r["best_bid"], r["best_ask"]) for r in rows]
        assert seen == expected[product]  # both snapshots and every update, bbo after each frame
        assert all(r["book_valid"] for r in rows)
        assert not any(r["best_bid"] >= r["best_ask"] for r in rows if r["book_valid"])
        assert all(r["mid_price"] == pytest.approx((r["best_bid"] + r["best_ask"]) / 2, abs=1e-9) for r in rows)
        assert all(r["spread"] == pytest.approx(r["best_ask"] - r["best_bid"], abs=1e-9) for r in rows)
    assert sum(r[3] for r in expected["BTC-USD"]) > 40_000  # the 5 MB snapshot is in

    trade_ids = {(t["product_id"], t["trade_id"]) for f in frames if f.get("channel") == "market_trades"
                 for e in f["events"] for t in e["trades"]}  # fmt: skip
    tickers = sum(len(e["tickers"]) for f in frames if f.get("channel") == "ticker" for e in f["events"])
    trades = channel_table(tmp_path, "market_trades")
    assert trades.num_rows == len(trade_ids)
    assert channel_table(tmp_path, "ticker").num_rows == tickers
    assert_queryable(tmp_path)


def assert_queryable(data_dir: Path) -> None:
    """DuckDB and Polars read every dataset with its partition columns and proper types."""
    root = data_dir / "processed" / "coinbase"
    channels = sorted(p.name for p in root.iterdir())
    assert channels == ["bars_1m", "book_snapshot_10", "candles", "level2", "market_trades", "ticker"]
    con = duckdb.connect()
    for channel in channels:
        glob = f"{root}/{channel}/**/*.parquet"
        types = describe(con, glob)
        assert types["product_id"] == "VARCHAR" and types["date"] == "DATE", channel
        assert types["ts_recv"] in ("TIMESTAMPTZ_NS", "TIMESTAMP WITH TIME ZONE"), channel
        schema = pl.scan_parquet(glob, hive_partitioning=True).collect_schema()
        assert schema["product_id"] == pl.String and schema["date"] == pl.Date, channel
        assert schema["ts_event"] == pl.Datetime("ns", "UTC"), channel
        n_duck = con.sql(f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning=true)").fetchall()[0][0]
        assert n_duck == pl.scan_parquet(glob, hive_partitioning=True).select(pl.len()).collect().item() > 0
    level2 = f"{root}/level2/**/*.parquet"
    types = describe(con, level2)
    assert types["price"] == types["best_bid"] == "DOUBLE" and types["book_valid"] == "BOOLEAN"
    assert types["seq"] == "BIGINT" and types["side"] == "VARCHAR"
    bars = con.sql(f"SELECT sum(trade_count) FROM read_parquet('{root}/bars_1m/**/*.parquet')").fetchall()[0][0]
    assert bars > 0


def describe(con: duckdb.DuckDBPyConnection, glob: str) -> dict[str, str]:
    rows = con.sql(f"DESCRIBE SELECT * FROM read_parquet('{glob}', hive_partitioning=true)").fetchall()
    return {row[0]: row[1] for row in rows}


async def test_books_equal_the_simulator_truth_across_segments_and_gaps(make_sim, tmp_path):
    sim = await make_sim(rate=0, keep_sent=True)
    config = ingest_config(tmp_path, sim.ws_url, segment_max_mb=0.05)
    config["coinbase"]["channels"] = CHANNELS
    run = Running(config)
    async with asyncio.timeout(10):
        while not sim.connections or len(sim.connections[0].subs) < len(CHANNELS):
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    for step in range(30):
        sim.faults.drop_rate = 0.03 if 10 <= step < 14 else 0.0  # frames lost -> gaps -> fresh snapshots
        await sim.advance(150)
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.8)  # flushed; the truth is only kept for open connections, so check before closing
    conns = [*sim.connections]
    assert sum(c.dropped for c in conns) > 0
    segments = sorted((tmp_path / "raw" / "ready" / "coinbase").iterdir())
    assert len(segments) >= 5
    sampling = {"book_snapshot": {"levels": 5, "snapshot_interval_ms": 20}}
    summary = await asyncio.to_thread(run_etl, tmp_path, after_processing="archive", channels=sampling)
    assert summary.counts["gaps"] > 0
    assert len(list((tmp_path / "raw" / "archive" / "coinbase").iterdir())) == len(segments)
    checked = invalid = 0
    frame_of = {}
    for product, rows in level2_rows(tmp_path).items():
        state = "valid"
        index = 0  # which connection: sequence numbers restart on each
        for i, r in enumerate(rows):
            if i and r["seq"] < rows[i - 1]["seq"]:
                index += 1
            conn = r["conn"] = conns[index]
            if r["is_snapshot"]:
                state = "valid"
            if not r["book_valid"]:
                invalid += 1
                state = "invalid"
                continue
            assert state == "valid", "a book became valid again without a snapshot"
            frame_of.setdefault(product, []).append((r["ts_recv"], r["seq"], conn))
            truth = sim.true_book(product, 1, connection=conn, after_seq=r["seq"])
            assert (r["best_bid"], r["best_ask"]) == (float(truth["bids"][0][0]), float(truth["asks"][0][0]))
            checked += 1
    assert checked > 1000 and invalid > 0

    samples = channel_table(tmp_path, "book_snapshot_5").to_pylist()
    compared = 0
    for sample in samples:
        if not sample["book_valid"]:
            continue
        before = [(seq, conn) for ts, seq, conn in frame_of[sample["product_id"]] if ts < sample["ts_recv"]]
        truth = sim.true_book(sample["product_id"], 5, connection=before[-1][1], after_seq=before[-1][0])
        got_bids = [(sample[f"bid_px_{i:02d}"], sample[f"bid_sz_{i:02d}"]) for i in range(5)]
        got_asks = [(sample[f"ask_px_{i:02d}"], sample[f"ask_sz_{i:02d}"]) for i in range(5)]
        assert got_bids == [(float(p), float(s)) for p, s in truth["bids"]]
        assert got_asks == [(float(p), float(s)) for p, s in truth["asks"]]
        compared += 1
    assert compared > 20
    await run.close()


def test_decimal_strategies_keep_exact_values(tmp_path):
    lines = recording_lines()[:200]
    for strategy in ("float", "pips", "decimal"):
        data = tmp_path / strategy
        write_segments(data, [lines])
        run_etl(data, decimal_strategy=strategy)
    floats = channel_table(tmp_path / "float", "level2").to_pydict()
    pips = channel_table(tmp_path / "pips", "level2").to_pydict()
    decimals = channel_table(tmp_path / "decimal", "level2")
    assert str(decimals.schema.field("price").type) == "decimal128(38, 8)"
    assert pips["price"] == [round(p * 1e8) for p in floats["price"]]
    assert [float(d) for d in decimals.column("size").to_pylist()] == floats["size"]
    con = duckdb.connect()
    meta = con.sql(
        f"SELECT decode(key), decode(value) FROM parquet_kv_metadata('{tmp_path}/pips/processed/**/*.parquet')"
    ).fetchall()
    assert ("daedalus.decimal_scale", "100000000") in meta and ("daedalus.decimal_strategy", "pips") in meta


def test_bad_lines_are_quarantined_and_everything_else_processed(tmp_path):
    lines = recording_lines()[:300]
    hostile = [
        b'{"recv_ns":5,"conn":1,"raw":"not json {"}\n',
        b'{"recv_ns":5,"conn":1,"msg":{"channel":"l2_data","events":"oops"}}\n',  # valid JSON, wrong shape
        b'{"recv_ns":5,"conn":1,"msg":{"channel":"mystery","events":[]}}\n',
        b'{"recv_ns":5,"conn":1,"msg":{"type":"error","message":"failure to subscribe"}}\n',
        b"garbage that is not a record\n",
    ]
    bad = lines[:100] + hostile + lines[100:] + [lines[-1][:40]]  # ... and a torn tail
    write_segments(tmp_path, [bad])
    clean = tmp_path / "clean"
    write_segments(clean, [lines])
    summary = run_etl(tmp_path)
    run_etl(clean)
    assert summary.segments == 1 and summary.quarantined_segments == 0
    assert summary.quarantined_lines == 6
    rejects = (tmp_path / "raw" / "quarantine" / "coinbase").glob("*.etl-rejects.ndjson")
    reasons = [orjson.loads(line)["reason"] for path in rejects for line in path.read_bytes().splitlines()]
    assert any("unknown channel 'mystery'" in r for r in reasons)
    assert any("exchange error: failure to subscribe" in r for r in reasons)
    for channel in ("level2", "market_trades", "ticker"):
        assert channel_table(tmp_path, channel) == channel_table(clean, channel), channel


def test_a_torn_zstd_segment_keeps_every_complete_frame(tmp_path):
    lines = recording_lines()
    compressor = zstandard.ZstdCompressor()
    frames = [compressor.compress(b"".join(lines[i : i + 100])) for i in range(0, len(lines), 100)]
    ready = tmp_path / "raw" / "ready" / "coinbase"
    ready.mkdir(parents=True)
    torn = b"".join(frames[:-1]) + frames[-1][: len(frames[-1]) // 2]  # cut inside the last zstd frame
    (ready / "segment_20260809T21_00001.ndjson.zst").write_bytes(torn)
    summary = run_etl(tmp_path)
    assert summary.segments == 1 and summary.quarantined_segments == 0 and summary.quarantined_lines >= 1
    kept = len(lines) - len(lines[(len(frames) - 1) * 100 :])
    assert summary.counts["l2_data"] + summary.counts["market_trades"] + summary.counts["ticker"] > 0
    clean = tmp_path / "clean"
    write_segments(clean, [lines[:kept]])
    run_etl(clean)
    assert channel_table(tmp_path, "level2") == channel_table(clean, "level2")


def test_date_mode_processes_only_that_day(tmp_path):
    lines = recording_lines()
    write_segments(tmp_path, [lines[:400]], hour="20260809T21")
    write_segments(tmp_path, [lines[400:]], hour="20260810T00")
    config = {"data_dir": str(tmp_path)}
    (tmp_path / "c.yaml").write_text(orjson.dumps(config).decode())
    cli = [sys.executable, "-m", "daedalus", "etl", "-c", str(tmp_path / "c.yaml")]
    done = subprocess.run([*cli, "--mode", "date", "--date", "2026-08-10"], capture_output=True, text=True, check=True)
    assert "segments: 1 " in done.stdout
    assert [p.name for p in (tmp_path / "raw" / "ready" / "coinbase").iterdir()] == ["segment_20260809T21_00001.ndjson"]
    bad = subprocess.run([*cli, "--mode", "range", "--start-date", "2026-08-10"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--mode range needs --end-date YYYY-MM-DD" in bad.stderr


def test_sigkill_at_random_points_then_rerun_gives_the_same_dataset(tmp_path):
    lines = recording_lines()
    reconnect = [control_line(1_786_309_549_000_000_000, 1, "connect", {"url": "x"})]
    chunks = [lines[i : i + 40] for i in range(0, len(lines), 40)]
    chunks += [reconnect + lines[:150], *chunks[5:]]  # a reconnect: a snapshot again, trades repeated
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for data in (reference, killed):
        write_segments(data, chunks, zstd_every=3)
        config = {"data_dir": str(data), "etl": {"after_processing": "archive"}}
        (data / "c.yaml").write_text(orjson.dumps(config).decode())
    cli = [sys.executable, "-m", "daedalus", "etl", "-c"]
    subprocess.run([*cli, str(reference / "c.yaml")], check=True, capture_output=True, cwd=REPO)
    rng = random.Random(11)
    raw = killed / "raw"

    def count(state: str) -> int:
        return len(list((raw / state / "coinbase").iterdir())) if (raw / state / "coinbase").exists() else 0

    kills = 0
    while kills < 5 and count("ready") + count("processing") > 3:
        target = count("archive") + rng.randint(1, 4)  # kill somewhere inside a random later segment
        proc = subprocess.Popen([*cli, str(killed / "c.yaml")], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        while count("archive") < target and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.03))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    subprocess.run([*cli, str(killed / "c.yaml")], check=True, capture_output=True, cwd=REPO)
    assert kills >= 3
    for data in (reference, killed):
        assert not list((data / "raw" / "ready" / "coinbase").iterdir())
        assert not list((data / "raw" / "processing" / "coinbase").iterdir())
        assert not list((data / "processed").rglob("*.tmp"))
    names = sorted(str(p.relative_to(reference)) for p in (reference / "processed" / "coinbase").rglob("*.parquet"))
    assert names == sorted(str(p.relative_to(killed)) for p in (killed / "processed" / "coinbase").rglob("*.parquet"))
    for channel in ("level2", "book_snapshot_10", "market_trades", "ticker", "candles", "bars_1m"):
        assert channel_table(killed, channel) == channel_table(reference, channel), channel
    trades = channel_table(reference, "market_trades").to_pylist()
    assert len({(t["product_id"], t["trade_id"]) for t in trades}) == len(trades)  # the repeat was dropped
    shutil.rmtree(tmp_path)


def test_watch_processes_segments_as_they_arrive_and_stops_on_sigterm(tmp_path):
    config = {"data_dir": str(tmp_path), "etl": {"poll_interval_seconds": 0.2}}
    (tmp_path / "c.yaml").write_text(orjson.dumps(config).decode())
    proc = subprocess.Popen([sys.executable, "-m", "daedalus", "etl", "-c", str(tmp_path / "c.yaml"), "--watch"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        lines = recording_lines()
        level2 = tmp_path / "processed" / "coinbase" / "level2"
        for i, chunk in enumerate((lines[:300], lines[300:])):
            write_segments(tmp_path / "staging", [chunk])
            staged = tmp_path / "staging" / "raw" / "ready" / "coinbase" / "segment_20260809T21_00001.ndjson"
            ready = tmp_path / "raw" / "ready" / "coinbase"
            ready.mkdir(parents=True, exist_ok=True)
            staged.rename(ready / f"segment_20260809T21_{i + 1:05d}.ndjson")  # appears atomically, like rotation
            deadline = time.monotonic() + 60
            while len(list(level2.rglob("*.parquet"))) < 2 * (i + 1) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(list(level2.rglob("*.parquet"))) == 2 * (i + 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "segments: 2 " in out


def test_an_unwritable_output_stops_the_run_and_keeps_the_segment_for_a_retry(tmp_path):
    write_segments(tmp_path, [recording_lines()[:300]])
    blocker = tmp_path / "processed" / "coinbase"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the output directory should be")
    config = {"data_dir": str(tmp_path)}
    (tmp_path / "c.yaml").write_text(orjson.dumps(config).decode())
    cli = [sys.executable, "-m", "daedalus", "etl", "-c", str(tmp_path / "c.yaml")]
    failed = subprocess.run(cli, capture_output=True, text=True, cwd=REPO)
    assert failed.returncode == 1 and "etl stopped: segment_20260809T21_00001.ndjson" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert [p.name for p in (tmp_path / "raw" / "processing" / "coinbase").iterdir()] == [
        "segment_20260809T21_00001.ndjson"
    ]
    blocker.unlink()
    done = subprocess.run(cli, capture_output=True, text=True, cwd=REPO, check=True)
    assert "segments: 1 " in done.stdout
    assert channel_table(tmp_path, "level2").num_rows > 0


def _trade(recv_ns: int, seq: int, trade_id: int, price: str, size: str) -> bytes:
    second = (recv_ns - 1_786_309_200_000_000_000) // 10**9  # from 21:00:00
    text = (f'{{"channel":"market_trades","timestamp":"2026-08-09T21:{second // 60:02d}:{second % 60:02d}Z",'
            f'"sequence_num":{seq},"events":[{{"type":"update","trades":[{{"product_id":"PEPE-USD","trade_id":'
            f'"{trade_id}","price":"{price}","size":"{size}","side":"BUY",'
            f'"time":"2026-08-09T21:{second // 60:02d}:{second % 60:02d}Z"}}]}}]}}')  # fmt: skip
    return f'{{"recv_ns":{recv_ns},"conn":1,"msg":{text}}}\n'.encode()


@pytest.mark.parametrize("strategy", ["float", "decimal", "pips"])
@pytest.mark.parametrize("scanner", ["compiled", "duckdb"])
def test_a_bar_volume_past_int64_units_is_kept_exact_or_a_counted_null(tmp_path, strategy, scanner):
    """Three trades of 5e10 PEPE in one minute: 1.5e19 units of 1e-8, past int64. The sum
    within a batch must not wrap, the open bar (1e19 after the first segment) must survive the
    checkpoint, and the bar is written with its exact volume (float, decimal) or, where the
    column cannot hold it (pips), a null counted under ``numbers_out_of_range``."""
    t0 = 1_786_309_200_000_000_000  # 2026-08-09T21:00:00Z
    connect = control_line(t0, 1, "connect", {"url": "wss://x"})
    first = [connect, _trade(t0 + 1 * 10**9, 1, 1, "0.00001", "50000000000"),
             _trade(t0 + 2 * 10**9, 2, 2, "0.00001", "50000000000")]  # fmt: skip
    # the last trade moves the clock past 21:01 plus the grace: the bar closes
    second = [_trade(t0 + 3 * 10**9, 3, 3, "0.00001", "50000000000"),
              _trade(t0 + 130 * 10**9, 4, 4, "0.00002", "1")]  # fmt: skip
    write_segments(tmp_path, [first])
    assert run_etl(tmp_path, decimal_strategy=strategy, l2_scanner=scanner).segments == 1
    write_segments(tmp_path, [[], second])  # the second segment, after the first was checkpointed
    summary = run_etl(tmp_path, decimal_strategy=strategy, l2_scanner=scanner)
    bars = channel_table(tmp_path, "bars_1m").to_pylist()
    assert [(b["start"], b["trade_count"]) for b in bars] == [(t0, 3)]
    volume, vwap = bars[0]["volume"], bars[0]["vwap"]
    if strategy == "pips":
        assert volume is None and summary.counts["numbers_out_of_range"] == 1
        assert vwap == 1000  # 0.00001 in units of 1e-8
    else:
        assert volume == (150_000_000_000 if strategy == "float" else Decimal("150000000000"))
        assert float(vwap) == pytest.approx(0.00001) and summary.counts["numbers_out_of_range"] == 0
