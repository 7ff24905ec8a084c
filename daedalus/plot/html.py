"""The HTML report: the PNG plot embedded as base64 plus small tables, in one file.

Self-contained on purpose (no CDN, no script, no external URL): it opens from a USB stick
on a machine with no network, and mail or chat attachments keep working.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from daedalus.config import DaedalusConfig
from daedalus.logs import get_logger
from daedalus.plot.data import PlotData
from daedalus.plot.png import DPI, default_path, load_for, png_bytes, time_range_text

log = get_logger("daedalus.plot")

Rows = Sequence[Mapping[str, object]]  # a table: one mapping per row, the first row's keys are the columns
MAX_INTERVALS_LISTED = 50

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .6em; } h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
table { border-collapse: collapse; margin: .3em 0; } .tables { display: flex; flex-wrap: wrap; gap: 0 2.5em; }
th, td { padding: .2em .8em; border-bottom: 1px solid #e5e5e5; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; } th { background: #f5f5f5; }
footer { margin-top: 2em; color: #777; font-size: .85em; }
"""


def _cell(value: object) -> str:
    if isinstance(value, float):
        text = f"{value:,.6g}" if abs(value) < 1e6 else f"{value:,.2f}"
        return f'<td class="n">{text}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="n">{value:,}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def table_html(title: str, rows: Rows) -> str:
    """One titled table; an empty one says so."""
    head = f"<h2>{html.escape(title)}</h2>"
    if not rows:
        return f"<section>{head}<p>none</p></section>"
    columns = list(rows[0])
    header = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(row.get(c, "")) for c in columns) + "</tr>" for row in rows)
    return f"<section>{head}<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table></section>"


def _iso(moment: datetime | np.datetime64) -> str:
    if isinstance(moment, np.datetime64):
        return np.datetime_as_string(moment, unit="ms") + "Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def summary_tables(data: PlotData) -> dict[str, list[dict[str, object]]]:
    """Summary, rows per dataset, spread statistics and the invalid-book intervals."""
    span = (data.end - data.start).total_seconds()
    invalid = data.invalid_seconds
    summary = [
        {"": "product", "value": data.product},
        {"": "from (UTC)", "value": _iso(data.start)},
        {"": "to (UTC)", "value": _iso(data.end)},
        {"": "duration (s)", "value": round(span, 3)},
        {"": "book from", "value": data.quote_source or "no book or ticker data"},
        {"": "invalid-book intervals (gaps)", "value": len(data.invalid)},
        {"": "time with invalid book (s)", "value": round(invalid, 3)},
        {"": "book valid (% of range)", "value": round(100 * (1 - invalid / span), 3) if span > 0 else 100.0},
    ]
    rows = [{"dataset": name, "rows in range": count} for name, count in data.rows.items()]
    s = data.spread
    spread = (
        [
            {"statistic": name, data.quote_currency or "price": s[name], "bps": s.get(f"{name}_bps", "")}
            for name in ("min", "p50", "mean", "p95", "max")
        ]
        if s
        else []
    )
    intervals = [
        {"from (UTC)": _iso(a), "to (UTC)": _iso(b), "seconds": float((b - a) / np.timedelta64(1, "s"))}
        for a, b in data.invalid[:MAX_INTERVALS_LISTED]
    ]
    more = len(data.invalid) > MAX_INTERVALS_LISTED
    title = "Invalid-book intervals" + (f" (first {MAX_INTERVALS_LISTED})" if more else "")
    spread_title = f"Spread ({data.quote_source or '-'})"
    return {"Summary": summary, "Rows per dataset": rows, spread_title: spread, title: intervals}


def report_html(data: PlotData, extra_tables: Mapping[str, Rows] | None = None) -> str:
    """The whole page as text."""
    image = base64.b64encode(png_bytes(data, dpi=DPI)).decode("ascii")
    title = f"{data.product} {time_range_text(data)}"
    tables = summary_tables(data) | dict(extra_tables or {})
    sections = "".join(table_html(name, rows) for name, rows in tables.items())
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Daedalus: {html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>Daedalus: {html.escape(title)}</h1>"
        f'<img id="plot" alt="{html.escape(data.product)}: mid price, bid/ask, trades, VWAP bars, spread, gaps" '
        f'src="data:image/png;base64,{image}">'
        f'<div class="tables">{sections}</div>'
        f"<footer>Generated by daedalus plot at {made}. Times are UTC.</footer></body></html>\n"
    )


def render_html(
    config: DaedalusConfig,
    product: str,
    start: str | datetime | None = None,
    end: str | datetime | None = None,
    path: str | Path | None = None,
    extra_tables: Mapping[str, Rows] | None = None,
) -> Path:
    """Write the report of ``product`` over [start, end]; ``extra_tables`` (title -> rows)
    are added after the built-in ones (the demo adds its run summary)."""
    data = load_for(config, product, start, end)
    return write_html(data, path, extra_tables)


def write_html(data: PlotData, path: str | Path | None = None, extra_tables: Mapping[str, Rows] | None = None) -> Path:
    """Write the report of already loaded ``data``; ``extra_tables`` as in :func:`render_html`."""
    target = Path(path) if path is not None else default_path(data.product, data.start, ".html")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(report_html(data, extra_tables), encoding="utf-8")
    log.info("plot_written", path=str(target), product=data.product, format="html")
    return target
