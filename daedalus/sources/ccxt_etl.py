"""The ccxt ETL parser: one raw segment (Parquet or ndjson) -> ``processed/ccxt`` tables.

Called by the ETL job exactly like the Coinbase ``SegmentRun`` (claim, commit, checkpoint and
idempotence are the job's)::

    run = CcxtSegmentRun(job, key, state).run(path, max_object)
    run.files, run.rows, run.counts, run.state, run.quarantine_lines(path)

Outputs, architecture 3.4 conventions (``ts_event``/``ts_recv`` as timestamp[ns, UTC], prices and
sizes in the configured ``decimal_strategy``), under
``processed/ccxt/{ticker,trades,orderbook}/exchange=<id>/symbol=<BASE-QUOTE>/date=YYYY-MM-DD/``:

- ``trades``: ts_event, ts_recv, symbol_unified, trade_id, price, size, side, taker_or_maker,
  order_id, type; de-duplicated by (exchange, symbol, trade id) across segments (the
  checkpoint's :class:`TradeDeduper`); trades without an id are all kept.
- ``ticker``: ts_event, ts_recv, symbol_unified, price (ccxt ``last``), best_bid, best_bid_size,
  best_ask, best_ask_size, open, high, low, close, vwap, volume_24h (``baseVolume``),
  quote_volume_24h, change, percentage (a percentage, always float64).
- ``orderbook``: ts_event, ts_recv, symbol_unified, nonce, top-N levels as ``bid_px_00..``,
  ``bid_sz_..``, ``ask_px_..``, ``ask_sz_..`` (N = ``etl.channels.book_snapshot.levels``, the names
  of Coinbase's ``book_snapshot_<N>``; nulls where the book is shallower), best_bid, best_ask,
  mid_price, spread (null unless both sides have a level), book_valid (False when a side is
  empty or the book is crossed, best bid >= best ask).

Every column is computed on whole Arrow/numpy columns; the only per-row Python is the ndjson
reader's, which the format forces (:mod:`daedalus.sources.ccxt_raw`).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from daedalus.capture.record_writer import TS
from daedalus.capture.records import iter_lines
from daedalus.etl.output import SCALE, PartitionedWriter, convert_units, discard
from daedalus.etl.state import EtlState
from daedalus.layout import segment_stem, symbol_component
from daedalus.logs import get_logger
from daedalus.sources.ccxt_raw import RawSegmentReader, RecordGroup

log = get_logger(__name__)

PARTITION_COLS = ["exchange", "symbol", "date"]
#: |value| from which value * 1e8 no longer fits int64: such a number (a 24 h quote volume in
#: a small currency) stays exact in ``float`` and becomes null in ``pips``/``decimal`` (counted)
MAX_UNITS_VALUE = (2**63 - 1) / SCALE

# (output column, raw column) of the ticker; all but ``percentage`` are prices or sizes
TICKER_COLUMNS = (("price", "last"), ("best_bid", "bid"), ("best_bid_size", "bid_volume"), ("best_ask", "ask"),
                  ("best_ask_size", "ask_volume"), ("open", "open"), ("high", "high"), ("low", "low"),
                  ("close", "close"), ("vwap", "vwap"), ("volume_24h", "base_volume"),
                  ("quote_volume_24h", "quote_volume"), ("change", "change"))  # fmt: skip


def output_stem(key: str) -> str:
    """The output files' stem for a raw segment: its own stem for Parquet, ``<stem>-ndjson`` for
    ndjson, so switching ``raw_format`` within an hour (both formats restart their counters)
    never makes two segments claim the same output file."""
    return segment_stem(key) if key.endswith(".parquet") else f"{segment_stem(key)}-ndjson"


class CcxtSegmentRun:
    """One pass over one raw ccxt segment: record groups -> tables -> partitioned writers."""

    def __init__(self, job: Any, key: str, state: EtlState) -> None:
        etl = job.config.etl
        self.job, self.key, self.state = job, key, state
        self.strategy: str = etl.decimal_strategy
        self.depth: int = etl.channels.book_snapshot.levels
        self.compression: str = etl.compression
        self.stem = output_stem(key)
        self.metadata = {
            "daedalus.source": job.source,
            "daedalus.segment": key,
            "daedalus.decimal_strategy": self.strategy,
            "daedalus.decimal_scale": "" if self.strategy == "float" else str(SCALE),
        }
        self.writers: dict[tuple[str, str], PartitionedWriter] = {}  # (channel, exchange)
        self.rows: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.rejected: list[tuple[int, str]] = []  # (line index, reason), ndjson only
        self.files: list[Path] = []

    def run(self, path: Path, max_object: int) -> CcxtSegmentRun:
        """Process ``path``. ``max_object`` (the job's JSON object limit for DuckDB) does not
        apply: ndjson lines are read one by one, whatever their size."""
        reader = RawSegmentReader(path, self.key)
        duplicates_before = self.state.trades.duplicates
        try:
            for group in reader:
                self._group(group)
                self.job.beat()
        except BaseException:
            self._abandon()
            raise
        for (channel, _), writer in self.writers.items():
            self.files += writer.close()
            if writer.rows:
                self.rows[channel] += writer.rows
        self.counts.update(reader.counts)
        self.rejected = reader.rejected
        self.counts["duplicate_trades"] += self.state.trades.duplicates - duplicates_before
        self.state.trades.duplicates = 0
        return self

    def quarantine_lines(self, path: Path) -> list[tuple[str, bytes]]:
        """``(reason, original line)`` of every rejected ndjson line (one more pass over the
        file, only when there is one)."""
        if not self.rejected:
            return []
        wanted = dict(self.rejected)
        return [(wanted[index], line) for index, line in enumerate(iter_lines(path)) if index in wanted]

    # ---- per group --------------------------------------------------------------------------

    def _group(self, group: RecordGroup) -> None:
        batch = group.batch
        if batch.num_rows == 0:
            return
        if group.channel == "trades":
            batch = self._new_trades(group)
            if batch.num_rows == 0:
                return
        ts_event, ts_recv = self._times(batch)
        symbol = pa.repeat(pa.scalar(group.symbol, pa.string()), batch.num_rows)
        head = {"ts_event": ts_event, "ts_recv": ts_recv, "symbol_unified": symbol}
        if group.channel == "trades":
            columns = head | self._trade_columns(batch)
        elif group.channel == "ticker":
            columns = head | self._ticker_columns(batch)
        else:
            columns = head | self._book_columns(batch)
        self._write(group, pa.table(columns), ts_recv)

    def _times(self, batch: pa.RecordBatch) -> tuple[pa.Array, pa.Array]:
        """``(ts_event, ts_recv)``; ts_event falls back to ts_recv where ccxt gave no timestamp."""
        ts_recv = batch.column("ts_recv").cast(TS)
        ts_event = batch.column("ts_event")
        if ts_event.null_count:
            self.counts["ts_event_fallbacks"] += ts_event.null_count
            ts_event = pc.coalesce(ts_event, ts_recv)
        return ts_event.cast(TS), ts_recv

    def _new_trades(self, group: RecordGroup) -> pa.RecordBatch:
        """The group's trades not seen before, by (exchange, symbol, trade id); the deduper's
        ``product_id`` key is ``exchange|symbol``, built for the filter only."""
        batch = group.batch
        ids = batch.column("trade_id")
        rows = np.flatnonzero(ids.is_valid().to_numpy(zero_copy_only=False))
        if rows.shape[0] == 0:
            return batch
        n = rows.shape[0]
        product = pa.repeat(pa.scalar(f"{group.exchange}|{group.symbol}", pa.string()), n)
        keyed = pa.table({"product_id": product, "trade_id": ids.take(pa.array(rows)), "row": pa.array(rows)})
        kept = self.state.trades.filter(keyed)
        if kept.num_rows == n:
            return batch
        keep = np.ones(batch.num_rows, np.bool_)
        keep[rows] = False
        keep[kept.column("row").to_numpy()] = True
        return batch.filter(pa.array(keep))

    def _trade_columns(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        return {
            "trade_id": batch.column("trade_id"),
            "price": self._number(batch.column("price")),
            "size": self._number(batch.column("amount")),
            "side": batch.column("side"),
            "taker_or_maker": batch.column("taker_or_maker"),
            "order_id": batch.column("order_id"),
            "type": batch.column("type"),
        }

    def _ticker_columns(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        columns = {name: self._number(batch.column(raw)) for name, raw in TICKER_COLUMNS}
        columns["percentage"] = batch.column("percentage")
        return columns

    def _book_columns(self, batch: pa.RecordBatch) -> dict[str, pa.Array]:
        """Top-N levels a side from the ``list<struct<price, amount>>`` columns, through the
        lists' offsets (numpy gathers, no per-row Python); best bid/ask are level 0 (ccxt sorts
        bids down, asks up)."""
        columns: dict[str, pa.Array] = {"nonce": batch.column("nonce")}
        width = max(2, len(str(self.depth - 1)))
        best: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for side in ("bid", "ask"):
            levels = _Levels(batch.column(f"{side}s"))
            for level in range(self.depth):
                (px, sz), present = levels.at(level), levels.present(level)
                px_units, px_valid = self._units(px, present)
                columns[f"{side}_px_{level:0{width}d}"] = self._convert(px, present, px_units, px_valid)
                columns[f"{side}_sz_{level:0{width}d}"] = self._number_from(sz, present)
                if level == 0:
                    best[side] = (px_units, px_valid)
        (bb, has_bb), (ba, has_ba) = best["bid"], best["ask"]
        both = has_bb & has_ba
        columns["best_bid"] = convert_units(bb, has_bb, self.strategy)
        columns["best_ask"] = convert_units(ba, has_ba, self.strategy)
        if self.strategy == "float":
            columns["mid_price"] = pa.array((bb + ba) / (2 * SCALE), pa.float64(), mask=~both)
        else:  # exact units cannot hold the half pip: rounded down, as Coinbase's level2 does (and
            # written so that prices near the int64 limit of units cannot overflow)
            columns["mid_price"] = convert_units(bb + ((ba - bb) >> 1), both, self.strategy)
        columns["spread"] = convert_units(ba - bb, both, self.strategy)
        columns["book_valid"] = pa.array(both & (bb < ba))
        return columns

    # ---- numbers ------------------------------------------------------------------------------

    def _number(self, column: pa.Array) -> pa.Array:
        """A float64 ccxt column in the decimal strategy (null and NaN -> null)."""
        values = column.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        return self._number_from(values, np.ones(values.shape[0], np.bool_))

    def _number_from(self, values: np.ndarray, present: np.ndarray) -> pa.Array:
        units, fits = self._units(values, present)
        return self._convert(values, present, units, fits)

    def _units(self, values: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """int64 units of 1e-8 (``np.round(x * 1e8)``) and where they hold the value: present,
        finite and small enough for int64."""
        fits = present & np.isfinite(values)
        fits &= np.abs(np.where(fits, values, 0.0)) < MAX_UNITS_VALUE
        units = np.zeros(values.shape[0], np.int64)
        units[fits] = np.round(values[fits] * SCALE).astype(np.int64)
        return units, fits

    def _convert(self, values: np.ndarray, present: np.ndarray, units: np.ndarray, fits: np.ndarray) -> pa.Array:
        """Units in the strategy's type. A finite value too large for units keeps its float in
        ``float`` and is null otherwise (counted ``numbers_out_of_range``)."""
        large = present & np.isfinite(values) & ~fits
        if not large.any():
            return convert_units(units, fits, self.strategy)
        if self.strategy != "float":
            self.counts["numbers_out_of_range"] += int(np.count_nonzero(large))
            return convert_units(units, fits, self.strategy)
        return pa.array(np.where(large, values, units / SCALE), pa.float64(), mask=~(fits | large))

    # ---- output -------------------------------------------------------------------------------

    def _write(self, group: RecordGroup, table: pa.Table, ts_recv: pa.Array) -> None:
        """Into ``<channel>/exchange=/symbol=/date=`` (date of ts_recv, as Coinbase's tables)."""
        writer = self._writer(group.channel, group.exchange)
        codes = np.zeros(table.num_rows, np.int64)
        ts_ns = ts_recv.cast(pa.int64()).to_numpy(zero_copy_only=False)
        writer.write(table, (codes, [symbol_component(group.symbol)]), ts_ns)

    def _writer(self, channel: str, exchange: str) -> PartitionedWriter:
        writer = self.writers.get((channel, exchange))
        if writer is None:
            writer = self.writers[(channel, exchange)] = PartitionedWriter(
                self.job.out_root / channel,
                list(PARTITION_COLS),
                self.stem,
                self.compression,
                self.metadata,
                fixed={"exchange": exchange},
            )
        return writer

    def _abandon(self) -> None:
        """Close and delete every temporary output (an error inside the run): nothing of a
        segment that failed may reach a commit."""
        for writer in self.writers.values():
            with contextlib.suppress(Exception):
                writer.close()
            discard(writer.files)


class _Levels:
    """One side's ``list<struct<price, amount>>`` column as flat numpy arrays plus offsets,
    so level ``i`` of every row is one gather."""

    def __init__(self, column: pa.Array) -> None:
        self.lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
        self.starts = column.offsets.to_numpy()[:-1]  # absolute into ``values`` (slices included)
        values = column.values
        self.price = _floats(values.field("price"))
        self.amount = _floats(values.field("amount"))

    def present(self, level: int) -> np.ndarray:
        return self.lengths > level

    def at(self, level: int) -> tuple[np.ndarray, np.ndarray]:
        """(price, amount) of ``level`` in every row; NaN where the row has fewer levels."""
        present = self.present(level)
        index = np.where(present, self.starts + level, 0)
        if self.price.shape[0] == 0:
            nan = np.full(present.shape[0], np.nan)
            return nan, nan.copy()
        return np.where(present, self.price[index], np.nan), np.where(present, self.amount[index], np.nan)


def _floats(array: pa.Array) -> np.ndarray:
    return array.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
