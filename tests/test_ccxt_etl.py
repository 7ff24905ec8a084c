"""The ccxt raw formats and ETL parser (daedalus.sources.ccxt_raw, daedalus.sources.ccxt_etl) on
real files: Parquet raw segments from the real RecordWriter, ndjson ones through NdjsonRecordSink
and a real SegmentWriter, processed tables committed and read back with DuckDB and Polars."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from daedalus.capture.record_writer import RecordWriter
from daedalus.capture.records import control_line, frame_line, iter_lines
from daedalus.capture.segments import SegmentWriter
from daedalus.config import DaedalusConfig, IngestionConfig, parse_config
from daedalus.etl.errors import SegmentDataError
from daedalus.etl.output import commit
from daedalus.etl.state import EtlState
from daedalus.layout import DataLayout
from daedalus.sources.ccxt_etl import CcxtSegmentRun, output_stem
from daedalus.sources.ccxt_raw import NdjsonRecordSink, RawSegmentReader

HOUR0 = 1_786_309_200 * 1_000_000_000  # 2026-08-09T21:00Z
T0_MS = HOUR0 // 1_000_000
DEPTH = 3
SYMBOLS = ("BTC/USD", "ETH/USD")


# --- records ------------------------------------------------------------------------------


def recv(i: int) -> int:
    return HOUR0 + i * 1_000_000  # one millisecond apart, inside the hour


def trade(i: int, symbol: str = "BTC/USD") -> dict[str, Any]:
    return {"id": str(1000 + i), "symbol": symbol, "timestamp": None if i == 3 else T0_MS + i,
            "price": round(100 + i * 0.01, 2), "amount": round(0.001 * (i + 1), 3), "cost": 1.0,
            "side": "buy" if i % 2 else "sell", "takerOrMaker": "taker", "order": f"o{i}" if i == 1 else None,
            "type": None, "info": {"bulky": "x" * 200}}  # fmt: skip


def ticker(i: int, symbol: str = "BTC/USD") -> dict[str, Any]:
    return {"symbol": symbol, "timestamp": T0_MS + i, "bid": 100.0 + i, "bidVolume": 1.5, "ask": 100.5 + i,
            "askVolume": None, "last": 100.25 + i, "open": 99.0, "high": 101.0, "low": 98, "close": 100.25 + i,
            "vwap": 100.125, "baseVolume": 1234.5, "quoteVolume": 123456.75, "change": 1.25, "percentage": 1.26,
            "average": 99.6, "info": {"x": 1}}  # fmt: skip


BOOKS = [  # deeper than DEPTH / shallower ask side; empty bid side; crossed
    ([[100.0, 1.0], [99.5, 2.0], [99.0, 3.0], [98.0, 4.0]], [[100.5, 1.5], [101.0, 2.5]]),
    ([], [[101.0, 1.0]]),
    ([[102.0, 1.0]], [[101.0, 0.25]]),
    ([[100.12345678, 0.5]], [[100.12345679, 0.75]]),
]


def book(i: int, symbol: str = "BTC/USD") -> dict[str, Any]:
    bids, asks = BOOKS[i % len(BOOKS)]
    return {"symbol": symbol, "timestamp": None if i == 2 else T0_MS + i, "nonce": 500 + i, "bids": bids,
            "asks": asks}  # fmt: skip


def all_records(trade_ids: range = range(6)) -> list[tuple[str, str, str, int, dict[str, Any]]]:
    """(channel, exchange, symbol, recv_ns, record), interleaved as a collector hands them over."""
    out = []
    for s, symbol in enumerate(SYMBOLS):
        for i in trade_ids:
            out.append(("trades", "coinbase", symbol, recv(10 * i + s), trade(i, symbol)))
        for i in range(3):
            out.append(("ticker", "coinbase", symbol, recv(100 + 10 * i + s), ticker(i, symbol)))
        for i in range(len(BOOKS)):
            out.append(("orderbook", "coinbase", symbol, recv(200 + 10 * i + s), book(i, symbol)))
    return sorted(out, key=lambda r: r[3])


# --- writing raw segments -------------------------------------------------------------------


def write_parquet(data_dir: Path, records: list) -> list[tuple[Path, str]]:
    """Raw Parquet segments by the real RecordWriter; (path, key below raw/ready/ccxt)."""
    layout = DataLayout(data_dir)
    writer = RecordWriter(layout, IngestionConfig(batch_size=4, fsync=False))
    for channel, exchange, symbol, recv_ns, record in records:
        assert writer.put_record(channel=channel, exchange=exchange, symbol=symbol, recv_ns=recv_ns, record=record)
    assert writer.close(30)
    ready = layout.ready("ccxt")
    return [(p, p.relative_to(ready).as_posix()) for p in sorted(ready.rglob("*.parquet"))]


def write_ndjson(data_dir: Path, records: list, compression: str = "none") -> tuple[list[tuple[Path, str]], Any]:
    """One ndjson segment through NdjsonRecordSink and a real SegmentWriter."""
    layout = DataLayout(data_dir)
    writer = SegmentWriter(layout, "ccxt", IngestionConfig(raw_compression=compression, batch_size=5,
                                                           flush_interval_seconds=0.05, fsync=False),
                           clock=lambda: HOUR0)  # fmt: skip
    writer.start()
    sink = NdjsonRecordSink(writer)
    writer.put_control(HOUR0, 1, "connect", exchange="coinbase")
    for channel, exchange, symbol, recv_ns, record in records:
        assert sink.put_record(channel=channel, exchange=exchange, symbol=symbol, recv_ns=recv_ns, record=record)
    assert writer.close()
    files = sorted(p for p in layout.ready("ccxt").iterdir() if p.name.startswith("segment_"))
    return [(p, p.name) for p in files], sink


# --- running the parser ------------------------------------------------------------------------


@dataclass
class Job:
    """What CcxtSegmentRun needs of the ETL job (the job itself is being rewritten)."""

    config: DaedalusConfig
    out_root: Path
    source: str = "ccxt"
    beats: list[int] = field(default_factory=list)
    on_beat: Callable[[], None] | None = None

    def beat(self) -> None:
        self.beats.append(1)
        if self.on_beat is not None:
            self.on_beat()


def make_job(data_dir: Path, strategy: str = "float") -> Job:
    etl = {"decimal_strategy": strategy, "channels": {"book_snapshot": {"levels": DEPTH}}}
    config = parse_config({"data_dir": str(data_dir), "etl": etl})
    return Job(config, config.processed_dir / "ccxt")


def fresh_state() -> EtlState:
    return EtlState.fresh(1_000_000_000, DEPTH, 60_000_000_000)


def run_all(job: Job, segments: list[tuple[Path, str]], state: EtlState | None = None) -> list[CcxtSegmentRun]:
    state = state or fresh_state()
    runs = []
    for path, key in segments:
        run = CcxtSegmentRun(job, key, state).run(path, 1 << 24)
        assert run.state is state
        commit(run.files)
        runs.append(run)
    return runs


def read_channel(job: Job, channel: str, order: str = "ts_recv") -> list[dict[str, Any]]:
    """Every row of a processed channel with its partition values, read by DuckDB; Polars must
    read the same rows."""
    pattern = str(job.out_root / channel / "**" / "*.parquet")
    rows = duckdb.sql(f"SELECT * EXCLUDE (ts_event, ts_recv), epoch_ns(ts_event) AS ts_event_ns, "
                      f"epoch_ns(ts_recv) AS ts_recv_ns, CAST(date AS VARCHAR) AS date "
                      f"FROM read_parquet('{pattern}', hive_partitioning=true) "
                      f"ORDER BY {order}_ns, symbol")  # fmt: skip
    result = [dict(zip(rows.columns, row, strict=True)) for row in rows.fetchall()]
    frame = pl.read_parquet(pattern, hive_partitioning=True).sort([order, "symbol"])
    assert frame.height == len(result)
    assert frame["symbol"].cast(pl.String).to_list() == [r["symbol"] for r in result]
    assert frame[order].dt.epoch("ns").to_list() == [r[f"{order}_ns"] for r in result]
    return result


# --- expected values, computed here -----------------------------------------------------------


def expected_trades(records: list) -> list[dict[str, Any]]:
    out = []
    for channel, _, symbol, recv_ns, record in records:
        if channel == "trades":
            ts = recv_ns if record["timestamp"] is None else record["timestamp"] * 1_000_000
            out.append({"symbol_unified": symbol, "trade_id": record["id"], "price": record["price"],
                        "size": record["amount"], "side": record["side"], "ts_event_ns": ts, "ts_recv_ns": recv_ns,
                        "order_id": record["order"]})  # fmt: skip
    return out


def expected_book(bids: list, asks: list) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for side, levels in (("bid", bids), ("ask", asks)):
        for k in range(DEPTH):
            row[f"{side}_px_{k:02d}"] = levels[k][0] if k < len(levels) else None
            row[f"{side}_sz_{k:02d}"] = levels[k][1] if k < len(levels) else None
    bb, ba = (bids[0][0] if bids else None), (asks[0][0] if asks else None)
    both = bb is not None and ba is not None
    row["best_bid"], row["best_ask"] = bb, ba
    row["mid_price"] = (bb + ba) / 2 if both else None
    row["spread"] = ba - bb if both else None
    row["book_valid"] = both and bb < ba
    return row


def approx_row(row: dict[str, Any], expected: dict[str, Any]) -> None:
    for key, value in expected.items():
        if isinstance(value, float):
            assert row[key] == pytest.approx(value, abs=1e-8), key
        else:
            assert row[key] == value, key


# --- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["parquet", "ndjson", "ndjson-zstd"])
def test_both_raw_formats_give_the_tables_of_the_records(tmp_path: Path, raw: str) -> None:
    records = all_records()
    if raw == "parquet":
        segments = write_parquet(tmp_path, records)
        assert len(segments) == 6  # 3 channels x 2 symbols, one hour
    else:
        segments, sink = write_ndjson(tmp_path, records, "zstd" if raw == "ndjson-zstd" else "none")
        assert [key for _, key in segments] == [f"segment_20260809T21_00001.ndjson{'.zst' * (raw != 'ndjson')}"]
        assert sink.conns == {"coinbase": 1} and sink.unserialisable == 0
        assert b"bulky" not in b"".join(iter_lines(segments[0][0]))  # ccxt's raw info is dropped
    job = make_job(tmp_path)
    runs = run_all(job, segments)
    rows = sum((run.rows for run in runs), start=type(runs[0].rows)())
    counts = sum((run.counts for run in runs), start=type(runs[0].counts)())
    assert rows == {"trades": 12, "ticker": 6, "orderbook": 8}
    assert counts["records_trades"] == 12 and counts["records_orderbook"] == 8 and counts["duplicate_trades"] == 0
    assert counts["ts_event_fallbacks"] == 4  # trade 3 and book 2 of each symbol
    assert not any(run.quarantine_lines(path) for run, (path, _) in zip(runs, segments, strict=True))
    assert job.beats

    stem = "segment_20260809T21_00001" + ("" if raw == "parquet" else "-ndjson")
    for channel in ("trades", "ticker", "orderbook"):
        for symbol in ("BTC-USD", "ETH-USD"):
            path = job.out_root / channel / "exchange=coinbase" / f"symbol={symbol}" / "date=2026-08-09"
            assert (path / f"part-{stem}.parquet").exists()
    assert not list(job.out_root.rglob("*.tmp"))

    trades = read_channel(job, "trades")
    assert len(trades) == 12
    for row, want in zip(trades, expected_trades(records), strict=True):
        approx_row(row, want)
        assert row["exchange"] == "coinbase" and row["date"] == "2026-08-09"
        assert row["taker_or_maker"] == "taker" and row["type"] is None

    books = read_channel(job, "orderbook")
    assert len(books) == 8
    want_books = [(s, i) for i in range(len(BOOKS)) for s in SYMBOLS]
    for row, (symbol, i) in zip(books, want_books, strict=True):
        assert row["symbol_unified"] == symbol and row["nonce"] == 500 + i
        approx_row(row, expected_book(*BOOKS[i]))
        assert row["ts_event_ns"] == (row["ts_recv_ns"] if i == 2 else (T0_MS + i) * 1_000_000)

    tickers = read_channel(job, "ticker")
    assert len(tickers) == 6
    for row, (symbol, i) in zip(tickers, [(s, i) for i in range(3) for s in SYMBOLS], strict=True):
        want = ticker(i, symbol)
        approx_row(row, {"symbol_unified": symbol, "price": want["last"], "best_bid": want["bid"],
                         "best_bid_size": 1.5, "best_ask": want["ask"], "best_ask_size": None, "open": 99.0,
                         "high": 101.0, "low": 98.0, "close": want["close"], "vwap": 100.125, "volume_24h": 1234.5,
                         "quote_volume_24h": 123456.75, "change": 1.25, "percentage": 1.26})  # fmt: skip

    table = pq.read_table(job.out_root / "trades" / "exchange=coinbase" / "symbol=BTC-USD" / "date=2026-08-09"
                          / f"part-{stem}.parquet")  # fmt: skip
    meta = table.schema.metadata
    assert meta[b"daedalus.source"] == b"ccxt" and meta[b"daedalus.decimal_strategy"] == b"float"
    key = next(k for _, k in segments if k.startswith("trades/exchange=coinbase/symbol=BTC-USD/") or "ndjson" in k)
    assert meta[b"daedalus.segment"] == key.encode()
    assert table.schema.field("ts_event").type == pa.timestamp("ns", tz="UTC")
    assert table.column_names == ["ts_event", "ts_recv", "symbol_unified", "trade_id", "price", "size", "side",
                                  "taker_or_maker", "order_id", "type"]  # fmt: skip


def test_trades_repeated_in_a_later_segment_are_dropped(tmp_path: Path) -> None:
    """Two segments of one format sharing trades (a re-subscribe replays recent ones), and a
    trade repeated inside one segment: each (exchange, symbol, id) is written once."""
    first = [("trades", "coinbase", "BTC/USD", recv(i), trade(i)) for i in range(5)]
    first.append(("trades", "coinbase", "BTC/USD", recv(6), trade(4)))  # repeated inside the segment
    first.append(("trades", "kraken", "BTC/USD", recv(7), trade(2)))  # same id, other exchange: kept
    second = [("trades", "coinbase", "BTC/USD", recv(3600_000 - 10 + i), trade(i)) for i in range(3, 8)]
    write_ndjson(tmp_path, first)
    segments, _ = write_ndjson(tmp_path, second)  # the writer takes the next name: _00002
    assert [key for _, key in segments] == [f"segment_20260809T21_0000{i}.ndjson" for i in (1, 2)]
    job = make_job(tmp_path)
    state = fresh_state()
    run_1, run_2 = run_all(job, segments, state)
    assert run_1.counts["duplicate_trades"] == 1 and run_2.counts["duplicate_trades"] == 2
    trades = read_channel(job, "trades")
    assert [(r["exchange"], r["trade_id"]) for r in trades] == [("coinbase", str(1000 + i)) for i in range(5)] + [
        ("kraken", "1002"), ("coinbase", "1005"), ("coinbase", "1006"), ("coinbase", "1007")]  # fmt: skip
    assert state.trades.duplicates == 0


def test_decimal_strategies(tmp_path: Path) -> None:
    records = all_records(range(3))
    segments = write_parquet(tmp_path / "raw", records)
    tables = {}
    for strategy in ("float", "pips", "decimal"):
        job = make_job(tmp_path / strategy, strategy)
        run_all(job, segments)
        tables[strategy] = {channel: read_channel(job, channel) for channel in ("trades", "orderbook", "ticker")}
        table = pq.read_table(next((job.out_root / "orderbook").rglob("*.parquet")))
        scale = b"" if strategy == "float" else b"100000000"
        assert table.schema.metadata[b"daedalus.decimal_scale"] == scale
        kind = {"float": pa.float64(), "pips": pa.int64(), "decimal": pa.decimal128(38, 8)}[strategy]
        assert table.schema.field("bid_px_00").type == kind and table.schema.field("mid_price").type == kind
    for channel, floats in tables["float"].items():
        for name in ("price", "size", "bid_px_00", "ask_sz_01", "spread", "best_bid", "volume_24h"):
            if name not in floats[0]:
                continue
            values = [r[name] for r in floats]
            pips = [r[name] for r in tables["pips"][channel]]
            decimals = [r[name] for r in tables["decimal"][channel]]
            assert pips == [None if v is None else round(v * 100_000_000) for v in values], (channel, name)
            assert decimals == [None if p is None else Decimal(p) / 100_000_000 for p in pips], (channel, name)
    book = next(r for r in tables["pips"]["orderbook"] if r["nonce"] == 503)
    assert book["best_bid"] == 10_012_345_678 and book["best_ask"] == 10_012_345_679
    assert book["mid_price"] == 10_012_345_678 and book["spread"] == 1  # half a pip rounded down
    assert tables["decimal"]["orderbook"][6]["mid_price"] == Decimal("100.12345678")


def test_bad_ndjson_lines_are_rejected_with_reasons_and_their_original_bytes(tmp_path: Path) -> None:
    def line(message: Any, i: int) -> bytes:
        return frame_line(recv(i), 1, orjson.dumps(message).decode())

    good = {"channel": "trades", "exchange": "coinbase", "symbol": "BTC/USD", "record": trade(0)}
    bad_price = {**good, "record": {**trade(1), "price": "abc"}}
    lines = [
        control_line(recv(0), 1, "connect", {"exchange": "coinbase"}),  # 0: skipped, counted
        line(good, 1),  # 1
        b'{"recv_ns":1,"conn":1,"msg":{"channel":',  # 2: not JSON (a torn line)
        line({**good, "channel": "candles"}, 3),  # 3
        line(bad_price, 4),  # 4
        frame_line(recv(5), 1, "not json {"),  # 5: stored under "raw"
        b"[1, 2]",  # 6
        b'{"conn":1,"msg":{}}',  # 7: no recv_ns
        line({**good, "symbol": ""}, 8),  # 8
        line({"channel": "ticker", "exchange": "coinbase", "symbol": "BTC/USD", "record": ticker(0)}, 9),  # 9
    ]
    path = tmp_path / "segment_20260809T21_00001.ndjson"
    path.write_bytes(b"".join(x if x.endswith(b"\n") else x + b"\n" for x in lines))
    job = make_job(tmp_path)
    run = CcxtSegmentRun(job, path.name, fresh_state()).run(path, 1 << 24)
    commit(run.files)
    assert run.rows == {"trades": 1, "ticker": 1}
    reasons = dict(run.rejected)
    assert sorted(reasons) == [2, 3, 4, 5, 6, 7, 8]
    assert reasons[2].startswith("bad_json: ") and reasons[3].startswith("unknown_channel: channel 'candles'")
    assert reasons[4] == "bad_record: trades: expected a number, got str"
    assert "raw (non-JSON) frame" in reasons[5] and reasons[6].startswith("bad_line: a JSON list")
    assert "recv_ns None" in reasons[7] and "symbol ''" in reasons[8]
    assert run.counts["control_lines"] == 1 and run.counts["quarantined_bad_line"] == 4
    assert run.counts["quarantined_bad_json"] == run.counts["quarantined_unknown_channel"] == 1
    assert run.counts["quarantined_bad_record"] == 1
    quarantined = run.quarantine_lines(path)
    assert [q[1] for q in quarantined] == [lines[i].rstrip(b"\n") for i in (2, 3, 4, 5, 6, 7, 8)]
    assert [q[0] for q in quarantined] == [reasons[i] for i in (2, 3, 4, 5, 6, 7, 8)]
    assert [r["trade_id"] for r in read_channel(job, "trades")] == ["1000"]


def test_corrupt_or_misplaced_parquet_raises_segment_data_error(tmp_path: Path) -> None:
    segments = write_parquet(tmp_path, all_records(range(2)))
    path, key = next((p, k) for p, k in segments if k.startswith("trades/"))
    job = make_job(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # no footer: an unfinished or cut file
    with pytest.raises(SegmentDataError, match="cannot be opened as Parquet"):
        CcxtSegmentRun(job, key, fresh_state()).run(path, 1 << 24)
    path.write_bytes(b"not parquet at all")
    with pytest.raises(SegmentDataError, match="cannot be opened as Parquet"):
        CcxtSegmentRun(job, key, fresh_state()).run(path, 1 << 24)
    other, _ = next((p, k) for p, k in segments if k.startswith("ticker/"))
    with pytest.raises(SegmentDataError, match="must start with a channel"):
        CcxtSegmentRun(job, other.name, fresh_state()).run(other, 1 << 24)
    with pytest.raises(SegmentDataError, match="is not the trades raw schema"):  # a ticker file under trades/
        CcxtSegmentRun(job, key, fresh_state()).run(other, 1 << 24)
    assert not list(job.out_root.rglob("*.tmp")) if job.out_root.exists() else True


def test_an_error_mid_run_leaves_no_temporary_output(tmp_path: Path) -> None:
    records = all_records()
    records.append(("trades", "kraken", "ETH/USD", recv(999), trade(9, "ETH/USD")))
    segments, sink = write_ndjson(tmp_path, records)
    assert sink.conns == {"coinbase": 1, "kraken": 2}
    job = make_job(tmp_path)

    def fail_on_third_beat() -> None:
        if len(job.beats) == 3:
            raise OSError("disk went away")

    job.on_beat = fail_on_third_beat
    with pytest.raises(OSError, match="disk went away"):
        run_all(job, segments)
    assert list(job.out_root.rglob("*.parquet*")) == []
    job.on_beat = None
    run = run_all(job, segments)[0]  # the rerun from a fresh state writes everything
    assert run.rows == {"trades": 13, "ticker": 6, "orderbook": 8}
    kraken = read_channel(job, "trades")[-1]
    assert (kraken["exchange"], kraken["symbol"], kraken["trade_id"]) == ("kraken", "ETH-USD", "1009")


def test_sink_serialises_what_ccxt_hands_over(tmp_path: Path) -> None:
    """Numbers orjson does not know become text or JSON numbers instead of crashing the event
    loop; a record that cannot be written at all is counted and dropped."""
    records = [
        (
            "trades",
            "coinbase",
            "BTC/USD",
            recv(0),
            {**trade(0), "price": np.float64(101.5), "amount": np.int64(2), "fee": {"cost": Decimal("0.1")}},
        ),
        ("trades", "coinbase", "BTC/USD", recv(1), {**trade(1), "cost": 2**70}),
        ("ticker", "coinbase", "BTC/USD", recv(2), ticker(0)),
    ]
    segments, sink = write_ndjson(tmp_path, records)
    assert sink.unserialisable == 1
    reader = RawSegmentReader(*segments[0])
    groups = list(reader)
    assert not reader.rejected and reader.counts["control_lines"] == 1
    trades = next(g for g in groups if g.channel == "trades")
    assert trades.batch.column("price").to_pylist() == [101.5] and trades.batch.column("amount").to_pylist() == [2.0]
    assert trades.lines.tolist() == [1]
    assert output_stem(segments[0][1]) == "segment_20260809T21_00001-ndjson"
    assert output_stem("trades/exchange=x/symbol=A-B/year=2026/month=08/day=09/hour=21/segment_20260809T21_00002"
                       ".parquet") == "segment_20260809T21_00002"  # fmt: skip


def test_ndjson_rows_keep_order_and_line_numbers_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are handed on every CHUNK_ROWS (all groups together): order, line indices and
    rejects stay right across chunk boundaries."""
    monkeypatch.setattr("daedalus.sources.ccxt_raw.CHUNK_ROWS", 7)
    records = [("trades", "coinbase", SYMBOLS[i % 2], recv(i), trade(i, SYMBOLS[i % 2])) for i in range(40)]
    records[17] = ("trades", "coinbase", "BTC/USD", recv(17), {**trade(17), "amount": "x"})  # rejected
    segments, _ = write_ndjson(tmp_path, records)
    reader = RawSegmentReader(*segments[0])
    groups = list(reader)
    assert len(groups) > 6 and all(g.batch.num_rows <= 7 for g in groups)
    assert reader.rejected == [(18, "bad_record: trades: expected a number, got str")]  # line 0: connect
    lines = np.concatenate([g.lines for g in groups])
    ids = [i for g in groups for i in g.batch.column("trade_id").to_pylist()]
    assert sorted(zip(lines.tolist(), ids, strict=True)) == [(i + 1, str(1000 + i)) for i in range(40) if i != 17]
    for symbol in SYMBOLS:  # within a symbol, line order
        mine = np.concatenate([g.lines for g in groups if g.symbol == symbol])
        assert (np.diff(mine) > 0).all()


def test_parquet_symbol_column_and_numbers_beyond_int64_units(tmp_path: Path) -> None:
    """The symbol is the ``unified_symbol`` column (the path's only where it is null); a number
    too large for units of 1e-8 stays a float in ``float`` and is a counted null otherwise."""
    huge = 2e12  # a 24 h quote volume in a small currency
    records = [("ticker", "coinbase", "BTC/USDT:USDT", recv(0), {**ticker(0), "symbol": None, "quoteVolume": huge}),
               ("ticker", "coinbase", "BTC/USDT:USDT", recv(1), {**ticker(1), "symbol": "BTC/USDT:USDT"})]  # fmt: skip
    segments = write_parquet(tmp_path, records)
    assert [k.split("/")[2] for _, k in segments] == ["symbol=BTC-USDT_USDT"]
    for strategy in ("float", "pips"):
        job = make_job(tmp_path / strategy, strategy)
        run = run_all(job, segments)[0]
        assert run.counts["symbol_from_path"] == 1
        rows = read_channel(job, "ticker")
        assert [(r["symbol"], r["symbol_unified"]) for r in rows] == [("BTC-USDT_USDT", "BTC/USDT:USDT")] * 2
        if strategy == "float":
            assert rows[0]["quote_volume_24h"] == huge and run.counts["numbers_out_of_range"] == 0
        else:
            assert rows[0]["quote_volume_24h"] is None and run.counts["numbers_out_of_range"] == 1
            assert rows[1]["quote_volume_24h"] == 12_345_675_000_000


def test_a_parquet_segment_of_another_version_is_conformed_not_quarantined(tmp_path: Path) -> None:
    """A column this version does not know is dropped, a missing one is null, a ``us``
    timestamp is cast: a raw segment written before an upgrade stays data."""
    segments = write_parquet(tmp_path, all_records(range(4)))
    path, key = next((p, k) for p, k in segments if k.startswith("trades/"))
    table = pq.read_table(path)
    older = table.drop_columns(["taker_or_maker"]).append_column("venue_fee", pa.array([0.1] * table.num_rows))
    older = older.set_column(0, "ts_recv", table.column("ts_recv").cast(pa.timestamp("us", tz="UTC")))
    pq.write_table(older, path)
    job = make_job(tmp_path)
    run = CcxtSegmentRun(job, key, fresh_state()).run(path, 1 << 24)
    commit(run.files)
    assert run.counts["older_schema_segments"] == 1
    rows = read_channel(job, "trades")
    assert [r["trade_id"] for r in rows] == [str(1000 + i) for i in range(4)]
    assert all(r["taker_or_maker"] is None for r in rows)
    assert [r["ts_recv_ns"] for r in rows] == [v // 1000 * 1000 for v in table.column("ts_recv").cast(pa.int64())
                                                .to_pylist()]  # fmt: skip
