"""Issue 8, items 8, 10, 11, 12: one bad line is quarantined alone (with its reason and a
counter), never poisons the books or the other rows (a lost level2 frame is a gap); numbers
are the feed's plain ASCII decimals; exchange times are range-checked and fall back frame
time -> receive time; only a frame's receive time is checked (a control line's is not data).

End to end: raw segments cut from the reference recording with hostile lines spliced in,
the real ETL, the Parquet read back, compared with a run over the same segment without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pytest

from daedalus.capture.records import control_line, frame_line
from daedalus.etl.coinbase import Rejects, _Batch, times_ns
from daedalus.etl.decode import parse_units
from tests.conftest import RECORDING
from tests.etl_helpers import channel_table, recording_lines, run_etl, write_segments

pytestmark = pytest.mark.skipif(not RECORDING.exists(), reason=f"reference recording missing: {RECORDING}")

HEAD = 160  # lines: the connect line, both level2 snapshots, trades, tickers, candles, updates
SPLICE = 120  # hostile lines go here, after both snapshots
TS = "2026-08-09T21:05:50.000000Z"
YEAR_NS = 365 * 86_400 * 10**9
CROSSING_BID = {"side": "bid", "price_level": "999999", "new_quantity": "1"}  # would cross every book


def line(frame: dict[str, Any], recv_ns: int) -> bytes:
    """A frame record without ``sequence_num``: splicing it in leaves the sequence intact."""
    return frame_line(recv_ns, 1, orjson.dumps(frame).decode())


def l2(updates: list[dict], product: str = "BTC-USD", ts: str = TS) -> dict[str, Any]:
    return {"channel": "l2_data", "timestamp": ts,
            "events": [{"type": "update", "product_id": product, "updates": updates}]}  # fmt: skip


def bad_update(**values: str) -> list[dict]:
    """A crossing bid plus one update holding the bad value: if the line were not rejected
    whole, the crossing bid would change best_bid."""
    return [CROSSING_BID, {"side": "bid", "price_level": "100.5", "new_quantity": "2", **values}]


def trade(**values: str) -> dict[str, Any]:
    item = {"product_id": "BTC-USD", "trade_id": "t-1", "price": "116000.01", "size": "0.5", "side": "BUY",
            "time": TS, **values}  # fmt: skip
    return {"channel": "market_trades", "timestamp": TS, "events": [{"type": "update", "trades": [item]}]}


def ticker(**values: str) -> dict[str, Any]:
    item = {"type": "ticker", "product_id": "BTC-USD", "price": "116000.01", "volume_24_h": "10",
            "low_24_h": "1", "high_24_h": "2", "price_percent_chg_24_h": "-1.5", "best_bid": "1",
            "best_bid_quantity": "1", "best_ask": "2", "best_ask_quantity": "1", **values}  # fmt: skip
    return {"channel": "ticker", "timestamp": TS, "events": [{"type": "update", "tickers": [item]}]}


def candle(**values: str) -> dict[str, Any]:
    item = {"start": "1786309500", "open": "1", "high": "2", "low": "0.5", "close": "1.5", "volume": "3",
            "product_id": "BTC-USD", **values}  # fmt: skip
    return {"channel": "candles", "timestamp": TS, "events": [{"type": "update", "candles": [item]}]}


# (frame, recv offset from its neighbour in ns, the reason's family, a piece of the reason)
HOSTILE: list[tuple[dict, int, str, str]] = [
    (l2([CROSSING_BID], product="X" * 10_000), 0, "bad_product", "(10,000 chars)"),
    (l2([CROSSING_BID], product=""), 0, "bad_product", "product_id ''"),
    (l2([CROSSING_BID], product="."), 0, "bad_product", "product_id '.'"),
    (l2([CROSSING_BID], product="BTC/USD"), 0, "bad_product", "'BTC/USD'"),
    (l2([CROSSING_BID], product="BTC USD"), 0, "bad_product", "'BTC USD'"),
    (trade(product_id="../x"), 0, "bad_product", "'../x'"),
    (l2([CROSSING_BID]), 10 * YEAR_NS, "bad_time", "receive time out of range"),
    (l2([CROSSING_BID]), -20 * YEAR_NS, "bad_time", "receive time out of range"),
    (l2(bad_update(side="sell")), 0, "bad_side", "level2 side 'sell'"),
    (l2(bad_update(side="")), 0, "bad_side", "level2 side ''"),
    (l2(bad_update(side="BID")), 0, "bad_side", "level2 side 'BID'"),
    (l2(bad_update(new_quantity="-5")), 0, "bad_number", "new_quantity '-5'"),
    (l2(bad_update(price_level="-1e3")), 0, "bad_number", "price_level '-1e3'"),
    (l2(bad_update(price_level="-7.5")), 0, "bad_number", "price_level '-7.5'"),
    (l2(bad_update(price_level="\u0661\u0662\u0663")), 0, "bad_number", "price_level"),  # Arabic-Indic 123
    (l2(bad_update(price_level="\uff11\uff12\uff13")), 0, "bad_number", "price_level"),  # fullwidth 123
    (l2(bad_update(price_level="1_000")), 0, "bad_number", "'1_000'"),
    (l2(bad_update(price_level="1__0")), 0, "bad_number", "'1__0'"),
    (l2(bad_update(price_level=" 100")), 0, "bad_number", "' 100'"),
    (l2(bad_update(price_level="100\u00a0")), 0, "bad_number", "price_level"),
    (l2(bad_update(price_level="1e-8")), 0, "bad_number", "'1e-8'"),
    (l2(bad_update(price_level="0")), 0, "bad_number", "'0' is not a plain decimal > 0"),
    (l2(bad_update(new_quantity="0.000000001")), 0, "bad_number", "'0.000000001'"),  # finer than 1e-8
    (l2(bad_update(price_level="92233720368.54775808")), 0, "bad_number", "92233720368"),  # int64 units overflow
    (l2(bad_update(price_level="+5")), 0, "bad_number", "'+5'"),
    (l2(bad_update(price_level="NaN")), 0, "bad_number", "'NaN'"),
    (l2([CROSSING_BID, {"side": "bid", "new_quantity": "1"}]), 0, "bad_number", "price_level missing"),
    (trade(price="-116000"), 0, "bad_number", "market_trades price '-116000'"),
    (trade(size="\uff11"), 0, "bad_number", "market_trades size"),
    (ticker(best_bid="1_0"), 0, "bad_number", "ticker best_bid '1_0'"),
    (ticker(price_percent_chg_24_h="abc"), 0, "bad_number", "price_percent_chg_24_h 'abc'"),
    (candle(low="-1"), 0, "bad_number", "candles low '-1'"),
    (candle(start="4102444800"), 0, "bad_time", "candles start 4102444800 s is out of range"),  # 2100
]


def spliced(hostile: list[bytes]) -> list[bytes]:
    lines = recording_lines()[:HEAD]
    return lines[:SPLICE] + hostile + lines[SPLICE:]


def recv_at(index: int) -> int:
    return orjson.loads(recording_lines()[index])["recv_ns"]


def rejects(data_dir: Path) -> list[dict]:
    folder = data_dir / "raw" / "quarantine" / "coinbase"
    files = sorted(folder.glob("*.etl-rejects.ndjson"))
    return [orjson.loads(x) for path in files for x in path.read_bytes().splitlines()]


def test_each_bad_line_is_quarantined_alone_and_every_good_row_is_exact(tmp_path):
    recv = recv_at(SPLICE - 1)
    hostile = [line(frame, recv + offset) for frame, offset, _, _ in HOSTILE]
    # "ask" is an accepted alias of "offer": the same update, spelled both ways, in both runs
    far_ask = {"price_level": "987654.321", "new_quantity": "3"}
    bad, clean = tmp_path / "bad", tmp_path / "clean"
    write_segments(bad, [spliced([*hostile, line(l2([{"side": "ask", **far_ask}]), recv)])])
    write_segments(clean, [spliced([line(l2([{"side": "offer", **far_ask}]), recv)])])

    summary = run_etl(bad)
    reference = run_etl(clean)

    assert summary.segments == 1 and summary.quarantined_segments == 0
    assert summary.quarantined_lines == len(HOSTILE)
    found = rejects(bad)
    assert len(found) == len(HOSTILE)
    for entry, (_, _, _, reason) in zip(found, HOSTILE, strict=True):  # in line order
        assert reason in entry["reason"], (entry["reason"], reason)
    for family in {h[2] for h in HOSTILE}:
        assert summary.counts[f"quarantined_{family}"] == sum(h[2] == family for h in HOSTILE), family
    assert len(found[0]["line"]) > 10_000  # the whole line is kept, the reason is short
    assert len(found[0]["reason"]) < 100
    for channel in ("market_trades", "ticker", "candles"):
        assert channel_table(bad, channel) == channel_table(clean, channel), channel
    # every rejected level2 frame is lost book data: a gap on both books of its connection
    lost_l2 = sum(frame["channel"] == "l2_data" for frame, _, _, _ in HOSTILE)
    assert reference.counts["gaps"] == 0 and summary.counts["gaps"] == 2 * lost_l2
    for channel in ("level2", "book_snapshot_10"):  # the same rows, invalid from the first lost frame on
        got, want = channel_table(bad, channel), channel_table(clean, channel)
        assert got.drop_columns(["book_valid"]) == want.drop_columns(["book_valid"]), channel
        if channel == "book_snapshot_10":
            after = np.asarray(got.column("ts_recv")) > recv
        else:  # the recording's frames after the splice, and the spliced alias line (no sequence_num)
            seq = np.asarray(got.column("seq"))
            after = (seq > orjson.loads(recording_lines()[SPLICE - 1])["msg"]["sequence_num"]) | (seq < 0)
        valid, reference_valid = np.asarray(got.column("book_valid")), np.asarray(want.column("book_valid"))
        assert (valid[~after] == reference_valid[~after]).all() and reference_valid[after].any(), channel
        assert not valid[after].any(), channel
    products = duckdb.sql(
        f"SELECT DISTINCT product_id FROM read_parquet('{bad}/processed/coinbase/*/**/*.parquet', "
        "hive_partitioning=true, union_by_name=true) ORDER BY 1"
    ).fetchall()
    assert products == [("BTC-USD",), ("ETH-USD",)]
    level2 = channel_table(bad, "level2")
    assert max(level2.column("best_bid").to_pylist()) < 999_999  # the crossing bid never reached a book
    alias = level2.filter(pa.compute.equal(level2.column("price"), 987_654.321))
    assert alias.column("side").to_pylist() == ["ask"]


def test_a_rejected_level2_frame_is_lost_book_data_and_invalidates_the_book_like_a_gap(tmp_path):
    lines = recording_lines()[:HEAD]
    victim = next(i for i in range(SPLICE, HEAD) if b'"l2_data"' in lines[i] and b'"BTC-USD"' in lines[i])
    record = orjson.loads(lines[victim])
    broken, emptied = orjson.loads(orjson.dumps(record["msg"])), orjson.loads(orjson.dumps(record["msg"]))
    broken["events"][0]["updates"][0]["side"] = "sell"
    emptied["events"][0]["updates"] = []  # the same frame without its updates: what the books may see
    bad, clean = tmp_path / "bad", tmp_path / "clean"
    write_segments(bad, [[*lines[:victim], line(broken, record["recv_ns"]), *lines[victim + 1 :]]])
    write_segments(clean, [[*lines[:victim], line(emptied, record["recv_ns"]), *lines[victim + 1 :]]])

    summary = run_etl(bad)
    run_etl(clean)

    assert summary.quarantined_lines == 1 and summary.counts["quarantined_bad_side"] == 1
    assert summary.counts["gaps"] >= 1
    got, want = channel_table(bad, "level2"), channel_table(clean, "level2")
    for column in ("ts_event", "ts_recv", "seq", "side", "price", "size", "best_bid", "best_ask", "product_id"):
        assert got.column(column) == want.column(column), column
    seq = got.column("seq").to_numpy()
    valid = got.column("book_valid").to_numpy()
    victim_seq = record["msg"]["sequence_num"]
    assert valid[seq < victim_seq].tolist() == want.column("book_valid").to_numpy()[seq < victim_seq].tolist()
    assert not valid[seq > victim_seq].any()  # no snapshot follows in this cut: invalid to the end


def test_a_rejected_level2_frame_without_a_sequence_number_is_a_gap_too(tmp_path):
    recv = recv_at(SPLICE - 1)
    write_segments(tmp_path, [spliced([line(l2(bad_update(side="sell")), recv)])])  # no sequence_num
    summary = run_etl(tmp_path)
    assert summary.quarantined_lines == 1 and summary.counts["gaps"] == 2  # BTC-USD and ETH-USD, one connection
    level2 = channel_table(tmp_path, "level2")
    after = np.asarray(level2.column("ts_recv")) > recv
    assert after.any() and not np.asarray(level2.column("book_valid"))[after].any()


def test_a_control_line_with_a_bad_receive_time_is_applied_not_quarantined(tmp_path):
    """Only frames carry data on the receive clock; a control line's time is not data, so a bad
    one neither quarantines it (while the engine acts on it) nor moves any clock."""
    recv = recv_at(SPLICE - 1)
    ahead = control_line(recv + 10 * YEAR_NS, 1, "connect", {"url": "wss://advanced-trade-ws.coinbase.com"})
    bad, clean = tmp_path / "bad", tmp_path / "clean"
    write_segments(bad, [spliced([ahead])])
    write_segments(clean, [spliced([])])
    summary, reference = run_etl(bad), run_etl(clean)
    assert summary.quarantined_lines == 0 and summary.counts["quarantined_bad_time"] == 0
    assert rejects(bad) == []
    level2 = channel_table(bad, "level2")
    after = np.asarray(level2.column("ts_recv")) > recv
    assert after.any() and not np.asarray(level2.column("book_valid"))[after].any()  # the reconnect was applied
    assert level2.drop_columns(["book_valid"]) == channel_table(clean, "level2").drop_columns(["book_valid"])
    for channel in ("market_trades", "ticker", "candles"):
        assert channel_table(bad, channel) == channel_table(clean, channel), channel
    bars = sorted(path.name for path in (clean / "processed" / "coinbase").glob("bars_*"))
    assert bars and bars == sorted(path.name for path in (bad / "processed" / "coinbase").glob("bars_*"))
    for channel in bars:  # the line 10 years ahead closed no bar early
        assert channel_table(bad, channel) == channel_table(clean, channel), channel
    assert summary.counts["late_trades"] == reference.counts["late_trades"]


def test_exchange_times_fall_back_to_the_frame_time_then_the_receive_time(tmp_path):
    recv = recv_at(SPLICE - 1)
    frame_ns = times_ns(pa.array([TS]))[0][0]
    good = {"side": "bid", "price_level": "2.71828182", "new_quantity": "1"}
    spliced_lines = [
        line(l2([{**good, "event_time": "0001-01-01T00:00:00Z"}]), recv),  # wrapped into the 1700s before
        line(l2([{**good, "event_time": "9999-12-31T23:59:59Z"}]), recv),
        line(l2([{**good, "event_time": "not a time"}]), recv),
        line(l2([{**good, "event_time": "2036-01-01T00:00:00Z"}]), recv),  # 10 years after its receipt
        line(l2([{**good, "event_time": "nonsense"}], ts="0001-01-01T00:00:00Z"), recv + 1),  # both bad
        line(trade(time="9999-12-31T23:59:59Z", trade_id="t-9"), recv + 2),
        line(trade(time="2008-12-31T23:59:59Z", trade_id="t-10") | {"timestamp": "x"}, recv + 3),
        line(ticker() | {"timestamp": "9999-12-31T23:59:59Z"}, recv + 4),
        line(candle() | {"timestamp": "garbage"}, recv + 5),
    ]
    write_segments(tmp_path, [spliced(spliced_lines)])
    summary = run_etl(tmp_path)

    assert summary.quarantined_lines == 0 and summary.counts["ts_event_fallbacks"] == len(spliced_lines)
    level2 = channel_table(tmp_path, "level2")
    mine = level2.filter(pa.compute.equal(level2.column("price"), 2.71828182)).to_pylist()
    assert [r["ts_event"] for r in mine] == [frame_ns] * 4 + [recv + 1]
    trades = {r["trade_id"]: r["ts_event"] for r in channel_table(tmp_path, "market_trades").to_pylist()}
    assert trades["t-9"] == frame_ns and trades["t-10"] == recv + 3
    tickers = channel_table(tmp_path, "ticker").to_pylist()
    assert [r["ts_event"] for r in tickers if r["ts_recv"] == recv + 4] == [recv + 4]
    candles = channel_table(tmp_path, "candles").to_pylist()
    assert [r["ts_event"] for r in candles if r["ts_recv"] == recv + 5] == [recv + 5]
    for table in (level2, channel_table(tmp_path, "market_trades")):
        assert min(table.column("ts_event").to_pylist()) > 1_700_000_000 * 10**9  # nothing in 1970 or the 1700s


def test_times_outside_int64_nanoseconds_are_unreadable_not_wrapped():
    values = ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "1677-01-01T00:00:00Z", "2262-05-01T00:00:00Z",
              "2026-02-30T00:00:00Z", "2026-08-09T21:05:48.1Z"]  # fmt: skip
    ns, ok = times_ns(pa.array(values))
    assert ok.tolist() == [False, False, False, False, False, True]
    assert ns[-1] == 1_786_309_548_100_000_000


def test_feed_numbers_are_plain_ascii_decimals_and_the_general_parser_is_ascii_only():
    plain = ["123", "123.45", "0.00000001", "0", "92233720368.54775807", "0.100000000"]
    units, ok, _ = parse_units(pa.array(plain), plain=True)
    assert ok.all() and units.tolist() == [12_300_000_000, 12_345_000_000, 1, 0, 2**63 - 1, 10_000_000]
    refused = ["-5", "+5", "1e-8", ".5", "12.", "1_000", " 1", "1 ", "1\u00a0", "\u0661", "\uff11", "", "1.2.3",
               "0.000000001", "92233720368.54775808"]  # fmt: skip
    _, ok, _ = parse_units(pa.array(refused), plain=True)
    assert not ok.any()
    # what the ETL calls: a refused value rejects its line; a missing optional one does not
    items = pa.array([{"price": v} for v in [*plain, *refused, None]])
    line_of = np.arange(len(items))
    batch = _Batch(None, None, None, None, None, None, None, None, Rejects(np.zeros(len(items), np.bool_)))
    units, valid = batch.units(line_of, items, "price", "ticker", required=False)
    assert units[: len(plain)].tolist() == [12_300_000_000, 12_345_000_000, 1, 0, 2**63 - 1, 10_000_000]
    assert batch.rejects.bad.tolist() == [False] * len(plain) + [True] * len(refused) + [False]
    assert [family for _, family, _ in batch.rejects.reasons] == ["bad_number"] * len(refused)
    assert valid.tolist() == [True] * (len(plain) + len(refused)) + [False]
