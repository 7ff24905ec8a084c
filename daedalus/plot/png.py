"""The figure (matplotlib, headless Agg) and :func:`render_png`.

Top panel: mid price with the bid/ask band, trades as points (area ~ volume, colour = side
as sent by the exchange), VWAP of each bar as a step; bottom panel: the spread. Intervals
where the book was invalid (after a gap, until the next snapshot) are shaded on both.
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

import numpy as np

from daedalus.config import DaedalusConfig
from daedalus.logs import get_logger
from daedalus.plot.data import PlotData, load_for
from daedalus.query.output import atomic_file

log = get_logger("daedalus.plot")

SIDE_COLOURS = {"BUY": "#1a9850", "SELL": "#d73027"}  # any other side value: grey
OTHER_SIDE = "#7f7f7f"
BAND, MID, VWAP, INVALID, SPREAD = "#9ecae1", "#08519c", "#7b3294", "#f4a582", "#31a354"
FIGSIZE, DPI = (12.0, 7.0), 100  # 1200 x 700 pixels
MAX_TRADE_AREA, CROWDED_TRADES = 120.0, 300  # point area (pt²) of the largest trade; fewer trades than this: full size
MIN_SHADE = 1 / 300  # an invalid interval is drawn at least this fraction of the range wide


def time_range_text(data: PlotData) -> str:
    """``2026-08-09 21:00:00 → 21:05:13 UTC`` (the date once when the range is within a day)."""
    start, end = data.start, data.end
    tail = f"{end:%H:%M:%S}" if start.date() == end.date() else f"{end:%Y-%m-%d %H:%M:%S}"
    return f"{start:%Y-%m-%d %H:%M:%S} → {tail} UTC"


def _with_breaks(t: np.ndarray, values: list[np.ndarray], invalid: list) -> tuple[np.ndarray, list[np.ndarray]]:
    """Insert a NaN at the start of each invalid interval so lines do not bridge a gap."""
    if not invalid or not len(t):
        return t, values
    at = np.searchsorted(t, np.array([a for a, _ in invalid], dtype=t.dtype))
    t = np.insert(t, at, np.array([a for a, _ in invalid], dtype=t.dtype))
    return t, [np.insert(v, at, np.nan) for v in values]


def figure(data: PlotData):  # -> matplotlib.figure.Figure (imported lazily)
    """Draw ``data``; works with any dataset missing (the legend says what is there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    price_ax, spread_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    lo, hi = np.datetime64(data.start.replace(tzinfo=None), "us"), np.datetime64(data.end.replace(tzinfo=None), "us")
    if hi <= lo:
        hi = lo + np.timedelta64(1, "s")
    _shade_invalid(data, (price_ax, spread_ax), lo, hi)
    q = data.quotes
    if q and len(q["t"]):
        t, (bid, ask, mid, spread) = _with_breaks(q["t"], [q["bid"], q["ask"], q["mid"], q["spread"]], data.invalid)
        band = f"bid/ask ({data.quote_source})"
        price_ax.fill_between(t, bid, ask, step="post", color=BAND, alpha=0.6, lw=0, label=band)
        price_ax.step(t, mid, where="post", color=MID, lw=1.0, label="mid")
        spread_ax.step(t, spread, where="post", color=SPREAD, lw=1.0, label="spread")
    _draw_bars(data, price_ax)
    _draw_trades(data, price_ax)
    fig.suptitle(f"{data.product}   {time_range_text(data)}", x=0.01, ha="left", fontsize=12)
    price_ax.set_ylabel(f"price ({data.quote_currency})" if data.quote_currency else "price")
    spread_ax.set_ylabel(f"spread ({data.quote_currency})" if data.quote_currency else "spread")
    spread_ax.set_xlabel("time (UTC)")
    locator = mdates.AutoDateLocator()
    spread_ax.xaxis.set_major_locator(locator)
    spread_ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    spread_ax.set_xlim(lo, hi)
    price_ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    for ax in (price_ax, spread_ax):
        ax.grid(True, color="#dddddd", lw=0.6)
        ax.margins(y=0.08)
    handles, _ = price_ax.get_legend_handles_labels()
    if handles:  # above the panel: never on top of the data
        legend = price_ax.legend(
            loc="lower left", bbox_to_anchor=(0, 1.0), fontsize=8, frameon=False, ncols=len(handles)
        )
        for handle in legend.legend_handles:  # trade markers at one readable size, whatever the data
            if hasattr(handle, "set_sizes"):
                handle.set_sizes([40])
    if not q:
        price_ax.text(0.5, 0.5, "no book or ticker data in this range", transform=price_ax.transAxes, ha="center")
    return fig


def shaded_spans(invalid: list[tuple[np.datetime64, np.datetime64]], least: np.timedelta64) -> list[tuple]:
    """The invalid intervals as drawn: each at least ``least`` wide (a 50 ms gap in a day must
    show), overlapping ones merged, so a month of gaps is a few hundred shapes, not thousands."""
    spans: list[tuple] = []
    for a, b in invalid:
        b = max(b, a + least)
        if spans and a <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], b))
        else:
            spans.append((a, b))
    return spans


def _shade_invalid(data: PlotData, axes: tuple, lo: np.datetime64, hi: np.datetime64) -> None:
    for i, (a, b) in enumerate(shaded_spans(data.invalid, (hi - lo) * MIN_SHADE)):
        for ax in axes:
            first = i == 0 and ax is axes[0]
            ax.axvspan(a, b, color=INVALID, alpha=0.45, lw=0, label="book invalid (gap)" if first else None)


def _draw_bars(data: PlotData, ax) -> None:
    bars = data.bars
    if not bars or not len(bars["start"]):
        return
    label = f"VWAP {data.datasets.bars.removeprefix('bars_')} bars"
    if data.bar_seconds != data.datasets.bar_seconds:
        label = f"VWAP per {data.bar_seconds:,} s (bars merged)"
    ax.hlines(bars["vwap"], bars["start"], bars["end"], colors=VWAP, lw=2.0, label=label, zorder=3)


def _draw_trades(data: PlotData, ax) -> None:
    trades = data.trades
    if not trades or not len(trades["t"]):
        return
    size = trades["size"]
    biggest = np.nanmax(size) if np.isfinite(size).any() else 1.0
    # smaller points when there are many, so a day of trades stays a cloud, not a blot
    largest = MAX_TRADE_AREA * min(1.0, np.sqrt(CROWDED_TRADES / max(len(size), 1)))
    area = 4 + largest * np.sqrt(np.nan_to_num(size) / (biggest or 1.0))
    for side in sorted(set(trades["side"])):
        mask = trades["side"] == side
        colour = SIDE_COLOURS.get(str(side), OTHER_SIDE)
        ax.scatter(
            trades["t"][mask],
            trades["price"][mask],
            s=area[mask],
            color=colour,
            alpha=0.7,
            edgecolors="white",
            linewidths=0.4,
            label=f"trades {str(side).lower()} (size ~ area)",
            zorder=4,
        )


def png_bytes(data: PlotData, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes (the HTML report embeds these)."""
    buffer = io.BytesIO()
    figure(data).savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def default_path(product: str, start: datetime, suffix: str = ".png") -> Path:
    """``plot-<product>-<start>.png`` in the current directory."""
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in product)
    return Path(f"plot-{safe}-{start:%Y%m%dT%H%M%SZ}{suffix}")


def render_png(
    config: DaedalusConfig,
    product: str,
    start: str | datetime | None = None,
    end: str | datetime | None = None,
    path: str | Path | None = None,
) -> Path:
    """Write the plot of ``product`` over [start, end] (default: its whole book) as a PNG."""
    data = load_for(config, product, start, end)
    return write_png(data, path)


def write_png(data: PlotData, path: str | Path | None = None) -> Path:
    """Write already loaded ``data`` (so a PNG and an HTML report share one load)."""
    return save(data, path, ".png", png_bytes(data))


def save(data: PlotData, path: str | Path | None, suffix: str, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` (default: :func:`default_path`), whole or not at all."""
    target = Path(path) if path is not None else default_path(data.product, data.start, suffix)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp:
        tmp.write_bytes(payload)
    log.info("plot_written", path=str(target), product=data.product, format=suffix.lstrip("."))
    return target
