"""Typed configuration: YAML file -> pydantic models.

- ``${VAR}`` and ``${VAR:-default}`` inside string values are replaced from the
  environment (``$${`` keeps a literal ``${``); a missing variable without a default is
  an error naming the key that used it.
- Secrets are :class:`pydantic.SecretStr`: printed as ``**********``, never logged.
- Unknown keys are rejected, so a typo never silently falls back to a default.
- :func:`load_config` raises :class:`ConfigError` carrying one line per problem
  (``coinbase.product_ids.1: ...``), never a traceback.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

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
_PRODUCT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SECRET_HINTS = ("secret", "api_key", "apikey", "password", "passphrase", "token", "access_key", "private")


class ConfigError(Exception):
    """An invalid configuration: one human-readable line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration {source}:\n{lines}")


def _product_id(value: str) -> str:
    try:
        check_safe_name(value, "product id")
    except UnsafeNameError as exc:
        raise ValueError(str(exc)) from None
    if not _PRODUCT_ID.match(value):
        raise ValueError(f"product id {value!r} must be letters, digits, '.', '_' or '-' (like BTC-USD)")
    return value


ProductId = Annotated[str, AfterValidator(_product_id)]
PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]
PartitionCols = list[Literal["product_id", "date", "hour", "exchange", "symbol"]]
CoinbaseChannel = Literal["heartbeats", "candles", "status", "ticker", "ticker_batch", "level2", "market_trades"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class IngestionConfig(Section):
    """Collector -> queue -> segment writer (architecture layers 1-2)."""

    raw_format: Literal["ndjson", "parquet"] = "ndjson"
    raw_compression: Literal["none", "zstd"] = "none"
    batch_size: PositiveInt = 100
    flush_interval_seconds: PositiveFloat = 5.0
    queue_maxsize: PositiveInt = 10_000
    on_queue_full: Literal["drop", "block"] = "drop"
    segment_max_mb: PositiveFloat = 100.0
    fsync: bool = True
    auto_reconnect: bool = True
    max_reconnect_attempts: Annotated[int, Field(ge=-1)] = -1
    reconnect_delay: PositiveFloat = 5.0
    max_reconnect_delay: PositiveFloat = 120.0
    watchdog_timeout_seconds: PositiveFloat = 30.0

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
    max_products_per_connection: PositiveInt = 50
    api_key: SecretStr = SecretStr("")
    api_secret: SecretStr = SecretStr("")

    @model_validator(mode="after")
    def _urls(self) -> CoinbaseConfig:
        if not self.ws_url.startswith(("ws://", "wss://")):
            raise ValueError(f"ws_url {self.ws_url!r} must start with ws:// or wss://")
        if not self.rest_url.startswith(("http://", "https://")):
            raise ValueError(f"rest_url {self.rest_url!r} must start with http:// or https://")
        return self


class CcxtExchangeConfig(Section):
    id: str
    symbols: Annotated[list[str], Field(min_length=1)]
    channels: list[Literal["ticker", "trades", "orderbook"]] = ["ticker", "trades", "orderbook"]
    options: dict[str, Any] = {}
    api_key: SecretStr = SecretStr("")
    api_secret: SecretStr = SecretStr("")


class CcxtConfig(Section):
    enabled: bool = False
    exchanges: list[CcxtExchangeConfig] = []


class ChannelConfig(Section):
    partition_cols: PartitionCols = ["product_id", "date"]
    processor_options: dict[str, Any] = {}


class BookSnapshotConfig(ChannelConfig):
    levels: Annotated[int, Field(gt=0, le=1000)] = 10
    snapshot_interval_ms: PositiveInt = 1000


class BarsConfig(ChannelConfig):
    interval: Annotated[str, Field(pattern=r"^\d+[smhd]$")] = "1m"


class EtlChannels(Section):
    level2: ChannelConfig = ChannelConfig(processor_options={"compute_mid_price": True, "compute_spread": True})
    book_snapshot: BookSnapshotConfig = BookSnapshotConfig()
    market_trades: ChannelConfig = ChannelConfig()
    ticker: ChannelConfig = ChannelConfig()
    candles: ChannelConfig = ChannelConfig()
    bars: BarsConfig = BarsConfig()


class EtlConfig(Section):
    output_dir: Path | None = None
    compression: Literal["zstd", "snappy", "gzip", "lz4", "none"] = "zstd"
    after_processing: Literal["delete", "archive"] = "delete"
    decimal_strategy: Literal["float", "pips", "decimal"] = "float"
    poll_interval_seconds: PositiveFloat = 10.0
    channels: EtlChannels = EtlChannels()


class SyncConfig(Section):
    enabled: bool = False
    endpoint_url: str | None = None
    bucket: str = ""
    prefix: str = ""
    region: str = "us-east-1"
    access_key_id: SecretStr = SecretStr("")
    secret_access_key: SecretStr = SecretStr("")
    interval_seconds: PositiveFloat = 60.0
    delete_after_upload: bool = False


class SupervisorConfig(Section):
    status_host: str = "127.0.0.1"
    status_port: Annotated[int, Field(ge=0, le=65535)] = 8787
    restart_backoff_seconds: PositiveFloat = 2.0
    max_restarts_per_hour: PositiveInt = 20
    memory_limit_mb: PositiveInt = 1024


class DaedalusConfig(Section):
    data_dir: Path = Path("./data")
    logging: LoggingConfig = LoggingConfig()
    ingestion: IngestionConfig = IngestionConfig()
    coinbase: CoinbaseConfig = CoinbaseConfig()
    ccxt: CcxtConfig = CcxtConfig()
    etl: EtlConfig = EtlConfig()
    sync: SyncConfig = SyncConfig()
    supervisor: SupervisorConfig = SupervisorConfig()

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.data_dir)

    @property
    def processed_dir(self) -> Path:
        return self.etl.output_dir or self.layout.processed


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
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"not UTF-8 text: {exc.reason} at byte {exc.start}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), [f"{where}YAML syntax error: {reason}"]) from None
    return parse_config(data, str(path), env)


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
