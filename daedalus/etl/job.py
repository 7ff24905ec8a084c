"""The ETL job: claim closed segments, turn each into Parquet, commit, clean up.

The job is the same for every source; the source's plug-in (:mod:`daedalus.sources`) gives
the parser of one segment. A segment is named by its path below ``raw/<state>/<source>``
(its *key*: a bare file name for NDJSON segments, ``<channel>/exchange=/.../segment_...parquet``
for the partitioned Parquet ones).

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
from typing import Any

import duckdb
import orjson

from daedalus import sources
from daedalus.capture.records import ZstdFrameDamaged
from daedalus.capture.segments import fsync_path
from daedalus.config import DaedalusConfig, interval_seconds
from daedalus.etl.compiling import heartbeat_while_compiling
from daedalus.etl.errors import EtlIoError, SegmentDataError
from daedalus.etl.fastpath import FALLBACK_L2, FALLBACK_LINES, SCANNED, TRADES_SCANNED
from daedalus.etl.output import (
    OutputConflict,
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
from daedalus.layout import parse_segment_name, prune_empty_dirs, segment_stem
from daedalus.locks import hold_lock
from daedalus.logs import get_logger
from daedalus.ops.heartbeat import HeartbeatPublisher

log = get_logger("daedalus.etl")
SOURCE = "coinbase"
#: counters of lines rejected or repaired, printed when not zero (the reasons are in the rejects file)
BAD_INPUT_COUNTERS = ("quarantined_bad_product", "quarantined_bad_number", "quarantined_bad_time",
                      "quarantined_bad_side", "undecodable_frames", "unknown_channels", "unrecognised_records",
                      "exchange_errors", "ts_event_fallbacks",
                      # ccxt (daedalus.sources.ccxt_etl)
                      "quarantined_bad_json", "quarantined_bad_line", "quarantined_unknown_channel",
                      "quarantined_bad_record", "numbers_out_of_range", "symbol_from_path",  # (and Coinbase bars)
                      # databento (daedalus.sources.databento_etl, daedalus.etl.mbo_book)
                      "unmapped_records", "mbo_unknown_order", "mbo_bad_side", "mbo_over_cancel",
                      "mbo_unknown_action", "mbo_order_map_lost", "unexpected_length_records",
                      "invalid_utf8_values", "overflows")  # fmt: skip
MAX_CONSECUTIVE_FAILURES = 3  # the watcher's retries of an unexpected error before it exits non-zero


class EtlStuck(Exception):
    """An unexpected error, i.e. a bug in this code, not bad data: the segment stays in
    ``processing/`` as it is and the run stops (the next segments need this one's books)."""

    def __init__(self, segment: str, error: BaseException) -> None:
        super().__init__(
            f"{segment}: unexpected {type(error).__name__}: {str(error)[:300]} (a bug, not bad data: the segment "
            f"stays in raw/processing/ and nothing was quarantined; report it, the traceback is in the log)"
        )
        self.segment = segment


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
        books = self.segments == 0 or "gaps" in self.counts  # a source whose ETL rebuilds books (Coinbase)
        rate = (f"{self.rows['level2'] / secs:,.0f} level2 rows/s" if books
                else f"{sum(self.rows.values()) / secs:,.0f} rows/s")  # fmt: skip
        lines = [
            f"segments: {self.segments:,} ({self.bytes / 1e6:,.1f} MB raw) in {self.seconds:.2f}s "
            f"-> {self.bytes / 1e6 / secs:,.1f} MB/s, {rate}",
            "rows: " + ", ".join(f"{k}={v:,}" for k, v in sorted(self.rows.items())) if self.rows else "rows: none",
            *([f"books: gaps={self.counts['gaps']:,} crossed={self.counts['crossed']:,} "
               f"snapshots={self.counts['snapshots']:,} one_sided={self.counts['one_sided']:,} "
               f"dropped_before_snapshot={self.counts['dropped_before_snapshot']:,}"] if books else []),
            f"trades: duplicates_dropped={self.counts['duplicate_trades']:,}"
            + (f" late_for_bars={self.counts['late_trades']:,}" if books else ""),
            f"quarantined: lines={self.quarantined_lines:,} segments={self.quarantined_segments:,}",
        ]
        if self.counts[SCANNED] or self.counts[FALLBACK_L2]:  # etl.l2_scanner: compiled
            scanner = (f"level2 scanner: frames={self.counts[SCANNED]:,} handed_to_duckdb={self.counts[FALLBACK_L2]:,}"
                       f" trade_lines={self.counts[TRADES_SCANNED]:,}"
                       f" (other lines for DuckDB: {self.counts[FALLBACK_LINES]:,})")  # fmt: skip
            lines.append(scanner)
        bad = [f"{k}={self.counts[k]:,}" for k in BAD_INPUT_COUNTERS if self.counts[k]]
        if bad:
            lines.append("bad input: " + ", ".join(bad))
        return "\n".join(lines)


def etl_child(source: str) -> str:
    """The name of a source's ETL watcher (its heartbeat ``run/<name>.json``, its log): ``etl``
    for Coinbase, as before sources were plug-ins (dashboards and alerts keep matching), else
    ``etl-<source>``."""
    return "etl" if source == "coinbase" else f"etl-{source}"


class EtlJob:
    """Processes one source's segments (see the module docstring)."""

    def __init__(self, config: DaedalusConfig, source: str = SOURCE) -> None:
        self.config = config
        self.source = source
        self.plugin = sources.get(source)
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
            if folder.exists():  # partitioned formats nest their segments in folders
                found += [p for p in folder.rglob("segment_*") if parse_segment_name(p.name) is not None]
        if start or end:
            found = [p for p in found if _in_range(p.name, start, end)]
        return sorted(found, key=self._order)

    def key(self, path: Path) -> str:
        """A segment's name for the job: its path below ``raw/<state>/<source>``."""
        for state in ("processing", "ready", "archive"):
            folder = self.layout.raw_dir(state, self.source)
            if path.is_relative_to(folder):
                return path.relative_to(folder).as_posix()
        return path.name

    def _order(self, path: Path) -> tuple[str, int, str]:
        """Time order (hour, counter), then the key: partitions of one hour side by side."""
        return segment_order(self.key(path))

    def _claim(self, path: Path) -> Path:
        target = self.layout.processing(self.source) / self.key(path)
        if path != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)
            self._prune_ready(path.parent)
        return target

    def _prune_ready(self, folder: Path) -> None:
        """Remove the ``ready/`` partition folders a claim left empty, but none whose mirror in
        ``active/`` exists: the record writer makes ``ready/<partition>/`` and then creates its
        Parquet file there while that partition's IPC segment is still in ``active/<partition>/``
        (live, and in start-up recovery), and a folder removed between the two would fail its
        finalisation (the segment would wait in ``active/`` for the next ingest start)."""
        ready, active = self.layout.ready(self.source), self.layout.active(self.source)
        while folder != ready and folder.is_relative_to(ready):
            if (active / folder.relative_to(ready)).exists():
                return
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone): the folders above are not empty either
                return
            folder = folder.parent

    def _finish(self, path: Path) -> None:
        key = self.key(path)
        if self.config.etl.after_processing == "archive":
            target = self.layout.archive(self.source) / key
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(path, target)
            except FileNotFoundError:  # removed by hand meanwhile: its outputs are committed all the same
                log.warning("etl_segment_vanished", segment=key, effect="committed; nothing to archive")
                return
            fsync_path(target.parent)
        else:
            path.unlink(missing_ok=True)
        fsync_path(path.parent)
        prune_empty_dirs(path.parent, self.layout.processing(self.source))

    def _committed(self, name: str, state: EtlState) -> bool:
        return name in self.committed or name == state.last_segment or name in state.committed_segments

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
        if self.plugin.preflight is not None:
            self.plugin.preflight()
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
                self.current_segment = self.key(path)
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
        heartbeat = HeartbeatPublisher(self.layout, child=etl_child(self.source), kind="etl", source=self.source,
                                       every_seconds=self.config.supervisor.heartbeat_seconds)  # fmt: skip

        def beat() -> None:
            if heartbeat.due():
                heartbeat.publish(**self.heartbeat_stats(total))

        self.beat = beat
        try:
            with heartbeat_while_compiling(beat, heartbeat.every):  # a first compile is not a hang
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
            "l2_scanner_frames": live.counts[SCANNED],
            "l2_scanner_fallbacks": live.counts[FALLBACK_L2],
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
        name = self.key(path)
        if self._committed(name, state):
            if path.is_relative_to(self.layout.processing(self.source)):  # nested for partitioned keys
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
        older = (self.plugin.ordered and state.last_segment is not None
                 and segment_order(name) < segment_order(state.last_segment))  # fmt: skip
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
                 seconds=round(result.seconds, 3), **dict(sorted(result.rows.items())),
                 **({"gaps": result.counts["gaps"]} if "gaps" in result.counts else {}),
                 **({"l2_scanned": result.counts[SCANNED], "l2_fallback": result.counts[FALLBACK_L2]}
                    if SCANNED in result.counts else {}),
                 quarantined=result.quarantined)  # fmt: skip
        self._finish(path)
        return state if older else new_state

    def _process(self, path: Path, state: EtlState, older: bool) -> tuple[SegmentResult, EtlState]:
        """Process one claimed segment, retrying around undecodable lines; commits outputs and state."""
        started = time.perf_counter()
        name = self.key(path)
        size = path.stat().st_size
        attempts = 0

        def parser() -> Any:
            nonlocal state, attempts
            if attempts:  # a retry starts again from the state before the segment
                state = EtlState.fresh(self.sample_ns, self.depth, self.bar_ns) if older else self._load()
            attempts += 1
            return self.plugin.segment_run(self, name, state)

        outcome, quarantined = self.read_segment(path, name, parser)
        new_state = outcome.state
        if not older:
            for key in new_state.committed_segments:  # a backfill's, cut short before its committed list
                if key not in self.committed:
                    self.committed.add(key)
            new_state.committed_segments = []
            new_state.last_segment = name
            for key, value in outcome.counts.items():
                new_state.totals[key] = new_state.totals.get(key, 0) + value
        try:
            check_conflicts(outcome.files)
            if quarantined:
                self._write_quarantine(name, quarantined)
            self._commit(name, outcome.files, None if older else new_state)
        except OutputConflict as exc:
            raise SegmentDataError(f"{exc}: a different segment under the same name was committed before") from exc
        finally:
            discard(outcome.files)  # nothing left once committed; everything on the way out
        seconds = time.perf_counter() - started
        return SegmentResult(name, size, seconds, outcome.rows, outcome.counts, len(quarantined)), new_state

    def read_segment(self, path: Path, name: str, parser: Callable[[], Any]) -> tuple[Any, list[tuple[str, bytes]]]:
        """``parser().run(source, limit)`` over one segment, retrying around undecodable lines
        (a larger line limit, or a clean copy without the bad lines: ``parser()`` is called
        again for each attempt). Returns the run and every quarantined line with its reason
        (those the line check rejected, then those the parser rejected). On an error the
        run's temporary files are discarded."""
        rejected: list[tuple[str, bytes]] = []
        source, limit = path, MAX_OBJECT_BYTES
        self.scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="segment-", dir=self.scratch) as tmp:
            # a damaged .ndjson.zst is cleaned line by line; a DBN segment is judged by its own reader
            if path.name.endswith(".ndjson.zst") and not zstd_is_complete(path):
                copy = clean_copy(path, Path(tmp) / "clean.ndjson", self.layout.quarantine(self.source))
                log.warning("etl_segment_damaged_zstd", segment=name, damaged_frames=len(copy.damaged),
                            damaged_bytes=sum(d.length for d in copy.damaged))  # fmt: skip
                rejected, source = copy.rejected, copy.path
            while True:
                try:
                    outcome = parser().run(source, limit)
                    break
                except SegmentDecodeError as exc:
                    if "maximum_object_size" in str(exc) and limit < LARGEST_OBJECT_BYTES:
                        log.warning("etl_segment_has_huge_lines", segment=name, retry_with_mb=512)
                        limit = LARGEST_OBJECT_BYTES
                    elif source == path:  # some line is bad: check each, retry with the good ones
                        log.warning("etl_segment_has_bad_lines", segment=name, error=str(exc))
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
        return outcome, [(reason, line) for reason, line in rejected] + lines

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
        target = folder / Path(segment).parent / f"{segment_stem(segment)}.etl-rejects.ndjson"
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as handle:
            for reason, line in entries:
                handle.write(
                    orjson.dumps({"segment": segment, "reason": reason, "line": line.decode("utf-8", "replace")})
                )
                handle.write(b"\n")
            handle.flush()
            os.fsync(handle.fileno())  # durable before the segment may be deleted
        fsync_path(target.parent)
        log.warning("etl_quarantined_lines", segment=segment, count=len(entries), file=str(target))

    def _quarantine_segment(self, path: Path, reason: str) -> None:
        """Move a whole segment to quarantine (never over an earlier one), with its reason."""
        key = self.key(path)
        log.error("etl_segment_quarantined", segment=key, reason=reason)
        target = self.layout.quarantine(self.source) / key
        folder = target.parent
        folder.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = folder / f"{path.name}.{time.time_ns()}"
        shutil.move(str(path), target)
        (folder / f"{target.name}.reason.txt").write_text(reason + "\n")
        fsync_path(folder)
        if path.is_relative_to(self.layout.processing(self.source)):
            prune_empty_dirs(path.parent, self.layout.processing(self.source))
        else:
            self._prune_ready(path.parent)


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


def segment_order(key: str) -> tuple[str, int, str]:
    """A segment key's place in time: (hour, counter) of its file name, then the key. Keys
    compared as strings would put a partitioned key's channel before its time."""
    parsed = parse_segment_name(key.rsplit("/", 1)[-1])
    if parsed is None:  # not a segment name (a checkpoint written by hand): its string order
        return "", 0, key
    return parsed.hour, parsed.counter, key


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
