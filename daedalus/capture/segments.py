"""The durable segment log: batch, write, fsync, rotate, recover (architecture 3.1-3.3).

Collectors call :meth:`SegmentWriter.put_frame` (one frame), :meth:`put_frames` (every frame
one network read completed, with one stamp, or those of a few reads held together, a stamp
each) or :meth:`put_control` on the event loop: an
append to a bounded deque, nothing else; the queue's bound counts records, not appends.
A dedicated I/O thread drains the deque when
``batch_size`` records are waiting or ``flush_interval_seconds`` passed, encodes the
records, writes them with one ``os.write`` (one zstd frame when compressed), fsyncs, and
rotates the segment into ``ready/`` at ``segment_max_mb`` or when the UTC hour changes.
The event loop never waits on the disk.

Names never go backwards: a new name sorts after every name the source used, whatever the
clock does, and a counter never outgrows five digits. A disk that fills up (ENOSPC,
EDQUOT) is waited out: every disk step is retried with backoff by :func:`retry_disk`; at
shutdown a disk that still fails is given up on and every record it held is counted as
unwritten. Any other error (a folder removed and not recreatable, EACCES, EROFS, EIO)
stops the writer: a supervisor restarts ingest and start-up recovery keeps every complete
record.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import functools
import io
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from daedalus.capture.records import (
    control_line,
    frame_line,
    frame_lines,
    is_complete_record,
    iter_zstd_frames,
    stamped_lines,
)
from daedalus.config import IngestionConfig
from daedalus.layout import (
    MAX_SEGMENT_COUNTER,
    RAW_STATES,
    DataLayout,
    next_segment_hour,
    parse_segment_name,
    segment_hour_of_ns,
    segment_identity,
    segment_name_for_hour,
)
from daedalus.logs import get_logger

log = get_logger(__name__)

NS_PER_HOUR = 3_600_000_000_000
LATENCY_SAMPLE_EVERY = 16
LAST_SEGMENT_FILE = ".last_segment"
# how far the last name's hour may be ahead of a record's and still be kept: the ETL's own
# receive-time plausibility bound (etl.coinbase.CLOCK_SLACK_NS); beyond it the last name
# came from a wrong clock and would drag every later name (and `etl --mode date`) along

LOG_EVERY_FAILURES = 60  # a failing disk logs its first failure, then every Nth
MAX_RETRY_PAUSE_S = 5.0
CLOSING_RETRY_PAUSE_S = 0.2
# errors that waiting can cure: a full disk or quota, an interrupted call. EIO is not one:
# a device fault rarely heals by itself, after a failed writeback the kernel may already have
# dropped pages, and retrying forever would leave ingest "running" and useless; stopping lets
# a supervisor restart it and recovery keep every complete record.
RETRYABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EINTR, errno.EAGAIN})

fsync = os.fsync  # every fsync of this module goes through here (tests inject disk faults)


def retry_pause(failures: int) -> float:
    """Backoff after a failed disk operation: 0.2 s doubling to 5 s, so a full disk costs no CPU."""
    return min(MAX_RETRY_PAUSE_S, 0.1 * 2 ** min(failures, 10))


class DiskGaveUp(Exception):
    """Stop was asked while the disk kept failing: what the step held is not written."""

    def __init__(self, step: str, error: str, failures: int) -> None:
        super().__init__(f"{step}: {error} after {failures} attempts")
        self.step = step
        self.error = error
        self.failures = failures


def retry_disk(
    step: str,
    action: Callable[[], None],
    *,
    stop: threading.Event,
    attempts_after_stop: int,
    event: str,
    fields: Callable[[], dict[str, Any]],
    undo: Callable[[], None] | None = None,
    on_failure: Callable[[], None] | None = None,
) -> None:
    """Run a disk step until it succeeds, waiting out a full disk with backoff.

    ``undo`` removes what a failed attempt left (a half write): it runs right after the
    failure, so nothing half done stays behind when this gives up, and if it fails there it
    runs again before the next attempt, as part of it, so ``action`` never runs on top of a
    failed attempt. ``on_failure`` counts each failure. Logs ``<event>_failed`` at the
    first failure and every 60th, ``<event>_recovered`` once it works. An error that
    waiting cannot cure (see :data:`RETRYABLE_ERRNOS`) is raised at once. Once ``stop`` is
    set, ``attempts_after_stop`` more attempts are made, then :class:`DiskGaveUp` is
    raised so the caller counts what is lost instead of hanging.
    """
    failures = 0
    tries_left = attempts_after_stop
    undo_pending = False
    while True:
        try:
            if undo_pending and undo is not None:
                undo()
                undo_pending = False
            action()
        except OSError as exc:
            if undo is not None:
                undo_pending = True
                with contextlib.suppress(OSError):
                    undo()
                    undo_pending = False
            if exc.errno not in RETRYABLE_ERRNOS:
                raise
            failures += 1
            if on_failure is not None:
                on_failure()
            error = exc.strerror or repr(exc)
            if failures == 1 or failures % LOG_EVERY_FAILURES == 0:
                log.error(f"{event}_failed", **fields(), step=step, error=error, failures=failures)
            if stop.is_set():
                if tries_left <= 0:
                    raise DiskGaveUp(step, error, failures) from exc
                tries_left -= 1
                time.sleep(CLOSING_RETRY_PAUSE_S)
            elif stop.wait(retry_pause(failures)) and tries_left <= 0:
                raise DiskGaveUp(step, error, failures) from exc
            continue
        if failures:
            log.info(f"{event}_recovered", **fields(), step=step, failures=failures)
        return


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by path (opened read-only, which works for both)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` all or nothing, durably: a crash leaves the old or the
    new content, never a mix (temporary file, fsync, rename, folder fsync)."""
    tmp = path.with_name(path.name + ".tmp")
    _write_file_durably(tmp, data)
    os.replace(tmp, path)
    fsync_path(path.parent)


# Upper bounds (seconds) of the receive-to-durable latency histogram the heartbeat carries:
# a flush interval is 1-5 s, an fsync on an SD card 10-100 ms.
LATENCY_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class LatencyHistogram:
    """Counts of sampled receive-to-durable latencies per bucket (the last is +Inf)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    total_seconds: float = 0.0
    count: int = 0

    def observe_ns(self, latencies_ns: list[int]) -> None:
        for ns in latencies_ns:
            seconds = ns / 1e9
            self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
            self.total_seconds += seconds
        self.count += len(latencies_ns)

    def to_dict(self) -> dict[str, object]:
        """Prometheus-style: cumulative counts per upper bound, ``+Inf`` last."""
        cumulative = list(itertools.accumulate(self.counts))
        buckets = {f"{bound:g}": n for bound, n in zip(LATENCY_BUCKETS_S, cumulative, strict=False)}
        buckets["+Inf"] = cumulative[-1]
        return {"buckets": buckets, "sum": self.total_seconds, "count": self.count}


@dataclass
class WriterStats:
    written: int = 0
    bytes: int = 0
    flushes: int = 0
    rotations: int = 0
    overflow: int = 0
    write_errors: int = 0
    unwritten: int = 0  # frames accepted but never made durable: the writer gave up at shutdown
    unwritten_events: int = 0  # control lines likewise
    segment: str = ""
    segment_bytes: int = 0
    latencies_ns: deque[int] = field(default_factory=lambda: deque(maxlen=200_000))
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)


@dataclass(slots=True)
class ReadLines:
    """The record lines of the ``count`` frames one network read completed (:meth:`SegmentWriter.put_frames`)."""

    count: int
    lines: bytes


class SegmentNotDurable(Exception):
    """An fsync failed after writes that were never fsynced (``fsync: false``): the kernel
    may have dropped those pages and a retried fsync would report success anyway, so the
    writer stops; the segment stays in ``active/`` for start-up recovery. Not an OSError, so
    :func:`retry_disk` never retries it."""


CLOSING_RETRIES = 2  # more tries of a failing disk step once shutdown was asked (3 in all)


class SegmentWriter:
    """One source's raw segment log, written by its own thread."""

    def __init__(
        self,
        layout: DataLayout,
        source: str,
        config: IngestionConfig,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.layout = layout
        self.source = source
        self.config = config
        self.clock = clock
        self.active_dir = layout.active(source)
        self.ready_dir = layout.ready(source)
        self.suffix = ".ndjson.zst" if config.raw_compression == "zstd" else ".ndjson"
        self.max_bytes = int(config.segment_max_mb * 1024 * 1024)
        self.stats = WriterStats()
        self.dropped = 0  # incremented on the event loop; the thread writes the deltas
        self._dropped_written = 0
        # (recv_ns, conn, frame | [frames of one read] | (event, fields)); records in and out are
        # counted apart, each by one thread, so the depth needs no lock
        self._queue: deque[tuple[int, int, Any]] = deque()
        self._in = 0  # records queued (the event loop)
        self._out = 0  # records taken (the writer thread)
        self._maxsize = config.queue_maxsize
        self._batch_size = config.batch_size - 1  # compared with the depth before the append
        self._wake = threading.Event()
        self._stopping = threading.Event()  # shutdown was asked; also cuts a retry pause short
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._path: Path | None = None
        self._hour: int | None = None  # receive hour of the open segment's first record
        # (hour, counter) of the last name used, so of the open segment; None until the first
        # name is chosen (the used names are then scanned once)
        self._last_used: tuple[str, int] | None = None
        self._stepped_back_from: str | None = None  # the name hour the clock stepped back from
        self._exhausted_warned = False
        # the content checksum (4 bytes a flush) lets a reader tell a flipped bit from data
        self._compressor = (
            zstandard.ZstdCompressor(level=3, write_checksum=True) if self.suffix.endswith(".zst") else None
        )
        self.error: BaseException | None = None
        self.gave_up = False

    # -- producer side (event loop) ------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self._in - self._out

    def has_room(self) -> bool:
        return self._in - self._out < self._maxsize

    def put_frame(self, recv_ns: int, conn: int, frame: str | bytes) -> bool:
        """Queue one received frame; returns False (and counts it) when the queue is full."""
        depth = self._in - self._out
        if depth >= self._maxsize:
            self.dropped += 1
            return False
        self._queue.append((recv_ns, conn, frame))
        self._in += 1
        if depth >= self._batch_size and not self._wake.is_set():
            self._wake.set()
        return True

    def put_frames(
        self, recv_ns: int, conn: int, frames: list[bytes], *, force: bool = False, stamps: list[int] | None = None
    ) -> int:
        """Queue the frames one network read completed, stamped alike, with one append; returns
        how many were taken. What does not fit is dropped and counted, unless ``force`` (the
        collector then stops reading until there is room: ``on_queue_full: block``).
        ``stamps``: frames of several reads held together, ``stamps[i]`` that of ``frames[i]``
        (all in ``recv_ns``'s hour, ``recv_ns`` the first: it decides the segment).

        Their lines are built here, on the event loop, in a few C-level passes
        (:func:`frame_lines`): the writer thread then holds the GIL only to join and count,
        instead of contending for it with a busy event loop for every line it builds."""
        depth = self._in - self._out
        count = len(frames)
        if not count:
            return 0
        room = self._maxsize - depth
        if count > room and not force:
            if room <= 0:
                self.dropped += count
                return 0
            self.dropped += count - room
            frames, count = frames[:room], room
        lines = frame_lines(recv_ns, conn, frames) if stamps is None else stamped_lines(stamps[:count], conn, frames)
        self._queue.append((recv_ns, conn, ReadLines(count, lines)))
        self._in += count
        if depth + count > self._batch_size and not self._wake.is_set():
            self._wake.set()
        return count

    def put_control(self, recv_ns: int, conn: int, event: str, **fields: Any) -> None:
        """Queue a control line; never dropped (they are rare and explain the gaps)."""
        self._queue.append((recv_ns, conn, (event, fields)))
        self._in += 1

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self.active_dir.mkdir(parents=True, exist_ok=True)
        self.ready_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name=f"segment-writer-{self.source}", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 30.0) -> bool:
        """Flush everything queued, move the open segment to ``ready/``.

        True only if that was done in time and nothing was lost: a disk that still fails
        at shutdown makes it False, with the lost records in ``stats.unwritten``.
        """
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
        return self.error is None and not self.gave_up

    # -- the I/O thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
            self._rotate()
        except DiskGaveUp as exc:
            self._give_up(exc)
        except BaseException as exc:  # the process must learn that its disk writer died
            self.error = exc
            self._count_queue_unwritten()
            log.error(
                "segment_writer_failed",
                source=self.source,
                error=repr(exc),
                unwritten=self.stats.unwritten,
                unwritten_events=self.stats.unwritten_events,
            )
            raise

    def _loop(self) -> None:
        interval = self.config.flush_interval_seconds
        next_flush = time.monotonic() + interval
        while True:
            self._wake.wait(max(0.0, next_flush - time.monotonic()))
            self._wake.clear()
            closing = self._stopping.is_set()
            self._flush()
            next_flush = time.monotonic() + interval
            self._rotate_if_hour_changed()
            if closing and not self._queue:
                return

    def _give_up(self, exc: DiskGaveUp) -> None:
        """Count every record still in memory as unwritten and say so; the open segment
        stays in ``active/`` (its complete records are recovered at the next start)."""
        self.gave_up = True
        self._count_queue_unwritten()
        log.error(
            "segment_writer_gave_up",
            source=self.source,
            error=str(exc),
            unwritten=self.stats.unwritten,
            unwritten_events=self.stats.unwritten_events,
            overflow=self.dropped,
            segment=self.stats.segment or "-",
        )

    def _count_queue_unwritten(self) -> None:
        """The writer stops: what is still queued will never be written; count it. Popped one
        by one (collectors may still be appending: iterating the deque would race them)."""
        queue = self._queue
        for _ in range(len(queue)):
            _recv_ns, _conn, data = queue.popleft()
            kind = type(data)
            if kind is tuple:
                self.stats.unwritten_events += 1
                self._out += 1
            else:
                count = data.count if kind is ReadLines else 1
                self.stats.unwritten += count
                self._out += count

    def _flush(self) -> None:
        queue = self._queue
        count = len(queue)
        dropped = self.dropped - self._dropped_written
        if not count and not dropped:
            return
        max_bytes = self.max_bytes
        exact_size = self._compressor is None
        lines: list[bytes] = []
        size = 0
        # records in ``lines``, counted as they are appended: a record leaves the queue only
        # once it is in a batch, so a failure counts each record once (batch or queue)
        frames = 0
        events = 0
        sampled: list[int] = []
        try:
            index = 0
            while index < count:
                recv_ns, conn, data = queue[0]
                if self._fd is not None and recv_ns // NS_PER_HOUR != self._hour:
                    self._write(lines, size, sampled, frames)
                    lines, size, frames, events, sampled = [], 0, 0, 0, []
                    self._rotate()
                if self._fd is None:
                    self._open(recv_ns)
                kind = type(data)
                if kind is tuple:
                    line, records = control_line(recv_ns, conn, *data), 0
                elif kind is ReadLines:
                    line, records = data.lines, data.count
                else:
                    line, records = frame_line(recv_ns, conn, data), 1
                if (
                    exact_size
                    and self.stats.segment_bytes + size + len(line) > max_bytes
                    and (size or self.stats.segment_bytes or records > 1)
                    and self._may_rotate_by_size()
                ):
                    if records > 1:  # the read's lines go one by one: the segment ends between two
                        queue.popleft()
                        split = [(recv_ns, conn, ReadLines(1, one + b"\n")) for one in line.split(b"\n")[:-1]]
                        queue.extendleft(reversed(split))
                        count += records - 1
                        continue
                    # the segment is full: this line starts the next one
                    self._write(lines, size, sampled, frames)
                    lines, size, frames, events, sampled = [], 0, 0, 0, []
                    self._rotate()
                    self._open(recv_ns)
                lines.append(line)
                size += len(line)
                queue.popleft()
                if kind is tuple:
                    events += 1
                    self._out += 1
                else:
                    frames += records
                    self._out += records
                    if records > 1:  # a read: one sample per LATENCY_SAMPLE_EVERY frames, as for single frames
                        sampled.extend(itertools.repeat(recv_ns, -(-records // LATENCY_SAMPLE_EVERY)))
                    elif not index % LATENCY_SAMPLE_EVERY:
                        sampled.append(recv_ns)
                index += 1
            if dropped:
                if self._fd is None:
                    self._open(self.clock())
                line = control_line(self.clock(), 0, "overflow", {"dropped": dropped})
                lines.append(line)
                size += len(line)
                events += 1
                self._dropped_written += dropped
                self.stats.overflow += dropped
            self._write(lines, size, sampled, frames)
        except BaseException:  # given up or failed: the batch in hand is lost, counted once
            self.stats.unwritten += frames
            self.stats.unwritten_events += events
            raise
        if not exact_size and self.stats.segment_bytes >= max_bytes and self._may_rotate_by_size():
            self._rotate()  # compressed size is known only after the flush

    def _write(self, lines: list[bytes], size: int, sampled: list[int], frames: int) -> None:
        if not lines or self._fd is None:
            return
        data = b"".join(lines)
        if self._compressor is not None:
            data = self._compressor.compress(data)
        self._write_durably(data)
        self._count_flush(len(data), frames, sampled)

    def _count_flush(self, size: int, records: int, sampled: list[int]) -> None:
        """One durable flush of ``size`` bytes holding ``records``: the counters and the
        receive-to-durable latencies of the ``sampled`` receive times."""
        done = time.time_ns()
        latencies = [done - recv for recv in sampled]
        self.stats.latencies_ns.extend(latencies)
        self.stats.latency.observe_ns(latencies)
        self.stats.flushes += 1
        self.stats.written += records
        self.stats.bytes += size
        self.stats.segment_bytes += size

    def _write_durably(self, data: bytes) -> None:
        """Append (and fsync); on a full disk cut back to the last durable size and write again.

        Rewriting, not fsyncing again: after a failed fsync the kernel may have dropped the
        pages, and a second fsync would report success for data that is not on disk. The
        records stay in memory meanwhile and the queue keeps absorbing new ones (then counts
        drops), so the event loop never blocks and nothing already taken is lost.
        """
        fd = self._fd
        assert fd is not None

        def append() -> None:
            write_all(fd, data)
            if self.config.fsync:
                fsync(fd)

        def cut_back() -> None:  # no half record or dropped page stays behind
            os.ftruncate(fd, self.stats.segment_bytes)

        self._retry("write", append, cut_back)

    def _retry(self, step: str, action: Callable[[], None], undo: Callable[[], None] | None = None) -> None:
        """:func:`retry_disk` for the writer, counting ``write_errors`` as they happen.

        A full disk is an operations problem, not a reason to stop capturing: the writer
        waits for space and resumes by itself. Once shutdown is asked it tries a few more
        times and then gives up (:class:`DiskGaveUp`), so the loss is counted, not hidden.
        """
        retry_disk(
            step,
            action,
            undo=undo,
            stop=self._stopping,
            attempts_after_stop=CLOSING_RETRIES,
            event="segment_write",
            fields=self._retry_fields,
            on_failure=self._count_write_error,
        )

    def _retry_fields(self) -> dict[str, Any]:
        return {"source": self.source, "segment": self.stats.segment or "-", "queued": len(self._queue)}

    def _count_write_error(self) -> None:
        self.stats.write_errors += 1

    # -- naming and opening ------------------------------------------------------------

    def _open(self, first_recv_ns: int) -> None:
        """Open the next segment for a record received at ``first_recv_ns``.

        The name is chosen once; creating the file and recording the name go through the
        same retry as writes, so a full disk at start-up (or at a rotation) is waited out,
        and a removed ``active/`` is created again.
        """
        hour, counter = self._next_name(segment_hour_of_ns(first_recv_ns))
        name = segment_name_for_hour(hour, counter, self.suffix)
        path = self.active_dir / name

        def create() -> None:
            self.active_dir.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self._write_marker(name)  # its folder fsync makes the new file's entry durable too

        def close_again() -> None:  # a retry opens it anew
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)

        self.stats.segment = name
        self.stats.segment_bytes = 0
        self._retry("open", create, close_again)
        self._path = path
        self._hour = first_recv_ns // NS_PER_HOUR
        self._last_used = (hour, counter)
        self._exhausted_warned = False

    def _write_marker(self, name: str) -> None:
        """Record the name in ``active/.last_segment``: the ETL may delete every segment,
        and a name must never be used twice."""
        write_atomically(self.active_dir / LAST_SEGMENT_FILE, name.encode())

    def _next_name(self, record_hour: str) -> tuple[str, int]:
        """``(hour, counter)`` of the next segment: after every name this source used.

        Normally the record's hour with the next counter. If the clock stepped back to an
        hour before the last name's, the name keeps the last hour (the records keep their
        receive times): names stay unique and in order whatever the wall clock does. If
        that hour's 99,999 counters are used up, the name moves on to the next hour.

        This holds for a clock that was far ahead too (one frame stamped years ahead): names
        then stay in that hour. Going back to the real hour instead would need every name
        ever used in it, and the ETL may have deleted those segments; a reused name would
        reach the ETL as a second segment under a committed name, and a name sorting before
        the checkpoint's would be processed as out of order, from empty books.
        """
        last = self._last_name_used()
        if last is None or record_hour > last[0]:
            self._stepped_back_from = None
            return record_hour, 1
        hour, counter = last
        if record_hour < hour:
            if self._stepped_back_from != hour:
                self._stepped_back_from = hour
                log.warning(
                    "segment_clock_stepped_back", source=self.source, clock_hour=record_hour, last_segment_hour=hour
                )
        else:
            self._stepped_back_from = None
        if counter < MAX_SEGMENT_COUNTER:
            return hour, counter + 1
        following = next_segment_hour(hour)
        log.warning("segment_counter_exhausted", source=self.source, hour=hour, next_name_hour=following)
        return following, 1

    def _last_name_used(self) -> tuple[str, int] | None:
        """The last ``(hour, counter)`` used: remembered, or the highest found at start-up in
        ``.last_segment`` and every raw state folder (quarantined files included)."""
        if self._last_used is None:
            self._last_used = max(self._used_names(), default=None)
        return self._last_used

    def _used_names(self) -> list[tuple[str, int]]:
        """``(hour, counter)`` of ``.last_segment`` and of every file in a raw state folder."""
        names: list[str] = []
        with contextlib.suppress(OSError):
            names.append((self.active_dir / LAST_SEGMENT_FILE).read_text().strip())
        for state in RAW_STATES:
            with contextlib.suppress(OSError):
                names += os.listdir(self.layout.raw_dir(state, self.source))
        return [identity for identity in map(segment_identity, names) if identity is not None]

    def _may_rotate_by_size(self) -> bool:
        """False once the open segment holds the hour's last counter: it then grows past
        ``segment_max_mb`` until the hour changes, rather than reuse or outgrow a name."""
        if self._last_used is None or self._last_used[1] < MAX_SEGMENT_COUNTER:
            return True
        if not self._exhausted_warned:
            self._exhausted_warned = True
            log.warning(
                "segment_counter_exhausted",
                source=self.source,
                segment=self.stats.segment,
                action="size rotation suspended until the hour changes",
            )
        return False

    # -- rotation ----------------------------------------------------------------------

    def _rotate_if_hour_changed(self) -> None:
        if self._fd is not None and self.clock() // NS_PER_HOUR != self._hour:
            self._rotate()

    def _rotate(self) -> None:
        """Close the open segment and move it into ``ready/`` atomically."""
        if self._fd is None or self._path is None:
            return
        path = self._path
        target = self.ready_dir / path.name
        self._sync_and_close()

        def publish() -> None:
            self.ready_dir.mkdir(parents=True, exist_ok=True)
            if path.exists():
                os.rename(path, target)
            elif not target.exists():  # deleted while open: its records are gone, say so
                raise FileNotFoundError(errno.ENOENT, "open segment removed from active/", str(path))
            # else a retry after the rename itself succeeded
            fsync_path(self.ready_dir)
            fsync_path(self.active_dir)

        self._retry("rotate", publish)
        self.stats.rotations += 1
        log.info("segment_ready", source=self.source, segment=target.name, bytes=self.stats.segment_bytes)
        self._path = None
        self._hour = None
        self.stats.segment = ""
        self.stats.segment_bytes = 0

    def _sync_and_close(self) -> None:
        """Close the open segment, its data durable.

        With ``fsync: true`` every write was fsynced already, so there is nothing left to
        fail. With ``fsync: false`` this is the segment's only fsync, and the data it covers
        is no longer in memory: a failure is not retried (a second fsync could succeed over
        dropped pages) but raised as :class:`SegmentNotDurable`.
        """
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if not self.config.fsync:
                try:
                    fsync(fd)
                except OSError as exc:
                    raise SegmentNotDurable(
                        f"{self.stats.segment}: fsync failed after unsynced writes ({exc.strerror or exc!r}); "
                        "left in raw/active/ for start-up recovery"
                    ) from exc
        finally:
            os.close(fd)


# -- start-up recovery -------------------------------------------------------------------


@dataclass
class RecoveryReport:
    segments: int = 0
    records_kept: int = 0
    bytes_quarantined: int = 0
    quarantined: list[str] = field(default_factory=list)
    write_errors: int = 0  # failed attempts, each retried


def _split_ndjson(data: bytes) -> tuple[bytes, bytes, int]:
    """(complete records, everything else, record count) of an NDJSON segment."""
    end = data.rfind(b"\n") + 1
    body, tail = data[:end], data[end:]
    lines = body.split(b"\n")[:-1]
    good = [line for line in lines if is_complete_record(line)]
    if len(good) == len(lines):
        return body, tail, len(lines)
    bad = b"\n".join(line for line in lines if not is_complete_record(line))
    return b"".join(line + b"\n" for line in good), bad + b"\n" + tail, len(good)


def _split_zstd(data: bytes) -> tuple[bytes, bytes, int]:
    """Keep every zstd frame (one per flush) that decodes into whole lines, up to the first
    that does not: from there on all is the torn tail (recovery never skips ahead). Frames
    are walked the one way every reader walks them (``records.iter_zstd_frames``)."""
    good_end, records, counts = 0, 0, []
    for frame in iter_zstd_frames(io.BytesIO(data), lambda lines: counts.append(lines.count(b"\n"))):
        if frame.problem is not None:
            break
        good_end, records = frame.offset + frame.length, records + sum(counts)
        counts.clear()
    return data[:good_end], data[good_end:], records


class RecoveryInterrupted(Exception):
    """Shutdown was asked while the disk kept failing: the segment being recovered stays
    where it is, each step done so far complete, and the next start finishes the job.
    ``failures`` are this segment's; ``write_errors`` every failed attempt of the run."""

    def __init__(self, segment: str, error: str, failures: int, write_errors: int) -> None:
        super().__init__(f"{segment}: {error} after {failures} attempts")
        self.segment = segment
        self.error = error
        self.failures = failures
        self.write_errors = write_errors


@dataclass
class _SegmentOutcome:
    """What recovering one segment did, carried across retries of the same segment."""

    moved: bool = False
    records: int = 0
    torn: Path | None = None
    torn_bytes: int = 0
    rewrite: bool = False  # an fsync of the segment failed: write it anew, never trust a second fsync


#: (complete records, everything else, record count) of a segment's bytes
Splitter = Callable[[bytes], tuple[bytes, bytes, int]]


def line_splitter(name: str) -> Splitter:
    """How a segment of lines is cut: whole zstd frames, or whole lines."""
    return _split_zstd if name.endswith(".zst") else _split_ndjson


def recover_active(layout: DataLayout, source: str, stopping: threading.Event | None = None) -> RecoveryReport:
    """Move every segment left in ``active/`` to ``ready/``, torn tails to ``quarantine/``.

    Safe to interrupt: the tail is written to quarantine before the segment is cut, and
    the segment is cut before it is renamed, so a second run finishes the job (and finds
    the tail already quarantined instead of copying it twice). A full disk is retried
    with backoff until it works or ``stopping`` is set, which raises
    :class:`RecoveryInterrupted`: recovery never leaves a segment half moved. Any other
    OSError is raised as it is.
    """
    folders = [(layout.active(source), layout.ready(source), layout.quarantine(source))]
    return recover_folders(source, folders, lambda name: parse_segment_name(name) is not None, line_splitter,
                           stopping)  # fmt: skip


def recover_folders(
    source: str,
    folders: list[tuple[Path, Path, Path]],
    wanted: Callable[[str], bool],
    splitter: Callable[[str], Splitter],
    stopping: threading.Event | None = None,
) -> RecoveryReport:
    """:func:`recover_active` over ``(active, ready, quarantine)`` folder triples, for the files
    ``wanted`` names, each cut by ``splitter(name)`` (a raw format with its own records, such as
    Databento's DBN, brings its own)."""
    report = RecoveryReport()
    stopping = stopping or threading.Event()

    def count_failure() -> None:
        report.write_errors += 1

    for active, ready, quarantine in folders:
        if not active.is_dir():
            continue
        for path in sorted(p for p in active.iterdir() if wanted(p.name)):
            outcome = _SegmentOutcome()
            try:
                retry_disk(
                    "recover",
                    functools.partial(_recover_segment, path, ready, quarantine, outcome, splitter(path.name)),
                    stop=stopping,
                    attempts_after_stop=0,
                    event="recovery_write",
                    fields=lambda name=path.name: {"source": source, "segment": name},
                    on_failure=count_failure,
                )
            except DiskGaveUp as exc:
                raise RecoveryInterrupted(path.name, exc.error, exc.failures, report.write_errors) from exc
            if outcome.torn is not None:
                report.bytes_quarantined += outcome.torn_bytes
                report.quarantined.append(outcome.torn.name)
                log.warning("segment_torn_tail", source=source, segment=path.name, bytes=outcome.torn_bytes,
                            to=str(outcome.torn))  # fmt: skip
            if outcome.moved:
                report.segments += 1
                report.records_kept += outcome.records
    if report.segments or report.quarantined:
        log.info(
            "recovery_done",
            source=source,
            segments=report.segments,
            records=report.records_kept,
            quarantined_bytes=report.bytes_quarantined,
            write_errors=report.write_errors,
        )
    return report


def _recover_segment(path: Path, ready: Path, quarantine: Path, outcome: _SegmentOutcome, split: Splitter) -> None:
    """One attempt at one segment; idempotent, so a failed attempt is simply run again.

    Re-reading the file each time makes every step safe to repeat: a tail already cut off
    is not found again, a cut already made is not made again, a rename already done
    leaves nothing in ``active/``.
    """
    if path.exists():
        data = path.read_bytes()
        good, tail, records = split(data)
        if tail:
            # one name for every attempt, so that a failed attempt's leftovers are recognised
            outcome.torn = outcome.torn or quarantine / f"{path.name}.tail-{time.time_ns()}"
            outcome.torn = _quarantine_tail(outcome.torn, path.name, tail)
            outcome.torn_bytes = len(tail)
        if not good:
            path.unlink()
        else:
            _cut_to(path, data, good, outcome)
            ready.mkdir(parents=True, exist_ok=True)
            os.rename(path, ready / path.name)
            outcome.moved = True
            outcome.records = records
    fsync_path(path.parent)
    if ready.is_dir():
        fsync_path(ready)


def _cut_to(path: Path, data: bytes, good: bytes, outcome: _SegmentOutcome) -> None:
    """Leave exactly ``good`` in ``path``, durably (also when an earlier attempt cut it).

    A failed fsync may have dropped the file's pages while a read still returns them: the
    next attempt writes ``good`` anew (what was read) instead of trusting a second fsync.
    """
    if outcome.rewrite or not data.startswith(good):  # bad lines in the middle: rewrite the good ones
        write_atomically(path, good)
        outcome.rewrite = False
        return
    if len(good) != len(data):
        os.truncate(path, len(good))
    try:
        fsync_path(path)
    except OSError:
        outcome.rewrite = True
        raise


def _quarantine_tail(planned: Path, segment: str, tail: bytes) -> Path:
    """Store ``tail`` of ``segment`` as ``planned`` (``<segment>.tail-<ns>``) exactly once,
    never half written.

    Written under a ``.partial`` name and renamed; a copy left by an earlier attempt (or by
    a run that died before the cut) is reused rather than duplicated.
    """
    quarantine = planned.parent
    quarantine.mkdir(parents=True, exist_ok=True)
    torn = _quarantined_copy(quarantine, segment, tail)
    if torn is None:
        torn = planned
        partial = torn.with_name(torn.name + ".partial")
        _write_file_durably(partial, tail)
        try:
            os.rename(partial, torn)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(partial)
            raise
    fsync_path(quarantine)
    return torn


def _quarantined_copy(quarantine: Path, segment: str, tail: bytes) -> Path | None:
    """An existing ``<segment>.tail-<ns>`` holding exactly ``tail``; drops stale partials
    (their bytes are still in the segment). Names are never reused, so a match is ours."""
    prefix = f"{segment}.tail-"
    found = None
    with os.scandir(quarantine) as entries:
        for entry in entries:
            if not entry.name.startswith(prefix):
                continue
            if entry.name.endswith(".partial"):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
            elif found is None and entry.stat().st_size == len(tail) and Path(entry.path).read_bytes() == tail:
                found = Path(entry.path)
    return found


def _write_file_durably(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` and fsync it; on failure remove what was written (a
    retry writes it anew rather than trust a second fsync)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data)
        fsync(fd)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)
