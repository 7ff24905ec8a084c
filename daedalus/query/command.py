"""The ``daedalus query`` command (registered on the CLI by :func:`register`).

DuckDB, pyarrow and the writers are imported inside the command, so ``daedalus --help``
stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    import pyarrow as pa

    from daedalus.config import DaedalusConfig
    from daedalus.query.remote import ProcessedRoot

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML configuration file (default: built-in defaults, ./data).")
]
DataDirOption = Annotated[
    str | None,
    typer.Option(
        "--data-dir",
        metavar="DIR|s3://BUCKET/PREFIX",
        help="Read <DIR>/processed instead of the config's; an s3:// prefix is a data directory as `daedalus sync` "
        "uploads it (<PREFIX>/processed/...), read with the endpoint and keys of the config's sync: section.",
    ),
]
ProcessedOption = Annotated[
    str | None,
    typer.Option(
        "--processed",
        metavar="DIR|s3://BUCKET/PREFIX",
        help="Read this processed dataset (<source>/<channel>/... right below it, like etl.output_dir); "
        "s3:// uses the config's sync: endpoint and keys.",
    ),
]


FORMAT_HELP = "table (aligned text, first --max-rows rows), csv, json (array of records) or parquet (needs --out)."


def register(app: typer.Typer) -> None:
    """Add ``query`` to the ``daedalus`` command line."""

    @app.command()
    def query(
        sql: Annotated[
            str | None, typer.Argument(help="SQL over the views (see --schema).", show_default=False)
        ] = None,
        config: ConfigOption = None,
        data_dir: DataDirOption = None,
        processed: ProcessedOption = None,
        fmt: Annotated[str, typer.Option("--format", "-f", help=FORMAT_HELP)] = "table",
        out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the result to FILE, not stdout.")] = None,
        schema: Annotated[bool, typer.Option("--schema", help="List the views and their columns.")] = False,
        preset: Annotated[str | None, typer.Option(help="ohlcv, spread or gaps instead of SQL.")] = None,
        interval: Annotated[str, typer.Option(help="Bucket of --preset ohlcv: 1s .. 1d, like 1m, 15m, 1h.")] = "1m",
        product: Annotated[str | None, typer.Option(help="Only this product (presets).")] = None,
        start: Annotated[str | None, typer.Option(help="Presets: from this UTC time (ISO 8601), inclusive.")] = None,
        end: Annotated[str | None, typer.Option(help="Presets: until this UTC time (ISO 8601), exclusive.")] = None,
        max_rows: Annotated[int, typer.Option(help="Rows shown by --format table.", min=1)] = 40,
        show_sql: Annotated[bool, typer.Option("--show-sql", help="Print the preset's SQL instead of running it.")] = (
            False
        ),
    ) -> None:
        """Run SQL (DuckDB) over the processed dataset: one view per dataset (level2, book_snapshot_10,
        market_trades, ticker, candles, bars_1m, ...), partition columns included, timestamps as UTC
        TIMESTAMP plus exact <column>_ns integers. Errors: one line, exit 2."""
        from daedalus.cli import _fail
        from daedalus.query.output import FORMATS

        settings, root = dataset_for(config, data_dir, processed)
        if fmt not in FORMATS:
            raise _fail(f"--format: {fmt!r} must be table, csv, json or parquet")
        if fmt == "parquet" and out is None:
            raise _fail("--format parquet writes a file: give it with --out FILE")
        chosen = sum(x for x in (sql is not None, preset is not None, schema))
        if chosen != 1:
            raise _fail("give exactly one of: SQL, --preset NAME, --schema (see daedalus query --help)")
        _run(settings, root, sql, preset, schema, fmt, out, max_rows, show_sql,
             {"product": product, "start": start, "end": end, "interval": interval})  # fmt: skip


def dataset_for(
    config: Path | None, data_dir: str | None, processed: str | None
) -> tuple[DaedalusConfig, ProcessedRoot]:
    """The settings (:func:`settings_for`) and where the processed dataset is: ``--processed``,
    else ``--data-dir`` (local or ``s3://``), else the config's. Exit 2 on a bad combination or URL.
    Shared by ``query`` and ``plot``."""
    from daedalus.cli import _fail
    from daedalus.query.remote import RemoteError, is_s3_url, processed_root

    if data_dir is not None and processed is not None:
        raise _fail("give --data-dir or --processed, not both")
    settings = settings_for(config, None if is_s3_url(data_dir) else data_dir)
    try:
        return settings, processed_root(settings, data_dir, processed)
    except RemoteError as exc:
        raise _fail(str(exc)) from None


def settings_for(config: Path | None, data_dir: Path | str | None) -> DaedalusConfig:
    """The config of ``--config`` (exit 2 when invalid; built-in defaults without one), with
    ``--data-dir`` (a local directory) replacing its data directory."""
    from daedalus.cli import _configured
    from daedalus.config import parse_config
    from daedalus.logs import setup_logging

    if config is not None:
        settings = _configured(config)
    else:
        settings = parse_config({})
        setup_logging("WARNING")
    if data_dir is not None:
        settings = settings.model_copy(update={"data_dir": Path(data_dir), "etl": settings.etl.model_copy(
            update={"output_dir": None})})  # fmt: skip
    return settings


def _run(
    settings: DaedalusConfig,
    processed: ProcessedRoot,
    sql: str | None,
    preset: str | None,
    schema: bool,
    fmt: str,
    out: Path | None,
    max_rows: int,
    show_sql: bool,
    params: dict[str, str | None],
) -> None:
    """Schema, preset or SQL; every failure the user can cause becomes one line and exit 2."""
    from daedalus.cli import _fail
    from daedalus.query.api import QueryError, missing_view, no_data_hint, preset_for, stream_sql
    from daedalus.query.views import dataset_views, open_dataset

    try:
        if preset is not None:
            sql = preset_for(settings, preset, **params)
            if show_sql:
                typer.echo(sql)
                return
        con = open_dataset(settings, processed)
        views = dataset_views(con)
        if schema:
            _print_schema(views, processed)
            return
        if preset is not None and (problem := missing_view(con, preset, processed)):
            raise QueryError(problem)
        try:
            reader = stream_sql(con, sql)
        except QueryError as exc:
            raise QueryError(f"{exc} ({no_data_hint(processed)})" if not views else str(exc)) from None
        if reader is None:
            return
        rows = _write(reader, fmt, out, max_rows)
    except QueryError as exc:
        raise _fail(str(exc)) from None
    except BrokenPipeError:  # `| head`: the reader left; nothing to report, nothing more to flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    if out is not None:
        typer.echo(f"{rows:,} rows -> {out}", err=True)


def _write(reader: pa.RecordBatchReader, fmt: str, out: Path | None, max_rows: int) -> int:
    """:func:`output.write_result`, with what can go wrong there as :class:`QueryError`:
    an ``--out`` that cannot be written, or DuckDB failing while the rows stream."""
    from daedalus.query.api import QueryError, one_line
    from daedalus.query.output import write_result

    try:
        return write_result(reader, fmt, out, max_rows)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise QueryError(f"--out: cannot write {out}: {exc.strerror or exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith(("_duckdb", "duckdb", "pyarrow")):
            raise QueryError(one_line(str(exc))) from None
        raise


def _print_schema(views: dict[str, list[tuple[str, str]]], processed: ProcessedRoot) -> None:
    from daedalus.query.api import no_data_hint

    if not views:
        typer.echo(f"no views: {no_data_hint(processed)}", err=True)
        return
    for view, columns in views.items():
        typer.echo(view)
        width = max(len(name) for name, _ in columns)
        for name, kind in columns:
            typer.echo(f"  {name.ljust(width)}  {kind}")
