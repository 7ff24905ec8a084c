"""``daedalus health``: is the pipeline keeping up, is the disk lasting, is data fresh?

One verdict (ok, warning, critical: exit 0, 1, 2) from what is on disk and in
``<data_dir>/run/``, cheap enough for the supervisor's ``/healthz`` every few seconds:
directories are listed (never walked deeply), a segment is read only from its tail (a
bounded number of bytes), and the ingest heartbeat, when fresh, answers freshness without
touching a segment at all. Odd content (a file deleted while listed, a garbage record, an
unreadable segment) is skipped, never a crash: a health check that fails is worse than none.

Checks, each giving :class:`Finding` s with a recommendation that names the numbers:

- per source: files, bytes and ages in ``active/ ready/ processing/ quarantine/``; the ETL
  backlog (ready + processing) against ``health.backlog_*``; a non-empty quarantine;
- disk: free space of the data directory against ``health.disk_*_free_percent``, and hours
  until full at the write rate of the last hour against ``health.disk_*_hours_left``;
- freshness: the newest receive time per configured product against ``health.stale_*``;
- supervisor: children in ``crashloop``/``fatal`` (critical) or ``backoff`` (warning), an
  ingest that is connected but silent (``stalled``).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from daedalus.capture.records import ZSTD_MAGIC_BYTES, block_lines, iter_zstd_frames, split_frame_record
from daedalus.config import DaedalusConfig
from daedalus.layout import DataLayout, RawState, parse_segment_name, sanitize_partition_value, segment_identity
from daedalus.logs import get_logger
from daedalus.ops.records import (
    Heartbeat,
    SupervisorStatus,
    read_heartbeat,
    read_supervisor_status,
)
from daedalus.ops.records import (
    supervisor_running as probe_supervisor,
)

log = get_logger(__name__)

Level = Literal["ok", "warning", "critical"]
LEVELS: tuple[Level, ...] = ("ok", "warning", "critical")
EXIT_CODES: dict[Level, int] = {"ok": 0, "warning": 1, "critical": 2}

SCAN_STATES: tuple[RawState, ...] = ("active", "ready", "processing", "quarantine")
TAIL_BYTES = 8 << 20
"""Decompressed bytes read per source for freshness (over at most :data:`TAIL_SEGMENTS`
segments): a real BTC-USD level2 snapshot line is ~5 MB, so a tail ending in one still
holds the lines before it."""
TAIL_SEGMENTS = 3
ZSTD_WINDOW_FIRST = 256 << 10  # compressed bytes looked at first at the end of a .zst segment
ZSTD_WINDOW_MAX = 4 << 20  # ... grown 4x while no whole frame was found, up to this
RATE_WINDOW_SECONDS = 3600.0  # the write rate is that of segments written in the last hour
MIN_RATE_SPAN_SECONDS = 60.0  # over less time than this the rate is "unknown"
STATUS_STALE_SECONDS = 15.0  # the supervisor rewrites its status every second
_PRODUCT_KEY = b'"product_id"'


def worst(levels: Iterable[Level]) -> Level:
    return max(levels, key=LEVELS.index, default="ok")


@dataclass
class Finding:
    level: Level
    check: str  # disk | backlog | quarantine | freshness | supervisor | child | ingest | health
    subject: str  # what it is about: a source, a product, a child, the data disk
    message: str
    recommendation: str | None = None


@dataclass
class HealthReport:
    level: Level
    time: float
    findings: list[Finding] = field(default_factory=list)
    # per source: {"states": {state: {"files", "bytes", "oldest_age_seconds", "newest_age_seconds"}},
    #              "backlog": {"segments", "bytes", "oldest_age_seconds", "level"}}
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    # {"path", "free_bytes", "total_bytes", "free_percent", "write_bytes_per_second", "hours_until_full", "level"}
    disk: dict[str, Any] = field(default_factory=dict)
    # product -> {"source", "last_time", "age_seconds", "level", "from"}; "from" says what told the time:
    # "heartbeat" (the ingest's live record), "segment <name>" (its tail) or None (not found)
    freshness: dict[str, dict[str, Any]] = field(default_factory=dict)
    # {"running": bool, "pid", "status_age_seconds", "children": [{"name", "state", "pid", "restarts", ...}],
    #  "standalone": [{"child", "pid", "heartbeat_age_seconds"}]} or None
    supervisor: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.level]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        return _render(self)


def check_health(
    config: DaedalusConfig,
    *,
    supervisor: SupervisorStatus | None = None,
    supervisor_running: bool | None = None,
    now: float | None = None,
) -> HealthReport:
    """The verdict. ``supervisor``/``supervisor_running`` are given by the supervisor itself
    (its live status); when None they are read from ``<data_dir>/run/``."""
    now = time.time() if now is None else now
    check = _Check(config, now)
    check.guarded("supervisor", lambda: check.supervisor(supervisor, supervisor_running))
    check.guarded("sources", check.sources)
    check.guarded("disk", check.disk)
    check.guarded("freshness", check.freshness)
    report = check.report
    report.level = worst(f.level for f in report.findings)
    return report


# ---- files on disk ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentFile:
    path: Path
    state: RawState
    size: int
    mtime: float


def _list_state(layout: DataLayout, state: RawState, source: str) -> list[SegmentFile]:
    """Files named after a segment in one state folder; dotfiles (``.lock``, ``.tmp``) and
    other names are not ours. In quarantine, every file named after a segment counts (whole
    segments, their ``.reason.txt``, ETL rejects); elsewhere only segment names."""
    named = segment_identity if state == "quarantine" else parse_segment_name
    out: list[SegmentFile] = []
    try:
        entries = list(os.scandir(layout.raw_dir(state, source)))
    except OSError:  # missing (nothing yet), not a directory, unreadable
        return out
    for entry in entries:
        if entry.name.startswith(".") or named(entry.name) is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:  # moved or deleted while listed (the ETL, rotation)
            continue
        if entry.is_file(follow_symlinks=False):
            out.append(SegmentFile(Path(entry.path), state, st.st_size, st.st_mtime))
    return out


def _sources(config: DaedalusConfig) -> list[str]:
    """Sources with a raw folder in any state, plus the configured ones."""
    found = {"coinbase"} if config.coinbase.enabled else set()
    for state in SCAN_STATES:
        with contextlib.suppress(OSError):
            for entry in os.scandir(config.layout.raw / state):
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
                with contextlib.suppress(ValueError):
                    if sanitize_partition_value(entry.name) == entry.name:
                        found.add(entry.name)
    return sorted(found)


def _products(config: DaedalusConfig) -> dict[str, list[str]]:
    """Products whose freshness is judged, per source (the ccxt collector arrives later)."""
    return {"coinbase": list(config.coinbase.product_ids)} if config.coinbase.enabled else {}


# ---- reading a segment's tail ----------------------------------------------------------------
def tail_lines(path: Path, budget: int = TAIL_BYTES) -> list[bytes]:
    """The last whole lines of a segment (plain or zstd), about ``budget`` decompressed bytes,
    oldest first. A line being written (no newline yet) is left out; OSError when the file
    cannot be read."""
    if path.name.endswith(".zst"):
        return _zstd_tail(path, budget)
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        start = max(0, size - budget)
        handle.seek(start)
        data = handle.read(size - start)
    if start > 0:  # the first line is cut: drop it
        data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
    return list(block_lines(data[: data.rfind(b"\n") + 1]))


def _zstd_tail(path: Path, budget: int) -> list[bytes]:
    """Decode the frames that lie wholly in the last compressed bytes of the file.

    Frames are independent (one per capture flush), so decoding may start at any frame: the
    first zstd magic number in the window is tried, and :func:`iter_zstd_frames` skips to the
    next one when that was a chance match inside compressed data. The window grows while no
    whole frame fits in it (a big snapshot flush)."""
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        window = ZSTD_WINDOW_FIRST
        while True:
            start = max(0, size - window)
            handle.seek(start)
            data = handle.read(size - start)
            lines, whole = _decode_frames(data, budget)
            if whole or start == 0 or window >= ZSTD_WINDOW_MAX:
                return lines
            window *= 4


def _decode_frames(data: bytes, budget: int) -> tuple[list[bytes], bool]:
    """The last ``budget`` bytes of lines of the good frames in ``data``; whether any was good."""
    first = data.find(ZSTD_MAGIC_BYTES)
    if first < 0:
        return [], False
    kept: deque[bytes] = deque()
    kept_bytes = 0
    held: list[bytes] = []
    whole = False
    for frame in iter_zstd_frames(io.BytesIO(data[first:]), held.append):
        if frame.problem is None:
            whole = True
            for block in held:
                kept.append(block)
                kept_bytes += len(block)
            while kept_bytes > budget and len(kept) > 1:
                kept_bytes -= len(kept.popleft())
        held.clear()
    lines = [line for block in kept for line in block_lines(block)]
    # trim to the budget from the end (a kept block may hold more than is needed)
    total, cut = 0, len(lines)
    while cut > 0 and total + len(lines[cut - 1]) <= budget:
        cut -= 1
        total += len(lines[cut])
    return lines[cut:], whole


def newest_per_product(lines: list[bytes], wanted: set[str]) -> dict[str, float]:
    """``{product: receive time (epoch s)}`` of the newest frame record naming each wanted
    product, from the end of ``lines``; a substring search for ``"product_id"`` (no parse of
    big snapshot frames)."""
    found: dict[str, float] = {}
    for line in reversed(lines):
        record = split_frame_record(line)
        if record is None:
            continue
        recv_ns, _, frame = record
        for product in _product_ids(frame):
            if product in wanted and product not in found:
                found[product] = recv_ns / 1e9
        if len(found) == len(wanted):
            break
    return found


def _product_ids(frame: bytes) -> Iterable[str]:
    pos = frame.find(_PRODUCT_KEY)
    while pos >= 0:
        cursor = pos + len(_PRODUCT_KEY)
        while cursor < len(frame) and frame[cursor] in b" \t\r\n:":
            cursor += 1
        if cursor < len(frame) and frame[cursor] == 0x22:  # '"'
            end = frame.find(b'"', cursor + 1, cursor + 130)
            if end > 0:
                with contextlib.suppress(UnicodeDecodeError):
                    yield frame[cursor + 1 : end].decode()
        pos = frame.find(_PRODUCT_KEY, cursor)


def first_record_time(path: Path) -> float | None:
    """Receive time of a segment's first record (epoch s), from its first bytes."""
    try:
        with open(path, "rb") as handle:
            if path.name.endswith(".zst"):
                import zstandard

                head = zstandard.ZstdDecompressor().stream_reader(handle).read(64)
            else:
                head = handle.read(64)
    except Exception:  # OSError, or zstandard.ZstdError (not an OSError): unknown
        return None
    prefix = b'{"recv_ns":'
    if not head.startswith(prefix):
        return None
    digits = head[len(prefix) :].split(b",", 1)[0]
    return int(digits) / 1e9 if digits.isdigit() else None


# ---- heartbeats ------------------------------------------------------------------------------
def pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, but alive
    except OSError:
        return False
    return True


# ---- formatting ------------------------------------------------------------------------------
def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - unreachable


def fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} d"


def _level_by(value: float, warning: float, critical: float, *, low_is_bad: bool = False) -> Level:
    if low_is_bad:
        return "critical" if value <= critical else "warning" if value <= warning else "ok"
    return "critical" if value >= critical else "warning" if value >= warning else "ok"


def _names(items: list[str], most: int = 5) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


# ---- the checks ------------------------------------------------------------------------------
class _Check:
    """One health check in progress: each method adds to ``report``."""

    def __init__(self, config: DaedalusConfig, now: float) -> None:
        self.config = config
        self.layout = config.layout
        self.health = config.health
        self.now = now
        self.report = HealthReport(level="ok", time=now)
        self.files: dict[str, dict[RawState, list[SegmentFile]]] = {}
        self.status: SupervisorStatus | None = None
        self.running = False
        self._heartbeats: dict[str, Heartbeat | None] = {}

    def add(self, level: Level, check: str, subject: str, message: str, recommendation: str | None = None) -> None:
        self.report.findings.append(Finding(level, check, subject, message, recommendation))

    def guarded(self, section: str, run: Callable[[], object]) -> None:
        """A bug or an odd file in one section must not take the whole verdict down."""
        try:
            run()
        except Exception as exc:  # reported as a finding, logged with the traceback
            log.error("health_check_failed", section=section, error=repr(exc), exc_info=True)
            self.add("warning", "health", section, f"the {section} check failed: {exc!r}",
                     "report it with the log above; the other checks still ran")  # fmt: skip

    def heartbeat(self, child: str) -> Heartbeat | None:
        """The child's heartbeat when it is fresh and its process alive, else None."""
        if child not in self._heartbeats:
            beat = read_heartbeat(self.layout.heartbeat_file(child))
            fresh_for = 3 * self.config.supervisor.heartbeat_seconds + 2.0
            ok = (
                beat is not None
                and isinstance(beat.time, int | float)
                and beat.age(self.now) <= fresh_for
                and pid_alive(beat.pid)
            )
            self._heartbeats[child] = beat if ok else None
        return self._heartbeats[child]

    # -- supervisor and children --
    def supervisor(self, given: SupervisorStatus | None, running: bool | None) -> None:
        layout = self.layout
        self.running = probe_supervisor(layout.supervisor_lock) if running is None else running
        if not self.running:
            info: dict[str, Any] = {"running": False}
            standalone = self._standalone()
            if standalone:
                info["standalone"] = standalone
            self.report.supervisor = info
            self._ingest_stalled()
            return
        status = given if given is not None else read_supervisor_status(layout.supervisor_status_file)
        self.status = status
        if status is None:
            self.report.supervisor = {"running": True, "pid": None, "children": []}
            self.add("warning", "supervisor", "supervisor",
                     f"the supervisor holds its lock but its status record {layout.supervisor_status_file} "
                     "is missing or unreadable", "if it just started, check again in a few seconds; "
                     "otherwise see the supervisor's log (journalctl -u daedalus)")  # fmt: skip
            self._ingest_stalled()
            return
        status_age = max(0.0, self.now - status.time) if isinstance(status.time, int | float) else None
        children = [_child_dict(c, self.now) for c in status.children]
        self.report.supervisor = {"running": True, "pid": status.pid, "status_age_seconds": status_age,
                                  "status_url": status.status_url, "children": children}  # fmt: skip
        if given is None and status_age is not None and status_age > STATUS_STALE_SECONDS:
            self.add("warning", "supervisor", "supervisor",
                     f"the supervisor's status record is {fmt_age(status_age)} old (it is rewritten every second)",
                     "its loop may be stuck: see its log (journalctl -u daedalus); restart it if so")  # fmt: skip
        for child in status.children:
            self._child(child)
        self._ingest_stalled()

    def _standalone(self) -> list[dict[str, Any]]:
        """Children running without a supervisor (a fresh heartbeat of a live pid)."""
        out = []
        with contextlib.suppress(OSError):
            for path in sorted(self.layout.run_dir.glob("*.json")):
                if path.name == self.layout.supervisor_status_file.name:
                    continue
                beat = self.heartbeat(path.stem)
                if beat is not None:
                    out.append({"child": path.stem, "pid": beat.pid,
                                "heartbeat_age_seconds": round(beat.age(self.now), 3)})  # fmt: skip
        return out

    def _child(self, child: Any) -> None:
        where = f"see {child.log_file}" if child.log_file else "see its log"
        reason = f"; last exit: {child.exit_reason}" if child.exit_reason else ""
        retry = ""
        if isinstance(child.next_start_at, int | float):
            retry = f"; retried in {fmt_age(max(0.0, child.next_start_at - self.now))}"
        if child.state == "fatal":
            self.add("critical", "child", child.name,
                     f"{child.name} is fatal: it exited with the configuration-error code and is not restarted{reason}",
                     f"{where}, fix the configuration (`daedalus config check --config F`), "
                     "then restart the supervisor")  # fmt: skip
        elif child.state == "crashloop":
            s = self.config.supervisor
            self.add("critical", "child", child.name,
                     f"{child.name} is in crashloop: more than {s.max_restarts} restarts within "
                     f"{fmt_age(s.restart_window_seconds)} ({child.restarts} in all){reason}{retry}",
                     f"{where}; `daedalus status` shows every child")  # fmt: skip
        elif child.state == "backoff":
            self.add("warning", "child", child.name,
                     f"{child.name} died and waits to be restarted (backoff, {child.restarts} restarts){reason}{retry}",
                     f"{where} if it keeps happening")  # fmt: skip

    def _ingest_stalled(self) -> None:
        for source in _products(self.config):
            name = f"ingest-{source}"
            beat = self.heartbeat(name)
            gauges: Any = beat.gauges if beat is not None else None
            if gauges is None and self.status is not None:
                child = next((c for c in self.status.children if c.name == name and c.state == "running"), None)
                gauges = child.gauges if child is not None else None
            if not isinstance(gauges, dict) or gauges.get("stalled") != 1:
                continue
            ages = gauges.get("last_frame_age_seconds")
            silent = [a for a in ages.values() if isinstance(a, int | float)] if isinstance(ages, dict) else []
            watchdog = gauges.get("watchdog_seconds")
            for_how_long = f" for {max(silent):.0f} s" if silent else ""
            limit = f" (watchdog {watchdog:g} s)" if isinstance(watchdog, int | float) else ""
            self.add("warning", "ingest", name, f"ingest connected but silent{for_how_long}{limit}",
                     f"the exchange (or the network) stopped sending; ingest reconnects when its watchdog fires; "
                     f"see {self.config.log_dir / (name + '.log')} and the exchange's status page")  # fmt: skip

    # -- files per source: counts, backlog, quarantine --
    def sources(self) -> None:
        for source in _sources(self.config):
            states = {state: _list_state(self.layout, state, source) for state in SCAN_STATES}
            self.files[source] = states
            summary: dict[str, Any] = {"states": {}}
            for state, files in states.items():
                mtimes = [f.mtime for f in files]
                summary["states"][state] = {
                    "files": len(files),
                    "bytes": sum(f.size for f in files),
                    "oldest_age_seconds": max(0.0, self.now - min(mtimes)) if mtimes else None,
                    "newest_age_seconds": max(0.0, self.now - max(mtimes)) if mtimes else None,
                }
            summary["backlog"] = self._backlog(source, states)
            self.report.sources[source] = summary
            self._quarantine(source, summary["states"]["quarantine"])

    def _backlog(self, source: str, states: dict[RawState, list[SegmentFile]]) -> dict[str, Any]:
        h = self.health
        ready, processing = states["ready"], states["processing"]
        segments = len(ready) + len(processing)
        size = sum(f.size for f in ready) + sum(f.size for f in processing)
        oldest = max(0.0, self.now - min(f.mtime for f in ready)) if ready else None
        by_count = _level_by(segments, h.backlog_warning_segments, h.backlog_critical_segments)
        by_age: Level = "ok"
        if oldest is not None:
            by_age = _level_by(oldest, h.backlog_warning_seconds, h.backlog_critical_seconds)
        level = worst([by_count, by_age])
        backlog = {"segments": segments, "bytes": size, "oldest_age_seconds": oldest, "level": level}
        if level != "ok":
            why = []
            if by_count != "ok":
                limit = h.backlog_critical_segments if by_count == "critical" else h.backlog_warning_segments
                why.append(f"{segments} segments >= {limit}")
            if by_age != "ok":
                limit = h.backlog_critical_seconds if by_age == "critical" else h.backlog_warning_seconds
                why.append(f"oldest ready {fmt_age(oldest)} >= {fmt_age(limit)}")
            self.add(level, "backlog", source,
                     f"ETL is {segments} segments / {fmt_bytes(size)} behind (oldest {fmt_age(oldest)}; "
                     f"{len(processing)} in processing): {', '.join(why)}",
                     self._backlog_advice(source))  # fmt: skip
        return backlog

    def _backlog_advice(self, source: str) -> str:
        etl = None if self.status is None else next((c for c in self.status.children if c.kind == "etl"), None)
        beat = self.heartbeat("etl")
        poll = self.config.etl.poll_interval_seconds
        if etl is not None and etl.state != "running":
            first = f"the etl child is {etl.state}: `daedalus status`, {etl.log_file or 'its log'}"
        elif beat is not None:
            busy = isinstance(beat.gauges, dict) and beat.gauges.get("busy") == 1
            first = (f"the ETL watcher runs (pid {beat.pid}, {'busy' if busy else 'idle'}) but does not keep up: "
                     "give it CPU (supervisor.process_nice.etl, supervisor.cpu_affinity)")  # fmt: skip
        elif self.running:
            first = "the supervisor runs but no ETL heartbeat is fresh: `daedalus status`"
        else:
            first = ("is the ETL watcher running? `daedalus status`; start `daedalus run --config F` "
                     "(or `daedalus etl --config F --watch`)")  # fmt: skip
        return f"{first}; a shorter etl.poll_interval_seconds (now {poll:g} s) picks ready segments up sooner"

    def _quarantine(self, source: str, summary: dict[str, Any]) -> None:
        if summary["files"]:
            folder = self.layout.raw_dir("quarantine", source)
            self.add("warning", "quarantine", source,
                     f"{summary['files']} files ({fmt_bytes(summary['bytes'])}) in quarantine, newest "
                     f"{fmt_age(summary['newest_age_seconds'])} old",
                     f"look in {folder}: whole segments come with a .reason.txt, rejected lines are in "
                     "*.etl-rejects.ndjson; move them away once understood")  # fmt: skip

    # -- disk --
    def disk(self) -> None:
        h = self.health
        path = Path(self.config.data_dir).absolute()
        while not path.exists() and path != path.parent:
            path = path.parent
        usage = shutil.disk_usage(path)
        free_percent = 100.0 * usage.free / usage.total if usage.total else 0.0
        rate = self._write_rate()
        hours = usage.free / rate / 3600 if rate else None
        level_free = _level_by(free_percent, h.disk_warning_free_percent, h.disk_critical_free_percent,
                               low_is_bad=True)  # fmt: skip
        level_hours = (
            _level_by(hours, h.disk_warning_hours_left, h.disk_critical_hours_left, low_is_bad=True)
            if hours is not None
            else "ok"
        )
        self.report.disk = {
            "path": str(path), "free_bytes": usage.free, "total_bytes": usage.total,
            "free_percent": round(free_percent, 3), "write_bytes_per_second": rate,
            "hours_until_full": None if hours is None else round(hours, 2),
            "level": worst([level_free, level_hours]),
        }  # fmt: skip
        advice = (f"free space under {path}: delete or move old files of {self.config.processed_dir}, "
                  "keep etl.after_processing: delete (archive keeps every raw segment), or a bigger disk")  # fmt: skip
        if level_free != "ok":
            limit = h.disk_critical_free_percent if level_free == "critical" else h.disk_warning_free_percent
            self.add(level_free, "disk", str(path),
                     f"{fmt_bytes(usage.free)} free of {fmt_bytes(usage.total)} ({free_percent:.1f}% <= {limit:g}%)",
                     advice)  # fmt: skip
        if hours is not None and level_hours != "ok":
            limit = h.disk_critical_hours_left if level_hours == "critical" else h.disk_warning_hours_left
            self.add(level_hours, "disk", str(path),
                     f"full in about {hours:.1f} h (<= {limit:g} h) at the current {fmt_bytes(rate)}/s",
                     advice)  # fmt: skip

    def _write_rate(self) -> float | None:
        """Bytes per second written to raw segments lately: the segments (any source, any
        state) modified in the last hour, over the time since the first record of the oldest
        of them. None (unknown) when that covers too little time."""
        recent = [
            f
            for states in self.files.values()
            for files in states.values()
            for f in files
            if f.mtime >= self.now - RATE_WINDOW_SECONDS and parse_segment_name(f.path.name) is not None
        ]
        if not recent:
            return None
        recent.sort(key=lambda f: f.mtime)
        total = sum(f.size for f in recent)
        start = first_record_time(recent[0].path)
        if start is None or start > recent[0].mtime:  # unreadable: count from where it ends instead
            start, total = recent[0].mtime, total - recent[0].size
        span = self.now - start
        if span < MIN_RATE_SPAN_SECONDS or total <= 0:
            return None
        return total / span

    # -- freshness --
    def freshness(self) -> None:
        h = self.health
        for source, products in _products(self.config).items():
            times: dict[str, tuple[float, str]] = {}
            beat = self.heartbeat(f"ingest-{source}")
            if beat is not None and isinstance(beat.products, dict):
                for product in products:
                    entry = beat.products.get(product)
                    last = entry.get("last_time") if isinstance(entry, dict) else None
                    if isinstance(last, int | float) and math.isfinite(last):
                        times[product] = (float(last), "heartbeat")
            missing = [p for p in products if p not in times]
            if missing:
                times.update(self._from_segments(source, missing))
            stale: dict[Level, list[str]] = {"warning": [], "critical": []}
            unknown: list[str] = []
            for product in products:
                last, origin = times.get(product, (None, None))
                age = None if last is None else max(0.0, self.now - last)
                level: Level = "warning" if age is None else _level_by(age, h.stale_warning_seconds,
                                                                           h.stale_critical_seconds)  # fmt: skip
                key = product if product not in self.report.freshness else f"{source}:{product}"
                self.report.freshness[key] = {"source": source, "last_time": last, "age_seconds": age,
                                              "level": level, "from": origin}  # fmt: skip
                if age is None:
                    unknown.append(product)
                elif level != "ok":
                    stale[level].append(f"{product} {fmt_age(age)}")
            log_file = self.config.log_dir / f"ingest-{source}.log"
            advice = (f"is ingest running and connected? `daedalus status`, {log_file}; "
                      "a product halted or delisted on the exchange also goes quiet")  # fmt: skip
            for level in ("critical", "warning"):
                if stale[level]:
                    limit = h.stale_critical_seconds if level == "critical" else h.stale_warning_seconds
                    self.add(level, "freshness", source,
                             f"newest record older than {fmt_age(limit)}: {_names(stale[level])}", advice)  # fmt: skip
            if unknown:
                where = ("no fresh heartbeat, and not in the tail of the newest segments" if self._has_segments(source)
                         else f"nothing captured yet: no segment of {source}")  # fmt: skip
                self.add("warning", "freshness", source, f"no recent record found for {_names(unknown)} ({where})",
                         advice)  # fmt: skip

    def _has_segments(self, source: str) -> bool:
        states = self.files.get(source, {})
        return any(states.get(s) for s in ("active", "ready", "processing"))

    def _from_segments(self, source: str, products: list[str]) -> dict[str, tuple[float, str]]:
        """Newest receive time per product from the tails of the newest segments (active
        first, then ready/processing), within :data:`TAIL_BYTES` in all."""
        states = self.files.get(source) or {s: _list_state(self.layout, s, source) for s in SCAN_STATES}
        candidates = [f for s in ("active", "ready", "processing") for f in states.get(s, [])
                      if f.path.name.endswith((".ndjson", ".ndjson.zst"))]  # fmt: skip
        candidates.sort(key=lambda f: (f.state == "active", f.path.name), reverse=True)
        found: dict[str, tuple[float, str]] = {}
        budget = TAIL_BYTES
        for segment in candidates[:TAIL_SEGMENTS]:
            wanted = {p for p in products if p not in found}
            if not wanted or budget <= 0:
                break
            try:
                lines = tail_lines(segment.path, budget)
            except OSError:  # moved on by the ETL or deleted meanwhile: the next one
                continue
            budget -= sum(len(line) + 1 for line in lines)
            for product, when in newest_per_product(lines, wanted).items():
                found[product] = (when, f"segment {segment.path.name}")
        return found


def _child_dict(child: Any, now: float) -> dict[str, Any]:
    return {
        "name": child.name, "kind": child.kind, "source": child.source, "state": child.state, "pid": child.pid,
        "uptime_seconds": child.uptime(now) if isinstance(child.started_at, int | float) else None,
        "restarts": child.restarts, "rss_bytes": child.rss_bytes, "heartbeat_age": child.heartbeat_age,
        "exit_reason": child.exit_reason, "next_start_at": child.next_start_at, "log_file": child.log_file,
    }  # fmt: skip


# ---- the text report -------------------------------------------------------------------------
def _render(report: HealthReport) -> str:
    n = len(report.findings)
    lines = [f"health: {report.level.upper()} ({n} finding{'' if n == 1 else 's'})"]
    order = sorted(report.findings, key=lambda f: -LEVELS.index(f.level))
    for f in order:
        lines.append(f"  {f.level.upper():8} {f.check} {f.subject}: {f.message}")
        if f.recommendation:
            lines.append(f"           -> {f.recommendation}")
    if report.sources:
        lines.append("sources:")
        lines.append(f"  {'source':12} {'state':11} {'files':>6} {'bytes':>10} {'oldest':>8} {'newest':>8}")
        for source, info in report.sources.items():
            for state, s in info.get("states", {}).items():
                oldest, newest = fmt_age(s["oldest_age_seconds"]), fmt_age(s["newest_age_seconds"])
                size = fmt_bytes(s["bytes"])
                lines.append(f"  {source:12} {state:11} {s['files']:>6} {size:>10} {oldest:>8} {newest:>8}")
            b = info.get("backlog", {})
            if b:
                lines.append(f"  {source:12} backlog: {b['segments']} segments / {fmt_bytes(b['bytes'])}, "
                             f"oldest ready {fmt_age(b['oldest_age_seconds'])} ({b['level']})")  # fmt: skip
    d = report.disk
    if d:
        rate = d.get("write_bytes_per_second")
        rate_text = f"writing {fmt_bytes(rate)}/s" if rate else "write rate unknown"
        hours = d.get("hours_until_full")
        full = f", full in ~{hours:.0f} h" if hours is not None else ""
        lines.append(f"disk: {d['path']}: {fmt_bytes(d['free_bytes'])} free of {fmt_bytes(d['total_bytes'])} "
                     f"({d['free_percent']:.1f}%), {rate_text}{full} ({d['level']})")  # fmt: skip
    if report.freshness:
        lines.append("freshness:")
        for product, fr in report.freshness.items():
            age = "unknown" if fr["age_seconds"] is None else fmt_age(fr["age_seconds"])
            lines.append(f"  {product:16} {fr['source']:10} {age:>8}  {fr['level']:8} ({fr['from'] or 'not found'})")
    sup = report.supervisor
    if sup is not None:
        if not sup.get("running"):
            standalone = ", ".join(f"{s['child']} pid {s['pid']}" for s in sup.get("standalone", []))
            lines.append("supervisor: not running" + (f" (running on their own: {standalone})" if standalone else ""))
        else:
            lines.append(f"children (supervisor pid {sup.get('pid')}):")
            for c in sup.get("children", []):
                reason = f"  last exit: {c['exit_reason']}" if c.get("exit_reason") else ""
                lines.append(f"  {c['name']:16} {c['state']:10} pid {c['pid'] or '-':<7} "
                             f"restarts {c['restarts']}{reason}")  # fmt: skip
    return "\n".join(lines)
