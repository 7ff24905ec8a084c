"""The compiled book engine against a plain dict book, on random streams that stress it:
deep books, deletes at the touch, chunk splits and frees, growth of every array, gaps,
crossed books, samples, and a checkpoint round trip in the middle."""

from __future__ import annotations

import random

import numpy as np
import pytest

from daedalus.etl.book import CONNECT, FRAME, GAP, NO_PRICE, BookSet, FrameBatch

Event = tuple[str, bool, list[tuple[int, int, int]]]  # product, is_snapshot, [(side, price, size)]
Frame = tuple[int, int, int, int, int, list[Event]]  # kind, conn, seq, aux, ts, events


def make_batch(books: BookSet, frames: list[Frame]) -> FrameBatch:
    f_conn, f_kind, f_seq, f_aux, f_ts, f_rs, f_re = ([] for _ in range(7))
    r_prod, r_side, r_px, r_sz, r_snap = ([] for _ in range(5))
    for kind, conn, seq, aux, ts, events in frames:
        f_conn.append(books.conn_slot(conn))
        f_kind.append(kind)
        f_seq.append(seq)
        f_aux.append(aux)
        f_ts.append(ts)
        f_rs.append(len(r_prod))
        for product, snap, rows in events:
            for side, px, sz in rows:
                r_prod.append(books.product_slot(product))
                r_side.append(side)
                r_px.append(px)
                r_sz.append(sz)
                r_snap.append(snap)
        f_re.append(len(r_prod))
    i64 = np.int64
    return FrameBatch(
        np.array(f_conn, i64), np.array(f_kind, np.int8), np.array(f_seq, i64), np.array(f_aux, i64),
        np.array(f_ts, i64), np.array(f_rs, i64), np.array(f_re, i64), np.array(r_prod, i64),
        np.array(r_side, np.int8), np.array(r_px, i64), np.array(r_sz, i64), np.array(r_snap, bool),
    )  # fmt: skip


class DictBooks:
    """The obvious implementation: dicts and max/min over them."""

    def __init__(self) -> None:
        self.sides: dict[str, tuple[dict[int, int], dict[int, int]]] = {}
        self.valid: dict[str, bool] = {}
        self.conn_of: dict[str, int] = {}
        self.last_seq: dict[int, int] = {}

    def invalidate(self, conn: int) -> None:
        for p, c in self.conn_of.items():
            if c == conn:
                self.valid[p] = False

    def frame(self, kind: int, conn: int, seq: int, aux: int, events: list[Event]) -> list[tuple]:
        if kind == CONNECT:
            self.last_seq.pop(conn, None)
            self.invalidate(conn)
            return []
        if kind == GAP:
            self.invalidate(conn)
            self.last_seq[conn] = max(self.last_seq.get(conn, -1), aux - 1)
            return []
        if seq >= 0:
            if conn in self.last_seq and seq != self.last_seq[conn] + 1:
                self.invalidate(conn)
            self.last_seq[conn] = seq
        kept = []
        for product, snap, rows in events:
            if snap:
                self.sides[product] = ({}, {})
                self.valid[product] = True
            self.conn_of[product] = conn
            if product not in self.sides:
                kept.append([False] * len(rows))
                continue
            for side, px, sz in rows:
                levels = self.sides[product][side]
                if sz:
                    levels[px] = sz
                else:
                    levels.pop(px, None)
            kept.append([True] * len(rows))
        out = []
        for (product, _, rows), keep in zip(events, kept, strict=True):
            bids, asks = self.sides.get(product, ({}, {}))
            bb = max(bids) if bids else NO_PRICE
            ba = min(asks) if asks else NO_PRICE
            crossed = bool(bids) and bool(asks) and bb >= ba
            ok = self.valid.get(product, False) and not crossed
            out += [(bb, ba, ok, k) for k in keep[: len(rows)]]
        return out


def random_frames(rng: random.Random, n: int, products: list[str], levels: int) -> list[Frame]:
    """A market per product around a drifting mid; deep updates, touch deletes, crossings, gaps."""
    mids = {p: 1_000_000 + 5_000 * i for i, p in enumerate(products)}
    known: dict[tuple[str, int], list[int]] = {}  # prices we set, so deletes hit real levels anywhere
    frames: list[Frame] = []
    seq = {1: 0, 2: 0}
    ts = 1_000_000_000
    for i in range(n):
        ts += rng.randint(1, 3_000_000)
        conn = 1 if i % 7 else 2
        product = products[(i // 3) % len(products)]
        mid = mids[product] = mids[product] + rng.randint(-3, 3)
        r = rng.random()
        if r < 0.01:
            frames.append((CONNECT, conn, -1, 0, ts, []))
            seq[conn] = 0
            continue
        if r < 0.02:
            seq[conn] += rng.randint(1, 3)  # frames lost: the next frame jumps
        elif r < 0.025:
            frames.append((GAP, conn, -1, seq[conn] + 2, ts, []))
        if r > 0.985 or i < 4:
            depth = rng.randint(1, levels)
            rows = [(0, mid - 1 - rng.randint(0, 5 * depth), rng.randint(0, 10**8)) for _ in range(depth)]
            rows += [(1, mid + 1 + rng.randint(0, 5 * depth), rng.randint(0, 10**8)) for _ in range(depth)]
            known[(product, 0)] = [px for side, px, _ in rows if side == 0]
            known[(product, 1)] = [px for side, px, _ in rows if side == 1]
            events: list[Event] = [(product, True, rows)]
        else:
            rows = []
            for _ in range(rng.choice((1, 1, 2, 3, 10))):
                side = rng.randint(0, 1)
                far = rng.random() < 0.3
                off = rng.randint(0, 5 * levels) if far else rng.randint(0, 4)
                if rng.random() < 0.01:
                    off = -rng.randint(1, 20)  # crosses the book
                px = mid - 1 - off if side == 0 else mid + 1 + off
                pool = known.setdefault((product, side), [])
                if pool and rng.random() < 0.4:  # delete a level we set, wherever it is
                    rows.append((side, pool.pop(rng.randrange(len(pool))), 0))
                    continue
                size = 0 if rng.random() < 0.1 else rng.randint(1, 10**8)
                rows.append((side, px, size))
                if size:
                    pool.append(px)
            events = [(product, False, rows)]
            if rng.random() < 0.05:
                other = products[(products.index(product) + 1) % len(products)]
                events.append((other, False, [(0, mids[other] - 1, 5)]))
        frames.append((FRAME, conn, seq[conn], 0, ts, events))
        seq[conn] += 1
    return frames


def check_equal(books: BookSet, reference: DictBooks, frames: list[Frame]) -> None:
    res, _ = books.apply(make_batch(books, frames))
    expected = []
    for kind, conn, seq, aux, _, events in frames:
        expected += reference.frame(kind, conn, seq, aux, events)
    got = list(zip(res.best_bid.tolist(), res.best_ask.tolist(), res.valid.tolist(), res.keep.tolist(), strict=True))
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if e[3]:
            assert g == e, f"row {i}: engine {g} != reference {e}"
        else:
            assert not g[3], f"row {i}: an update before the first snapshot was kept"
    for product in reference.sides:
        for side in (0, 1):
            prices, sizes = books.levels(product, side)
            levels = reference.sides[product][side]
            want = sorted(levels.items(), reverse=(side == 0))
            assert list(zip(prices.tolist(), sizes.tolist(), strict=True)) == want


@pytest.mark.parametrize(("levels", "chunk"), [(12_000, 64), (150, 4)])  # grow every array; split and free often
def test_engine_matches_dict_books_and_survives_a_checkpoint(levels: int, chunk: int) -> None:
    rng = random.Random(levels)
    products = ["BTC-USD", "ETH-USD", "SOL-USD", "DOGE-USD", "XRP-USD"]  # more than the initial capacity
    books = BookSet(chunks=64, chunk_size=chunk)
    reference = DictBooks()
    frames = random_frames(rng, 6000, products, levels=levels)
    check_equal(books, reference, frames[:3000])
    restored = BookSet.from_arrays(list(books.products), books.to_arrays(), 0, 10, chunk)
    check_equal(restored, reference, frames[3000:])
    if levels > 10_000:
        assert books.ck.shape[0] > 64 and restored.ck.shape[0] > 64, "the chunk pool never grew"
        assert books.order.shape[1] > 256, "the chunk order never grew"
    counters = [restored.counters(p) for p in products]
    assert sum(c["gaps"] for c in counters) > 0
    assert sum(c["crossed"] for c in counters) > 0
    assert sum(c["snapshots"] for c in counters) > 5


def test_samples_are_the_book_as_of_each_grid_time() -> None:
    books = BookSet(interval_ns=1_000, depth=3)
    frames: list[Frame] = [
        (FRAME, 1, 0, 0, 1_500, [("A", True, [(0, 100, 1), (0, 99, 2), (1, 101, 3)])]),
        (FRAME, 1, 1, 0, 2_100, [("A", False, [(0, 100, 0)])]),  # samples t=2000 before this frame
        (FRAME, 1, 2, 0, 5_000, [("A", False, [(1, 102, 4)])]),  # samples t=3000 only: 4000 and 5000 hold the same book
    ]
    _, samples = books.apply(make_batch(books, frames))
    assert samples.ts.tolist() == [2_000, 3_000]
    assert samples.bid_px[0].tolist() == [100, 99, 0] and samples.bid_sz[0].tolist() == [1, 2, 0]
    assert samples.bid_px[1].tolist() == [99, 0, 0]
    assert samples.ask_px[1].tolist() == [101, 0, 0] and samples.ask_sz[1].tolist() == [3, 0, 0]
    assert samples.valid.all()
