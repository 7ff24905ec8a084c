"""Market-by-order -> price levels: the order-id map in front of the book engine.

Why. Databento's MBO records talk about orders (add, cancel part of, modify, clear), while the
project's book engine (:mod:`daedalus.etl.book`) keeps price levels with absolute sizes. This
module keeps every resting order (book, order id -> side, price, size) and every level's total
in two open-addressing hash tables in numpy arrays, walks a batch of MBO records in one numba
loop, and turns each record that changes a level into engine rows ``(book, side, price, new
level total)``; a Clear becomes a one-row engine snapshot with no levels (empties the book).

Book semantics (Databento's own book example): Add adds; Cancel takes ``size`` off the order
(the order goes at 0); Modify moves the order (a new price or side leaves the old level), and a
Modify of an unknown order is an Add; Clear empties the book; Trade, Fill and None change
nothing. A book is one ``(dataset, publisher_id, instrument_id)``: the same ids in two datasets
are two books, and what happens to one dataset's stream never touches another's books.

Validity (``known`` per book): a book is known after a Clear ('R', not part of a snapshot) or
after the last record of its snapshot (``F_SNAPSHOT`` and ``F_LAST``; the snapshot's own
leading Clear leaves it unknown until then: half a snapshot is not the book). Nothing else makes
a book known: a book first seen is unknown, whatever stream it comes from. A gap or an overflow
makes every book of its dataset unknown (:meth:`MboBooks.invalidate`); a new session whose
history does not continue the books (a replay from the start, a plain DBN file) empties them
too (:meth:`MboBooks.reset`: the caller writes a clear row per book that held a level or was
known). The caller decides what the stream's events mean (``databento_etl``).

A Clear costs O(1): each book has a generation, table entries carry the generation they were
made in, and a Clear bumps it, so the book's old orders and levels are simply never found
again. They are dropped when the tables are rebuilt (growth, checkpoint).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from daedalus.etl.book import BookSet, _free_book

EMPTY = -1
F_LAST = 128
F_SNAPSHOT = 32
# counters (out of the map pass)
K_UNKNOWN_ORDER = 0  # cancel of an order the map does not hold
K_MODIFY_AS_ADD = 1  # modify of an unknown order, applied as an add
K_DUPLICATE_ADD = 2  # add of an id already resting (the old order is replaced)
K_BAD_SIDE = 3  # add/modify with side N (no level to put it on)
K_OVER_CANCEL = 4  # cancel of more than the order holds
K_CLEARS = 5
K_UNKNOWN_ACTION = 6
N_K = 7
COUNTER_NAMES = ("mbo_unknown_order", "mbo_modify_as_add", "mbo_duplicate_add", "mbo_bad_side",
                 "mbo_over_cancel", "mbo_clears", "mbo_unknown_action")  # fmt: skip


@njit(cache=True, inline="always")
def _home(k1, g, k2, mask):
    h = np.uint64(k2) * np.uint64(0x9E3779B97F4A7C15)
    h ^= np.uint64(k1) * np.uint64(0xC2B2AE3D27D4EB4F) + np.uint64(g) * np.uint64(0x165667B19E3779F9)
    h ^= h >> np.uint64(29)
    return np.int64(h & np.uint64(mask))


@njit(cache=True)
def _find(tk1, tg, tk2, k1, g, k2):
    """Slot of key (k1, g, k2), or -(free slot) - 1 where it would go."""
    mask = tk1.shape[0] - 1
    i = _home(k1, g, k2, mask)
    while True:
        if tk1[i] == EMPTY:
            return -i - 1
        if tk1[i] == k1 and tk2[i] == k2 and tg[i] == g:
            return i
        i = (i + 1) & mask


@njit(cache=True)
def _delete(tk1, tg, tk2, tv, i):
    """Backward-shift deletion (linear probing stays tombstone-free)."""
    mask = tk1.shape[0] - 1
    j = i
    while True:
        j = (j + 1) & mask
        if tk1[j] == EMPTY:
            break
        h = _home(tk1[j], tg[j], tk2[j], mask)
        if i <= j:
            if i < h <= j:
                continue
        elif h > i or h <= j:
            continue
        tk1[i] = tk1[j]
        tg[i] = tg[j]
        tk2[i] = tk2[j]
        for c in range(tv.shape[1]):
            tv[i, c] = tv[j, c]
        i = j
    tk1[i] = EMPTY


@njit(cache=True)
def _level_add(lk1, lg, lk2, lv, used, b, g, side, price, delta):
    """Add ``delta`` to the level (book ``b``, side, price); returns the new total (>= 0)."""
    k1 = 2 * b + side
    i = _find(lk1, lg, lk2, k1, g, price)
    if i >= 0:
        total = lv[i, 0] + delta
        if total <= 0:
            _delete(lk1, lg, lk2, lv, i)
            used[1] -= 1
            return 0
        lv[i, 0] = total
        return total
    if delta <= 0:
        return 0
    i = -i - 1
    lk1[i] = k1
    lg[i] = g
    lk2[i] = price
    lv[i, 0] = delta
    used[1] += 1
    return delta


@njit(cache=True)
def _level_row(rows, levels, nr, b, g, s, p, delta):
    """Change level (book ``b``, side ``s``, price ``p``) by ``delta`` and write its new total as
    row ``nr`` of ``rows`` (book, side, price, size, snapshot); returns the next row."""
    r_prod, r_side, r_px, r_sz, r_snap = rows
    lk1, lg, lk2, lv, used = levels
    r_prod[nr] = b
    r_side[nr] = s
    r_px[nr] = p
    r_sz[nr] = _level_add(lk1, lg, lk2, lv, used, b, g, s, p, delta)
    r_snap[nr] = False
    return nr + 1


@njit(cache=True)
def map_records(book, oid, px, sz, action, side, flags, gen, known, ok1, og, ok2, ov, lk1, lg, lk2, lv, used,
                f_rec, f_rs, f_re, f_known, r_prod, r_side, r_px, r_sz, r_snap, counts):  # fmt: skip
    """Apply MBO records to the order map and level totals; returns (frames, rows) written.

    One frame per record that changes a level (``f_rec``: its record index), its rows the
    levels it changed; ``f_known`` the book's validity after it."""
    nf = 0
    nr = 0
    rows = (r_prod, r_side, r_px, r_sz, r_snap)
    levels = (lk1, lg, lk2, lv, used)
    for n in range(book.shape[0]):
        b = book[n]
        g = gen[b]
        a = action[n]
        start = nr
        if a == 82:  # 'R' clear
            gen[b] = g + 1
            known[b] = (flags[n] & F_SNAPSHOT) == 0  # a snapshot's Clear: known at its F_LAST
            counts[K_CLEARS] += 1
            r_prod[nr] = b
            r_side[nr] = 0
            r_px[nr] = 0
            r_sz[nr] = 0
            r_snap[nr] = True
            nr += 1
        elif a == 65 or a == 77 or a == 67:  # (numba: plain comparisons) A add, M modify, C cancel
            i = _find(ok1, og, ok2, b, g, oid[n])
            if a == 67:
                if i < 0:
                    counts[K_UNKNOWN_ORDER] += 1
                else:
                    take = sz[n]
                    if take > ov[i, 2]:
                        counts[K_OVER_CANCEL] += 1
                        take = ov[i, 2]
                    s = ov[i, 0]
                    p = ov[i, 1]
                    ov[i, 2] -= take
                    if ov[i, 2] == 0:
                        _delete(ok1, og, ok2, ov, i)
                        used[0] -= 1
                    if take > 0:
                        nr = _level_row(rows, levels, nr, b, g, s, p, -take)
            else:
                sd = side[n]
                new_side = 0 if sd == 66 else (1 if sd == 65 else -1)
                done = False  # not a sentinel in ``i``: -2 is also _find's "free slot 1"
                if i >= 0:
                    if a == 65:
                        counts[K_DUPLICATE_ADD] += 1
                    # the order leaves its level (or its size changes there)
                    s = ov[i, 0]
                    p = ov[i, 1]
                    old = ov[i, 2]
                    if new_side == s and px[n] == p and sz[n] > 0:
                        ov[i, 2] = sz[n]
                        if sz[n] != old:
                            nr = _level_row(rows, levels, nr, b, g, s, p, sz[n] - old)
                        done = True
                    else:
                        _delete(ok1, og, ok2, ov, i)
                        used[0] -= 1
                        nr = _level_row(rows, levels, nr, b, g, s, p, -old)
                elif a == 77:
                    counts[K_MODIFY_AS_ADD] += 1
                if not done:
                    if new_side < 0:
                        counts[K_BAD_SIDE] += 1
                    elif sz[n] > 0:
                        j = -_find(ok1, og, ok2, b, g, oid[n]) - 1
                        ok1[j] = b
                        og[j] = g
                        ok2[j] = oid[n]
                        ov[j, 0] = new_side
                        ov[j, 1] = px[n]
                        ov[j, 2] = sz[n]
                        used[0] += 1
                        nr = _level_row(rows, levels, nr, b, g, new_side, px[n], sz[n])
        elif a != 84 and a != 70 and a != 78:  # not T trade, F fill, N none
            counts[K_UNKNOWN_ACTION] += 1
        if flags[n] & F_SNAPSHOT and flags[n] & F_LAST:
            known[b] = True
        if nr > start:
            f_rec[nf] = n
            f_rs[nf] = start
            f_re[nf] = nr
            f_known[nf] = known[b]
            nf += 1
    return nf, nr


@njit(cache=True)
def _rehash(src_k1, src_g, src_k2, src_v, gen, shift, dst_k1, dst_g, dst_k2, dst_v):
    """Copy the live entries (their book's current generation) into empty tables; returns how many."""
    n = 0
    for i in range(src_k1.shape[0]):
        k1 = src_k1[i]
        if k1 == EMPTY or src_g[i] != gen[k1 >> shift]:
            continue
        j = -_find(dst_k1, dst_g, dst_k2, k1, src_g[i], src_k2[i]) - 1
        dst_k1[j] = k1
        dst_g[j] = src_g[i]
        dst_k2[j] = src_k2[i]
        for c in range(src_v.shape[1]):
            dst_v[j, c] = src_v[i, c]
        n += 1
    return n


class _Table:
    """One open-addressing table: keys (k1, generation, k2), int64 values."""

    def __init__(self, capacity: int, width: int) -> None:
        self.k1 = np.full(capacity, EMPTY, np.int64)
        self.g = np.zeros(capacity, np.int64)
        self.k2 = np.zeros(capacity, np.int64)
        self.v = np.zeros((capacity, width), np.int64)

    def rebuilt(self, gen: np.ndarray, shift: int, need: int) -> tuple[_Table, int]:
        """A table of room for ``need`` live entries at most half full, with the live entries."""
        capacity = 1024
        while capacity < 2 * need:
            capacity *= 2
        table = _Table(capacity, self.v.shape[1])
        n = _rehash(self.k1, self.g, self.k2, self.v, gen, shift, table.k1, table.g, table.k2, table.v)
        return table, n


class MboBooks:
    """Every MBO book of the ETL (all datasets): the order map and level totals (here) and the
    levels with best bid/ask (the :class:`BookSet` engine, sampling off). Checkpointed as extra
    arrays of the engine's own checkpoint (:class:`MboBookSet`)."""

    def __init__(self, books: BookSet) -> None:
        self.books = books
        self.slots: dict[tuple[str, int, int], int] = {}  # (dataset, publisher_id, instrument_id) -> book slot
        self.by_dataset: dict[str, list[int]] = {}
        for name in books.products:
            self._register(book_key(name), books.product_index[name])
        self.gen = np.zeros(max(4, len(books.products)), np.int64)
        self.known = np.zeros(max(4, len(books.products)), np.bool_)
        self.orders = _Table(1024, 3)
        self.levels = _Table(1024, 1)
        self.used = np.zeros(2, np.int64)  # entries in use (stale generations included)
        self.counts = np.zeros(N_K, np.int64)
        self.lost = 0  # books whose order map the checkpoint did not have (emptied, unknown)

    def _register(self, key: tuple[str, int, int], slot: int) -> None:
        self.slots[key] = slot
        self.by_dataset.setdefault(key[0], []).append(slot)

    # ---- books -------------------------------------------------------------------------
    def slot_codes(self, dataset: str, publisher: np.ndarray, instrument: np.ndarray) -> np.ndarray:
        """Book slot per record (new books allocated in order of first appearance, unknown
        until their first Clear or complete snapshot)."""
        key = (publisher.astype(np.int64) << 32) | instrument.astype(np.int64)
        uniq, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        lookup = np.empty(uniq.shape[0], np.int64)
        for j in np.argsort(first, kind="stable").tolist():
            pair = (dataset, int(uniq[j] >> 32), int(uniq[j] & 0xFFFFFFFF))
            slot = self.slots.get(pair)
            if slot is None:
                slot = self.books.product_slot(product_name(*pair))
                self._register(pair, slot)
                self.books.has_book[slot] = True  # updates apply from the first record (no snapshot needed)
                self.books.valid[slot] = True
                if slot >= self.gen.shape[0]:
                    grow = max(2 * self.gen.shape[0], slot + 1)
                    self.gen = np.concatenate([self.gen, np.zeros(grow - self.gen.shape[0], np.int64)])
                    self.known = np.concatenate([self.known, np.zeros(grow - self.known.shape[0], np.bool_)])
                self.known[slot] = False
            lookup[j] = slot
        return lookup[inverse.reshape(-1)]

    def invalidate(self, dataset: str) -> None:
        """A gap in ``dataset``'s stream: its books are unknown until their next Clear or
        snapshot. Other datasets' books are untouched."""
        slots = self.by_dataset.get(dataset)
        if slots:
            self.known[np.asarray(slots, np.int64)] = False

    def reset(self, dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Empty every book of ``dataset`` and leave it unknown: the stream that follows does not
        continue these books (a replay from the start would count every order twice; a plain
        DBN file is another session). Returns the books that held a level or were known, as
        (slots, publisher_id, instrument_id): each gets a clear row in level2, as a Clear would."""
        slots = np.asarray(self.by_dataset.get(dataset, []), np.int64)
        lv = self.levels
        live = (lv.k1 != EMPTY) & (lv.g == self.gen[np.maximum(lv.k1, 0) >> 1])
        holding = np.zeros(self.gen.shape[0], np.bool_)
        holding[lv.k1[live] >> 1] = True
        shown = slots[holding[slots] | self.known[slots]]
        self.gen[slots] += 1  # their orders and levels are never found again
        self.known[slots] = False
        for slot in slots[holding[slots]].tolist():  # the engine holds levels only where the map does
            for b in (2 * slot, 2 * slot + 1):
                _free_book(b, self.books.ck, self.books.cn, self.books.free, self.books.meta, self.books.order,
                           self.books.nch)  # fmt: skip
        keys = [book_key(self.books.products[slot]) for slot in shown.tolist()]
        publisher = np.array([k[1] for k in keys], np.uint16)
        instrument = np.array([k[2] for k in keys], np.uint32)
        return shown, publisher, instrument

    def reserve(self, records: int) -> None:
        """Room for ``records`` more records (each adds at most one order and one level)."""
        if 10 * (self.used[0] + records) > 6 * self.orders.k1.shape[0]:
            self.orders, self.used[0] = self.orders.rebuilt(self.gen, 0, int(self.used[0]) + records)
        if 10 * (self.used[1] + records) > 6 * self.levels.k1.shape[0]:
            self.levels, self.used[1] = self.levels.rebuilt(self.gen, 1, int(self.used[1]) + records)

    def apply(self, slots, order_id, price, size, action, side, flags):
        """Map one batch of MBO records (columns); returns the engine frames' record index,
        validity, rows and the engine's result (best bid/ask per row)."""
        from daedalus.etl.book import FRAME, FrameBatch

        n = slots.shape[0]
        self.reserve(n)
        f_rec, f_rs, f_re = (np.empty(n, np.int64) for _ in range(3))
        f_known = np.empty(n, np.bool_)
        r_prod, r_px, r_sz = (np.empty(2 * n, np.int64) for _ in range(3))
        r_side = np.empty(2 * n, np.int8)
        r_snap = np.empty(2 * n, np.bool_)
        o, lv = self.orders, self.levels
        nf, nr = map_records(slots, order_id.view(np.int64), price, size.astype(np.int64), action, side, flags,
                             self.gen, self.known, o.k1, o.g, o.k2, o.v, lv.k1, lv.g, lv.k2, lv.v, self.used,
                             f_rec, f_rs, f_re, f_known, r_prod, r_side, r_px, r_sz, r_snap, self.counts)  # fmt: skip
        frames = FrameBatch(np.zeros(nf, np.int64), np.full(nf, FRAME, np.int8), np.full(nf, -1, np.int64),
                            np.zeros(nf, np.int64), np.zeros(nf, np.int64), f_rs[:nf], f_re[:nf], r_prod[:nr],
                            r_side[:nr], r_px[:nr], r_sz[:nr], r_snap[:nr])  # fmt: skip
        result, _ = self.books.apply(frames)
        return f_rec[:nf], f_known[:nf], frames, result

    def take_counters(self) -> dict[str, int]:
        """The counters since the last call, then zeroed: the books outlive a segment (one job
        runs many), and each segment reports only its own."""
        found = {name: int(v) for name, v in zip(COUNTER_NAMES, self.counts, strict=True) if v}
        found |= {"mbo_order_map_lost": self.lost} if self.lost else {}
        self.counts[:] = 0
        self.lost = 0
        return found

    # ---- checkpoint -------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The live orders (levels are rebuilt from them) and per-book generation/validity."""
        n = len(self.books.products)
        live = (self.orders.k1 != EMPTY) & (self.orders.g == self.gen[np.maximum(self.orders.k1, 0)])
        return {
            "mbo_gen": self.gen[:n].copy(),
            "mbo_known": self.known[:n].copy(),
            "mbo_order_book": self.orders.k1[live],
            "mbo_order_id": self.orders.k2[live],
            "mbo_order_vals": self.orders.v[live],
        }

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        n = arrays["mbo_gen"].shape[0]
        self.gen[:n] = arrays["mbo_gen"]
        self.known[:n] = arrays["mbo_known"]
        books, ids, vals = arrays["mbo_order_book"], arrays["mbo_order_id"], arrays["mbo_order_vals"]
        self.orders, _ = _Table(1024, 3).rebuilt(self.gen, 0, books.shape[0])
        self.levels, _ = _Table(1024, 1).rebuilt(self.gen, 1, books.shape[0])
        _load_orders(books, ids, vals, self.gen, self.orders.k1, self.orders.g, self.orders.k2, self.orders.v,
                     self.levels.k1, self.levels.g, self.levels.k2, self.levels.v, self.used)  # fmt: skip


@njit(cache=True)
def _load_orders(books, ids, vals, gen, ok1, og, ok2, ov, lk1, lg, lk2, lv, used):
    used[0] = 0
    used[1] = 0
    for n in range(books.shape[0]):
        b = books[n]
        j = -_find(ok1, og, ok2, b, gen[b], ids[n]) - 1
        ok1[j] = b
        og[j] = gen[b]
        ok2[j] = ids[n]
        for c in range(3):
            ov[j, c] = vals[n, c]
        used[0] += 1
        _level_add(lk1, lg, lk2, lv, used, b, gen[b], vals[n, 0], vals[n, 1], vals[n, 2])


def product_name(dataset: str, publisher: int, instrument: int) -> str:
    """A book's product name in the engine (and the checkpoint): ``<dataset>:<publisher>:<instrument>``."""
    return f"{dataset}:{publisher}:{instrument}"


def book_key(name: str) -> tuple[str, int, int]:
    """The inverse of :func:`product_name` (dataset names hold no ``:``; a bare ``pub:iid`` has none)."""
    parts = name.rsplit(":", 2)
    dataset = parts[0] if len(parts) == 3 else ""
    return dataset, int(parts[-2]), int(parts[-1])


class MboBookSet(BookSet):
    """The engine's :class:`BookSet` that also carries the order map in its checkpoint arrays
    (``mbo_*`` keys beside the levels), so the unchanged checkpoint code saves it."""

    mbo: MboBooks

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {**super().to_arrays(), **self.mbo.to_arrays()}


def attach(books: BookSet, extra: dict[str, np.ndarray] | None) -> MboBooks:
    """Turn the checkpoint's ``books`` into an :class:`MboBookSet` (in place) with its order map,
    restored from ``extra`` (the checkpoint's ``mbo_*`` arrays). Books without their order map
    (a checkpoint that lost it) are emptied and left unknown until their next Clear or snapshot:
    levels without their orders could never be taken down again, so they would be silently wrong."""
    if isinstance(books, MboBookSet):
        return books.mbo
    books.__class__ = MboBookSet
    books.interval_ns = 0  # no sampling: book_snapshot tables come from mbp-1/mbp-10
    mbo = MboBooks(books)
    if extra is not None and "mbo_gen" in extra:
        mbo.load_arrays(extra)
    elif books.products:
        for b in range(2 * len(books.products)):
            _free_book(b, books.ck, books.cn, books.free, books.meta, books.order, books.nch)
        mbo.known[:] = False
        mbo.lost = len(books.products)
    books.mbo = mbo  # type: ignore[attr-defined]
    return mbo
