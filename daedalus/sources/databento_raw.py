"""Databento raw segments: the DBN stream kept byte-exact, with our receive stamps beside it.

A segment (``raw/<state>/databento/<DATASET>/segment_<YYYYMMDDTHH>_<NNNNN>.dbn.zst``) is a
sequence of zstd frames, so that one file carries data and stamps, is written atomically
(``active/`` -> ``ready/``) and opens with any zstd/DBN reader (``DBNStore.from_file``: the
skippable frames are skipped by every zstd decoder):

1. a data frame: the session's DBN Metadata header (``metadata.encode()``), at the head of
   every segment of the session;
2. from the session's second segment on, an instrument's symbol mappings known so far
   (SymbolMappingMsg records, original bytes) just before its first record in the segment, with
   stamps ``conn = 0`` ("context, repeated"), so each segment is self-describing without
   repeating a whole dataset's mappings (OPRA: ~1.5M) at the head of every segment;
3. per flush: a skippable frame ``DDRS`` with the receive stamps, then one data frame with the
   flush's DBN records concatenated (``bytes(record)`` as the official client decoded them);
4. control events (``connect``, ``subscribe``, ``session``, ``gap``, ``disconnect``,
   ``overflow``) as skippable frames ``DDEV`` + one JSON object, in stream order: an ``overflow``
   stands where the records (or events) were dropped, before the records received after them.

``DDRS`` payload: u32 entry count, then entries ``<q I I`` = (receive time ns, records,
conn): each entry covers the next ``records`` records of the following data frame, all
completed by one network read of connection ``conn``.

Writer: :class:`DbnSegmentWriter` (the :class:`~daedalus.capture.segments.SegmentWriter`
machinery: writer thread, bounded queue, fsync, rotation, full-disk retries, names).
Start-up recovery: :func:`recover_dbn_active`. Reader: :func:`open_dbn_segment`, which also
reads plain ``.dbn`` and stamp-less ``.dbn.zst`` files (Databento's own) with ``local_ns=None``.

Refill state (:class:`RefillTracker`, :func:`write_refill_state`): what a reconnect or a restart
must ask the gateway to replay. Records arrive in receive order, not ``ts_event`` order (CME
channels, OPRA publishers interleave), so per rtype the tracker keeps the newest ``ts_event``, the
largest backward step seen (capped at :data:`MAX_BACK_NS`) and every record with
``ts_event >= newest - max(step, REFILL_FLOOR_NS)`` (bounded at :data:`WINDOW_BYTES`): a refill asks
from there and drops the replayed records already written; past the bound a replayed record cannot
be recognised, so it is written and counted (``refill_unsure``). A refill start can reach back before
the first record this capture has of an rtype (a session cut soon after capture began: the floor and
the step look back further than it ran): the replay then first sends records that were never captured,
older than the capture's first. While the window still holds every record of the rtype since capture
began (``whole``, kept in the state file), the replayed records before the first one recognised are
those: dropped and counted (``refill_before_capture``), not written after newer ones as if new.
Definition, statistics and status
records carry old exchange times: they are never refilled (:data:`NO_REFILL_RTYPES`). The writer
thread keeps its own tracker of the records it wrote and, after a flush that wrote records (at
most every :data:`STATE_EVERY_S`, and always before a rotation hands a segment to the ETL),
replaces ``raw/active/databento/<DATASET>/.refill_state`` (tmp + fsync + rename: newest, step and
64-bit hashes of the window's records, and the segment and byte offset it covers): a restart
reads it first, so it does not depend on raw segments the ETL may already have deleted, then
reads what was written after that offset (a crash between a flush and its state write:
:func:`written_after`), if those segments are still on disk; if the ETL deleted them in between
(one flush), their records may be captured again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson
import zstandard
from numba import njit

from daedalus.capture.records import ZstdFrameDamaged, control_line, zstd_frame_end
from daedalus.capture.segments import NS_PER_HOUR, RecoveryReport, SegmentWriter, recover_folders, write_atomically
from daedalus.config import IngestionConfig
from daedalus.layout import RAW_STATES, DataLayout, partition_component, segment_identity
from daedalus.logs import get_logger

log = get_logger(__name__)

SOURCE = "databento"
SUFFIX = ".dbn.zst"
SKIPPABLE_MAGIC = 0x184D2A5D
STAMPS_TAG = b"DDRS"
EVENT_TAG = b"DDEV"
STAMP = struct.Struct("<qII")
SKIPPABLE_HEAD = struct.Struct("<II")
SYMBOL_MAPPING_RTYPE = 22
MAX_FRAME_RECORDS = 16_384  # records per data frame: at most ~8.5 MB decoded (520-byte definitions)
MAX_FRAME_CONTENT = 64 << 20  # a data frame decoding to more is damaged (or not ours)
PLAIN_CHUNK = 8 << 20  # bytes read at a time from a plain DBN file
LATENCY_SAMPLE_EVERY = 16
MAX_QUEUED_EVENTS = 10_000  # control events waiting for a stalled disk; more are counted in an overflow event
RECORDS, METADATA, EVENT, OVERFLOW = 0, 1, 2, 3  # queue item kinds
CONTROL_RTYPES = frozenset((21, 22, 23))  # error, symbol mapping, system: not market records
STATE_NAME = ".refill_state"
STATE_EVERY_S = 1.0  # the refill state file is replaced at most this often (and at every rotation)


# -- refill state ----------------------------------------------------------------------------

REFILL_FLOOR_NS = 100_000_000  # a refill asks at least this far back of each rtype's newest ts_event
MAX_BACK_NS = 60_000_000_000  # a backward step beyond this (an outlier) does not push refills back further
WINDOW_BYTES = 16 << 20  # per rtype: records kept to recognise a replay (~300k MBO records)
# status, definition, statistics: old exchange times in ts_event; a replay from them is a guess, never refilled
NO_REFILL_RTYPES = frozenset((18, 19, 24))
F_SNAPSHOT = 32
_U64 = struct.Struct("<Q").unpack_from


def record_digest(key: bytes) -> bytes:
    """64 bits of a record (without ts_out) to recognise it; a key of 8 bytes is a digest already."""
    return key if len(key) == 8 else hashlib.blake2b(key, digest_size=8).digest()


class RefillTracker:
    """Per rtype: newest ts_event, largest backward step, and the records a refill would send again
    (see the module docstring). ``admit`` runs per record: plain lists indexed by rtype."""

    def __init__(self, ts_out: bool = False, floor_ns: int | None = None, cap_bytes: int = WINDOW_BYTES) -> None:
        self.cut = 8 if ts_out else 0
        self.floor = REFILL_FLOOR_NS if floor_ns is None else floor_ns
        self.cap = cap_bytes
        self._newest = [-1] * 256  # rtype -> newest ts_event (-1: none yet)
        self._back = [0] * 256  # rtype -> largest backward step of ts_event seen
        self._window: list[deque[tuple[int, bytes]]] = [deque() for _ in range(256)]  # (ts_event, key)
        self._bytes = [0] * 256
        self._lost = [-1] * 256  # rtype -> newest ts_event of a record pushed out by the cap while in range
        self._whole = [False] * 256  # rtype -> the window holds every record since capture began (none trimmed)
        self._early: dict[int, int] = {}  # rtype -> a running refill's records up to this ts may precede capture
        self.replayed: dict[int, Counter[bytes]] = {}  # rtype -> digests a running refill will send again
        self._unsure: dict[int, int] = {}  # rtype -> replayed records at or below this ts may be duplicates
        self.dropped = 0
        self.unsure = 0  # replayed records not recognised although they may have been written (past the cap)
        self.early = 0  # replayed records from before capture began (never written: dropped, not appended late)

    @property
    def newest(self) -> dict[int, int]:
        """rtype -> newest ts_event, for the rtypes seen."""
        return {rtype: ts for rtype, ts in enumerate(self._newest) if ts >= 0}

    def key(self, data: bytes) -> bytes:
        return data[: -self.cut] if self.cut else data

    def start(self, rtype: int) -> int | None:
        """Where a refill of ``rtype`` begins: newest - max(largest backward step, floor)."""
        newest = self._newest[rtype]
        if newest < 0 or rtype in NO_REFILL_RTYPES:
            return None
        return max(0, newest - max(self._back[rtype], self.floor))

    def admit(self, rtype: int, data: bytes) -> bool:
        """Track a market record; False for a replayed record already written (drop it)."""
        if self.replayed and self._replayed(rtype, data):
            return False
        (ts,) = _U64(data, 8)
        newest = self._newest[rtype]
        back = self._back[rtype]
        if newest < 0:  # capture of this rtype begins here: the window holds all of it
            self._whole[rtype] = True
        if ts > newest:
            self._newest[rtype] = newest = ts
        elif newest - ts > back and not (rtype == 160 and data[36] & F_SNAPSHOT):
            self._back[rtype] = back = min(newest - ts, MAX_BACK_NS)
        if rtype in NO_REFILL_RTYPES:
            return True
        key = data[: -self.cut] if self.cut else data
        window = self._window[rtype]
        window.append((ts, key))
        size = self._bytes[rtype] + len(key)
        start = newest - (back if back > self.floor else self.floor)
        if window[0][0] < start or size > self.cap:
            size = self._trim(rtype, window, start, size)
        self._bytes[rtype] = size
        return True

    def _trim(self, rtype: int, window: deque[tuple[int, bytes]], start: int, size: int) -> int:
        """Drop the window's oldest records: before the refill start, or past the cap (then a
        replay of them cannot be recognised: ``_lost``)."""
        while window and (window[0][0] < start or size > self.cap):
            old_ts, old = window.popleft()
            size -= len(old)
            self._whole[rtype] = False
            if old_ts >= start and old_ts > self._lost[rtype]:
                self._lost[rtype] = old_ts
        return size

    def _replayed(self, rtype: int, data: bytes) -> bool:
        """Whether to drop ``data``: one of the records a refill sends again (each counted once), or
        one the replay sends before the first of those while capture's start is in the window (``early``)."""
        pending = self.replayed.get(rtype)
        if not pending:
            return False
        digest = record_digest(self.key(data))
        count = pending.get(digest)
        if not count:
            ts = _U64(data, 8)[0]
            if ts <= self._early.get(rtype, -1):  # before the first record recognised: never captured
                self.early += 1
                return True
            if ts <= self._unsure.get(rtype, -1):
                self.unsure += 1
            return False
        self._early.pop(rtype, None)  # the replay reached what was captured
        if count > 1:
            pending[digest] = count - 1
        else:
            del pending[digest]
            if not pending:
                del self.replayed[rtype]
        self.dropped += 1
        return True

    def arm(self, starts: dict[int, int]) -> None:
        """A refill of these rtypes from these starts begins: the window's records from each start come again."""
        self.disarm()
        for rtype, start in starts.items():
            if rtype in NO_REFILL_RTYPES:
                continue
            pending = Counter(record_digest(key) for ts, key in self._window[rtype] if ts >= start)
            if pending:
                self.replayed[rtype] = pending
                if self._whole[rtype]:  # what the replay sends before the first of these was never captured
                    self._early[rtype] = self._newest[rtype]
            own = self.start(rtype)
            unsure = max(self._lost[rtype], -1 if own is None or start >= own else own - 1)
            if unsure >= start:
                self._unsure[rtype] = unsure

    def disarm(self) -> None:
        self.replayed, self._unsure, self._early = {}, {}, {}

    def complete(self, rtypes: tuple[int, ...]) -> None:
        """The gateway finished replaying these rtypes' schema: nothing more comes again."""
        for rtype in rtypes:
            self.replayed.pop(rtype, None)
            self._unsure.pop(rtype, None)
            self._early.pop(rtype, None)

    def forget(self, records: list[bytes]) -> None:
        """Records the writer did not take (its queue full): not written, so a refill must not drop
        their replay. They are the newest of their window (the newest ts_event stays: a gap anyway)."""
        for data in reversed(records):
            rtype = data[1]
            window = self._window[rtype]
            if rtype not in CONTROL_RTYPES and window and window[-1][1] == self.key(data):
                _ts, key = window.pop()
                self._bytes[rtype] -= len(key)

    def seed(self, events: dict[int, tuple[int, list[bytes]]]) -> None:
        """Start from an earlier run's newest records (:func:`last_events`: no state file)."""
        for rtype, (ts, records) in events.items():
            self._newest[rtype] = ts
            self._window[rtype] = deque((ts, self.key(record)) for record in records)

    def state(self) -> dict[str, Any]:
        """What a restart needs (:func:`write_refill_state`): per rtype newest, step, lost and the
        (ts_event, 64-bit hash) of the window's records from the refill start on (``whole``: all of them
        since capture began)."""
        out: dict[str, Any] = {}
        for rtype, newest in self.newest.items():
            start = self.start(rtype)
            kept = self._window[rtype]
            window = [] if start is None else [(ts, key) for ts, key in kept if ts >= start]
            out[str(rtype)] = {
                "newest": newest,
                "back": self._back[rtype],
                "lost": self._lost[rtype],
                "whole": self._whole[rtype] and len(window) == len(kept),
                "ts": [ts for ts, _key in window],
                "hashes": [int.from_bytes(record_digest(key), "little") for _ts, key in window],
            }
        return {"version": 1, "rtypes": out}

    def load(self, state: dict[str, Any]) -> None:
        """Start from a state file an earlier run wrote (:meth:`state`)."""
        for name, entry in state["rtypes"].items():
            rtype = int(name)
            self._newest[rtype] = int(entry["newest"])
            self._back[rtype] = int(entry["back"])
            self._lost[rtype] = int(entry["lost"])
            self._window[rtype] = deque(
                (int(ts), int(h).to_bytes(8, "little")) for ts, h in zip(entry["ts"], entry["hashes"], strict=True)
            )
            self._bytes[rtype] = 8 * len(self._window[rtype])
            self._whole[rtype] = bool(entry.get("whole", False))  # an older state file: unknown, not whole


def state_path(layout: DataLayout, dataset: str) -> Path:
    return layout.active(SOURCE) / partition_component(dataset) / STATE_NAME


def write_refill_state(path: Path, state: dict[str, Any]) -> None:
    """Replace ``path`` atomically and durably (the segments' :func:`write_atomically`)."""
    write_atomically(path, orjson.dumps(state))


def read_refill_state(path: Path) -> dict[str, Any] | None:
    """The state an earlier run left, or None (no file)."""
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None


# -- frames --------------------------------------------------------------------------------


def skippable_frame(payload: bytes) -> bytes:
    return SKIPPABLE_HEAD.pack(SKIPPABLE_MAGIC, len(payload)) + payload


def stamps_frame(entries: list[tuple[int, int, int]]) -> bytes:
    """A ``DDRS`` frame for ``(recv_ns, records, conn)`` entries."""
    flat = [value for entry in entries for value in entry]
    return skippable_frame(STAMPS_TAG + struct.pack(f"<I{'qII' * len(entries)}", len(entries), *flat))


def event_frame(recv_ns: int, conn: int, event: str, fields: dict[str, Any]) -> bytes:
    """A ``DDEV`` frame: the same JSON object as the NDJSON control lines of the other sources."""
    return skippable_frame(EVENT_TAG + control_line(recv_ns, conn, event, fields).rstrip(b"\n"))


@njit(cache=True)
def walk_records(buf):
    """Offsets of the whole records in ``buf`` (length byte * 4 each); returns (offsets, end of
    the last whole record, problem: 0 none, 1 a length below the header size, 2 a record
    running past the end)."""
    n = buf.shape[0]
    offsets = np.empty(n // 16 + 1, np.int64)
    pos = 0
    k = 0
    while pos < n:
        length = np.int64(buf[pos]) * 4
        if length < 16:
            return offsets[:k], pos, 1
        if pos + length > n:
            return offsets[:k], pos, 2
        offsets[k] = pos
        k += 1
        pos += length
    return offsets[:k], pos, 0


def record_count(data: bytes | memoryview) -> int | None:
    """Number of whole DBN records in ``data`` (the header's length byte is the size / 4);
    None when they do not end exactly at its end."""
    offsets, _end, problem = walk_records(np.frombuffer(data, np.uint8))
    return None if problem else len(offsets)


def whole_records_end(data: bytes | memoryview) -> int:
    """Offset after the last whole record of ``data``."""
    _offsets, end, problem = walk_records(np.frombuffer(data, np.uint8))
    if problem == 1:
        raise ZstdFrameDamaged(f"a DBN record of length {int(data[end]) * 4} at byte {end}")
    return end


def is_metadata(data: bytes) -> bool:
    """A whole DBN Metadata header and nothing else."""
    return len(data) >= 8 and data[:3] == b"DBN" and len(data) == 8 + int.from_bytes(data[4:8], "little")


def segment_dir(layout: DataLayout, state: str, dataset: str) -> Path:
    return layout.raw_dir(state, SOURCE) / partition_component(dataset)  # type: ignore[arg-type]


# -- writer --------------------------------------------------------------------------------


class DbnSegmentWriter(SegmentWriter):
    """One dataset's DBN segments, written by their own thread.

    The collector calls :meth:`put_metadata` (a new session: the open segment is closed),
    :meth:`put_records` (the records one network read completed) and :meth:`put_control` on
    the event loop; each is a deque append. The queue is bounded in records
    (``ingestion.queue_maxsize``); what does not fit is counted and written as an
    ``overflow`` event.
    """

    def __init__(
        self,
        layout: DataLayout,
        dataset: str,
        config: IngestionConfig,
        clock: Callable[[], int] = time.time_ns,
        level: int = 3,
    ) -> None:
        super().__init__(layout, SOURCE, config, clock)
        self.dataset = dataset
        self.folder = partition_component(dataset)
        self.active_dir = layout.active(SOURCE) / self.folder
        self.ready_dir = layout.ready(SOURCE) / self.folder
        self.suffix = SUFFIX
        self._compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
        self._queue: deque[tuple[int, int, int, Any, Any]] = deque()  # type: ignore[assignment]
        self._records_in = 0  # incremented by the producer only
        self._records_out = 0  # by the writer thread only: depth = in - out, no shared counter
        self._session_head: bytes | None = None
        # the session's mappings: instrument (4 bytes) -> ((recv_ns, record) per subscribed symbol); flat
        # (one tuple, not a dict, per instrument): OPRA has ~1.5M instruments
        self._mappings: dict[bytes, tuple[tuple[int, bytes], ...]] = {}
        self._named: set[bytes] = set()  # instruments all of whose known mappings the open segment holds
        self._held: list[tuple[int, int, str, dict[str, Any]]] = []  # events before any session
        self.max_events = MAX_QUEUED_EVENTS
        self._events_in = 0  # as _records_in/_records_out, for control events
        self._events_out = 0
        self.events_dropped = 0  # control events past max_events (the queue is bounded while the disk stalls)
        self._events_dropped_written = 0
        # the records written, for the refill state file (set by the collector; None: no state file)
        self.refill: RefillTracker | None = None
        self.state_writes = 0
        self._state_due = False  # records written since the last state file
        self._state_at = 0.0  # monotonic time of the last state file
        self.state_errors = 0

    # -- producer side (event loop) --------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self._records_in - self._records_out

    def has_room(self) -> bool:
        return self.queue_depth < self._maxsize

    def put_records(
        self, recv_ns: int, conn: int, records: list[bytes], mappings: list[bytes] | None = None, *, force: bool = False
    ) -> bool:
        """Queue the records of one network read; False (all counted as dropped) when they
        do not fit, unless ``force`` (symbol mappings: few, and needed to name everything)."""
        depth = self._records_in - self._records_out
        if depth + len(records) > self._maxsize and not force:
            self.dropped += len(records)
            self._mark_overflow()
            return False
        self._records_in += len(records)
        self._queue.append((RECORDS, recv_ns, conn, records, mappings))
        if depth + len(records) > self._batch_size and not self._wake.is_set():
            self._wake.set()
        return True

    def _mark_overflow(self) -> None:
        """Queue an overflow marker where the drop happened (one per run of drops, carrying the
        running totals), so the ``overflow`` event comes before the records received after it."""
        queue = self._queue
        if queue and queue[-1][0] == OVERFLOW:
            queue[-1][3][:] = (self.dropped, self.events_dropped)
        else:
            queue.append((OVERFLOW, 0, 0, [self.dropped, self.events_dropped], None))

    def put_metadata(self, recv_ns: int, conn: int, metadata: bytes) -> None:
        """A new session began: its segments start with ``metadata``."""
        self._queue.append((METADATA, recv_ns, conn, metadata, None))

    def put_control(self, recv_ns: int, conn: int, event: str, **fields: Any) -> bool:
        """Queue a control event (they explain the gaps); False when ``max_events`` are already
        waiting (a stalled disk under an event storm): counted, and written as an ``overflow``
        event (which the ETL treats as a gap) once the disk is back."""
        if self._events_in - self._events_out >= self.max_events:
            self.events_dropped += 1
            self._mark_overflow()
            return False
        self._events_in += 1
        self._queue.append((EVENT, recv_ns, conn, event, fields))
        return True

    def put_frame(self, recv_ns: int, conn: int, frame: str) -> bool:  # pragma: no cover - not a text source
        raise TypeError("DBN segments take records (put_records), not text frames")

    # -- the I/O thread ----------------------------------------------------------------

    def _count_queue_unwritten(self) -> None:
        queue = self._queue
        for _ in range(len(queue)):
            kind, _recv, _conn, data, _extra = queue.popleft()
            if kind == RECORDS:
                self.stats.unwritten += len(data)
                self._records_out += len(data)
            elif kind == EVENT:
                self.stats.unwritten_events += 1
                self._events_out += 1

    def _flush(self) -> None:
        count = len(self._queue)
        dropped, events_dropped = self.dropped, self.events_dropped  # totals: what is not written yet goes last
        if count or dropped > self._dropped_written or events_dropped > self._events_dropped_written:
            _Flush(self).run(count, dropped, events_dropped)

    def _head_frames(self) -> list[bytes]:
        """The session's metadata: a segment's mappings come beside its records (:meth:`_context`)."""
        assert self._session_head is not None
        self._named = set()
        return [self._compressor.compress(self._session_head)]

    def _remember_mappings(self, recv_ns: int, mappings: list[bytes]) -> None:
        """Mappings that came in the stream: kept for later segments, and this one has them."""
        known = self._mappings
        for record in mappings:
            instrument = record[4:8]
            symbol = record[17:88]
            others = tuple(m for m in known.get(instrument, ()) if m[1][17:88] != symbol)
            known[instrument] = (*others, (recv_ns, record))
            if not others:  # its only mapping is here now; with others, only if they were here already
                self._named.add(instrument)

    def _context(self, records: list[bytes]) -> list[tuple[int, bytes]]:
        """(recv_ns, mapping) of the instruments of ``records`` that the open segment does not
        name yet, to go just before them; each instrument is looked at once per segment."""
        named, mappings = self._named, self._mappings
        if len(named) >= len(mappings):  # every known instrument named already (the usual case)
            return []
        out: list[tuple[int, bytes]] = []
        for record in records:
            instrument = record[4:8]
            if instrument not in named and instrument in mappings:
                named.add(instrument)
                out += mappings[instrument]
        return out

    def _used_names(self) -> list[tuple[str, int]]:
        """Names used in this dataset's folders (``.last_segment`` and every raw state)."""
        names: list[str] = []
        with contextlib.suppress(OSError):
            names.append((self.active_dir / ".last_segment").read_text().strip())
        for state in RAW_STATES:
            with contextlib.suppress(OSError):
                names += os.listdir(segment_dir(self.layout, state, self.dataset))
        return [identity for identity in map(segment_identity, names) if identity is not None]

    def _append(self, frames: list[bytes], records: int, sampled: list[int]) -> None:
        """Write ``frames`` to the open segment in one append (and fsync)."""
        if not frames:
            return
        data = b"".join(frames)
        self._write_durably(data)
        self._count_flush(len(data), records, sampled)
        if records:
            self._state_due = True
            if time.monotonic() - self._state_at >= STATE_EVERY_S:
                self._save_state()

    def _rotate(self) -> None:
        if self._state_due:  # the state covers the whole segment before it goes to ready/ (and the ETL)
            self._save_state()
        super()._rotate()

    def _save_state(self) -> None:
        """Replace the refill state file (after the data it describes is durable)."""
        self._state_due, self._state_at = False, time.monotonic()
        if self.refill is not None:
            try:
                state = {**self.refill.state(), "segment": self.stats.segment, "offset": self.stats.segment_bytes}
                write_refill_state(self.active_dir / STATE_NAME, state)
                self.state_writes += 1
            except OSError as exc:  # the data is safe; a restart then refills from an older state
                self.state_errors += 1
                if self.state_errors == 1 or not self.state_errors % 1000:
                    log.warning("databento_refill_state_unwritten", dataset=self.dataset, error=repr(exc),
                                errors=self.state_errors)  # fmt: skip

    def _track_written(self, records: list[bytes]) -> None:
        """Feed the written-records tracker (the refill state reflects what is on disk)."""
        refill = self.refill
        if refill is None:
            return
        for record in records:
            rtype = record[1]
            if rtype not in CONTROL_RTYPES:
                refill.admit(rtype, record)


class _Flush:
    """One flush of a :class:`DbnSegmentWriter`: drains what was queued into frames."""

    def __init__(self, writer: DbnSegmentWriter) -> None:
        self.w = writer
        self.frames: list[bytes] = []  # complete frames not yet written
        self.framed = 0  # records in ``frames`` (repeated context mappings not counted)
        self.context = 0  # repeated context mappings among ``records``
        self.records: list[bytes] = []  # records of the pair being built
        self.stamps: list[tuple[int, int, int]] = []
        self.events = 0  # events taken but not yet written
        self.sampled: list[int] = []

    def run(self, count: int, dropped: int, events_dropped: int = 0) -> None:
        """Frame ``count`` queue items; ``dropped``/``events_dropped``: totals so far, the part no
        marker reported goes at the end."""
        w = self.w
        queue = w._queue
        try:
            for index in range(count):
                kind, recv_ns, conn, data, extra = queue.popleft()
                if kind == OVERFLOW:
                    self.overflow_to(*data)
                    continue
                if kind == EVENT:
                    w._events_out += 1
                if kind == METADATA:
                    self.write()
                    w._rotate()
                    w._session_head, w._mappings = data, {}
                    continue
                if w._fd is not None and recv_ns // NS_PER_HOUR != w._hour:
                    self.write()
                    w._rotate()
                if w._fd is None and not self.open(recv_ns):
                    self.hold(kind, recv_ns, conn, data, extra)
                    continue
                if kind == EVENT:
                    self.pair()
                    self.frames.append(event_frame(recv_ns, conn, data, extra))
                    self.events += 1
                    continue
                w._records_out += len(data)
                if extra:
                    w._remember_mappings(recv_ns, extra)
                for mapped_at, mapping in w._context(data):
                    self.records.append(mapping)
                    self.stamps.append((mapped_at, 1, 0))
                    self.context += 1
                self.records += data
                w._track_written(data)
                self.stamps.append((recv_ns, len(data), conn))
                if not index % LATENCY_SAMPLE_EVERY:
                    self.sampled.append(recv_ns)
                if len(self.records) >= MAX_FRAME_RECORDS:
                    self.pair()
                    self.rotate_if_full()
            self.overflow_to(dropped, events_dropped)
            self.write()
            self.rotate_if_full()
        except BaseException:  # given up or failed: what is in hand is lost, counted once
            w.stats.unwritten += len(self.records) - self.context + self.framed
            w.stats.unwritten_events += self.events
            raise

    def open(self, recv_ns: int) -> bool:
        """Open the next segment with its head; False while no session has begun."""
        w = self.w
        if w._session_head is None:
            return False
        w._open(recv_ns)
        self.frames += w._head_frames()
        for held in w._held:
            self.frames.append(event_frame(*held))
        self.events += len(w._held)
        w._held.clear()
        return True

    def hold(self, kind: int, recv_ns: int, conn: int, data: Any, extra: Any) -> None:
        """Before the first session nothing can be written (a segment starts with metadata):
        events wait for it; records cannot come before metadata, and are counted if they do."""
        if kind == EVENT:
            self.w._held.append((recv_ns, conn, data, extra))
        else:
            self.w._records_out += len(data)
            self.w.stats.unwritten += len(data)

    def overflow_to(self, dropped: int, events_dropped: int) -> None:
        """An ``overflow`` event for what was dropped up to these totals and not reported yet."""
        w = self.w
        records, events = dropped - w._dropped_written, events_dropped - w._events_dropped_written
        if records > 0 or events > 0:
            self.overflow(max(records, 0), max(events, 0))

    def overflow(self, dropped: int, events_dropped: int = 0) -> None:
        w = self.w
        now = w.clock()
        w._dropped_written += dropped
        w._events_dropped_written += events_dropped
        w.stats.overflow += dropped
        fields = {"dropped": dropped, **({"events_dropped": events_dropped} if events_dropped else {})}
        if w._fd is None and not self.open(now):
            w._held.append((now, 0, "overflow", fields))
            return
        self.pair()
        self.frames.append(event_frame(now, 0, "overflow", fields))
        self.events += 1

    def pair(self) -> None:
        """Close the (stamps, data) pair being built."""
        if not self.records:
            return
        self.frames += [stamps_frame(self.stamps), self.w._compressor.compress(b"".join(self.records))]
        self.framed += len(self.records) - self.context
        self.context = 0
        self.records, self.stamps = [], []

    def write(self) -> None:
        self.pair()
        if self.frames:
            self.w._append(self.frames, self.framed, self.sampled)
        self.frames, self.framed, self.events, self.sampled = [], 0, 0, []

    def rotate_if_full(self) -> None:
        w = self.w
        pending = sum(map(len, self.frames))
        if w._fd is not None and w.stats.segment_bytes + pending >= w.max_bytes and w._may_rotate_by_size():
            self.write()
            w._rotate()


# -- start-up recovery ---------------------------------------------------------------------


def split_dbn_segment(data: bytes) -> tuple[bytes, bytes, int]:
    """(kept, tail, records) of a DBN segment: frames up to the last complete (stamps, data)
    pair whose data decodes into whole records matching the stamps (and whole event frames
    before the damage). No complete metadata frame: everything is the tail."""
    handle = io.BytesIO(data)
    size = len(data)
    decompressor = zstandard.ZstdDecompressor()
    good_end, records, pos, pending = 0, 0, 0, None
    try:
        end = zstd_frame_end(handle, 0, size)
        if not is_metadata(_decompress(decompressor, data[:end])):
            return b"", data, 0
        good_end = pos = end
        while pos < size:
            end = zstd_frame_end(handle, pos, size)
            magic = int.from_bytes(data[pos : pos + 4], "little")
            payload = data[pos + 8 : end]
            if magic == SKIPPABLE_MAGIC and payload[:4] == STAMPS_TAG and pending is None:
                pending = sum(entry[1] for entry in _stamp_entries(payload))
            elif magic == SKIPPABLE_MAGIC and payload[:4] == EVENT_TAG and pending is None:
                orjson.loads(payload[4:])
                good_end = end
            elif magic != SKIPPABLE_MAGIC and pending is not None:
                if record_count(_decompress(decompressor, data[pos:end])) != pending:
                    break
                good_end, records, pending = end, records + pending, None
            else:
                break
            pos = end
    except (ZstdFrameDamaged, zstandard.ZstdError, orjson.JSONDecodeError, struct.error, ValueError):
        pass
    return data[:good_end], data[good_end:], records


def _decompress(decompressor: zstandard.ZstdDecompressor, frame: bytes) -> bytes:
    return decompressor.decompress(frame, max_output_size=MAX_FRAME_CONTENT)


def _stamp_entries(payload: bytes) -> list[tuple[int, int, int]]:
    (count,) = struct.unpack_from("<I", payload, 4)
    if len(payload) != 8 + count * STAMP.size:
        raise ValueError("stamps frame of the wrong size")
    return list(STAMP.iter_unpack(payload[8:]))


def is_dbn_segment_name(name: str) -> bool:
    return name.startswith("segment_") and name.endswith(SUFFIX) and segment_identity(name) is not None


def recover_dbn_active(layout: DataLayout, stopping: threading.Event | None = None) -> RecoveryReport:
    """Move every segment left in ``raw/active/databento/<DATASET>/`` to ``ready/``, torn
    tails to ``quarantine/databento/<DATASET>/``: the rules and the report of
    :func:`daedalus.capture.segments.recover_active`, with the DBN cut of :func:`split_dbn_segment`."""
    active = layout.active(SOURCE)
    datasets = sorted(p.name for p in active.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if active.is_dir() else []  # fmt: skip
    folders = [(active / name, layout.ready(SOURCE) / name, layout.quarantine(SOURCE) / name) for name in datasets]
    return recover_folders(SOURCE, folders, is_dbn_segment_name, lambda _name: split_dbn_segment, stopping)


# -- reader --------------------------------------------------------------------------------


@dataclass
class DbnChunk:
    records: bytes  # whole DBN records, concatenated
    local_ns: np.ndarray | None  # int64 per record: local receive time; None when the file has no stamps
    conn: np.ndarray | None  # uint32 per record (0 = repeated context record)
    events: list[dict[str, Any]] = field(default_factory=list)  # control events before these records


class DbnSegmentReader:
    """A DBN segment (ours, stamped) or a plain ``.dbn`` / ``.dbn.zst`` file, read in bounded
    chunks: ``metadata`` is known once opened; iterate once for :class:`DbnChunk`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._handle: BinaryIO = self.path.open("rb")
        try:
            self._size = self._handle.seek(0, os.SEEK_END)
            self._stamped_from: int | None = None
            self._stream: BinaryIO | None = None
            self.metadata = self._open()
        except BaseException:
            self._handle.close()
            raise

    def _open(self) -> bytes:
        handle = self._handle
        handle.seek(0)
        if handle.read(4) == (0xFD2FB528).to_bytes(4, "little"):
            first_end = zstd_frame_end(handle, 0, self._size)
            handle.seek(first_end)
            head = handle.read(12)
            if (
                len(head) == 12
                and int.from_bytes(head[:4], "little") == SKIPPABLE_MAGIC
                and head[8:]
                in (
                    STAMPS_TAG,
                    EVENT_TAG,
                )
            ):
                handle.seek(0)
                metadata = _decompress(zstandard.ZstdDecompressor(), handle.read(first_end))
                if not is_metadata(metadata):
                    raise ZstdFrameDamaged(f"{self.path.name}: the first frame is not a DBN metadata header")
                self._stamped_from = first_end
                return metadata
            handle.seek(0)
            self._stream = zstandard.ZstdDecompressor().stream_reader(handle, read_across_frames=True)  # type: ignore[assignment]
        else:
            handle.seek(0)
            self._stream = handle
        assert self._stream is not None
        head = _read_exact(self._stream, 8)
        if head[:3] != b"DBN":
            raise ZstdFrameDamaged(f"{self.path.name}: not a DBN stream (no DBN header)")
        return head + _read_exact(self._stream, int.from_bytes(head[4:8], "little"))

    def __iter__(self) -> Iterator[DbnChunk]:
        try:
            if self._stamped_from is not None:
                yield from self._stamped()
            else:
                yield from self._plain()
        finally:
            self.close()

    def _stamped(self) -> Iterator[DbnChunk]:
        import numpy as np

        handle, size = self._handle, self._size
        decompressor = zstandard.ZstdDecompressor()
        pos = self._stamped_from or 0
        events: list[dict[str, Any]] = []
        entries: list[tuple[int, int, int]] | None = None
        while pos < size:
            end = zstd_frame_end(handle, pos, size)
            handle.seek(pos)
            frame = handle.read(end - pos)
            if int.from_bytes(frame[:4], "little") == SKIPPABLE_MAGIC:
                payload = frame[8:]
                if payload[:4] == STAMPS_TAG:
                    entries = _stamp_entries(payload)
                elif payload[:4] == EVENT_TAG:
                    events.append(orjson.loads(payload[4:]))
            else:
                if entries is None:
                    raise ZstdFrameDamaged(f"{self.path.name}: data frame at byte {pos} without stamps")
                records = _decompress(decompressor, frame)
                counts = np.fromiter((e[1] for e in entries), dtype=np.int64, count=len(entries))
                if record_count(records) != int(counts.sum()):
                    raise ZstdFrameDamaged(f"{self.path.name}: data frame at byte {pos} does not match its stamps")
                local = np.repeat(np.fromiter((e[0] for e in entries), np.int64, len(entries)), counts)
                conn = np.repeat(np.fromiter((e[2] for e in entries), np.uint32, len(entries)), counts)
                yield DbnChunk(records, local, conn, events)
                events, entries = [], None
            pos = end
        if events:
            yield DbnChunk(b"", np.empty(0, np.int64), np.empty(0, np.uint32), events)

    def _plain(self) -> Iterator[DbnChunk]:
        stream = self._stream
        assert stream is not None
        held = b""
        while True:
            block = stream.read(PLAIN_CHUNK)
            data = held + block if held else block
            if not block:
                if data:
                    raise ZstdFrameDamaged(f"{self.path.name}: the file ends inside a DBN record ({len(data)} bytes)")
                return
            cut = whole_records_end(data)
            held = data[cut:]
            if cut:
                yield DbnChunk(data[:cut], None, None, [])

    def close(self) -> None:
        if self._stream is not None and self._stream is not self._handle:
            with contextlib.suppress(Exception):
                self._stream.close()
        self._handle.close()

    def __enter__(self) -> DbnSegmentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = b""
    while len(data) < n:
        block = stream.read(n - len(data))
        if not block:
            raise ZstdFrameDamaged(f"the file ends inside the DBN header ({len(data)} of {n} bytes)")
        data += block
    return data


def newest_segment(layout: DataLayout, dataset: str) -> Path | None:
    """The newest segment of ``dataset`` still on disk (ready, processing or archive), by name."""
    found: list[tuple[tuple[str, int], Path]] = []
    for state in ("ready", "processing", "archive"):
        folder = segment_dir(layout, state, dataset)
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                identity = segment_identity(name)
                if identity is not None and is_dbn_segment_name(name):
                    found.append((identity, folder / name))
    return max(found)[1] if found else None


def last_events(path: Path, skip: frozenset[int] = frozenset((21, 22, 23))) -> dict[int, tuple[int, list[bytes]]]:
    """Per rtype of a segment's received records (not ``skip``, not repeated context): the
    newest ts_event and the records at it, in order. A restart refills from there."""
    out: dict[int, tuple[int, list[bytes]]] = {}
    for chunk in open_dbn_segment(path):
        buf = np.frombuffer(chunk.records, np.uint8)
        offsets, _end, _problem = walk_records(buf)
        if not len(offsets):
            continue
        rtypes = buf[offsets + 1]
        ts = buf[offsets[:, None] + np.arange(8, 16)].copy().view("<u8").ravel()
        live = np.ones(len(offsets), bool) if chunk.conn is None else chunk.conn > 0
        for rtype in np.unique(rtypes).tolist():
            if rtype in skip:
                continue
            mine = (rtypes == rtype) & live
            if not mine.any():
                continue
            newest = int(ts[mine].max())
            at = offsets[mine & (ts == newest)].tolist()
            records = [chunk.records[i : i + chunk.records[i] * 4] for i in at]
            held = out.get(rtype)
            if held is None or newest > held[0]:
                out[rtype] = (newest, records)
            elif newest == held[0]:
                held[1].extend(records)
    return out


def written_after(layout: DataLayout, dataset: str, segment: str, offset: int) -> list[bytes]:
    """The received market records written after byte ``offset`` of ``segment`` (in it and in the
    later segments), wherever they are now (active, ready, processing, archive): what a state file
    written before a crash does not cover."""
    after = segment_identity(segment)
    if after is None:
        return []
    paths: dict[str, Path] = {}
    for state in ("active", "ready", "processing", "archive"):
        with contextlib.suppress(OSError):
            for name in os.listdir(segment_dir(layout, state, dataset)):
                identity = segment_identity(name)
                if is_dbn_segment_name(name) and identity is not None and identity >= after:
                    paths[name] = segment_dir(layout, state, dataset) / name
    out: list[bytes] = []
    for name in sorted(paths, key=segment_identity):  # type: ignore[arg-type,return-value]
        reader = open_dbn_segment(paths[name])
        if reader._stamped_from is None:  # not ours
            reader.close()
            continue
        if name == segment:
            reader._stamped_from = max(reader._stamped_from, offset)
        for chunk in reader:
            view, pos = chunk.records, 0
            conn = chunk.conn
            index = 0
            while pos < len(view):
                size = view[pos] * 4
                if conn is not None and conn[index] > 0 and view[pos + 1] not in CONTROL_RTYPES:
                    out.append(view[pos : pos + size])
                pos += size
                index += 1
    return out


def open_dbn_segment(path: Path | str) -> DbnSegmentReader:
    """The reader of a DBN segment or plain DBN file (see :class:`DbnSegmentReader`)."""
    return DbnSegmentReader(Path(path))
