"""The Python side of ``daedalus query``: run SQL or a preset over the processed dataset.

``run_sql(config, sql)`` and ``run_preset(config, name, ...)`` return a ``pyarrow.Table``;
``stream_sql`` returns record batches for results too large to hold. Every failure a user
can cause (bad SQL, a preset without its data, a bad parameter) is a :class:`QueryError`
with one line of text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daedalus.query.presets import PRESETS, PresetError, preset_sql

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

    from daedalus.config import DaedalusConfig
    from daedalus.query.remote import ProcessedRoot

BATCH_ROWS = 65_536


class QueryError(Exception):
    """A query that cannot run, as one line for the user."""


def one_line(message: str) -> str:
    """DuckDB's multi-line message on one line (the caret line under the SQL dropped)."""
    lines = [line.strip() for line in message.splitlines()]
    return " ".join(line for line in lines if line and set(line) != {"^"})


def no_data_hint(processed_dir: ProcessedRoot) -> str:
    return f"no processed data under {processed_dir}: run `daedalus etl` (or `daedalus demo --keep DIR`) first"


def stream_sql(con: duckdb.DuckDBPyConnection, sql: str, batch_rows: int = BATCH_ROWS) -> pa.RecordBatchReader | None:
    """The result of ``sql`` as a batch reader (None for a statement without a result, e.g.
    ``SET``). Raises :class:`QueryError` with DuckDB's message on one line."""
    import duckdb

    try:
        relation = con.sql(sql)
        return None if relation is None else relation.to_arrow_reader(batch_rows)
    except duckdb.Error as exc:
        raise QueryError(one_line(str(exc))) from None


def preset_for(config: DaedalusConfig, name: str, **params: object) -> str:
    """:func:`preset_sql` with the price scale of the config's decimal strategy."""
    scale = 1e8 if config.etl.decimal_strategy == "pips" else 1
    try:
        return preset_sql(name, price_scale=scale, **params)  # type: ignore[arg-type]
    except PresetError as exc:
        raise QueryError(str(exc)) from None


def missing_view(con: duckdb.DuckDBPyConnection, name: str, processed_dir: ProcessedRoot) -> str | None:
    """Why preset ``name`` cannot run on this connection, or None when its view is there."""
    from daedalus.query.views import dataset_views

    view = PRESETS[name].view
    views = dataset_views(con)
    if view in views:
        return None
    if not views:
        return no_data_hint(processed_dir)
    return f"--preset {name} reads the {view} dataset, which has no files under {processed_dir}"


def read_sql(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """The whole result of ``sql`` on ``con`` (an empty table for a statement without one)."""
    import pyarrow as pa

    reader = stream_sql(con, sql)
    if reader is None:
        return pa.table({})
    try:
        return reader.read_all()
    except Exception as exc:  # DuckDB errors raised while streaming arrive as Arrow errors
        raise QueryError(one_line(str(exc))) from None


def run_sql(config: DaedalusConfig, sql: str, processed: ProcessedRoot | None = None) -> pa.Table:
    """Run ``sql`` over the views of :func:`views.open_dataset` (of ``processed``: a directory or an
    :class:`~daedalus.query.remote.S3Location`, default the config's); the whole result in memory."""
    from daedalus.query.views import open_dataset

    con = open_dataset(config, processed)
    try:
        return read_sql(con, sql)
    finally:
        con.close()


def run_preset(
    config: DaedalusConfig, name: str, *, processed: ProcessedRoot | None = None, **params: object
) -> pa.Table:
    """Run preset ``name`` (``product``, ``start``, ``end``, ``interval``) over the dataset
    (``processed``, default the config's, as for :func:`run_sql`)."""
    from daedalus.query.views import open_dataset

    sql = preset_for(config, name, **params)
    con = open_dataset(config, processed)
    try:
        problem = missing_view(con, name, processed or config.processed_dir)
        if problem:
            raise QueryError(problem)
        return read_sql(con, sql)
    finally:
        con.close()
