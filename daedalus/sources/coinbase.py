"""The Coinbase Advanced Trade source: the native WebSocket collector
(:mod:`daedalus.capture.coinbase`), verbatim frames in NDJSON segments
(:mod:`daedalus.capture.segments`), the columnar parser and book engine
(:mod:`daedalus.etl.coinbase`, :mod:`daedalus.etl.coinbase_run`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from daedalus.sources import Source, register

if TYPE_CHECKING:
    from daedalus.capture.pipeline import Capture
    from daedalus.config import DaedalusConfig
    from daedalus.etl.state import EtlState
    from daedalus.sources import SegmentParser

NAME = "coinbase"


def capture(config: DaedalusConfig, clock: Callable[[], int]) -> Capture:
    from daedalus.capture.coinbase_capture import CoinbaseCapture

    return CoinbaseCapture(config, clock)


def segment_run(job: Any, key: str, state: EtlState) -> SegmentParser:
    from daedalus.etl.coinbase_run import SegmentRun

    return SegmentRun(job, key, state)


register(
    Source(
        name=NAME,
        raw_formats=("ndjson",),
        enabled=lambda config: config.coinbase.enabled,
        products=lambda config: list(config.coinbase.product_ids),
        capture=capture,
        segment_run=segment_run,
        ordered=True,
        description="Coinbase Advanced Trade WebSocket, frames kept verbatim",
    )
)
