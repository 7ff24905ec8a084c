"""The ccxt source: any ccxt.pro exchange (:mod:`daedalus.capture.ccxt_collector`), unified
records in Parquet partitions or NDJSON lines (:mod:`daedalus.sources.ccxt_raw`), parsed into
``processed/ccxt/{ticker,trades,orderbook}/exchange=/symbol=/date=``
(:mod:`daedalus.sources.ccxt_etl`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from daedalus.sources import Source, raw_format, register

if TYPE_CHECKING:
    from daedalus.capture.pipeline import Capture
    from daedalus.config import DaedalusConfig
    from daedalus.etl.state import EtlState
    from daedalus.sources import SegmentParser

NAME = "ccxt"


def capture(config: DaedalusConfig, clock: Callable[[], int]) -> Capture:
    from daedalus.capture.ccxt_capture import CcxtCapture

    return CcxtCapture(config, clock, raw_format(config, SOURCE))


def segment_run(job: Any, key: str, state: EtlState) -> SegmentParser:
    from daedalus.sources.ccxt_etl import CcxtSegmentRun

    return CcxtSegmentRun(job, key, state)


def products(config: DaedalusConfig) -> list[str]:
    """Every configured market as ``<exchange>:<symbol>`` (the heartbeat's product keys)."""
    from daedalus.capture.ccxt_capture import product_key

    found = {product_key(exchange, symbol) for exchange, conf in config.ccxt.exchanges.items()
             for symbols in conf.channels.values() for symbol in symbols}  # fmt: skip
    return sorted(found)


SOURCE = register(
    Source(
        name=NAME,
        raw_formats=("ndjson", "parquet"),
        enabled=lambda config: config.ccxt.enabled,
        products=products,
        capture=capture,
        segment_run=segment_run,
        ordered=False,
        description="any ccxt.pro exchange, unified records (ticker, trades, order book)",
    )
)
