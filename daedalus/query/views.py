"""DuckDB over the processed dataset: one view per dataset, timestamps DuckDB can work with.

Layout read (architecture 3.1): ``<processed_dir>/<source>/<channel>/<key>=<value>/.../*.parquet``.

View names:

- a ``coinbase`` dataset is called by its channel: ``level2``, ``book_snapshot_10``,
  ``market_trades``, ``ticker``, ``candles``, ``bars_1m`` (whatever the directories are called,
  which the config's ``book_snapshot.levels`` and ``bars.interval`` decide);
- a dataset of another source (e.g. ``ccxt``) is always ``<source>_<channel>`` and, when no
  ``coinbase`` dataset and no other source has that channel, also plain ``<channel>``.

So adding a second source never renames a view a query already uses.

Columns: everything in the files plus the Hive partition columns (``date`` as DATE, every other
key, e.g. ``product_id`` or ``symbol``, as VARCHAR: a product id is never guessed to be a
number). DuckDB 2.0 reads ``timestamp[ns, UTC]`` as ``TIMESTAMPTZ_NS``, which ``date_trunc``,
``time_bucket`` and comparisons with timestamp literals do not accept yet, so each timestamp
column ``c`` is exposed as a plain ``TIMESTAMP`` holding UTC (microseconds, truncated) and the
exact value as ``c_ns`` (BIGINT nanoseconds since the epoch) for exact ordering and joins.
The connection's time zone is UTC, so ``TIMESTAMPTZ '... +00'`` literals compare as expected.

A dataset with no Parquet file has no view; a missing processed directory gives a connection
with no views at all (callers say so, see :func:`dataset_views`).

Directory names (the data directory's own included) are taken literally: a path enters SQL
only as a string literal (:func:`sql_string`) holding a glob in which every glob character is
escaped (:func:`glob_literal`), and a view name only as a quoted identifier. A dataset that
cannot be read (a damaged file, a name DuckDB cannot glob, a name another view took) is left
out with a warning; the other views stay usable.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from daedalus.logs import get_logger

if TYPE_CHECKING:
    import duckdb

    from daedalus.config import DaedalusConfig
    from daedalus.query.remote import ProcessedRoot

log = get_logger(__name__)

PRIMARY_SOURCE = "coinbase"
_TIMESTAMP_TYPES = ("TIMESTAMP", "TIMESTAMP_NS", "TIMESTAMP_MS", "TIMESTAMP_S", "TIMESTAMPTZ", "TIMESTAMPTZ_NS")


def sql_string(text: object) -> str:
    """``text`` as a SQL string literal: quoted, every ``'`` doubled, NUL refused.

    The only way a user-supplied value (product id, path) enters SQL text here."""
    value = str(text)
    if "\x00" in value:
        raise ValueError("a NUL character cannot be part of a SQL string")
    return "'" + value.replace("'", "''") + "'"


def sql_identifier(name: str) -> str:
    """``name`` as a quoted SQL identifier (``"`` doubled)."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class Dataset:
    """One ``<source>/<channel>`` directory that holds at least one Parquet file."""

    source: str
    channel: str
    root: Path | str  # a local directory, or an ``s3://`` URL (see :mod:`daedalus.query.remote`)
    partition_keys: tuple[str, ...]


def find_datasets(processed_dir: Path) -> list[Dataset]:
    """Every dataset under ``processed_dir``, in (source, channel) order.

    Skips ``_state`` and hidden directories; stops looking inside a dataset at its first
    Parquet file (a year of data is tens of thousands of files: open stays fast)."""
    found: list[Dataset] = []
    if not processed_dir.is_dir():
        return found
    for source in _subdirs(processed_dir):
        for channel in _subdirs(source):
            keys = _first_file_keys(channel)
            if keys is not None:
                found.append(Dataset(source.name, channel.name, channel, keys))
    return found


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def _first_file_keys(root: Path) -> tuple[str, ...] | None:
    """The Hive keys on the path to the first ``*.parquet`` file under ``root``, or None if none."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        if any(name.endswith(".parquet") for name in files):
            parts = Path(folder).relative_to(root).parts
            return tuple(part.split("=", 1)[0] for part in parts if "=" in part)
    return None


def view_names(datasets: list[Dataset]) -> dict[str, Dataset]:
    """View name -> dataset, by the rule in the module docstring. Names compare as DuckDB
    does (case-insensitively); when two datasets would share one, the ``coinbase`` one, then
    the first in (source, channel) order keeps it and the other is left out with a warning."""
    names: dict[str, Dataset] = {}
    channel_sources: dict[str, set[str]] = {}
    for ds in datasets:
        channel_sources.setdefault(ds.channel, set()).add(ds.source)
    for ds in sorted(datasets, key=lambda d: (d.source != PRIMARY_SOURCE, d.source, d.channel)):
        wanted = [ds.channel] if ds.source == PRIMARY_SOURCE else [f"{ds.source}_{ds.channel}"]
        if ds.source != PRIMARY_SOURCE and channel_sources[ds.channel] == {ds.source}:
            wanted.append(ds.channel)
        for name in wanted:
            taken = next((names[n] for n in names if n.lower() == name.lower()), None)
            if taken is None:
                names[name] = ds
            elif taken != ds:
                log.warning("query_view_name_taken", view=name, path=str(ds.root), by=str(taken.root))
    return dict(sorted(names.items()))


_GLOB_SPECIAL = frozenset("*?[]{}")


def glob_literal(path: Path | str) -> str:
    """``path`` as a DuckDB glob pattern matching only itself: each of ``* ? [ ] { }`` in a
    bracket class (``data[1]`` would otherwise also match ``data1``). DuckDB's globs cannot
    match a backslash at all, so a path with one is refused (:class:`ValueError`)."""
    text = str(path)
    if "\\" in text:
        raise ValueError("DuckDB cannot read a path that contains a backslash")
    return "".join(f"[{c}]" if c in _GLOB_SPECIAL else c for c in text)


def _scan_sql(ds: Dataset) -> str:
    """``read_parquet`` of every file of the dataset, partition keys typed explicitly."""
    glob = sql_string(f"{glob_literal(ds.root)}/**/*.parquet")
    if not ds.partition_keys:
        return f"read_parquet({glob})"
    types = ", ".join(f"{sql_string(k)}: {'DATE' if k == 'date' else 'VARCHAR'}" for k in ds.partition_keys)
    return f"read_parquet({glob}, hive_partitioning = true, hive_types = {{{types}}})"


def _view_sql(con: duckdb.DuckDBPyConnection, name: str, ds: Dataset) -> str:
    scan = _scan_sql(ds)
    columns = con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()
    stamps = [col for col, kind, *_ in columns if str(kind).upper().startswith(_TIMESTAMP_TYPES)]
    if not stamps:
        return f"CREATE VIEW {sql_identifier(name)} AS SELECT * FROM {scan}"
    replace = ", ".join(f"make_timestamp(epoch_ns({sql_identifier(c)}) // 1000) AS {sql_identifier(c)}" for c in stamps)
    exact = ", ".join(f"epoch_ns({sql_identifier(c)}) AS {sql_identifier(c + '_ns')}" for c in stamps)
    return f"CREATE VIEW {sql_identifier(name)} AS SELECT * REPLACE ({replace}), {exact} FROM {scan}"


def open_dataset(config: DaedalusConfig, processed_dir: ProcessedRoot | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per dataset under the processed directory
    (``config.processed_dir`` unless ``processed_dir`` is given: a directory or an
    :class:`~daedalus.query.remote.S3Location`). Time zone UTC, no progress bar. An S3 dataset
    that cannot be listed raises :class:`~daedalus.query.remote.RemoteError`."""
    import duckdb

    root = processed_dir or config.processed_dir
    con = duckdb.connect(":memory:")
    with contextlib.suppress(duckdb.Error):  # no ICU extension: TIMESTAMPTZ is UTC anyway
        con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")  # it writes to stdout, into CSV/JSON output
    try:
        datasets = _datasets_of(con, config, root)
    except BaseException:
        con.close()
        raise
    made = []
    for name, ds in view_names(datasets).items():
        try:
            con.execute(_view_sql(con, name, ds))
        except (duckdb.Error, ValueError) as exc:  # e.g. a damaged footer: the other views stay usable
            log.warning("query_view_skipped", view=name, path=str(ds.root), error=" ".join(str(exc).split()))
            continue
        made.append(name)
    log.debug("query_views", processed_dir=str(root), views=",".join(made) or "-")
    return con


def _datasets_of(con: duckdb.DuckDBPyConnection, config: DaedalusConfig, root: ProcessedRoot) -> list[Dataset]:
    """The datasets under ``root``; for S3, the connection reads ``s3://`` through pyarrow first."""
    if isinstance(root, Path):
        return find_datasets(root)
    from daedalus.query import remote

    fs = remote.arrow_filesystem(config.sync)
    remote.register(con, fs)
    return remote.find_datasets(fs, root, config.sync)


def dataset_views(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[str, str]]]:
    """View name -> [(column, DuckDB type)], in name order; empty when there is no data."""
    rows = con.execute(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'main' AND table_name IN "
        "(SELECT table_name FROM information_schema.tables WHERE table_type = 'VIEW') "
        "ORDER BY table_name, ordinal_position"
    ).fetchall()
    views: dict[str, list[tuple[str, str]]] = {}
    for view, column, kind in rows:
        views.setdefault(view, []).append((column, kind))
    return views
