"""Writing a query result (a stream of Arrow record batches) as a table, CSV, JSON or Parquet.

Streams batch by batch, so a result larger than memory can go to a file; only the table
form holds rows, and at most the ``max_rows`` it shows.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

FORMATS = ("table", "csv", "json", "parquet")
MAX_CELL = 60  # characters of one cell in the table form


def text_batch(batch: pa.RecordBatch, *, for_json: bool = False) -> pa.RecordBatch:
    """``batch`` with the columns a text format cannot hold as they are turned into strings.

    ns timestamps: Python datetimes stop at microseconds, so they become text (ISO 8601 with
    ``T`` and ``Z`` for JSON, like the µs ones orjson writes; ``2026-08-09 21:00:00.123456789``
    for CSV and the table, like pyarrow writes µs ones). Lists and structs: JSON text, except
    in JSON itself, which keeps them as they are."""
    import orjson
    import pyarrow as pa
    import pyarrow.compute as pc

    columns, changed = [], False
    for field, column in zip(batch.schema, batch.columns, strict=True):
        kind = field.type
        if not for_json and pa.types.is_nested(kind):
            dump = orjson.dumps
            values = [None if v is None else dump(v, default=_json_default).decode() for v in column.to_pylist()]
            column, changed = pa.array(values, pa.string()), True
        elif pa.types.is_timestamp(kind) and kind.unit == "ns":
            text = pc.strftime(column, format="%Y-%m-%dT%H:%M:%SZ") if for_json else column.cast(pa.string())
            column, changed = text, True
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names) if changed else batch


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)  # exact, as the decimal strategy promises
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def write_csv(batches: pa.RecordBatchReader, out: IO[bytes]) -> int:
    """CSV with a header line; returns the number of rows."""
    import pyarrow.csv as pacsv

    rows, writer = 0, None
    for batch in batches:
        batch = text_batch(batch)
        if writer is None:
            writer = pacsv.CSVWriter(out, batch.schema)
        writer.write_batch(batch)
        rows += batch.num_rows
    if writer is None:  # no batch at all: still the header
        import pyarrow as pa

        writer = pacsv.CSVWriter(out, text_batch(pa.RecordBatch.from_pylist([], schema=batches.schema)).schema)
    writer.close()
    return rows


def write_json(batches: pa.RecordBatchReader, out: IO[bytes]) -> int:
    """A JSON array of records, one record per line; UTC timestamps end in ``Z``, decimals are
    strings (exact), NaN is null. Returns the number of rows."""
    import orjson

    options = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z
    rows = 0
    out.write(b"[")
    for batch in batches:
        for record in text_batch(batch, for_json=True).to_pylist():
            out.write(b"\n" if rows == 0 else b",\n")
            out.write(orjson.dumps(record, default=_json_default, option=options))
            rows += 1
    out.write(b"\n]\n" if rows else b"]\n")
    return rows


def write_parquet(batches: pa.RecordBatchReader, out: Path) -> int:
    """A Parquet file (zstd); returns the number of rows."""
    import pyarrow.parquet as pq

    rows = 0
    with pq.ParquetWriter(out, batches.schema, compression="zstd") as writer:
        for batch in batches:
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary name next to ``path``, renamed to it once the block succeeds and removed if
    it fails: an ``--out`` file is the whole result or is not there (never half a file, and an
    earlier file of that name stays as it was)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_result(batches: pa.RecordBatchReader, fmt: str, out: Path | None, max_rows: int) -> int:
    """``batches`` in ``fmt`` (one of :data:`FORMATS`) to the file ``out`` (atomically) or to
    stdout (parquet needs a file); returns the number of rows."""
    if out is None:
        if fmt == "table":
            return write_table(batches, sys.stdout, max_rows)
        sys.stdout.flush()
        rows = (write_csv if fmt == "csv" else write_json)(batches, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return rows
    with atomic_file(out) as tmp:
        if fmt == "parquet":
            return write_parquet(batches, tmp)
        if fmt == "table":
            with tmp.open("w", encoding="utf-8") as handle:
                return write_table(batches, handle, max_rows)
        with tmp.open("wb") as handle:
            return (write_csv if fmt == "csv" else write_json)(batches, handle)


def write_table(batches: pa.RecordBatchReader, out: IO[str], max_rows: int) -> int:
    """An aligned plain-text table of the first ``max_rows`` rows, then ``… N more rows``
    and the row count. Returns the number of rows."""
    import pyarrow as pa

    names = batches.schema.names
    shown: list[list[str]] = []
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) or pa.types.is_decimal(f.type)
               for f in batches.schema]  # fmt: skip
    total = 0
    for batch in batches:
        if len(shown) < max_rows:
            part = text_batch(batch.slice(0, max_rows - len(shown)))
            for record in zip(*(col.to_pylist() for col in part.columns), strict=True):
                shown.append([_cell(v) for v in record])
        total += batch.num_rows
    widths = [max([len(n)] + [len(row[i]) for row in shown]) for i, n in enumerate(names)]

    def line(cells: Iterable[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    if names:
        out.write(line(names) + "\n")
        out.write("  ".join("-" * w for w in widths) + "\n")
        for row in shown:
            out.write(line(row) + "\n")
    if total > len(shown):
        out.write(f"… {total - len(shown):,} more rows\n")
    out.write(f"({total:,} row{'s' if total != 1 else ''})\n")
    return total


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.10g}"
    if isinstance(value, datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, date | time | Decimal):
        return str(value)
    text = str(value).replace("\n", "\\n")
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"
