"""The demo's summary, read back from what the processes left on disk (never from their memory).

- raw segments (``raw/archive`` once processed, ``ready``/``processing`` if the final ETL did
  not get to them): frames, bytes, and the control lines: ``gap`` (a sequence jump seen by
  ingest), ``disconnect`` (with its reason) and the ``connect`` that followed;
- the ETL checkpoint's running totals: book gaps, snapshots, crossed books, quarantined lines;
- the processed dataset through the query views: rows per dataset, how long each book was
  valid, how many times an invalid book became valid again (a resync).

Each part is optional: after an interrupted run the summary shows what there is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from daedalus.config import DaedalusConfig, interval_seconds
from daedalus.logs import get_logger

log = get_logger(__name__)

SOURCE = "coinbase"
_EVENT = b',"event":'
_HEAD = 64  # recv_ns (19 digits) and conn fit well within this: where a control line says so


@dataclass
class RawFigures:
    segments: int = 0
    bytes: int = 0
    frames: int = 0
    gaps: int = 0
    disconnects: list[str] = field(default_factory=list)  # reasons, shutdown excluded
    reconnect_seconds: list[float] = field(default_factory=list)  # disconnect -> next connect, same conn


@dataclass
class BookFigures:
    valid_share: dict[str, float] = field(default_factory=dict)  # product -> share of the time valid
    invalid_at_end: list[str] = field(default_factory=list)  # products whose last level2 frame left the book invalid


@dataclass
class DemoFigures:
    capture_seconds: float
    raw: RawFigures
    totals: dict[str, int]  # the ETL checkpoint's running totals (empty if none)
    rows: dict[str, int]  # view -> rows
    books: BookFigures
    quarantined_files: int = 0

    def valid_percent(self) -> float | None:
        shares = list(self.books.valid_share.values())
        return 100.0 * sum(shares) / len(shares) if shares else None

    def resyncs(self) -> int:
        """Snapshots beyond each book's first: every one ended an invalid period (or came with a reconnect)."""
        return max(0, self.totals.get("snapshots", 0) - len(self.books.valid_share))

    def lines(self) -> list[str]:
        raw, secs = self.raw, max(self.capture_seconds, 1e-9)
        rows = ", ".join(f"{k}={v:,}" for k, v in self.rows.items()) or "none (no processed data)"
        valid = self.valid_percent()
        per_product = ", ".join(f"{p} {100 * s:.2f}%" for p, s in self.books.valid_share.items())
        why = sorted(set(raw.disconnects)) + [f"reconnected after {s:.1f} s" for s in raw.reconnect_seconds]
        return [
            f"frames captured: {raw.frames:,} in {self.capture_seconds:.1f} s",
            f"segments: {raw.segments} ({raw.bytes / 1e6:.1f} MB of raw NDJSON)",
            f"rows: {rows}",
            f"gaps detected: {raw.gaps} sequence gaps seen by ingest (gap lines in raw), "
            f"{self.totals.get('gaps', 0)} book gaps counted by the ETL (each gap hits every book of the connection)",
            f"gaps resynced: {self.resyncs()} fresh snapshots after the first of each book (after each re-subscribe "
            f"and reconnect); books still invalid at the end: {', '.join(self.books.invalid_at_end) or 'none'}",
            f"disconnects: {len(raw.disconnects)}" + (f" ({'; '.join(why)})" if why else ""),
            "books valid: " + (f"{valid:.2f}% of the time ({per_product})" if valid is not None else "n/a (no level2)"),
            f"crossed books: {self.totals.get('crossed', 0)}, files in quarantine: {self.quarantined_files}",
            f"throughput: {raw.frames / secs:,.1f} frames/s, {raw.bytes / 1e6 / secs:.2f} MB/s",
        ]


def raw_figures(config: DaedalusConfig) -> RawFigures:
    """Scan every raw NDJSON segment of the demo; only control lines are parsed."""
    layout, out = config.layout, RawFigures()
    files = [p for d in (layout.archive(SOURCE), layout.processing(SOURCE), layout.ready(SOURCE), layout.active(SOURCE))
             if d.is_dir() for p in d.iterdir() if p.name.startswith("segment_") and p.suffix == ".ndjson"]  # fmt: skip
    pending: dict[int, int] = {}  # conn -> recv_ns of its last unexplained disconnect
    for path in sorted(files, key=lambda p: p.name):
        out.segments += 1
        out.bytes += path.stat().st_size
        with open(path, "rb") as handle:
            for line in handle:
                if _EVENT not in line[:_HEAD]:
                    out.frames += 1
                    continue
                try:
                    record = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                _control(record, out, pending)
    return out


def _control(record: dict[str, object], out: RawFigures, pending: dict[int, int]) -> None:
    event, conn, recv_ns = record.get("event"), record.get("conn"), record.get("recv_ns")
    if not isinstance(conn, int) or not isinstance(recv_ns, int):
        return
    if event == "gap":
        out.gaps += 1
    elif event == "disconnect" and record.get("reason") != "shutdown":
        out.disconnects.append(str(record.get("reason")))
        pending[conn] = recv_ns
    elif event == "connect" and conn in pending:
        out.reconnect_seconds.append((recv_ns - pending.pop(conn)) / 1e9)


def etl_totals(config: DaedalusConfig) -> dict[str, int]:
    """The checkpoint's totals over every segment the ETL committed (empty before the first)."""
    from daedalus.etl.state import EtlStateError, load_state

    channels = config.etl.channels
    try:
        state = load_state(config.processed_dir / "_state", SOURCE, channels.book_snapshot.snapshot_interval_ms
                           * 1_000_000, channels.book_snapshot.levels, interval_seconds(channels.bars.interval)
                           * 1_000_000_000)  # fmt: skip
    except EtlStateError as exc:
        log.warning("demo_checkpoint_unreadable", error=str(exc))
        return {}
    return dict(state.totals)


# Per product, each level2 frame (one ts_recv) lasts until the next one; valid share = time in
# valid frames / time covered; and whether the last frame left the book valid.
_BOOKS_SQL = """
WITH frames AS (
    SELECT product_id, ts_recv_ns AS t, bool_and(book_valid) AS valid
    FROM level2 GROUP BY product_id, ts_recv_ns
), spans AS (
    SELECT product_id, t, valid, lead(t) OVER (PARTITION BY product_id ORDER BY t) - t AS span FROM frames
)
SELECT product_id, sum(span) FILTER (WHERE valid) / nullif(sum(span), 0), arg_max(valid, t)
FROM spans GROUP BY product_id ORDER BY product_id
"""


def dataset_figures(config: DaedalusConfig) -> tuple[dict[str, int], BookFigures]:
    """Rows per view and the books' validity, through the query views (one DuckDB connection)."""
    from daedalus.query.views import dataset_views, open_dataset, sql_identifier

    books = BookFigures()
    con = open_dataset(config)
    try:
        views = dataset_views(con)
        rows = {name: int(con.execute(f"SELECT count(*) FROM {sql_identifier(name)}").fetchone()[0])  # type: ignore[index]
                for name in views}  # fmt: skip
        if "level2" in views:
            for product, share, last_valid in con.execute(_BOOKS_SQL).fetchall():
                if share is not None:
                    books.valid_share[str(product)] = float(share)
                if not last_valid:
                    books.invalid_at_end.append(str(product))
    finally:
        con.close()
    return rows, books


def collect(config: DaedalusConfig, capture_seconds: float) -> DemoFigures:
    rows, books = dataset_figures(config)
    quarantine = config.layout.quarantine(SOURCE)
    files = sum(1 for _ in quarantine.iterdir()) if quarantine.is_dir() else 0
    return DemoFigures(capture_seconds, raw_figures(config), etl_totals(config), rows, books, files)
