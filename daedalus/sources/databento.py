"""The Databento source: live sessions through the official client's protocol
(:mod:`daedalus.capture.databento_collector`), the DBN stream kept byte for byte in zstd
segments with our receive stamps in skippable frames (:mod:`daedalus.sources.databento_raw`),
parsed into ``processed/databento/<dataset>/<table>/symbol=/date=``
(:mod:`daedalus.sources.databento_etl`).

Needs the ``databento`` extra (``pip install 'daedalus[databento]'``): the official client and
its DBN codec are imported only when this source runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from daedalus.sources import Source, register

if TYPE_CHECKING:
    from daedalus.capture.pipeline import Capture
    from daedalus.config import DaedalusConfig
    from daedalus.etl.state import EtlState
    from daedalus.sources import SegmentParser

NAME = "databento"
MISSING_EXTRA = "the Databento source needs the databento extra: pip install 'daedalus[databento]'"


def require_extra(*modules: str) -> None:
    """Fail with the install hint (a config error: exit 2, the operator's to fix), not an
    ImportError deep inside, when the extra is missing."""
    from daedalus.config import ConfigError

    for module in modules or ("databento", "databento_dbn"):
        try:
            __import__(module)
        except ImportError as exc:
            raise ConfigError("databento", [f"{MISSING_EXTRA} ({exc})"]) from None


def capture(config: DaedalusConfig, clock: Callable[[], int]) -> Capture:
    require_extra()
    from daedalus.capture.databento_capture import DatabentoCapture

    return DatabentoCapture(config, clock)


def segment_run(job: Any, key: str, state: EtlState) -> SegmentParser:
    require_extra("databento_dbn")  # the ETL needs only the DBN codec, not the client
    from daedalus.sources.databento_etl import DbnSegmentRun

    return DbnSegmentRun(job, key, state)


def products(config: DaedalusConfig) -> list[str]:
    """``<dataset>:<symbol>`` of every subscribed symbol (the heartbeat's product keys)."""
    found = {f"{sub.dataset}:{symbol}" for sub in config.databento.subscriptions for symbol in sub.symbols}
    return sorted(found)


SOURCE = register(
    Source(
        name=NAME,
        raw_formats=("dbn",),
        enabled=lambda config: config.databento.enabled,
        products=products,
        capture=capture,
        segment_run=segment_run,
        ordered=True,
        description="Databento live gateway (official client), DBN kept byte for byte",
        preflight=lambda: require_extra("databento_dbn"),
    )
)
