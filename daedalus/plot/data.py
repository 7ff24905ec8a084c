"""What a plot shows, pulled from the processed dataset with DuckDB and reduced there.

A day of ``level2`` is tens of millions of rows: nothing row-sized reaches Python. Quotes
and trades are aggregated per time bucket (at most :data:`QUOTE_POINTS` / :data:`TRADE_POINTS`
buckets over the range, so a short range keeps every update and trade as it is), bars are
merged into at most :data:`BAR_POINTS` (a year of 1-minute bars is half a million), and the
invalid-book intervals are computed from ``book_valid`` per frame. Data comes through the
views of :mod:`daedalus.query.views`; the view and column names in the SQL here come from
the code and the validated config, never from the user (whose values are parameters).
Times are handled as int64 microseconds since the epoch (UTC) and become numpy
``datetime64[us]`` only at the end, so no time zone is ever guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import duckdb
import numpy as np

from daedalus.config import DaedalusConfig, interval_seconds
from daedalus.logs import get_logger
from daedalus.query.remote import ProcessedRoot
from daedalus.query.times import TimeError, as_utc, is_bare_date, parse_utc, utc_text
from daedalus.query.views import dataset_views, open_dataset

log = get_logger("daedalus.plot")

QUOTE_POINTS = 4000  # buckets for mid / bid / ask / spread over the range
TRADE_POINTS = 4000  # buckets per side for trades
BAR_POINTS = 2000  # VWAP segments: more bars than this are merged (volume-weighted) into wider ones
VALIDITY_BUCKETS = 100_000  # first pass of the invalid-interval search (see Loader.invalid)
EXACT_QUANTILE_ROWS = 1_000_000  # above this, spread percentiles are approximate (t-digest): bounded memory
PIPS_SCALE = 100_000_000  # etl.decimal_strategy "pips": int64 units of 1e-8


class PlotError(ValueError):
    """Bad input (unknown product, empty range, bad time): one line for the operator."""


@dataclass(frozen=True)
class Datasets:
    """The view names of this config (``book_snapshot_<N>`` and ``bars_<interval>`` follow it)."""

    level2: str = "level2"
    trades: str = "market_trades"
    ticker: str = "ticker"
    snapshot: str = "book_snapshot_10"
    bars: str = "bars_1m"
    bar_seconds: int = 60

    @classmethod
    def of(cls, config: DaedalusConfig) -> Datasets:
        channels = config.etl.channels
        interval = channels.bars.interval
        return cls(
            snapshot=f"book_snapshot_{channels.book_snapshot.levels}",
            bars=f"bars_{interval}",
            bar_seconds=interval_seconds(interval),
        )

    def time_columns(self) -> dict[str, str]:
        """Each dataset and the column its rows are placed in time by."""
        return {
            self.level2: "ts_recv",
            self.snapshot: "ts_recv",
            self.trades: "ts_event",  # trade time, as the bars use
            self.ticker: "ts_recv",
            self.bars: "start",
        }


@dataclass
class PlotData:
    """Everything drawn and tabulated for one product over [start, end] (UTC)."""

    product: str
    start: datetime
    end: datetime
    datasets: Datasets
    rows: dict[str, int]  # rows per dataset in the range
    quote_source: str | None = None  # level2, or ticker when there is no level2
    quotes: dict[str, np.ndarray] = field(default_factory=dict)  # t, bid, ask, mid, spread
    trades: dict[str, np.ndarray] = field(default_factory=dict)  # t, price, size, side
    bars: dict[str, np.ndarray] = field(default_factory=dict)  # start, end, vwap
    bar_seconds: int = 0  # the width of one drawn bar (the dataset's, or wider when merged)
    invalid: list[tuple[np.datetime64, np.datetime64]] = field(default_factory=list)
    spread: dict[str, float] = field(default_factory=dict)  # min, p50, mean, p95, max (+ _bps)

    @property
    def quote_currency(self) -> str:
        return self.product.rsplit("-", 1)[-1] if "-" in self.product else ""

    @property
    def invalid_seconds(self) -> float:
        return sum((b - a) / np.timedelta64(1, "s") for a, b in self.invalid)


def parse_time(value: str | datetime | None, flag: str, *, end: bool = False) -> datetime | None:
    """``2026-08-09``, ``2026-08-09T21:00``, ``...Z`` or ``...+02:00`` as aware UTC; no zone means UTC.

    A bare date given as an end means the end of that day, so ``--start D --end D`` is day D."""
    if value is None or isinstance(value, datetime):
        return None if value is None else as_utc(value)
    try:
        moment = parse_utc(value, flag)
    except TimeError as exc:
        raise PlotError(str(exc)) from None
    return moment + timedelta(days=1, microseconds=-1) if end and is_bare_date(value) else moment


def _us(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _from_us(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(us))


def _floats(values: np.ndarray) -> np.ndarray:
    """A DuckDB column (maybe masked for NULLs) as float64 with NaN for NULL."""
    return np.ma.filled(np.ma.asarray(values, dtype=float), np.nan)


def _times(values: list[int] | np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype="int64").astype("datetime64[us]")


class Loader:
    """Queries over the views of one ``open_dataset`` connection."""

    def __init__(self, con: duckdb.DuckDBPyConnection, datasets: Datasets) -> None:
        self.con = con
        self.ds = datasets
        views = dataset_views(con)
        self.present = [name for name in datasets.time_columns() if name in views]
        self.types = {name: {col: kind.upper() for col, kind in views[name]} for name in self.present}

    def num(self, view: str, column: str) -> str:
        """``column`` as DOUBLE in price units whatever ``etl.decimal_strategy`` wrote."""
        if self.types[view].get(column, "DOUBLE") in ("BIGINT", "HUGEINT", "INTEGER"):
            return f'("{column}"::DOUBLE / {PIPS_SCALE})'
        return f'"{column}"::DOUBLE'

    def products(self) -> list[str]:
        union = " UNION ".join(f'SELECT DISTINCT product_id FROM "{v}"' for v in self.present)
        return sorted(r[0] for r in self.con.execute(union).fetchall() if r[0] is not None) if union else []

    def span(self, view: str, product: str) -> tuple[int, int] | None:
        col = self.ds.time_columns()[view]
        lo, hi = self.con.execute(
            f'SELECT min(epoch_us("{col}")), max(epoch_us("{col}")) FROM "{view}" WHERE product_id = ?', [product]
        ).fetchone()
        return None if lo is None else (lo, hi)

    def where(self, view: str) -> str:
        """The filter of ``view`` on (product, start_us, end_us) parameters."""
        col = self.ds.time_columns()[view]
        if view == self.ds.bars:  # every bar that overlaps the range, also one that started before it
            lo = f"make_timestamp($lo - {self.ds.bar_seconds * 1_000_000})"
            return f'product_id = $product AND "{col}" > {lo} AND "{col}" <= make_timestamp($hi)'
        return f'product_id = $product AND "{col}" >= make_timestamp($lo) AND "{col}" <= make_timestamp($hi)'

    def count(self, view: str, params: dict) -> int:
        return self.con.execute(f'SELECT count(*) FROM "{view}" WHERE {self.where(view)}', params).fetchone()[0]

    def quotes(self, params: dict, width: int) -> tuple[str | None, dict[str, np.ndarray]]:
        """Mid, lowest bid and highest ask per bucket, from valid books (level2, else ticker)."""
        for view, valid in ((self.ds.level2, "book_valid"), (self.ds.ticker, "TRUE")):
            if view not in self.present or not params["rows"].get(view):
                continue
            bid, ask = self.num(view, "best_bid"), self.num(view, "best_ask")
            col = self.ds.time_columns()[view]
            rows = self.con.execute(
                f"""SELECT min(epoch_us("{col}")) AS t, min(bid) AS bid, max(ask) AS ask, avg((bid + ask) / 2) AS mid,
                       avg(ask - bid) AS spread
                FROM (SELECT "{col}", {bid} AS bid, {ask} AS ask FROM "{view}" WHERE {self.where(view)} AND {valid})
                WHERE bid IS NOT NULL AND ask IS NOT NULL
                GROUP BY (epoch_us("{col}") - $lo) // {width} ORDER BY t""",
                _only(params),
            ).fetchnumpy()
            return view, {"t": _times(rows["t"])} | {k: _floats(rows[k]) for k in ("bid", "ask", "mid", "spread")}
        return None, {}

    def spread_stats(self, view: str, params: dict) -> dict[str, float]:
        """Statistics over every valid book update in the range (not the buckets); percentiles
        are approximate above :data:`EXACT_QUANTILE_ROWS` rows."""
        valid = "book_valid" if view == self.ds.level2 else "TRUE"
        bid, ask = self.num(view, "best_bid"), self.num(view, "best_ask")
        q = "quantile_cont" if params["rows"].get(view, 0) <= EXACT_QUANTILE_ROWS else "approx_quantile"
        row = self.con.execute(
            f"""SELECT min(s), {q}(s, 0.5), avg(s), {q}(s, 0.95), max(s),
                       min(bps), {q}(bps, 0.5), avg(bps), {q}(bps, 0.95), max(bps)
            FROM (SELECT {ask} - {bid} AS s, 2e4 * ({ask} - {bid}) / ({ask} + {bid}) AS bps
                  FROM "{view}" WHERE {self.where(view)} AND {valid}
                  AND best_bid IS NOT NULL AND best_ask IS NOT NULL)""",
            _only(params),
        ).fetchone()
        if row[0] is None:
            return {}
        stats = ("min", "p50", "mean", "p95", "max")
        names = (*stats, *(f"{n}_bps" for n in stats))
        return dict(zip(names, (float(v) for v in row), strict=True))

    def trades(self, params: dict, width: int) -> dict[str, np.ndarray]:
        """Per bucket and side: volume-weighted price and total size (one trade when sparse)."""
        view = self.ds.trades
        price, size = self.num(view, "price"), self.num(view, "size")
        rows = self.con.execute(
            f"""SELECT min(epoch_us(ts_event)) AS t, sum(p * s) / nullif(sum(s), 0) AS price, sum(s) AS size,
                       upper(side) AS side
            FROM (SELECT ts_event, side, {price} AS p, {size} AS s FROM "{view}" WHERE {self.where(view)})
            GROUP BY (epoch_us(ts_event) - $lo) // {width}, upper(side) ORDER BY t""",
            _only(params),
        ).fetchnumpy()
        return {
            "t": _times(rows["t"]),
            "price": _floats(rows["price"]),
            "size": _floats(rows["size"]),
            "side": np.asarray(rows["side"], dtype=object),
        }

    def bars(self, params: dict) -> tuple[int, dict[str, np.ndarray]]:
        """VWAP per bar, or per run of ``k`` bars (epoch-aligned, volume-weighted) when the range
        holds more than :data:`BAR_POINTS` of them. Returns the drawn width in seconds and the bars."""
        view = self.ds.bars
        merged = -(-params["rows"][view] // BAR_POINTS) * self.ds.bar_seconds
        width = merged * 1_000_000
        vwap, volume = self.num(view, "vwap"), self.num(view, "volume")
        rows = self.con.execute(
            f"""SELECT epoch_us(start) // {width} * {width} AS t,
                       sum({vwap} * {volume}) / nullif(sum({volume}), 0) AS merged_vwap
            FROM "{view}" WHERE {self.where(view)} AND vwap IS NOT NULL
            GROUP BY t HAVING merged_vwap IS NOT NULL ORDER BY t""",
            _only(params),
        ).fetchnumpy()
        start, vwap = _times(rows["t"]), _floats(rows["merged_vwap"])
        return merged, {"start": start, "end": start + np.timedelta64(merged, "s"), "vwap": vwap}

    def invalid(self, params: dict) -> list[tuple[np.datetime64, np.datetime64]]:
        """[first invalid frame, next valid frame) for each run of ``book_valid = false``;
        a run still open at the end of the range ends there.

        Exact without sorting every row (a day of level2 would take seconds and ~1 GB): one
        streaming pass counts valid/invalid rows per fine bucket; a bucket of one kind is a
        single run, and only the few buckets holding both are read row by row, in order."""
        view, col = self.ds.level2, "ts_recv"
        width = max(1, (params["hi"] - params["lo"]) // VALIDITY_BUCKETS + 1)
        bucket = f'(epoch_us("{col}") - $lo) // {width}'
        b, bad, good, t0, t1 = (
            self.con.execute(
                f"""SELECT {bucket} AS b, count(*) FILTER (NOT book_valid), count(*) FILTER (book_valid),
                       min(epoch_us("{col}")), max(epoch_us("{col}"))
            FROM "{view}" WHERE {self.where(view)} GROUP BY b ORDER BY b""",
                _only(params),
            )
            .fetchnumpy()
            .values()
        )
        if not np.asarray(bad).any():
            return []
        mixed = np.flatnonzero((np.asarray(bad) > 0) & (np.asarray(good) > 0))
        rows = self.con.execute(
            f"""SELECT {bucket} AS b, epoch_us("{col}") AS t, book_valid AS v FROM "{view}"
            WHERE {self.where(view)} AND list_contains($mixed, {bucket}) ORDER BY t, seq""",
            _only(params) | {"mixed": np.asarray(b)[mixed].tolist()},
        ).fetchnumpy()
        pure = np.setdiff1d(np.arange(len(b)), mixed)
        times = np.concatenate([np.asarray(t0)[pure], np.asarray(t1)[pure], np.asarray(rows["t"])])
        valid = np.concatenate([np.asarray(bad)[pure] == 0] * 2 + [np.asarray(rows["v"], bool)])
        order = np.argsort(times, kind="stable")  # pure buckets and mixed rows never overlap in time
        times, valid = times[order], valid[order]
        change = np.flatnonzero(np.concatenate([[True], valid[1:] != valid[:-1]]))
        starts = change[~valid[change]]
        ends = [times[change[change > i][0]] if (change > i).any() else params["hi"] for i in starts]
        return [(_times([times[i]])[0], _times([end])[0]) for i, end in zip(starts, ends, strict=True)]


def _only(params: dict) -> dict:
    """DuckDB refuses named parameters a statement does not use."""
    return {k: params[k] for k in ("product", "lo", "hi")}


def load(
    con: duckdb.DuckDBPyConnection,
    datasets: Datasets,
    product: str,
    start: datetime | None = None,
    end: datetime | None = None,
) -> PlotData:
    """The plot's data; :class:`PlotError` for an unknown product or an empty range.

    Default range: the span of the product's book (``level2``), else of all its data. Trades
    replayed by the subscription's snapshot from before the first book are outside it; pass
    ``start`` to see them.
    """
    loader = Loader(con, datasets)
    products = loader.products()
    if product not in products:
        available = ", ".join(products) if products else "none (no processed data: run `daedalus etl` first)"
        raise PlotError(f"unknown product {product!r}: available: {available}")
    spans = {v: s for v in loader.present if (s := loader.span(v, product)) is not None}
    whole = spans.get(datasets.level2) or (min(s[0] for s in spans.values()), max(s[1] for s in spans.values()))
    lo = _us(start) if start else whole[0]
    hi = _us(end) if end else whole[1]
    if hi < lo:
        raise PlotError(f"--end {utc_text(_from_us(hi))} is before --start {utc_text(_from_us(lo))}")
    params = {"product": product, "lo": lo, "hi": hi}
    rows = {v: loader.count(v, params) for v in loader.present}
    if not any(rows.values()):
        first, last = min(s[0] for s in spans.values()), max(s[1] for s in spans.values())
        raise PlotError(
            f"no data for {product} between {utc_text(_from_us(lo))} and {utc_text(_from_us(hi))}: "
            f"its data spans {utc_text(_from_us(first))} to {utc_text(_from_us(last))}"
        )
    params["rows"] = rows
    width = max(1, (hi - lo) // QUOTE_POINTS + 1)
    data = PlotData(product, _from_us(lo), _from_us(hi), datasets, rows)
    data.quote_source, data.quotes = loader.quotes(params, width)
    if data.quote_source:
        data.spread = loader.spread_stats(data.quote_source, params)
    if rows.get(datasets.trades):
        data.trades = loader.trades(params, max(1, (hi - lo) // TRADE_POINTS + 1))
    if rows.get(datasets.bars):
        data.bar_seconds, data.bars = loader.bars(params)
    if rows.get(datasets.level2):
        data.invalid = loader.invalid(params)
    log.info(
        "plot_data_loaded",
        product=product,
        start=data.start.isoformat(),
        end=data.end.isoformat(),
        quotes=len(data.quotes.get("t", ())),
        trades=len(data.trades.get("t", ())),
        bars=len(data.bars.get("start", ())),
        invalid_intervals=len(data.invalid),
    )
    return data


def load_for(
    config: DaedalusConfig,
    product: str,
    start: str | datetime | None = None,
    end: str | datetime | None = None,
    *,
    processed: ProcessedRoot | None = None,
) -> PlotData:
    """Open the dataset of ``config`` (or ``processed``: a directory or an ``S3Location``) and load
    the plot's data (:class:`PlotError` on bad input, ``RemoteError`` when S3 cannot be read)."""
    first, last = parse_time(start, "--start"), parse_time(end, "--end", end=True)
    con = open_dataset(config, processed)
    try:
        return load(con, Datasets.of(config), product, first, last)
    finally:
        con.close()
