"""Coinbase Advanced Trade records -> columns, a whole batch at a time.

Input: one Arrow batch of raw records (:data:`daedalus.etl.reader.RECORD_COLUMNS`).
Output (:class:`ParsedBatch`): the frame list the book engine walks (every record, so
sequence numbers and control lines are seen in order), the level2 rows grouped by frame,
and tables for trades, tickers and candles. Numbers stay strings until they are cast as
whole columns: prices and sizes become exact int64 units of 1e-8, times ns since the epoch.
Nothing here loops over rows in Python except on a batch that holds malformed values.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from daedalus.etl.book import CONNECT, DISCONNECT, FRAME, GAP, OTHER, BookSet, FrameBatch
from daedalus.etl.decode import parse_times, parse_units

UNITS = 100_000_000  # 1e-8: prices and sizes are int64 counts of this
_TS_TYPE = pa.timestamp("ns", tz="UTC")

CHANNELS = ["l2_data", "market_trades", "ticker", "ticker_batch", "candles", "heartbeats", "status", "subscriptions"]
L2, TRADES, TICKER, TICKER_BATCH, CANDLES = 0, 1, 2, 3, 4
_CONTROL = {"gap": GAP, "connect": CONNECT, "disconnect": DISCONNECT}


@dataclass
class ParsedBatch:
    frames: FrameBatch
    l2: dict[str, pa.Array | np.ndarray]  # aligned with frames' rows
    trades: pa.Table
    tickers: pa.Table
    candles: pa.Table
    counts: Counter[str] = field(default_factory=Counter)
    quarantine: list[tuple[int, str]] = field(default_factory=list)  # (line index in the segment, reason)


def parse_batch(batch: pa.RecordBatch, books: BookSet, first_line: int) -> ParsedBatch:
    """Decode one batch of raw records (``first_line`` = segment line index of row 0)."""
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
    _flag_unusable(batch, msg, has_msg, has_event, channel_index, first_line, counts, quarantine)

    distinct, inverse = np.unique(conn_ids, return_inverse=True)
    slots = np.array([books.conn_slot(c) for c in distinct.tolist()], np.int64)[inverse.reshape(-1)]
    flat = _all_events(msg)
    l2_rows, frames_rs, frames_re, l2 = _level2(batch, msg, flat, channel_index, books, recv, seq, counts)
    frames = FrameBatch(slots, kind, seq, aux, recv, frames_rs, frames_re, *l2_rows)
    return ParsedBatch(
        frames,
        l2,
        _trades(msg, flat, channel_index, recv, seq, counts),
        _tickers(msg, flat, channel_index, recv, seq, counts),
        _candles(msg, flat, channel_index, recv, seq, counts),
        counts,
        quarantine,
    )


# ---- level2 ---------------------------------------------------------------------------------
def _level2(batch, msg, flat, channel_index, books, recv, seq, counts):
    """Rows of every l2_data update, in frame order, plus each frame's row range."""
    n = batch.num_rows
    frame_of_row, events, updates = _flatten_events(flat, channel_index == L2, "updates")
    side = pc.struct_field(updates, "side")
    is_offer = pc.equal(side, "offer").fill_null(False).to_numpy(zero_copy_only=False)
    is_bid = pc.equal(side, "bid").fill_null(False).to_numpy(zero_copy_only=False)
    price, price_ok = to_units(pc.struct_field(updates, "price_level"))
    size, size_ok = to_units(pc.struct_field(updates, "new_quantity"))
    ev_of_row = events.parent_of_row
    product = _codes(pc.struct_field(events.values, "product_id"), books)[ev_of_row]
    ok = (is_bid | is_offer) & price_ok & size_ok & (product >= 0)
    snap = pc.equal(pc.struct_field(events.values, "type"), "snapshot").fill_null(False)
    r_snap = snap.to_numpy(zero_copy_only=False)[ev_of_row]
    ts, ts_ok = times_ns(pc.struct_field(updates, "event_time"))
    frame_ts, frame_ts_ok = times_ns(pc.struct_field(msg, "timestamp"))
    ts_ok = ts_ok | frame_ts_ok[frame_of_row]
    ts = np.where(ts_ok, ts, frame_ts[frame_of_row])  # the update's time, else the frame's
    columns = [frame_of_row, product, is_offer, price, size, r_snap, ts, ts_ok]
    if not ok.all():
        counts["bad_level2_updates"] += int(np.count_nonzero(~ok))
        columns = [c[ok] for c in columns]
    frame_of_row, product, is_offer, price, size, r_snap, ts, ts_ok = columns
    rows = (product, is_offer.astype(np.int8), price, size, r_snap)
    frames = np.arange(n)
    rs = np.searchsorted(frame_of_row, frames, "left")
    re = np.searchsorted(frame_of_row, frames, "right")
    l2 = {
        "ts_event": pa.array(ts, pa.int64(), mask=~ts_ok).cast(_TS_TYPE),
        "ts_recv": recv[frame_of_row],
        "seq": seq[frame_of_row],
    }
    return rows, rs.astype(np.int64), re.astype(np.int64), l2


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


def _codes(product: pa.Array, books: BookSet) -> np.ndarray:
    """Book slot of each product id (nulls map to -1 and are filtered by the caller)."""
    encoded = pc.dictionary_encode(product)
    lookup = np.array([books.product_slot(p) for p in encoded.dictionary.to_pylist()] + [-1], np.int64)
    indices = encoded.indices.fill_null(len(lookup) - 1).to_numpy(zero_copy_only=False)
    return lookup[indices]


# ---- trades, tickers, candles ------------------------------------------------------------------
def _trades(msg, flat, channel_index, recv, seq, counts) -> pa.Table:
    frame_of, events, trades = _flatten_events(flat, channel_index == TRADES, "trades")
    is_snapshot = pc.take(pc.equal(pc.struct_field(events.values, "type"), "snapshot"), pa.array(events.parent_of_row))
    table, ok = _item_table(trades, frame_of, recv, seq, ["product_id", "trade_id", "side"], ["price", "size"], counts,
                            "trades", ts_field="time")  # fmt: skip
    return table.append_column("is_snapshot", is_snapshot.fill_null(False).filter(ok))


def _tickers(msg, flat, channel_index, recv, seq, counts) -> pa.Table:
    selected = (channel_index == TICKER) | (channel_index == TICKER_BATCH)
    frame_of, events, tickers = _flatten_events(flat, selected, "tickers")
    numbers = ["price", "best_bid", "best_bid_quantity", "best_ask", "best_ask_quantity", "volume_24_h", "low_24_h",
               "high_24_h"]  # fmt: skip
    frame_ts = to_timestamps(pc.struct_field(msg, "timestamp"))
    table, ok = _item_table(tickers, frame_of, recv, seq, ["product_id"], numbers, counts, "tickers",
                            ts=pc.take(frame_ts, pa.array(frame_of, pa.int64())))  # fmt: skip
    extra = {
        "price_pct_chg_24h": pc.cast(pc.struct_field(tickers, "price_percent_chg_24_h"), pa.float64(), safe=False),
        "is_snapshot": pc.take(
            pc.equal(pc.struct_field(events.values, "type"), "snapshot"), pa.array(events.parent_of_row)
        ).fill_null(False),
        "batch": pa.array(channel_index[frame_of] == TICKER_BATCH),
    }
    for name, column in extra.items():
        table = table.append_column(name, column.filter(ok))
    return table


def _candles(msg, flat, channel_index, recv, seq, counts) -> pa.Table:
    frame_of, _events, candles = _flatten_events(flat, channel_index == CANDLES, "candles")
    frame_ts = pc.take(to_timestamps(pc.struct_field(msg, "timestamp")), pa.array(frame_of, pa.int64()))
    seconds, start_ok = to_units(pc.struct_field(candles, "start"))  # epoch seconds, as a string
    start = pa.array(seconds * (1_000_000_000 // UNITS), pa.int64(), mask=~start_ok).cast(_TS_TYPE)  # null if bad
    table, ok = _item_table(candles, frame_of, recv, seq, ["product_id"], ["open", "high", "low", "close", "volume"],
                            counts, "candles", ts=frame_ts)  # fmt: skip
    return table.add_column(3, "start", start.filter(ok))


def _item_table(items, frame_of, recv, seq, strings, numbers, counts, what, ts_field=None, ts=None):
    """One row per item: ts_event, ts_recv, seq, the string columns, the numbers as units.
    Rows missing a product id or holding an unreadable number are dropped and counted;
    returns (table, kept mask) so callers can align extra columns."""
    cols: dict[str, pa.Array] = {}
    ok = pc.is_valid(pc.struct_field(items, "product_id")).to_numpy(zero_copy_only=False)
    cols["ts_event"] = to_timestamps(pc.struct_field(items, ts_field)) if ts_field else ts
    cols["ts_recv"] = pa.array(recv[frame_of], pa.int64()).cast(_TS_TYPE)
    cols["seq"] = pa.array(seq[frame_of], pa.int64())
    for name in strings:
        cols[name] = pc.struct_field(items, name)
    for name in numbers:
        units, good = to_units(pc.struct_field(items, name), allow_null=name != "price")
        cols[name] = pa.array(units, mask=~good | pc.is_null(pc.struct_field(items, name)).to_numpy(False))
        ok &= good
    if not ok.all():
        counts[f"bad_{what}"] += int(np.count_nonzero(~ok))
    mask = pa.array(ok, pa.bool_())
    return pa.table(cols).filter(mask), mask


# ---- helpers --------------------------------------------------------------------------------
def to_units(strings: pa.Array, allow_null: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Decimal strings -> (int64 units of 1e-8, ok mask). Exact. The compiled parser takes the
    plain decimals; anything else (exponents, junk, more than 8 decimals) goes through
    ``Decimal`` one by one, and what is not an exact number of units is not ok."""
    units, ok, valid = parse_units(strings)
    odd = np.flatnonzero(valid & ~ok)
    if odd.shape[0]:
        slow_units, slow_ok = _units_slow(pc.take(strings, pa.array(odd)).to_pylist(), allow_null)
        units[odd] = slow_units
        ok[odd] = slow_ok
    if allow_null:
        ok |= ~valid
    return units, ok


def _units_slow(values: list[str | None], allow_null: bool) -> tuple[np.ndarray, np.ndarray]:
    units = np.zeros(len(values), np.int64)
    ok = np.zeros(len(values), np.bool_)
    for i, text in enumerate(values):
        if text is None:
            ok[i] = allow_null
            continue
        try:
            scaled = Decimal(text) * UNITS
        except (InvalidOperation, ValueError):
            continue
        if scaled.is_finite() and scaled == scaled.to_integral_value() and -(2**63) <= scaled < 2**63:
            units[i] = int(scaled)
            ok[i] = True
    return units, ok


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


def to_timestamps(strings: pa.Array) -> pa.Array:
    """RFC 3339 strings -> timestamp[ns, UTC]; unreadable values become null."""
    ns, ok = times_ns(strings)
    return pa.array(ns, pa.int64(), mask=~ok).cast(_TS_TYPE)


def _int_column(column: pa.Array, fill: int) -> np.ndarray:
    return column.fill_null(fill).to_numpy(zero_copy_only=False).astype(np.int64, copy=True)


def _flag_unusable(batch, msg, has_msg, has_event, channel_index, first_line, counts, quarantine) -> None:
    """Lines that carry no market data we understand go to quarantine with the reason."""
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
