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

from daedalus.capture.records import (
    RECORD_PREFIX,
    ZstdFrame,
    ZstdFrameDamaged,
    block_lines,
    iter_lines,
    iter_zstd_frames,
    zstd_frame_end,
)
from daedalus.capture.segments import fsync_path

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

_READ_CHUNK = 1 << 20  # bytes copied at a time when keeping damaged bytes


def zstd_is_complete(path: Path) -> bool:
    """Whether every zstd frame of ``path`` is whole, by walking frame and block headers
    (no decompression). A cut inside a frame is not always an error for DuckDB: it can stop
    at the last whole block and lose the rest silently, so torn files are found here first."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        pos = 0
        while pos < size:
            try:
                pos = zstd_frame_end(handle, pos, size)
            except ZstdFrameDamaged:
                return False
        return True


class _FrameCopy:
    """Copies the lines of the frame being decoded to ``sink``, all or nothing: a frame
    that turns out damaged is cut off ``sink`` again, with its counts."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink = sink
        self.mark = sink.tell()
        self.kept = 0
        self.rejected: list[tuple[str, bytes]] = []

    def write(self, block: bytes) -> None:
        kept, rejected = _copy_lines(block_lines(block), self.sink)
        self.kept += kept
        self.rejected += rejected

    def take(self) -> tuple[int, list[tuple[str, bytes]]]:
        """The frame decoded whole: its counts, and the next frame starts here."""
        counts = self.kept, self.rejected
        self.kept, self.rejected, self.mark = 0, [], self.sink.tell()
        return counts

    def drop(self) -> None:
        """The frame is damaged: forget what it wrote."""
        self.sink.seek(self.mark)
        self.sink.truncate()
        self.kept, self.rejected = 0, []


def _copy_zstd(source: Path, sink: BinaryIO, out: CleanCopy, damaged_dir: Path | None) -> None:
    """Copy the lines of every frame that decodes whole; collect the runs of bytes that do not
    (adjacent damaged frames make one run), byte-exact in ``damaged_dir``."""
    runs: list[ZstdFrame] = []
    copy = _FrameCopy(sink)
    with source.open("rb") as handle:
        for frame in iter_zstd_frames(handle, copy.write):
            if frame.problem is None:
                kept, rejected = copy.take()
                out.kept += kept
                out.rejected += rejected
            else:
                copy.drop()
                if runs and runs[-1].offset + runs[-1].length == frame.offset:
                    previous = runs.pop()
                    frame = ZstdFrame(previous.offset, previous.length + frame.length, previous.problem)
                runs.append(frame)
        out.damaged = [_keep_damaged(handle, source, run, damaged_dir) for run in runs]
    for damage in out.damaged:
        where = f"saved to {damage.saved_to}" if damage.saved_to else "not saved (no quarantine folder given)"
        out.rejected.append(
            (f"damaged zstd frame at byte {damage.offset} ({damage.length} bytes): {damage.reason}; {where}", b"")
        )


def _keep_damaged(handle: BinaryIO, source: Path, run: ZstdFrame, folder: Path | None) -> DamagedBytes:
    """Copy the bytes of ``run`` in ``source`` byte-exact to ``folder`` (fsynced, atomic)."""
    start, end, reason = run.offset, run.offset + run.length, str(run.problem)
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
    fsync_path(folder)
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
