"""The ETL job: claim closed segments, turn each into Parquet, commit, clean up.

Per segment, in name (= time) order, the unit of work and of failure:

1. claim: atomic rename ``ready/`` -> ``processing/`` (a segment already in ``processing/``
   at start-up was claimed by a run that died: it is processed again);
2. read, parse, apply to the books, write every channel to ``*.parquet.tmp`` files;
3. commit: note the segment and its files in ``<source>.committing``, rename the outputs
   into place, save the checkpoint (books, trade ids, open bars, ``last_segment``), append
   the name to ``<source>.committed``, drop the note;
4. delete the segment or move it to ``archive/``.

A crash before 3 leaves the old checkpoint: the rerun starts from the same state and writes
the same files under the same names. A crash inside 3 leaves the note: the next run first
rolls the commit back (deletes the files it renamed) unless the segment got recorded, so
the segment is processed again as if never committed. A segment found in the committed
list (or named by the checkpoint) is only cleaned up. So killing the job anywhere and
rerunning gives the same dataset, and committed output is never replaced by other content
(:func:`daedalus.etl.output.check_conflicts`).

What goes wrong decides where the segment goes:

- bad data in a line: that line goes to quarantine, the rest is processed;
- a segment that cannot become data at all (:class:`SegmentDataError`): quarantined whole;
- the machine (disk full, permissions; :class:`EtlIoError`): kept in ``processing/``, retried;
- anything else is a bug in this code, not bad data (:class:`EtlStuck`): the segment stays
  in ``processing/`` untouched and the run stops, so an upgrade with a bug cannot quarantine
  a backlog; the watcher retries and gives up after a few failures in a row.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from daedalus.capture.records import ZstdFrameDamaged, iter_lines
from daedalus.capture.segments import fsync_path
from daedalus.config import DaedalusConfig, interval_seconds
from daedalus.etl import processors
from daedalus.etl.coinbase import CANDLE_NUMBERS, TICKER_NUMBERS, ParsedBatch, parse_batch
from daedalus.etl.output import (
    OutputConflict,
    PartitionedWriter,
    check_conflicts,
    commit,
    discard,
    remove_temporaries,
)
from daedalus.etl.reader import (
    LARGEST_OBJECT_BYTES,
    MAX_OBJECT_BYTES,
    SegmentDecodeError,
    clean_copy,
    connect,
    read_batches,
    zstd_is_complete,
)
from daedalus.etl.state import (
    CommittedSegments,
    EtlState,
    begin_commit,
    end_commit,
    interrupted_commit,
    load_state,
    save_state,
    set_state_aside,
)
from daedalus.layout import parse_segment_name
from daedalus.locks import hold_lock
from daedalus.logs import get_logger
from daedalus.ops.heartbeat import HeartbeatPublisher

log = get_logger("daedalus.etl")
SOURCE = "coinbase"
#: counters of lines rejected or repaired, printed when not zero (the reasons are in the rejects file)
BAD_INPUT_COUNTERS = ("quarantined_bad_product", "quarantined_bad_number", "quarantined_bad_time",
                      "quarantined_bad_side", "undecodable_frames", "unknown_channels", "unrecognised_records",
                      "exchange_errors", "ts_event_fallbacks")  # fmt: skip
MAX_CONSECUTIVE_FAILURES = 3  # the watcher's retries of an unexpected error before it exits non-zero


class EtlIoError(Exception):
    """The machine, not the data, failed (disk full, permissions): the segment stays in
    ``processing/`` and is retried by the next run."""


class EtlStuck(Exception):
    """An unexpected error, i.e. a bug in this code, not bad data: the segment stays in
    ``processing/`` as it is and the run stops (the next segments need this one's books)."""

    def __init__(self, segment: str, error: BaseException) -> None:
        super().__init__(
            f"{segment}: unexpected {type(error).__name__}: {str(error)[:300]} (a bug, not bad data: the segment "
            f"stays in raw/processing/ and nothing was quarantined; report it, the traceback is in the log)"
        )
        self.segment = segment


class SegmentDataError(Exception):
    """The segment cannot become data at all (not one line of it can be used as it is):
    it goes to quarantine whole, with this reason."""


@dataclass
class SegmentResult:
    name: str
    bytes: int
    seconds: float
    rows: Counter[str]
    counts: Counter[str]
    quarantined: int


@dataclass
class Summary:
    """What a run did, for the operator (printed at the end, also logged)."""

    segments: int = 0
    bytes: int = 0
    seconds: float = 0.0
    rows: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    quarantined_lines: int = 0
    quarantined_segments: int = 0

    def merge(self, other: Summary) -> None:
        """Fold another run's summary into this one (the watcher's running total)."""
        self.segments += other.segments
        self.bytes += other.bytes
        self.seconds += other.seconds
        self.rows.update(other.rows)
        self.counts.update(other.counts)
        self.quarantined_lines += other.quarantined_lines
        self.quarantined_segments += other.quarantined_segments

    def add(self, result: SegmentResult) -> None:
        self.segments += 1
        self.bytes += result.bytes
        self.seconds += result.seconds
        self.rows.update(result.rows)
        self.counts.update(result.counts)
        self.quarantined_lines += result.quarantined

    def text(self) -> str:
        secs = max(self.seconds, 1e-9)
        lines = [
            f"segments: {self.segments:,} ({self.bytes / 1e6:,.1f} MB raw) in {self.seconds:.2f}s "
            f"-> {self.bytes / 1e6 / secs:,.1f} MB/s, {self.rows['level2'] / secs:,.0f} level2 rows/s",
            "rows: " + ", ".join(f"{k}={v:,}" for k, v in sorted(self.rows.items())) if self.rows else "rows: none",
            f"books: gaps={self.counts['gaps']:,} crossed={self.counts['crossed']:,} "
            f"snapshots={self.counts['snapshots']:,} one_sided={self.counts['one_sided']:,} "
            f"dropped_before_snapshot={self.counts['dropped_before_snapshot']:,}",
            f"trades: duplicates_dropped={self.counts['duplicate_trades']:,} "
            f"late_for_bars={self.counts['late_trades']:,}",
            f"quarantined: lines={self.quarantined_lines:,} segments={self.quarantined_segments:,}",
        ]
        bad = [f"{k}={self.counts[k]:,}" for k in BAD_INPUT_COUNTERS if self.counts[k]]
        if bad:
            lines.append("bad input: " + ", ".join(bad))
        return "\n".join(lines)


class EtlJob:
    """Processes one source's segments (see the module docstring)."""

    def __init__(self, config: DaedalusConfig, source: str = SOURCE) -> None:
        self.config = config
        self.source = source
        self.layout = config.layout
        etl = config.etl
        self.out_root = config.processed_dir / source
        self.state_dir = config.processed_dir / "_state"
        self.depth = etl.channels.book_snapshot.levels
        self.sample_ns = etl.channels.book_snapshot.snapshot_interval_ms * 1_000_000
        self.bar_ns = interval_seconds(etl.channels.bars.interval) * 1_000_000_000
        self.scratch = self.layout.scratch(f"etl-{source}")
        self._lock = None
        self.committed: CommittedSegments  # read by prepare(), under the lock
        # called between batches and segments: the watcher publishes its heartbeat there, so a
        # heartbeat that stops means a stuck job, not just a long backlog
        self.beat: Callable[[], None] = lambda: None
        self.running = Summary()  # the current run's progress, segment by segment
        self.current_segment: str | None = None

    # ---- selection and claiming -----------------------------------------------------------
    def pending(self, start: date | None = None, end: date | None = None) -> list[Path]:
        """Segments to process, in order: leftovers in processing/, then ready/ (optionally by date)."""
        found = []
        for state in ("processing", "ready"):
            folder = self.layout.raw_dir(state, self.source)
            if folder.exists():
                found += [p for p in folder.iterdir() if parse_segment_name(p.name) is not None]
        if start or end:
            found = [p for p in found if _in_range(p.name, start, end)]
        return sorted(found, key=lambda p: p.name)

    def _claim(self, path: Path) -> Path:
        target = self.layout.processing(self.source) / path.name
        if path != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)
        return target

    def _finish(self, path: Path) -> None:
        if self.config.etl.after_processing == "archive":
            target = self.layout.archive(self.source) / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(path, target)
            except FileNotFoundError:  # removed by hand meanwhile: its outputs are committed all the same
                log.warning("etl_segment_vanished", segment=path.name, effect="committed; nothing to archive")
                return
            fsync_path(target.parent)
        else:
            path.unlink(missing_ok=True)
        fsync_path(path.parent)

    def _committed(self, name: str, state: EtlState) -> bool:
        return name in self.committed or name == state.last_segment

    def _settle_interrupted_commit(self) -> None:
        """Finish or roll back a commit that a crash cut short (see the module docstring)."""
        interrupted = interrupted_commit(self.state_dir, self.source)
        if interrupted is None:
            return
        segment, files = interrupted
        try:
            if self._committed(segment, self._load()):
                if segment not in self.committed:
                    self.committed.add(segment)
            else:  # some of its files may be in place: they are not committed output, take them back
                for final in files:
                    final.unlink(missing_ok=True)
                discard(files)
                log.warning("etl_commit_rolled_back", segment=segment, files=len(files),
                            effect="the segment is processed again")  # fmt: skip
            end_commit(self.state_dir, self.source)
        except OSError as exc:  # the disk, not the data: the note stays for the next try
            raise EtlIoError(f"settling the interrupted commit of {segment}: {exc}") from exc

    # ---- running --------------------------------------------------------------------------
    def prepare(self) -> None:
        """Take the source's lock, then clear what a killed run may have left (temporary
        Parquet files, scratch copies) and read the committed list."""
        if self._lock is not None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = hold_lock(self.state_dir / f"{self.source}.lock", "daedalus etl is already processing")
        removed = remove_temporaries(self.out_root)
        if removed:
            log.info("etl_removed_temporaries", count=removed)
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.committed = CommittedSegments(self.state_dir, self.source)

    def rebuild_state(self) -> Path | None:
        """Move a damaged or incompatible checkpoint aside; the next segment starts from empty
        books. Returns where the old files went (None if there was none)."""
        self.prepare()
        moved = set_state_aside(self.state_dir, self.source)
        log.warning("etl_state_rebuilt", moved_to=str(moved) if moved else None,
                    effect="books are empty until each product's next snapshot; open bars are lost")  # fmt: skip
        return moved

    def run(self, start: date | None = None, end: date | None = None, progress: bool = False,
            should_stop: Callable[[], bool] = lambda: False) -> Summary:  # fmt: skip
        """Process every pending segment once (``start``/``end``: only segments of those dates),
        checking ``should_stop()`` between segments."""
        self.prepare()
        self._settle_interrupted_commit()
        summary = self.running = Summary()
        todo = self.pending(start, end)
        if not todo:
            return summary
        state = self._load()
        bar = _progress(len(todo), sum(_size(p) for p in todo)) if progress and len(todo) > 1 else None
        try:
            for index, path in enumerate(todo):
                if should_stop():
                    log.info("etl_stopping", segments_left=len(todo) - index)
                    break
                try:
                    size = path.stat().st_size
                except FileNotFoundError:  # taken away since the listing (by hand): nothing to do
                    continue
                self.current_segment = path.name
                self.beat()
                try:
                    state = self._one(path, state, summary)
                finally:
                    self.current_segment = None
                self.beat()
                if bar is not None:
                    bar.advance(size, summary)
        finally:
            if bar is not None:
                bar.close()
        return summary

    def watch(self, poll_seconds: float, should_stop: Callable[[], bool], progress: bool = False) -> Summary:
        """Process new segments as they become ready until ``should_stop()``, publishing a
        heartbeat (``<data_dir>/run/etl.json``) for the supervisor."""
        total = Summary()
        heartbeat = HeartbeatPublisher(self.layout, child="etl", kind="etl", source=self.source,
                                       every_seconds=self.config.supervisor.heartbeat_seconds)  # fmt: skip

        def beat() -> None:
            if heartbeat.due():
                heartbeat.publish(**self.heartbeat_stats(total))

        self.beat = beat
        try:
            return self._watch(poll_seconds, should_stop, progress, total)
        finally:
            self.beat = lambda: None
            heartbeat.remove()

    def heartbeat_stats(self, done: Summary) -> dict[str, dict[str, object]]:
        """The watcher's counters (runs finished plus the one under way) and gauges."""
        live = Summary()
        live.merge(done)
        live.merge(self.running)
        counters = {
            "segments_processed": live.segments,
            "bytes_processed": live.bytes,
            "rows": dict(live.rows),
            "quarantined_lines": live.quarantined_lines,
            "quarantined_segments": live.quarantined_segments,
        }
        gauges = {"busy": int(self.current_segment is not None), "current_segment": self.current_segment}
        return {"counters": counters, "gauges": gauges}

    def _watch(self, poll_seconds: float, should_stop: Callable[[], bool], progress: bool, total: Summary) -> Summary:
        failures = 0
        while not should_stop():
            try:
                summary = self.run(progress=progress, should_stop=should_stop)
                failures = 0
            except EtlIoError as exc:
                log.error("etl_io_error", error=str(exc), retry_in_s=poll_seconds)
                summary = self.running  # the segments done before the error still count
            except EtlStuck as exc:
                failures += 1
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    raise
                log.error("etl_retrying_after_error", segment=exc.segment, failures=failures,
                          gives_up_after=MAX_CONSECUTIVE_FAILURES, retry_in_s=poll_seconds)  # fmt: skip
                summary = self.running
            if summary.segments:
                log.info("etl_watch_round", segments=summary.segments, level2_rows=summary.rows["level2"])
            total.merge(summary)
            self.running = Summary()
            deadline = time.monotonic() + poll_seconds
            while not should_stop() and time.monotonic() < deadline:
                self.beat()
                time.sleep(min(0.2, poll_seconds))
        return total

    def _load(self) -> EtlState:
        return load_state(self.state_dir, self.source, self.sample_ns, self.depth, self.bar_ns)

    def _one(self, path: Path, state: EtlState, summary: Summary) -> EtlState:
        name = path.name
        if self._committed(name, state):
            if path.parent == self.layout.processing(self.source):
                log.info("etl_finishing_committed_segment", segment=name)  # died between commit and cleanup
                if name not in self.committed:  # recorded by the checkpoint only: record it for good
                    self.committed.add(name)
                self._finish(path)
            else:  # a second file under a name whose outputs are committed: never overwrite them
                summary.quarantined_segments += 1
                self._quarantine_segment(path, f"a segment named {name} is already processed and committed; "
                                         "this different file under the same name was not processed")  # fmt: skip
            return state
        path = self._claim(path)
        older = state.last_segment is not None and name < state.last_segment
        if older:  # e.g. recovered late, or left behind by --mode date
            log.warning("etl_segment_older_than_checkpoint", segment=name, checkpoint=state.last_segment,
                        effect="processed with empty books; the checkpoint is left as it is")  # fmt: skip
        base = EtlState.fresh(self.sample_ns, self.depth, self.bar_ns) if older else state
        try:
            result, new_state = self._process(path, base, older)
        except SegmentDataError as exc:
            summary.quarantined_segments += 1
            self._quarantine_segment(path, str(exc))
            return self._load() if not older else state
        except (EtlIoError, OSError) as exc:  # disk full, permissions: it stays claimed for a retry
            if not path.exists():  # removed from processing/ by hand while it was read
                log.warning("etl_segment_vanished", segment=name, effect="skipped; nothing of it was committed")
                self._settle_interrupted_commit()  # a commit it had begun is taken back
                return self._load() if not older else state
            if isinstance(exc, EtlIoError):
                raise
            raise EtlIoError(f"{name}: {exc}") from exc
        except Exception as exc:
            log.error("etl_segment_error", segment=name, error=repr(exc), exc_info=True,
                      effect="kept in processing/, not quarantined")  # fmt: skip
            raise EtlStuck(name, exc) from exc
        summary.add(result)
        log.info("etl_segment_done", segment=name, mb=round(result.bytes / 1e6, 2),
                 seconds=round(result.seconds, 3), level2=result.rows["level2"], trades=result.rows["market_trades"],
                 gaps=result.counts["gaps"], quarantined=result.quarantined)  # fmt: skip
        self._finish(path)
        return state if older else new_state

    def _process(self, path: Path, state: EtlState, older: bool) -> tuple[SegmentResult, EtlState]:
        """Process one claimed segment, retrying around undecodable lines; commits outputs and state."""
        started = time.perf_counter()
        size = path.stat().st_size
        rejected: list[tuple[str, bytes]] = []
        source, limit = path, MAX_OBJECT_BYTES
        self.scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="segment-", dir=self.scratch) as tmp:
            if path.name.endswith(".zst") and not zstd_is_complete(path):
                copy = clean_copy(path, Path(tmp) / "clean.ndjson", self.layout.quarantine(self.source))
                log.warning("etl_segment_damaged_zstd", segment=path.name, damaged_frames=len(copy.damaged),
                            damaged_bytes=sum(d.length for d in copy.damaged))  # fmt: skip
                rejected, source = copy.rejected, copy.path
            while True:
                try:
                    outcome = SegmentRun(self, path.name, state).run(source, limit)
                    break
                except SegmentDecodeError as exc:
                    state = EtlState.fresh(self.sample_ns, self.depth, self.bar_ns) if older else self._load()
                    if "maximum_object_size" in str(exc) and limit < LARGEST_OBJECT_BYTES:
                        log.warning("etl_segment_has_huge_lines", segment=path.name, retry_with_mb=512)
                        limit = LARGEST_OBJECT_BYTES
                    elif source == path:  # some line is bad: check each, retry with the good ones
                        log.warning("etl_segment_has_bad_lines", segment=path.name, error=str(exc))
                        copy = clean_copy(path, Path(tmp) / "clean.ndjson", self.layout.quarantine(self.source))
                        rejected, source = copy.rejected, copy.path
                    else:
                        raise _second_decode_failure(exc) from exc
            try:
                lines = outcome.quarantine_lines(source)
            except ZstdFrameDamaged as exc:  # DuckDB read a frame that the frame walker refuses
                discard(outcome.files)
                raise SegmentDataError(f"a zstd frame DuckDB read does not decode into whole lines: {exc}") from exc
            except BaseException:
                discard(outcome.files)
                raise
        new_state = outcome.state
        if not older:
            new_state.last_segment = path.name
            for key, value in outcome.counts.items():
                new_state.totals[key] = new_state.totals.get(key, 0) + value
        try:
            check_conflicts(outcome.files)
            quarantined = [(reason, line) for reason, line in rejected] + lines
            if quarantined:
                self._write_quarantine(path.name, quarantined)
            self._commit(path.name, outcome.files, None if older else new_state)
        except OutputConflict as exc:
            raise SegmentDataError(f"{exc}: a different segment under the same name was committed before") from exc
        finally:
            discard(outcome.files)  # nothing left once committed; everything on the way out
        seconds = time.perf_counter() - started
        return SegmentResult(path.name, size, seconds, outcome.rows, outcome.counts, len(quarantined)), new_state

    def _commit(self, name: str, files: list[Path], state: EtlState | None) -> None:
        """Outputs into place, then the checkpoint (``state``; None: leave it), then the name
        in the committed list; the ``committing`` note makes the three one step for a crash."""
        begin_commit(self.state_dir, self.source, name, files)
        commit(files)
        if state is not None:
            save_state(self.state_dir, self.source, state)
        self.committed.add(name)
        end_commit(self.state_dir, self.source)

    def _write_quarantine(self, segment: str, entries: list[tuple[str, bytes]]) -> None:
        folder = self.layout.quarantine(self.source)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{_stem(segment)}.etl-rejects.ndjson"
        with target.open("wb") as handle:
            for reason, line in entries:
                handle.write(
                    orjson.dumps({"segment": segment, "reason": reason, "line": line.decode("utf-8", "replace")})
                )
                handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())  # durable before the segment may be deleted
        fsync_path(folder)
        log.warning("etl_quarantined_lines", segment=segment, count=len(entries), file=str(target))

    def _quarantine_segment(self, path: Path, reason: str) -> None:
        """Move a whole segment to quarantine (never over an earlier one), with its reason."""
        log.error("etl_segment_quarantined", segment=path.name, reason=reason)
        folder = self.layout.quarantine(self.source)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / path.name
        if target.exists():
            target = folder / f"{path.name}.{time.time_ns()}"
        shutil.move(str(path), target)
        (folder / f"{target.name}.reason.txt").write_text(reason + "\n")
        fsync_path(folder)


class SegmentRun:
    """One pass over one segment: batches -> parser -> books -> processors -> writers."""

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
        stem = _stem(name)
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
        books = self.state.books
        before = {p: books.counters(p) for p in books.products}
        line = 0
        con = connect()
        try:
            for batch in read_batches(con, source, max_object):
                self._batch(parse_batch(batch, books, line))
                line += batch.num_rows
                self.job.beat()
        except BaseException:
            for writer in self.writers.values():
                writer.close()
                discard(writer.files)
            raise
        finally:
            con.close()
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
        result, samples = books.apply(parsed.frames)
        table, codes = processors.level2_table(parsed.l2, _rows(parsed), result, self.strategy,
                                               self.channels.level2.processor_options)  # fmt: skip
        ts_recv = parsed.l2["ts_recv"] if result.keep.all() else parsed.l2["ts_recv"][result.keep]
        self._write("level2", table, codes, books.products, ts_recv)
        if len(samples):
            self._write(f"book_snapshot_{self.job.depth}", processors.samples_table(samples, self.job.depth,
                        self.strategy), samples.product, books.products, samples.ts)  # fmt: skip
        trades = self.state.trades.filter(parsed.trades)
        if trades.num_rows:
            self._write_items("market_trades", processors.units_columns(trades, ["price", "size"], self.strategy))
        self._write_items("ticker", processors.units_columns(parsed.tickers, TICKER_NUMBERS, self.strategy,
                                                             _TICKER_NAMES))  # fmt: skip
        self._write_items("candles", processors.units_columns(parsed.candles, CANDLE_NUMBERS, self.strategy))
        # bars: the receive clock of this batch closes the bars it has passed
        clock = int(parsed.frames.f_ts.max()) if parsed.frames.f_ts.shape[0] else 0
        late_before = self.state.bars.late
        done = self.state.bars.add(trades, clock)
        self.counts["late_trades"] += self.state.bars.late - late_before
        if done:
            bars, products = self.state.bars.table(done, self.strategy)
            names = sorted(set(products))
            codes = np.array([names.index(p) for p in products], np.int64)
            ts = bars.column("start").combine_chunks().cast(pa.int64()).to_numpy()
            self._write(f"bars_{self.channels.bars.interval}", bars, codes, names, ts)

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


def _rows(parsed) -> tuple:
    f = parsed.frames
    return f.r_prod, f.r_side, f.r_px, f.r_sz, f.r_snap


def _second_decode_failure(exc: SegmentDecodeError) -> Exception:
    """DuckDB refused the clean copy, whose every line passed our own check: out of memory or
    an I/O error is the machine (retry later); a decode error is data our check let through
    (quarantine the segment whole rather than stop the pipeline on it)."""
    cause, text = exc.__cause__, str(exc)  # mid-stream, DuckDB's errors arrive as Arrow's OSError
    if (
        isinstance(cause, duckdb.IOException | duckdb.OutOfMemoryException)
        or "IO Error" in text
        or ("Out of Memory Error" in text)
    ):
        return EtlIoError(f"DuckDB could not read the clean copy: {exc}")
    return SegmentDataError(f"undecodable even after removing the bad lines: {exc}")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # taken away since the listing
        return 0


def _stem(name: str) -> str:
    parsed = parse_segment_name(name)
    return parsed.stem if parsed else name.split(".")[0]


def _in_range(name: str, start: date | None, end: date | None) -> bool:
    parsed = parse_segment_name(name)
    if parsed is None:
        return False
    day = date(int(parsed.hour[:4]), int(parsed.hour[4:6]), int(parsed.hour[6:8]))
    return (start is None or day >= start) and (end is None or day <= end)


class _progress:
    """A rich progress bar over raw bytes (only when asked for and on a terminal)."""

    def __init__(self, segments: int, total_bytes: int) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

        self.bar = Progress(TextColumn("etl"), BarColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f} B"),
                            TransferSpeedColumn(), TimeRemainingColumn(), TextColumn("{task.description}"))  # fmt: skip
        self.task = self.bar.add_task(f"0/{segments} segments", total=total_bytes)
        self.segments = segments
        self.bar.start()

    def advance(self, size: int, summary: Summary) -> None:
        done = f"{summary.segments}/{self.segments} segments, {summary.rows['level2']:,} level2"
        self.bar.update(self.task, advance=size, description=done)

    def close(self) -> None:
        self.bar.stop()
