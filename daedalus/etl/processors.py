"""Processors: parsed columns + engine results -> the tables of architecture 3.4.

Each processor is a small, column-at-a-time transform. The two that keep state across
segments (trade de-duplication and bars) keep it small and JSON-able, so it rides in the
checkpoint next to the books.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from daedalus.etl.book import NO_PRICE, BookResult, Samples
from daedalus.etl.output import SCALE, convert_units

TS = pa.timestamp("ns", tz="UTC")
SIDES = pa.array(["bid", "ask"])
TRADE_MEMORY = 1000  # trade ids remembered per product (a re-subscribe repeats the last 100)
BAR_GRACE_NS = 2_000_000_000  # a bar closes when the receive clock is this far past its end
_INT64_MAX = 2**63 - 1


def level2_table(l2: dict, rows: tuple, res: BookResult, strategy: str, options: dict,
                 select: np.ndarray | None = None) -> tuple[pa.Table, np.ndarray]:  # fmt: skip
    """The level2 rows the book kept (not those before a product's first snapshot), or the
    rows ``select`` names, in its order (the kept rows grouped by partition: each array is
    gathered once here rather than the Arrow table taken once per partition)."""
    product, side, price, size, snap = rows
    keep = np.flatnonzero(res.keep) if select is None else select
    all_kept = select is None and keep.shape[0] == product.shape[0]
    pick = (lambda a: a) if all_kept else (lambda a: a[keep])
    bb, ba = pick(res.best_bid), pick(res.best_ask)
    has_bb, has_ba = bb != NO_PRICE, ba != NO_PRICE
    ts_recv = pick(l2["ts_recv"])
    ts_event = l2["ts_event"] if all_kept else pc.take(l2["ts_event"], pa.array(keep))
    cols = {
        "ts_event": ts_event,
        "ts_recv": pa.array(ts_recv, pa.int64()).cast(TS),
        "seq": pa.array(pick(l2["seq"])),
        "side": pc.take(SIDES, pa.array(pick(side))),
        "price": convert_units(pick(price), None, strategy),
        "size": convert_units(pick(size), None, strategy),
        "is_snapshot": pa.array(pick(snap)),
        "best_bid": convert_units(bb, has_bb, strategy),
        "best_ask": convert_units(ba, has_ba, strategy),
    }
    both = has_bb & has_ba
    if options.get("compute_mid_price", True):
        if strategy == "float":
            cols["mid_price"] = pa.array((bb + ba) / (2 * SCALE), mask=~both)
        else:  # exact units cannot hold the half pip: rounded down
            cols["mid_price"] = convert_units((bb + ba) >> 1, both, strategy)
    if options.get("compute_spread", True):
        cols["spread"] = convert_units(ba - bb, both, strategy)
    cols["book_valid"] = pa.array(pick(res.valid))
    return pa.table(cols), pick(product)


def samples_table(samples: Samples, depth: int, strategy: str) -> pa.Table:
    """``book_snapshot_<N>``: one row per product per interval, top N levels a side."""
    ts = pa.array(samples.ts, pa.int64()).cast(TS)
    cols: dict[str, pa.Array] = {"ts_event": ts, "ts_recv": ts}
    width = max(2, len(str(depth - 1)))
    for side, px, sz in (("bid", samples.bid_px, samples.bid_sz), ("ask", samples.ask_px, samples.ask_sz)):
        for level in range(depth):
            present = sz[:, level] != 0
            cols[f"{side}_px_{level:0{width}d}"] = convert_units(np.ascontiguousarray(px[:, level]), present, strategy)
            cols[f"{side}_sz_{level:0{width}d}"] = convert_units(np.ascontiguousarray(sz[:, level]), present, strategy)
    cols["book_valid"] = pa.array(samples.valid)
    return pa.table(cols)


def units_columns(table: pa.Table, names: list[str], strategy: str, rename: dict[str, str] | None = None) -> pa.Table:
    """Convert the int64-unit columns of a parsed table to the decimal strategy."""
    for name in names:
        column = table.column(name).combine_chunks()
        units = column.fill_null(0).to_numpy(zero_copy_only=False)
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        table = table.set_column(table.column_names.index(name), name, convert_units(units, valid, strategy))
    if rename:
        table = table.rename_columns([rename.get(c, c) for c in table.column_names])
    return table


@dataclass
class TradeDeduper:
    """Drops trades already seen, by (product_id, trade_id): every (re-)subscribe replays
    the last 100 trades as a snapshot. Remembers the last ``TRADE_MEMORY`` ids per product.
    Vectorised: a hash lookup per product and batch; a Python loop only for the rare batch
    that repeats an id within itself."""

    seen: dict[str, deque[str]] = field(default_factory=dict)
    duplicates: int = 0

    def filter(self, trades: pa.Table) -> pa.Table:
        if trades.num_rows == 0:
            return trades
        keep = np.ones(trades.num_rows, np.bool_)
        encoded = pc.dictionary_encode(trades.column("product_id").combine_chunks())
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        trade_ids = trades.column("trade_id").combine_chunks()
        for code, product in enumerate(encoded.dictionary.to_pylist()):
            rows = np.flatnonzero(codes == code)
            ids = trade_ids.take(pa.array(rows))
            recent = self.seen.setdefault(product, deque(maxlen=TRADE_MEMORY))
            if recent:
                keep[rows] = ~pc.is_in(ids, value_set=pa.array(recent, pa.string())).to_numpy(zero_copy_only=False)
            if pc.count_distinct(ids).as_py() < len(ids):  # an id repeated inside this batch
                first: set[str] = set()
                for row, trade_id in zip(rows.tolist(), ids.to_pylist(), strict=True):
                    if trade_id in first:
                        keep[row] = False
                    first.add(trade_id)
            kept = ids.filter(pa.array(keep[rows]))
            recent.extend(kept.slice(max(0, len(kept) - TRADE_MEMORY)).to_pylist())
        self.duplicates += int(np.count_nonzero(~keep))
        return trades if keep.all() else trades.filter(pa.array(keep))

    def to_json(self) -> dict:
        return {p: list(ids) for p, ids in self.seen.items()}

    @classmethod
    def from_json(cls, data: dict) -> TradeDeduper:
        return cls({p: deque(ids, maxlen=TRADE_MEMORY) for p, ids in data.items()})


@dataclass
class Bar:
    start: int
    open: int
    high: int
    low: int
    close: int
    volume: int  # units of 1e-8, a Python int: a bar of a cheap token can pass int64 (9.2e10 coins)
    notional: float  # sum of price * size, in quote currency
    count: int
    last_event: int
    last_recv: int

    def merge(self, later: Bar) -> None:
        self.high = max(self.high, later.high)
        self.low = min(self.low, later.low)
        self.close = later.close
        self.volume += later.volume
        self.notional += later.notional
        self.count += later.count
        self.last_event, self.last_recv = later.last_event, later.last_recv


def _trade_order(trade_ids: pa.ChunkedArray) -> np.ndarray:
    """The order of trades that share an exchange time: their numeric trade ids (Coinbase's
    grow with time, while its frames list the newest first), else arrival order."""
    if trade_ids.null_count == 0:
        try:
            return pc.cast(trade_ids, pa.int64()).to_numpy()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # not (all) numbers
            pass
    return np.arange(len(trade_ids))


@dataclass
class BarBuilder:
    """VWAP bars from de-duplicated trades, by exchange time. Open bars ride in the
    checkpoint and are written once complete: when the receive clock (the latest
    ``ts_recv`` seen) is past the bar's end plus a grace for latency. A trade for a bar
    already written is counted as ``late`` and left out of bars (it stays in market_trades)."""

    interval_ns: int
    open_bars: dict[tuple[str, int], Bar] = field(default_factory=dict)
    written_until: dict[str, int] = field(default_factory=dict)
    late: int = 0
    volume_overflows: int = 0  # bars written with a null volume (past int64 units: pips only)

    def add(self, trades: pa.Table, clock_ns: int) -> list[tuple[str, Bar]]:
        """Feed one segment's new trades; returns the bars now complete, in (product, start) order."""
        if trades.num_rows:
            table = trades.filter(pc.and_(pc.is_valid(trades.column("ts_event")), pc.is_valid(trades.column("price"))))
            encoded = pc.dictionary_encode(table.column("product_id").combine_chunks())
            codes = encoded.indices.to_numpy(zero_copy_only=False)

            def column(name: str) -> np.ndarray:
                values = table.column(name).combine_chunks()
                return values.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)

            ts, recv, px, sz = column("ts_event"), column("ts_recv"), column("price"), column("size")
            trade_ids = table.column("trade_id").combine_chunks()
            for code, product in enumerate(encoded.dictionary.to_pylist()):
                rows = np.flatnonzero(codes == code)
                # by time, then by trade id: each product's own ids decide (another product's
                # ids, numeric or not, must not change this product's bars)
                order = _trade_order(trade_ids.take(pa.array(rows)))
                rows = rows[np.lexsort((order, ts[rows]))]
                self._add_product(product, ts[rows], recv[rows], px[rows], sz[rows])
        done = []
        for key in sorted(self.open_bars):
            if key[1] + self.interval_ns + BAR_GRACE_NS <= clock_ns:
                done.append((key[0], self.open_bars.pop(key)))
                self.written_until[key[0]] = max(self.written_until.get(key[0], 0), key[1] + self.interval_ns)
        return done

    def _add_product(self, product, ts, recv, px, sz) -> None:
        starts = ts - ts % self.interval_ns
        fresh = starts >= self.written_until.get(product, -(2**62))
        self.late += int(np.count_nonzero(~fresh))
        ts, recv, px, sz, starts = ts[fresh], recv[fresh], px[fresh], sz[fresh], starts[fresh]
        bounds = np.flatnonzero(np.diff(starts)) + 1
        for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(starts)], strict=True):
            if lo == hi:
                continue
            bar = Bar(int(starts[lo]), int(px[lo]), int(px[lo:hi].max()), int(px[lo:hi].min()), int(px[hi - 1]),
                      _exact_sum(sz[lo:hi]), _notional(px[lo:hi], sz[lo:hi]), int(hi - lo),
                      int(ts[hi - 1]), int(recv[hi - 1]))  # fmt: skip
            current = self.open_bars.get((product, bar.start))
            if current is None:
                self.open_bars[(product, bar.start)] = bar
            else:
                current.merge(bar)

    def table(self, bars: list[tuple[str, Bar]], strategy: str) -> tuple[pa.Table, list[str]]:
        def units(name: str) -> pa.Array:
            return convert_units(np.array([getattr(b, name) for _, b in bars], np.int64), None, strategy)

        volume = self._volume_column([b.volume for _, b in bars], strategy)
        vwap = np.array([b.notional / (b.volume / SCALE) if b.volume else np.nan for _, b in bars])
        vwap_col = (
            pa.array(vwap, mask=np.isnan(vwap))
            if strategy == "float"
            else convert_units(np.rint(np.nan_to_num(vwap) * SCALE).astype(np.int64), ~np.isnan(vwap), strategy)
        )
        table = pa.table({
            "start": pa.array([b.start for _, b in bars], pa.int64()).cast(TS),
            "open": units("open"),
            "high": units("high"),
            "low": units("low"),
            "close": units("close"),
            "volume": volume,
            "vwap": vwap_col,
            "trade_count": pa.array([b.count for _, b in bars], pa.int64()),
            "ts_event": pa.array([b.last_event for _, b in bars], pa.int64()).cast(TS),
            "ts_recv": pa.array([b.last_recv for _, b in bars], pa.int64()).cast(TS),
        })  # fmt: skip
        return table, [p for p, _ in bars]

    def _volume_column(self, volumes: list[int], strategy: str) -> pa.Array:
        """Bar volumes (exact ints) as the strategy's column. Past int64 units, ``float`` and
        ``decimal`` still hold them (decimal exactly); ``pips`` cannot: null, counted."""
        if max(volumes, default=0) <= _INT64_MAX:
            return convert_units(np.array(volumes, np.int64), None, strategy)
        if strategy == "float":
            return pa.array(np.array(volumes, np.float64) / SCALE)
        if strategy == "decimal":
            return pa.array([Decimal(v).scaleb(-8) for v in volumes], pa.decimal128(38, 8))
        self.volume_overflows += sum(v > _INT64_MAX for v in volumes)
        return pa.array([v if v <= _INT64_MAX else None for v in volumes], pa.int64())

    def to_json(self) -> dict:
        # a volume past int64 is written as a string (JSON readers, orjson among them, refuse such ints)
        bars = sorted(self.open_bars.items())
        return {"open": [[p, {**vars(b), "volume": _json_int(b.volume)}] for (p, _), b in bars],
                "written_until": self.written_until, "late": self.late}  # fmt: skip

    @classmethod
    def from_json(cls, interval_ns: int, data: dict) -> BarBuilder:
        bars = {(p, b["start"]): Bar(**{**b, "volume": int(b["volume"])}) for p, b in data.get("open", [])}
        return cls(interval_ns, bars, dict(data.get("written_until", {})), int(data.get("late", 0)))


def _exact_sum(values: np.ndarray) -> int:
    """The sum of int64 values as a Python int: numpy's int64 sum wraps silently past 9.2e18."""
    if values.shape[0] == 0:
        return 0
    if int(np.abs(values).max()) <= _INT64_MAX // values.shape[0]:
        return int(values.sum())
    return sum(values.tolist())


def _json_int(value: int) -> int | str:
    return value if -_INT64_MAX <= value <= _INT64_MAX else str(value)


def _notional(px: np.ndarray, sz: np.ndarray) -> float:
    """Sum of price * size in quote currency. Not ``np.dot``: BLAS splits a long dot product
    over its threads (the last bits then depend on the core count) and those threads then
    spin idle: 4 % of the ETL's CPU on the bench stream. numpy's pairwise sum is neither."""
    return float(((px / SCALE) * (sz / SCALE)).sum())
