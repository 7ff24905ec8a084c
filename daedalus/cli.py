"""The ``daedalus`` command: one sub-command per job."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
import yaml

from daedalus import __version__
from daedalus.config import ConfigError, DaedalusConfig, effective_config, load_config
from daedalus.logs import setup_logging

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


def _fail(message: str, code: int = 2) -> typer.Exit:
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
    stats_interval: Annotated[float | None, typer.Option(help="Print the statistics block every S seconds.")] = None,
) -> None:
    """Capture the Coinbase feed into durable raw segments until SIGINT/SIGTERM."""
    from daedalus.capture.auth import AuthError
    from daedalus.capture.pipeline import ingest as run_ingest
    from daedalus.locks import AlreadyRunning

    settings = _configured(config)
    try:
        ok = asyncio.run(run_ingest(settings, stats_interval))
    except KeyboardInterrupt:
        ok = True
    except AuthError as exc:
        raise _fail(f"cannot authenticate: {exc}") from None
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    except AlreadyRunning as exc:
        raise _fail(f"cannot start: {exc}") from None
    if not ok:
        raise typer.Exit(1)


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
) -> None:
    """Turn closed raw segments into Hive-partitioned Parquet (books, trades, tickers, bars)."""
    from daedalus.etl.job import EtlIoError, EtlJob
    from daedalus.locks import AlreadyRunning

    settings = _configured(config)
    start, end = _etl_dates(mode, day, start_date, end_date)
    job = EtlJob(settings)
    show = sys.stderr.isatty() if progress is None else progress
    try:
        if watch:
            if mode is not EtlMode.all:
                raise _fail("--watch processes every segment as it arrives: use it without --mode date/range")
            stop = threading.Event()
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: stop.set())
            summary = job.watch(poll_interval or settings.etl.poll_interval_seconds, stop.is_set, show)
        else:
            summary = job.run(start, end, show)
    except AlreadyRunning as exc:
        raise _fail(f"cannot start: {exc}") from None
    except EtlIoError as exc:
        raise _fail(f"etl stopped: {exc} (the segment stays in raw/processing/ and is retried next run)", 1) from None
    typer.echo(summary.text())


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
    if value == "max":
        return None
    try:
        rate = float(value)
    except ValueError:
        raise typer.BadParameter(f"expected a number of frames per second or 'max', got {value!r}") from None
    if rate < 0:
        raise typer.BadParameter("must be >= 0")
    return rate


@app.command()
def sim(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind; 0 picks a free one.")] = 8765,
    products: Annotated[str, typer.Option(help="Comma-separated product ids.")] = "BTC-USD,ETH-USD",
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
    log_level: LogLevel = "INFO",
    log_format: LogFormat = "text",
) -> None:
    """Run the exchange simulator (Coinbase Advanced Trade WebSocket + REST) on one port."""
    from daedalus.sim import FaultConfig, SimConfig, serve

    setup_logging(log_level, log_format)
    product_ids = tuple(p.strip() for p in products.split(",") if p.strip())
    if not product_ids:
        raise _fail("--products: give at least one product id")
    faults = FaultConfig(drop_rate, disconnect_every, idle_timeout, malformed_rate, stall_every, stall_seconds)
    try:
        faults.validate()
    except ValueError as exc:
        raise _fail(f"invalid fault flag: {exc}") from None
    if replay is not None and not replay.exists():
        raise _fail(f"--replay: {replay} does not exist")
    config = SimConfig(
        host=host,
        port=port,
        products=product_ids,
        rate=_parse_rate(rate),
        seed=seed,
        levels=levels,
        replay=replay,
        speed=speed,
        client_id=client_id,
        faults=faults,
    )

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
    except OSError as exc:
        raise _fail(f"cannot serve on {host}:{port}: {exc.strerror or exc}", 1) from None


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
