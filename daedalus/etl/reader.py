"""Read a raw segment as Arrow batches of whole records, fast, and survive bad lines.

The fast path is DuckDB's ``read_json`` with an explicit schema (one struct that covers
every Coinbase channel we parse, so each line is decoded once, in C++), streamed with
``to_arrow_reader``: memory stays bounded by the batch size, not the segment size, and
``.zst`` segments (any number of frames) are read directly. One thread and insertion order
keep row ``i`` equal to line ``i`` of the file, which is how bad lines are found again.

DuckDB stops at the first line it cannot decode (and its error does not say reliably which
line). Then :func:`clean_copy` checks every line in Python, JSON (strict, no duplicate
keys) and shape against :data:`RECORD_SCHEMA` (the same schema DuckDB is given), so the
second DuckDB pass over the good lines cannot fail again; the others are handed back for
quarantine. A ``.zst`` segment is decoded frame by frame (one frame per capture flush): a
cut or corrupted frame costs only its own lines, and its bytes are kept byte-exact. The
slow check runs only for a segment that needs it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import duckdb
import orjson
import pyarrow as pa
import zstandard

from daedalus.capture.records import RECORD_PREFIX, iter_lines
from daedalus.capture.segments import fsync_dir

BATCH_ROWS = 8192  # records per Arrow batch: a few MB of level2, small enough to bound memory
# DuckDB sizes its read buffers from this (16 MB: ~115 MB of RSS; 64 MB: ~200 MB). DuckDB 2.0
# reads longer lines anyway; a version that refuses one gets a retry at LARGEST_OBJECT_BYTES.
MAX_OBJECT_BYTES = 16 << 20  # real BTC-USD snapshots are ~5 MB
LARGEST_OBJECT_BYTES = 512 << 20

VARCHAR, BIGINT = "VARCHAR", "BIGINT"


def _struct(**fields: object) -> tuple[str, dict[str, object]]:
    return ("STRUCT", fields)


def _list(item: object) -> tuple[str, object]:
    return ("LIST", item)


_STRINGS = _struct  # readability: a struct whose fields are all strings
_EVENT = _struct(
    type=VARCHAR,
    product_id=VARCHAR,
    updates=_list(_STRINGS(side=VARCHAR, event_time=VARCHAR, price_level=VARCHAR, new_quantity=VARCHAR)),
    trades=_list(
        _STRINGS(trade_id=VARCHAR, product_id=VARCHAR, price=VARCHAR, size=VARCHAR, side=VARCHAR, time=VARCHAR)
    ),
    tickers=_list(
        _STRINGS(
            **dict.fromkeys(
                [
                    "type",
                    "product_id",
                    "price",
                    "volume_24_h",
                    "low_24_h",
                    "high_24_h",
                    "price_percent_chg_24_h",
                    "best_bid",
                    "best_bid_quantity",
                    "best_ask",
                    "best_ask_quantity",
                ],
                VARCHAR,
            )
        )
    ),
    candles=_list(
        _STRINGS(**dict.fromkeys(["start", "high", "low", "open", "close", "volume", "product_id"], VARCHAR))
    ),
)
#: A raw record (architecture 3.2) as the ETL decodes it: the fields of every channel we parse.
RECORD_SCHEMA: dict[str, object] = {
    "recv_ns": BIGINT,
    "conn": BIGINT,
    "msg": _struct(
        channel=VARCHAR, type=VARCHAR, message=VARCHAR, timestamp=VARCHAR, sequence_num=BIGINT, events=_list(_EVENT)
    ),
    "event": VARCHAR,
    "raw": VARCHAR,
    "received": BIGINT,
    "dropped": BIGINT,
}


def duckdb_type(node: object) -> str:
    if isinstance(node, str):
        return node
    kind, inner = node  # type: ignore[misc]
    if kind == "LIST":
        return duckdb_type(inner) + "[]"
    return "STRUCT(" + ", ".join(f'"{k}" {duckdb_type(v)}' for k, v in inner.items()) + ")"


def conforms(value: object, node: object) -> bool:
    """Whether a decoded JSON value fits the schema node (None fits anything)."""
    if value is None:
        return True
    if node == VARCHAR:
        return isinstance(value, str | int | float) and not isinstance(value, bool)
    if node == BIGINT:
        return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    kind, inner = node  # type: ignore[misc]
    if kind == "LIST":
        return isinstance(value, list) and all(conforms(v, inner) for v in value)
    return isinstance(value, dict) and all(conforms(value.get(k), t) for k, t in inner.items())


RECORD_COLUMNS = {k: duckdb_type(v) for k, v in RECORD_SCHEMA.items()}
_COLUMNS_SQL = "{" + ", ".join(f"'{k}': '{v}'" for k, v in RECORD_COLUMNS.items()) + "}"


class SegmentDecodeError(Exception):
    """DuckDB could not decode a line of the segment."""


def connect() -> duckdb.DuckDBPyConnection:
    """A DuckDB connection for the ETL: one thread (line order = row order), bounded memory."""
    return duckdb.connect(config={"threads": 1, "memory_limit": "256MB", "preserve_insertion_order": True})


def read_batches(
    con: duckdb.DuckDBPyConnection, path: Path, max_object: int = MAX_OBJECT_BYTES, batch_rows: int = BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """Every record of ``path`` in order, as Arrow batches with the :data:`RECORD_COLUMNS`."""
    compression = "zstd" if path.name.endswith(".zst") else "none"
    literal = "'" + str(path).replace("'", "''") + "'"
    sql = (
        f"SELECT * FROM read_json({literal}, format='newline_delimited', compression='{compression}', "
        f"maximum_object_size={max_object}, columns={_COLUMNS_SQL})"
    )
    try:
        reader = con.sql(sql).to_arrow_reader(batch_rows)
        yield from reader
    except (duckdb.Error, OSError) as exc:  # mid-stream, DuckDB's errors reach us as OSError via Arrow
        raise SegmentDecodeError(str(exc).splitlines()[0]) from exc


@dataclass
class DamagedBytes:
    """A run of bytes of a zstd segment that did not decode into whole lines (a cut or
    corrupted frame, or garbage up to the next frame that does decode)."""

    offset: int
    length: int
    reason: str
    saved_to: Path | None  # the exact bytes, for forensics; None when no folder was given


@dataclass
class CleanCopy:
    """Result of :func:`clean_copy`: the good lines in ``path``; the rest, with why."""

    path: Path
    rejected: list[tuple[str, bytes]] = field(default_factory=list)  # (reason, line)
    kept: int = 0
    damaged: list[DamagedBytes] = field(default_factory=list)


def clean_copy(source: Path, target: Path, damaged_dir: Path | None = None) -> CleanCopy:
    """Copy the lines of ``source`` that are JSON records to ``target`` (plain NDJSON).

    A ``.zst`` source is decoded frame by frame (one frame per capture flush): a frame that
    is cut, corrupted or does not end on a line boundary costs only itself; its bytes go
    byte-exact to ``damaged_dir`` (one file per damaged run, fsynced) and it is rejected
    with its byte range.
    """
    out = CleanCopy(target)
    with target.open("wb") as sink:
        if source.name.endswith(".zst"):
            _copy_zstd(source, sink, out, damaged_dir)
        else:
            kept, rejected = _copy_lines(iter_lines(source), sink)
            out.kept, out.rejected = kept, rejected
    return out


def _copy_lines(lines: Iterable[bytes], sink: BinaryIO) -> tuple[int, list[tuple[str, bytes]]]:
    """Write the good lines to ``sink``: (how many, the rejected ones with why)."""
    kept, rejected = 0, []
    for line in lines:
        if not line.strip():
            continue
        reason = _record_problem(line)
        if reason:
            rejected.append((reason, line))
        else:
            sink.write(line + b"\n")
            kept += 1
    return kept, rejected


# -- zstd frames ---------------------------------------------------------------------------

_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_MAGIC_BYTES = _ZSTD_MAGIC.to_bytes(4, "little")
_MAX_BLOCK = 128 << 10  # zstd's Block_Maximum_Size: a larger block length is a damaged header
_READ_CHUNK = 1 << 20  # bytes read at a time when scanning or copying
_DECODE_CHUNK = 64 << 10  # compressed bytes fed at a time: bounds what one call decompresses


class _Damaged(Exception):
    """The zstd frame at hand (or what should be one) does not decode into whole lines."""


def zstd_is_complete(path: Path) -> bool:
    """Whether every zstd frame of ``path`` is whole, by walking frame and block headers
    (no decompression). A cut inside a frame is not always an error for DuckDB: it can stop
    at the last whole block and lose the rest silently, so torn files are found here first."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        pos = 0
        while pos < size:
            try:
                pos, _ = _frame_extent(handle, pos, size)
            except _Damaged:
                return False
        return True


def _frame_extent(handle: BinaryIO, pos: int, size: int) -> tuple[int, bool]:
    """(end offset, holds data) of the frame starting at ``pos``, from its frame and block
    headers alone; skippable frames hold no data. Raises :class:`_Damaged` when the headers
    are not those of a frame that ends within the file."""
    handle.seek(pos)
    head = handle.read(18)  # magic + the longest frame header
    if len(head) < 4:
        raise _Damaged("the file ends inside a frame's magic number")
    magic = int.from_bytes(head[:4], "little")
    if magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame
        end = pos + 8 + int.from_bytes(head[4:8], "little")
        if len(head) < 8 or end > size:
            raise _Damaged("a skippable frame runs past the end of the file")
        return end, False
    if magic != _ZSTD_MAGIC:
        raise _Damaged("no zstd magic number where a frame should start")
    try:
        pos += zstandard.frame_header_size(head)
        has_checksum = zstandard.get_frame_parameters(head).has_checksum
    except zstandard.ZstdError as exc:
        raise _Damaged(f"unreadable frame header ({exc})") from exc
    while True:
        handle.seek(pos)
        block = handle.read(3)
        if len(block) < 3:
            raise _Damaged("the file ends inside the frame (cut)")
        value = int.from_bytes(block, "little")
        last, kind, length = value & 1, (value >> 1) & 3, value >> 3
        if kind == 3 or length > _MAX_BLOCK:
            raise _Damaged("invalid block header")
        pos += 3 + (1 if kind == 1 else length)
        if pos > size:
            raise _Damaged("the file ends inside the frame (cut)")
        if last:
            break
    pos += 4 if has_checksum else 0
    if pos > size:
        raise _Damaged("the file ends inside the frame's checksum (cut)")
    return pos, True


def _copy_zstd(source: Path, sink: BinaryIO, out: CleanCopy, damaged_dir: Path | None) -> None:
    """Copy the lines of every frame that decodes whole; collect the runs of bytes that do not.

    After a damaged frame the walk resumes at the next zstd magic number, so one bad frame
    (even one whose header is damaged) costs only its own bytes."""
    size = source.stat().st_size
    with source.open("rb") as handle:
        pos, bad_start, bad_reason = 0, -1, ""
        while pos < size:
            try:
                end, holds_data = _frame_extent(handle, pos, size)
                if holds_data:
                    kept, rejected = _copy_frame(handle, pos, end, sink)
                    out.kept += kept
                    out.rejected += rejected
            except _Damaged as exc:
                if bad_start < 0:
                    bad_start, bad_reason = pos, str(exc)
                pos = _next_magic(handle, pos + 1, size)
                continue
            if bad_start >= 0:
                out.damaged.append(_keep_damaged(handle, source, bad_start, pos, bad_reason, damaged_dir))
                bad_start = -1
            pos = end
        if bad_start >= 0:
            out.damaged.append(_keep_damaged(handle, source, bad_start, size, bad_reason, damaged_dir))
    for damage in out.damaged:
        where = f"saved to {damage.saved_to}" if damage.saved_to else "not saved (no quarantine folder given)"
        out.rejected.append(
            (f"damaged zstd frame at byte {damage.offset} ({damage.length} bytes): {damage.reason}; {where}", b"")
        )


def _copy_frame(handle: BinaryIO, start: int, end: int, sink: BinaryIO) -> tuple[int, list[tuple[str, bytes]]]:
    """Decode one frame (bytes ``start``..``end``) and copy its good lines to ``sink``.

    All or nothing: if the frame does not decode to exactly its bytes, or its content does
    not end with a newline, what it wrote is cut off ``sink`` again and :class:`_Damaged` is raised."""
    mark = sink.tell()
    decoder = zstandard.ZstdDecompressor().decompressobj()
    kept, rejected, pending = 0, [], b""
    try:
        handle.seek(start)
        for offset in range(start, end, _DECODE_CHUNK):
            pending += decoder.decompress(handle.read(min(_DECODE_CHUNK, end - offset)))
            whole, newline, pending = pending.rpartition(b"\n")
            if newline:
                more, bad = _copy_lines((line.rstrip(b"\r") for line in whole.split(b"\n")), sink)
                kept, rejected = kept + more, rejected + bad
        if not decoder.eof or decoder.unused_data:
            raise _Damaged("the frame's blocks do not decode to its end (corrupted data)")
        if pending:
            raise _Damaged("the frame's content does not end with a newline")
    except zstandard.ZstdError as exc:
        _cut_back(sink, mark)
        raise _Damaged(f"does not decode ({exc})") from exc
    except _Damaged:
        _cut_back(sink, mark)
        raise
    return kept, rejected


def _cut_back(sink: BinaryIO, mark: int) -> None:
    """Drop what a frame that turned out damaged wrote to ``sink``."""
    sink.seek(mark)
    sink.truncate()


def _next_magic(handle: BinaryIO, start: int, size: int) -> int:
    """Offset of the next zstd magic number at or after ``start`` (``size`` if none)."""
    pos = start
    while pos < size:
        handle.seek(pos)
        found = handle.read(_READ_CHUNK + 3).find(_ZSTD_MAGIC_BYTES)
        if found >= 0:
            return pos + found
        pos += _READ_CHUNK
    return size


def _keep_damaged(
    handle: BinaryIO, source: Path, start: int, end: int, reason: str, folder: Path | None
) -> DamagedBytes:
    """Copy bytes ``start``..``end`` of ``source`` byte-exact to ``folder`` (fsynced, atomic)."""
    if folder is None:
        return DamagedBytes(start, end - start, reason, None)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{source.name}.damaged-{start}.zst"
    partial = target.with_name(target.name + ".tmp")
    with partial.open("wb") as copy:
        handle.seek(start)
        for offset in range(start, end, _READ_CHUNK):
            copy.write(handle.read(min(_READ_CHUNK, end - offset)))
        copy.flush()
        os.fsync(copy.fileno())
    partial.replace(target)
    fsync_dir(folder)
    return DamagedBytes(start, end - start, reason, target)


def _record_problem(line: bytes) -> str | None:
    """Why a line is not a raw record (None when it is one)."""
    if not line.startswith(RECORD_PREFIX):
        return "not a raw record"
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return f"invalid JSON: {exc}"
    duplicate = _duplicate_key(line)
    if duplicate:
        return duplicate
    if not isinstance(record, dict) or not isinstance(record.get("recv_ns"), int):
        return "record without an integer recv_ns"
    for key, node in RECORD_SCHEMA.items():
        if not conforms(record.get(key), node):
            return f"{key}: unexpected shape for {duckdb_type(node)[:60]}"
    return None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """``object_pairs_hook`` for :func:`json.loads`: a dict, or :class:`_DuplicateKey`."""
    record = dict(pairs)
    if len(record) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return record


def _duplicate_key(line: bytes) -> str | None:
    """Why a line that orjson accepted is still ambiguous JSON: a key twice in one object
    (at any depth). orjson keeps the last value silently; DuckDB refuses the line, so the
    clean copy must not keep it. Only the slow path parses a second time for this."""
    try:
        json.loads(line, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        return f"duplicate JSON key {str(exc)[:40]!r}"
    except RecursionError:
        return "JSON nested too deeply"
    return None
