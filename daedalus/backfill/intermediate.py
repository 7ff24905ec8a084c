"""The compact columnar book input of one segment, per product: what the parse phase hands
the book phase (see :mod:`daedalus.backfill`).

A product's chain needs, of every batch of every segment, the frames that carry its level2
rows, the control lines (connect, disconnect, gap, lost frames) and the sequence numbers of
every other frame, which decide the connection's gaps. :func:`compact_frames` folds each run
of frames of one connection with consecutive sequence numbers and none of the product's rows
into one :data:`~daedalus.etl.book.SEQ_RUN` frame, which the engine applies exactly as it
would the run, so a chain reads about its own frames, not everyone's. A batch ends with one
frame of kind ``OTHER`` (no effect on books) stamped with the batch's latest receive time:
bars close on that clock, as in the sequential run.

Per segment directory: ``p<k>-frames.arrow`` / ``p<k>-rows.arrow`` (product ``k``'s batches,
only those where it has rows), ``none-frames.arrow`` (every batch, no product's rows: what
a chain uses for a batch without its rows) and ``t<k>-trades.arrow`` (its trades). Arrow IPC
files with a ``batch`` column; ``k`` indexes the segment's ``products`` list.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numba import njit

from daedalus.etl.book import CONNECT, DISCONNECT, FRAME, GAP, LOST, OTHER, SEQ_RUN, FrameBatch
from daedalus.etl.coinbase import ParsedBatch

TS = pa.timestamp("ns", tz="UTC")
FRAMES = pa.schema([("batch", pa.int32()), ("conn", pa.int64()), ("kind", pa.int8()), ("seq", pa.int64()),
                    ("aux", pa.int64()), ("ts", pa.int64())])  # fmt: skip
ROWS = pa.schema([("batch", pa.int32()), ("frame", pa.int64()), ("side", pa.int8()), ("px", pa.int64()),
                  ("sz", pa.int64()), ("snap", pa.bool_()), ("ts_recv", pa.int64()), ("ts_event", TS),
                  ("seq", pa.int64())])  # fmt: skip


@njit(cache=True)
def compact_frames(conn: np.ndarray, kind: np.ndarray, seq: np.ndarray, has_rows: np.ndarray) -> tuple:
    """The frames a chain needs: ``(index of the frame kept, kind, first sequence of a run)``.
    ``conn`` holds small connection indices (0..n-1)."""
    n = conn.shape[0]
    out_frame = np.empty(n, np.int64)
    out_kind = np.empty(n, np.int8)
    out_first = np.empty(n, np.int64)
    out_last = np.empty(n, np.int64)
    open_run = np.full(conn.max() + 1 if n else 1, -1, np.int64)
    m = 0
    for f in range(n):
        c = conn[f]
        k = kind[f]
        if k == FRAME and not has_rows[f]:
            s = seq[f]
            if s < 0:
                continue  # no sequence, no rows: nothing for the books
            r = open_run[c]
            if r >= 0 and s == out_last[r] + 1:
                out_last[r] = s
                continue
            out_frame[m], out_kind[m], out_first[m], out_last[m] = f, SEQ_RUN, s, s
            open_run[c] = m
            m += 1
            continue
        if k != FRAME and k != GAP and k != CONNECT and k != DISCONNECT and k != LOST:
            continue  # OTHER: no effect on books
        open_run[c] = -1  # anything else of this connection ends its run
        out_frame[m], out_kind[m], out_first[m], out_last[m] = f, k, -1, seq[f]
        m += 1
    return out_frame[:m], out_kind[:m], out_first[:m], out_last[:m]


class IntermediateWriter:
    """Writes one segment's per-product book input while the parse phase reads it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.products: list[str] = []  # level2 products with rows (their streams: p<k>-*.arrow)
        self.book_products: list[str] = []  # every level2 product, in the order the books allocate them
        self.trade_products: list[str] = []
        self.conns: list[int] = []  # connection ids, in the order the books allocate them
        self.clocks: list[int] = []
        self._writers: dict[str, pa.ipc.RecordBatchFileWriter] = {}

    def _write(self, name: str, schema: pa.Schema, table: pa.Table) -> None:
        writer = self._writers.get(name)
        if writer is None:
            writer = self._writers[name] = pa.ipc.new_file(self.folder / name, schema)
        writer.write_table(table)

    def add(self, parsed: ParsedBatch) -> None:
        batch = len(self.clocks)
        f = parsed.frames
        self.clocks.append(int(f.f_ts.max()) if f.f_ts.shape[0] else 0)
        distinct, conn_index = np.unique(f.f_conn, return_inverse=True)
        self.conns += [c for c in distinct.tolist() if c not in self.conns]
        conn_index = conn_index.reshape(-1).astype(np.int64)
        frame_of_row = np.repeat(np.arange(f.f_conn.shape[0]), f.f_re - f.f_rs)
        none = np.zeros(f.f_conn.shape[0], np.bool_)
        self._write("none-frames.arrow", FRAMES, self._frames(batch, f, conn_index, none, None))
        self.book_products += [p for p in parsed.products if p not in self.book_products]
        for local, product in enumerate(parsed.products):
            rows = np.flatnonzero(f.r_prod == local)
            if rows.shape[0] == 0:
                continue
            if product not in self.products:
                self.products.append(product)
            k = self.products.index(product)
            _check_contiguous(product, rows, frame_of_row, f.r_snap)
            has = np.zeros(f.f_conn.shape[0], np.bool_)
            has[frame_of_row[rows]] = True
            position = np.full(f.f_conn.shape[0], -1, np.int64)
            frames = self._frames(batch, f, conn_index, has, position)
            self._write(f"p{k}-frames.arrow", FRAMES, frames)
            self._write(f"p{k}-rows.arrow", ROWS, pa.table({
                "batch": pa.array(np.full(rows.shape[0], batch, np.int32)),
                "frame": position[frame_of_row[rows]],
                "side": f.r_side[rows], "px": f.r_px[rows], "sz": f.r_sz[rows], "snap": f.r_snap[rows],
                "ts_recv": np.asarray(parsed.l2["ts_recv"])[rows],
                "ts_event": pc.take(parsed.l2["ts_event"], pa.array(rows)).cast(TS),
                "seq": np.asarray(parsed.l2["seq"])[rows],
            }, schema=ROWS))  # fmt: skip
        self._add_trades(batch, parsed.trades)

    def _frames(self, batch: int, f: FrameBatch, conn_index: np.ndarray, has: np.ndarray,
                position: np.ndarray | None) -> pa.Table:  # fmt: skip
        kept, kind, first, last = compact_frames(conn_index, f.f_kind.astype(np.int8), f.f_seq, has)
        if position is not None:
            position[kept] = np.arange(kept.shape[0])
        aux = np.where(kind == SEQ_RUN, first, f.f_aux[kept])
        n = kept.shape[0] + 1  # + the batch's clock
        return pa.table({
            "batch": pa.array(np.full(n, batch, np.int32)),
            "conn": np.r_[f.f_conn[kept], f.f_conn[0] if f.f_conn.shape[0] else 0],
            "kind": np.r_[kind, np.int8(OTHER)].astype(np.int8),
            "seq": np.r_[last, -1], "aux": np.r_[aux, 0],
            "ts": np.r_[f.f_ts[kept], self.clocks[batch]],
        }, schema=FRAMES)  # fmt: skip

    def _add_trades(self, batch: int, trades: pa.Table) -> None:
        if trades.num_rows == 0:
            return
        encoded = pc.dictionary_encode(trades.column("product_id").combine_chunks())
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        for code, product in enumerate(encoded.dictionary.to_pylist()):
            if product not in self.trade_products:
                self.trade_products.append(product)
            k = self.trade_products.index(product)
            part = trades.filter(pa.array(codes == code))
            part = part.append_column("batch", pa.array(np.full(part.num_rows, batch, np.int32)))
            self._write(f"t{k}-trades.arrow", part.schema, part)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


class NotSplittable(ValueError):
    """A frame the per-product input cannot represent exactly."""


def _check_contiguous(product: str, rows: np.ndarray, frame_of_row: np.ndarray, snap: np.ndarray) -> None:
    """A product's rows in one frame come as one run, unless the frame interleaves its events
    with another product's (P, Q, P). For updates that is the same once folded together; for
    snapshots it is not (the second snapshot replaces the first; together they would be one
    book), so such a frame stops the backfill rather than change a book. Coinbase sends one
    event per product and frame."""
    split = np.flatnonzero((np.diff(rows) != 1) & (np.diff(frame_of_row[rows]) == 0))
    if split.shape[0] and snap[rows].any():
        frames = np.unique(frame_of_row[rows[split]])
        if snap[rows][np.isin(frame_of_row[rows], frames)].any():
            raise NotSplittable(f"a frame interleaves snapshot events of {product} with another product's: "
                                "run the sequential ETL (daedalus etl without --dask) over this segment")  # fmt: skip


def read_product(folder: Path, batches: int, product: str, products: list[str],
                 trade_products: list[str]) -> Iterator[ParsedBatch]:  # fmt: skip
    """Product ``product``'s batches of one segment, as parsed batches of that product alone
    (the clock frame included), for :class:`~daedalus.etl.coinbase_run.SegmentRun`."""
    none = _by_batch(_read(folder / "none-frames.arrow"), batches)
    mine: list[pa.Table | None] = [None] * batches
    rows: list[pa.Table | None] = [None] * batches
    trades: list[pa.Table | None] = [None] * batches
    if product in products:
        k = products.index(product)
        mine = _by_batch(_read(folder / f"p{k}-frames.arrow"), batches)
        rows = _by_batch(_read(folder / f"p{k}-rows.arrow"), batches)
    if product in trade_products:
        k = trade_products.index(product)
        trades = _by_batch(_read(folder / f"t{k}-trades.arrow"), batches)
    for b in range(batches):
        has_rows = rows[b] is not None
        frames_table = mine[b] if has_rows else none[b]
        assert frames_table is not None
        yield _parsed(frames_table, rows[b], trades[b], [product] if has_rows else [])


def _read(path: Path) -> pa.Table:
    """A whole stream file, memory-mapped: its batches are slices of the page cache, not
    copies, so a chain's memory does not grow with the segment's size."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def _by_batch(table: pa.Table, batches: int) -> list[pa.Table | None]:
    out: list[pa.Table | None] = [None] * batches
    index = table.column("batch").to_numpy()
    bounds = np.flatnonzero(np.diff(index)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, index.shape[0]], strict=True):
        if hi > lo:
            out[int(index[lo])] = table.slice(int(lo), int(hi - lo))
    return out


def _column(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()


def _parsed(frames: pa.Table, rows: pa.Table | None, trades: pa.Table | None, products: list[str]) -> ParsedBatch:
    n_frames = frames.num_rows
    if rows is None:
        frame_of_row = np.zeros(0, np.int64)
        side = px = sz = seq = ts_recv = np.zeros(0, np.int64)
        snap = np.zeros(0, np.bool_)
        ts_event = pa.array([], TS)
    else:
        frame_of_row = _column(rows, "frame")
        side, px, sz = _column(rows, "side"), _column(rows, "px"), _column(rows, "sz")
        snap = rows.column("snap").to_numpy(zero_copy_only=False)
        ts_recv, seq = _column(rows, "ts_recv"), _column(rows, "seq")
        ts_event = rows.column("ts_event").combine_chunks()
    frame_index = np.arange(n_frames)
    batch = FrameBatch(
        f_conn=_column(frames, "conn"), f_kind=_column(frames, "kind"), f_seq=_column(frames, "seq"),
        f_aux=_column(frames, "aux"), f_ts=_column(frames, "ts"),
        f_rs=np.searchsorted(frame_of_row, frame_index, "left").astype(np.int64),
        f_re=np.searchsorted(frame_of_row, frame_index, "right").astype(np.int64),
        r_prod=np.zeros(frame_of_row.shape[0], np.int64), r_side=side.astype(np.int8), r_px=px, r_sz=sz,
        r_snap=snap,
    )  # fmt: skip
    trade_table = pa.table({}) if trades is None else trades.drop_columns(["batch"])
    return ParsedBatch(batch, products, {"ts_event": ts_event, "ts_recv": ts_recv, "seq": seq}, trade_table,
                       pa.table({}), pa.table({}))  # fmt: skip
