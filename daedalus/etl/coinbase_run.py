"""The Coinbase ETL parser's segment pass: raw batches -> parser -> books -> processors -> writers.

:func:`daedalus.etl.coinbase.parse_batch` turns records into columns without the books;
here the parsed level2 rows are bound onto the checkpointed books (:meth:`BookSet.bind`)
and every processed channel (level2, book snapshots, trades, tickers, candles, bars) is
written for one segment. The job (:mod:`daedalus.etl.job`) claims, commits and checkpoints.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from daedalus.capture.records import iter_lines
from daedalus.etl import processors
from daedalus.etl.book import BookResult, FrameBatch
from daedalus.etl.coinbase import CANDLE_NUMBERS, TICKER_NUMBERS, ParsedBatch, parse_batch
from daedalus.etl.fastpath import ScanSegment
from daedalus.etl.output import PartitionedWriter, discard
from daedalus.etl.reader import connect, read_batches
from daedalus.etl.state import EtlState
from daedalus.layout import segment_stem

if TYPE_CHECKING:
    from daedalus.etl.job import EtlJob


class SegmentRun:
    """One pass over one Coinbase segment: batches -> parser -> books -> processors -> writers."""

    def __init__(self, job: EtlJob, name: str, state: EtlState) -> None:
        etl = job.config.etl
        self.job, self.state, self.name = job, state, name
        self.strategy = etl.decimal_strategy
        self.channels = etl.channels
        metadata = {
            "daedalus.source": job.source,
            "daedalus.segment": name,
            "daedalus.decimal_strategy": self.strategy,
            "daedalus.decimal_scale": "" if self.strategy == "float" else "100000000",
        }
        stem = segment_stem(name)
        self.writers: dict[str, PartitionedWriter] = {}
        for channel, cols in (
            ("level2", self.channels.level2.partition_cols),
            (f"book_snapshot_{job.depth}", self.channels.book_snapshot.partition_cols),
            ("market_trades", self.channels.market_trades.partition_cols),
            ("ticker", self.channels.ticker.partition_cols),
            ("candles", self.channels.candles.partition_cols),
            (f"bars_{self.channels.bars.interval}", self.channels.bars.partition_cols),
        ):
            self.writers[channel] = PartitionedWriter(job.out_root / channel, list(cols), stem, etl.compression,
                                                      metadata)  # fmt: skip
        self.rows: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.quarantine: list[tuple[int, str]] = []
        self.files: list[Path] = []

    def run(self, source: Path, max_object: int) -> SegmentRun:
        before = self.book_counters()
        con = connect()
        try:
            for parsed in self._parsed(con, source, max_object):
                self._batch(parsed)
                self.job.beat()
        except BaseException:
            self.abandon()
            raise
        finally:
            con.close()
        return self.finish(before)

    def _parsed(self, con: duckdb.DuckDBPyConnection, source: Path, max_object: int) -> Iterator[ParsedBatch]:
        """The segment's batches of 8,192 lines, parsed: level2 lines through the compiled
        scanner and the rest through DuckDB (``etl.l2_scanner: compiled``), or every line
        through DuckDB (``duckdb``, the reference). The batches are the same either way."""
        if self.job.config.etl.l2_scanner == "compiled":
            for _, parsed in ScanSegment(source, self.job.scratch, con, max_object).batches():
                yield parsed
            return
        line = 0
        for batch in read_batches(con, source, max_object):
            yield parse_batch(batch, line)
            line += batch.num_rows

    def book_counters(self) -> dict[str, dict[str, int]]:
        """Each book's counters now (:meth:`finish` reports what the segment added)."""
        return {p: self.state.books.counters(p) for p in self.state.books.products}

    def abandon(self) -> None:
        """Close and delete every temporary file written so far (the segment failed)."""
        for writer in self.writers.values():
            writer.close()
            discard(writer.files)

    def finish(self, before: dict[str, dict[str, int]]) -> SegmentRun:
        """Close the writers; rows per channel and the counts the segment added."""
        books = self.state.books
        for channel, writer in self.writers.items():
            self.files += writer.close()
            if writer.rows:
                self.rows[channel] = writer.rows
        self.counts["duplicate_trades"] = self.state.trades.duplicates
        self.state.trades.duplicates = 0
        for product in books.products:
            now = books.counters(product)
            old = before.get(product, dict.fromkeys(now, 0))
            for key, value in now.items():
                self.counts[key] += value - old[key]
        return self

    def _batch(self, parsed: ParsedBatch) -> None:
        """One batch through the books and every processor, into the writers."""
        books = self.state.books
        self.counts.update(parsed.counts)
        self.quarantine += parsed.quarantine
        frames = books.bind(parsed.frames, parsed.products)  # the parser's product keys -> book slots
        result, samples = books.apply(frames)
        self._write_level2(parsed, frames, result)
        if len(samples):
            self._write(f"book_snapshot_{self.job.depth}", processors.samples_table(samples, self.job.depth,
                        self.strategy), samples.product, books.products, samples.ts)  # fmt: skip
        trades = self.state.trades.filter(parsed.trades)
        if trades.num_rows:
            self._write_items("market_trades", processors.units_columns(trades, ["price", "size"], self.strategy))
        self.write_tickers_and_candles(parsed)
        # bars: the receive clock of this batch closes the bars it has passed
        clock = int(frames.f_ts.max()) if frames.f_ts.shape[0] else 0
        late_before = self.state.bars.late
        done = self.state.bars.add(trades, clock)
        self.counts["late_trades"] += self.state.bars.late - late_before
        if done:
            overflows_before = self.state.bars.volume_overflows
            bars, products = self.state.bars.table(done, self.strategy)
            self.counts["numbers_out_of_range"] += self.state.bars.volume_overflows - overflows_before
            names = sorted(set(products))
            codes = np.array([names.index(p) for p in products], np.int64)
            ts = bars.column("start").combine_chunks().cast(pa.int64()).to_numpy()
            self._write(f"bars_{self.channels.bars.interval}", bars, codes, names, ts)

    def _write_level2(self, parsed: ParsedBatch, frames: FrameBatch, result: BookResult) -> None:
        """The kept level2 rows, grouped by partition before any Arrow column is made."""
        writer = self.writers["level2"]
        keep = None if result.keep.all() else np.flatnonzero(result.keep)
        codes = frames.r_prod if keep is None else frames.r_prod[keep]
        if codes.shape[0] == 0:
            return
        ts_recv = parsed.l2["ts_recv"] if keep is None else parsed.l2["ts_recv"][keep]
        names = self.state.books.products
        order, spans = writer.partition_order(codes.shape[0], (codes, names), ts_recv)
        select = keep if order is None else (order if keep is None else keep[order])
        table, codes = processors.level2_table(parsed.l2, _rows(frames), result, self.strategy,
                                               self.channels.level2.processor_options, select)  # fmt: skip
        if "product_id" not in writer.partition_cols:
            table = table.add_column(0, "product_id", pc.take(pa.array(names, pa.string()), pa.array(codes)))
        writer.write_spans(table, spans)

    def write_tickers_and_candles(self, parsed: ParsedBatch) -> None:
        """The two channels that need no state from other batches or segments."""
        if parsed.tickers.num_rows:
            self._write_items("ticker", processors.units_columns(parsed.tickers, TICKER_NUMBERS, self.strategy,
                                                                 _TICKER_NAMES))  # fmt: skip
        if parsed.candles.num_rows:
            self._write_items("candles", processors.units_columns(parsed.candles, CANDLE_NUMBERS, self.strategy))

    def _write(self, channel: str, table: pa.Table, codes: np.ndarray, names: list[str], ts_ns: np.ndarray) -> None:
        writer = self.writers[channel]
        if "product_id" not in writer.partition_cols and table.num_rows:
            table = table.add_column(0, "product_id", pc.take(pa.array(names, pa.string()), pa.array(codes)))
        writer.write(table, (codes, names), ts_ns)

    def _write_items(self, channel: str, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        encoded = pc.dictionary_encode(table.column("product_id").combine_chunks())
        codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        ts = table.column("ts_recv").combine_chunks().cast(pa.int64()).to_numpy()
        if "product_id" in self.writers[channel].partition_cols:
            table = table.drop_columns(["product_id"])
        self.writers[channel].write(table, (codes, encoded.dictionary.to_pylist()), ts)

    def quarantine_lines(self, source: Path) -> list[tuple[str, bytes]]:
        """The quarantined records' original text (one pass over the file, only when needed)."""
        if not self.quarantine:
            return []
        wanted = dict(self.quarantine)
        found = []
        for index, line in enumerate(iter_lines(source)):
            if index in wanted:
                found.append((wanted[index], line))
        return found


_TICKER_NAMES = {"best_bid_quantity": "best_bid_size", "best_ask_quantity": "best_ask_size",
                 "volume_24_h": "volume_24h", "low_24_h": "low_24h", "high_24_h": "high_24h"}  # fmt: skip


def _rows(f: FrameBatch) -> tuple:
    return f.r_prod, f.r_side, f.r_px, f.r_sz, f.r_snap
