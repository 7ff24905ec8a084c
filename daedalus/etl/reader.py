"""Read a raw segment as Arrow batches of whole records, fast, and survive bad lines.

The fast path is DuckDB's ``read_json`` with an explicit schema (one struct that covers
every Coinbase channel we parse, so each line is decoded once, in C++), streamed with
``to_arrow_reader``: memory stays bounded by the batch size, not the segment size, and
``.zst`` segments (any number of frames) are read directly. One thread and insertion order
keep row ``i`` equal to line ``i`` of the file, which is how bad lines are found again.

DuckDB stops at the first line it cannot decode (and its error does not say reliably which
line). Then :func:`clean_copy` checks every line in Python, JSON and shape against
:data:`RECORD_SCHEMA` (the same schema DuckDB is given), writes the good ones to a
temporary file for a second DuckDB pass and hands back the others for quarantine. A torn
tail (a file cut mid-line or mid zstd frame) is one such line. The slow check runs only
for a segment that needs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import orjson
import pyarrow as pa
import zstandard

from daedalus.capture.records import RECORD_PREFIX, iter_lines

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
class CleanCopy:
    """Result of :func:`clean_copy`: the good lines in ``path``; the rest, with why."""

    path: Path
    rejected: list[tuple[str, bytes]] = field(default_factory=list)  # (reason, line)
    kept: int = 0


def clean_copy(source: Path, target: Path, torn: bool = False) -> CleanCopy:
    """Copy the lines of ``source`` that are JSON records to ``target`` (plain NDJSON).
    ``torn``: the zstd stream is known to be cut (the decoder may just stop there)."""
    out = CleanCopy(target)
    if torn:
        out.rejected.append(("torn zstd tail: the last frame is cut; what decoded before the cut is kept", b""))
    with target.open("wb") as sink:
        try:
            for line in iter_lines(source):
                if not line.strip():
                    continue
                reason = _record_problem(line)
                if reason:
                    out.rejected.append((reason, line))
                else:
                    sink.write(line + b"\n")
                    out.kept += 1
        except zstandard.ZstdError as exc:
            out.rejected.append((f"torn zstd tail (the lines before it are kept): {exc}", b""))
    return out


_ZSTD_MAGIC = 0xFD2FB528


def zstd_is_complete(path: Path) -> bool:
    """Whether every zstd frame of ``path`` is whole, by walking frame and block headers
    (no decompression). A cut inside a frame is not always an error for DuckDB: it can stop
    at the last whole block and lose the rest silently, so torn files are found here first."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        pos = 0
        while pos < size:
            handle.seek(pos)
            head = handle.read(18)  # magic + the longest frame header
            if len(head) < 4:
                return False
            magic = int.from_bytes(head[:4], "little")
            if magic & 0xFFFFFFF0 == 0x184D2A50:  # skippable frame
                if len(head) < 8:
                    return False
                pos += 8 + int.from_bytes(head[4:8], "little")
                continue
            if magic != _ZSTD_MAGIC:
                return False
            try:
                header = zstandard.frame_header_size(head)
                has_checksum = zstandard.get_frame_parameters(head).has_checksum
            except zstandard.ZstdError:
                return False
            pos += header
            while True:
                handle.seek(pos)
                block = handle.read(3)
                if len(block) < 3:
                    return False
                value = int.from_bytes(block, "little")
                last, kind, length = value & 1, (value >> 1) & 3, value >> 3
                pos += 3 + (1 if kind == 1 else length)
                if pos > size:
                    return False
                if last:
                    break
            pos += 4 if has_checksum else 0
        return pos == size


def _record_problem(line: bytes) -> str | None:
    """Why a line is not a raw record (None when it is one)."""
    if not line.startswith(RECORD_PREFIX):
        return "not a raw record"
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        return f"invalid JSON: {exc}"
    if not isinstance(record, dict) or not isinstance(record.get("recv_ns"), int):
        return "record without an integer recv_ns"
    for key, node in RECORD_SCHEMA.items():
        if not conforms(record.get(key), node):
            return f"{key}: unexpected shape for {duckdb_type(node)[:60]}"
    return None
