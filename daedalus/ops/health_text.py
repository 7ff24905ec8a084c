"""The text of ``daedalus health``: a person reads it in a terminal or a cron mail."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daedalus.ops.health import HealthReport


def fmt_bytes(n: float | None) -> str:
    """Decimal units (as ``df -H`` and disk vendors count)."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - unreachable


def fmt_age(seconds: float | None) -> str:
    """An age in the unit a person thinks in at that size."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} d"


def render(report: HealthReport) -> str:
    """Findings first (critical, then warning), each with its recommendation; then the figures."""
    from daedalus.ops.health import LEVELS  # health imports this module: import at call time

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
