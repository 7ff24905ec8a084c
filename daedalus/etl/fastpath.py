"""The compiled path of the Coinbase ETL: the segment's bytes -> :class:`ParsedBatch`es.

The reference path reads every line with DuckDB (:func:`daedalus.etl.reader.read_batches`)
and parses 8,192-line batches (:func:`daedalus.etl.coinbase.parse_batch`). Here the
compiled scanner (:mod:`daedalus.etl.l2scan`) takes the ``l2_data`` and ``market_trades``
lines it recognises and every other line (tickers, control lines, anything odd) is written,
in order, to a scratch file that DuckDB reads and ``parse_batch`` parses exactly as before.
The scanner's trades become one table per block, sliced per batch. The two are
merged back in line order into batches of the same 8,192 lines the reference path makes,
so books, sequence checks, bars (closed by each batch's clock) and trade de-duplication
see the same input in the same batches, and the output is the same whichever path ran.

Lines go to DuckDB a block of several batches at a time (one query per block: a query
costs milliseconds), and ``parse_batch`` reads a block's lines in one call too (about 9 ms a
call whatever its size) unless they hold level2 frames; its output is cut back per batch.
A batch whose level2 rows are all the scanner's (the common case) uses the scanner's arrays
as they are. Memory is bounded by the block, not the segment.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zstandard

from daedalus.etl import l2scan
from daedalus.etl.book import FRAME, FrameBatch
from daedalus.etl.coinbase import CHANNELS, ParsedBatch, parse_batch
from daedalus.etl.reader import BATCH_ROWS, SegmentDecodeError, read_batches

READ_BYTES = 8 << 20  # bytes read at a time; the buffer grows only for a longer line
BLOCK_ROWS = 8 * BATCH_ROWS  # lines per DuckDB query for the lines the scanner hands back, at most
BLOCK_LEVEL2 = 1 << 20  # level2 rows per block, at most (checked at batch boundaries)
FALLBACK_BATCH_ROWS = BATCH_ROWS  # rows per Arrow chunk of DuckDB's decode of a block (a batch may span two)
PRODUCT_FORMS = 4096  # distinct product ids per segment the scanner interns; more go to DuckDB
_TS_TYPE = pa.timestamp("ns", tz="UTC")
#: the counters parse_batch always sets (the scanner's batches set the same keys)
_COUNT_KEYS = [*CHANNELS, "control", "overflow_dropped", "gap_lines", "undecodable_frames", "exchange_errors",
               "unknown_channels", "unrecognised_records", "ts_event_fallbacks"]  # fmt: skip
SCANNED, FALLBACK_LINES, FALLBACK_L2 = "l2_scanner_lines", "l2_scanner_fallback_lines", "l2_scanner_fallback_l2"
TRADES_SCANNED = "trade_scanner_lines"  # market_trades lines the scanner read (the rest went to DuckDB)
_TRADE_SCHEMA = pa.schema([("ts_event", _TS_TYPE), ("ts_recv", _TS_TYPE), ("seq", pa.int64()),
                           ("product_id", pa.string()), ("trade_id", pa.string()), ("side", pa.string()),
                           ("price", pa.int64()), ("size", pa.int64()), ("is_snapshot", pa.bool_())])  # fmt: skip


class _Input:
    """The segment's bytes (plain or zstd, any number of frames) in one growable buffer."""

    def __init__(self, handle: BinaryIO, zstd: bool) -> None:
        self.raw = handle
        self.stream = zstandard.ZstdDecompressor().stream_reader(handle, read_across_frames=True) if zstd else handle
        self.buf = np.empty(READ_BYTES, np.uint8)
        self.end = 0
        self.eof = False

    def refill(self, keep_from: int) -> int:
        """Move ``buf[keep_from:end]`` to the front, read more (growing the buffer when the kept
        part fills half of it); returns how far the kept bytes moved."""
        kept = self.end - keep_from
        if kept and keep_from:
            self.buf[:kept] = self.buf[keep_from : self.end]
        if kept * 2 > self.buf.shape[0]:
            grown = np.empty(self.buf.shape[0] * 2, np.uint8)
            grown[:kept] = self.buf[:kept]
            self.buf = grown
        self.end = kept
        view = memoryview(self.buf)[kept:]
        while self.end < self.buf.shape[0]:
            try:
                got = self.stream.readinto(view[self.end - kept :])
            except zstandard.ZstdError as exc:  # as DuckDB's refusal: the job reads a clean copy instead
                raise SegmentDecodeError(f"zstd: {exc}") from exc
            if not got:
                self.eof = True
                break
            self.end += got
        return keep_from


class _Out:
    """The scanner's output arrays for one block (fresh per block: batches made from them
    may be held by the writers until a row group is written)."""

    def __init__(self, frames: int, rows: int, events: int, trades: int) -> None:
        self.f_row = np.empty(frames, np.int64)
        self.f_recv = np.empty(frames, np.int64)
        self.f_conn = np.empty(frames, np.int64)
        self.f_seq = np.empty(frames, np.int64)
        self.f_re = np.empty(frames, np.int64)
        self.f_chan = np.empty(frames, np.int8)
        self.x_row = np.empty(frames, np.int64)
        self.x_a = np.empty(frames, np.int64)
        self.x_b = np.empty(frames, np.int64)
        self.r_prod = np.empty(rows, np.int32)
        self.r_side = np.empty(rows, np.int8)
        self.r_px = np.empty(rows, np.int64)
        self.r_sz = np.empty(rows, np.int64)
        self.r_snap = np.empty(rows, np.bool_)
        self.r_ts = np.empty(rows, np.int64)
        self.e_frame = np.empty(events, np.int64)
        self.e_prod = np.empty(events, np.int32)
        self.t_frame = np.empty(trades, np.int64)
        self.t_ts = np.empty(trades, np.int64)
        self.t_prod = np.empty(trades, np.int32)
        self.t_px = np.empty(trades, np.int64)
        self.t_sz = np.empty(trades, np.int64)
        self.t_snap = np.empty(trades, np.bool_)
        self.t_ide = np.empty(trades, np.int64)  # end of each trade id in t_idc (and of each side in t_sidec)
        self.t_idc = np.empty(trades * 16, np.uint8)
        self.t_sidee = np.empty(trades, np.int64)
        self.t_sidec = np.empty(trades * 8, np.uint8)

    def scan(self, data: np.ndarray, end: int, eof: bool, limit: int, now: int, segment: ScanSegment,
             meta: np.ndarray) -> int:  # fmt: skip
        """:func:`l2scan.scan` into these arrays (one place that spells its arguments)."""
        return l2scan.scan(data, end, eof, limit, now, segment.pt_slot, segment.pt_bytes, segment.pt_off,
                           segment.pt_ok, segment.pmeta, self.f_row, self.f_recv, self.f_conn, self.f_seq, self.f_re,
                           self.f_chan, self.r_prod, self.r_side, self.r_px, self.r_sz, self.r_snap, self.r_ts,
                           self.e_frame, self.e_prod, self.t_frame, self.t_ts, self.t_prod, self.t_px, self.t_sz,
                           self.t_snap, self.t_idc, self.t_ide, self.t_sidec, self.t_sidee, self.x_row, self.x_a,
                           self.x_b, meta)  # fmt: skip

    def grow(self, meta: np.ndarray) -> None:
        """Double whichever output is full (the scanner said S_NEED_ROOM)."""
        nf, nx = int(meta[l2scan.M_FRAMES]), int(meta[l2scan.M_FALLBACK])
        if nf >= self.f_row.shape[0] or nx >= self.x_row.shape[0]:
            for name in ("f_row", "f_recv", "f_conn", "f_seq", "f_re", "f_chan", "x_row", "x_a", "x_b"):
                setattr(self, name, _grown(getattr(self, name)))
        # a line that did not fit: its rows, events, trades or their text (we cannot know which): all
        for name in ("r_prod", "r_side", "r_px", "r_sz", "r_snap", "r_ts", "e_frame", "e_prod", "t_frame", "t_ts",
                     "t_prod", "t_px", "t_sz", "t_snap", "t_ide", "t_idc", "t_sidee", "t_sidec"):  # fmt: skip
            setattr(self, name, _grown(getattr(self, name)))


def _grown(a: np.ndarray) -> np.ndarray:
    out = np.empty(a.shape[0] * 2, a.dtype)
    out[: a.shape[0]] = a
    return out


@dataclass
class _Block:
    """Scanner output for segment rows ``first..last`` (exclusive) and DuckDB's for the rest."""

    first: int
    last: int
    out: _Out
    meta: np.ndarray
    fallback: pa.Table | None  # DuckDB's decode of the handed-back lines, in order


class ScanSegment:
    """Reads one segment through the scanner and DuckDB (see the module docstring)."""

    def __init__(self, source: Path, scratch: Path, con, max_object: int) -> None:
        self.source, self.scratch, self.con, self.max_object = source, scratch, con, max_object
        self.pt_slot = np.full(4 * PRODUCT_FORMS, -1, np.int32)
        self.pt_bytes = np.empty(PRODUCT_FORMS * l2scan.MAX_PRODUCT, np.uint8)
        self.pt_off = np.zeros(PRODUCT_FORMS + 1, np.int64)
        self.pt_ok = np.zeros(PRODUCT_FORMS, np.bool_)
        self.pmeta = np.zeros(2, np.int64)
        self.names: list[str] = []  # product form -> product id

    def batches(self) -> Iterator[tuple[int, ParsedBatch]]:
        """(segment row of the first line, parsed batch) for every 8,192 lines, in order."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        spill = self.scratch / f"fallback-{time.time_ns()}.ndjson"
        try:
            with self.source.open("rb") as handle:
                data = _Input(handle, self.source.name.endswith(".zst"))
                data.refill(0)
                row, pos = 0, 0
                while True:
                    block, pos = self._scan_block(data, row, pos, spill)
                    if block.last == block.first:
                        return
                    yield from self._batches(block)
                    row = block.last
                    del block  # its arrays go before the next block's are filled: one block in memory
                    if data.eof and pos >= data.end:
                        return
        finally:
            spill.unlink(missing_ok=True)

    # ---- scanning ----------------------------------------------------------------------------
    def _scan_block(self, data: _Input, row: int, pos: int, spill: Path) -> tuple[_Block, int]:
        out = _Out(BLOCK_ROWS, BLOCK_ROWS * 8, BLOCK_ROWS * 2, BLOCK_ROWS)
        meta = np.zeros(l2scan.N_META, np.int64)
        meta[l2scan.M_POS], meta[l2scan.M_ROW] = pos, row
        now = time.time_ns()
        limit = row + BATCH_ROWS
        written = 0
        with spill.open("wb") as sink:
            while True:
                status = out.scan(data.buf, data.end, data.eof, limit, now, self, meta)
                written = self._spill(data, out, meta, written, sink)
                if status == l2scan.S_NEED_ROOM:
                    out.grow(meta)
                elif status == l2scan.S_NEED_DATA:
                    moved = data.refill(int(meta[l2scan.M_POS]))
                    meta[l2scan.M_POS] -= moved
                elif status == l2scan.S_MAX_ROWS:
                    full = limit - row >= BLOCK_ROWS or meta[l2scan.M_ROWS] >= BLOCK_LEVEL2
                    if full:
                        break
                    limit += BATCH_ROWS
                else:  # S_END: all of the buffer
                    if data.eof:
                        break
                    moved = data.refill(int(meta[l2scan.M_POS]))
                    meta[l2scan.M_POS] -= moved
        self._learn_products()
        fallback = self._decode(spill, written) if written else None
        return _Block(row, int(meta[l2scan.M_ROW]), out, meta, fallback), int(meta[l2scan.M_POS])

    @staticmethod
    def _spill(data: _Input, out: _Out, meta: np.ndarray, written: int, sink: BinaryIO) -> int:
        """Write the lines handed back since the last call to the DuckDB file (before the
        buffer they point into is refilled)."""
        nx = int(meta[l2scan.M_FALLBACK])
        if nx > written:
            size = int((out.x_b[written:nx] - out.x_a[written:nx]).sum()) + nx - written
            lines = np.empty(size, np.uint8)
            l2scan.gather(data.buf, out.x_a, out.x_b, written, nx, lines)
            sink.write(memoryview(lines))
        return nx

    def _learn_products(self) -> None:
        forms = int(self.pmeta[l2scan.P_FORMS])
        for f in range(len(self.names), forms):
            raw = self.pt_bytes[self.pt_off[f] : self.pt_off[f + 1]].tobytes()
            self.names.append(raw.decode("ascii"))

    def _decode(self, spill: Path, lines: int) -> pa.Table:
        batches = list(read_batches(self.con, spill, self.max_object, FALLBACK_BATCH_ROWS))
        rows = sum(b.num_rows for b in batches)
        if rows != lines:  # DuckDB made other rows of these lines than one each: let the job's slow path judge
            raise SegmentDecodeError(f"DuckDB read {rows} records from {lines} lines the scanner handed back")
        return pa.Table.from_batches(batches)  # chunks as DuckDB made them: each batch combines only its slice

    # ---- batches -----------------------------------------------------------------------------
    def _batches(self, block: _Block) -> Iterator[tuple[int, ParsedBatch]]:
        out, meta = block.out, block.meta
        nf, nx = int(meta[l2scan.M_FRAMES]), int(meta[l2scan.M_FALLBACK])
        f_row, x_row = out.f_row[:nf], out.x_row[:nx]
        f_re = out.f_re[:nf]
        e_frame = out.e_frame[: int(meta[l2scan.M_EVENTS])]
        t_frame = out.t_frame[: int(meta[l2scan.M_TRADES])]
        trades = _trade_table(out, t_frame.shape[0], self.names)
        whole = _parse_whole(block.fallback) if block.fallback is not None else None
        counted = False
        for start in range(block.first, block.last, BATCH_ROWS):
            stop = min(start + BATCH_ROWS, block.last)
            fa, fb = np.searchsorted(f_row, [start, stop])
            xa, xb = np.searchsorted(x_row, [start, stop])
            ea, eb = np.searchsorted(e_frame, [fa, fb])
            ta, tb = np.searchsorted(t_frame, [fa, fb])
            ra = int(f_re[fa - 1]) if fa else 0
            rb = int(f_re[fb - 1]) if fb else 0
            scanned = _scanned(out, fa, fb, ra, rb, ea, eb, trades.slice(ta, tb - ta), out.f_row[t_frame[ta:tb]])
            fallback = None
            if xb > xa and whole is not None:
                fallback = _cut(whole, int(xa), int(xb), counted)
                counted = True  # the block's counters ride on its first batch with handed-back lines
            elif xb > xa:
                lines = block.fallback.slice(xa, xb - xa).combine_chunks()  # copies only a slice across chunks
                fallback = parse_batch(lines.to_batches()[0], 0, None)
            if fallback is not None:
                fallback.quarantine = [(int(x_row[xa + i]), why) for i, why in fallback.quarantine]
            yield start, _merge(start, stop - start, scanned, x_row[xa:xb], fallback, self.names)


def _parse_whole(fallback: pa.Table) -> ParsedBatch | None:
    """The block's handed-back lines parsed in one call (``parse_batch`` costs ~9 ms a call
    whatever its size, and a block holds up to 8 batches), or ``None`` when they hold level2
    frames: their products' order of first appearance is per batch, so those blocks are parsed
    a batch at a time. Every other output of ``parse_batch`` is per line, so cutting the
    whole's per-line arrays and its tables (by the line of each row) gives each batch what
    parsing it alone would."""
    # level2 rows come only from level2 frames: look for those before parsing, not after
    if pc.any(pc.equal(pc.struct_field(fallback.column("msg"), "channel"), "l2_data")).as_py():
        return None
    return parse_batch(fallback.combine_chunks().to_batches()[0], 0, None)


def _cut(whole: ParsedBatch, xa: int, xb: int, counted: bool) -> ParsedBatch:
    """Lines ``xa:xb`` of a whole block's parse (no level2 rows) as a batch of their own; the
    block's counters go with the first cut only (``counted``: they went; the segment sums them)."""
    f = whole.frames
    n = xb - xa
    zeros = np.zeros(n, np.int64)
    frames = FrameBatch(f.f_conn[xa:xb], f.f_kind[xa:xb], f.f_seq[xa:xb], f.f_aux[xa:xb], f.f_ts[xa:xb], zeros,
                        zeros.copy(), f.r_prod, f.r_side, f.r_px, f.r_sz, f.r_snap)  # fmt: skip
    tables, lines_of = [], {}
    for name in ("trades", "tickers", "candles"):
        table, lines = getattr(whole, name), whole.lines[name]
        a, b = np.searchsorted(lines, [xa, xb])
        tables.append(table.slice(int(a), int(b - a)))
        lines_of[name] = lines[a:b] - xa
    q = whole.quarantine
    lo, hi = bisect_left(q, (xa,)), bisect_left(q, (xb,))
    quarantine = [(line - xa, why) for line, why in q[lo:hi]]
    counts = Counter() if counted else whole.counts
    return ParsedBatch(frames, [], whole.l2, *tables, counts, quarantine, lines_of)


@dataclass
class _Scanned:
    """One batch's accepted lines: frames and rows are slices of a block's output."""

    row: np.ndarray  # segment row of each frame
    recv: np.ndarray
    conn: np.ndarray
    seq: np.ndarray
    rs: np.ndarray  # rows of frame k: rs[k]:re[k] (relative to the slice)
    re: np.ndarray
    prod: np.ndarray  # product form per row
    side: np.ndarray
    px: np.ndarray
    sz: np.ndarray
    snap: np.ndarray
    ts: np.ndarray
    event_row: np.ndarray  # segment row of each event (products in order of appearance)
    event_prod: np.ndarray
    chan: np.ndarray  # l2scan.CH_L2 or CH_TRADES per frame
    trades: pa.Table  # the batch's slice of the block's trades table
    trade_row: np.ndarray  # segment row of each trade


def _scanned(out: _Out, fa: int, fb: int, ra: int, rb: int, ea: int, eb: int, trades: pa.Table,
             trade_row: np.ndarray) -> _Scanned:  # fmt: skip
    re_ = out.f_re[fa:fb] - ra
    rs = np.empty_like(re_)
    if re_.shape[0]:
        rs[0] = (out.f_re[fa - 1] if fa else 0) - ra
        rs[1:] = re_[:-1]
    events = out.e_frame[ea:eb]
    return _Scanned(out.f_row[fa:fb], out.f_recv[fa:fb], out.f_conn[fa:fb], out.f_seq[fa:fb], rs, re_,
                    out.r_prod[ra:rb], out.r_side[ra:rb], out.r_px[ra:rb], out.r_sz[ra:rb], out.r_snap[ra:rb],
                    out.r_ts[ra:rb], out.f_row[events], out.e_prod[ea:eb], out.f_chan[fa:fb], trades,
                    trade_row)  # fmt: skip


def _merge(start: int, n: int, s: _Scanned, x_row: np.ndarray, fb: ParsedBatch | None,
           names: list[str]) -> ParsedBatch:  # fmt: skip
    """One batch of ``n`` lines from the scanner's frames and DuckDB's (``fb``), in line order."""
    counts: Counter[str] = Counter(dict.fromkeys(_COUNT_KEYS, 0))
    products, code_of_form = _products(s, x_row, fb, names)
    pos_s = s.row - start
    lengths = np.zeros(n, np.int64)
    lengths[pos_s] = s.re - s.rs
    kind = np.full(n, FRAME, np.int8)
    conn = np.empty(n, np.int64)
    seq = np.empty(n, np.int64)
    aux = np.full(n, -1, np.int64)
    clock = np.empty(n, np.int64)
    conn[pos_s], seq[pos_s], clock[pos_s] = s.conn, s.seq, s.recv
    quarantine: list[tuple[int, str]] = []
    if fb is not None:
        f = fb.frames
        pos_f = x_row - start
        lengths[pos_f] = f.f_re - f.f_rs
        kind[pos_f], conn[pos_f], seq[pos_f], aux[pos_f], clock[pos_f] = f.f_kind, f.f_conn, f.f_seq, f.f_aux, f.f_ts
        counts.update(fb.counts)
        quarantine = fb.quarantine
    level2_lines = int(np.count_nonzero(s.chan == l2scan.CH_L2))
    trade_lines = s.chan.shape[0] - level2_lines
    counts["l2_data"] += level2_lines
    counts[SCANNED] += level2_lines
    counts["market_trades"] += trade_lines
    counts[TRADES_SCANNED] += trade_lines
    re_ = np.cumsum(lengths)
    rs = re_ - lengths
    if fb is None or fb.frames.r_prod.shape[0] == 0:
        cols, ts_recv, row_seq = _scanner_rows(s, code_of_form)
    else:
        cols, ts_recv, row_seq = _merged_rows(s, pos_s, x_row - start, fb, products, code_of_form, rs, lengths,
                                              clock, seq)  # fmt: skip
    l2 = {"ts_event": _timestamps(cols["ts"]), "ts_recv": ts_recv, "seq": row_seq}
    frames = FrameBatch(conn, kind, seq, aux, clock, rs, re_, cols["prod"], cols["side"], cols["px"], cols["sz"],
                        cols["snap"])  # fmt: skip
    trades = _merged_trades(s, x_row, fb)
    if fb is None:
        empty = pa.table({})
        return ParsedBatch(frames, products, l2, trades, empty, empty, counts, quarantine)
    counts[FALLBACK_LINES] += x_row.shape[0]
    counts[FALLBACK_L2] += fb.counts["l2_data"]
    return ParsedBatch(frames, products, l2, trades, fb.tickers, fb.candles, counts, quarantine)


def _trade_table(out: _Out, n: int, names: list[str]) -> pa.Table:
    """The block's trades the scanner read, as ``parse_batch`` makes them (same columns, types
    and order), built once per block and sliced per batch."""
    frame = out.t_frame[:n]
    product = pa.array(out.t_prod[:n]) if n else pa.array([], pa.int32())
    return pa.Table.from_arrays([
        _timestamps(out.t_ts[:n]),
        _timestamps(out.f_recv[frame]),
        pa.array(out.f_seq[frame]),
        pc.take(pa.array(names, pa.string()), product),
        _strings(out.t_ide[:n], out.t_idc),
        _strings(out.t_sidee[:n], out.t_sidec),
        pa.array(out.t_px[:n]),
        pa.array(out.t_sz[:n]),
        pa.array(out.t_snap[:n]),
    ], schema=_TRADE_SCHEMA)  # fmt: skip


def _strings(ends: np.ndarray, chars: np.ndarray) -> pa.Array:
    """A string array over ``chars`` whose values end at ``ends`` (the first starts at 0)."""
    offsets = np.zeros(ends.shape[0] + 1, np.int32)
    offsets[1:] = ends
    data = chars[: int(offsets[-1])].copy()  # its own buffer: the block's arrays are not kept alive by it
    return pa.Array.from_buffers(pa.string(), ends.shape[0], [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _merged_trades(s: _Scanned, x_row: np.ndarray, fb: ParsedBatch | None) -> pa.Table:
    """The batch's trades in line order: the scanner's and DuckDB's (each in line order already)."""
    if fb is None or fb.trades.num_rows == 0:
        return s.trades if s.trades.num_rows or fb is None else fb.trades
    if s.trades.num_rows == 0:
        return fb.trades
    rows = np.concatenate([s.trade_row, x_row[fb.lines["trades"]]])
    order = np.argsort(rows, kind="stable")
    return pa.concat_tables([s.trades, fb.trades]).take(pa.array(order))


def _scanner_rows(s: _Scanned, code_of_form: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The batch's level2 rows when they all come from the scanner (the common case: DuckDB
    reads only trades, tickers and control lines): they are already in line order, so the
    scanner's arrays are used as they are (views of the block's output, never written to)."""
    cols = {"prod": code_of_form[s.prod], "side": s.side, "px": s.px, "sz": s.sz, "snap": s.snap, "ts": s.ts}
    per_frame = s.re - s.rs
    return cols, np.repeat(s.recv, per_frame), np.repeat(s.seq, per_frame)


def _merged_rows(s: _Scanned, pos_s: np.ndarray, pos_f: np.ndarray, fb: ParsedBatch, products: list[str],
                 code_of_form: np.ndarray, rs: np.ndarray, lengths: np.ndarray, clock: np.ndarray,
                 seq: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:  # fmt: skip
    """The batch's level2 rows from both sources, each frame's rows where its line puts them."""
    total = int(rs[-1] + lengths[-1])
    dest_s = _destinations(rs[pos_s], s.rs, s.re)
    cols = {
        "prod": np.empty(total, np.int64), "side": np.empty(total, np.int8), "px": np.empty(total, np.int64),
        "sz": np.empty(total, np.int64), "snap": np.empty(total, np.bool_), "ts": np.empty(total, np.int64),
    }  # fmt: skip
    cols["prod"][dest_s] = code_of_form[s.prod]
    cols["side"][dest_s], cols["px"][dest_s], cols["sz"][dest_s] = s.side, s.px, s.sz
    cols["snap"][dest_s], cols["ts"][dest_s] = s.snap, s.ts
    f = fb.frames
    dest_f = _destinations(rs[pos_f], f.f_rs, f.f_re)
    remap = np.array([products.index(p) for p in fb.products] + [-1], np.int64)
    cols["prod"][dest_f] = remap[f.r_prod]
    cols["side"][dest_f], cols["px"][dest_f], cols["sz"][dest_f] = f.r_side, f.r_px, f.r_sz
    cols["snap"][dest_f] = f.r_snap
    cols["ts"][dest_f] = fb.l2["ts_event"].cast(pa.int64()).to_numpy(zero_copy_only=False)
    frame_of_row = np.repeat(np.arange(lengths.shape[0]), lengths)
    return cols, clock[frame_of_row], seq[frame_of_row]


def _timestamps(ns: np.ndarray) -> pa.Array:
    """int64 ns -> a UTC timestamp array over the same buffer (no cast, no copy)."""
    ns = np.ascontiguousarray(ns, np.int64)
    return pa.Array.from_buffers(_TS_TYPE, ns.shape[0], [None, pa.py_buffer(ns)])


def _destinations(dest_start: np.ndarray, rs: np.ndarray, re_: np.ndarray) -> np.ndarray:
    """For rows grouped by frame (frame k: ``rs[k]:re[k]``, contiguous), where each goes when
    frame k's rows start at ``dest_start[k]``."""
    lengths = re_ - rs
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    frame = np.repeat(np.arange(lengths.shape[0]), lengths)
    return dest_start[frame] + (np.arange(total) - (rs[frame] - rs[0]))


def _products(s: _Scanned, x_row: np.ndarray, fb: ParsedBatch | None,
              names: list[str]) -> tuple[list[str], np.ndarray]:  # fmt: skip
    """The batch's product ids in order of first appearance (as ``parse_batch`` lists them,
    which decides the order books get slots in) and the index of each scanner form."""
    seen: dict[str, tuple[int, int]] = {}  # product -> (row, order within the row)
    forms, first = np.unique(s.event_prod, return_index=True)
    for form, i in zip(forms.tolist(), first.tolist(), strict=True):
        seen[names[form]] = min(seen.get(names[form], (1 << 62, 0)), (int(s.event_row[i]), i))
    if fb is not None and fb.products:
        f = fb.frames
        frame_of_row = np.repeat(np.arange(f.f_conn.shape[0]), f.f_re - f.f_rs)
        for code, product in enumerate(fb.products):
            rows = np.flatnonzero(f.r_prod == code)
            where = (int(x_row[frame_of_row[rows[0]]]), code) if rows.shape[0] else (1 << 61, code)
            seen[product] = min(seen.get(product, (1 << 62, 0)), where)
    products = sorted(seen, key=seen.__getitem__)
    index = {p: i for i, p in enumerate(products)}
    code_of_form = np.array([index.get(name, -1) for name in names] + [-1], np.int64)
    return products, code_of_form


def warm_up() -> None:
    """Load the compiled scanner (numba's cache) now, e.g. before a benchmark's clock starts:
    a level2 line and a trades line, one for each channel's copy of the record parser."""
    line = (b'{"recv_ns":1786309548886219008,"conn":1,"msg":{"channel":"l2_data","sequence_num":1,"events":[{"type":'
            b'"update","product_id":"BTC-USD","updates":[{"side":"bid","event_time":"2026-08-09T21:05:48.5Z",'
            b'"price_level":"1.5","new_quantity":"2"}]}]}}\n'
            b'{"recv_ns":1786309548886219008,"conn":1,"msg":{"channel":"market_trades","sequence_num":2,"events":[{'
            b'"type":"update","trades":[{"product_id":"BTC-USD","trade_id":"1","price":"1.5","size":"2","side":"BUY",'
            b'"time":"2026-08-09T21:05:48.5Z"}]}]}}\n')  # fmt: skip
    scanner = ScanSegment(Path(), Path(), None, 0)
    out = _Out(4, 4, 4, 4)
    meta = np.zeros(l2scan.N_META, np.int64)
    buf = np.frombuffer(line, np.uint8).copy()
    out.scan(buf, buf.shape[0], True, 2, time.time_ns(), scanner, meta)
    if meta[l2scan.M_FRAMES] != 2:  # a trades line not taken would leave its parser to compile later
        raise RuntimeError(f"the scanner took {meta[l2scan.M_FRAMES]} of its 2 warm-up lines")
    l2scan.gather(buf, out.x_a, out.x_b, 0, 0, buf)
