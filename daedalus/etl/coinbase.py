"""Coinbase Advanced Trade records -> columns, a whole batch at a time.

Input: one Arrow batch of raw records (:data:`daedalus.etl.reader.RECORD_COLUMNS`).
Output (:class:`ParsedBatch`): the frame list the book engine walks (every record, so
sequence numbers and control lines are seen in order), the level2 rows grouped by frame,
and tables for trades, tickers and candles. Parsing needs no book state (so it can run in a
worker): level2 rows name their product by an index into ``ParsedBatch.products`` and frames
carry their connection id; :meth:`daedalus.etl.book.BookSet.bind` maps both onto book slots.
Numbers stay strings until they are cast as whole columns: prices and sizes become exact
int64 units of 1e-8, times ns since the epoch.

Bad values. The unit of quarantine is the line: a record holding a value the feed never
sends (a product id that is not one, a price or size that is not a plain ASCII decimal of
the right sign, a level2 side other than bid/offer, a receive time outside the plausible
window) goes to quarantine whole, with its reason, counted once under
``quarantined_<family>``; none of its rows reach a table or a book, and every other line
of the segment is processed. A quarantined level2 frame is lost book data: it always counts
a gap on its connection's books and invalidates them until the next snapshot, whether it
carries a ``sequence_num`` or not; other quarantined frames keep their place in the
sequence. The receive time is checked on frames only: a control line's time is not data.
Exchange times are not a reason to quarantine: a missing, unreadable or implausible one
falls back to the frame's ``timestamp``, then to the receive time (counted as
``ts_event_fallbacks``), never to 1970.

Checks are column operations; Python runs only over the values that failed one.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from daedalus.config import PRODUCT_ID_PATTERN  # the config's rule: '', '.', 'BTC/USD', NUL, 10,000 chars fail
from daedalus.etl.book import CONNECT, DISCONNECT, FRAME, GAP, LOST, OTHER, FrameBatch
from daedalus.etl.decode import parse_times, parse_units

UNITS = 100_000_000  # 1e-8: prices and sizes are int64 counts of this
_TS_TYPE = pa.timestamp("ns", tz="UTC")

CHANNELS = ["l2_data", "market_trades", "ticker", "ticker_batch", "candles", "heartbeats", "status", "subscriptions"]
L2, TRADES, TICKER, TICKER_BATCH, CANDLES = 0, 1, 2, 3, 4
_CONTROL = {"gap": GAP, "connect": CONNECT, "disconnect": DISCONNECT}

EARLIEST_NS = 1_230_768_000 * 10**9  # 2009-01-01T00:00:00Z: no crypto market data is older
CLOCK_SLACK_NS = 86_400 * 10**9  # a receive time a day past now, or an exchange time a day past its receipt: wrong
#: level2 ``side`` as sent -> 0 bid, 1 ask. Coinbase sends bid/offer; ``ask`` (the output
#: column's own word) is an unambiguous alias. ``buy``/``sell`` are not: in trades they name
#: the maker side, so a level2 row saying them is quarantined rather than guessed.
L2_SIDES = ["bid", "offer", "ask"]
_L2_SIDE_CODES = np.array([0, 1, 1, -1], np.int8)  # last: not in L2_SIDES
_SIGNED_DECIMAL = r"^-?[0-9]+(\.[0-9]+)?$"  # price_percent_chg_24_h, the feed's one signed number
_NULL_STRING = pa.scalar(None, pa.string())
#: the numbers of a ticker and of a candle, as the feed names them (cast by the ETL's writer too)
TICKER_NUMBERS = ["price", "best_bid", "best_bid_quantity", "best_ask", "best_ask_quantity", "volume_24_h",
                  "low_24_h", "high_24_h"]  # fmt: skip
CANDLE_NUMBERS = ["open", "high", "low", "close", "volume"]


@dataclass
class ParsedBatch:
    frames: FrameBatch  # r_prod: index into ``products``; f_conn: connection ids (not yet book slots)
    products: list[str]
    l2: dict[str, pa.Array | np.ndarray]  # aligned with frames' rows
    trades: pa.Table
    tickers: pa.Table
    candles: pa.Table
    counts: Counter[str] = field(default_factory=Counter)
    quarantine: list[tuple[int, str]] = field(default_factory=list)  # (line index in the segment, reason)
    #: line (in the batch) of each row of trades, tickers and candles: lets a caller parse
    #: several batches' lines in one call and cut the tables back per batch
    lines: dict[str, np.ndarray] = field(default_factory=dict)


class Rejects:
    """The lines of a batch that hold a bad value. A line is rejected whole, once: its first
    reason is kept and counted under ``quarantined_<family>``. ``bad`` starts with the lines
    quarantined already for another reason (not JSON, unknown channel, ...): none of their
    values reach a table or a book either, and they are not counted again."""

    def __init__(self, already: np.ndarray) -> None:
        self.bad = already.copy()
        self.reasons: list[tuple[int, str, str]] = []  # (line in batch, family, reason)

    def add(self, line_of: np.ndarray, failed: np.ndarray, family: str, describe: Callable[[int], str]) -> None:
        """Value ``i`` failed a check when ``failed[i]``; it belongs to line ``line_of[i]``;
        ``describe(i)`` says why (called only for the first failed value of a new line)."""
        values = np.flatnonzero(failed)
        if values.shape[0] == 0:
            return
        lines = line_of[values]
        new = ~self.bad[lines]
        lines, first = np.unique(lines[new], return_index=True)
        for value, line in zip(values[new][first].tolist(), lines.tolist(), strict=True):
            self.reasons.append((line, family, describe(value)))
        self.bad[lines] = True

    def report(self, first_line: int, counts: Counter[str]) -> list[tuple[int, str]]:
        for _, family, _ in self.reasons:
            counts[f"quarantined_{family}"] += 1
        return [(first_line + line, reason) for line, _, reason in self.reasons]


@dataclass
class _Batch:
    """What every channel parser needs: the decoded columns, per frame, and the rejects."""

    msg: pa.Array
    flat: _Events
    channel_index: np.ndarray
    recv: np.ndarray  # recv_ns per line
    seq: np.ndarray
    frame_time: np.ndarray  # the frame's timestamp, else recv_ns
    frame_time_ok: np.ndarray  # False where frame_time fell back to recv_ns
    counts: Counter[str]
    rejects: Rejects

    def check_products(self, line_of: np.ndarray, ids: pa.Array, selected: np.ndarray | None = None) -> None:
        """Reject the lines whose (selected) product ids do not look like Coinbase's."""
        ok = pc.match_substring_regex(ids, PRODUCT_ID_PATTERN).fill_null(False).to_numpy(zero_copy_only=False)
        bad = ~ok if selected is None else selected & ~ok
        self.rejects.add(line_of, bad, "bad_product", lambda i: f"bad product_id {_show(ids[i].as_py())}")

    def units(self, line_of: np.ndarray, items: pa.StructArray, name: str, where: str, *, positive: bool = False,
              required: bool = True) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Field ``name`` of ``items`` as int64 units of 1e-8 and its validity. A value that is
        not the feed's plain ``digits[.digits]`` (at most 8 decimals that matter, within int64
        units), or is 0 where ``positive``, or is missing where ``required``, rejects its line.
        Rounding is never done: a finer value is not a Coinbase number."""
        strings = pc.struct_field(items, name)
        units, ok, valid = parse_units(strings, plain=True)
        if positive:
            ok &= units > 0
        bad = ~ok if required else valid & ~ok
        want = "a plain decimal > 0" if positive else "a plain decimal"

        def describe(i: int) -> str:
            value = strings[i].as_py()
            return f"{where} {name} missing" if value is None else f"{where} {name} {_show(value)} is not {want}"

        self.rejects.add(line_of, bad, "bad_number", describe)
        return units, valid

    def event_times(self, strings: pa.Array, frame_of: np.ndarray, keep: np.ndarray) -> pa.Array:
        """Exchange times of items (``frame_of``: their frames), each falling back to its
        frame's time when missing or implausible; fallbacks among kept items are counted."""
        ns, ok = _plausible_times(strings, self.recv[frame_of])
        ns = np.where(ok, ns, self.frame_time[frame_of])
        self.counts["ts_event_fallbacks"] += int(np.count_nonzero(~ok & keep))
        return pa.array(ns, pa.int64()).cast(_TS_TYPE)

    def frame_times(self, frame_of: np.ndarray, keep: np.ndarray) -> pa.Array:
        """The frame's time for each item (tickers, candles carry no time of their own)."""
        self.counts["ts_event_fallbacks"] += int(np.count_nonzero(~self.frame_time_ok[frame_of] & keep))
        return pa.array(self.frame_time[frame_of], pa.int64()).cast(_TS_TYPE)


def parse_batch(batch: pa.RecordBatch, first_line: int, now_ns: int | None = None) -> ParsedBatch:
    """Decode one batch of raw records (``first_line`` = segment line index of row 0;
    ``now_ns``: the wall clock receive times are checked against, default now)."""
    n = batch.num_rows
    counts: Counter[str] = Counter()
    quarantine: list[tuple[int, str]] = []
    recv = _int_column(batch.column("recv_ns"), -1)
    conn_ids = _int_column(batch.column("conn"), 0)
    msg = batch.column("msg")
    event = batch.column("event")
    channel = pc.struct_field(msg, "channel")
    channel_index = pc.index_in(channel, value_set=pa.array(CHANNELS)).to_numpy(zero_copy_only=False)
    channel_index = np.where(np.isnan(channel_index), -1, channel_index).astype(np.int64)
    has_msg = msg.is_valid().to_numpy(zero_copy_only=False)
    has_event = event.is_valid().to_numpy(zero_copy_only=False)

    kind = np.full(n, OTHER, np.int8)
    kind[has_msg] = FRAME
    for name, code in _CONTROL.items():
        kind[pc.equal(event, name).fill_null(False).to_numpy(zero_copy_only=False)] = code
    seq = _int_column(pc.struct_field(msg, "sequence_num"), -1)
    seq[~has_msg] = -1
    aux = _int_column(batch.column("received"), -1)

    for i, ch in enumerate(CHANNELS):
        counts[ch] = int(np.count_nonzero(channel_index == i))
    counts["control"] = int(np.count_nonzero(has_event))
    counts["overflow_dropped"] = int(pc.sum(batch.column("dropped")).as_py() or 0)
    counts["gap_lines"] = int(np.count_nonzero(kind == GAP))
    unusable = _flag_unusable(batch, msg, has_msg, has_event, channel_index, first_line, counts, quarantine)

    rejects = Rejects(unusable)
    now = time.time_ns() if now_ns is None else now_ns
    recv_ok = (recv >= EARLIEST_NS) & (recv <= now + CLOCK_SLACK_NS)
    rejects.add(np.arange(n), has_msg & ~recv_ok, "bad_time",
                lambda i: f"receive time out of range: recv_ns={recv[i]}")  # fmt: skip
    frame_time, frame_time_ok = _plausible_times(pc.struct_field(msg, "timestamp"), recv)
    frame_time = np.where(frame_time_ok, frame_time, recv)
    parts = _Batch(msg, _all_events(msg), channel_index, recv, seq, frame_time, frame_time_ok, counts, rejects)

    l2_rows, frames_rs, frames_re, l2, products = _level2(parts)
    trades, trade_lines = _trades(parts)
    tickers, ticker_lines = _tickers(parts)
    candles, candle_lines = _candles(parts)

    kind[rejects.bad & ~unusable & (channel_index == L2)] = LOST  # its updates are missing from the books
    quarantine = sorted(quarantine + rejects.report(first_line, counts))

    # The books read the clock only on level2 frames with rows (never rejected), the bars only
    # its maximum: a bad receive time must not move either.
    clock = np.where(recv_ok, recv, 0)
    frames = FrameBatch(conn_ids, kind, seq, aux, clock, frames_rs, frames_re, *l2_rows)
    lines = {"trades": trade_lines, "tickers": ticker_lines, "candles": candle_lines}
    return ParsedBatch(frames, products, l2, trades, tickers, candles, counts, quarantine, lines)


# ---- level2 ---------------------------------------------------------------------------------
def _level2(b: _Batch):
    """Rows of every l2_data update of the lines kept, in frame order, plus each frame's row range."""
    if not (b.channel_index == L2).any():  # e.g. the lines the compiled scanner hands back: ~2.5 ms of Arrow saved
        return _no_level2(b)
    return _level2_rows(b)


def _level2_rows(b: _Batch):
    n = b.recv.shape[0]
    l2_frames = b.channel_index == L2
    frame_of_row, events, updates = _flatten_events(b.flat, l2_frames, "updates")
    ev_of_row = events.parent_of_row
    ev_product = pc.struct_field(b.flat.values, "product_id")
    l2_event = l2_frames[b.flat.parent]
    b.check_products(b.flat.parent, ev_product, l2_event)
    side_text = pc.struct_field(updates, "side")
    side_index = pc.index_in(side_text, value_set=pa.array(L2_SIDES)).fill_null(len(L2_SIDES))
    side = _L2_SIDE_CODES[side_index.to_numpy(zero_copy_only=False)]
    b.rejects.add(frame_of_row, side < 0, "bad_side",
                  lambda i: f"level2 side {_show(side_text[i].as_py())} is not bid, offer or ask")  # fmt: skip
    price, _ = b.units(frame_of_row, updates, "price_level", "level2", positive=True)
    size, _ = b.units(frame_of_row, updates, "new_quantity", "level2")

    keep = ~b.rejects.bad[frame_of_row]
    kept_events = pa.array(l2_event & ~b.rejects.bad[b.flat.parent])  # only they get a book slot
    codes, products = _codes(pc.if_else(kept_events, ev_product, _NULL_STRING))
    product = codes[ev_of_row]
    snap = pc.equal(pc.struct_field(events.values, "type"), "snapshot").fill_null(False)
    r_snap = snap.to_numpy(zero_copy_only=False)[ev_of_row]
    ts = b.event_times(pc.struct_field(updates, "event_time"), frame_of_row, keep)
    columns = [frame_of_row, product, side, price, size, r_snap]
    if not keep.all():
        columns = [c[keep] for c in columns]
        ts = ts.filter(pa.array(keep))
    frame_of_row, product, side, price, size, r_snap = columns
    rows = (product, side, price, size, r_snap)
    frames = np.arange(n)
    rs = np.searchsorted(frame_of_row, frames, "left")
    re_ = np.searchsorted(frame_of_row, frames, "right")
    l2 = {"ts_event": ts, "ts_recv": b.recv[frame_of_row], "seq": b.seq[frame_of_row]}
    return rows, rs.astype(np.int64), re_.astype(np.int64), l2, products


def _no_level2(b: _Batch):
    """What :func:`_level2_rows` returns for a batch without level2 frames (no rows, no products)."""
    n = b.recv.shape[0]
    empty = np.zeros(0, np.int64)
    rows = (empty, np.zeros(0, np.int8), empty.copy(), empty.copy(), np.zeros(0, np.bool_))
    l2 = {"ts_event": pa.array(empty, pa.int64()).cast(_TS_TYPE), "ts_recv": empty.copy(), "seq": empty.copy()}
    return rows, np.zeros(n, np.int64), np.zeros(n, np.int64), l2, []


@dataclass
class _Events:
    values: pa.StructArray  # every event of the batch, flattened
    parent: np.ndarray  # frame index (in the batch) of each event
    parent_of_row: np.ndarray | None = None  # event index of each flattened item


def _all_events(msg: pa.Array) -> _Events:
    """``msg.events`` of every frame flattened once per batch (no copy of the nested data)."""
    events = pc.struct_field(msg, "events")
    return _Events(pc.list_flatten(events), pc.list_parent_indices(events).to_numpy())


def _flatten_events(flat: _Events, selected: np.ndarray, items: str) -> tuple[np.ndarray, _Events, pa.StructArray]:
    """``events[].<items>[]`` of the selected frames: (frame of each item, events, items).
    Only frames of the matching channel carry such lists, so the filter is a no-op unless a
    frame of another channel holds them."""
    lists = pc.struct_field(flat.values, items)
    item_parent = pc.list_parent_indices(lists).to_numpy()
    values = pc.list_flatten(lists)
    frame_of = flat.parent[item_parent]
    wanted = selected[frame_of]
    if not wanted.all():
        values = values.filter(pa.array(wanted))
        item_parent, frame_of = item_parent[wanted], frame_of[wanted]
    return frame_of, _Events(flat.values, flat.parent, item_parent), values


def _codes(product: pa.Array) -> tuple[np.ndarray, list[str]]:
    """Index of each product id into the returned names, in order of first appearance
    (nulls map to -1 and are filtered by the caller)."""
    encoded = pc.dictionary_encode(product)
    return encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary.to_pylist()


# ---- trades, tickers, candles ------------------------------------------------------------------
def _trades(b: _Batch) -> tuple[pa.Table, np.ndarray]:
    frame_of, events, trades = _flatten_events(b.flat, b.channel_index == TRADES, "trades")
    b.check_products(frame_of, pc.struct_field(trades, "product_id"))
    price, _ = b.units(frame_of, trades, "price", "market_trades", positive=True)
    size, _ = b.units(frame_of, trades, "size", "market_trades")
    keep = ~b.rejects.bad[frame_of]
    is_snapshot = pc.take(pc.equal(pc.struct_field(events.values, "type"), "snapshot"), pa.array(events.parent_of_row))
    table = pa.table({
        "ts_event": b.event_times(pc.struct_field(trades, "time"), frame_of, keep),
        **_frame_columns(b, frame_of),
        **{name: pc.struct_field(trades, name) for name in ("product_id", "trade_id", "side")},
        "price": pa.array(price),
        "size": pa.array(size),
        "is_snapshot": is_snapshot.fill_null(False),
    })  # fmt: skip
    return _kept(table, keep, frame_of)


def _tickers(b: _Batch) -> tuple[pa.Table, np.ndarray]:
    selected = (b.channel_index == TICKER) | (b.channel_index == TICKER_BATCH)
    frame_of, events, tickers = _flatten_events(b.flat, selected, "tickers")
    b.check_products(frame_of, pc.struct_field(tickers, "product_id"))
    numbers = {}
    for name in TICKER_NUMBERS:  # the price is required and > 0; the others may be missing (null)
        is_price = name == "price"
        units, valid = b.units(frame_of, tickers, name, "ticker", positive=is_price, required=is_price)
        numbers[name] = pa.array(units, mask=~valid)
    pct = pc.struct_field(tickers, "price_percent_chg_24_h")
    pct_ok = pc.match_substring_regex(pct, _SIGNED_DECIMAL).fill_null(True).to_numpy(zero_copy_only=False)
    b.rejects.add(frame_of, ~pct_ok, "bad_number",
                  lambda i: f"ticker price_percent_chg_24_h {_show(pct[i].as_py())} is not a decimal")  # fmt: skip
    keep = ~b.rejects.bad[frame_of]
    pct = pc.if_else(pa.array(pct_ok), pct, _NULL_STRING)  # only rejected lines lose a value here
    table = pa.table({
        "ts_event": b.frame_times(frame_of, keep),
        **_frame_columns(b, frame_of),
        "product_id": pc.struct_field(tickers, "product_id"),
        **numbers,
        "price_pct_chg_24h": pc.cast(pct, pa.float64()),
        "is_snapshot": pc.take(pc.equal(pc.struct_field(events.values, "type"), "snapshot"),
                               pa.array(events.parent_of_row)).fill_null(False),
        "batch": pa.array(b.channel_index[frame_of] == TICKER_BATCH),
    })  # fmt: skip
    return _kept(table, keep, frame_of)


def _candles(b: _Batch) -> tuple[pa.Table, np.ndarray]:
    frame_of, _events, candles = _flatten_events(b.flat, b.channel_index == CANDLES, "candles")
    b.check_products(frame_of, pc.struct_field(candles, "product_id"))
    seconds, _ = b.units(frame_of, candles, "start", "candles")  # epoch seconds, as a string
    latest = (b.recv[frame_of] + CLOCK_SLACK_NS) // (1_000_000_000 // UNITS)
    start_ok = (seconds >= EARLIEST_NS // (1_000_000_000 // UNITS)) & (seconds <= latest)
    b.rejects.add(frame_of, ~start_ok, "bad_time", lambda i: f"candles start {seconds[i] // UNITS} s is out of range")
    numbers = {}
    for name in CANDLE_NUMBERS:
        units, valid = b.units(frame_of, candles, name, "candles", positive=name != "volume", required=False)
        numbers[name] = pa.array(units, mask=~valid)
    keep = ~b.rejects.bad[frame_of]
    start = np.where(start_ok, seconds, 0) * (1_000_000_000 // UNITS)
    table = pa.table({
        "ts_event": b.frame_times(frame_of, keep),
        **_frame_columns(b, frame_of),
        "start": pa.array(start, pa.int64()).cast(_TS_TYPE),
        "product_id": pc.struct_field(candles, "product_id"),
        **numbers,
    })  # fmt: skip
    return _kept(table, keep, frame_of)


def _frame_columns(b: _Batch, frame_of: np.ndarray) -> dict[str, pa.Array]:
    return {"ts_recv": pa.array(b.recv[frame_of], pa.int64()).cast(_TS_TYPE), "seq": pa.array(b.seq[frame_of])}


def _kept(table: pa.Table, keep: np.ndarray, frame_of: np.ndarray) -> tuple[pa.Table, np.ndarray]:
    """The rows of lines not rejected, and the line of each."""
    return (table, frame_of) if keep.all() else (table.filter(pa.array(keep)), frame_of[keep])


def _show(value: str | None, limit: int = 40) -> str:
    """A value for a reason line: repr'd (so NUL, spaces and empties are visible), truncated."""
    if value is None:
        return "null"
    return repr(value[:limit]) + (f"... ({len(value):,} chars)" if len(value) > limit else "")


def _plausible_times(strings: pa.Array, recv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RFC 3339 exchange times -> (ns, ok): ok only when readable, from 2009 on and not more
    than a day after their receipt."""
    ns, ok = times_ns(strings)
    ok &= (ns >= EARLIEST_NS) & (ns <= recv + CLOCK_SLACK_NS)
    return ns, ok


# ---- helpers --------------------------------------------------------------------------------
def times_ns(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """RFC 3339 strings -> (ns since the epoch, ok). The compiled parser takes the feed's UTC
    form; anything else goes through Arrow's cast one value at a time."""
    ns, ok, valid = parse_times(strings)
    for i in np.flatnonzero(valid & ~ok).tolist():
        try:
            ns[i] = pc.cast(strings.slice(i, 1), _TS_TYPE)[0].value
            ok[i] = True
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    return ns, ok


def _int_column(column: pa.Array, fill: int) -> np.ndarray:
    return column.fill_null(fill).to_numpy(zero_copy_only=False).astype(np.int64, copy=True)


def _flag_unusable(batch, msg, has_msg, has_event, channel_index, first_line, counts, quarantine) -> np.ndarray:
    """Lines that carry no market data we understand go to quarantine with the reason;
    returns their mask."""
    raw = batch.column("raw").is_valid().to_numpy(zero_copy_only=False)
    msg_type = pc.struct_field(msg, "type")
    is_error = pc.equal(msg_type, "error").fill_null(False).to_numpy(zero_copy_only=False)
    unknown = has_msg & (channel_index < 0) & ~is_error
    nothing = ~has_msg & ~has_event & ~raw
    counts["undecodable_frames"] = int(np.count_nonzero(raw))
    counts["exchange_errors"] = int(np.count_nonzero(is_error))
    counts["unknown_channels"] = int(np.count_nonzero(unknown))
    counts["unrecognised_records"] = int(np.count_nonzero(nothing))
    messages = pc.struct_field(msg, "message")
    channels = pc.struct_field(msg, "channel")
    for i in np.flatnonzero(raw | is_error | unknown | nothing).tolist():
        if raw[i]:
            reason = "frame is not JSON"
        elif is_error[i]:
            reason = f"exchange error: {messages[i].as_py()}"
        elif unknown[i]:
            reason = f"unknown channel {channels[i].as_py()!r}"
        else:
            reason = "record has neither msg, event nor raw"
        quarantine.append((first_line + i, reason))
    return raw | is_error | unknown | nothing
