"""``daedalus health``: is the pipeline keeping up, is the disk lasting, is data fresh?

One verdict (ok, warning, critical: exit 0, 1, 2) from what is on disk and in
``<data_dir>/run/``, cheap enough for the supervisor's ``/healthz`` every few seconds:
directories are listed (never walked deeply, never ``archive/``), a segment is read only from
its tail (:mod:`daedalus.ops.tails`: bounded, remembered for closed segments), and the ingest
heartbeat, when fresh, answers freshness without touching a segment at all. Odd content (a
file deleted while listed, a garbage record, an unreadable segment) is skipped, never a
crash: a health check that fails is worse than none.

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
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from daedalus import sources
from daedalus.config import DaedalusConfig
from daedalus.layout import DataLayout, RawState, parse_segment_name, sanitize_partition_value, segment_identity
from daedalus.logs import get_logger
from daedalus.ops.health_text import fmt_age, fmt_bytes, render
from daedalus.ops.records import ChildStatus, Heartbeat, SupervisorStatus, read_heartbeat, read_supervisor_status
from daedalus.ops.records import supervisor_running as probe_supervisor
from daedalus.ops.tails import (
    LINE_SUFFIXES,
    TAIL_BYTES,
    first_record_time,
    newest_in_tail,
    newest_per_product,
    tail_lines,
)

__all__ = [  # tails and text live in their own modules; their names stay importable from here
    "EXIT_CODES", "LEVELS", "Finding", "HealthReport", "Level", "check_health", "child_summary", "first_record_time",
    "fmt_age", "fmt_bytes", "heartbeat_fresh_seconds", "newest_per_product", "tail_lines", "worst",
]  # fmt: skip

log = get_logger(__name__)

Level = Literal["ok", "warning", "critical"]
LEVELS: tuple[Level, ...] = ("ok", "warning", "critical")
EXIT_CODES: dict[Level, int] = {"ok": 0, "warning": 1, "critical": 2}

SCAN_STATES: tuple[RawState, ...] = ("active", "ready", "processing", "quarantine")
TAIL_SEGMENTS = 3  # newest segments whose tails are read for freshness (TAIL_BYTES in all)
PARQUET_PARTITIONS = 256  # partition folders whose newest Parquet footer is read for freshness (cached)
RATE_WINDOW_SECONDS = 3600.0  # the write rate is that of segments written in the last hour
MIN_RATE_SPAN_SECONDS = 60.0  # over less time than this the rate is "unknown"
STATUS_STALE_SECONDS = 15.0  # the supervisor rewrites its status every second


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
    # product (or "source:product" when two sources share it) -> {"source", "product", "last_time", "age_seconds",
    # "level", "from"}; "from" says what told the time:
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
        return render(self)


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
    """Files named after a segment in one state folder and the partition folders below it (the
    ccxt Parquet layout nests its segments in ``<channel>/exchange=/symbol=/year=/.../hour=``;
    a flat listing would hide its whole backlog); dotfiles and dot-folders (``.lock``, ``.tmp``)
    and other names are not ours. In quarantine, every file named after a segment counts (whole
    segments, their ``.reason.txt``, ETL rejects); elsewhere only segment names."""
    named = segment_identity if state == "quarantine" else parse_segment_name
    out: list[SegmentFile] = []
    folders = [layout.raw_dir(state, source)]
    while folders:
        try:
            entries = list(os.scandir(folders.pop()))
        except OSError:  # missing (nothing yet), not a directory, unreadable, removed while walked
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(Path(entry.path))
                    continue
                if named(entry.name) is None or not entry.is_file(follow_symlinks=False):
                    continue
                st = entry.stat(follow_symlinks=False)
            except OSError:  # moved or deleted while listed (the ETL, rotation)
                continue
            out.append(SegmentFile(Path(entry.path), state, st.st_size, st.st_mtime))
    return out


def _sources(config: DaedalusConfig) -> list[str]:
    """Sources with a raw folder in any state, plus the configured ones."""
    found = set(sources.enabled(config))
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
    """Products whose freshness is judged, per enabled source (as its heartbeat names them)."""
    return {name: sources.get(name).products(config) for name in sources.enabled(config)}


# ---- heartbeats ------------------------------------------------------------------------------
def heartbeat_fresh_seconds(config: DaedalusConfig) -> float:
    """How old a heartbeat may be and still speak for a live child: three missed beats, plus
    slack for a busy disk (the child rewrites it every ``supervisor.heartbeat_seconds``)."""
    return 3 * config.supervisor.heartbeat_seconds + 2.0


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


def _summary(files: list[SegmentFile], now: float) -> dict[str, Any]:
    """Count, size and ages of the files of one state folder."""
    mtimes = [f.mtime for f in files]
    return {
        "files": len(files),
        "bytes": sum(f.size for f in files),
        "oldest_age_seconds": max(0.0, now - min(mtimes)) if mtimes else None,
        "newest_age_seconds": max(0.0, now - max(mtimes)) if mtimes else None,
    }


def _limit(level: Level, warning: float, critical: float) -> float:
    """The threshold that a value judged ``level`` crossed (for the finding's message)."""
    return critical if level == "critical" else warning


def _level_by(value: float, warning: float, critical: float, *, low_is_bad: bool = False) -> Level:
    if low_is_bad:
        return "critical" if value <= critical else "warning" if value <= warning else "ok"
    return "critical" if value >= critical else "warning" if value >= warning else "ok"


def _names(items: list[str], most: int = 5) -> str:
    shown = ", ".join(items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


_failures_logged: set[tuple[str, str]] = set()
_FAILURES_LOGGED_MAX = 100


def _log_failure_once(section: str, exc: Exception) -> None:
    """Log a failing check with its traceback the first time only: the status server runs the
    check every few seconds for months, and the finding already repeats it each time."""
    key = (section, repr(exc))
    if key in _failures_logged:
        return
    if len(_failures_logged) < _FAILURES_LOGGED_MAX:
        _failures_logged.add(key)
    log.error("health_check_failed", section=section, error=repr(exc), exc_info=exc)


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
        except Exception as exc:  # reported as a finding, logged with the traceback (once)
            _log_failure_once(section, exc)
            self.add("warning", "health", section, f"the {section} check failed: {exc!r}",
                     "report it with the log above; the other checks still ran")  # fmt: skip

    def heartbeat(self, child: str) -> Heartbeat | None:
        """The child's heartbeat when it is fresh and its process alive, else None."""
        if child not in self._heartbeats:
            beat = read_heartbeat(self.layout.heartbeat_file(child))
            ok = (
                beat is not None
                and isinstance(beat.time, int | float)
                and beat.age(self.now) <= heartbeat_fresh_seconds(self.config)
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
        children = [child_summary(c, self.now) for c in status.children]
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

    def _child(self, child: ChildStatus) -> None:
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
            if not isinstance(gauges, dict):
                continue
            self._failing(name, gauges)
            if gauges.get("stalled") != 1:
                continue
            ages = gauges.get("last_frame_age_seconds")
            silent = [a for a in ages.values() if isinstance(a, int | float)] if isinstance(ages, dict) else []
            watchdog = gauges.get("watchdog_seconds")
            for_how_long = f" for {max(silent):.0f} s" if silent else ""
            limit = f" (watchdog {watchdog:g} s)" if isinstance(watchdog, int | float) else ""
            self.add("warning", "ingest", name, f"ingest connected but silent{for_how_long}{limit}",
                     f"the exchange (or the network) stopped sending; ingest reconnects when its watchdog fires; "
                     f"see {self.config.log_dir / (name + '.log')} and the exchange's status page")  # fmt: skip

    def _failing(self, name: str, gauges: dict[str, Any]) -> None:
        """An ingest's ``failing`` gauge (``{label: 1}``, e.g. a ccxt exchange that cannot connect
        while the others collect): the process is alive and its heartbeat fresh, so neither
        ``stalled`` nor the child's state shows it; its markets only go stale."""
        marks = gauges.get("failing")
        failing = sorted(str(k) for k, v in marks.items() if v == 1) if isinstance(marks, dict) else []
        if failing:
            self.add("warning", "ingest", name, f"{_names(failing)} failing: not collecting, retried with backoff",
                     f"the error is in {self.config.log_dir / (name + '.log')} (and `daedalus status`): "
                     "a wrong id, symbol or url in the config, or the exchange is unreachable")  # fmt: skip

    # -- files per source: counts, backlog, quarantine --
    def sources(self) -> None:
        for source in _sources(self.config):
            states = {state: _list_state(self.layout, state, source) for state in SCAN_STATES}
            self.files[source] = states
            summaries = {state: _summary(files, self.now) for state, files in states.items()}
            self.report.sources[source] = {"states": summaries, "backlog": self._backlog(source, summaries)}
            self._quarantine(source, summaries["quarantine"])

    def _backlog(self, source: str, states: dict[RawState, dict[str, Any]]) -> dict[str, Any]:
        """What the ETL has still to do (ready + processing), from the state summaries; its
        age is that of the oldest ready segment (the ETL lag of the metrics)."""
        h = self.health
        ready, processing = states["ready"], states["processing"]
        segments = ready["files"] + processing["files"]
        size = ready["bytes"] + processing["bytes"]
        oldest = ready["oldest_age_seconds"]
        by_count = _level_by(segments, h.backlog_warning_segments, h.backlog_critical_segments)
        by_age: Level = "ok"
        if oldest is not None:
            by_age = _level_by(oldest, h.backlog_warning_seconds, h.backlog_critical_seconds)
        level = worst([by_count, by_age])
        if level != "ok":
            why = []
            if by_count != "ok":
                limit = _limit(by_count, h.backlog_warning_segments, h.backlog_critical_segments)
                why.append(f"{segments} segments >= {limit}")
            if by_age != "ok":
                limit = _limit(by_age, h.backlog_warning_seconds, h.backlog_critical_seconds)
                why.append(f"oldest ready {fmt_age(oldest)} >= {fmt_age(limit)}")
            self.add(level, "backlog", source,
                     f"ETL is {segments} segments / {fmt_bytes(size)} behind (oldest {fmt_age(oldest)}; "
                     f"{processing['files']} in processing): {', '.join(why)}",
                     self._backlog_advice(source))  # fmt: skip
        return {"segments": segments, "bytes": size, "oldest_age_seconds": oldest, "level": level}

    def _backlog_advice(self, source: str) -> str:
        """What to look at first: the ETL watcher of *this* source (``etl`` for Coinbase,
        ``etl-<source>`` otherwise), as the supervisor or its own heartbeat tells."""
        from daedalus.etl.job import etl_child  # only when behind: it imports DuckDB

        etl = None if self.status is None else next(
            (c for c in self.status.children if c.kind == "etl" and c.source == source), None)
        beat = self.heartbeat(etl_child(source))
        poll = self.config.etl.poll_interval_seconds
        if etl is not None and etl.state != "running":
            first = f"the {etl.name} child is {etl.state}: `daedalus status`, {etl.log_file or 'its log'}"
        elif beat is not None:
            busy = isinstance(beat.gauges, dict) and beat.gauges.get("busy") == 1
            first = (f"the ETL watcher runs (pid {beat.pid}, {'busy' if busy else 'idle'}) but does not keep up: "
                     "give it CPU (supervisor.process_nice.etl, supervisor.cpu_affinity)")  # fmt: skip
        elif self.running:
            first = f"the supervisor runs but no heartbeat of {etl_child(source)} is fresh: `daedalus status`"
        else:
            first = ("is the ETL watcher running? `daedalus status`; start `daedalus run --config F` "
                     f"(or `daedalus etl --config F --watch --source {source}`)")  # fmt: skip
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
        judged: list[tuple[Level, str]] = []  # (level, message) of each threshold crossed
        level = _level_by(free_percent, h.disk_warning_free_percent, h.disk_critical_free_percent, low_is_bad=True)
        limit = _limit(level, h.disk_warning_free_percent, h.disk_critical_free_percent)
        judged.append((level, f"{fmt_bytes(usage.free)} free of {fmt_bytes(usage.total)} "
                              f"({free_percent:.1f}% <= {limit:g}%)"))  # fmt: skip
        if hours is not None and rate is not None:
            level = _level_by(hours, h.disk_warning_hours_left, h.disk_critical_hours_left, low_is_bad=True)
            limit = _limit(level, h.disk_warning_hours_left, h.disk_critical_hours_left)
            judged.append((level, f"full in about {hours:.1f} h (<= {limit:g} h) at the current {fmt_bytes(rate)}/s"))
        self.report.disk = {
            "path": str(path), "free_bytes": usage.free, "total_bytes": usage.total,
            "free_percent": round(free_percent, 3), "write_bytes_per_second": rate,
            "hours_until_full": None if hours is None else round(hours, 2),
            "level": worst(level for level, _ in judged),
        }  # fmt: skip
        advice = (f"free space under {path}: delete or move old files of {self.config.processed_dir}, "
                  "keep etl.after_processing: delete (archive keeps every raw segment), or a bigger disk")  # fmt: skip
        for level, message in judged:
            if level != "ok":
                self.add(level, "disk", str(path), message, advice)

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
        for source, products in _products(self.config).items():
            beat = self.heartbeat(f"ingest-{source}")
            times = _times_in_heartbeat(beat, products)
            missing = [p for p in products if p not in times]
            if missing:
                times.update(self._from_segments(source, missing, beat))
            self._judge_freshness(source, products, times)

    def _judge_freshness(self, source: str, products: list[str], times: dict[str, tuple[float, str]]) -> None:
        h = self.health
        stale: dict[Level, list[str]] = {"warning": [], "critical": []}
        unknown: list[str] = []
        for product in products:
            last, origin = times.get(product, (None, None))
            age = None if last is None else max(0.0, self.now - last)
            level: Level = "warning" if age is None else _level_by(age, h.stale_warning_seconds,
                                                                       h.stale_critical_seconds)  # fmt: skip
            key = product if product not in self.report.freshness else f"{source}:{product}"
            self.report.freshness[key] = {"source": source, "product": product, "last_time": last,
                                          "age_seconds": age, "level": level, "from": origin}  # fmt: skip
            if age is None:
                unknown.append(product)
            elif level != "ok":
                stale[level].append(f"{product} {fmt_age(age)}")
        log_file = self.config.log_dir / f"ingest-{source}.log"
        advice = (f"is ingest running and connected? `daedalus status`, {log_file}; "
                  "a product halted or delisted on the exchange also goes quiet")  # fmt: skip
        for level in ("critical", "warning"):
            if stale[level]:
                limit = _limit(level, h.stale_warning_seconds, h.stale_critical_seconds)
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

    def _from_segments(self, source: str, products: list[str], beat: Heartbeat | None) -> dict[str, tuple[float, str]]:
        """Newest receive time per product from the tails of the newest segments (active
        first, then ready/processing), within :data:`TAIL_BYTES` in all.

        The active segment of a live ingest (one it began after it started) is skipped: every
        product in it is in that ingest's heartbeat already, and it is the one segment that
        changes between two checks, so reading it would cost megabytes every few seconds for
        as long as a configured product stays silent."""
        states = self.files.get(source) or {s: _list_state(self.layout, s, source) for s in SCAN_STATES}
        candidates = [f for s in ("active", "ready", "processing") for f in states.get(s, [])
                      if f.path.name.endswith(LINE_SUFFIXES) and not _written_by(beat, f)]  # fmt: skip
        candidates.sort(key=lambda f: (f.state == "active", f.path.name), reverse=True)
        candidates = candidates[:TAIL_SEGMENTS] + _newest_parquet_per_partition(states)
        found: dict[str, tuple[float, str]] = {}
        budget = TAIL_BYTES
        for segment in candidates:
            wanted = [p for p in products if p not in found]
            if not wanted or budget <= 0:
                break
            try:
                times, used = newest_in_tail(segment.path, wanted, budget)
            except OSError:  # moved on by the ETL or deleted meanwhile: the next one
                continue
            budget -= used
            for product, when in times.items():
                found[product] = (when, f"segment {segment.path.name}")
        return found


def _times_in_heartbeat(beat: Heartbeat | None, products: list[str]) -> dict[str, tuple[float, str]]:
    """``{product: (newest receive time, "heartbeat")}`` from a live ingest's heartbeat."""
    entries = beat.products if beat is not None and isinstance(beat.products, dict) else {}
    times: dict[str, tuple[float, str]] = {}
    for product in products:
        entry = entries.get(product)
        last = entry.get("last_time") if isinstance(entry, dict) else None
        if isinstance(last, int | float) and not isinstance(last, bool) and math.isfinite(last):
            times[product] = (float(last), "heartbeat")
    return times


def _newest_parquet_per_partition(states: dict[RawState, list[SegmentFile]]) -> list[SegmentFile]:
    """The newest closed Parquet segment of each partition folder (one market and channel each),
    at most :data:`PARQUET_PARTITIONS`: their footers tell the newest receive time per market
    (the open segments in ``active/`` are Arrow IPC streams, never read here)."""
    newest: dict[Path, SegmentFile] = {}
    for f in (f for s in ("ready", "processing") for f in states.get(s, []) if f.path.name.endswith(".parquet")):
        held = newest.get(f.path.parent)
        if held is None or f.path.name > held.path.name:
            newest[f.path.parent] = f
    return sorted(newest.values(), key=lambda f: f.path.name, reverse=True)[:PARQUET_PARTITIONS]


def _written_by(beat: Heartbeat | None, segment: SegmentFile) -> bool:
    """Whether ``segment`` is the active segment of the live ingest whose heartbeat is ``beat``."""
    if beat is None or segment.state != "active" or not isinstance(beat.started_at, int | float):
        return False
    first = first_record_time(segment.path)
    return first is not None and first >= beat.started_at


def child_summary(child: ChildStatus, now: float) -> dict[str, Any]:
    """A child as the report (and the status page) shows it: its status without the heartbeat
    statistics, with its uptime."""
    return {
        "name": child.name, "kind": child.kind, "source": child.source, "state": child.state,
        "state_since": child.state_since, "pid": child.pid,
        "uptime_seconds": child.uptime(now) if isinstance(child.started_at, int | float) else None,
        "restarts": child.restarts, "memory_restarts": child.memory_restarts, "hang_restarts": child.hang_restarts,
        "rss_bytes": child.rss_bytes, "heartbeat_age": child.heartbeat_age, "exit_reason": child.exit_reason,
        "next_start_at": child.next_start_at, "log_file": child.log_file,
    }  # fmt: skip
