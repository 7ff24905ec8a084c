"""``daedalus status``: the supervisor's status record as a table a person reads.

Whether the supervisor runs is told by its lock (the OS lets go of it however the
supervisor dies), not by the record, which a SIGKILLed supervisor leaves behind: then the
last record is shown under a line saying so, and the exit code is 1.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from daedalus.layout import DataLayout
from daedalus.ops.records import ChildStatus, SupervisorStatus, read_supervisor_status, supervisor_running

COLUMNS = ("CHILD", "PID", "STATE", "UPTIME", "RESTARTS (MEM/HANG)", "RSS MB", "HEARTBEAT", "EXIT REASON / NEXT RETRY")


def duration(seconds: float | None) -> str:
    """``42s``, ``5m03s``, ``3h07m``, ``12d04h``: short enough for a table column."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)  # a retry already due, a record a moment old
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def child_row(child: ChildStatus, now: float) -> tuple[str, ...]:
    note = child.exit_reason or ""
    if child.next_start_at is not None and child.state in ("backoff", "crashloop"):
        retry = f"retry in {duration(child.next_start_at - now)}"
        note = f"{retry}; {note}" if note else retry
    elif child.state == "fatal":
        note = f"not restarted (fix, then restart daedalus run); {note}" if note else "not restarted"
    return (
        child.name,
        str(child.pid) if child.pid is not None else "-",
        child.state,
        duration(child.uptime(now)),
        f"{child.restarts} ({child.memory_restarts}/{child.hang_restarts})",
        f"{child.rss_bytes / 1048576:.1f}" if child.rss_bytes is not None else "-",
        duration(child.heartbeat_age) if child.heartbeat_age is not None else "-",
        note[:160] or "-",
    )


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def render(status: SupervisorStatus, now: float | None = None) -> str:
    now = time.time() if now is None else now
    head = (
        f"supervisor pid {status.pid} on {status.data_dir}, up {duration(now - status.started_at)}"
        f"{f', status page {status.status_url}' if status.status_url else ''}"
    )
    if not status.children:
        return head + "\n(no children)"
    return head + "\n" + table([COLUMNS, *(child_row(c, now) for c in status.children)])


def status_text(layout: DataLayout) -> tuple[str, int]:
    """The text of ``daedalus status`` and its exit code: 0 when a supervisor runs on this
    data directory, 1 when not."""
    status = read_supervisor_status(layout.supervisor_status_file)
    if not supervisor_running(layout.supervisor_lock):
        line = f"no supervisor is running on {layout.root} (start it with: daedalus run --config FILE)"
        if status is None:
            return line, 1
        when = datetime.fromtimestamp(status.time, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{line}\nlast status written {when}:\n{render(status, status.time)}", 1
    if status is None:
        return f"a supervisor runs on {layout.root} but has not written {layout.supervisor_status_file} yet", 0
    return render(status), 0
