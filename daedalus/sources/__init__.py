"""Sources as plug-ins: a collector, a raw format and an ETL parser, registered by name.

Nothing else in the pipeline knows a source's name. ``daedalus ingest --source NAME`` asks
the registry for the source's capture (its collectors over the raw writer of the configured
format), ``daedalus etl`` for its segment parser, the supervisor and health for the enabled
sources and the products whose freshness is judged. A new source is one module here that
calls :func:`register` (and one import line at the bottom of this file); see the README,
"Adding a source".

Factories import their heavy modules (ccxt, DuckDB, numba) when called, so listing sources
costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pathlib import Path

    from daedalus.capture.pipeline import Capture
    from daedalus.config import DaedalusConfig
    from daedalus.etl.state import EtlState


class SegmentParser(Protocol):
    """One pass of a source's ETL parser over one claimed segment (made per segment by
    :attr:`Source.segment_run`). ``run`` writes temporary outputs; the job commits them."""

    files: list[Path]  # temporary outputs (final paths) to commit, from PartitionedWriter.close()
    rows: Any  # Counter: rows written per output channel
    counts: Any  # Counter: what the operator is told (duplicates, fallbacks, bad input, ...)
    state: EtlState  # the checkpointed state, carried on to the next segment

    def run(self, source: Path, max_object: int) -> SegmentParser: ...

    def quarantine_lines(self, source: Path) -> list[tuple[str, bytes]]: ...


@dataclass(frozen=True)
class Source:
    """What a source plugs in. ``capture`` builds the ingest side for a config and a clock;
    ``segment_run(job, key, state)`` the ETL side for one segment (``key``: its path below
    ``raw/<state>/<name>``)."""

    name: str
    raw_formats: tuple[str, ...]  # values of ingestion.raw_format this source can write
    enabled: Callable[[DaedalusConfig], bool]
    products: Callable[[DaedalusConfig], list[str]]  # the keys of its heartbeat's ``products``
    capture: Callable[[DaedalusConfig, Callable[[], int]], Capture]
    segment_run: Callable[[Any, str, EtlState], SegmentParser]
    # True when the ETL state follows segment order (order books): a segment older than the
    # checkpoint is then processed with empty state and leaves the checkpoint alone. False when
    # the state is a set that order does not matter to (seen trade ids).
    ordered: bool = True
    description: str = ""
    # checks what the source needs that may be missing (an optional extra) before the ETL
    # claims any segment, raising ConfigError: a missing package is the operator's to fix,
    # and must not look like a bug in the middle of a segment
    preflight: Callable[[], None] | None = None


class UnknownSource(ValueError):
    """A source name nobody registered."""


_REGISTRY: dict[str, Source] = {}


def register(source: Source) -> Source:
    """Make ``source`` known by its name (a second registration of a name is a bug)."""
    if source.name in _REGISTRY:
        raise ValueError(f"source {source.name!r} is registered twice")
    _REGISTRY[source.name] = source
    return source


def get(name: str) -> Source:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownSource(f"unknown source {name!r} (available: {', '.join(names())})") from None


def names() -> list[str]:
    return list(_REGISTRY)


def enabled(config: DaedalusConfig) -> list[str]:
    """The sources the config turns on, in registration order."""
    return [name for name, source in _REGISTRY.items() if source.enabled(config)]


def raw_format(config: DaedalusConfig, source: Source) -> str:
    """The raw format ``source`` writes: ``ingestion.raw_format`` when the source can write it,
    else its own (Coinbase keeps frames verbatim, so it always writes ndjson)."""
    wanted = config.ingestion.raw_format
    return wanted if wanted in source.raw_formats else source.raw_formats[0]


# the built-in sources register themselves on import
from daedalus.sources import ccxt as _ccxt  # noqa: E402,F401
from daedalus.sources import coinbase as _coinbase  # noqa: E402,F401
from daedalus.sources import databento as _databento  # noqa: E402,F401
