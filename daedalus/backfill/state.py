"""The ETL checkpoint cut into one state per product chain, and the chains' states put back
together into the checkpoint the sequential ETL would have written.

Every piece of the checkpoint belongs to one product (its book, its recent trade ids, its
open bars), except the connections' sequence positions, which every chain tracks alike (each
sees every connection's sequence numbers, see :mod:`daedalus.backfill.intermediate`), and
the totals, which are sums. Books keep their products in the order the sequential run
allocates them (first appearance), so the merged checkpoint lists them in that order too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from daedalus.etl.book import N_COUNTERS, BookSet
from daedalus.etl.processors import TRADE_MEMORY, BarBuilder, TradeDeduper
from daedalus.etl.state import EtlState

_PER_PRODUCT = ("valid", "has_book", "next_sample", "last_sample", "pcount")


def product_state(state: EtlState, product: str, sample_ns: int, depth: int, bar_ns: int,
                  whole: dict[str, np.ndarray] | None = None) -> EtlState:  # fmt: skip
    """What a chain of ``product`` starts from: its part of ``state`` (and every connection).
    ``whole``: ``state.books.to_arrays()``, when the caller cuts many products from one state."""
    books = BookSet(sample_ns, depth)
    if product in state.books.product_index:
        whole = state.books.to_arrays() if whole is None else whole
        i = state.books.product_index[product]
        arrays = {name: whole[name][i : i + 1] for name in _PER_PRODUCT}
        arrays.update(book_conn=whole["book_conn"][i : i + 1], conn_ids=whole["conn_ids"],
                      last_seq=whole["last_seq"])  # fmt: skip
        for side in (0, 1):
            arrays[f"keys_0_{side}"] = whole[f"keys_{i}_{side}"]
            arrays[f"sizes_0_{side}"] = whole[f"sizes_{i}_{side}"]
        books = BookSet.from_arrays([product], arrays, sample_ns, depth)
    else:  # no book yet: only the connections' positions
        for conn in state.books.conns:
            books.conn_slot(conn)
        books.last_seq[: len(books.conns)] = state.books.last_seq[: len(books.conns)]
    trades = TradeDeduper()
    if product in state.trades.seen:
        trades.seen[product] = deque(state.trades.seen[product], maxlen=TRADE_MEMORY)
    bars = BarBuilder(bar_ns)
    bars.open_bars = {key: bar for key, bar in state.bars.open_bars.items() if key[0] == product}
    if product in state.bars.written_until:
        bars.written_until[product] = state.bars.written_until[product]
    return EtlState(books, trades, bars)


def merge_states(start: EtlState, chains: list[str], load: Callable[[str], EtlState], products: list[str],
                 conns: list[int], totals: dict[str, int], last_segment: str | None) -> EtlState:  # fmt: skip
    """The checkpoint after the backfill: ``start`` plus the final state of every chain (the
    products in ``chains``, each read with ``load`` and let go before the next: one book in
    memory at a time). ``products`` and ``conns`` are the books' products and connections in
    the order the sequential run meets them; ``totals`` what the segments added."""
    n = len(products)
    arrays: dict[str, np.ndarray] = {
        "valid": np.zeros(n, np.bool_), "has_book": np.zeros(n, np.bool_), "book_conn": np.full(n, -1, np.int64),
        "next_sample": np.zeros(n, np.int64), "last_sample": np.zeros(n, np.int64),
        "pcount": np.zeros((n, N_COUNTERS), np.int64), "conn_ids": np.array(conns, np.int64),
        "last_seq": np.full(len(conns), -1, np.int64),
    }  # fmt: skip
    conn_slot = {conn: slot for slot, conn in enumerate(conns)}
    index = {product: i for i, product in enumerate(products)}
    empty = np.zeros(0, np.int64)
    for i in range(n):  # allocated, never a row: no levels (overwritten below for the others)
        for side in (0, 1):
            arrays[f"keys_{i}_{side}"], arrays[f"sizes_{i}_{side}"] = empty, empty
    chained = set(chains)
    trades = TradeDeduper({p: ids for p, ids in start.trades.seen.items() if p not in chained})
    bars = BarBuilder(start.bars.interval_ns, late=start.bars.late)
    bars.open_bars = {k: b for k, b in start.bars.open_bars.items() if k[0] not in chained}
    bars.written_until = {p: t for p, t in start.bars.written_until.items() if p not in chained}
    for product in chains:
        chain = load(product)
        # every chain saw every connection's sequence numbers: any one says
        for conn, slot in chain.books.conns.items():
            arrays["last_seq"][conn_slot[conn]] = chain.books.last_seq[slot]
        trades.seen.update(chain.trades.seen)
        bars.open_bars.update(chain.bars.open_bars)
        bars.written_until.update(chain.bars.written_until)
        bars.late += chain.bars.late
        if product not in chain.books.product_index:
            continue
        i, j = index[product], chain.books.product_index[product]
        part = chain.books.to_arrays()
        for name in _PER_PRODUCT:
            arrays[name][i] = part[name][j]
        slot = int(part["book_conn"][j])
        if slot >= 0:
            arrays["book_conn"][i] = conn_slot[int(part["conn_ids"][slot])]
        for side in (0, 1):
            arrays[f"keys_{i}_{side}"] = part[f"keys_{j}_{side}"]
            arrays[f"sizes_{i}_{side}"] = part[f"sizes_{j}_{side}"]
    books = BookSet.from_arrays(products, arrays, start.books.interval_ns, start.books.depth)
    merged_totals = dict(start.totals)
    for key, value in totals.items():
        merged_totals[key] = merged_totals.get(key, 0) + value
    return EtlState(books, trades, bars, last_segment, merged_totals)
