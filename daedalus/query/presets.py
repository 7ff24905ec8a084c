"""Ready-made analyses (``daedalus query --preset NAME``) as SQL over the views of :mod:`views`.

Every user-supplied value reaches the SQL text only as a validated number, a timestamp
rendered from a parsed ``datetime``, or a literal quoted by :func:`views.sql_string`.

- ``ohlcv``: from ``market_trades``, per product and bucket of ``interval`` by trade time
  (``ts_event``), buckets aligned on the epoch like the ETL's bars: open/close = first/last
  trade by (ts_event, ts_recv, seq, numeric trade_id), high, low, volume, vwap, trades.
- ``spread``: from ``level2``, one observation per frame and product (the book after the whole
  frame), valid books only: mean/median/p95 spread in price and in bps of the mid price.
- ``gaps``: from ``level2``, per product: ``gaps`` = periods in which the book was invalid
  (a run of frames with ``book_valid = false``: after a sequence gap, a reconnect or a
  crossed book, until the next snapshot), ``invalid_s`` = their total length (from the first
  invalid frame to the next valid one, by ``ts_recv``), ``crossed`` = frames whose published
  best bid >= best ask, ``snapshots`` (each one after the first is a resync), ``valid_at_end``
  (whether the last frame left the book valid).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from daedalus.config import bar_interval, interval_seconds
from daedalus.query.times import TimeError, as_utc, parse_utc
from daedalus.query.views import sql_string


class PresetError(ValueError):
    """A preset name or parameter that cannot be used (one line for the user)."""


@dataclass(frozen=True)
class Preset:
    view: str  # the view it reads: absent means "no data for this preset"
    describe: str
    build: Callable[..., str]


def parse_interval(text: str) -> int:
    """``"1m"`` -> 60: a whole number and a unit s, m, h or d, from 1s to 1d (the bars' rule)."""
    try:
        return interval_seconds(bar_interval(text.strip()))
    except ValueError as exc:
        raise PresetError(f"--interval: {text!r} {exc}") from None


def parse_time(text: str, flag: str) -> datetime:
    """An ISO 8601 date or time (``Z`` or an offset allowed; none means UTC) as naive UTC."""
    try:
        return parse_utc(text, flag).replace(tzinfo=None)
    except TimeError as exc:
        raise PresetError(str(exc)) from None


def _timestamp(value: datetime) -> str:
    return f"TIMESTAMP '{value.isoformat(sep=' ', timespec='microseconds')}'"


def _where(column: str, product: str | None, start: datetime | None, end: datetime | None, extra: str = "") -> str:
    """``WHERE`` clause for the common filters: product, ``start <= column < end``."""
    terms = [extra] if extra else []
    if product is not None:
        terms.append(f"product_id = {sql_string(product)}")
    if start is not None:
        terms.append(f"{column} >= {_timestamp(start)}")
    if end is not None:
        terms.append(f"{column} < {_timestamp(end)}")
    return ("WHERE " + " AND ".join(terms)) if terms else ""


def _ohlcv(product, start, end, interval, scale) -> str:
    seconds = parse_interval(interval)
    # ties in trade time are common (one frame, many fills): numeric trade ids break them in
    # the exchange's order, whatever order the frame listed them in
    order = "ORDER BY ts_event_ns, ts_recv_ns, seq, TRY_CAST(trade_id AS HUGEINT), trade_id"
    return f"""
SELECT product_id,
       time_bucket(INTERVAL '{seconds} seconds', ts_event, TIMESTAMP '1970-01-01') AS bucket,
       first(price {order}) / {scale} AS open,
       max(price) / {scale} AS high,
       min(price) / {scale} AS low,
       last(price {order}) / {scale} AS close,
       sum(size) / {scale} AS volume,
       sum(price::DOUBLE * size::DOUBLE) / nullif(sum(size::DOUBLE), 0) / {scale} AS vwap,
       count(*) AS trades
FROM market_trades
{_where("ts_event", product, start, end, "price IS NOT NULL AND ts_event IS NOT NULL")}
GROUP BY ALL
ORDER BY product_id, bucket"""


def _frames(product, start, end) -> str:
    """One row per level2 frame and product: the book after the whole frame."""
    return f"""
SELECT product_id, ts_recv_ns, seq,
       any_value(best_bid) AS best_bid, any_value(best_ask) AS best_ask,
       any_value(spread) AS spread, any_value(mid_price) AS mid_price,
       bool_and(book_valid) AS book_valid, bool_or(is_snapshot) AS is_snapshot
FROM level2
{_where("ts_recv", product, start, end)}
GROUP BY product_id, ts_recv_ns, seq"""


def _spread(product, start, end, interval, scale) -> str:
    bps = "spread::DOUBLE / mid_price::DOUBLE * 1e4"
    return f"""
WITH frames AS ({_frames(product, start, end)})
SELECT product_id,
       count(*) AS frames,
       avg(spread::DOUBLE) / {scale} AS mean_spread,
       quantile_cont(spread::DOUBLE, 0.5) / {scale} AS median_spread,
       quantile_cont(spread::DOUBLE, 0.95) / {scale} AS p95_spread,
       avg({bps}) AS mean_bps,
       quantile_cont({bps}, 0.5) AS median_bps,
       quantile_cont({bps}, 0.95) AS p95_bps
FROM frames
WHERE book_valid AND spread IS NOT NULL AND mid_price > 0
GROUP BY product_id
ORDER BY product_id"""


def _gaps(product, start, end, interval, scale) -> str:
    return f"""
WITH frames AS ({_frames(product, start, end)}),
ordered AS (
  SELECT *,
         lag(book_valid) OVER w AS was_valid,
         lead(ts_recv_ns) OVER w - ts_recv_ns AS until_next_ns
  FROM frames
  WINDOW w AS (PARTITION BY product_id ORDER BY ts_recv_ns, seq)
)
SELECT product_id,
       count(*) AS frames,
       count(*) FILTER (NOT book_valid AND coalesce(was_valid, true)) AS gaps,
       coalesce(sum(until_next_ns) FILTER (NOT book_valid), 0) / 1e9 AS invalid_s,
       (max(ts_recv_ns) - min(ts_recv_ns)) / 1e9 AS span_s,
       count(*) FILTER (best_bid >= best_ask) AS crossed,
       count(*) FILTER (is_snapshot) AS snapshots,
       last(book_valid ORDER BY ts_recv_ns, seq) AS valid_at_end,
       make_timestamp(min(ts_recv_ns) // 1000) AS first_ts,
       make_timestamp(max(ts_recv_ns) // 1000) AS last_ts
FROM ordered
GROUP BY product_id
ORDER BY product_id"""


PRESETS: dict[str, Preset] = {
    "ohlcv": Preset("market_trades", "open/high/low/close/volume/vwap/trades per product and --interval", _ohlcv),
    "spread": Preset("level2", "mean/median/p95 spread per product, in price and bps (valid books)", _spread),
    "gaps": Preset("level2", "per product: invalid-book periods, their length, crossed frames, snapshots", _gaps),
}


def preset_sql(
    name: str,
    *,
    product: str | None = None,
    start: str | datetime | None = None,
    end: str | datetime | None = None,
    interval: str = "1m",
    price_scale: float = 1,
) -> str:
    """The SQL of preset ``name``; ``start``/``end`` as ISO strings or datetimes (UTC when naive).

    ``price_scale`` divides prices and sizes back to units (1e8 for ``decimal_strategy: pips``)."""
    preset = PRESETS.get(name)
    if preset is None:
        raise PresetError(f"--preset: {name!r} is not one of {', '.join(PRESETS)}")
    if product is not None and "\x00" in product:
        raise PresetError("--product: a NUL character cannot be part of a product id")
    lo = parse_time(start, "--start") if isinstance(start, str) else _naive_utc(start)
    hi = parse_time(end, "--end") if isinstance(end, str) else _naive_utc(end)
    if lo is not None and hi is not None and lo >= hi:
        raise PresetError(f"--start ({lo.isoformat()}) must be before --end ({hi.isoformat()})")
    if not (isinstance(price_scale, int | float) and price_scale > 0):
        raise PresetError(f"price_scale must be a positive number (got {price_scale!r})")
    return preset.build(product, lo, hi, interval, f"{price_scale:g}").strip()


def _naive_utc(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value).replace(tzinfo=None)
