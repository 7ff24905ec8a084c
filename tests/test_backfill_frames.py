"""The backfill's per-product book input (:mod:`daedalus.backfill.intermediate`): replaying
one product's compact stream gives exactly what the full stream gives that product, on
random streams with gaps, sequence jumps, reconnects, lost frames and several connections."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from daedalus.backfill.intermediate import TS, IntermediateWriter, read_product
from daedalus.etl.book import CONNECT, DISCONNECT, FRAME, GAP, LOST, OTHER, BookSet, FrameBatch
from daedalus.etl.coinbase import ParsedBatch

PRODUCTS = ["AAA-USD", "BBB-USD", "CCC-USD"]
CONNS = [101, 102]
INTERVAL = 1_000


def random_batches(rng: random.Random, batches: int, frames: int) -> list[ParsedBatch]:
    seq = dict.fromkeys(CONNS, 0)
    t = 10_000
    out = []
    for _ in range(batches):
        conn_of, kind, seqs, aux, ts, rs, re_ = [], [], [], [], [], [], []
        r_prod, r_side, r_px, r_sz, r_snap = [], [], [], [], []
        for _ in range(frames):
            conn = rng.choice(CONNS)
            t += rng.randint(0, 400)
            roll = rng.random()
            rs.append(len(r_prod))
            if roll < 0.03:
                kinds = (GAP, CONNECT, DISCONNECT, LOST, OTHER)
                k = rng.choice(kinds)
                if k == CONNECT:
                    seq[conn] = 0
                conn_of.append(conn), kind.append(k), aux.append(seq[conn] + rng.randint(0, 3))
                seqs.append(seq[conn] if k == LOST else -1)
            else:
                conn_of.append(conn), kind.append(FRAME), aux.append(0)
                if rng.random() < 0.05:
                    seq[conn] += rng.randint(2, 5)  # frames lost upstream: a gap
                seqs.append(-1 if rng.random() < 0.05 else seq[conn])
                for product in rng.sample(range(len(PRODUCTS)), rng.randint(0, 2)):
                    snap = rng.random() < 0.08
                    for _ in range(rng.randint(2 if snap else 1, 6)):
                        side = rng.randint(0, 1)
                        mid = 1000 + product * 100
                        r_prod.append(product), r_side.append(side), r_snap.append(snap)
                        r_px.append(mid - rng.randint(1, 20) if side == 0 else mid + rng.randint(0, 20))
                        r_sz.append(0 if not snap and rng.random() < 0.2 else rng.randint(1, 9))
            seq[conn] += 1
            ts.append(t)
            re_.append(len(r_prod))
        i64 = lambda values: np.array(values, np.int64)  # noqa: E731
        frames_batch = FrameBatch(i64(conn_of), np.array(kind, np.int8), i64(seqs), i64(aux), i64(ts), i64(rs),
                                  i64(re_), i64(r_prod), np.array(r_side, np.int8), i64(r_px), i64(r_sz),
                                  np.array(r_snap, np.bool_))  # fmt: skip
        frame_of_row = np.repeat(np.arange(len(ts)), np.array(re_) - np.array(rs))
        row_ts = i64(ts)[frame_of_row]
        l2 = {"ts_event": pa.array(row_ts, pa.int64()).cast(TS), "ts_recv": row_ts, "seq": i64(seqs)[frame_of_row]}
        out.append(ParsedBatch(frames_batch, list(PRODUCTS), l2, pa.table({}), pa.table({}), pa.table({})))
    return out


@pytest.mark.parametrize("seed", range(30))
def test_one_products_compact_stream_replays_exactly_like_the_full_stream(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    batches = random_batches(rng, batches=4, frames=300)
    full = BookSet(INTERVAL, 5, chunk_size=8)
    expected = []
    for parsed in batches:
        bound = full.bind(parsed.frames, parsed.products)
        result, samples = full.apply(bound)
        expected.append((bound, result, samples))
    writer = IntermediateWriter(tmp_path)
    for parsed in batches:
        writer.add(parsed)
    writer.close()
    compacted = 0
    for product in PRODUCTS:
        alone = BookSet(INTERVAL, 5, chunk_size=8)
        replayed = list(read_product(tmp_path, len(batches), product, writer.products, writer.trade_products))
        for parsed, (bound, result, samples) in zip(replayed, expected, strict=True):
            mine = np.flatnonzero(bound.r_prod == full.product_index[product])
            frames = alone.bind(parsed.frames, parsed.products)
            got, got_samples = alone.apply(frames)
            compacted += bound.f_conn.shape[0] - frames.f_conn.shape[0]
            for name in ("best_bid", "best_ask", "valid", "keep"):
                assert np.array_equal(getattr(got, name), getattr(result, name)[mine]), (product, name)
            theirs = samples.product == full.product_index[product]
            assert np.array_equal(got_samples.ts, samples.ts[theirs])
            assert np.array_equal(got_samples.valid, samples.valid[theirs])
            assert np.array_equal(got_samples.bid_px, samples.bid_px[theirs])
        assert alone.counters(product) == full.counters(product)
        for side in (0, 1):
            assert all(np.array_equal(a, b) for a, b in zip(alone.levels(product, side), full.levels(product, side),
                                                            strict=True))  # fmt: skip
        for conn, slot in full.conns.items():  # every connection's position, whatever the product
            if conn in alone.conns:
                assert alone.last_seq[alone.conns[conn]] == full.last_seq[slot]
    assert compacted > 0  # the streams were shorter than the whole


def test_a_frame_interleaving_one_products_snapshots_is_refused(tmp_path: Path) -> None:
    """P snapshot, Q snapshot, P snapshot in one frame: folded into P's stream the two would
    be one book; the backfill stops on it rather than rebuild a different book."""
    from daedalus.backfill.intermediate import NotSplittable

    i64 = lambda values: np.array(values, np.int64)  # noqa: E731
    rows = [(0, 0, 100), (1, 0, 200), (0, 0, 101)]  # (product, side, price), all snapshot rows of frame 0
    frames = FrameBatch(i64([101]), np.array([FRAME], np.int8), i64([0]), i64([0]), i64([1000]), i64([0]), i64([3]),
                        i64([r[0] for r in rows]), np.array([r[1] for r in rows], np.int8), i64([r[2] for r in rows]),
                        i64([1, 1, 1]), np.ones(3, np.bool_))  # fmt: skip
    l2 = {"ts_event": pa.array([1000] * 3, pa.int64()).cast(TS), "ts_recv": i64([1000] * 3), "seq": i64([0] * 3)}
    parsed = ParsedBatch(frames, ["AAA-USD", "BBB-USD"], l2, pa.table({}), pa.table({}), pa.table({}))
    with pytest.raises(NotSplittable, match="AAA-USD"):
        IntermediateWriter(tmp_path).add(parsed)


def test_a_products_bars_do_not_depend_on_another_products_trade_ids() -> None:
    """Trades at the same time are ordered by their numeric trade ids, per product: another
    product's id that is not a number must not switch this one to arrival order (the backfill
    builds each product's bars alone)."""
    from daedalus.etl.processors import BarBuilder

    def trades(rows: list[tuple[str, str, int]]) -> pa.Table:
        return pa.table({"product_id": [r[0] for r in rows], "trade_id": [r[1] for r in rows],
                         "ts_event": pa.array([5_000_000_000] * len(rows), pa.int64()).cast(TS),
                         "ts_recv": pa.array([5_000_000_001] * len(rows), pa.int64()).cast(TS),
                         "price": [r[2] for r in rows], "size": [1] * len(rows)})  # fmt: skip

    def bar(table: pa.Table) -> tuple[int, int]:
        builder = BarBuilder(1_000_000_000)
        done = dict(builder.add(table, 10**12))
        return done["AAA-USD"].open, done["AAA-USD"].close

    alone = bar(trades([("AAA-USD", "2", 200), ("AAA-USD", "1", 100)]))
    assert alone == (100, 200)  # by trade id, not arrival
    assert bar(trades([("AAA-USD", "2", 200), ("AAA-USD", "1", 100), ("BBB-USD", "x", 7)])) == alone
