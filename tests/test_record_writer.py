"""The streaming Parquet raw writer (daedalus.capture.record_writer): records in == records out
across partitions, rotation, eviction, quarantine, SIGKILL recovery and bounded memory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import orjson
import polars as pl
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from daedalus.capture.record_writer import HOUR_NS, RecordWriter, recover
from daedalus.config import IngestionConfig
from daedalus.layout import DataLayout, parse_segment_name, symbol_component

REPO = Path(__file__).resolve().parents[1]
HOUR0 = 1_786_309_200 * 1_000_000_000  # 2026-08-09T21:00Z, an hour boundary


def recv(i: int) -> int:
    """Receive times inside HOUR0's hour, one microsecond apart."""
    return HOUR0 + i * 1_000


def config(**overrides: Any) -> IngestionConfig:
    base: dict[str, Any] = {"batch_size": 20, "flush_interval_seconds": 0.05, "fsync": False}
    return IngestionConfig(**(base | overrides))


def trade(i: int, symbol: str = "BTC/USD") -> dict[str, Any]:
    return {"id": str(i), "symbol": symbol, "timestamp": 1_786_309_200_000 + i, "price": 100.0 + i,
            "amount": 0.5, "cost": 50.0 + i / 2, "side": "buy" if i % 2 else "sell", "takerOrMaker": None,
            "info": {"raw": i}}  # fmt: skip


def ticker(i: int) -> dict[str, Any]:
    return {"symbol": "X", "timestamp": 1_786_309_200_000, "bid": 1.0, "ask": 2.0, "last": float(i),
            "bidVolume": 3, "askVolume": None, "baseVolume": 10.0, "quoteVolume": 20.0}  # fmt: skip


def book(i: int, depth: int = 5) -> dict[str, Any]:
    return {"bids": [[100.0 - k, 1.0 + k] for k in range(depth)], "asks": [[101.0 + k, 2.0, 7] for k in range(depth)],
            "timestamp": 1_786_309_200_000, "nonce": i, "symbol": "X"}  # fmt: skip


def ready_files(layout: DataLayout, source: str = "ccxt") -> list[Path]:
    return sorted(layout.ready(source).rglob("*.parquet"))


def read_all(files: list[Path], channel: str, column: str) -> list[Any]:
    """``column`` of every file of ``channel``, read three ways; the three must agree."""
    chosen = [f for f in files if f"/{channel}/" in f.as_posix()]
    if not chosen:
        return []
    by_arrow = [v for f in chosen for v in pq.read_table(f).column(column).to_pylist()]
    names = [str(f) for f in chosen]
    by_duck = [r[0] for r in duckdb.sql(f"SELECT {column} FROM read_parquet({names!r}, hive_partitioning=false)")
               .fetchall()]  # fmt: skip
    by_polars = pl.concat([pl.read_parquet(f, hive_partitioning=False) for f in chosen])[column].to_list()
    assert sorted(by_arrow) == sorted(by_duck) == sorted(by_polars)
    return by_arrow


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_records_in_equal_out_across_partitions(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    writer = RecordWriter(layout, config(), max_queued_bytes=64 * 2**20)  # the burst fits: no overflow here
    writer.start()
    n = 3000
    for i in range(n):
        exchange, symbol = f"ex{i % 4}", f"S{i % 5}/USD"
        assert writer.put_record(channel="trades", exchange=exchange, symbol=symbol, recv_ns=recv(i), record=trade(i))
        assert writer.put_record(channel="ticker", exchange=exchange, symbol=symbol, recv_ns=recv(i), record=ticker(i))
        assert writer.put_record(channel="orderbook", exchange=exchange, symbol=symbol, recv_ns=recv(i),
                                 record=book(i))  # fmt: skip
    assert writer.close(30)
    files = ready_files(layout)
    assert len({f.parent for f in files}) == 60  # 3 channels x 4 exchanges x 5 symbols, one hour
    assert sorted(map(int, read_all(files, "trades", "trade_id"))) == list(range(n))
    assert sorted(read_all(files, "ticker", "last")) == [float(i) for i in range(n)]
    assert sorted(read_all(files, "orderbook", "nonce")) == list(range(n))
    assert not list(layout.active("ccxt").rglob("*.arrow"))
    table = pq.read_table(next(f for f in files if "/orderbook/" in f.as_posix()))
    assert table.schema.field("ts_recv").type == pa.timestamp("ns", tz="UTC")
    row = table.drop(["ts_recv", "ts_event"]).to_pylist()[0]
    assert row["bids"][0] == {"price": 100.0, "amount": 1.0} and len(row["asks"]) == 5
    tick = pq.read_table(next(f for f in files if "/ticker/" in f.as_posix())).drop(["ts_recv", "ts_event"])
    assert tick.to_pylist()[0]["ask_volume"] is None and tick.schema.field("bid_volume").type == pa.float64()
    stats = writer.stats
    assert stats.records_written == 3 * n and stats.overflow == 0 and stats.open_writers == 0
    assert stats.durable_seq == writer.last_seq


def test_rotation_by_size_numbers_segments_in_order(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    writer = RecordWriter(layout, config(segment_max_mb=0.01, batch_size=50), max_queued_bytes=64 * 2**20)
    writer.start()
    for i in range(5000):
        writer.put_record(channel="trades", exchange="coinbase", symbol="BTC/USD", recv_ns=recv(i), record=trade(i))
    assert writer.close(30)
    files = ready_files(layout)
    assert writer.stats.rotations >= 3 and len(files) == writer.stats.segments_finalised
    names = [parse_segment_name(f.name) for f in files]
    assert [n.counter for n in names if n] == list(range(1, len(files) + 1))
    assert {n.hour for n in names if n} == {"20260809T21"}
    assert sorted(map(int, read_all(files, "trades", "trade_id"))) == list(range(5000))


def test_rotation_by_hour_finalises_the_earlier_hour(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    writer = RecordWriter(layout, config(), clock=lambda: 0)  # only the data's own clock moves hours
    writer.start()
    for i in range(100):
        writer.put_record(channel="trades", exchange="coinbase", symbol="BTC/USD", recv_ns=HOUR0 + HOUR_NS - 50 + i,
                          record=trade(i))  # fmt: skip
    wait_for(lambda: writer.stats.rotations >= 1 and len(ready_files(layout)) == 1)
    first = ready_files(layout)[0]
    assert "hour=21" in first.as_posix() and first.name.startswith("segment_20260809T21_00001")
    assert writer.close(30)
    files = ready_files(layout)
    assert [f.name for f in files] == ["segment_20260809T21_00001.parquet", "segment_20260809T22_00001.parquet"]
    assert "day=09/hour=22" in files[1].as_posix()
    assert sorted(map(int, read_all(files, "trades", "trade_id"))) == list(range(100))
    first_ids = set(map(int, pq.read_table(files[0]).column("trade_id").to_pylist()))
    assert first_ids == set(range(50))


def test_eviction_over_max_open_writers_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    peak = [0]
    writer = RecordWriter(layout, config(max_open_writers=2, batch_size=5))
    writer.on_flush = lambda _seq: peak.__setitem__(0, max(peak[0], writer.stats.open_writers))
    writer.start()
    n = 2000
    for i in range(n):
        writer.put_record(channel="trades", exchange="binance", symbol=f"P{i % 50}/USDT", recv_ns=recv(i),
                          record=trade(i))  # fmt: skip
    assert writer.close(60)
    assert writer.stats.evictions > 50 and peak[0] <= 2
    files = ready_files(layout)
    assert len({f.parent for f in files}) == 50
    ids = list(map(int, read_all(files, "trades", "trade_id")))
    assert len(ids) == len(set(ids)) == n


def test_malformed_records_are_quarantined_and_counted(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    writer = RecordWriter(layout, config())
    writer.start()
    put = writer.put_record
    assert put(channel="trades", exchange="e", symbol="A/B", recv_ns=recv(0), record=trade(0))
    put(channel="trades", exchange="e", symbol="A/B", recv_ns=recv(1), record=trade(1) | {"price": "abc"})
    put(channel="orderbook", exchange="e", symbol="A/B", recv_ns=recv(2), record=book(2) | {"bids": [[1.0]]})
    put(channel="ticker", exchange="e", symbol="A/B", recv_ns=recv(3), record=["not", "a", "dict"])  # type: ignore[arg-type]
    put(channel="candles", exchange="e", symbol="A/B", recv_ns=recv(4), record={})
    put(channel="trades", exchange="e", symbol="A/B", recv_ns="soon", record=trade(5))  # type: ignore[arg-type]
    put(channel="trades", exchange="e", symbol="A/B", recv_ns=recv(6), record=trade(6) | {"timestamp": True})
    assert put(channel="trades", exchange="e", symbol="A/B", recv_ns=recv(7), record=trade(7))
    assert writer.close(30)
    assert writer.stats.quarantined == 6 and writer.stats.records_written == 2
    lines = [orjson.loads(x) for x in (layout.quarantine("ccxt") / "rejected.ndjson").read_bytes().splitlines()]
    assert len(lines) == 6 and "expected a number" in lines[0]["reason"]
    assert sorted(map(int, read_all(ready_files(layout), "trades", "trade_id"))) == [0, 7]


def test_full_queue_drops_without_blocking_and_counts(tmp_path: Path) -> None:
    writer = RecordWriter(DataLayout(tmp_path), config(parquet_queue_maxsize=10))
    results = [writer.put_record(channel="trades", exchange="e", symbol="A/B", recv_ns=recv(i), record=trade(i))
               for i in range(15)]  # fmt: skip
    assert results == [True] * 10 + [False] * 5 and writer.stats.overflow == 5
    assert writer.close(10)  # never started: the close does the work
    assert len(read_all(ready_files(DataLayout(tmp_path)), "trades", "trade_id")) == 10


def _write_ipc(path: Path, batches: int) -> list[int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    from daedalus.capture.record_writer import SCHEMAS, record_row, rows_to_batch

    ends = []
    with open(path, "wb") as handle:
        writer = pa.ipc.new_stream(handle, SCHEMAS["trades"])
        for b in range(batches):
            rows = [record_row("trades", recv(i), trade(i)) for i in range(b * 10, b * 10 + 10)]
            writer.write_batch(rows_to_batch("trades", rows))
            handle.flush()
            ends.append(handle.tell())
    return ends


def test_recover_cuts_torn_tail_to_quarantine_and_is_idempotent(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    part = layout.raw_partition_dir("active", "ccxt", "trades", exchange="e", symbol="A/B", hour="20260809T21")
    torn = part / "segment_20260809T21_00001.arrow"
    ends = _write_ipc(torn, 3)
    with open(torn, "r+b") as handle:  # cut the last batch in half: a SIGKILL mid-write
        handle.truncate(ends[1] + (ends[2] - ends[1]) // 2)
    done = part / "segment_20260809T21_00002.arrow"  # crashed after the rename, before the delete
    _write_ipc(done, 2)
    ready_part = layout.raw_partition_dir("ready", "ccxt", "trades", exchange="e", symbol="A/B", hour="20260809T21")
    ready_part.mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), ready_part / "segment_20260809T21_00002.parquet")
    (ready_part / ".segment_20260809T21_00003.parquet.tmp").write_bytes(b"half")  # crashed mid-conversion
    report = recover(layout, "ccxt")
    assert (report.converted, report.already_done, report.torn_tails, report.temp_removed) == (1, 1, 1, 1)
    assert not list(layout.active("ccxt").rglob("*.arrow"))
    assert pq.read_table(ready_part / "segment_20260809T21_00001.parquet").num_rows == 20
    tails = list(layout.quarantine("ccxt").rglob("*.arrow"))
    assert [t.name for t in tails] == [f"segment_20260809T21_00001.tail-at-{ends[1]}.arrow"]
    assert recover(layout, "ccxt").converted == 0  # second run: nothing left to do
    # the counter of that partition continues after every name used in any state
    writer = RecordWriter(layout, config())
    writer.put_record(channel="trades", exchange="e", symbol="A/B", recv_ns=recv(0), record=trade(0))
    assert writer.close(10)
    assert (ready_part / "segment_20260809T21_00003.parquet").exists()


# --- SIGKILL: a child writes with fsync and is killed several times ----------------------


def child_main(data_dir: str, run: int) -> None:
    """Recover, then write trades until killed, printing ``flushed <seq>`` after each flush:
    every record with seq <= that number is durable (its trade id is ``<run>-<seq>``)."""
    layout = DataLayout(Path(data_dir))
    report = recover(layout, "ccxt")
    print(f"recovered {report.records}", flush=True)
    cfg = IngestionConfig(batch_size=50, flush_interval_seconds=0.05, fsync=True, max_open_writers=4,
                          segment_max_mb=0.01)  # fmt: skip
    writer = RecordWriter(layout, cfg, on_flush=lambda seq: print(f"flushed {seq}", flush=True))
    writer.start()
    seq = 0
    while True:
        for _ in range(100):
            seq += 1
            record = trade(seq, f"S{seq % 12}/USD") | {"id": f"{run}-{seq}"}
            while not writer.put_record(channel="trades", exchange="coinbase", symbol=f"S{seq % 12}/USD",
                                        recv_ns=time.time_ns(), record=record):  # fmt: skip
                time.sleep(0.001)
        time.sleep(0.002)


def test_sigkill_and_restart_keeps_every_flushed_record_once(tmp_path: Path) -> None:
    acknowledged: dict[int, int] = {}
    for run in range(4):
        child = subprocess.Popen(
            [sys.executable, "-c", f"from tests.test_record_writer import child_main; child_main({str(tmp_path)!r}, {run})"],  # noqa: E501
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        assert child.stdout is not None
        watermark, flushes = 0, 0
        for line in child.stdout:
            if line.startswith("flushed "):
                watermark, flushes = int(line.split()[1]), flushes + 1
                if watermark >= 1500 + 700 * run and flushes >= 5:
                    break
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL
        acknowledged[run] = watermark
    layout = DataLayout(tmp_path)
    recover(layout, "ccxt")
    files = ready_files(layout)
    ids = read_all(files, "trades", "trade_id")
    assert len(ids) == len(set(ids)), "duplicated records"
    for run, watermark in acknowledged.items():
        present = {int(i.split("-")[1]) for i in ids if i.startswith(f"{run}-")}
        missing = set(range(1, watermark + 1)) - present
        assert not missing, f"run {run}: {len(missing)} flushed records lost"
    assert not list(layout.active("ccxt").rglob("*.arrow"))


# --- bounded memory -----------------------------------------------------------------------


def test_memory_stays_bounded_over_hundreds_of_partitions(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    process = psutil.Process()
    cfg = config(max_open_writers=64, batch_size=100, flush_interval_seconds=0.5, parquet_queue_maxsize=20_000,
                 segment_max_mb=0.5)  # fmt: skip
    writer = RecordWriter(layout, cfg, clock=lambda: HOUR0)
    writer.start()
    partitions = 100  # x 3 exchanges (one of them order books): 300 partitions

    def feed(start: int, count: int) -> int:
        volume = 0
        for i in range(start, start + count):
            channel = "orderbook" if i % 3 == 0 else "trades"
            record = book(i, 10) if channel == "orderbook" else trade(i)
            volume += len(orjson.dumps(record))
            while not writer.put_record(channel=channel, exchange=f"ex{i % 3}", symbol=f"S{i % partitions}/USD",
                                        recv_ns=recv(i), record=record):  # fmt: skip
                time.sleep(0.001)  # back-pressure in the test's producer, not an assertion
        return volume

    chunk, chunks = 20_000, 6  # 2 to fill every buffer and the queue, then 4 measured
    for start in range(0, 2 * chunk, chunk):  # warm-up: buffers of every partition full, queue full
        feed(start, chunk)
    baseline = process.memory_info().rss
    samples, volumes = [], []
    for n in range(2, chunks):
        volumes.append(feed(n * chunk, chunk))
        samples.append(process.memory_info().rss)
    assert writer.close(60)
    total = chunks * chunk
    assert writer.stats.records_written == total  # the producer retried what overflowed
    assert writer.stats.evictions > 0
    # Memory is bounded by the queue and batch_size rows per partition, not by the volume:
    # after the first sample RSS stays flat while 3 more chunks (~12 MB of JSON) go through.
    later = sum(volumes[1:])
    plateau_growth = max(samples) - samples[0]
    print(f"RSS +{(samples[0] - baseline) / 1e6:.1f} MB then +{plateau_growth / 1e6:.1f} MB over {later / 1e6:.1f} MB",
          writer.stats)
    assert plateau_growth < max(later // 10, 8 * 1024 * 1024)
    assert samples[0] - baseline < 200 * 1024 * 1024  # queue (20k dicts) + 300 buffers of 100 rows


def test_buffer_budget_holds_over_hundreds_of_order_book_partitions(tmp_path: Path) -> None:
    """300 partitions of 20-level books with batch_size 100 would buffer ~30 MB of rows; a
    256 KB budget must hold at every moment, compacting buffers to Arrow and flushing the largest
    early, with every record in Parquet once and its levels intact. Books come in bursts of 20 a
    symbol, so some buffers are worth compacting (>= 16 KB of rows)."""
    from daedalus.capture.record_writer import record_row, row_bytes

    layout = DataLayout(tmp_path)
    budget = 256 * 1024
    cfg = config(batch_size=100, flush_interval_seconds=30, max_open_writers=400)
    writer = RecordWriter(layout, cfg, clock=lambda: HOUR0, max_buffered_bytes=budget)
    partitions, n = 300, 12_000
    highest = 0  # sampled by this thread while the writer thread works: the bound holds at every moment
    writer.start()
    for i in range(n):
        burst = i // 20
        while not writer.put_record(channel="orderbook", exchange=f"ex{burst % 3}", symbol=f"B{burst % partitions}/USD",
                                    recv_ns=recv(i), record=book(i, 20)):  # fmt: skip
            time.sleep(0.001)  # back-pressure in the test's producer, not an assertion
        highest = max(highest, writer.stats.buffered_bytes)
    assert writer.close(60)
    stats = writer.stats
    assert stats.peak_buffered_bytes <= budget and highest <= budget
    assert stats.early_flushes > 100 and stats.compactions > 100 and stats.buffered_bytes == 0
    assert stats.records_written == n and stats.durable_seq == writer.last_seq
    files = ready_files(layout)
    assert len({f.parent for f in files}) == partitions
    assert sorted(read_all(files, "orderbook", "nonce")) == list(range(n))
    row = pq.read_table(files[0]).to_pylist()[0]
    assert row["asks"][19] == {"price": 120.0, "amount": 2.0} and row["bids"][0] == {"price": 100.0, "amount": 1.0}
    # the budget counts real memory: row_bytes is at least what building the rows allocates
    records = [book(i, 20) | {"symbol": f"B{i}/USD"} for i in range(2000)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    rows = [record_row("orderbook", recv(i), r) for i, r in enumerate(records)]
    allocated = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert sum(map(row_bytes, rows)) >= allocated


# --- stress: hundreds of partitions, few open files, small budgets --------------------------


def _open_ipc_fds(active: Path) -> int:
    """IPC segments this process holds open, read from /proc/self/fd (not from the writer)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            count += target.startswith(str(active)) and target.endswith(".arrow")
    return count


def _identities_read_back(files: list[Path], channel: str, key: str) -> list[tuple[Any, ...]]:
    """(channel, exchange, symbol, recv_ns, key) of every row of ``channel``, read with pyarrow,
    DuckDB and Polars; the three must agree. Exchange comes from the Hive path, the symbol from
    the row (``unified_symbol``), recv_ns from ``ts_recv``."""
    chosen = [f for f in files if f"/{channel}/" in f.as_posix()]

    def exchange_of(path: str) -> str:
        return next(part.split("=", 1)[1] for part in Path(path).parts if part.startswith("exchange="))

    by_arrow = []
    for f in chosen:
        table = pq.read_table(f, columns=["ts_recv", "unified_symbol", key])
        recvs = table.column("ts_recv").cast(pa.int64()).to_pylist()
        by_arrow += [(channel, exchange_of(str(f)), s, r, k) for s, r, k in
                     zip(table.column("unified_symbol").to_pylist(), recvs, table.column(key).to_pylist(), strict=True)]
    sql = (f"SELECT filename, unified_symbol, epoch_ns(ts_recv::TIMESTAMP_NS), {key} FROM "
           f"read_parquet({[str(f) for f in chosen]!r}, filename=true, hive_partitioning=false)")
    by_duck = [(channel, exchange_of(name), s, ns, k) for name, s, ns, k in duckdb.sql(sql).fetchall()]
    frames = [pl.read_parquet(f, hive_partitioning=False).select(
        pl.lit(exchange_of(str(f))).alias("exchange"), "unified_symbol", pl.col("ts_recv").dt.epoch("ns"), key)
        for f in chosen]
    by_polars = [(channel, *row) for row in pl.concat(frames).iter_rows()]
    assert sorted(by_arrow) == sorted(by_duck) == sorted(by_polars)
    return by_arrow


def test_stress_hundreds_of_partitions_few_open_writers_every_record_once(tmp_path: Path) -> None:
    """3 channels x 2 exchanges x 60 symbols over 2 hours of recv_ns (720 partitions) through 8
    open writers, 10 KB segments, 64 KiB budgets for the queue and for buffered rows: every record
    comes out exactly once, evictions and rotations happen, the process never holds more IPC
    segments open than max_open_writers, and both memory budgets hold."""
    import random

    from daedalus.capture.record_writer import queued_cost

    layout = DataLayout(tmp_path)
    budget, queue_budget, open_max = 64 * 1024, 64 * 1024, 8
    cfg = config(batch_size=10, flush_interval_seconds=30, max_open_writers=open_max, segment_max_mb=0.01,
                 parquet_queue_maxsize=2000)  # fmt: skip
    writer = RecordWriter(layout, cfg, clock=lambda: HOUR0, max_buffered_bytes=budget, max_queued_bytes=queue_budget)
    active, fd_peak = layout.active("ccxt"), [0]
    opened = writer._open_segment

    def open_and_count(partition: Any) -> Any:  # on the writer thread, right after each open
        segment = opened(partition)
        fd_peak[0] = max(fd_peak[0], _open_ipc_fds(active))
        return segment

    writer._open_segment = open_and_count  # type: ignore[method-assign]
    keys = [(c, e, f"S{k}/USD") for c in ("trades", "ticker", "orderbook") for e in ("ex0", "ex1") for k in range(60)]
    rng, n, expected, biggest, burst = random.Random(11), 4000, [], 0, 0
    writer.start()
    for i in range(n):
        if not burst:  # exchanges send in bursts: 1 to 12 records of one partition in a row
            (channel, exchange, symbol), burst = rng.choice(keys), rng.randint(1, 12)
        burst -= 1
        recv_ns = HOUR0 + i * (2 * HOUR_NS // n) // 1000 * 1000  # increasing, microseconds, over 2 hours
        if channel == "trades":
            record, key = trade(i, symbol), str(i)
        elif channel == "ticker":
            record, key = ticker(i) | {"symbol": symbol}, float(i)
        else:
            record, key = book(i, 20) | {"symbol": symbol}, i
        biggest = max(biggest, queued_cost(channel, record))
        while not writer.put_record(channel=channel, exchange=exchange, symbol=symbol, recv_ns=recv_ns,
                                    record=record):  # fmt: skip
            time.sleep(0.0005)  # back-pressure in the test's producer, not an assertion
        expected.append((channel, exchange, symbol_component(symbol), recv_ns, key))
    assert writer.close(60)
    stats = writer.stats
    files = ready_files(layout)
    got = []
    for channel, key in (("trades", "trade_id"), ("ticker", "last"), ("orderbook", "nonce")):
        got += [(c, e, symbol_component(s), r, k) for c, e, s, r, k in _identities_read_back(files, channel, key)]
    assert sorted(got) == sorted(expected) and len(set(got)) == n  # every record exactly once
    partitions = {(c, e, s, r // HOUR_NS) for c, e, s, r, _ in expected}
    assert len({f.parent for f in files}) == len(partitions) > 300
    assert stats.records_written == n and stats.quarantined == stats.records_lost == stats.write_errors == 0
    assert stats.evictions > 100 and stats.rotations > 10 and stats.segments_finalised == len(files)
    assert 0 < fd_peak[0] <= open_max and stats.open_writers == 0
    assert not list(active.rglob("*.arrow"))
    assert stats.peak_buffered_bytes <= budget and stats.buffered_bytes == 0
    assert stats.peak_queue_depth <= 2000 and stats.peak_queued_bytes <= queue_budget + biggest
    assert stats.overflow_bytes > 0 and stats.overflow == stats.overflow_bytes  # the byte budget bound, not the count
    assert writer.queue_depth == 0 and writer.queued_bytes == 0
    line = writer.status_line()
    assert line.startswith(f"[writer] written={n:,} (") and f"open=0/{open_max}" in line and "queue=0/2,000" in line
    assert writer.snapshot()["evictions"] == stats.evictions


def test_queue_byte_budget_refuses_without_blocking_and_takes_one_into_an_empty_queue(tmp_path: Path) -> None:
    from daedalus.capture.record_writer import queued_cost

    cost = queued_cost("orderbook", book(0, 20))
    writer = RecordWriter(DataLayout(tmp_path), config(), max_queued_bytes=3 * cost)
    put = writer.put_record
    results = [put(channel="orderbook", exchange="e", symbol="A/B", recv_ns=recv(i), record=book(i, 20))
               for i in range(5)]  # fmt: skip
    assert results == [True] * 3 + [False] * 2 and writer.queued_bytes == 3 * cost
    assert writer.stats.overflow == writer.stats.overflow_bytes == 2
    huge = RecordWriter(DataLayout(tmp_path / "huge"), config(), max_queued_bytes=100)
    assert huge.put_record(channel="orderbook", exchange="e", symbol="A/B", recv_ns=recv(0), record=book(0, 20))
    assert not huge.put_record(channel="trades", exchange="e", symbol="A/B", recv_ns=recv(1), record=trade(1))
    assert writer.close(10) and huge.close(10)
    assert writer.queued_bytes == 0 and writer.stats.records_written == 3 and huge.stats.records_written == 1


def test_levels_other_than_lists_of_floats_take_the_checked_path(tmp_path: Path) -> None:
    writer = RecordWriter(DataLayout(tmp_path), config())
    levels = {"bids": ((100, 1), [99.5, 2, "extra"]), "asks": [], "nonce": 1}  # tuples, ints, no levels
    writer.put_record(channel="orderbook", exchange="e", symbol="A/B", recv_ns=recv(0), record=book(0) | levels)
    writer.put_record(channel="orderbook", exchange="e", symbol="A/B", recv_ns=recv(1), record=book(1) | {"asks": None})
    writer.put_record(channel="orderbook", exchange="e", symbol="A/B", recv_ns=recv(2),
                      record=book(2) | {"bids": [[1.0, True]]})  # fmt: skip
    writer.put_record(channel="orderbook", exchange="e", symbol="A/B", recv_ns=recv(3),
                      record=book(3) | {"bids": [{0: 1.0, 1: 2.0}]})  # fmt: skip
    assert writer.close(10)
    assert writer.stats.quarantined == 2 and writer.stats.records_written == 2
    table = pq.read_table(ready_files(DataLayout(tmp_path))[0]).sort_by("nonce").to_pylist()
    assert table[0]["bids"] == [{"price": 100.0, "amount": 1.0}, {"price": 99.5, "amount": 2.0}]
    assert table[0]["asks"] == [] and table[1]["asks"] is None and len(table[1]["bids"]) == 5


def test_memory_freed_by_conversions_is_given_back_after_finalising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Allocators keep what a Parquet conversion frees (measured: ~5 MB at close over 350 segments,
    bench/RESULTS.md), so the writer hands it back after finalising, at most every
    RELEASE_INTERVAL_S, and always once at the end of close()."""
    from daedalus.capture import record_writer

    calls: list[float] = []
    monkeypatch.setattr(record_writer, "release_memory", lambda: calls.append(time.monotonic()))
    monkeypatch.setattr(record_writer, "RELEASE_INTERVAL_S", 3600.0)  # only the first and the forced one
    layout = DataLayout(tmp_path)
    writer = RecordWriter(layout, config(max_open_writers=4), clock=lambda: HOUR0)
    for i in range(40):
        assert writer.put_record(channel="trades", exchange="ex", symbol=f"S{i % 8}/USD", recv_ns=recv(i),
                                 record=trade(i))  # fmt: skip
    assert writer.close(30)
    assert writer.stats.segments_finalised >= 8
    assert len(calls) == 2 and writer.releases == 2  # one after the first conversion, one forced at close
    assert len(read_all(ready_files(layout), "trades", "trade_id")) == 40


def test_release_memory_runs_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    """malloc_trim is glibc's: elsewhere it is skipped, and the pool is still asked to release."""
    from daedalus.capture import record_writer

    monkeypatch.setattr(record_writer.platform, "libc_ver", lambda: ("", ""))
    assert record_writer._glibc_malloc_trim() is None
    monkeypatch.setattr(record_writer, "_MALLOC_TRIM", None)
    record_writer.release_memory()  # no error, no trim


def test_a_restart_in_the_same_hour_never_reuses_a_name_the_etl_deleted(tmp_path: Path) -> None:
    """The ETL deletes processed segments (after_processing: delete): the next run of the
    writer, in the same hour, must still pick names no earlier run used."""
    layout = DataLayout(tmp_path)
    used: list[str] = []
    for run in range(3):
        writer = RecordWriter(layout, config(segment_max_mb=0.01))
        for i in range(400):
            assert writer.put_record(channel="trades", exchange="coinbase", symbol="BTC/USD", recv_ns=recv(i),
                                     record=trade(1000 * run + i))  # fmt: skip
        writer.put_record(channel="ticker", exchange="coinbase", symbol="ETH/USD", recv_ns=recv(1), record=ticker(1))
        assert writer.close(30)
        names = [f.relative_to(layout.ready("ccxt")).as_posix() for f in ready_files(layout)]
        assert names and not set(names) & set(used), (run, sorted(set(names) & set(used)))
        used += names
        for f in ready_files(layout):  # processed and deleted
            f.unlink()
    counters = sorted(parse_segment_name(Path(n).name).counter for n in used if n.startswith("trades/"))
    assert len(counters) == len(set(counters)) and counters[0] == 1  # the first run starts at 1


def _etl_prunes_right_after_mkdir(monkeypatch: pytest.MonkeyPatch, layout: DataLayout, times: int = 1) -> list[Path]:
    """Wrap the ready/ folder creation so that, the first ``times`` calls, the ETL's prune of empty
    folders runs just after it: the leaf and its empty parents up to ready/<source> are removed
    before the temporary Parquet file is opened in it."""
    from daedalus.capture import record_writer

    real = record_writer._make_partition_dir
    pruned: list[Path] = []

    def make_then_prune(path: Path) -> None:
        real(path)
        if len(pruned) < times:
            pruned.append(path)
            folder = path
            while folder != layout.ready("ccxt") and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent

    monkeypatch.setattr(record_writer, "_make_partition_dir", make_then_prune)
    return pruned


def test_finalise_survives_the_etl_pruning_the_ready_folder_before_the_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ETL rmdirs an empty ready/<partition>/ between the writer's mkdir and its open of the
    temporary Parquet file: the writer creates the folder again once and the segment reaches ready/."""
    layout = DataLayout(tmp_path)
    pruned = _etl_prunes_right_after_mkdir(monkeypatch, layout)
    writer = RecordWriter(layout, config(), clock=lambda: HOUR0)
    for i in range(30):
        assert writer.put_record(channel="trades", exchange="ex", symbol="BTC/USD", recv_ns=recv(i), record=trade(i))
    assert writer.close(30)
    assert len(pruned) == 1 and pruned[0].is_dir()  # removed by the "ETL", made again by the retry
    assert writer.stats.write_errors == 0 and writer.stats.segments_finalised == 1
    assert sorted(read_all(ready_files(layout), "trades", "trade_id"), key=int) == [str(i) for i in range(30)]
    assert not list(layout.active("ccxt").rglob("*.arrow"))


def test_recover_survives_the_etl_pruning_the_ready_folder_before_the_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same race at start-up recovery; a folder that vanishes twice is an error, not a loop."""
    layout = DataLayout(tmp_path)
    writer = RecordWriter(layout, config(), clock=lambda: HOUR0)
    for i in range(30):
        assert writer.put_record(channel="trades", exchange="ex", symbol="BTC/USD", recv_ns=recv(i), record=trade(i))
    writer._drain()  # flushed to its IPC segment, never finalised: what a crash leaves
    writer._flush_due(float("inf"))
    ipc = list(layout.active("ccxt").rglob("*.arrow"))
    assert len(ipc) == 1
    writer._close_segment(next(iter(writer._open.values())))
    _etl_prunes_right_after_mkdir(monkeypatch, layout, times=2)
    with pytest.raises(FileNotFoundError):  # pruned after the first mkdir and after the retry's
        recover(layout, "ccxt", fsync=False)
    assert ipc[0].exists() and not ready_files(layout)
    monkeypatch.undo()
    _etl_prunes_right_after_mkdir(monkeypatch, layout, times=1)
    report = recover(layout, "ccxt", fsync=False)
    assert report.converted == 1 and report.records == 30
    assert sorted(read_all(ready_files(layout), "trades", "trade_id"), key=int) == [str(i) for i in range(30)]
    assert not ipc[0].exists()


def test_a_partition_forgotten_while_idle_never_reuses_a_name_the_etl_deleted(tmp_path: Path) -> None:
    """Within one run: a quiet partition's segment is finalised (evicted), the ETL processes and
    deletes it, the writer forgets the idle partition; when the market speaks again, its next
    segment must not take the deleted one's name (the ETL would refuse it as already committed)."""
    layout = DataLayout(tmp_path)
    writer = RecordWriter(layout, config(batch_size=1, max_open_writers=1, flush_interval_seconds=0.02))
    writer.start()
    now = time.time_ns()
    writer.put_record(channel="trades", exchange="coinbase", symbol="BTC/USD", recv_ns=now, record=trade(1))
    writer.put_record(channel="trades", exchange="coinbase", symbol="ETH/USD", recv_ns=now, record=trade(2, "ETH/USD"))
    wait_for(lambda: writer.stats.evictions >= 1 and len(ready_files(layout)) == 1)
    first = ready_files(layout)[0]
    first.unlink()  # processed and deleted by the ETL
    wait_for(lambda: writer.stats.stale_cleanups >= 1)  # the idle BTC/USD partition is forgotten
    writer.put_record(channel="trades", exchange="coinbase", symbol="BTC/USD", recv_ns=time.time_ns(), record=trade(3))
    assert writer.close(30)
    again = [f for f in ready_files(layout) if f.parent == first.parent]
    assert len(again) == 1 and again[0].name != first.name, (first.name, [f.name for f in again])


def test_the_clock_closes_a_quiet_partition_at_the_hour_and_compression_follows_the_config(tmp_path: Path) -> None:
    """No record comes after 21:59 for this symbol: the clock passing 22:00 alone must close its
    segment (an idle market's data would otherwise wait in active/ for ever). The Parquet files
    carry ``parquet_compression`` and its level."""
    layout = DataLayout(tmp_path)
    now = [HOUR0 + HOUR_NS - 1_000_000_000]
    writer = RecordWriter(layout, config(parquet_compression="gzip", parquet_compression_level=9),
                          clock=lambda: now[0])  # fmt: skip
    writer.start()
    for i in range(5):
        writer.put_record(channel="trades", exchange="coinbase", symbol="BTC/USD", recv_ns=now[0] + i, record=trade(i))
    wait_for(lambda: writer.stats.records_written == 5)
    assert not ready_files(layout) and writer.stats.open_writers == 1  # still the hour: the segment stays open
    now[0] = HOUR0 + HOUR_NS + 1  # 22:00:00, and still no record
    wait_for(lambda: len(ready_files(layout)) == 1)
    assert writer.stats.open_writers == 0 and writer.stats.rotations == 1
    assert writer.close(30)
    (file,) = ready_files(layout)
    column = pq.ParquetFile(file).metadata.row_group(0).column(0)
    assert column.compression == "GZIP" and pq.read_table(file).num_rows == 5
