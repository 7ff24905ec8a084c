"""Read a raw segment as Arrow batches of whole records, fast, and survive bad lines.

The fast path is DuckDB's ``read_json`` with an explicit schema (one struct that covers
every Coinbase channel we parse, so each line is decoded once, in C++), streamed with
``to_arrow_reader``: memory stays bounded by the batch size, not the segment size, and
``.zst`` segments (any number of frames) are read directly. One thread and insertion order
keep row ``i`` equal to line ``i`` of the file, which is how bad lines are found again.

DuckDB stops at the first line it cannot decode. Then :func:`clean_copy` writes the lines
that parse as JSON records to a temporary file and hands back the others for quarantine;
a line DuckDB still rejects (valid JSON, wrong shape) is removed by its line number and
the read is retried. A torn tail (a file cut mid-line or mid zstd frame) is one such line.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import orjson
import pyarrow as pa
import zstandard

from daedalus.capture.records import RECORD_PREFIX

BATCH_ROWS = 8192  # records per Arrow batch: a few MB of level2, small enough to bound memory
MAX_OBJECT_BYTES = 64 << 20  # the largest frame DuckDB accepts (real BTC-USD snapshots are ~5 MB)

_UPDATES = "STRUCT(side VARCHAR, event_time VARCHAR, price_level VARCHAR, new_quantity VARCHAR)[]"
_TRADES = "STRUCT(trade_id VARCHAR, product_id VARCHAR, price VARCHAR, size VARCHAR, side VARCHAR, time VARCHAR)[]"
_TICKERS = (
    "STRUCT(type VARCHAR, product_id VARCHAR, price VARCHAR, volume_24_h VARCHAR, low_24_h VARCHAR, "
    "high_24_h VARCHAR, price_percent_chg_24_h VARCHAR, best_bid VARCHAR, best_bid_quantity VARCHAR, "
    "best_ask VARCHAR, best_ask_quantity VARCHAR)[]"
)
_CANDLES = "STRUCT(start VARCHAR, high VARCHAR, low VARCHAR, open VARCHAR, close VARCHAR, volume VARCHAR, product_id VARCHAR)[]"
_EVENTS = (
    f"STRUCT(type VARCHAR, product_id VARCHAR, updates {_UPDATES}, trades {_TRADES}, tickers {_TICKERS}, "
    f"candles {_CANDLES})[]"
)
#: The columns of a raw record (architecture 3.2) as DuckDB decodes them.
RECORD_COLUMNS = {
    "recv_ns": "BIGINT",
    "conn": "BIGINT",
    "msg": f"STRUCT(channel VARCHAR, type VARCHAR, message VARCHAR, timestamp VARCHAR, sequence_num BIGINT, "
    f"events {_EVENTS})",
    "event": "VARCHAR",
    "raw": "VARCHAR",
    "received": "BIGINT",
    "dropped": "BIGINT",
}
_COLUMNS_SQL = "{" + ", ".join(f"'{k}': '{v}'" for k, v in RECORD_COLUMNS.items()) + "}"
_LINE_IN_ERROR = re.compile(r"\bline (\d+)")
MAX_REJECTED_LINES = 1000  # after this many shape errors in one segment the whole segment is quarantined


class SegmentDecodeError(Exception):
    """DuckDB could not decode a line (``line`` is 0-based, None when it did not say)."""

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


def connect() -> duckdb.DuckDBPyConnection:
    """A DuckDB connection for the ETL: one thread (line order = row order), bounded memory."""
    return duckdb.connect(config={"threads": 1, "memory_limit": "256MB", "preserve_insertion_order": True})


def read_batches(con: duckdb.DuckDBPyConnection, path: Path, batch_rows: int = BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Every record of ``path`` in order, as Arrow batches with the :data:`RECORD_COLUMNS`."""
    compression = "zstd" if path.name.endswith(".zst") else "none"
    literal = "'" + str(path).replace("'", "''") + "'"
    sql = (
        f"SELECT * FROM read_json({literal}, format='newline_delimited', compression='{compression}', "
        f"maximum_object_size={MAX_OBJECT_BYTES}, columns={_COLUMNS_SQL})"
    )
    try:
        reader = con.sql(sql).to_arrow_reader(batch_rows)
        yield from reader
    except duckdb.Error as exc:
        match = _LINE_IN_ERROR.search(str(exc))
        raise SegmentDecodeError(str(exc).splitlines()[0], int(match.group(1)) - 1 if match else None) from exc


@dataclass
class CleanCopy:
    """Result of :func:`clean_copy`: the good lines in ``path``; the rest, with why."""

    path: Path
    rejected: list[tuple[str, bytes]] = field(default_factory=list)  # (reason, line)
    kept: int = 0


def clean_copy(source: Path, target: Path) -> CleanCopy:
    """Copy the lines of ``source`` that are JSON records to ``target`` (plain NDJSON)."""
    out = CleanCopy(target)
    with target.open("wb") as sink:
        try:
            for line in _lines(source):
                reason = _record_problem(line)
                if reason:
                    out.rejected.append((reason, line))
                else:
                    sink.write(line + b"\n")
                    out.kept += 1
        except zstandard.ZstdError as exc:
            out.rejected.append((f"torn zstd tail: {exc}", b""))
    return out


def drop_line(path: Path, index: int) -> bytes:
    """Remove line ``index`` (0-based) of a plain NDJSON file in place; returns it."""
    lines = path.read_bytes().split(b"\n")
    removed = lines.pop(index)
    path.write_bytes(b"\n".join(lines))
    return removed


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as raw:
        stream = (
            zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            if path.name.endswith(".zst")
            else raw
        )
        pending = b""
        while chunk := stream.read(1 << 20):
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for line in complete:
                if line.strip():
                    yield line.rstrip(b"\r")
        if pending.strip():
            yield pending  # a last line without its newline: checked like any other


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
    msg = record.get("msg")
    if msg is not None and not isinstance(msg, dict):
        return "msg is not an object"
    return None
