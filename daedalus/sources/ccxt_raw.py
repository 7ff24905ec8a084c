"""The ccxt path's two raw formats, written and read (architecture 3.1-3.3, issue 11).

``raw_format: parquet`` is :class:`daedalus.capture.record_writer.RecordWriter`'s output, one
typed Parquet file per (channel, exchange, symbol, hour) partition. ``raw_format: ndjson`` is
the ordinary segment log of :class:`daedalus.capture.segments.SegmentWriter`, one line per
unified record, written by :class:`NdjsonRecordSink`::

    {"recv_ns":N,"conn":C,"msg":{"channel":"trades","exchange":"coinbase","symbol":"BTC/USD","record":{...}}}

Both are read into one shape, :class:`RecordGroup` (a batch of ``record_writer.SCHEMAS[channel]``
rows of one channel, exchange and symbol), so the ETL (:mod:`daedalus.sources.ccxt_etl`) never
knows which format a segment was written in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from daedalus.capture.record_writer import SCHEMAS, RecordRejected, record_row, rows_to_batch
from daedalus.capture.records import ZstdFrameDamaged, iter_lines
from daedalus.capture.segments import SegmentWriter
from daedalus.etl.errors import EtlIoError, SegmentDataError
from daedalus.logs import get_logger

log = get_logger(__name__)

CHUNK_ROWS = 8192  # ndjson rows held (all groups together) before they are handed on as batches
PARQUET_BATCH_ROWS = 65_536  # rows per batch read from a Parquet raw segment
_MAX_RECV_NS = 2**63 - 1
_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS

# reason families of rejected ndjson lines (``quarantined_<family>`` in the counts)
BAD_JSON, BAD_LINE, UNKNOWN_CHANNEL, BAD_RECORD = "bad_json", "bad_line", "unknown_channel", "bad_record"


#: ndjson rows held per (channel, exchange, symbol): the rows and their line indices
_Held = dict[tuple[str, str, str], tuple[list[tuple[Any, ...]], list[int]]]


# --- writing: unified records -> ndjson lines ------------------------------------------------


class NdjsonRecordSink:
    """``put_record`` (the collector's sink interface) over a :class:`SegmentWriter`.

    Runs on the event loop, so it stays cheap: one shallow copy to drop ccxt's bulky raw
    ``info`` (the Parquet format drops it too; it can be larger than the unified record) and
    one ``orjson.dumps``. Values orjson does not know (Decimal, numpy scalars, datetimes) are
    written as text rather than crash the loop; a record that still cannot be serialised
    (an int over 64 bits, a cycle, nesting too deep) is counted in ``unserialisable``, logged
    and dropped, and ``True`` is returned: it was not a full queue, so the collector must not
    count it as overflow.
    """

    def __init__(self, writer: SegmentWriter) -> None:
        self.writer = writer
        self.conns: dict[str, int] = {}  # exchange -> conn number (1, 2, ... first seen first)
        self.unserialisable = 0

    def conn(self, exchange: str) -> int:
        """The small stable number an exchange's lines carry as ``conn`` (per process)."""
        number = self.conns.get(exchange)
        if number is None:
            number = self.conns[exchange] = len(self.conns) + 1
        return number

    def put_record(self, *, channel: str, exchange: str, symbol: str, recv_ns: int, record: Any) -> bool:
        if isinstance(record, dict) and "info" in record:
            record = {k: v for k, v in record.items() if k != "info"}
        message = {"channel": channel, "exchange": exchange, "symbol": symbol, "record": record}
        try:
            frame = orjson.dumps(message, default=str, option=_DUMPS_OPTIONS).decode()
        except (orjson.JSONEncodeError, TypeError, ValueError) as exc:
            self.unserialisable += 1
            log.warning("ccxt_record_unserialisable", channel=channel, exchange=exchange, symbol=symbol,
                        error=str(exc)[:200], count=self.unserialisable)  # fmt: skip
            return True
        return self.writer.put_frame(recv_ns, self.conn(exchange), frame)


# --- reading: either format -> record groups -------------------------------------------------


@dataclass
class RecordGroup:
    """Rows of one channel, exchange and symbol, as ``record_writer.SCHEMAS[channel]``."""

    channel: str
    exchange: str
    symbol: str  # ccxt unified, e.g. BTC/USD
    batch: pa.RecordBatch
    lines: np.ndarray | None = None  # segment line index of each row (ndjson only)


@dataclass
class RawSegmentReader:
    """Iterates a raw ccxt segment as :class:`RecordGroup` s; afterwards ``rejected`` holds
    ``(line index, reason)`` of every ndjson line that could not become a row, ``counts``
    what was read (``records_<channel>``, ``control_lines``, ``quarantined_<family>``).

    ``key`` is the segment's path below ``raw/<state>/ccxt``: for Parquet it carries channel,
    exchange and symbol (``trades/exchange=coinbase/symbol=BTC-USD/year=.../segment_....parquet``);
    for ndjson it is just the name (each line names its own)."""

    path: Path
    key: str
    rejected: list[tuple[int, str]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def __iter__(self) -> Iterator[RecordGroup]:
        if self.path.name.endswith(".parquet"):
            return self._parquet()
        if self.path.name.endswith((".ndjson", ".ndjson.zst")):
            return self._ndjson()
        raise SegmentDataError(f"{self.path.name}: not a ccxt raw segment (.parquet, .ndjson or .ndjson.zst)")

    # parquet ------------------------------------------------------------------------------

    def _parquet(self) -> Iterator[RecordGroup]:
        channel, exchange, path_symbol = parquet_key_parts(self.key)
        expected = SCHEMAS[channel]
        handle = _open_parquet(self.path)
        with handle:
            schema = handle.schema_arrow
            if _closest_channel(schema) != channel or "ts_recv" not in schema.names:
                raise SegmentDataError(f"{self.key}: schema {schema.names} is not the {channel} raw schema "
                                       f"{expected.names}")  # fmt: skip
            if not _same_fields(schema, expected):
                self.counts["older_schema_segments"] += 1  # written by another version: conformed below
            for batch in _parquet_batches(handle, self.key):
                if batch.schema != expected:
                    batch = _conform(batch, expected, self.key)
                self.counts[f"records_{channel}"] += batch.num_rows
                yield from _split_by_symbol(channel, exchange, path_symbol, batch, self.counts)

    # ndjson -------------------------------------------------------------------------------

    def _ndjson(self) -> Iterator[RecordGroup]:
        """Per-line Python is forced by the format: each line is one JSON document whose
        record must be checked field by field (``record_row``) before it can be a row. Rows
        are grouped by (channel, exchange, symbol) and handed on every ``CHUNK_ROWS`` rows, all
        groups together, so memory does not grow with the segment or its number of symbols."""
        groups: _Held = {}
        held = 0
        try:
            for index, line in enumerate(iter_lines(self.path)):
                parsed = self._parse_line(index, line)
                if parsed is None:
                    continue
                group_key, row = parsed
                rows, lines = groups.get(group_key) or groups.setdefault(group_key, ([], []))
                rows.append(row)
                lines.append(index)
                held += 1
                if held >= CHUNK_ROWS:
                    yield from _ndjson_groups(groups)
                    groups, held = {}, 0
        except ZstdFrameDamaged as exc:
            raise SegmentDataError(f"{self.key}: {exc}") from exc
        yield from _ndjson_groups(groups)

    def _parse_line(self, index: int, line: bytes) -> tuple[tuple[str, str, str], tuple[Any, ...]] | None:
        """``((channel, exchange, symbol), row)`` of a record line; None for a control line or a
        rejected one (noted in ``rejected`` with its reason)."""
        try:
            envelope = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            return self._reject(index, BAD_JSON, str(exc)[:200])
        if not isinstance(envelope, dict):
            return self._reject(index, BAD_LINE, f"a JSON {type(envelope).__name__}, not a record object")
        if "event" in envelope and "msg" not in envelope:
            self.counts["control_lines"] += 1
            return None
        recv_ns, message = envelope.get("recv_ns"), envelope.get("msg")
        if type(recv_ns) is not int or not 0 < recv_ns <= _MAX_RECV_NS:
            return self._reject(index, BAD_LINE, f"recv_ns {recv_ns!r} is not a positive int64")
        if not isinstance(message, dict):
            what = "a raw (non-JSON) frame" if "raw" in envelope else f"msg is {type(message).__name__}"
            return self._reject(index, BAD_LINE, f"{what}, not a unified record")
        channel, exchange, symbol = message.get("channel"), message.get("exchange"), message.get("symbol")
        if channel not in SCHEMAS:
            return self._reject(index, UNKNOWN_CHANNEL, f"channel {channel!r} is not one of {sorted(SCHEMAS)}")
        if not isinstance(exchange, str) or not exchange or not isinstance(symbol, str) or not symbol:
            return self._reject(index, BAD_LINE, f"exchange {exchange!r} / symbol {symbol!r} not non-empty strings")
        try:
            row = record_row(channel, recv_ns, message.get("record"))
        except RecordRejected as exc:
            return self._reject(index, BAD_RECORD, f"{channel}: {exc}")
        self.counts[f"records_{channel}"] += 1
        return (channel, exchange, symbol), row

    def _reject(self, index: int, family: str, detail: str) -> None:
        self.rejected.append((index, f"{family}: {detail}"))
        self.counts[f"quarantined_{family}"] += 1
        return None


def iter_record_groups(path: Path, key: str, rejected: list[tuple[int, str]] | None = None,
                       counts: Counter[str] | None = None) -> Iterator[RecordGroup]:  # fmt: skip
    """:class:`RecordGroup` s of a raw segment whatever its format; rejected ndjson lines are
    appended to ``rejected`` as ``(line index, reason)``, counters added to ``counts``."""
    reader = RawSegmentReader(path, key)
    yield from reader
    if rejected is not None:
        rejected += reader.rejected
    if counts is not None:
        counts.update(reader.counts)


def _ndjson_groups(groups: _Held) -> Iterator[RecordGroup]:
    for (channel, exchange, symbol), (rows, lines) in groups.items():
        # rows passed record_row: an Arrow error here is a bug in that check, not bad input
        batch = rows_to_batch(channel, rows)
        yield RecordGroup(channel, exchange, symbol, batch, np.asarray(lines, np.int64))


def parquet_key_parts(key: str) -> tuple[str, str, str]:
    """``(channel, exchange, symbol from the path)`` of a Parquet segment's key. The path's symbol
    is only a fall-back (the ``unified_symbol`` column is the truth): ``BTC-USD`` -> ``BTC/USD``
    and ``BTC-USDT_USDT`` -> ``BTC/USDT:USDT`` invert :func:`daedalus.layout.symbol_component`
    for the usual symbols; a hashed component (``~``) is kept as it is."""
    parts = Path(key).parts
    if len(parts) < 2 or parts[0] not in SCHEMAS:
        raise SegmentDataError(f"{key}: a Parquet raw segment's key must start with a channel "
                               f"({', '.join(sorted(SCHEMAS))})/exchange=..., not {parts[:1]}")  # fmt: skip
    values = {}
    for part in parts[1:-1]:
        name, sep, value = part.partition("=")
        if sep:
            values[name] = value
    exchange, symbol = values.get("exchange"), values.get("symbol", "")
    if not exchange:
        raise SegmentDataError(f"{key}: no exchange=<id> directory in a Parquet raw segment's key")
    if symbol and "~" not in symbol:
        symbol = symbol.replace("-", "/", 1).replace("_", ":", 1)
    return parts[0], exchange, symbol


def _read_error(exc: Exception, what: str) -> Exception:
    """A Parquet read failure as the job sorts it: an errno is the machine (:class:`EtlIoError`,
    retried), anything else is the file (:class:`SegmentDataError`, quarantined)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return EtlIoError(f"{what}: {exc}")
    return SegmentDataError(f"{what} ({exc})")


def _open_parquet(path: Path) -> pq.ParquetFile:
    """The file opened, or :class:`SegmentDataError` (no footer, not Parquet) / :class:`EtlIoError`."""
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise _read_error(exc, f"{path.name}: cannot be opened as Parquet") from exc


def _parquet_batches(handle: pq.ParquetFile, key: str) -> Iterator[pa.RecordBatch]:
    """Row groups streamed in batches (the whole file is never in memory); a damaged page is
    bad data, an errno is the machine."""
    batches = handle.iter_batches(batch_size=PARQUET_BATCH_ROWS)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise _read_error(exc, f"{key}: unreadable Parquet data") from exc
        yield batch


def _closest_channel(schema: pa.Schema) -> str:
    """The channel whose raw schema shares the most column names with ``schema``: a file
    written by another version still resembles its own channel most, a misplaced one does not."""
    names = set(schema.names)
    return max(SCHEMAS, key=lambda channel: len(names & set(SCHEMAS[channel].names)) - len(
        set(SCHEMAS[channel].names) ^ names) / 1000)


def _conform(batch: pa.RecordBatch, expected: pa.Schema, key: str) -> pa.RecordBatch:
    """A batch written under another version's schema, as this one: columns it lacks are null,
    columns this version does not know are dropped, other types (a ``us`` timestamp) are cast.
    A column that cannot be cast safely makes the segment unusable as data."""
    columns = []
    for want in expected:
        if want.name not in batch.schema.names:
            columns.append(pa.nulls(batch.num_rows, want.type))
            continue
        column = batch.column(want.name)
        try:
            columns.append(column if column.type == want.type else column.cast(want.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise SegmentDataError(f"{key}: column {want.name} ({column.type}) cannot be read as {want.type}: "
                                   f"{exc}") from exc  # fmt: skip
    return pa.RecordBatch.from_arrays(columns, schema=expected)


def _same_fields(schema: pa.Schema, expected: pa.Schema) -> bool:
    """Same names and types (nullability and metadata aside)."""
    return schema.names == expected.names and all(a.type == b.type for a, b in zip(schema, expected, strict=True))


def _split_by_symbol(channel: str, exchange: str, path_symbol: str, batch: pa.RecordBatch,
                     counts: Counter[str]) -> Iterator[RecordGroup]:  # fmt: skip
    """One group per ``unified_symbol`` (one, normally: the partition is the symbol); rows
    without one take the path's symbol (counted ``symbol_from_path``)."""
    column = batch.column("unified_symbol")
    if column.null_count:
        counts["symbol_from_path"] += column.null_count
        column = column.fill_null(path_symbol)
    encoded = pc.dictionary_encode(column)
    symbols = encoded.dictionary.to_pylist()
    if len(symbols) == 1:
        yield RecordGroup(channel, exchange, symbols[0], batch)
        return
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    for code, symbol in enumerate(symbols):
        yield RecordGroup(channel, exchange, symbol, batch.filter(pa.array(codes == code)))
