"""Typed configuration: YAML file -> pydantic models.

- ``${VAR}`` and ``${VAR:-default}`` inside string values are replaced from the
  environment (``$${`` keeps a literal ``${``); a missing variable without a default is
  an error naming the key that used it.
- Secrets are :class:`pydantic.SecretStr`: printed as ``**********``, never logged.
- Unknown keys are rejected, so a typo never silently falls back to a default; so are
  duplicate keys (plain YAML keeps the last one silently).
- Every number is finite and bounded; YAML loading is bounded in file size, depth and
  alias expansion (see ``_BoundedLoader``), so hostile input is an error, not a crash.
- :func:`load_config` raises :class:`ConfigError` carrying one line per problem
  (``coinbase.product_ids.1: ...``), never a traceback.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from daedalus.layout import DataLayout, UnsafeNameError, check_safe_name

_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
#: What a product id looks like (BTC-USD, BTC-PERP-INTX, BIT-31JAN25-CDE), for the config and the ETL alike
PRODUCT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_PRODUCT_ID = re.compile(PRODUCT_ID_PATTERN)
_SECRET_HINTS = ("secret", "api_key", "apikey", "password", "passphrase", "token", "access_key", "private")


class ConfigError(Exception):
    """An invalid configuration: one human-readable line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration {source}:\n{lines}")


def validate_product_id(value: str) -> str:
    """``value`` if it is a product id that is also safe as a path component, else ValueError
    with the reason (the config, the simulator's flags and replay share this one rule)."""
    try:
        check_safe_name(value, "product id")
    except UnsafeNameError as exc:
        raise ValueError(str(exc)) from None
    if not _PRODUCT_ID.match(value):
        raise ValueError(f"product id {value!r} must be letters, digits, '.', '_' or '-' (like BTC-USD)")
    return value


ProductId = Annotated[str, AfterValidator(validate_product_id)]


def _directory(path: Path) -> Path:
    """A directory to use or create. A path that is a file, or lies under one, is refused
    here so the mistake is one line at start-up; whether it is writable is probed by the
    commands that write (``daedalus.cli``), because that needs a real write."""
    for candidate in (path, *path.parents):
        try:
            if not candidate.exists():
                continue
        except OSError:
            return path  # cannot look (permissions): the write probe will tell
        if candidate.is_dir():
            return path
        if candidate == path:
            raise ValueError(f"{path} is a file, not a directory")
        raise ValueError(f"{candidate} is a file, so no directory can be created under it")
    return path


Directory = Annotated[Path, AfterValidator(_directory)]

_BAR_INTERVAL = re.compile(r"([0-9]{1,6})([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def interval_seconds(text: str) -> int:
    """``"15m"`` -> 900 (the shape is checked by the bars config)."""
    return int(text[:-1]) * _UNIT_SECONDS[text[-1]]


def bar_interval(value: str) -> str:
    """``<n><unit>`` with unit s, m, h or d, from 1s to 1d. Bars start at multiples of the
    interval since the epoch, so longer bars would start on arbitrary weekdays."""
    match = _BAR_INTERVAL.fullmatch(value)
    if not match:
        raise ValueError("must be a whole number and a unit s, m, h or d, like 1m, 15m, 1h")
    if not 1 <= interval_seconds(value) <= 86_400:
        raise ValueError("must be at least 1s and at most 1d")
    return value


# Every duration has an upper bound: beyond a day it is a typo, and huge values overflow
# sleeps and timers (``time.sleep(1e300)`` raises). Floats are finite (Section config).
MAX_SECONDS = 86_400
Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS)]
PartitionCols = list[Literal["product_id", "date", "hour", "exchange", "symbol"]]
CoinbaseChannel = Literal["heartbeats", "candles", "status", "ticker", "ticker_batch", "level2", "market_trades"]


class Section(BaseModel):
    # allow_inf_nan=False: YAML's .inf/.nan are floats; no setting means anything with them.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class IngestionConfig(Section):
    """Collector -> queue -> segment writer (architecture layers 1-2)."""

    raw_format: Literal["ndjson", "parquet"] = "ndjson"
    raw_compression: Literal["none", "zstd"] = "none"
    batch_size: Annotated[int, Field(gt=0, le=1_000_000)] = 100
    flush_interval_seconds: Annotated[float, Field(gt=0, le=3600)] = 5.0
    queue_maxsize: Annotated[int, Field(gt=0, le=10_000_000)] = 10_000
    on_queue_full: Literal["drop", "block"] = "drop"
    # Lower bound: a tiny segment size would make thousands of segments a second.
    segment_max_mb: Annotated[float, Field(ge=0.01, le=16_384)] = 100.0
    fsync: bool = True
    auto_reconnect: bool = True
    max_reconnect_attempts: Annotated[int, Field(ge=-1, le=1_000_000_000)] = -1
    reconnect_delay: Seconds = 5.0
    max_reconnect_delay: Seconds = 120.0
    watchdog_timeout_seconds: Seconds = 30.0
    # Coinbase: ask for fresh level2 snapshots at every UTC hour, so each hour's segments start
    # from whole books (costs one snapshot per product per hour; see the README)
    snapshot_every_hour: bool = False
    # raw_format: parquet (the ccxt path's record writer)
    parquet_queue_maxsize: Annotated[int, Field(gt=0, le=10_000_000)] = 50_000
    # ... and the bytes those queued records may hold (estimated per record, without parsing it)
    parquet_queue_max_mb: Annotated[float, Field(ge=0.1, le=16_384)] = 4.0
    parquet_compression: Literal["zstd", "snappy", "gzip", "lz4", "none"] = "zstd"
    parquet_compression_level: Annotated[int, Field(ge=-7, le=22)] | None = None
    max_open_writers: Annotated[int, Field(gt=0, le=10_000)] = 64

    @model_validator(mode="after")
    def _batch_fits_queue(self) -> IngestionConfig:
        if self.batch_size > self.queue_maxsize:
            raise ValueError(
                f"batch_size ({self.batch_size}) must not exceed queue_maxsize ({self.queue_maxsize}): "
                "the queue would drop before a batch is ever complete"
            )
        return self


class CoinbaseConfig(Section):
    enabled: bool = True
    ws_url: str = "wss://advanced-trade-ws.coinbase.com"
    rest_url: str = "https://api.coinbase.com"
    product_ids: Annotated[list[ProductId], Field(min_length=1)] = ["BTC-USD", "ETH-USD"]
    channels: Annotated[list[CoinbaseChannel], Field(min_length=1)] = [
        "ticker",
        "level2",
        "market_trades",
    ]
    max_products_per_connection: Annotated[int, Field(gt=0, le=10_000)] = 50
    api_key: SecretStr = SecretStr("")
    api_secret: SecretStr = SecretStr("")

    @model_validator(mode="after")
    def _urls(self) -> CoinbaseConfig:
        if not self.ws_url.startswith(("ws://", "wss://")):
            raise ValueError(f"ws_url {self.ws_url!r} must start with ws:// or wss://")
        if not self.rest_url.startswith(("http://", "https://")):
            raise ValueError(f"rest_url {self.rest_url!r} must start with http:// or https://")
        return self


_CCXT_EXCHANGE_ID = re.compile(r"[a-z][a-z0-9_]{0,31}")
_CCXT_SYMBOL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:-]{0,63}")  # BTC/USD, BTC/USDT:USDT, ...


def _ccxt_exchange_id(value: str) -> str:
    if not _CCXT_EXCHANGE_ID.fullmatch(value):
        raise ValueError(f"{value!r} is not a ccxt exchange id (lower-case letters, digits, '_', like kraken)")
    return value


def _ccxt_symbol(value: str) -> str:
    if not _CCXT_SYMBOL.fullmatch(value):
        raise ValueError(f"{value!r} is not a ccxt symbol (letters, digits, '.', '_', '/', ':', '-', like BTC/USD)")
    return value


CcxtExchangeId = Annotated[str, AfterValidator(_ccxt_exchange_id)]
CcxtSymbol = Annotated[str, AfterValidator(_ccxt_symbol)]
CcxtMethod = Literal["watchOrderBook", "watchTrades", "watchTicker"]


class CcxtExchangeConfig(Section):
    """One ccxt.pro exchange: which ``watch*`` method streams which symbols."""

    api_key: SecretStr = SecretStr("")
    api_secret: SecretStr = SecretStr("")
    urls: dict[str, Any] = {}  # optional override of ccxt's urls (how the tests reach the simulator)
    channels: Annotated[dict[CcxtMethod, Annotated[list[CcxtSymbol], Field(min_length=1)]], Field(min_length=1)]
    options: dict[str, Any] = {}
    max_orderbook_depth: Annotated[int, Field(gt=0, le=1000)] = 20


class CcxtConfig(Section):
    """``ccxt:`` as users of the original Daedalus write it: exchanges keyed by ccxt id."""

    enabled: bool = False
    exchanges: dict[CcxtExchangeId, CcxtExchangeConfig] = {}


ALL_SYMBOLS = "ALL_SYMBOLS"  # Databento's symbol for every instrument of a dataset
_DATABENTO_DATASET = re.compile(r"[A-Z][A-Z0-9]{1,7}\.[A-Z0-9]{1,7}")  # GLBX.MDP3, XNAS.ITCH (16 bytes in DBN)
# raw symbols may hold spaces and punctuation (OCC options "AAPL  240119C00190000", "BRK.B", "ES.c.0"); the
# gateway's wire format joins symbols with "," inside "|"-separated fields, so neither may appear in one
_DATABENTO_SYMBOL = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._/:+-]{0,69}")
DatabentoSchema = Literal[
    "mbo", "mbp-1", "mbp-10", "tbbo", "trades", "ohlcv-1s", "ohlcv-1m", "ohlcv-1h", "ohlcv-1d",
    "definition", "statistics", "status", "imbalance",
]  # fmt: skip


def _databento_dataset(value: str) -> str:
    if not _DATABENTO_DATASET.fullmatch(value):
        raise ValueError(f"{value!r} is not a Databento dataset id (upper-case VENUE.FEED, like GLBX.MDP3)")
    return value


def _databento_symbol(value: str) -> str:
    if not _DATABENTO_SYMBOL.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a Databento symbol (letters, digits, spaces, '.', '_', '/', ':', '+', '-'; up to 70)"
        )
    return value


class DatabentoSubscription(Section):
    """One ``subscribe`` of a live session: a schema for some symbols of one dataset."""

    dataset: Annotated[str, AfterValidator(_databento_dataset)]
    schema_: DatabentoSchema = Field(alias="schema")
    symbols: Annotated[list[Annotated[str, AfterValidator(_databento_symbol)]], Field(min_length=1)] = [ALL_SYMBOLS]
    stype_in: Literal["raw_symbol", "instrument_id", "parent", "continuous"] = "raw_symbol"
    # intraday replay from this time (ns since the epoch, or an ISO 8601 time; 0 = as far back as the
    # gateway keeps), then live; null = live only
    start: int | datetime | None = None
    snapshot: bool = False  # mbo: ask for a book snapshot first (cannot go with start)

    model_config = ConfigDict(populate_by_name=True)

    @model_validator(mode="after")
    def _snapshot_or_start(self) -> DatabentoSubscription:
        if self.snapshot and self.start is not None:
            raise ValueError("snapshot and start cannot be combined (the gateway refuses it)")
        if self.snapshot and self.schema_ != "mbo":
            raise ValueError(f"snapshot is only for the mbo schema, not {self.schema_}")
        return self

    @property
    def start_ns(self) -> int | None:
        """``start`` as ns since the epoch (the wire's form), None when not set."""
        if isinstance(self.start, datetime):
            moment = self.start if self.start.tzinfo else self.start.replace(tzinfo=UTC)
            return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1_000
        return self.start


class DatabentoConfig(Section):
    """The Databento live source (``pip install 'daedalus[databento]'``): one live session per dataset."""

    enabled: bool = False
    api_key: SecretStr = SecretStr("")
    gateway: str | None = None  # host override; None = Databento's host for the dataset
    port: Annotated[int, Field(gt=0, lt=65536)] = 13000
    ts_out: bool = False  # ask the gateway to add its send time (ts_out) to every record
    heartbeat_interval_s: Annotated[int, Field(ge=5, le=3600)] = 30
    reconnect_refill: bool = True  # on reconnect, resubscribe from the last record's time to refill the gap
    subscriptions: list[DatabentoSubscription] = []

    @model_validator(mode="after")
    def _ready_when_enabled(self) -> DatabentoConfig:
        if self.enabled and not self.subscriptions:
            raise ValueError("enabled with no subscriptions: add at least one {dataset, schema, symbols}")
        if self.enabled and not self.api_key.get_secret_value():
            raise ValueError("enabled with no api_key (set it, e.g. api_key: ${DATABENTO_API_KEY})")
        return self

    @property
    def datasets(self) -> list[str]:
        """Datasets in first-subscribed order: one live session each."""
        return list(dict.fromkeys(sub.dataset for sub in self.subscriptions))


class ChannelConfig(Section):
    partition_cols: PartitionCols = ["product_id", "date"]
    processor_options: dict[str, Any] = {}


class BookSnapshotConfig(ChannelConfig):
    levels: Annotated[int, Field(gt=0, le=1000)] = 10
    snapshot_interval_ms: Annotated[int, Field(gt=0, le=86_400_000)] = 1000


class BarsConfig(ChannelConfig):
    interval: Annotated[str, AfterValidator(bar_interval)] = "1m"


class EtlChannels(Section):
    level2: ChannelConfig = ChannelConfig(processor_options={"compute_mid_price": True, "compute_spread": True})
    book_snapshot: BookSnapshotConfig = BookSnapshotConfig()
    market_trades: ChannelConfig = ChannelConfig()
    ticker: ChannelConfig = ChannelConfig()
    candles: ChannelConfig = ChannelConfig()
    bars: BarsConfig = BarsConfig()


class EtlConfig(Section):
    output_dir: Directory | None = None
    compression: Literal["zstd", "snappy", "gzip", "lz4", "none"] = "zstd"
    after_processing: Literal["delete", "archive"] = "delete"
    decimal_strategy: Literal["float", "pips", "decimal"] = "float"
    poll_interval_seconds: Seconds = 10.0
    # Coinbase level2 and trade lines: "compiled" reads them with the compiled scanner
    # (daedalus.etl.l2scan; any other line, and any it does not recognise, still goes through
    # DuckDB); "duckdb" reads every line with DuckDB (the reference path, for comparisons).
    # Same output either way.
    l2_scanner: Literal["compiled", "duckdb"] = "compiled"
    channels: EtlChannels = EtlChannels()


_S3_URL = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/[^\x00-\x1f]*)?")


def _s3_destination(value: str | None) -> str | None:
    if value is not None and not _S3_URL.fullmatch(value):
        raise ValueError(f"{value!r} is not an s3://bucket[/prefix] URL "
                         "(bucket: 3-63 lower-case letters, digits, '.', '-')")
    return value


class SyncConfig(Section):
    """``daedalus sync``: closed raw segments and processed files to any S3-compatible store."""

    enabled: bool = False
    destination: Annotated[str | None, AfterValidator(_s3_destination)] = None  # s3://bucket/prefix
    endpoint_url: str | None = None  # any S3-compatible server (MinIO, Ceph, Garage, moto, ...)
    region: str | None = None
    access_key_id: SecretStr = SecretStr("")  # empty: the standard AWS credential chain
    secret_access_key: SecretStr = SecretStr("")
    include_raw: bool = True  # raw/archive (and raw/ready when the ETL does not run here)
    include_processed: bool = True
    interval: Seconds = 300.0  # between passes in continuous mode
    delete_after_upload: bool = False  # raw archive only, and only after verification
    max_concurrency: Annotated[int, Field(gt=0, le=64)] = 4
    bandwidth_limit_mbps: Annotated[float, Field(gt=0, le=100_000)] | None = None

    @model_validator(mode="after")
    def _needs_destination(self) -> SyncConfig:
        if self.enabled and self.destination is None:
            raise ValueError("sync.enabled: true needs sync.destination (s3://bucket/prefix)")
        return self


ChildKind = Literal["ingest", "etl", "sync"]
Megabytes = Annotated[float, Field(gt=0, le=1_048_576)]


class SupervisorConfig(Section):
    """``daedalus run``: how children are started, watched, restarted and stopped."""

    status_host: str = "127.0.0.1"
    status_port: Annotated[int, Field(ge=0, le=65535)] = 8787  # 0: any free port (the status record says which)
    log_dir: Directory | None = None  # default <data_dir>/logs
    log_max_mb: Annotated[float, Field(ge=0.01, le=1024)] = 10.0
    log_backups: Annotated[int, Field(ge=0, le=100)] = 5
    start_seconds: Seconds = 5.0  # up this long = running
    backoff_initial_seconds: Seconds = 1.0
    backoff_max_seconds: Seconds = 60.0
    reset_after_seconds: Seconds = 60.0  # up this long: the next failure backs off from the start again
    max_restarts: Annotated[int, Field(gt=0, le=100_000)] = 5
    restart_window_seconds: Seconds = 300.0
    crashloop_cooldown_seconds: Seconds = 600.0
    heartbeat_seconds: Annotated[float, Field(ge=0.1, le=60)] = 2.0  # how often children publish their record
    hang_timeout_seconds: Seconds = 60.0
    memory_check_seconds: Seconds = 10.0
    memory_warning_mb: Megabytes | None = 512.0
    memory_critical_mb: Megabytes | None = 1024.0
    ingestion_shutdown_timeout: Seconds = 30.0
    etl_shutdown_timeout: Seconds = 30.0
    sync_shutdown_timeout: Seconds = 60.0
    process_nice: dict[ChildKind, Annotated[int, Field(ge=-20, le=19)]] = {"ingest": 0, "etl": 10, "sync": 10}
    cpu_affinity: dict[ChildKind, Annotated[list[Annotated[int, Field(ge=0, le=4095)]], Field(min_length=1)]] = {}

    @model_validator(mode="after")
    def _ordered(self) -> SupervisorConfig:
        if self.backoff_initial_seconds > self.backoff_max_seconds:
            raise ValueError(
                f"backoff_initial_seconds ({self.backoff_initial_seconds:g}) must not exceed "
                f"backoff_max_seconds ({self.backoff_max_seconds:g})"
            )
        warning, critical = self.memory_warning_mb, self.memory_critical_mb
        if warning is not None and critical is not None and warning > critical:
            raise ValueError(f"memory_warning_mb ({warning:g}) must not exceed memory_critical_mb ({critical:g})")
        if self.hang_timeout_seconds <= self.heartbeat_seconds:
            raise ValueError(
                f"hang_timeout_seconds ({self.hang_timeout_seconds:g}) must be longer than heartbeat_seconds "
                f"({self.heartbeat_seconds:g}), or every child would look hung"
            )
        return self

    def shutdown_timeout(self, kind: ChildKind) -> float:
        return {
            "ingest": self.ingestion_shutdown_timeout,
            "etl": self.etl_shutdown_timeout,
            "sync": self.sync_shutdown_timeout,
        }[kind]


class HealthConfig(Section):
    """``daedalus health`` thresholds: warning (exit 1) and critical (exit 2)."""

    disk_warning_free_percent: Annotated[float, Field(ge=0, le=100)] = 15.0
    disk_critical_free_percent: Annotated[float, Field(ge=0, le=100)] = 5.0
    disk_warning_hours_left: Annotated[float, Field(ge=0, le=100_000)] = 72.0  # at the current write rate
    disk_critical_hours_left: Annotated[float, Field(ge=0, le=100_000)] = 6.0
    backlog_warning_segments: Annotated[int, Field(gt=0, le=10_000_000)] = 10
    backlog_critical_segments: Annotated[int, Field(gt=0, le=10_000_000)] = 100
    backlog_warning_seconds: Seconds = 1800.0  # age of the oldest ready segment
    backlog_critical_seconds: Seconds = 21_600.0
    stale_warning_seconds: Seconds = 120.0  # age of the newest record per product
    stale_critical_seconds: Seconds = 900.0

    @model_validator(mode="after")
    def _ordered(self) -> HealthConfig:
        pairs = [
            ("disk_critical_free_percent", "disk_warning_free_percent"),
            ("disk_critical_hours_left", "disk_warning_hours_left"),
            ("backlog_warning_segments", "backlog_critical_segments"),
            ("backlog_warning_seconds", "backlog_critical_seconds"),
            ("stale_warning_seconds", "stale_critical_seconds"),
        ]
        for low, high in pairs:
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} ({getattr(self, low):g}) must not exceed {high} ({getattr(self, high):g})")
        return self


class DaedalusConfig(Section):
    data_dir: Directory = Path("./data")
    logging: LoggingConfig = LoggingConfig()
    ingestion: IngestionConfig = IngestionConfig()
    coinbase: CoinbaseConfig = CoinbaseConfig()
    ccxt: CcxtConfig = CcxtConfig()
    databento: DatabentoConfig = DatabentoConfig()
    etl: EtlConfig = EtlConfig()
    sync: SyncConfig = SyncConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    health: HealthConfig = HealthConfig()

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.data_dir)

    @property
    def processed_dir(self) -> Path:
        return self.etl.output_dir or self.layout.processed

    @property
    def log_dir(self) -> Path:
        return self.supervisor.log_dir or self.layout.logs


# --- Bounded YAML loading ------------------------------------------------------------
# A config file is small and shallow. PyYAML's composer recurses per nesting level
# (RecursionError on ``[[[[...``), and an alias is a reference that later code (env
# substitution, validation, ``config check``'s dump) expands into copies: a few hundred
# bytes of nested aliases ("billion laughs") expand to gigabytes. The loader below
# counts every node and scalar character *as if aliases were expanded* while composing,
# so such input is refused after a bounded amount of work, before anything is built.

MAX_CONFIG_BYTES = 1024 * 1024
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000  # after alias expansion; a real config has a few hundred
MAX_YAML_CHARS = 4 * 1024 * 1024  # scalar characters after alias expansion


class _YamlRefused(yaml.YAMLError):
    """Well-formed YAML that is refused as a configuration: one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _path_text(parts: list[str]) -> str:
    text = ".".join(parts) or "(top level)"
    return text if len(text) <= 80 else text[:38] + "..." + text[-38:]


def _path_label(index: Any) -> str:
    """The path component of a child: its key (mapping), position (sequence) or ``<key>``."""
    if isinstance(index, yaml.ScalarNode):
        return str(index.value)
    return "<key>" if index is None or isinstance(index, yaml.Node) else str(index)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader with a depth limit, an expansion budget, no recursive aliases and an
    error for duplicate keys (which plain YAML loading resolves silently: last one wins)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._path: list[str] = []
        self._nodes = 0
        self._chars = 0
        self._expanded: dict[int, tuple[int, int]] = {}  # id(node) -> (nodes, chars) with aliases expanded
        self._duplicates: list[str] = []

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if parent is not None:
            self._path.append(_path_label(index))
        try:
            if self.check_event(yaml.AliasEvent):
                self._expand_alias(self.peek_event())
                return super().compose_node(parent, index)
            if len(self._path) > MAX_YAML_DEPTH:
                self._refuse(f"nested deeper than {MAX_YAML_DEPTH} levels")
            nodes, chars = self._nodes, self._chars
            node = super().compose_node(parent, index)
            self._nodes += 1
            if isinstance(node, yaml.ScalarNode):
                self._chars += len(node.value)
            self._expanded[id(node)] = (self._nodes - nodes, self._chars - chars)
            self._check_budget()
            if isinstance(node, yaml.MappingNode):
                self._find_duplicate_keys(node)
            return node
        finally:
            if parent is not None:
                self._path.pop()

    def _expand_alias(self, event: yaml.AliasEvent) -> None:
        """Count the alias as a full copy of its anchor; refuse an alias inside its own anchor."""
        target = self.anchors.get(event.anchor)
        if target is None:
            return  # PyYAML reports the undefined alias
        if id(target) not in self._expanded:
            self._refuse(f"alias *{event.anchor} refers to a node that contains it (endless)")
        nodes, chars = self._expanded[id(target)]
        self._nodes += nodes
        self._chars += chars
        self._check_budget()

    def _check_budget(self) -> None:
        if self._nodes > MAX_YAML_NODES or self._chars > MAX_YAML_CHARS:
            self._refuse(
                f"expands to more than {MAX_YAML_NODES:,} values or {MAX_YAML_CHARS // 1024 // 1024} MiB of text "
                "(nested aliases?)"
            )

    def _find_duplicate_keys(self, node: yaml.MappingNode) -> None:
        first: dict[tuple[str, str], int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue  # merge keys may override on purpose
            line, identity = key.start_mark.line + 1, (key.tag, key.value)
            if identity in first:
                self._duplicates.append(
                    f"{_path_text([*self._path, key.value])}: duplicate key (lines {first[identity]} and {line}; "
                    "give it once)"
                )
            else:
                first[identity] = line

    def _refuse(self, reason: str) -> NoReturn:
        mark = self.peek_event().start_mark if self.check_event() else None
        where = f" (line {mark.line + 1})" if mark else ""
        raise _YamlRefused([f"{_path_text(self._path)}: {reason}{where}"])

    def get_single_node(self) -> yaml.Node | None:
        node = super().get_single_node()
        if self._duplicates:
            raise _YamlRefused(self._duplicates)
        return node


def _safe_load_bounded(text: str, source: str) -> Any:
    """``yaml.safe_load`` with the bounds above; raises :class:`ConfigError`."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except _YamlRefused as exc:
        raise ConfigError(source, exc.problems) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"{where}YAML syntax error: {reason}"]) from None
    finally:
        loader.dispose()


def _substitute_env(node: Any, path: str, env: dict[str, str], problems: list[str]) -> Any:
    """Replace ``${VAR}`` references in every string of the parsed YAML tree."""
    if isinstance(node, dict):
        return {k: _substitute_env(v, f"{path}.{k}" if path else str(k), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute_env(v, f"{path}.{i}", env, problems) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(f"{path}: environment variable {name} is not set (use ${{{name}:-default}})")
        return ""

    return _ENV_REF.sub(replace, node)


def _is_secret(loc: str) -> bool:
    return any(hint in loc for hint in _SECRET_HINTS)


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if error["type"] == "missing" or _is_secret(loc) or isinstance(error.get("input"), dict | list):
        return f"{loc}: {message}"
    shown = repr(error.get("input"))
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{loc}: {message} (got {shown})"


def parse_config(data: Any, source: str = "<config>", env: dict[str, str] | None = None) -> DaedalusConfig:
    """Validate an already-parsed YAML tree; raises :class:`ConfigError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a mapping of sections, got {type(data).__name__}"])
    problems: list[str] = []
    data = _substitute_env(data, "", dict(os.environ) if env is None else env, problems)
    if problems:
        raise ConfigError(source, problems)
    try:
        return DaedalusConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, [_describe(e) for e in exc.errors()]) from None


def load_config(path: str | Path, env: dict[str, str] | None = None) -> DaedalusConfig:
    """Read, substitute and validate a YAML config file; raises :class:`ConfigError`."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file: {exc.strerror or exc}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:  # before decoding: the cut may fall inside a character
        raise ConfigError(str(path), [f"file is larger than {MAX_CONFIG_BYTES // 1024} KiB: not a configuration"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"not UTF-8 text: {exc.reason} at byte {exc.start}"]) from None
    return parse_config(_safe_load_bounded(text, str(path)), str(path), env)


def _mask_free_form(node: Any) -> Any:
    """Mask values under secret-looking keys in free-form mappings (e.g. ccxt ``options``)."""
    if isinstance(node, dict):
        return {k: "**********" if _is_secret(str(k).lower()) and v else _mask_free_form(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_mask_free_form(v) for v in node]
    return node


def effective_config(config: DaedalusConfig) -> dict[str, Any]:
    """The config as plain data with every secret masked, for printing."""
    return _mask_free_form(config.model_dump(mode="json"))
