"""The small JSON records that tie a running Daedalus together, under ``<data_dir>/run/``.

- A **heartbeat** per child (``ingest-coinbase.json``, ``etl.json``): replaced atomically
  every ``supervisor.heartbeat_seconds`` by the child's own loop, so a record that stops
  changing means a hung (or stopped) process, not just a dead pid. It carries the child's
  statistics: ``counters`` only grow during the life of the process (the supervisor adds
  them up across restarts), ``gauges`` are current values.
- The supervisor's **status** (``supervisor.json``): every child's state, pid, restarts,
  RSS and last exit reason, written every second; ``daedalus status`` and
  ``daedalus health`` read it. Whether the supervisor is alive is told by its lock, not by
  this file (a SIGKILLed supervisor leaves the file behind).

Both are written with :func:`write_atomically` (write, fsync, rename), so a reader sees a
whole record or the previous one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

HEARTBEAT_VERSION = 1
STATUS_VERSION = 1
MAX_RECORD_BYTES = 4 * 1024 * 1024  # a record is a few KB; anything bigger is not ours


def write_record(path: Path, record: dict[str, Any], *, durable: bool = False) -> None:
    """Replace ``path`` with ``record`` as JSON in one rename (readers never see half).

    Not fsynced by default: a record is rewritten within seconds and losing the last one to
    a power cut costs nothing, while an fsync every two seconds wears a Pi's SD card.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(orjson.dumps(record, option=orjson.OPT_NON_STR_KEYS))
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)


def remove_stale_temporaries(directory: Path) -> int:
    """Delete the half-written records (``.<name>.<pid>.tmp``) of processes that are gone: a
    writer killed between its write and its rename leaves one, and nothing else would."""
    import psutil

    removed = 0
    for tmp in directory.glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
    return removed


def read_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or None when it is missing, too big or not a JSON object."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_RECORD_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_RECORD_BYTES:
        return None
    try:
        record = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


# ---- heartbeats -----------------------------------------------------------------------------
@dataclass
class Heartbeat:
    """What a child publishes about itself.

    ``counters`` and ``gauges`` are flat or nested mappings of numbers; a nested mapping is
    keyed by a label value (``{"frames_received": {"1": 1200, "2": 900}}`` is per
    connection). A histogram is a counter mapping with ``buckets`` (upper bound -> cumulative
    count, ``"+Inf"`` last), ``sum`` and ``count``. ``products`` maps a product id to its
    ``last_time`` (epoch seconds of the newest frame) and ``mid`` (last mid price, or None).
    """

    child: str
    kind: str  # ingest | etl | sync
    source: str | None
    pid: int
    started_at: float  # epoch seconds
    time: float  # epoch seconds of this record
    counters: dict[str, Any] = field(default_factory=dict)
    gauges: dict[str, Any] = field(default_factory=dict)
    products: dict[str, dict[str, float | None]] = field(default_factory=dict)
    version: int = HEARTBEAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Heartbeat | None:
        """None for a record of another version or shape (a leftover from an older release)."""
        if data.get("version") != HEARTBEAT_VERSION:
            return None
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except TypeError:
            return None

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.time)


def read_heartbeat(path: Path) -> Heartbeat | None:
    record = read_record(path)
    return None if record is None else Heartbeat.from_dict(record)


# ---- the supervisor's status ----------------------------------------------------------------
CHILD_STATES = ("starting", "running", "backoff", "crashloop", "stopping", "exited", "fatal")


@dataclass
class ChildStatus:
    """One child as the supervisor sees it (times are epoch seconds)."""

    name: str  # ingest-coinbase | etl | sync
    kind: str  # ingest | etl | sync
    source: str | None
    command: list[str]
    state: str  # one of CHILD_STATES
    state_since: float
    pid: int | None = None
    started_at: float | None = None  # of the current process
    restarts: int = 0  # every start after the first, whatever the cause
    memory_restarts: int = 0
    hang_restarts: int = 0
    rss_bytes: int | None = None  # the child and its descendants
    heartbeat_age: float | None = None
    exit_reason: str | None = None  # of the last process: "exit 1: <last log line>", "killed by SIGKILL", ...
    next_start_at: float | None = None  # in backoff or crashloop: when it is tried again
    log_file: str | None = None
    # the child's heartbeat statistics, counters added up over its restarts
    counters: dict[str, Any] = field(default_factory=dict)
    gauges: dict[str, Any] = field(default_factory=dict)
    products: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def uptime(self, now: float | None = None) -> float | None:
        if self.started_at is None or self.pid is None:
            return None
        return max(0.0, (time.time() if now is None else now) - self.started_at)


@dataclass
class SupervisorStatus:
    pid: int
    started_at: float
    time: float
    data_dir: str
    config_file: str
    status_url: str | None
    children: list[ChildStatus] = field(default_factory=list)
    version: int = STATUS_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SupervisorStatus | None:
        if data.get("version") != STATUS_VERSION:
            return None
        try:
            children = [
                ChildStatus(**{k: c[k] for k in ChildStatus.__dataclass_fields__ if k in c}) for c in data["children"]
            ]
            fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "children"}
            return cls(children=children, **fields)
        except (KeyError, TypeError):
            return None


def read_supervisor_status(path: Path) -> SupervisorStatus | None:
    record = read_record(path)
    return None if record is None else SupervisorStatus.from_dict(record)


def supervisor_running(lock_path: Path) -> bool:
    """Whether a supervisor holds ``lock_path`` (its exclusive lock), probed with a shared
    lock that is let go at once. The lock, not the status file's pid, is the truth: the OS
    drops it the moment the supervisor dies, however it dies. A supervisor starting during
    the probe's instant retries its lock briefly (see the supervisor)."""
    import fcntl

    try:
        handle = open(lock_path, "rb")  # noqa: SIM115 - closed below
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        handle.close()  # also lets go of a shared lock taken above
    return False
