"""Every path of the data directory, in one place (architecture 3.1).

```
<data_dir>/raw/<state>/<source>/segment_<YYYYMMDDTHH>_<NNNNN>.ndjson[.zst]
<data_dir>/processed/<source>/<channel>/<col>=<value>/.../part-<segment_stem>.parquet
<data_dir>/processed/_state/<source>.*
```

Partition values and source names come from the outside world (exchange symbols,
product ids, config), so they pass through :func:`sanitize_partition_value` before
they touch a path: no separator, parent reference, NUL or control character survives.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

RawState = Literal["active", "ready", "processing", "archive", "quarantine"]
RAW_STATES: tuple[RawState, ...] = ("active", "ready", "processing", "archive", "quarantine")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNSAFE = re.compile(r"[/\\=:*?\"<>|]")
_DOTS = re.compile(r"\.{2,}")
_SEGMENT = re.compile(r"^segment_(\d{8}T\d{2})_(\d{5})\.(ndjson|ndjson\.zst|parquet|arrow|dbn|dbn\.zst)$")
_SEGMENT_PREFIX = re.compile(r"^segment_(\d{8}T\d{2})_(\d{5,})")
_HOUR = re.compile(r"\d{8}T\d{2}")
MAX_SEGMENT_COUNTER = 99_999  # five digits, so that names sort in time order
MAX_COMPONENT = 128


class UnsafeNameError(ValueError):
    """A name cannot be turned into a safe single path component."""


def sanitize_partition_value(value: object) -> str:
    """Turn an outside value into one safe path component.

    ``BTC/USD`` becomes ``BTC-USD``; separators and Hive/Windows metacharacters become
    ``-``, runs of dots become ``_``, control characters are dropped. Raises
    :class:`UnsafeNameError` when nothing usable is left.
    """
    text = _CONTROL.sub("", str(value))
    text = _UNSAFE.sub("-", text)
    text = _DOTS.sub("_", text).strip()
    if text in ("", ".") or len(text) > MAX_COMPONENT:
        raise UnsafeNameError(f"{value!r} cannot be used as a path component")
    return text


def partition_component(value: object) -> str:
    """The path component of a partition value, one-to-one: distinct values never share a
    directory (so never an output file).

    A value that is already a safe component (and holds no ``~``) is used as it is; any other
    value becomes its sanitised form plus ``~`` and 12 hex digits of its SHA-256, so
    ``BTC/USD`` or ``BTC-USD\\x00`` beside a real ``BTC-USD`` each get their own directory
    (``BTC-USD~3c1f...``) instead of colliding, and nothing usable left (empty, ``.``, 10,000
    characters) still yields a valid component. Never raises.
    """
    text = str(value)
    try:
        safe = sanitize_partition_value(text[:MAX_COMPONENT])
    except UnsafeNameError:
        safe = ""
    if safe and safe == text and "~" not in text:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{safe.replace('~', '-')[: MAX_COMPONENT - 13]}~{digest}"


def symbol_component(symbol: str) -> str:
    """The path component of a ccxt unified symbol, readable and one-to-one: ``BTC/USD`` ->
    ``BTC-USD``, ``BTC/USDT:USDT`` -> ``BTC-USDT_USDT``. A symbol that already holds ``-`` or
    ``_`` (options, some futures) could collide that way, so it goes through
    :func:`partition_component` instead (its ``~`` suffix never appears in a mapped name)."""
    if "-" not in symbol and "_" not in symbol and "~" not in symbol:
        mapped = symbol.replace("/", "-").replace(":", "_")
        if partition_component(mapped) == mapped:
            return mapped
    component = partition_component(symbol)
    if "~" not in component:  # safe as it is (BTC-USD), but would meet the mapped BTC/USD
        digest = hashlib.sha256(symbol.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        component = f"{component[: MAX_COMPONENT - 13]}~{digest}"
    return component


def check_safe_name(value: str, what: str = "name") -> str:
    """Return ``value`` if it is already a safe component, else raise with a clear reason.

    Used by config validation: a hostile product id is rejected, not silently rewritten,
    so an operator sees the mistake.
    """
    if _CONTROL.search(value):
        raise UnsafeNameError(f"{what} {value!r} contains control characters")
    if "/" in value or "\\" in value:
        raise UnsafeNameError(f"{what} {value!r} contains a path separator")
    if ".." in value:
        raise UnsafeNameError(f"{what} {value!r} contains '..'")
    if sanitize_partition_value(value) != value:
        raise UnsafeNameError(f"{what} {value!r} contains characters not allowed in a path")
    return value


def segment_name(first_record: datetime, counter: int, suffix: str = ".ndjson") -> str:
    """``segment_<YYYYMMDDTHH>_<NNNNN><suffix>`` for the UTC hour ``first_record`` falls in.

    The counter has five digits and no more: a sixth would sort ``_100000`` before
    ``_10001`` and break time order, so a counter outside 1..99,999 is refused.
    """
    return segment_name_for_hour(first_record.astimezone(UTC).strftime("%Y%m%dT%H"), counter, suffix)


def segment_hour_of_ns(recv_ns: int) -> str:
    """The UTC hour a receive time (ns) falls in, as names carry it (``20260809T21``); whole
    seconds first, so a float timestamp cannot round into the next hour."""
    return datetime.fromtimestamp(recv_ns // 1_000_000_000, UTC).strftime("%Y%m%dT%H")


def segment_name_for_hour(hour: str, counter: int, suffix: str = ".ndjson") -> str:
    """:func:`segment_name` from the hour as it appears in names (``20260809T21``), as the
    segment writer keeps it: no round trip through a datetime."""
    if not 1 <= counter <= MAX_SEGMENT_COUNTER:
        raise ValueError(f"segment counter {counter} outside 1..{MAX_SEGMENT_COUNTER}")
    if not _HOUR.fullmatch(hour):
        raise ValueError(f"segment hour {hour!r} is not YYYYMMDDTHH")
    return f"segment_{hour}_{counter:05d}{suffix}"


def segment_hour_start(hour: str) -> datetime:
    """The UTC start of a segment name's hour (``20260809T21``)."""
    return datetime.strptime(hour, "%Y%m%dT%H").replace(tzinfo=UTC)


def next_segment_hour(hour: str) -> str:
    """The hour after ``hour`` in name form (``20260809T23`` -> ``20260810T00``)."""
    return (segment_hour_start(hour) + timedelta(hours=1)).strftime("%Y%m%dT%H")


def segment_identity(name: str) -> tuple[str, int] | None:
    """``(hour, counter)`` of a segment name or of a file named after one (quarantined
    tails, reasons, rejects): every name a source has used, whatever became of the file."""
    match = _SEGMENT_PREFIX.match(name)
    if match is None:
        return None
    return match.group(1), int(match.group(2))


@dataclass(frozen=True)
class SegmentName:
    hour: str
    counter: int
    suffix: str

    @property
    def stem(self) -> str:
        return f"segment_{self.hour}_{self.counter:05d}"


def parse_segment_name(name: str) -> SegmentName | None:
    match = _SEGMENT.match(name)
    if not match:
        return None
    return SegmentName(match.group(1), int(match.group(2)), "." + match.group(3))


def prune_empty_dirs(folder: Path, root: Path) -> None:
    """Remove ``folder`` and its parents while they are empty, up to (not including) ``root``:
    partition folders left empty by a segment that moved on (hours pass, and a tree of empty
    folders would only slow every scan)."""
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone): the folders above are not empty either
            return
        folder = folder.parent


def segment_stem(name: str) -> str:
    """The name a segment's outputs are called after (``part-<stem>.parquet``): the segment
    name without its suffixes, from a bare name or a path below ``raw/<state>/<source>``."""
    base = name.rsplit("/", 1)[-1]
    parsed = parse_segment_name(base)
    return parsed.stem if parsed else base.split(".")[0]


@dataclass(frozen=True)
class DataLayout:
    """Paths under one ``data_dir``. Pure: creates nothing until asked."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def processed(self) -> Path:
        return self.root / "processed"

    @property
    def state_dir(self) -> Path:
        return self.processed / "_state"

    def raw_dir(self, state: RawState, source: str) -> Path:
        if state not in RAW_STATES:
            raise ValueError(f"unknown raw state {state!r}")
        return self.raw / state / sanitize_partition_value(source)

    def active(self, source: str) -> Path:
        return self.raw_dir("active", source)

    def raw_partition_dir(self, state: RawState, source: str, channel: str, *, exchange: str, symbol: str,
                          hour: str) -> Path:  # fmt: skip
        """``raw/<state>/<source>/<channel>/exchange=/symbol=/year=/month=/day=/hour=``: the
        record writer's directory-aligned partitions (``hour`` as in segment names,
        ``YYYYMMDDTHH``); exchange and symbol through :func:`partition_component` and
        :func:`symbol_component`, so ``BTC/USD`` can never become a path."""
        if not _HOUR.fullmatch(hour):
            raise ValueError(f"hour {hour!r} is not YYYYMMDDTHH")
        return (
            self.raw_dir(state, source)
            / sanitize_partition_value(channel)
            / f"exchange={partition_component(exchange)}"
            / f"symbol={symbol_component(symbol)}"
            / f"year={hour[:4]}"
            / f"month={hour[4:6]}"
            / f"day={hour[6:8]}"
            / f"hour={hour[9:11]}"
        )

    def ready(self, source: str) -> Path:
        return self.raw_dir("ready", source)

    def processing(self, source: str) -> Path:
        return self.raw_dir("processing", source)

    def archive(self, source: str) -> Path:
        return self.raw_dir("archive", source)

    def quarantine(self, source: str) -> Path:
        return self.raw_dir("quarantine", source)

    def scratch(self, job: str) -> Path:
        """``<data_dir>/tmp/<job>``: temporary work of one job, on the data disk (``/tmp`` is
        often RAM on a Pi) and cleaned by the job at start, so a killed run leaves nothing."""
        return self.root / "tmp" / sanitize_partition_value(job)

    @property
    def run_dir(self) -> Path:
        """``<data_dir>/run``: live records (heartbeats, the supervisor's status) and its lock."""
        return self.root / "run"

    def heartbeat_file(self, child: str) -> Path:
        """The record a child (``ingest-coinbase``, ``etl``, ...) replaces every few seconds."""
        return self.run_dir / f"{sanitize_partition_value(child)}.json"

    @property
    def supervisor_status_file(self) -> Path:
        return self.run_dir / "supervisor.json"

    @property
    def supervisor_lock(self) -> Path:
        return self.run_dir / "supervisor.lock"

    @property
    def logs(self) -> Path:
        """Default ``supervisor.log_dir``: one rotated log per child."""
        return self.root / "logs"

    def channel_dir(self, source: str, channel: str) -> Path:
        return self.processed / sanitize_partition_value(source) / sanitize_partition_value(channel)

    def partition_dir(self, source: str, channel: str, partitions: dict[str, object]) -> Path:
        """``processed/<source>/<channel>/<col>=<value>/...`` in the given column order (values
        through :func:`partition_component`, as the ETL's writer does)."""
        path = self.channel_dir(source, channel)
        for column, value in partitions.items():
            path /= f"{sanitize_partition_value(column)}={partition_component(value)}"
        return path

    def part_file(self, source: str, channel: str, partitions: dict[str, object], segment_stem: str) -> Path:
        name = f"part-{sanitize_partition_value(segment_stem)}.parquet"
        return self.partition_dir(source, channel, partitions) / name

    def state_file(self, source: str, suffix: str = ".json") -> Path:
        return self.state_dir / f"{sanitize_partition_value(source)}{suffix}"

    def ensure(self, source: str) -> None:
        """Create the raw state folders of ``source`` and the processed root."""
        for state in RAW_STATES:
            self.raw_dir(state, source).mkdir(parents=True, exist_ok=True)
        self.state_dir.mkdir(parents=True, exist_ok=True)
