"""The streaming Parquet raw writer (``raw_format: parquet``, the ccxt path; architecture 3.1, 3.3).

Collectors hand over ccxt's unified records with :meth:`RecordWriter.put_record` (event-loop
side: a bounded deque, never blocks); a writer thread turns them into typed Arrow batches,
one buffer per partition ``(channel, exchange, symbol, hour of recv_ns)``, under
``raw/<state>/<source>/<channel>/exchange=/symbol=/year=/month=/day=/hour=``.

Why two file formats: an unclosed Parquet file has no footer and is unreadable after a
crash, so the open segment is an Arrow IPC *stream* in ``active/`` (one message per flush,
fsynced when ``fsync``), which a SIGKILL leaves readable up to its last complete batch. At
rotation (``segment_max_mb``, hour change), LRU eviction (``max_open_writers``) or close it
becomes Parquet: written to a hidden temporary name in ``ready/``, fsynced, renamed, then
the IPC file is deleted. :func:`recover` does the same at start-up for every IPC file left
behind; if the Parquet file already exists (crash between rename and delete) it only
deletes the IPC file, so no record is ever duplicated.

Memory is bounded by construction: buffered rows are compact (order-book levels as flat
``array('d')``, not tuples of floats) and each row's size is charged to a budget shared by all
partitions (``max_buffered_bytes``); when a row takes the total over it, the largest buffers
are first compacted in memory into Arrow batches (trades and tickers shrink ~5x), and only
when that is not enough flushed early into their open IPC segment, which changes batch sizes,
not the data.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
import threading
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from daedalus.capture.segments import fsync_path, write_atomically
from daedalus.config import IngestionConfig
from daedalus.layout import (
    RAW_STATES,
    DataLayout,
    prune_empty_dirs,
    segment_hour_of_ns,
    segment_identity,
    segment_name_for_hour,
)
from daedalus.logs import get_logger

log = get_logger(__name__)

HOUR_NS = 3_600_000_000_000
IPC_SUFFIX = ".arrow"
PARQUET_SUFFIX = ".parquet"
REJECTED_FILE = "rejected.ndjson"
ROW_GROUP_ROWS = 65_536  # rows per Parquet row group when converting (many small IPC batches)
ROW_GROUP_BYTES = 8 * 2**20  # ... or fewer: 65,536 rows of 40-level books would be ~40 MB in memory
MAX_BUFFERED_BYTES = 4 * 2**20  # default budget of rows buffered across all partitions
COMPACT_MIN_BYTES = 16 * 1024  # Python rows of one partition worth turning into an Arrow batch
BATCH_OVERHEAD = 1024  # charged per compacted batch on top of its buffers (objects, padding)
MAX_DRAIN = 20_000  # records routed per round before flush deadlines are checked again
MAX_QUEUED_BYTES = 4 * 2**20  # default budget of the input queue, by estimate (see queued_cost)
# What a queued record is charged, estimated without walking the dict (put_record runs on the
# event loop): ccxt's unified trades and tickers are dicts of ~15-25 keys with the exchange's raw
# message under "info"; a book cut by the collector is a small dict plus one 2-float list per level.
QUEUE_ENTRY_BYTES = 200  # the queue's tuple, seq and recv_ns ints, the deque slot
RECORD_COST = {"trades": 1024, "ticker": 1536, "orderbook": 512}
LEVEL_COST = 128  # [price, amount]: a list of two floats and its slot in bids/asks
OTHER_COST = 1024  # unknown channels (quarantined on the writer thread, but queued first)
COUNTER_FLOOR_FILE = ".counter_floor"  # "<hour> <counter>": no partition of that hour has used it yet
COUNTER_BLOCK = 50
RELEASE_INTERVAL_S = 0.0  # at most this often, return the memory a Parquet conversion freed (see release_memory)

TS = pa.timestamp("ns", tz="UTC")
LEVEL = pa.struct([("price", pa.float64()), ("amount", pa.float64())])


class RecordRejected(ValueError):
    """A record does not fit its channel's schema: it goes to quarantine, never to a segment."""


# --- typed schemas and row extraction ---------------------------------------------------
# Each channel: (column, ccxt key, kind). ``ts_recv`` and ``ts_event`` come first in every
# schema. ``unified_symbol`` (not ``symbol``) so it never clashes with the Hive partition key.

_F64, _STR, _I64, _LEVELS, _TS_MS = "f64", "str", "i64", "levels", "ts_ms"
_KIND_TYPES = {_F64: pa.float64(), _STR: pa.string(), _I64: pa.int64(), _LEVELS: pa.list_(LEVEL), _TS_MS: TS}

FIELDS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "ticker": (
        ("ts_event", "timestamp", _TS_MS),
        ("unified_symbol", "symbol", _STR),
        ("bid", "bid", _F64),
        ("ask", "ask", _F64),
        ("last", "last", _F64),
        ("bid_volume", "bidVolume", _F64),
        ("ask_volume", "askVolume", _F64),
        ("open", "open", _F64),
        ("high", "high", _F64),
        ("low", "low", _F64),
        ("close", "close", _F64),
        ("vwap", "vwap", _F64),
        ("change", "change", _F64),
        ("percentage", "percentage", _F64),
        ("average", "average", _F64),
        ("base_volume", "baseVolume", _F64),
        ("quote_volume", "quoteVolume", _F64),
    ),
    "trades": (
        ("ts_event", "timestamp", _TS_MS),
        ("unified_symbol", "symbol", _STR),
        ("trade_id", "id", _STR),
        ("order_id", "order", _STR),
        ("type", "type", _STR),
        ("side", "side", _STR),
        ("taker_or_maker", "takerOrMaker", _STR),
        ("price", "price", _F64),
        ("amount", "amount", _F64),
        ("cost", "cost", _F64),
    ),
    "orderbook": (
        ("ts_event", "timestamp", _TS_MS),
        ("unified_symbol", "symbol", _STR),
        ("nonce", "nonce", _I64),
        ("bids", "bids", _LEVELS),
        ("asks", "asks", _LEVELS),
    ),
}

SCHEMAS: dict[str, pa.Schema] = {
    channel: pa.schema([pa.field("ts_recv", TS, nullable=False)]
                       + [pa.field(column, _KIND_TYPES[kind]) for column, _, kind in fields])
    for channel, fields in FIELDS.items()
}  # fmt: skip

_MAX_MS = (2**63 - 1) // 1_000_000


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordRejected(f"expected a number, got {type(value).__name__}")
    return float(value)


def _convert(kind: str, value: Any) -> Any:
    """One ccxt value as its column's Python value; ``None`` stays null; wrong types raise."""
    if value is None:
        return None
    if kind == _F64:
        return _number(value)
    if kind == _STR:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)  # some exchanges give numeric trade ids
        raise RecordRejected(f"expected a string, got {type(value).__name__}")
    if kind == _TS_MS:
        ms = _number(value)
        if not 0 <= ms <= _MAX_MS:
            raise RecordRejected(f"timestamp {value!r} out of range")
        return int(ms * 1_000_000) if isinstance(value, float) else value * 1_000_000
    if kind == _I64:
        if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
            raise RecordRejected(f"expected an int64, got {value!r}")
        return value
    if not isinstance(value, list | tuple):  # _LEVELS: [[price, amount, ...], ...]
        raise RecordRejected(f"expected a list of levels, got {type(value).__name__}")
    # Flat (price, amount, price, amount, ...) doubles: 16 bytes a level instead of ~100 as a
    # tuple of two floats; the buffers of a hundred book partitions are most of the writer's memory.
    # Fast path for the usual shape (lists of floats); anything else is checked level by level.
    with contextlib.suppress(IndexError, TypeError, KeyError):
        flat = [x for level in value if type(level) is list for x in (level[0], level[1])]
        if len(flat) == 2 * len(value) and all(type(x) is float for x in flat):
            return array("d", flat)
    levels = array("d")
    for level in value:
        if not isinstance(level, list | tuple) or len(level) < 2:
            raise RecordRejected(f"level {level!r} is not [price, amount]")
        levels.append(_number(level[0]))
        levels.append(_number(level[1]))
    return levels


def record_row(channel: str, recv_ns: int, record: dict[str, Any]) -> tuple[Any, ...]:
    """The row a unified record becomes (schema order), or :class:`RecordRejected`."""
    if not isinstance(record, dict):
        raise RecordRejected(f"record is a {type(record).__name__}, not a dict")
    try:
        fields = FIELDS[channel]
    except KeyError:
        raise RecordRejected(f"unknown channel {channel!r}") from None
    get = record.get
    return (recv_ns, *[_convert(kind, get(key)) for _, key, kind in fields])


def queued_cost(channel: str, record: Any) -> int:
    """Estimated bytes a queued record holds, charged to the queue budget on put and released on
    drain: a fixed cost per channel plus ``LEVEL_COST`` a book level (``len`` only: O(1)). Never
    raises: a malformed record is quarantined on the writer thread, not refused here."""
    cost = QUEUE_ENTRY_BYTES + RECORD_COST.get(channel, OTHER_COST)
    if channel == "orderbook" and type(record) is dict:
        for side in ("bids", "asks"):
            levels = record.get(side)
            if type(levels) is list:
                cost += LEVEL_COST * len(levels)
    return cost


def row_bytes(row: tuple[Any, ...]) -> int:
    """What a buffered row costs, charged to the buffer budget: the tuple and every non-null
    value, shared objects and None included, so the estimate errs high (level arrays count their data)."""
    return sys.getsizeof(row) + sum(map(sys.getsizeof, row))


def levels_to_array(values: tuple[array | None, ...]) -> pa.Array:
    """A ``list<struct<price, amount>>`` column from flat level arrays (None: a null list)."""
    flat = array("d")
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    nulls = [value is None for value in values]
    for i, levels in enumerate(values):
        if levels is not None:
            flat.extend(levels)
        offsets[i + 1] = len(flat) // 2
    pairs = np.frombuffer(flat, dtype=np.float64) if flat else np.zeros(0, dtype=np.float64)
    struct = pa.StructArray.from_arrays([pa.array(pairs[0::2]), pa.array(pairs[1::2])], fields=list(LEVEL))
    mask = pa.array(nulls, pa.bool_()) if any(nulls) else None
    return pa.ListArray.from_arrays(pa.array(offsets), struct, type=pa.list_(LEVEL), mask=mask)


def rows_to_batch(channel: str, rows: list[tuple[Any, ...]]) -> pa.RecordBatch:
    schema = SCHEMAS[channel]
    columns = list(zip(*rows, strict=True))
    arrays = [levels_to_array(values) if f.type == pa.list_(LEVEL) else pa.array(values, type=f.type)
              for values, f in zip(columns, schema, strict=True)]  # fmt: skip
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# --- stats ----------------------------------------------------------------------------


def _mb(value: int) -> str:
    return f"{value / 2**20:.1f}MB"


@dataclass
class RecordWriterStats:
    """Counters read by the stats line and metrics. Each field has one writing thread, so no
    lock is needed: the event loop writes ``accepted``, ``overflow*`` and ``peak_queue*``, the
    writer thread everything else. Live gauges (queue depth, queued bytes) are properties of
    :class:`RecordWriter`; :meth:`RecordWriter.snapshot` puts both in one dict."""

    accepted: int = 0
    overflow: int = 0  # records refused by put_record (queue full by count or by bytes), never queued
    overflow_bytes: int = 0  # ... of which refused by the byte budget (the count had room)
    peak_queue_depth: int = 0
    peak_queued_bytes: int = 0  # highest estimated bytes queued (<= max_queued_bytes + one record)
    records_written: int = 0  # in an IPC segment, flushed (and fsynced when configured)
    flushes: int = 0
    rotations: int = 0  # size or hour
    evictions: int = 0  # LRU, over max_open_writers
    segments_finalised: int = 0
    open_writers: int = 0
    write_errors: int = 0
    records_lost: int = 0  # rows of a batch whose write failed
    quarantined: int = 0
    stale_cleanups: int = 0
    early_flushes: int = 0  # flushed before batch_size because the buffer budget was reached
    compactions: int = 0  # buffered rows turned into an in-memory Arrow batch to fit the budget
    buffered_bytes: int = 0  # row_bytes of every buffered row, now (<= max_buffered_bytes)
    peak_buffered_bytes: int = 0  # highest buffered_bytes once a routed record's budget is settled
    durable_seq: int = 0  # every record put with seq <= this is flushed, quarantined or lost

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# --- converting IPC to Parquet (shared by rotation and recovery) -------------------------


@dataclass
class IpcRead:
    rows: int
    good_bytes: int  # offset just after the last complete message
    size: int


def _iter_ipc_batches(path: Path, out: IpcRead) -> Iterator[pa.RecordBatch]:
    """Batches of an IPC stream up to the last complete one; ``out`` learns where the
    readable prefix ends (a torn tail after it is not an error here: it is the crash)."""
    out.size = path.stat().st_size
    with pa.OSFile(str(path), "rb") as source:
        try:
            reader = pa.ipc.open_stream(source)
        except (pa.ArrowInvalid, OSError):
            return
        out.good_bytes = source.tell()
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                out.good_bytes = source.tell()
                return
            except (pa.ArrowInvalid, OSError):
                return
            out.good_bytes = source.tell()
            out.rows += batch.num_rows
            yield batch


def ipc_to_parquet(ipc: Path, target: Path, *, compression: str, compression_level: int | None,
                   fsync: bool) -> IpcRead:  # fmt: skip
    """Write ``ipc``'s readable prefix as Parquet at ``target``, atomically (hidden temporary
    name, fsync, rename, folder fsync). Writes nothing when no batch is readable."""
    _make_partition_dir(target.parent)
    tmp = target.with_name(f".{target.name}.tmp")
    read = IpcRead(0, 0, 0)
    writer: pq.ParquetWriter | None = None
    pending: list[pa.RecordBatch] = []
    pending_rows = pending_bytes = 0
    codec = None if compression == "none" else compression
    try:
        for batch in _iter_ipc_batches(ipc, read):
            if writer is None:
                writer = _open_parquet_writer(tmp, batch.schema, codec, compression_level)
            pending.append(batch)
            pending_rows += batch.num_rows
            pending_bytes += batch.nbytes
            if pending_rows >= ROW_GROUP_ROWS or pending_bytes >= ROW_GROUP_BYTES:
                writer.write_table(pa.Table.from_batches(pending))
                pending, pending_rows, pending_bytes = [], 0, 0
        if writer is None:
            return read
        if pending:
            writer.write_table(pa.Table.from_batches(pending))
        writer.close()
        writer = None
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, target)
        if fsync:
            fsync_path(target.parent)
        return read
    finally:
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _make_partition_dir(path: Path) -> None:
    """Create a ``ready/`` partition folder (a seam of its own so a test can race the ETL here)."""
    path.mkdir(parents=True, exist_ok=True)


def _open_parquet_writer(tmp: Path, schema: pa.Schema, codec: str | None,
                         compression_level: int | None) -> pq.ParquetWriter:  # fmt: skip
    """Open the temporary Parquet file, creating its folder again once if it has gone: the ETL
    prunes empty ``ready/<partition>/`` folders, and one may be removed between our ``mkdir`` and
    this open. A second disappearance is not a race any more: the error propagates."""

    def open_writer() -> pq.ParquetWriter:
        return pq.ParquetWriter(str(tmp), schema, compression=codec or "none",
                                compression_level=compression_level if codec else None)  # fmt: skip

    try:
        return open_writer()
    except FileNotFoundError:
        if tmp.parent.is_dir():
            raise  # something else is missing: not the pruned folder
        log.warning("record_writer_ready_dir_vanished", folder=str(tmp.parent))
        _make_partition_dir(tmp.parent)
        return open_writer()


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None elsewhere: musl, macOS, Windows have no such call)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _glibc_malloc_trim()


def release_memory() -> None:
    """Give back to the OS what the allocators keep after a Parquet conversion has freed its
    buffers. Measured (bench/RESULTS.md, 350 partitions): pyarrow's default mimalloc pool keeps the
    pages of finished conversions, so finalising 350 segments at close raised RSS ~5 MB above the
    writing peak with < 0.1 MB of Arrow memory live; glibc keeps freed chunks of the writer
    thread's arena likewise. ``release_unused`` (``mi_collect``) and ``malloc_trim(0)`` cost a few
    microseconds when there is little to return. Neither changes the process's allocator choice."""
    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass
class RecoveryReport:
    converted: int = 0
    records: int = 0
    already_done: int = 0  # Parquet was there: only the IPC file was removed
    torn_tails: int = 0
    empty: int = 0
    temp_removed: int = 0
    files: list[str] = field(default_factory=list)


def recover(layout: DataLayout, source: str, *, compression: str = "zstd", compression_level: int | None = None,
            fsync: bool = True) -> RecoveryReport:  # fmt: skip
    """Turn every IPC segment left in ``active/<source>`` into Parquet in ``ready/`` (run
    before the writer starts). A torn tail goes to ``quarantine/`` named with its byte
    offset; an IPC file whose Parquet already exists anywhere downstream is just deleted."""
    report = RecoveryReport()
    active, ready = layout.active(source), layout.ready(source)
    for tmp in sorted(ready.rglob(f".*{PARQUET_SUFFIX}.tmp")) if ready.exists() else []:
        tmp.unlink()
        report.temp_removed += 1
    for ipc in sorted(active.rglob(f"*{IPC_SUFFIX}")) if active.exists() else []:
        relative = ipc.relative_to(active).with_suffix(PARQUET_SUFFIX)
        downstream = [layout.raw_dir(state, source) / relative for state in RAW_STATES if state != "active"]
        if any(path.exists() for path in downstream):
            report.already_done += 1
        else:
            read = ipc_to_parquet(ipc, ready / relative, compression=compression,
                                  compression_level=compression_level, fsync=fsync)  # fmt: skip
            if read.good_bytes < read.size:
                _quarantine_tail(layout, source, ipc, relative, read.good_bytes)
                report.torn_tails += 1
            if read.rows:
                report.converted += 1
                report.records += read.rows
                report.files.append(str(relative))
            else:
                report.empty += 1
        ipc.unlink()
        if fsync:
            fsync_path(ipc.parent)
        prune_empty_dirs(ipc.parent, active)
    log.info("record_writer_recovered", source=source, converted=report.converted, records=report.records,
             already_done=report.already_done, torn_tails=report.torn_tails, empty=report.empty)  # fmt: skip
    return report


def _quarantine_tail(layout: DataLayout, source: str, ipc: Path, relative: Path, offset: int) -> None:
    with ipc.open("rb") as handle:
        handle.seek(offset)
        tail = handle.read()
    target = layout.quarantine(source) / relative.parent / f"{relative.stem}.tail-at-{offset}{IPC_SUFFIX}"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, tail)
    log.warning("record_writer_torn_tail", file=str(ipc), offset=offset, bytes=len(tail))


# --- the writer ---------------------------------------------------------------------------


@dataclass
class OpenSegment:
    """One IPC stream being written in ``active/``."""

    path: Path
    handle: Any
    writer: pa.ipc.RecordBatchStreamWriter
    rows: int = 0


@dataclass
class Partition:
    channel: str
    exchange: str
    symbol: str
    hour: str
    hour_index: int  # recv_ns // HOUR_NS
    relative: Path  # below raw/<state>/<source>
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    compacted: list[pa.RecordBatch] = field(default_factory=list)  # older buffered rows, as Arrow
    compacted_rows: int = 0
    buffered_bytes: int = 0  # row_bytes of ``rows`` + charged bytes of ``compacted``
    compacted_bytes: int = 0
    seqs_from: int = 0  # seq of the oldest buffered row
    since: float = 0.0  # monotonic time of the oldest buffered row
    last_used: float = 0.0
    next_counter: int | None = None
    segment: OpenSegment | None = None

    @property
    def pending(self) -> bool:
        """Anything buffered (Python rows or compacted batches), not yet in a segment."""
        return bool(self.rows or self.compacted)

    @property
    def buffered_rows(self) -> int:
        return len(self.rows) + self.compacted_rows


QueueItem = tuple[int, str, str, str, int, Any, int]  # seq, channel, exchange, symbol, recv_ns, record, cost
PartitionKey = tuple[str, str, str, int]  # channel, exchange, symbol, hour index


class RecordWriter:
    """Bounded queue + writer thread turning unified ccxt records into partitioned segments."""

    def __init__(self, layout: DataLayout, ingestion: IngestionConfig, *, source: str = "ccxt",
                 clock: Callable[[], int] = time.time_ns,
                 on_flush: Callable[[int], None] | None = None,
                 max_buffered_bytes: int = MAX_BUFFERED_BYTES,
                 max_queued_bytes: int = MAX_QUEUED_BYTES) -> None:  # fmt: skip
        self.layout = layout
        self.source = source
        self.config = ingestion
        self.clock = clock
        self.on_flush = on_flush  # called on the writer thread with stats.durable_seq
        self.stats = RecordWriterStats()
        self._queue: deque[QueueItem] = deque()
        self._maxsize = ingestion.parquet_queue_maxsize
        # The queue's byte budget: the entry count alone bounds nothing (50,000 books of 20
        # levels a side hold ~250 MB). Two counters, each written by one thread only (no lock):
        # queued bytes = _enqueued_bytes - _dequeued_bytes.
        self._max_queued_bytes = max_queued_bytes
        self._enqueued_bytes = 0  # event loop
        self._dequeued_bytes = 0  # writer thread
        self._status_at = (time.monotonic(), 0)  # (when, records_written) of the last status_line
        self._seq = 0
        self._partitions: dict[PartitionKey, Partition] = {}
        self._next_counters: dict[PartitionKey, int] = {}  # outlives a partition forgotten while idle
        self._open: OrderedDict[PartitionKey, Partition] = OrderedDict()  # least recently written first
        self._drained_seq = 0
        self._max_hour = 0
        self._segment_bytes = int(ingestion.segment_max_mb * 1024 * 1024)
        self._max_buffered = max_buffered_bytes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ipc_options = pa.ipc.IpcWriteOptions(compression="lz4")
        self._active_root = layout.active(source)
        self._floor: tuple[str, int] | None = None  # (hour, counter) the last run reserved up to
        self._reserved: tuple[str, int] = ("", 0)  # ... and this run, as written to .counter_floor
        self._released_at = 0.0  # monotonic time of the last release_memory()
        self.releases = 0  # release_memory() calls (not a stats field: the stats line need not show it)

    # event-loop side -------------------------------------------------------------------

    def put_record(self, *, channel: str, exchange: str, symbol: str, recv_ns: int, record: dict[str, Any]) -> bool:
        """Queue one unified record; False (dropped, counted in ``overflow``) when the queue is
        full by entries or by estimated bytes (:func:`queued_cost`). Never blocks, never does I/O:
        conversion and validation happen on the writer thread. A record is always taken into an
        empty queue, however big, so none is refused for ever."""
        stats, queue = self.stats, self._queue
        depth = len(queue)
        cost = queued_cost(channel, record)
        queued = self._enqueued_bytes - self._dequeued_bytes
        if depth >= self._maxsize or (depth and queued + cost > self._max_queued_bytes):
            stats.overflow += 1
            if depth < self._maxsize:
                stats.overflow_bytes += 1
            return False
        self._seq += 1
        queue.append((self._seq, channel, exchange, symbol, recv_ns, record, cost))
        self._enqueued_bytes += cost
        stats.accepted += 1
        if depth >= stats.peak_queue_depth:
            stats.peak_queue_depth = depth + 1
        if queued + cost > stats.peak_queued_bytes:
            stats.peak_queued_bytes = queued + cost
        return True

    @property
    def queue_depth(self) -> int:
        """Records accepted and not yet routed by the writer thread."""
        return len(self._queue)

    @property
    def queue_capacity(self) -> int:
        return self._maxsize

    @property
    def queued_bytes(self) -> int:
        """Estimated bytes the queue holds now (:func:`queued_cost` of each queued record)."""
        return max(0, self._enqueued_bytes - self._dequeued_bytes)

    @property
    def max_queued_bytes(self) -> int:
        return self._max_queued_bytes

    def snapshot(self) -> dict[str, int]:
        """Counters and live gauges in one dict, for heartbeats, metrics and tests."""
        return self.stats.as_dict() | {
            "queue_depth": self.queue_depth, "queue_capacity": self._maxsize, "queued_bytes": self.queued_bytes,
            "max_queued_bytes": self._max_queued_bytes, "max_buffered_bytes": self._max_buffered,
            "max_open_writers": self.config.max_open_writers,
        }  # fmt: skip

    def status_line(self) -> str:
        """The writer's line of the periodic stats output; the rate is since the previous call."""
        s, now = self.stats, time.monotonic()
        then, written_then = self._status_at
        self._status_at = (now, s.records_written)
        rate = (s.records_written - written_then) / max(now - then, 1e-9)
        depth, cap = self.queue_depth, self._maxsize
        return (
            f"[writer] written={s.records_written:,} ({rate:,.0f}/s) queue={depth:,}/{cap:,} "
            f"({_mb(self.queued_bytes)}/{_mb(self._max_queued_bytes)}) overflow={s.overflow:,} "
            f"open={s.open_writers}/{self.config.max_open_writers} evictions={s.evictions:,} "
            f"rotations={s.rotations:,} finalised={s.segments_finalised:,} quarantined={s.quarantined:,} "
            f"write_errors={s.write_errors:,} buffered={_mb(s.buffered_bytes)}/{_mb(self._max_buffered)}"
            + (f" lost={s.records_lost:,}" if s.records_lost else "")
            + (f" stale_cleanups={s.stale_cleanups:,}" if s.stale_cleanups else "")
        )

    @property
    def last_seq(self) -> int:
        """Seq of the last accepted record (seqs are 1, 2, ... in acceptance order)."""
        return self._seq

    # lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"record-writer-{self.source}", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> bool:
        """Flush everything queued and finalise every open segment into ``ready/``. True when
        done within ``timeout``; without a started thread the work runs here."""
        self._stop.set()
        if self._thread is None:
            self._finish()
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # writer thread -------------------------------------------------------------------------

    def _run(self) -> None:
        interval = self.config.flush_interval_seconds
        poll = min(0.05, interval / 4)
        next_maintenance = time.monotonic() + interval
        while not self._stop.is_set():
            try:
                self._drain()
                self._flush_due(time.monotonic() - interval)
                if time.monotonic() >= next_maintenance:
                    self._maintenance()
                    next_maintenance = time.monotonic() + interval
            except Exception:  # a bug must not silently stop capture: log, count, go on
                self.stats.write_errors += 1
                log.error("record_writer_loop_failed", exc_info=True)
            if not self._queue:
                self._stop.wait(poll)
        self._finish()

    def _finish(self) -> None:
        while self._queue:
            self._drain()
        self._flush_due(float("inf"))
        for partition in list(self._open.values()):
            self._finalise(partition)
        self._release_memory(force=True)
        self._publish_durable()
        log.info("record_writer_closed", source=self.source, **self.stats.as_dict())

    def _drain(self) -> None:
        queue, now = self._queue, time.monotonic()
        batch_size = self.config.batch_size
        for _ in range(min(len(queue), MAX_DRAIN)):
            seq, channel, exchange, symbol, recv_ns, record, cost = queue.popleft()
            self._drained_seq = seq
            self._dequeued_bytes += cost  # released at once: the record is no longer referenced here
            hour_index = recv_ns // HOUR_NS if isinstance(recv_ns, int) else -1
            try:
                if hour_index < 0:
                    raise RecordRejected(f"recv_ns {recv_ns!r} is not a positive int")
                row = record_row(channel, recv_ns, record)
            except RecordRejected as reason:
                self._reject(channel, exchange, symbol, recv_ns, record, str(reason))
                continue
            key = (channel, exchange, symbol, hour_index)
            partition = self._partitions.get(key) or self._new_partition(key)
            size = row_bytes(row)
            if self.stats.buffered_bytes + size > self._max_buffered:
                self._make_room(size)  # before the append: the budget holds at every moment
            if not partition.pending:
                partition.seqs_from, partition.since = seq, now
            partition.rows.append(row)
            partition.buffered_bytes += size
            self.stats.buffered_bytes += size
            partition.last_used = now
            if partition.buffered_rows >= batch_size or partition.buffered_bytes > self._max_buffered:
                self._flush(partition)  # (the second case: a single row bigger than the whole budget)
            self.stats.peak_buffered_bytes = max(self.stats.peak_buffered_bytes, self.stats.buffered_bytes)
            if hour_index > self._max_hour:
                self._hour_changed(hour_index)
        self._publish_durable()

    def _new_partition(self, key: PartitionKey) -> Partition:
        channel, exchange, symbol, hour_index = key
        hour = segment_hour_of_ns(hour_index * HOUR_NS)
        path = self.layout.raw_partition_dir("active", self.source, channel, exchange=exchange, symbol=symbol,
                                             hour=hour)  # fmt: skip
        partition = Partition(channel, exchange, symbol, hour, hour_index, path.relative_to(self._active_root))
        partition.next_counter = self._next_counters.get(key)  # a partition forgotten while idle comes back
        self._partitions[key] = partition
        return partition

    def _flush_due(self, older_than: float) -> None:
        for partition in list(self._partitions.values()):
            if partition.pending and partition.since <= older_than:
                self._flush(partition)
        self._publish_durable()

    def _make_room(self, size: int) -> None:
        """A row of ``size`` bytes would exceed the buffer budget: flush the largest buffers
        first. They go to their open IPC segment like any flush (smaller batches, same records,
        same durability)."""
        while self.stats.buffered_bytes and self.stats.buffered_bytes + size > self._max_buffered:
            loose = max(self._partitions.values(), key=lambda p: p.buffered_bytes - p.compacted_bytes)
            if loose.buffered_bytes - loose.compacted_bytes >= COMPACT_MIN_BYTES:
                self._compact(loose)  # no I/O, batch sizes unchanged
                continue
            largest = max(self._partitions.values(), key=lambda p: p.buffered_bytes)
            self.stats.early_flushes += 1
            self._flush(largest)

    def _compact(self, partition: Partition) -> None:
        """Python rows -> one Arrow batch kept in memory until the partition flushes."""
        try:
            batch = rows_to_batch(partition.channel, partition.rows)
        except (pa.ArrowException, ValueError, TypeError):
            self._flush(partition)  # rejects the rows there, with the reason
            return
        charged = batch.get_total_buffer_size() + BATCH_OVERHEAD
        loose = partition.buffered_bytes - partition.compacted_bytes
        self.stats.buffered_bytes += charged - loose
        partition.buffered_bytes += charged - loose
        partition.compacted_bytes += charged
        partition.compacted.append(batch)
        partition.compacted_rows += batch.num_rows
        partition.rows = []
        self.stats.compactions += 1

    def _take_batch(self, partition: Partition) -> pa.RecordBatch | None:
        """Everything the partition buffers as one batch, the buffer emptied; rows Arrow refuses
        are quarantined (validation should have caught them)."""
        rows, partition.rows = partition.rows, []
        batches, partition.compacted = partition.compacted, []
        partition.compacted_rows = partition.compacted_bytes = 0
        self.stats.buffered_bytes -= partition.buffered_bytes
        partition.buffered_bytes = 0
        if rows:
            try:
                batches.append(rows_to_batch(partition.channel, rows))
            except (pa.ArrowException, ValueError, TypeError) as exc:
                for row in rows:
                    self._reject(partition.channel, partition.exchange, partition.symbol, row[0], None, repr(exc))
        if len(batches) > 1:
            return pa.concat_batches(batches)
        return batches[0] if batches else None

    def _flush(self, partition: Partition) -> None:
        batch = self._take_batch(partition)
        if batch is None:
            return
        count = batch.num_rows
        try:
            segment = partition.segment or self._open_segment(partition)
            segment.writer.write_batch(batch)
            if self.config.fsync:
                os.fsync(segment.handle.fileno())
        except Exception as exc:  # the rows left the buffer: whatever failed, they are counted as lost
            self.stats.write_errors += 1
            self.stats.records_lost += count
            log.error("record_writer_flush_failed", partition=str(partition.relative), rows=count,
                      error=f"{type(exc).__name__}: {exc}", exc_info=not isinstance(exc, OSError))  # fmt: skip
            self._abandon(partition)
            return
        segment.rows += count
        self._open.move_to_end(self._key(partition))  # least recently written is evicted first
        self.stats.records_written += count
        self.stats.flushes += 1
        if segment.handle.tell() >= self._segment_bytes or partition.hour_index < self._max_hour:
            self.stats.rotations += 1  # by size, or a (late) segment of an hour that is over
            self._finalise(partition)

    def _open_segment(self, partition: Partition) -> OpenSegment:
        while len(self._open) >= self.config.max_open_writers:
            _, victim = next(iter(self._open.items()))
            self.stats.evictions += 1
            self._finalise(victim)
        if partition.next_counter is None:
            partition.next_counter = max(self._scan_counter(partition), self._counter_floor(partition.hour))
        self._reserve_counter(partition.hour, partition.next_counter)
        name = segment_name_for_hour(partition.hour, partition.next_counter, IPC_SUFFIX)
        partition.next_counter += 1
        self._next_counters[self._key(partition)] = partition.next_counter
        directory = self._active_root / partition.relative
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / name
        handle = open(path, "xb", buffering=0)  # noqa: SIM115 - lives as long as the segment
        writer = pa.ipc.new_stream(handle, SCHEMAS[partition.channel], options=self._ipc_options)
        if self.config.fsync:
            fsync_path(directory)  # the name must survive a crash, not only the bytes
        partition.segment = OpenSegment(path, handle, writer)
        self._open[self._key(partition)] = partition
        self.stats.open_writers = len(self._open)
        return partition.segment

    def _counter_floor(self, hour: str) -> int:
        """The first counter a partition of ``hour`` may use: above every counter an earlier
        run used in that hour (scanning the folders is not enough once the ETL has deleted the
        processed segments, and the ETL refuses a name used twice)."""
        if self._floor is None:
            self._floor = ("", 0)
            with contextlib.suppress(OSError, ValueError):
                floor_hour, floor = (self._active_root / COUNTER_FLOOR_FILE).read_text().split()
                self._floor = (floor_hour, int(floor))
            self._reserved = self._floor
        floor_hour, floor = self._floor
        return floor if hour == floor_hour else 1

    def _reserve_counter(self, hour: str, counter: int) -> None:
        """Keep ``active/<source>/.counter_floor`` above every counter this run uses, so the next
        run starts above them: rewritten (durably) only when a counter reaches the reservation,
        then ``COUNTER_BLOCK`` higher (one small write per ``COUNTER_BLOCK`` segments of the
        busiest partition, and one per hour)."""
        self._counter_floor(hour)  # the file is read once, before the first reservation
        reserved_hour, reserved = self._reserved
        if hour > reserved_hour or (hour == reserved_hour and counter >= reserved):
            self._active_root.mkdir(parents=True, exist_ok=True)
            write_atomically(self._active_root / COUNTER_FLOOR_FILE, f"{hour} {counter + COUNTER_BLOCK}".encode())
            self._reserved = (hour, counter + COUNTER_BLOCK)

    def _scan_counter(self, partition: Partition) -> int:
        """Next counter for the partition's hour: one past every name any state holds (the ETL
        moves files on to processing/ and archive/, quarantine keeps torn tails)."""
        highest = 0
        for state in RAW_STATES:
            directory = self.layout.raw_dir(state, self.source) / partition.relative
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                for name in os.listdir(directory):
                    identity = segment_identity(name)
                    if identity and identity[0] == partition.hour:
                        highest = max(highest, identity[1])
        return highest + 1

    @staticmethod
    def _key(partition: Partition) -> PartitionKey:
        return (partition.channel, partition.exchange, partition.symbol, partition.hour_index)

    def _close_segment(self, partition: Partition) -> OpenSegment | None:
        segment, partition.segment = partition.segment, None
        self._open.pop(self._key(partition), None)
        self.stats.open_writers = len(self._open)
        if segment is not None:
            with contextlib.suppress(Exception):
                segment.writer.close()
            with contextlib.suppress(OSError):
                segment.handle.close()
        return segment

    def _abandon(self, partition: Partition) -> None:
        """After a failed write: close the file as it is; recovery at the next start keeps its
        readable prefix and quarantines the rest."""
        self._close_segment(partition)

    def _finalise(self, partition: Partition) -> None:
        """Flush the partition's buffer, then IPC -> Parquet in ready/ -> delete the IPC file."""
        if partition.pending:
            self._flush(partition)
            if partition.segment is None:  # the flush rotated or failed
                return
        segment = self._close_segment(partition)
        if segment is None:
            return
        target = self.layout.ready(self.source) / partition.relative / segment.path.with_suffix(PARQUET_SUFFIX).name
        try:
            ipc_to_parquet(segment.path, target, compression=self.config.parquet_compression,
                           compression_level=self.config.parquet_compression_level,
                           fsync=self.config.fsync)  # fmt: skip
            segment.path.unlink()
            if self.config.fsync:
                fsync_path(segment.path.parent)
        except OSError as exc:  # left in active/: recovery converts it at the next start
            self.stats.write_errors += 1
            log.error("record_writer_finalise_failed", file=str(segment.path), error=str(exc))
            return
        prune_empty_dirs(segment.path.parent, self._active_root)
        self.stats.segments_finalised += 1
        self._release_memory()

    def _release_memory(self, *, force: bool = False) -> None:
        """:func:`release_memory` after a conversion, at most every ``RELEASE_INTERVAL_S``."""
        now = time.monotonic()
        if force or now - self._released_at >= RELEASE_INTERVAL_S:
            self._released_at = now
            self.releases += 1
            release_memory()

    def _hour_changed(self, hour_index: int) -> None:
        """Data reached a new hour: segments of earlier hours are complete, finalise them."""
        self._max_hour = hour_index
        for key, partition in list(self._partitions.items()):
            if key[3] >= hour_index:
                continue
            if partition.pending:
                self._flush(partition)  # rotates: its hour is over
            elif partition.segment is not None:
                self.stats.rotations += 1
                self._finalise(partition)

    def _maintenance(self) -> None:
        """Hour rotation by the clock (an idle symbol's last segment must not stay open for
        ever) and forgetting idle partitions: empty buffer, no open file, older than the
        current hour or idle for a few flush intervals. Their next counters are kept (until their hour
        is long over): the ETL may have deleted every segment a folder scan would find."""
        clock_hour = self.clock() // HOUR_NS
        if clock_hour > self._max_hour:
            self._hour_changed(clock_hour)
        idle_before = time.monotonic() - 3 * self.config.flush_interval_seconds
        for key, partition in list(self._partitions.items()):
            if partition.pending or partition.segment is not None:
                continue
            if key[3] < self._max_hour or partition.last_used < idle_before:
                del self._partitions[key]
                self.stats.stale_cleanups += 1
        for key in [k for k in self._next_counters if k[3] < self._max_hour - 1]:  # hours long over
            del self._next_counters[key]

    def _publish_durable(self) -> None:
        pending = [p.seqs_from for p in self._partitions.values() if p.pending]
        durable = min(pending) - 1 if pending else self._drained_seq
        if durable > self.stats.durable_seq:
            self.stats.durable_seq = durable
            if self.on_flush is not None:
                self.on_flush(durable)

    def _reject(self, channel: str, exchange: str, symbol: str, recv_ns: Any, record: Any, reason: str) -> None:
        """One line per refused record in quarantine/<source>/rejected.ndjson: kept for
        forensics, never silently dropped, never a reason to stop writing."""
        self.stats.quarantined += 1
        line = orjson.dumps({"recv_ns": recv_ns, "channel": channel, "exchange": exchange, "symbol": symbol,
                             "reason": reason, "record": record},
                            default=repr, option=orjson.OPT_NON_STR_KEYS) + b"\n"  # fmt: skip
        path = self.layout.quarantine(self.source) / REJECTED_FILE
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("ab") as handle:
                handle.write(line)
        except OSError as exc:
            self.stats.write_errors += 1
            log.error("record_writer_quarantine_failed", error=str(exc))
        log.warning("record_writer_rejected", channel=channel, exchange=exchange, symbol=symbol, reason=reason)
