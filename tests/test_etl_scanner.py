"""The compiled level2 scanner (``etl.l2_scanner: compiled``) against the reference path
(``duckdb``: every line through DuckDB): the same segments through both, every processed
table read back, the counters, the quarantine files and the checkpoint compared.

Inputs: the real recording (5 MB snapshot frame included), the benchmark's generated
stream, and seeded streams of randomised valid frames (key order shuffled, whitespace
between tokens, escapes, decimals of every length, empty update lists, unknown fields with
nested values), with and without frames the scanner must hand back to DuckDB."""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from daedalus.capture.records import control_line
from daedalus.config import parse_config
from daedalus.etl import fastpath, l2scan
from daedalus.etl.job import EtlJob, Summary
from daedalus.etl.state import load_state
from daedalus.logs import _FIELDS
from tests.conftest import RECORDING, REPO
from tests.etl_helpers import channel_table, recording_lines, write_segments

SCANNER_COUNTERS = {fastpath.SCANNED, fastpath.TRADES_SCANNED, fastpath.FALLBACK_LINES, fastpath.FALLBACK_L2}
T0 = 1_786_309_200_000_000_000  # 2026-08-09T21:00:00Z


def run(data_dir: Path, mode: str) -> Summary:
    config = parse_config({"data_dir": str(data_dir), "etl": {"l2_scanner": mode}})
    return EtlJob(config).run()


def both(tmp_path: Path, chunks: list[list[bytes]], zstd_every: int = 0) -> dict[str, Summary]:
    """The same segments through both paths; asserts every output is the same; the summaries."""
    out = {}
    for mode in ("duckdb", "compiled"):
        write_segments(tmp_path / mode, chunks, zstd_every=zstd_every)
        out[mode] = run(tmp_path / mode, mode)
    assert_same_output(tmp_path / "duckdb", tmp_path / "compiled")
    ref, fast = out["duckdb"], out["compiled"]
    assert ref.rows == fast.rows
    assert ref.quarantined_lines == fast.quarantined_lines
    assert ref.quarantined_segments == fast.quarantined_segments
    assert +ref.counts == Counter({k: v for k, v in fast.counts.items() if k not in SCANNER_COUNTERS and v})
    scanned, back = fast.counts[fastpath.SCANNED], fast.counts[fastpath.FALLBACK_L2]
    assert scanned + back == ref.counts["l2_data"]  # every level2 frame went one way or the other
    return out


def assert_same_output(ref: Path, fast: Path) -> None:
    processed = [p.relative_to(ref) for p in sorted((ref / "processed" / "coinbase").rglob("*.parquet"))]
    assert processed == [p.relative_to(fast) for p in sorted((fast / "processed" / "coinbase").rglob("*.parquet"))]
    for channel in sorted({p.parts[2] for p in processed}):
        a, b = channel_table(ref, channel), channel_table(fast, channel)
        assert a.schema == b.schema, channel
        assert a.num_rows == b.num_rows, channel
        assert a.equals(b), channel
        # and read back by another engine too
        assert pl.from_arrow(a).equals(pl.from_arrow(b)), channel
    for path in sorted((ref / "raw" / "quarantine").rglob("*")) if (ref / "raw" / "quarantine").exists() else []:
        if path.is_file():
            assert (fast / path.relative_to(ref)).read_bytes() == path.read_bytes(), path.name
    a, b = (load_state(d / "processed" / "_state", "coinbase", 10**9, 10, 60 * 10**9) for d in (ref, fast))
    assert a.books.products == b.books.products
    arrays_a, arrays_b = a.books.to_arrays(), b.books.to_arrays()
    assert arrays_a.keys() == arrays_b.keys()
    for key, value in arrays_a.items():
        assert np.array_equal(value, arrays_b[key]), key
    assert a.trades.to_json() == b.trades.to_json()
    assert a.bars.to_json() == b.bars.to_json()
    assert a.last_segment == b.last_segment


# ---- the real recording ----------------------------------------------------------------------
@pytest.mark.skipif(not RECORDING.exists(), reason=f"reference recording missing: {RECORDING}")
def test_real_recording_same_output_both_paths(tmp_path):
    lines = recording_lines()
    assert max(len(line) for line in lines) > 4_000_000  # the BTC-USD snapshot frame
    out = both(tmp_path, [lines[:300], lines[300:700], lines[700:]], zstd_every=2)
    fast = out["compiled"]
    assert fast.counts[fastpath.SCANNED] == 775 and fast.counts[fastpath.FALLBACK_L2] == 0
    assert fast.rows["level2"] > 70_000


@pytest.mark.skipif(not RECORDING.exists(), reason=f"reference recording missing: {RECORDING}")
def test_real_recording_small_reads_and_blocks(tmp_path, monkeypatch):
    """A read size far below the 5 MB line (the buffer grows) and one batch per DuckDB block."""
    monkeypatch.setattr(fastpath, "READ_BYTES", 4096)
    monkeypatch.setattr(fastpath, "BLOCK_ROWS", fastpath.BATCH_ROWS)
    lines = recording_lines()
    both(tmp_path, [lines[:500], lines[500:]], zstd_every=1)


# ---- the benchmark's generated stream -------------------------------------------------------
def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_etl", REPO / "bench" / "etl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("updates_per_frame", [6.3, 1])
def test_generated_bench_stream_same_output_both_paths(tmp_path, monkeypatch, updates_per_frame):
    bench = _bench_module()
    monkeypatch.setattr(bench, "DEPTH", {"BTC-USD": 2_000, "ETH-USD": 300})
    monkeypatch.setattr(bench, "RESNAP_EVERY", 3_000)  # reconnects and fresh snapshots inside the stream
    # DuckDB's decode of a block in small chunks: most batches' handed-back lines span two of them
    monkeypatch.setattr(fastpath, "FALLBACK_BATCH_ROWS", 333)
    source = tmp_path / "generated"
    data = bench.generate(source, 6_000_000, 2_000_000, False, updates_per_frame)
    chunks = [path.read_bytes().splitlines(keepends=True) for path in data.segments]
    assert len(chunks) >= 3
    out = both(tmp_path, chunks)
    fast = out["compiled"]
    assert fast.counts[fastpath.FALLBACK_L2] == 0 and fast.counts[fastpath.SCANNED] > 3_000
    assert out["duckdb"].counts["snapshots"] >= 4


# ---- randomised frames ------------------------------------------------------------------------
class Writer:
    """JSON text with random whitespace between tokens and members in random order."""

    def __init__(self, rng: random.Random, extras: bool = True) -> None:
        self.rng = rng
        self.extras = extras  # unknown members (some with a nested key twice: DuckDB ignores those)

    def ws(self) -> str:
        return self.rng.choice(["", "", "", " ", "  ", "\t", " \r ", "\t "])

    def obj(self, members: list[tuple[str, str]], keep_first: int = 0) -> str:
        """An object of ``members`` in random order, the first ``keep_first`` kept first."""
        rest = members[keep_first:]
        self.rng.shuffle(rest)
        members = members[:keep_first] + rest
        inner = ",".join(f'{self.ws()}"{k}"{self.ws()}:{self.ws()}{v}{self.ws()}' for k, v in members)
        return "{" + (inner or self.ws()) + "}"

    def arr(self, items: list[str]) -> str:
        return "[" + (",".join(f"{self.ws()}{v}{self.ws()}" for v in items) or self.ws()) + "]"

    def unknown(self) -> tuple[str, str]:
        """An extra member the ETL does not read: any JSON, nested, with escapes."""
        rng = self.rng
        value = rng.choice([
            '"x\\/y \\"q\\" \\\\ \\u0041 \\n"', "-0.5e-3", "1E+400", "123456789012345678901234567890", "true",
            "null", "false", '""', "[]", "{}",
            self.obj([("a", self.arr(["1", '"b"', self.obj([("c", "[[[]]]"), ("a", "2")])])), ("a", "3")]),
        ])  # fmt: skip
        return rng.choice(["client_id", "zz", "extra_field", "Side", "EVENTS"]), value


def decimal(rng: random.Random, positive: bool) -> str:
    """A plain decimal of any length the feed could send (up to 8 decimals, no exponent)."""
    whole = str(rng.randint(1 if positive else 0, 10 ** rng.randint(1, 10)))
    if rng.random() < 0.3:
        return whole
    digits = rng.randint(1, 8)
    frac = "".join(rng.choice("0123456789") for _ in range(digits))
    if positive and whole == "0" and set(frac) == {"0"}:
        frac = frac[:-1] + "1"
    return f"{whole}.{frac}"


def rfc3339(ns: int, digits: int) -> str:
    seconds, nanos = divmod(ns, 10**9)
    base = np.datetime64(seconds, "s").astype(str)
    return base + "Z" if digits == 0 else f"{base}.{str(nanos).zfill(9)[:digits]}Z"


def escaped(product: str, rng: random.Random) -> str:
    """The product id with some characters as JSON escapes (``\\u002D`` for ``-``)."""
    return "".join(f"\\u{ord(c):04X}" if rng.random() < 0.3 else c for c in product)


def l2_line(w: Writer, recv: int, seq: int, products: list[str], snapshot: bool, capture_shape: bool = False) -> str:
    """A level2 record line; ``capture_shape``: the envelope as the capture writes it (what
    the reference path's clean copy keeps), else shuffled and padded too."""
    rng = w.rng
    events = []
    for product in rng.sample(products, rng.randint(1, len(products))) if not snapshot else products:
        updates = []
        for _ in range(rng.randint(20, 60) if snapshot else rng.choice([0, 1, 1, 2, 3, 7])):
            side = rng.choice(["bid", "offer"] if snapshot else ["bid", "offer", "ask"])
            size = "0" if rng.random() < 0.2 and not snapshot else decimal(rng, False)
            members = [("side", f'"{side}"'),
                       ("event_time", f'"{rfc3339(recv - rng.randint(0, 10**9), rng.randint(0, 9))}"'),
                       ("price_level", f'"{decimal(rng, True)}"'), ("new_quantity", f'"{size}"')]  # fmt: skip
            if w.extras and rng.random() < 0.1:
                members.append(w.unknown())
            updates.append(w.obj(members))
        kind = "snapshot" if snapshot else rng.choice(["update", "update", "Update"])
        members = [("type", f'"{kind}"'), ("product_id", f'"{escaped(product, rng)}"'), ("updates", w.arr(updates))]
        if w.extras and rng.random() < 0.1:
            members.append(w.unknown())
        events.append(w.obj(members))
    msg = [("channel", '"l2_data"'), ("timestamp", f'"{rfc3339(recv, 9)}"'), ("sequence_num", str(seq)),
           ("events", w.arr(events))]  # fmt: skip
    if w.extras and rng.random() < 0.2:
        msg.append(w.unknown())
    if capture_shape:
        return f'{{"recv_ns":{recv},"conn":7,"msg":{w.obj(msg)}}}'
    record = [("recv_ns", str(recv)), ("conn", "7"), ("msg", w.obj(msg))]
    if rng.random() < 0.05:
        record.append(("zz", '{"msg":1,"event":"gap"}'))
    return w.ws() + w.obj(record) + w.ws()


def trade_line(w: Writer, recv: int, seq: int, products: list[str], trade_id: int) -> str:
    """A market_trades record line: 0-3 events of 0-4 trades (ids repeat now and then, so
    de-duplication runs), any decimals, sides and id strings, escaped product ids, unknown members."""
    rng = w.rng
    events = []
    for _ in range(rng.choice([1, 1, 1, 2, 3, 0])):
        trades = []
        for _ in range(rng.choice([1, 1, 1, 2, 4, 0])):
            ident = str(trade_id - rng.randint(0, 3)) if rng.random() < 0.05 else f"{trade_id}{len(trades)}"
            members = [("product_id", f'"{escaped(rng.choice(products), rng)}"'),
                       ("trade_id", f'"{rng.choice(["", "t-"]) + ident}"'), ("price", f'"{decimal(rng, True)}"'),
                       ("size", f'"{decimal(rng, False)}"'), ("side", f'"{rng.choice(["BUY", "SELL", "buy", ""])}"'),
                       ("time", f'"{rfc3339(recv - rng.randint(0, 10**9), rng.randint(0, 9))}"')]  # fmt: skip
            if w.extras and rng.random() < 0.1:
                members.append(w.unknown())
            trades.append(w.obj(members))
        members = [("type", f'"{rng.choice(["update", "snapshot"])}"'), ("trades", w.arr(trades))]
        if w.extras and rng.random() < 0.1:
            members.append(w.unknown())
        events.append(w.obj(members))
    msg = [("channel", '"market_trades"'), ("timestamp", f'"{rfc3339(recv, 9)}"'), ("sequence_num", str(seq)),
           ("events", w.arr(events))]  # fmt: skip
    if w.extras and rng.random() < 0.2:
        msg.append(w.unknown())
    # the channel first, as Coinbase sends it (after the events, the scanner hands the line back)
    return w.ws() + w.obj([("recv_ns", str(recv)), ("conn", "7"), ("msg", w.obj(msg, keep_first=1))]) + w.ws()


#: frames the scanner must hand back (name -> a change to a valid l2 line's text); the
#: DuckDB path reads each its own way: a cast, a quarantined line, or a clean copy
REJECTS = {
    "exponent price": lambda t: t.replace('"price_level":"', '"price_level":"1e', 1),
    "number for a string": lambda t: t.replace('"new_quantity":"0"', '"new_quantity":0', 1),
    "string sequence": lambda t: t.replace('"sequence_num":', '"sequence_num":"1', 1).replace(',"ev', '","ev', 1),
    "duplicated key": lambda t: t.replace('"side":"bid"', '"side":"bid","side":"offer"', 1),
    "duplicated envelope key": lambda t: t.replace('"conn":7', '"conn":7,"conn":8', 1),
    "truncated": lambda t: t[: len(t) // 2],
    "non-ASCII product": lambda t: t.replace('"product_id":"BTC-USD"', '"product_id":"BTC-USDé"', 1),
    "non-ASCII extra": lambda t: t.replace('"msg":{', '"zz":"é","msg":{', 1),
    "escaped side": lambda t: t.replace('"side":"bid"', '"side":"b\\u0069d"', 1),
    "bad side": lambda t: t.replace('"side":"bid"', '"side":"buy"', 1),
    "null events": lambda t: t.replace('"events":[', '"events":null,"x":[', 1),
    "error type": lambda t: t.replace('"msg":{', '"msg":{"type":"error","message":"no",', 1),
    "float recv": lambda t: t.replace('{"recv_ns":', '{"recv_ns":1.5', 1),
    "recv in 1970": lambda t: t.replace('{"recv_ns":1', '{"recv_ns":', 1),
    "time without zone": lambda t: t.replace('Z","price_level"', '","price_level"', 1),
    "leading zero": lambda t: t.replace('"conn":7', '"conn":07', 1),
    "trades in l2": lambda t: t.replace('"updates":[', '"trades":[],"updates":[', 1),
    "NaN extra": lambda t: t.replace('"msg":{', '"zz":NaN,"msg":{', 1),
    "bad product": lambda t: t.replace('"product_id":"BTC-USD"', '"product_id":"-BTC"', 1),
}


def plain_trade_line(recv: int, seq: int) -> str:
    """A market_trades line exactly as Coinbase writes it (the trade rejects below edit it)."""
    trade = (f'{{"product_id":"BTC-USD","trade_id":"{seq * 10}","price":"100.5","size":"0.1","side":"BUY",'
             f'"time":"{rfc3339(recv, 6)}"}}')  # fmt: skip
    return (f'{{"recv_ns":{recv},"conn":7,"msg":{{"channel":"market_trades","timestamp":"{rfc3339(recv, 9)}",'
            f'"sequence_num":{seq},"events":[{{"type":"update","trades":[{trade}]}}]}}}}')  # fmt: skip


#: market_trades frames the scanner must hand back, as REJECTS
TRADE_REJECTS = {
    "trades: escaped id": lambda t: t.replace('"trade_id":"', '"trade_id":"\\u0074', 1),
    "trades: non-ASCII id": lambda t: t.replace('"trade_id":"', '"trade_id":"é', 1),
    "trades: number price": lambda t: t.replace('"price":"100.5"', '"price":100.5', 1),
    "trades: zero price": lambda t: t.replace('"price":"100.5"', '"price":"0"', 1),
    "trades: missing side": lambda t: t.replace(',"side":"BUY"', "", 1),
    "trades: escaped side": lambda t: t.replace('"side":"BUY"', '"side":"B\\u0055Y"', 1),
    "trades: duplicated key": lambda t: t.replace('"side":"BUY"', '"side":"BUY","side":"SELL"', 1),
    "trades: time with an offset": lambda t: t.replace('Z"}]', '+00:00"}]', 1),
    "trades: time in 2001": lambda t: t.replace('"time":"2026', '"time":"2001', 1),
    "trades: product in the event": lambda t: t.replace('{"type":"update",', '{"type":"update","product_id":"X",', 1),
    "trades: updates in the event": lambda t: t.replace('"trades":[', '"updates":[],"trades":[', 1),
    "trades: channel after the events": lambda t: t.replace('{"channel":"market_trades",', "{", 1).replace(
        "}]}]}}", '}]}],"channel":"market_trades"}}', 1),
    "trades: bad product": lambda t: t.replace('"product_id":"BTC-USD"', '"product_id":"-BTC"', 1),
    "trades: null trades": lambda t: t.replace('"trades":[', '"trades":null,"x":[', 1),
}


#: rejects DuckDB refuses (the segment is read again from a clean copy without them) or that
#: the clean copy's own check removes once it runs
CUT_BY_THE_CLEAN_COPY = ("duplicated key", "duplicated envelope key", "truncated", "NaN extra", "leading zero",
                         "float recv", "string sequence", "trades: duplicated key")  # fmt: skip


def random_stream(seed: int, lines: int, rejects: bool) -> tuple[list[list[bytes]], Counter[str]]:
    """Segments of a seeded random session (connect, snapshots, updates, trades, a gap),
    and how many of each reject were put in."""
    rng = random.Random(seed)
    w = Writer(rng)
    products = ["BTC-USD", "ETH-USD", "SOL-USD"]
    recv, seq = T0, 0
    out = [control_line(recv, 7, "connect", {"url": "wss://x"})]
    put: Counter[str] = Counter()
    for _ in range(lines):
        recv += rng.randint(1, 5_000_000)
        seq += 1
        roll = rng.random()
        if roll < 0.002 or seq == 1:
            text = l2_line(w, recv, seq, products, snapshot=True, capture_shape=rejects)
        elif roll < 0.15:
            text = trade_line(w, recv, seq, products, seq)
            if rejects and rng.random() < 0.15:
                name = rng.choice(sorted(TRADE_REJECTS))
                plain = plain_trade_line(recv, seq)
                changed = TRADE_REJECTS[name](plain)
                assert changed != plain, name
                text = changed
                put[name] += 1
        elif roll < 0.152:
            out.append(control_line(recv, 7, "gap", {"expected": seq, "received": seq + 1}))
            seq += 1
            continue
        else:
            text = l2_line(w, recv, seq, products, snapshot=False, capture_shape=rejects)
            if rejects and rng.random() < 0.05:
                bare = Writer(random.Random(seq), extras=False)
                plain = l2_line(bare, recv, seq, ["BTC-USD"], False, capture_shape=True)
                plain = "".join(plain.split())  # no whitespace: the replacements above see the tokens
                name = rng.choice(sorted(REJECTS))
                changed = REJECTS[name](plain)
                if changed != plain:
                    text = changed
                    put[name] += 1
        out.append(text.encode() + b"\n")
    cuts = sorted(rng.sample(range(1, len(out)), 2))
    return [out[: cuts[0]], out[cuts[0] : cuts[1]], out[cuts[1] :]], put


@pytest.mark.parametrize("seed", [1, 2])
def test_randomised_valid_frames_all_scanned_same_output(tmp_path, seed):
    chunks, _ = random_stream(seed, 9_000, rejects=False)
    out = both(tmp_path, chunks, zstd_every=3)
    fast = out["compiled"]
    assert fast.counts[fastpath.FALLBACK_L2] == 0  # every valid level2 frame was the scanner's
    assert fast.counts[fastpath.SCANNED] > 6_000
    assert fast.counts[fastpath.TRADES_SCANNED] == out["duckdb"].counts["market_trades"] > 1_000  # and every trade
    assert out["duckdb"].quarantined_lines == 0


@pytest.mark.parametrize("seed", [3, 4])
def test_rejected_frames_fall_back_counted_same_output(tmp_path, seed):
    chunks, put = random_stream(seed, 9_000, rejects=True)
    assert len(put.keys() & REJECTS.keys()) >= 12 and len(put.keys() & TRADE_REJECTS.keys()) >= 10
    out = both(tmp_path, chunks)
    ref, fast = out["duckdb"], out["compiled"]
    assert ref.quarantined_lines > 0  # the clean copy, bad numbers and products: quarantine worked the same
    # every reject DuckDB still reads as a frame of its channel (not cut out by the clean copy) is counted
    kept = {k: v for k, v in put.items() if k not in CUT_BY_THE_CLEAN_COPY}
    assert fast.counts[fastpath.FALLBACK_L2] == sum(v for k, v in kept.items() if k in REJECTS)
    trades_back = sum(v for k, v in kept.items() if k in TRADE_REJECTS)
    assert fast.counts[fastpath.TRADES_SCANNED] + trades_back == ref.counts["market_trades"]
    assert fast.counts[fastpath.FALLBACK_LINES] > fast.counts[fastpath.FALLBACK_L2] + trades_back  # control lines


def test_blank_lines_and_a_last_line_without_newline(tmp_path):
    chunks, _ = random_stream(5, 3_000, rejects=False)
    chunks[0].insert(5, b"   \t\r\n")
    chunks[0].insert(9, b"\n")
    chunks[-1][-1] = chunks[-1][-1].rstrip(b"\n")
    both(tmp_path, chunks)


def test_duckdb_only_mode_reads_no_line_with_the_scanner(tmp_path):
    chunks, _ = random_stream(6, 2_000, rejects=False)
    write_segments(tmp_path, chunks)
    summary = run(tmp_path, "duckdb")
    assert summary.rows["level2"] > 0 and not SCANNER_COUNTERS & set(summary.counts)


def test_config_rejects_an_unknown_scanner(tmp_path):
    with pytest.raises(Exception, match="l2_scanner"):
        parse_config({"data_dir": str(tmp_path), "etl": {"l2_scanner": "simd"}})


def test_scanner_counters_in_the_summary_the_heartbeat_and_the_log(tmp_path, caplog):
    chunks, _ = random_stream(7, 3_000, rejects=True)
    write_segments(tmp_path, chunks)
    job = EtlJob(parse_config({"data_dir": str(tmp_path), "etl": {"l2_scanner": "compiled"}}))
    with caplog.at_level(logging.INFO, logger="daedalus.etl"):
        summary = job.run()
    back = summary.counts[fastpath.FALLBACK_L2]
    assert back > 0 and summary.counts[fastpath.SCANNED] > 0
    assert f"handed_to_duckdb={back:,}" in summary.text()
    counters = job.heartbeat_stats(Summary())["counters"]  # the run just finished is still the job's current one
    assert counters["l2_scanner_fallbacks"] == back
    done = [getattr(r, _FIELDS) for r in caplog.records if r.getMessage() == "etl_segment_done"]
    assert len(done) == 3 and sum(fields["l2_fallback"] for fields in done) == back


# ---- level2 rows grouped by partition before Arrow ------------------------------------------------
def test_partition_order_and_spans_write_what_a_filter_per_partition_writes(tmp_path):
    """Rows of three products, interleaved, across a UTC midnight: :meth:`partition_order` +
    :meth:`write_spans` (one gather, then slices) write each partition's rows in their order,
    as filtering the table by partition does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from daedalus.etl.output import PartitionedWriter

    rng = np.random.default_rng(5)
    n, names = 5_000, ["BTC-USD", "ETH-USD", "SOL-USD"]
    codes = rng.integers(0, 3, n)
    midnight = 1_786_406_400 * 10**9  # 2026-08-11T00:00:00Z
    ts = np.sort(rng.integers(midnight - 10**12, midnight + 10**12, n))
    days = np.datetime_as_string(ts.astype("datetime64[ns]"), unit="D")
    assert set(days) == {"2026-08-10", "2026-08-11"}
    table = pa.table({"ts": pa.array(ts), "i": pa.array(np.arange(n))})
    writer = PartitionedWriter(tmp_path / "level2", ["product_id", "date"], "segment_x", "zstd", {})
    order, spans = writer.partition_order(n, (codes, names), ts)
    assert order is not None and len(spans) == 6
    writer.write_spans(table.take(pa.array(order)), spans)
    files = writer.close()
    assert len(files) == 6
    for (product, date), (start, stop) in [((k[0], k[1]), (a, b)) for k, a, b in spans]:
        want = table.filter(pa.array((codes == names.index(product)) & (days == date)))
        path = tmp_path / "level2" / f"product_id={product}" / f"date={date}" / "part-segment_x.parquet.tmp"
        got = pq.read_table(path)
        assert want.num_rows == stop - start > 0
        assert got.column("i").to_pylist() == want.column("i").to_pylist()
    one = PartitionedWriter(tmp_path / "one", ["product_id"], "segment_x", "none", {})
    assert one.partition_order(3, (np.zeros(3, np.int64), ["BTC-USD"]), ts[:3]) == (None, [(("BTC-USD",), 0, 3)])


def test_scanner_fallbacks_exported_as_a_metric(tmp_path):
    """The heartbeat's ``l2_scanner_fallbacks`` becomes ``daedalus_etl_l2_scanner_fallbacks``."""
    from prometheus_client.core import CounterMetricFamily

    from daedalus.ops import metrics
    from daedalus.ops.records import ChildStatus

    chunks, _ = random_stream(8, 2_000, rejects=True)
    write_segments(tmp_path, chunks)
    job = EtlJob(parse_config({"data_dir": str(tmp_path), "etl": {"l2_scanner": "compiled"}}))
    back = job.run().counts[fastpath.FALLBACK_L2]
    assert back > 0
    child = ChildStatus("etl", "etl", "coinbase", ["daedalus", "etl"], "running", 0.0,
                        counters=job.heartbeat_stats(Summary())["counters"])  # fmt: skip
    families = {f.name: f for f in metrics._per_source([child], "counters", metrics._ETL_COUNTERS, CounterMetricFamily)}
    (sample,) = [s for s in families["daedalus_etl_l2_scanner_fallbacks"].samples if s.name.endswith("_total")]
    assert sample.labels == {"source": "coinbase"} and sample.value == back


# ---- handed-back lines parsed once per block, cut back per batch --------------------------------
def _frame_line(recv: int, seq: int, channel: str, key: str, item: dict) -> bytes:
    msg = {"channel": channel, "timestamp": rfc3339(recv, 9), "sequence_num": seq,
           "events": [{"type": "update", key: [item]}]}  # fmt: skip
    return json.dumps({"recv_ns": recv, "conn": 7, "msg": msg}, separators=(",", ":")).encode() + b"\n"


def other_line(rng: random.Random, recv: int, seq: int) -> tuple[bytes, bool]:
    """A line the scanner hands back that is not level2 (trade, ticker, candle, error, unknown
    channel, not JSON, gap), about one in five holding a value the parser quarantines."""
    product = rng.choice(["BTC-USD", "ETH-USD"])
    bad = rng.random() < 0.2
    roll = rng.random()
    if roll < 0.6:
        item = {"product_id": "-BTC" if bad and rng.random() < 0.5 else product,
                "trade_id": str(rng.randint(1, 3_000)),  # repeats: the de-duplication across batches
                "price": "1e5" if bad else decimal(rng, True), "size": f"{rng.randint(0, 50)}.{rng.randint(1, 999)}",
                "side": rng.choice(["BUY", "SELL"]), "time": rfc3339(recv - rng.randint(0, 10**9), 6)}  # fmt: skip
        return _frame_line(recv, seq, "market_trades", "trades", item), bad
    if roll < 0.75:
        item = {"type": "ticker", "product_id": product, "price": decimal(rng, True), "volume_24_h": "10",
                "price_percent_chg_24_h": "abc" if bad else "-1.5", "best_bid": "1", "best_ask": "2"}  # fmt: skip
        return _frame_line(recv, seq, rng.choice(["ticker", "ticker_batch"]), "tickers", item), bad
    if roll < 0.85:
        item = {"start": str(recv // 10**9 // 60 * 60), "open": "1", "high": "2", "low": "-1" if bad else "0.5",
                "close": "1.5", "volume": "3", "product_id": product}  # fmt: skip
        return _frame_line(recv, seq, "candles", "candles", item), bad
    if roll < 0.9:
        error = {"recv_ns": recv, "conn": 7, "msg": {"type": "error", "message": "no"}}
        return json.dumps(error).encode() + b"\n", True
    if roll < 0.93:
        return _frame_line(recv, seq, "futures", "x", {}), True
    if roll < 0.96:
        return b'{"recv_ns":%d,"conn":7,"raw":"not json {"}\n' % recv, True
    return control_line(recv, 7, "gap", {"expected": seq, "received": seq + 1}), False


def test_handed_back_lines_parsed_per_block_cut_per_batch(tmp_path, monkeypatch):
    """Blocks of several batches whose handed-back lines are trades, tickers, candles, errors,
    unknown channels, lines that are not JSON and gaps (no level2 frame): DuckDB's decode is
    parsed once per block and cut back per batch (quarantined lines, table rows, counters),
    and every output is what parsing each batch alone writes."""
    cuts = []
    real_cut = fastpath._cut
    monkeypatch.setattr(fastpath, "_cut", lambda *a: cuts.append(real_cut(*a)) or cuts[-1])
    rng = random.Random(11)
    w = Writer(rng)
    products = ["BTC-USD", "ETH-USD"]
    recv, quarantined = T0, 0
    out = [control_line(recv, 7, "connect", {"url": "wss://x"})]
    for seq in range(1, 30_000):
        recv += rng.randint(1, 20_000_000)
        if seq == 1 or rng.random() < 0.6:
            out.append(l2_line(w, recv, seq, products, snapshot=seq == 1).encode() + b"\n")
        else:
            line, bad = other_line(rng, recv, seq)
            out.append(line)
            quarantined += bad
    summaries = both(tmp_path, [out[:20_000], out[20_000:]])
    fast = summaries["compiled"]
    assert fast.counts[fastpath.FALLBACK_L2] == 0
    assert summaries["duckdb"].quarantined_lines > 100
    assert len(cuts) >= 4 and sum(bool(c.quarantine) for c in cuts) >= 4  # the per-block parse ran, cut 4+ ways
    assert sum(bool(c.counts) for c in cuts) == 2  # one block per segment: its counters ride on one batch


def test_batch_without_level2_frames_skips_the_level2_parse_same_result(tmp_path, monkeypatch):
    """``parse_batch`` of lines without a level2 frame (what the scanner hands back) returns
    the empty level2 part directly: the same arrays, types and counters as the full parse."""
    import dataclasses

    import pyarrow as pa

    from daedalus.etl import coinbase
    from daedalus.etl.reader import connect, read_batches

    rng = random.Random(12)
    recv = T0
    lines = [control_line(recv, 7, "connect", {"url": "wss://x"})]
    for seq in range(1, 3_000):
        recv += rng.randint(1, 20_000_000)
        lines.append(other_line(rng, recv, seq)[0])
    path = tmp_path / "segment_20260809T21_00001.ndjson"
    path.write_bytes(b"".join(lines))
    con = connect()
    (batch,) = list(read_batches(con, path, batch_rows=len(lines)))
    con.close()
    now = recv + 10**9
    fast = coinbase.parse_batch(batch, 100, now)
    monkeypatch.setattr(coinbase, "_no_level2", coinbase._level2_rows)
    full = coinbase.parse_batch(batch, 100, now)
    assert fast.products == full.products == []
    for name in (f.name for f in dataclasses.fields(fast.frames)):
        a, b = getattr(fast.frames, name), getattr(full.frames, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert fast.l2.keys() == full.l2.keys()
    assert fast.l2["ts_event"].type == full.l2["ts_event"].type and len(fast.l2["ts_event"]) == 0
    for key in ("ts_recv", "seq"):
        assert fast.l2[key].dtype == full.l2[key].dtype and fast.l2[key].shape == full.l2[key].shape == (0,)
    assert fast.counts == full.counts and fast.quarantine == full.quarantine and len(fast.quarantine) > 100
    for name in ("trades", "tickers", "candles"):
        assert getattr(fast, name).equals(getattr(full, name)) and getattr(fast, name).num_rows > 0, name
        assert np.array_equal(fast.lines[name], full.lines[name])
        recv_of_line = batch.column("recv_ns").to_numpy(zero_copy_only=False)[fast.lines[name]]
        assert np.array_equal(getattr(fast, name).column("ts_recv").cast(pa.int64()).to_numpy(), recv_of_line), name
    assert isinstance(fast.l2["ts_event"], pa.Array)


def test_word_at_a_time_helpers_agree_with_bytes_at_every_offset_and_length():
    """The scanner compares and searches eight bytes at a time (unaligned loads): at every
    offset, length and position of a difference or a quote, and never past the end it is given."""
    rng = random.Random(11)
    base = np.frombuffer(bytes(rng.choice(b"abc:,{}") for _ in range(64)), np.uint8).copy()
    for p in range(0, 24):
        for n in range(0, 20):
            other = base.copy()
            assert l2scan._same(base, p, other, p, n)
            for k in range(n):  # one byte differs
                other = base.copy()
                other[p + k] ^= 1
                assert not l2scan._same(base, p, other, p, n), (p, n, k)
            lit = base[p : p + n].copy()
            assert l2scan._match(base, p, p + n, lit)
            assert n == 0 or not l2scan._match(base, p, p + n - 1, lit)  # the data ends a byte short
            assert l2scan._is(base, p, p + n, lit) and not l2scan._is(base, p, p + n + 1, lit)
    for p in range(0, 12):
        for limit in range(0, 30):
            for at in range(p, p + 34):
                b = np.full(64, ord("x"), np.uint8)
                b[at] = ord('"')
                e = min(64, p + 26)  # the data ends here: a quote at or after it is not seen
                want = at if at < min(e, p + limit) else -1
                assert l2scan._quote_within(b, p, e, limit) == want, (p, limit, at)
    # a string's end and escapes, with the byte that ends or breaks it at every position
    for k in range(0, 20):
        cases = ((b'"', "end"), (b"\\n", "escape"), (b"\x01", "bad"), (b"\xc3", "bad"), (b"\x7f", "plain"))
        for special, want in cases:
            body = b"a" * k + special + b"b" * 12 + b'"'
            data = np.frombuffer(b'"' + body + b"        ", np.uint8).copy()
            end, esc = l2scan._string(data, 0, data.shape[0])
            if want == "end":
                assert (end, esc) == (k + 2, False), (k, special)
            elif want == "bad":
                assert end == -1, (k, special)
            else:  # the string goes on to its closing quote
                assert end == len(body) + 1 and esc == (want == "escape"), (k, special)
