"""The ``daedalus`` command: one sub-command per job."""

from __future__ import annotations

import asyncio
import errno
import math
import os
import signal
import sys
import tempfile
import threading
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
import yaml

from daedalus import __version__
from daedalus.config import MAX_SECONDS, ConfigError, DaedalusConfig, effective_config, load_config
from daedalus.exitcodes import FAILED, NEEDS_OPERATOR
from daedalus.logs import setup_logging
from daedalus.ops.child import follow_supervisor

app = typer.Typer(
    name="daedalus",
    help="Crypto market-data capture and ETL: exchange WebSockets -> durable raw segments -> Parquet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect and validate configuration files.", no_args_is_help=True)
app.add_typer(config_app, name="config")

LogLevel = Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")]
LogFormat = Annotated[str, typer.Option("--log-format", help="text or json.")]


def _fail(message: str, code: int = NEEDS_OPERATOR) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def _configured(path: Path) -> DaedalusConfig:
    """Load the config (exit 2 with every problem listed) and set up logging from it."""
    try:
        settings = load_config(path)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    setup_logging(settings.logging.level, settings.logging.format)
    return settings


# A full disk is not a reason to refuse to start: capture keeps retrying and counts what it
# could not write, the ETL leaves the segment to the next run.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _require_writable(directory: Path, key: str) -> None:
    """Create ``directory`` and a probe file in it, or exit 2 with one line naming ``key``.

    A real create rather than ``os.access``: root passes every permission check but not a
    read-only mount, and a path component that is a file fails either way. Called at the
    start of the commands that write, so the problem is not a traceback at the first flush.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise _fail(f"{key}: cannot write to {directory}: it is a file, not a directory") from None
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            return
        raise _fail(f"{key}: cannot write to {directory}: {exc.strerror or exc}") from None


def _check_seconds(value: float | None, flag: str, *, zero: str | None = None) -> None:
    """Exit 2 unless ``value`` is a finite number of seconds in (0, 1 day]; ``zero`` names
    what 0 means for flags where 0 is allowed (e.g. "off")."""
    if value is None or (zero is not None and value == 0):
        return
    if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):  # the config's bound for durations
        allowed = f"0 ({zero}) or" if zero else "more than 0 and"
        raise _fail(f"{flag}: must be {allowed} at most {MAX_SECONDS} seconds (got {value})")


@app.command()
def version() -> None:
    """Print the Daedalus version."""
    typer.echo(__version__)


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="YAML configuration file.")],
) -> None:
    """Validate FILE and print the effective configuration (secrets masked)."""
    try:
        config = load_config(file)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"# {file}: valid", err=True)
    typer.echo(yaml.safe_dump(effective_config(config), sort_keys=False).rstrip())


@app.command()
def ingest(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file.")],
    stats_interval: Annotated[
        float | None, typer.Option(help="Print the statistics block every S seconds (0 or unset: never).")
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(help="Source to capture (coinbase, ccxt, databento; default: the one enabled in the config)."),
    ] = None,
) -> None:
    """Capture one source's feed into durable raw segments until SIGINT/SIGTERM."""
    from daedalus.capture.auth import AuthError
    from daedalus.capture.pipeline import run_ingest
    from daedalus.locks import AlreadyRunning

    _check_seconds(stats_interval, "--stats-interval", zero="off")
    follow_supervisor()
    settings = _configured(config)
    chosen = _ingest_source(settings, source)
    _require_writable(settings.layout.raw, "data_dir")
    try:
        ok = run_ingest(settings, stats_interval, chosen)
    except KeyboardInterrupt:
        ok = True
    except AuthError as exc:
        raise _fail(f"cannot authenticate: {exc}") from None
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    except AlreadyRunning as exc:  # transient: the supervisor retries with backoff
        raise _fail(f"cannot start: {exc}", FAILED) from None
    if not ok:
        raise typer.Exit(1)


def _ingest_source(settings: DaedalusConfig, source: str | None) -> str:
    """``--source``, checked; without it, the one source the config enables."""
    from daedalus import sources

    enabled = sources.enabled(settings)
    if source is None:
        if len(enabled) != 1:
            found = f"enabled: {', '.join(enabled)}" if enabled else "none is enabled (coinbase.enabled, ccxt.enabled)"
            raise _fail(f"--source: say which source to capture ({found}); `daedalus run` starts one ingest each")
        return enabled[0]
    if source not in sources.names():
        raise _fail(f"--source: unknown source {source!r} (available: {', '.join(sources.names())})")
    if source not in enabled:
        raise _fail(f"--source: {source} is disabled in the config ({source}.enabled: false)")
    return source


def _etl_sources(settings: DaedalusConfig, source: str | None) -> list[str]:
    """``--source``, checked; without it, every enabled source (coinbase when none is)."""
    from daedalus import sources

    if source is None:
        return sources.enabled(settings) or ["coinbase"]
    if source not in sources.names():
        raise _fail(f"--source: unknown source {source!r} (available: {', '.join(sources.names())})")
    return [source]


class EtlMode(StrEnum):
    all = "all"
    date = "date"
    range = "range"


@app.command()
def etl(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file.")],
    mode: Annotated[EtlMode, typer.Option(help="all: every ready segment; date: one day; range: a span of days.")] = (
        EtlMode.all
    ),
    day: Annotated[str | None, typer.Option("--date", help="YYYY-MM-DD, with --mode date.")] = None,
    start_date: Annotated[str | None, typer.Option(help="YYYY-MM-DD, first day with --mode range.")] = None,
    end_date: Annotated[str | None, typer.Option(help="YYYY-MM-DD, last day with --mode range.")] = None,
    watch: Annotated[bool, typer.Option(help="Keep running: process segments as they become ready.")] = False,
    poll_interval: Annotated[float | None, typer.Option(help="Seconds between looks at ready/ (--watch).")] = None,
    progress: Annotated[bool | None, typer.Option(help="Progress bar (default: when stderr is a terminal).")] = None,
    rebuild_state: Annotated[
        bool, typer.Option(help="Move a damaged or incompatible checkpoint aside first and start from empty books.")
    ] = False,
    source: Annotated[
        str | None, typer.Option(help="Only this source's segments (default: every enabled source).")
    ] = None,
    raw_input: Annotated[
        str | None, typer.Option("--input", help="Read raw segments from this raw root (s3://bucket/prefix/raw or "
                                 "a directory; its ready/ and archive/ are read, never changed).")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", help="Write the processed dataset and its checkpoint here "
                                 "(s3://bucket/prefix/processed or a directory).")
    ] = None,
    dask: Annotated[
        str | None, typer.Option("--dask", help="Backfill on Dask: local:N (N worker processes here) or "
                                 "tcp://HOST:8786 (a running scheduler); the result equals the sequential run.")
    ] = None,
    scratch: Annotated[
        str | None, typer.Option("--scratch", help="With --dask: the tasks' shared work area, s3://bucket/prefix "
                                 "for workers on other machines (default: the data directory's tmp/).")
    ] = None,
) -> None:
    """Turn closed raw segments into Hive-partitioned Parquet (books, trades, tickers, bars)."""
    from daedalus.etl.job import EtlIoError, EtlJob, EtlStuck
    from daedalus.etl.remote import StoreEtl
    from daedalus.etl.state import EtlStateError
    from daedalus.locks import AlreadyRunning
    from daedalus.storage import StorageError

    _check_seconds(poll_interval, "--poll-interval")
    follow_supervisor()
    settings = _configured(config)
    start, end = _etl_dates(mode, day, start_date, end_date)
    stores = raw_input is not None or output is not None  # the ETL between stores (daedalus.etl.remote)
    _require_writable(settings.layout.raw if not stores else settings.layout.root, "data_dir")
    if not stores:
        _require_writable(settings.processed_dir, "etl.output_dir" if settings.etl.output_dir else "data_dir")
    for location, flag in ((raw_input, "--input"), (output, "--output"), (scratch, "--scratch")):
        _check_location(location, flag)
    chosen = _etl_sources(settings, source)
    if watch and len(chosen) > 1:
        raise _fail(f"--watch: one watcher per source (`daedalus run` starts them): add --source "
                    f"({', '.join(chosen)})")  # fmt: skip
    if watch and mode is not EtlMode.all:
        raise _fail("--watch processes every segment as it arrives: use it without --mode date/range")
    show = sys.stderr.isatty() if progress is None else progress
    if dask is not None:
        if watch or rebuild_state:
            raise _fail("--dask is a backfill of what is there now: not with --watch or --rebuild-state "
                        "(run `daedalus etl --rebuild-state` first)")  # fmt: skip
        return _backfill(settings, chosen, dask, start, end, show, raw=raw_input, processed=output, scratch=scratch)
    if scratch is not None:
        raise _fail("--scratch is the work area of a --dask backfill")
    stop = threading.Event()
    if watch:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
    poll = settings.etl.poll_interval_seconds if poll_interval is None else poll_interval
    summaries = []
    try:
        for name in chosen:
            job = (StoreEtl(settings, name, raw=raw_input or str(settings.layout.raw),
                            processed=output or str(settings.processed_dir))
                   if stores else EtlJob(settings, name))  # fmt: skip
            try:
                if rebuild_state:
                    moved = job.rebuild_state()
                    typer.echo(f"{name}: checkpoint moved to {moved}" if moved
                               else f"{name}: no checkpoint to move aside", err=True)  # fmt: skip
                summary = job.watch(poll, stop.is_set, show) if watch else job.run(start, end, show)
            finally:
                if isinstance(job, StoreEtl):
                    job.close()
            summaries.append((name, summary))
    except StorageError as exc:
        raise _fail(f"etl stopped: {exc} (nothing unpublished counts as done: rerun to continue)", 1) from None
    except AlreadyRunning as exc:  # transient: the supervisor retries with backoff
        raise _fail(f"cannot start: {exc}", FAILED) from None
    except EtlIoError as exc:
        raise _fail(f"etl stopped: {exc} (the segment stays in raw/processing/ and is retried next run)", 1) from None
    except EtlStuck as exc:
        raise _fail(f"etl stopped: {exc}", 1) from None
    except (EtlStateError, ConfigError) as exc:  # ConfigError: a source's optional dependency is missing
        raise _fail(f"cannot start: {exc}") from None
    for name, summary in summaries:
        typer.echo(summary.text() if len(summaries) == 1 else f"[{name}]\n{summary.text()}")


def _backfill(settings: DaedalusConfig, chosen: list[str], address: str, start: date | None, end: date | None,
              show: bool, *, raw: str | None, processed: str | None, scratch: str | None) -> None:  # fmt: skip
    """``daedalus etl --dask``: each source's pending segments on Dask (daedalus.backfill)."""
    from daedalus.backfill.run import Backfill, BackfillError
    from daedalus.etl.output import OutputConflict
    from daedalus.etl.state import EtlStateError
    from daedalus.locks import AlreadyRunning
    from daedalus.storage import StorageError

    try:
        backfills = [Backfill(settings, name, raw=raw, processed=processed, scratch=scratch)
                     for name in chosen]  # all checked before any runs  # fmt: skip
    except BackfillError as exc:
        raise _fail(str(exc)) from None
    try:
        for name, backfill in zip(chosen, backfills, strict=True):
            summary = backfill.run(address, start, end, show)
            typer.echo(summary.text() if len(chosen) == 1 else f"[{name}]\n{summary.text()}")
    except (BackfillError, EtlStateError, StorageError, OutputConflict, OSError) as exc:
        raise _fail(f"backfill stopped: {exc} (finished work is kept: rerun to continue)", 1) from None
    except AlreadyRunning as exc:
        raise _fail(f"cannot start: {exc}", FAILED) from None


def _check_location(location: str | None, flag: str) -> None:
    """An ``s3://bucket/prefix`` URL or a directory path; anything else (``http://``, a bare
    bucket name) is a clear error, not a directory named after it."""
    if location is None:
        return
    if "://" in location and not location.startswith("s3://"):
        raise _fail(f"{flag} {location!r}: expected s3://bucket/prefix or a directory")
    if location.startswith("s3://"):
        from daedalus.sync.s3 import parse_destination

        try:
            parse_destination(location)
        except ValueError as exc:
            raise _fail(f"{flag}: {exc}") from None


def _etl_dates(mode: EtlMode, day: str | None, start: str | None, end: str | None) -> tuple[date | None, date | None]:
    def parse(value: str | None, option: str) -> date:
        if value is None:
            raise _fail(f"--mode {mode.value} needs {option} YYYY-MM-DD")
        try:
            return date.fromisoformat(value)
        except ValueError:
            raise _fail(f"{option} {value!r} is not a date (YYYY-MM-DD)") from None

    if mode is EtlMode.date:
        one = parse(day, "--date")
        return one, one
    if mode is EtlMode.range:
        first, last = parse(start, "--start-date"), parse(end, "--end-date")
        if last < first:
            raise _fail(f"--end-date {last} is before --start-date {first}")
        return first, last
    return None, None


def _parse_rate(value: str) -> float | None:
    """``--rate``: frames per second, or None for 'max' (the range is checked by SimConfig)."""
    if value == "max":
        return None
    try:
        return float(value)
    except ValueError:
        raise _fail(f"--rate: expected a number of frames per second or 'max', got {value!r}") from None


def _parse_products(value: str | None) -> tuple[str, ...] | None:
    """``--products``: the comma-separated ids (each checked by SimConfig), None when not given."""
    if value is None:
        return None
    return tuple(p.strip() for p in value.split(",") if p.strip())


@app.command()
def sim(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind; 0 picks a free one.")] = 8765,
    products: Annotated[
        str | None,
        typer.Option(help="Comma-separated product ids (default BTC-USD,ETH-USD); replay adds the recording's."),
    ] = None,
    rate: Annotated[str, typer.Option(help="Market frames per second, or 'max'.")] = "100",
    seed: Annotated[int, typer.Option(help="Seed of the market's random process.")] = 1,
    levels: Annotated[int, typer.Option(help="Initial book levels per side.")] = 1000,
    replay: Annotated[
        Path | None, typer.Option(help="Serve this recording (.jsonl[.zst] or raw segments) instead.")
    ] = None,
    speed: Annotated[float, typer.Option(help="Replay speed factor; 0 = as fast as possible.")] = 1.0,
    client_id: Annotated[str | None, typer.Option(help="Add this client_id to every frame.")] = None,
    drop_rate: Annotated[float, typer.Option(help="Fault: fraction of update frames dropped.")] = 0.0,
    disconnect_every: Annotated[
        float | None, typer.Option(help="Fault: close each connection after N seconds.")
    ] = None,
    idle_timeout: Annotated[
        float | None, typer.Option(help="Fault: close connections idle N seconds without heartbeats.")
    ] = None,
    malformed_rate: Annotated[float, typer.Option(help="Fault: fraction of frames preceded by invalid JSON.")] = 0.0,
    stall_every: Annotated[float | None, typer.Option(help="Fault: stall each connection every N seconds.")] = None,
    stall_seconds: Annotated[float, typer.Option(help="Fault: how long each stall lasts.")] = 0.0,
    protocol: Annotated[
        str, typer.Option(help="coinbase (WebSocket + REST) or databento (Databento's live gateway, raw TCP + DBN).")
    ] = "coinbase",
    symbols: Annotated[str | None, typer.Option(help="databento: comma-separated symbols (default ESM6,NQM6).")] = None,
    dataset: Annotated[str, typer.Option(help="databento: the dataset served (replay: the file's).")] = "GLBX.MDP3",
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="DAEDALUS_SIM_DATABENTO_KEY",
            help="databento: the key clients must use (default the test key db-sim00000000000000000000000TEST).",
        ),
    ] = None,
    truth: Annotated[
        Path | None, typer.Option(help="databento: write the true top of book after every MBO record (NDJSON).")
    ] = None,
    history: Annotated[int, typer.Option(help="databento: market events kept for start= replay (~3 KB each).")] = 20000,
    disconnect_after_records: Annotated[
        int | None, typer.Option(help="databento fault: close each connection after N records.")
    ] = None,
    slow_reader_bytes: Annotated[
        int, typer.Option(help="databento fault: skip records while a client leaves more than N bytes unread.")
    ] = 16 * 1024 * 1024,
    log_level: LogLevel = "INFO",
    log_format: LogFormat = "text",
) -> None:
    """Run the exchange simulator: Coinbase Advanced Trade (WebSocket + REST) or a Databento live gateway."""
    from daedalus.sim import FaultConfig, SimConfig, SimConfigError, serve
    from daedalus.sim.replay import RecordingError

    setup_logging(log_level, log_format)
    if protocol not in ("coinbase", "databento"):
        raise _fail(f"--protocol: expected coinbase or databento, got {protocol!r}")
    if protocol == "databento":
        from daedalus.sources.databento import require_extra

        try:
            require_extra("databento_dbn")  # the gateway encodes with Databento's own DBN codec
        except ConfigError as exc:
            raise _fail(str(exc)) from None
        from daedalus.sim.databento.cli import run_gateway

        code = run_gateway(
            host=host,
            port=port,
            symbols=symbols,
            dataset=dataset,
            api_key=api_key,
            rate=_parse_rate(rate),
            seed=seed,
            replay=replay,
            truth=truth,
            history=history,
            disconnect_after_s=disconnect_every,
            disconnect_after_records=disconnect_after_records,
            slow_reader_bytes=slow_reader_bytes,
        )
        if code:
            raise typer.Exit(code)
        return
    if symbols is not None or truth is not None or api_key is not None or disconnect_after_records is not None:
        raise _fail("--symbols, --api-key, --truth and --disconnect-after-records need --protocol databento")
    faults = FaultConfig(drop_rate, disconnect_every, idle_timeout, malformed_rate, stall_every, stall_seconds)
    config = SimConfig(
        host=host,
        port=port,
        products=_parse_products(products),
        rate=_parse_rate(rate),
        seed=seed,
        levels=levels,
        replay=replay,
        speed=speed,
        client_id=client_id,
        faults=faults,
    )
    try:
        config.validate()
    except SimConfigError as exc:
        raise _fail(f"{exc.flag}: {exc}") from None

    def ready(server: object) -> None:
        from daedalus.sim import SimServer

        assert isinstance(server, SimServer)
        mode = f"replay={replay}" if replay else f"rate={rate} seed={seed}"
        print(
            f"daedalus sim ready ws={server.ws_url} rest={server.rest_url} products={','.join(server.products)} {mode}",
            flush=True,
        )

    try:
        asyncio.run(serve(config, ready))
    except KeyboardInterrupt:
        pass
    except RecordingError as exc:
        raise _fail(f"--replay {replay}: {exc}") from None
    except OSError as exc:
        raise _fail(f"cannot serve on {host}:{port}: {exc.strerror or exc}", 1) from None


def _source_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [s.strip() for s in value.split(",") if s.strip()]


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file.")],
    sources: Annotated[
        str | None, typer.Option(help="Comma-separated sources to capture (default: every enabled one).")
    ] = None,
    no_sync: Annotated[bool, typer.Option("--no-sync", help="Do not start the S3 sync child.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the command lines it would start, then exit.")] = (
        False
    ),
    status: Annotated[bool, typer.Option("--status", help="Print the running supervisor's status (as `status`).")] = (
        False
    ),
    memory_limit_mb: Annotated[
        float | None, typer.Option(help="Restart a child gracefully above this RSS (overrides memory_critical_mb).")
    ] = None,
) -> None:
    """The supervisor: start ingest, the ETL watcher (and sync), keep them alive, serve status."""
    settings = _configured(config)
    if status:
        raise typer.Exit(_print_status(settings))
    setup_logging(settings.logging.level, settings.logging.format, stream=sys.stdout)  # journald reads stdout
    from daedalus.supervisor.main import SupervisorUsageError, run_supervisor

    if memory_limit_mb is not None and not (math.isfinite(memory_limit_mb) and 0 < memory_limit_mb <= 1_048_576):
        raise _fail(f"--memory-limit-mb: must be more than 0 and at most 1048576 (got {memory_limit_mb})")
    if not dry_run:
        _require_writable(settings.layout.run_dir, "data_dir")
        _require_writable(settings.log_dir, "supervisor.log_dir" if settings.supervisor.log_dir else "data_dir")
    try:
        code = run_supervisor(
            settings,
            config_file=config,
            sources=_source_list(sources),
            sync=not no_sync,
            dry_run=dry_run,
            memory_limit_mb=memory_limit_mb,
        )
    except SupervisorUsageError as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


def _print_status(settings: DaedalusConfig) -> int:
    from daedalus.supervisor.report import status_text

    text, code = status_text(settings.layout)
    typer.echo(text)
    return code


@app.command("status")
def status_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file.")],
) -> None:
    """Each child of the running supervisor: pid, state, uptime, restarts, RSS, heartbeat, exit reason.
    Exit 1 when no supervisor runs on this data directory."""
    raise typer.Exit(_print_status(_configured(config)))


@app.command()
def health(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Backlog, disk, freshness and the supervisor's children. Exit 0 ok, 1 warning, 2 critical."""
    import orjson

    from daedalus.ops.health import check_health

    report = check_health(_configured(config))
    if as_json:
        typer.echo(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())
    else:
        typer.echo(report.text())
    raise typer.Exit(report.exit_code)


# Commands that live with their own package (each imports its heavy libraries lazily).
def _register_commands() -> None:
    from daedalus.demo import register as register_demo
    from daedalus.plot.command import register as register_plot
    from daedalus.query.command import register as register_query
    from daedalus.sync.command import register as register_sync

    for register in (register_query, register_plot, register_demo, register_sync):
        register(app)


_register_commands()


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
