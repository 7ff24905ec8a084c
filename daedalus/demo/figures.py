"""The demo's summary, read back from what the processes left on disk (never from their memory).

- raw segments (``raw/archive`` once processed, ``ready``/``processing`` if the final ETL did
  not get to them): frames, bytes, and the control lines: ``gap`` (a sequence jump seen by
  ingest), ``disconnect`` (with its reason) and the ``connect`` that followed;
- the ETL checkpoint's running totals: book gaps, snapshots, crossed books, quarantined lines;
- the processed dataset through the query views: rows per dataset, and per book the
  ``gaps`` preset of ``daedalus query`` (time valid, snapshots, whether it ended valid), so the
  demo and the query agree by construction.

Each part is optional: after an interrupted run the summary shows what there is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

from daedalus.capture.records import RECORD_PREFIX
from daedalus.config import DaedalusConfig, interval_seconds
from daedalus.logs import get_logger

log = get_logger(__name__)

SOURCE = "coinbase"
_EVENT = b',"event":'
_HEAD = 64  # recv_ns (19 digits) and conn fit well within this: where a control line says so
_RECV_AT = len(RECORD_PREFIX)  # every line starts {"recv_ns":<digits>,


@dataclass
class RawFigures:
    segments: int = 0
    bytes: int = 0
    frames: int = 0
    first_ns: int | None = None  # receive time of the first and the last frame
    last_ns: int | None = None
    gaps: int = 0
    disconnects: list[str] = field(default_factory=list)  # reasons, shutdown excluded
    reconnect_seconds: list[float] = field(default_factory=list)  # disconnect -> next connect, same conn

    @property
    def seconds(self) -> float:
        """From the first frame received to the last: what the throughput is over."""
        return 0.0 if self.first_ns is None or self.last_ns is None else (self.last_ns - self.first_ns) / 1e9

    def count_frame(self, line: bytes) -> None:
        self.frames += 1
        end = line.find(b",", _RECV_AT, _HEAD)
        if end > 0 and line[_RECV_AT:end].isdigit():
            recv_ns = int(line[_RECV_AT:end])
            self.first_ns = recv_ns if self.first_ns is None else min(self.first_ns, recv_ns)
            self.last_ns = recv_ns if self.last_ns is None else max(self.last_ns, recv_ns)


@dataclass
class BookFigures:
    valid_share: dict[str, float] = field(default_factory=dict)  # product -> share of the time valid
    invalid_at_end: list[str] = field(default_factory=list)  # products whose last level2 frame left the book invalid
    resyncs: int = 0  # snapshots after each book's first: each ended an invalid period (or came with a reconnect)


@dataclass
class DemoFigures:
    raw: RawFigures
    totals: dict[str, int]  # the ETL checkpoint's running totals (empty if none)
    rows: dict[str, int]  # view -> rows
    books: BookFigures
    quarantined_files: int = 0

    def valid_percent(self) -> float | None:
        shares = list(self.books.valid_share.values())
        return 100.0 * sum(shares) / len(shares) if shares else None

    def lines(self) -> list[str]:
        raw, secs = self.raw, max(self.raw.seconds, 1e-9)
        rows = ", ".join(f"{k}={v:,}" for k, v in self.rows.items()) or "none (no processed data)"
        valid = self.valid_percent()
        per_product = ", ".join(f"{p} {100 * s:.2f}%" for p, s in self.books.valid_share.items())
        why = sorted(set(raw.disconnects)) + [f"reconnected after {s:.1f} s" for s in raw.reconnect_seconds]
        still_invalid = ", ".join(self.books.invalid_at_end) or "none"
        return [
            f"frames captured: {raw.frames:,} in {raw.seconds:.1f} s (first to last frame received)",
            f"segments: {raw.segments} ({raw.bytes / 1e6:.1f} MB of raw NDJSON)",
            f"rows: {rows}",
            f"gaps detected: {raw.gaps} sequence gaps seen by ingest (gap lines in raw), "
            f"{self.totals.get('gaps', 0)} book gaps counted by the ETL (each gap hits every book of the connection)",
            f"gaps resynced: {self.books.resyncs} fresh snapshots after the first of each book (after each "
            f"re-subscribe and reconnect); books still invalid at the end: {still_invalid}",
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
                    out.count_frame(line)
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


def dataset_figures(config: DaedalusConfig) -> tuple[dict[str, int], BookFigures]:
    """Rows per view and the books' validity (the ``gaps`` preset), on one DuckDB connection."""
    from daedalus.query.api import read_sql
    from daedalus.query.presets import preset_sql
    from daedalus.query.views import dataset_views, open_dataset, sql_identifier, sql_string

    books = BookFigures()
    con = open_dataset(config)
    try:
        views = dataset_views(con)
        count = "SELECT {} AS view, count(*) AS n FROM {}"
        counts = " UNION ALL ".join(count.format(sql_string(v), sql_identifier(v)) for v in views)
        counted = {r["view"]: r["n"] for r in read_sql(con, counts).to_pylist()} if views else {}
        rows = {name: counted[name] for name in views}
        if "level2" in views:
            for book in read_sql(con, preset_sql("gaps")).to_pylist():
                product = str(book["product_id"])
                if book["span_s"] > 0:
                    books.valid_share[product] = 1 - book["invalid_s"] / book["span_s"]
                if not book["valid_at_end"]:
                    books.invalid_at_end.append(product)
                books.resyncs += max(0, book["snapshots"] - 1)
    finally:
        con.close()
    return rows, books


def collect(config: DaedalusConfig) -> DemoFigures:
    """Everything the summary shows, from the demo's data directory."""
    rows, books = dataset_figures(config)
    quarantine = config.layout.quarantine(SOURCE)
    files = sum(1 for _ in quarantine.iterdir()) if quarantine.is_dir() else 0
    return DemoFigures(raw_figures(config), etl_totals(config), rows, books, files)
