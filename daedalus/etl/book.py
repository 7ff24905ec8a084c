"""The order book engine: every product's book, applied frame by frame in compiled code.

Why this shape. A level2 feed is millions of tiny updates; per-update Python costs ~1 µs,
so the whole replay runs in one numba loop over columns (10M+ updates/s per core), and
Python only touches batches.

Layout. Prices and sizes are int64 units of 1e-8 (exact for the feed's decimal strings).
Each side of each book is a *chunked sorted array*: chunks of at most ``CHUNK`` keys, kept
in ascending key order through a per-book ``order`` list with each chunk's maximum in
``cmax``. Bids use key = price and asks key = -price, so the best level of either side is
always the last key of the last chunk: O(1) to read, never a scan. An update finds its
chunk by binary search over ``cmax`` and shifts at most ``CHUNK`` entries, so a change
deep in a 50,000-level book costs the same as one at the touch.

Frames, not rows, are the unit: after applying every event of a frame, each row of that
frame gets its product's best bid/ask and ``book_valid``. Sequence numbers, control lines
(gap, connect, disconnect), level2 frames the parser rejected (``LOST``: always a gap) and
snapshots drive validity (architecture 3.5). The loop stops
before a frame it has no room for (chunks or sample rows) and reports what it needs;
:class:`BookSet` grows the arrays and resumes at that frame, so nothing is ever half-applied.

Validity. A snapshot makes a book valid only when it leaves both sides with levels: a
one-sided snapshot (an empty side, or rows of one side lost upstream) is counted
(``one_sided``) and the book stays invalid until the next two-sided snapshot. An update
that adds the missing side does not make it valid: it cannot bring back the levels the
snapshot should have had, so the best price of that side could be wrong.

Samples follow the data. Book samples sit on a grid of ``interval`` on the receive clock;
the sample at grid time t is the book just before the first frame (in data order) stamped
at or after t, i.e. the state after every earlier frame. They are taken when a product's
frame passes the next grid time, and a frame takes at most ONE sample: the first grid
time it passed. The grid times after it up to the frame are skipped: the book did not
change between them (no frame of the product came), so a reader filling forward from that
one sample has the right book at every time, and the number of samples is bounded by the
number of frames, never by a gap in time (a clock jumped 10 years ahead costs one sample).
Sample times of a product only increase, with one exception below. When the receive clock
goes back before the last grid time passed (``ts < next_sample - interval``), the step is
measured from that grid time, never from the last sample taken (after a quiet period the
last sample lies far back, and restarting there would sample grid times the data has
already passed with a book from later frames):

- by at most ``SAMPLE_CLOCK_RESTART`` intervals (jitter, a short step): sampling pauses
  until the data passes the next grid time again, so no time is sampled twice and a
  sample at t never shows a frame stamped at or after t;
- by more, but not that far behind the last sample: a one-off outlier ahead came back (it
  took one sample, at the first grid time after the previous frame). Sampling continues on
  the first grid time after both the frame and the last sample, at once;
- by more than that behind the last sample too: the clock was stepped back (or ran ahead
  for a while); the grid restarts at the data's time. Times sampled under the wrong clock
  may then be sampled again later.

``book_valid`` of a sample is the book's validity when it is taken (not crossed, no gap
since a two-sided snapshot); a gap announced between a grid time and the frame that takes
its sample already shows, which errs on the side of invalid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from numba import njit

CHUNK = 64  # keys per chunk (the engine reads it from the arrays, so tests can use tiny chunks)
NO_PRICE = np.iinfo(np.int64).min  # best bid/ask of an empty side

# frame kinds (f_kind)
FRAME = 0  # an exchange frame; f_seq >= 0 when it carries a sequence number
GAP = 1  # control line: the collector saw a sequence jump (f_aux = received sequence)
CONNECT = 2
DISCONNECT = 3
OTHER = 4  # counted elsewhere, no effect on books
LOST = 5  # a level2 frame rejected by the parser: its updates are missing (f_seq: its sequence, or -1)
# frames of one connection with consecutive sequence numbers f_aux..f_seq and no level2 row for
# these books, as one: exactly what those frames do (a continuity check of the first, then the
# position). The backfill (daedalus.backfill) gives each product's chain its own frames plus
# these runs, instead of every frame of every product.
SEQ_RUN = 6

# engine status (meta[M_STATUS])
DONE = 0
NEED_CHUNKS = 1
NEED_SAMPLES = 2

# meta slots
M_NFREE = 0
M_STATUS = 1
M_NEED = 2  # chunks (or sample rows) the stopped frame needs
M_NSAMPLES = 3

# per-product counters (pcount columns)
C_GAPS = 0
C_CROSSED = 1
C_SNAPSHOTS = 2
C_DROPPED = 3  # update rows before the product's first snapshot
C_ONE_SIDED = 4  # snapshots that left a side without levels (the book stays invalid)
N_COUNTERS = 5

# The receive clock going back more than this many sample intervals behind the last sample
# restarts the sample grid at the data's time (see the module docstring).
SAMPLE_CLOCK_RESTART = 60


@njit(cache=True, inline="always")
def _lower_bound(a, row, n, key):
    """First index i in ascending a[row, :n] with a[row, i] >= key (n if none).

    Halving narrows to at most 32 candidates, which are then counted without branches (a
    vectorised compare-and-add): unpredictable branches, not memory, are what a search over
    prices spends its time on. Takes the 2-D array and a row: a row view would cost
    reference counting on every call."""
    lo = 0
    hi = n
    while hi - lo > 32:
        mid = (lo + hi) >> 1
        if a[row, mid] < key:
            lo = mid + 1
        else:
            hi = mid
    for m in range(lo, hi):
        lo += a[row, m] < key
    return lo


@njit(cache=True)
def _free_book(b, ck, cn, free, meta, order, nch):
    nf = meta[M_NFREE]
    for j in range(nch[b]):
        c = order[b, j]
        cn[c] = 0
        free[nf] = c
        nf += 1
    meta[M_NFREE] = nf
    nch[b] = 0


@njit(cache=True, inline="always")
def _alloc(free, meta):
    nf = meta[M_NFREE] - 1
    meta[M_NFREE] = nf
    return free[nf]


@njit(cache=True)
def _first_level(b, key, size, ck, cs, cn, free, meta, order, cmax, nch):
    c = _alloc(free, meta)
    ck[c, 0] = key
    cs[c, 0] = size
    cn[c] = 1
    order[b, 0] = c
    cmax[b, 0] = key
    nch[b] = 1


@njit(cache=True)
def _drop_chunk(b, j, c, free, meta, order, cmax, nch):
    """Chunk ``c`` (position ``j`` of book ``b``) became empty: free it, close the gap."""
    free[meta[M_NFREE]] = c
    meta[M_NFREE] += 1
    n_ch = nch[b]
    for m in range(j, n_ch - 1):
        order[b, m] = order[b, m + 1]
        cmax[b, m] = cmax[b, m + 1]
    nch[b] = n_ch - 1


@njit(cache=True)
def _split(b, j, c, i, ck, cs, cn, free, meta, order, cmax, nch):
    """Chunk ``c`` is full: its upper half moves to a new chunk right after it. Returns the
    (chunk, index, position) where the key meant for index ``i`` of ``c`` now goes."""
    half = ck.shape[1] >> 1
    n_ch = nch[b]
    c2 = _alloc(free, meta)
    for m in range(half):
        ck[c2, m] = ck[c, half + m]
        cs[c2, m] = cs[c, half + m]
    cn[c2] = half
    cn[c] = half
    for m in range(n_ch, j + 1, -1):
        order[b, m] = order[b, m - 1]
        cmax[b, m] = cmax[b, m - 1]
    order[b, j + 1] = c2
    cmax[b, j + 1] = cmax[b, j]
    cmax[b, j] = ck[c, half - 1]
    nch[b] = n_ch + 1
    if i > half:
        return c2, i - half, j + 1
    return c, i, j


@njit(cache=True)
def _load(b, keys, sizes, ck, cs, cn, free, meta, order, cmax, nch):
    """Replace side ``b`` with the given levels (any order; a repeated price keeps its last size;
    zero sizes are no levels). Chunks are filled half full so that inserts rarely split."""
    _free_book(b, ck, cn, free, meta, order, nch)
    half = ck.shape[1] >> 1
    idx = np.argsort(keys, kind="mergesort")  # stable: among equal prices the last stays last
    n = idx.shape[0]
    n_ch = 0
    c = -1
    for t in range(n):
        k = keys[idx[t]]
        if t + 1 < n and keys[idx[t + 1]] == k:
            continue  # a later entry for the same price wins
        s = sizes[idx[t]]
        if s == 0:
            continue
        if c < 0 or cn[c] == half:
            c = _alloc(free, meta)
            cn[c] = 0
            order[b, n_ch] = c
            n_ch += 1
        ck[c, cn[c]] = k
        cs[c, cn[c]] = s
        cn[c] += 1
        cmax[b, n_ch - 1] = k
    nch[b] = n_ch


@njit(cache=True, inline="always")
def _best(b, ck, cn, order, nch):
    if nch[b] == 0:
        return NO_PRICE
    c = order[b, nch[b] - 1]
    return ck[c, cn[c] - 1]


@njit(cache=True)
def _top(b, depth, ck, cs, cn, order, nch, sign, out_px, out_sz):
    """Best ``depth`` levels of side ``b`` into out (price = sign*key); missing levels are 0/0."""
    d = 0
    j = nch[b] - 1
    while j >= 0 and d < depth:
        c = order[b, j]
        m = cn[c] - 1
        while m >= 0 and d < depth:
            out_px[d] = sign * ck[c, m]
            out_sz[d] = cs[c, m]
            d += 1
            m -= 1
        j -= 1
    while d < depth:
        out_px[d] = 0
        out_sz[d] = 0
        d += 1
    return d


@njit(cache=True)
def _sample_clock_back(p, ts, interval, next_sample, last_sample):
    """The receive clock went back before the last grid time passed: move product ``p``'s next
    grid time by the rules of the module docstring and return it."""
    restart = SAMPLE_CLOCK_RESTART * interval
    if ts >= next_sample[p] - interval - restart:
        return next_sample[p]  # jitter or a short step: pause until the data passes it again
    if ts < last_sample[p] - restart:
        next_sample[p] = (ts // interval + 1) * interval  # stepped back: the grid restarts here
    else:  # an outlier ahead came back: go on after both the frame and the last sample
        next_sample[p] = (max(ts, last_sample[p]) // interval + 1) * interval
    return next_sample[p]


@njit(cache=True)
def _invalidate_conn(conn, book_conn, valid):
    for p in range(valid.shape[0]):
        if book_conn[p] == conn:
            valid[p] = False


@njit(cache=True)
def _gap(conn, book_conn, valid, has_book, pcount):
    """Frames of connection ``conn`` were lost: count a gap on each of its books, invalidate them."""
    for p in range(valid.shape[0]):
        if book_conn[p] == conn and has_book[p]:
            pcount[p, C_GAPS] += 1
    _invalidate_conn(conn, book_conn, valid)


@njit(cache=True)
def run_frames(
    f_start,
    f_conn,
    f_kind,
    f_seq,
    f_aux,
    f_ts,
    f_rs,
    f_re,
    r_prod,
    r_side,
    r_px,
    r_sz,
    r_snap,
    ck,
    cs,
    cn,
    free,
    meta,
    order,
    cmax,
    nch,
    valid,
    has_book,
    book_conn,
    next_sample,
    last_sample,
    pcount,
    last_seq,
    o_bb,
    o_ba,
    o_valid,
    o_keep,
    interval,
    depth,
    s_prod,
    s_ts,
    s_valid,
    s_bpx,
    s_bsz,
    s_apx,
    s_asz,
):
    """Apply frames ``f_start..`` (see the module docstring). Returns the frame index reached:
    ``len(f_conn)`` when done, else the frame that needs room (``meta[M_STATUS]`` says which)."""
    n_frames = f_conn.shape[0]
    max_m = order.shape[1]
    half = ck.shape[1] >> 1
    s_cap = s_ts.shape[0]
    meta[M_STATUS] = DONE
    for f in range(f_start, n_frames):
        conn = f_conn[f]
        kind = f_kind[f]
        if kind == CONNECT or kind == DISCONNECT:  # noqa: SIM109 (numba: plain comparisons)
            last_seq[conn] = -1
            _invalidate_conn(conn, book_conn, valid)
            continue
        if kind == GAP:
            received = f_aux[f]
            if last_seq[conn] < received - 1 or last_seq[conn] == -1:
                _gap(conn, book_conn, valid, has_book, pcount)
            if received - 1 > last_seq[conn]:
                last_seq[conn] = received - 1
            continue
        if kind == LOST:  # always a gap: whatever its sequence says, its updates are missing
            _gap(conn, book_conn, valid, has_book, pcount)
            if f_seq[f] > last_seq[conn]:
                last_seq[conn] = f_seq[f]
            continue
        if kind == SEQ_RUN:
            if last_seq[conn] >= 0 and f_aux[f] != last_seq[conn] + 1:
                _gap(conn, book_conn, valid, has_book, pcount)
            last_seq[conn] = f_seq[f]
            continue
        if kind != FRAME:
            continue
        rs = f_rs[f]
        re = f_re[f]
        ts = f_ts[f]
        # room check before touching anything of this frame
        need = 0
        n_events = 0  # each event takes at most one sample
        g = rs
        while g < re:
            p = r_prod[g]
            e = g + 1  # the event: rows with one product and one snapshot flag
            while e < re and r_prod[e] == p and r_snap[e] == r_snap[g]:
                e += 1
            if r_snap[g]:
                need += (e - g) // half + 4
                if (e - g) // half + 4 > max_m:
                    meta[M_STATUS] = NEED_CHUNKS
                    meta[M_NEED] = (e - g) // half + 4
                    return f
            else:
                need += e - g
                for sd in range(2):
                    if nch[2 * p + sd] + (e - g) > max_m:
                        meta[M_STATUS] = NEED_CHUNKS
                        meta[M_NEED] = nch[2 * p + sd] + (e - g)
                        return f
            n_events += 1
            g = e
        if interval > 0 and meta[M_NSAMPLES] + n_events > s_cap:
            meta[M_STATUS] = NEED_SAMPLES
            meta[M_NEED] = n_events
            return f
        if need > meta[M_NFREE]:
            meta[M_STATUS] = NEED_CHUNKS
            meta[M_NEED] = need
            return f
        # sequence continuity per connection
        seq = f_seq[f]
        if seq >= 0:
            if last_seq[conn] >= 0 and seq != last_seq[conn] + 1:
                _gap(conn, book_conn, valid, has_book, pcount)
            last_seq[conn] = seq
        # apply each event (run of rows with one product and one snapshot flag)
        g = rs
        while g < re:
            p = r_prod[g]
            e = g + 1  # the event: rows with one product and one snapshot flag
            while e < re and r_prod[e] == p and r_snap[e] == r_snap[g]:
                e += 1
            if interval > 0 and has_book[p]:
                nxt = next_sample[p]
                if ts < nxt - interval:
                    nxt = _sample_clock_back(p, ts, interval, next_sample, last_sample)
                if ts >= nxt:  # one sample of the book as it was, at the first grid time passed
                    ns = meta[M_NSAMPLES]  # (room for one per event was checked above)
                    s_prod[ns] = p
                    s_ts[ns] = nxt
                    bb = _best(2 * p, ck, cn, order, nch)
                    ba = _best(2 * p + 1, ck, cn, order, nch)
                    crossed = bb != NO_PRICE and ba != NO_PRICE and bb >= -ba
                    s_valid[ns] = valid[p] and not crossed
                    _top(2 * p, depth, ck, cs, cn, order, nch, 1, s_bpx[ns], s_bsz[ns])
                    _top(2 * p + 1, depth, ck, cs, cn, order, nch, -1, s_apx[ns], s_asz[ns])
                    meta[M_NSAMPLES] = ns + 1
                    last_sample[p] = nxt
                    next_sample[p] = (ts // interval + 1) * interval  # grid times up to ts: same book, skipped
            if r_snap[g]:
                for sd in range(2):
                    m = 0
                    for r in range(g, e):
                        if r_side[r] == sd:
                            m += 1
                    keys = np.empty(m, np.int64)
                    sizes = np.empty(m, np.int64)
                    m = 0
                    for r in range(g, e):
                        if r_side[r] == sd:
                            keys[m] = r_px[r] if sd == 0 else -r_px[r]
                            sizes[m] = r_sz[r]
                            m += 1
                    _load(2 * p + sd, keys, sizes, ck, cs, cn, free, meta, order, cmax, nch)
                if not has_book[p] and interval > 0:
                    next_sample[p] = (ts // interval + 1) * interval
                    last_sample[p] = next_sample[p] - interval
                has_book[p] = True
                valid[p] = nch[2 * p] > 0 and nch[2 * p + 1] > 0  # one-sided: see the module docstring
                if not valid[p]:
                    pcount[p, C_ONE_SIDED] += 1
                pcount[p, C_SNAPSHOTS] += 1
                for r in range(g, e):
                    o_keep[r] = True
            elif has_book[p]:
                for r in range(g, e):
                    # Set level ``key`` of side ``b`` to ``size`` (0 deletes). Written out here, not
                    # called: numba reference-counts every array passed to a function, which costs
                    # more than the work itself (~45 ns an update). Rare paths are functions.
                    o_keep[r] = True
                    b = 2 * p + r_side[r]
                    key = r_px[r] if r_side[r] == 0 else -r_px[r]
                    size = r_sz[r]
                    n_ch = nch[b]
                    if n_ch == 0:
                        if size != 0:
                            _first_level(b, key, size, ck, cs, cn, free, meta, order, cmax, nch)
                        continue
                    if n_ch == 1 or key > cmax[b, n_ch - 2]:  # noqa: SIM108 - near the touch: the last chunk
                        j = n_ch - 1
                    else:
                        j = _lower_bound(cmax, b, n_ch - 1, key)
                    c = order[b, j]
                    n = cn[c]
                    i = _lower_bound(ck, c, n, key)
                    if i < n and ck[c, i] == key:
                        if size != 0:
                            cs[c, i] = size
                            continue
                        for m in range(i, n - 1):  # delete
                            ck[c, m] = ck[c, m + 1]
                            cs[c, m] = cs[c, m + 1]
                        n -= 1
                        cn[c] = n
                        if n == 0:
                            _drop_chunk(b, j, c, free, meta, order, cmax, nch)
                        elif i == n:
                            cmax[b, j] = ck[c, n - 1]
                        continue
                    if size == 0:
                        continue  # deleting a level we do not have
                    if n == ck.shape[1]:
                        c, i, j = _split(b, j, c, i, ck, cs, cn, free, meta, order, cmax, nch)
                        n = cn[c]
                    for m in range(n, i, -1):
                        ck[c, m] = ck[c, m - 1]
                        cs[c, m] = cs[c, m - 1]
                    ck[c, i] = key
                    cs[c, i] = size
                    cn[c] = n + 1
                    if i == n:
                        cmax[b, j] = key
            else:
                pcount[p, C_DROPPED] += e - g
                for r in range(g, e):
                    o_keep[r] = False
            book_conn[p] = conn
            g = e
        # publish the state after the whole frame on every row of it
        g = rs
        while g < re:
            p = r_prod[g]
            e = g + 1
            while e < re and r_prod[e] == p:
                e += 1
            # best = last key of the last chunk (inline: see the note on reference counting)
            bb = NO_PRICE
            if nch[2 * p] > 0:
                c = order[2 * p, nch[2 * p] - 1]
                bb = ck[c, cn[c] - 1]
            ask = NO_PRICE
            if nch[2 * p + 1] > 0:
                c = order[2 * p + 1, nch[2 * p + 1] - 1]
                ask = -ck[c, cn[c] - 1]
            crossed = bb != NO_PRICE and ask != NO_PRICE and bb >= ask
            if crossed and valid[p]:
                pcount[p, C_CROSSED] += 1
            ok = valid[p] and not crossed
            for r in range(g, e):
                o_bb[r] = bb
                o_ba[r] = ask
                o_valid[r] = ok
            g = e
    return n_frames


@njit(cache=True)
def book_levels(b, ck, cs, cn, order, nch):
    """All levels of side ``b`` in ascending key order (for checkpoints and tests)."""
    n = 0
    for j in range(nch[b]):
        n += cn[order[b, j]]
    keys = np.empty(n, np.int64)
    sizes = np.empty(n, np.int64)
    t = 0
    for j in range(nch[b]):
        c = order[b, j]
        for m in range(cn[c]):
            keys[t] = ck[c, m]
            sizes[t] = cs[c, m]
            t += 1
    return keys, sizes


@dataclass
class Samples:
    """Book samples taken by the engine (top ``depth`` levels per side, int64 units)."""

    product: np.ndarray
    ts: np.ndarray
    valid: np.ndarray
    bid_px: np.ndarray
    bid_sz: np.ndarray
    ask_px: np.ndarray
    ask_sz: np.ndarray

    def __len__(self) -> int:
        return int(self.ts.shape[0])


@dataclass
class FrameBatch:
    """One batch for the engine. Frames in line order (see the kind constants); rows are the
    level2 updates, grouped by frame: rows ``f_rs[f]:f_re[f]`` belong to frame ``f``."""

    f_conn: np.ndarray  # int64 connection slot (see BookSet.conn_slot)
    f_kind: np.ndarray  # int8
    f_seq: np.ndarray  # int64, -1 when the frame has none
    f_aux: np.ndarray  # int64, the received sequence of a gap line
    f_ts: np.ndarray  # int64 recv_ns
    f_rs: np.ndarray  # int64
    f_re: np.ndarray  # int64
    r_prod: np.ndarray  # int64 product index
    r_side: np.ndarray  # int8, 0 bid / 1 ask
    r_px: np.ndarray  # int64 units
    r_sz: np.ndarray  # int64 units
    r_snap: np.ndarray  # bool


@dataclass
class BookResult:
    best_bid: np.ndarray  # int64 units, NO_PRICE when the side is empty
    best_ask: np.ndarray
    valid: np.ndarray
    keep: np.ndarray  # False for updates before the product's first snapshot


class BookSet:
    """Every product's book and the per-connection sequence positions, in growable arrays."""

    def __init__(self, interval_ns: int = 0, depth: int = 10, chunks: int = 4096, chunk_size: int = CHUNK) -> None:
        self.chunk_size = chunk_size
        self.interval_ns = interval_ns
        self.depth = depth
        self.products: list[str] = []
        self.product_index: dict[str, int] = {}
        self.conns: dict[int, int] = {}
        self.last_seq = np.full(16, -1, np.int64)
        self._alloc_products(4)
        self._alloc_pool(chunks)
        self._alloc_order(256)
        self._alloc_samples(1024)

    # ---- storage -------------------------------------------------------------------------
    def _alloc_products(self, n: int) -> None:
        self.valid = _grow(getattr(self, "valid", None), (n,), np.bool_, False)
        self.has_book = _grow(getattr(self, "has_book", None), (n,), np.bool_, False)
        self.book_conn = _grow(getattr(self, "book_conn", None), (n,), np.int64, -1)
        self.next_sample = _grow(getattr(self, "next_sample", None), (n,), np.int64, 0)
        self.last_sample = _grow(getattr(self, "last_sample", None), (n,), np.int64, 0)
        self.pcount = _grow(getattr(self, "pcount", None), (n, N_COUNTERS), np.int64, 0)
        if hasattr(self, "order"):
            self.order = _grow(self.order, (2 * n, self.order.shape[1]), np.int32, 0)
            self.cmax = _grow(self.cmax, (2 * n, self.cmax.shape[1]), np.int64, 0)
            self.nch = _grow(self.nch, (2 * n,), np.int32, 0)

    def _alloc_pool(self, n: int) -> None:
        old = 0 if not hasattr(self, "ck") else self.ck.shape[0]
        self.ck = _grow(getattr(self, "ck", None), (n, self.chunk_size), np.int64, 0)
        self.cs = _grow(getattr(self, "cs", None), (n, self.chunk_size), np.int64, 0)
        self.cn = _grow(getattr(self, "cn", None), (n,), np.int32, 0)
        free = np.empty(n, np.int32)
        meta = getattr(self, "meta", np.zeros(4, np.int64))
        nf = int(meta[M_NFREE]) if old else 0
        if old:
            free[:nf] = self.free[:nf]
        added = np.arange(old, n, dtype=np.int32)[::-1]
        free[nf : nf + added.shape[0]] = added
        meta[M_NFREE] = nf + added.shape[0]
        self.free, self.meta = free, meta

    def _alloc_order(self, m: int) -> None:
        nb = 2 * self.valid.shape[0]
        self.order = _grow(getattr(self, "order", None), (nb, m), np.int32, 0)
        self.cmax = _grow(getattr(self, "cmax", None), (nb, m), np.int64, 0)
        self.nch = _grow(getattr(self, "nch", None), (nb,), np.int32, 0)

    def _alloc_samples(self, n: int) -> None:
        d = self.depth
        self.s_prod = np.zeros(n, np.int64)
        self.s_ts = np.zeros(n, np.int64)
        self.s_valid = np.zeros(n, np.bool_)
        self.s_bpx, self.s_bsz, self.s_apx, self.s_asz = (np.zeros((n, d), np.int64) for _ in range(4))
        self.meta[M_NSAMPLES] = 0

    # ---- mapping names to slots -----------------------------------------------------------
    def product_slot(self, product_id: str) -> int:
        slot = self.product_index.get(product_id)
        if slot is None:
            slot = len(self.products)
            self.products.append(product_id)
            self.product_index[product_id] = slot
            if slot >= self.valid.shape[0]:
                self._alloc_products(2 * self.valid.shape[0])
        return slot

    def conn_slot(self, conn: int) -> int:
        slot = self.conns.get(conn)
        if slot is None:
            slot = self.conns[conn] = len(self.conns)
            if slot >= self.last_seq.shape[0]:
                self.last_seq = _grow(self.last_seq, (2 * self.last_seq.shape[0],), np.int64, -1)
        return slot

    def bind(self, frames: FrameBatch, products: list[str]) -> FrameBatch:
        """A parsed batch onto this set: its product indices (into ``products``) and connection
        ids become slots, new ones allocated in order of first appearance. The parser never
        sees the books; this is the one step that does."""
        lookup = np.array([self.product_slot(p) for p in products] + [-1], np.int64)
        distinct, inverse = np.unique(frames.f_conn, return_inverse=True)
        conns = np.array([self.conn_slot(c) for c in distinct.tolist()], np.int64)[inverse.reshape(-1)]
        return dataclasses.replace(frames, f_conn=conns, r_prod=lookup[frames.r_prod])

    # ---- the engine -----------------------------------------------------------------------
    def apply(self, batch: FrameBatch) -> tuple[BookResult, Samples]:
        """Apply a batch of frames; returns per-row results and the samples taken."""
        n_rows = batch.r_prod.shape[0]
        res = BookResult(
            np.empty(n_rows, np.int64),
            np.empty(n_rows, np.int64),
            np.empty(n_rows, np.bool_),
            np.empty(n_rows, np.bool_),
        )
        samples: list[Samples] = []
        f = 0
        n_frames = batch.f_conn.shape[0]
        while True:
            f = run_frames(
                f,
                batch.f_conn,
                batch.f_kind,
                batch.f_seq,
                batch.f_aux,
                batch.f_ts,
                batch.f_rs,
                batch.f_re,
                batch.r_prod,
                batch.r_side,
                batch.r_px,
                batch.r_sz,
                batch.r_snap,
                self.ck,
                self.cs,
                self.cn,
                self.free,
                self.meta,
                self.order,
                self.cmax,
                self.nch,
                self.valid,
                self.has_book,
                self.book_conn,
                self.next_sample,
                self.last_sample,
                self.pcount,
                self.last_seq,
                res.best_bid,
                res.best_ask,
                res.valid,
                res.keep,
                self.interval_ns,
                self.depth,
                self.s_prod,
                self.s_ts,
                self.s_valid,
                self.s_bpx,
                self.s_bsz,
                self.s_apx,
                self.s_asz,
            )
            status, need = int(self.meta[M_STATUS]), int(self.meta[M_NEED])
            if status == NEED_SAMPLES or f == n_frames:
                samples.append(self._take_samples())
                if status == NEED_SAMPLES and need > self.s_ts.shape[0]:
                    self._alloc_samples(max(need, 2 * self.s_ts.shape[0]))
            if f == n_frames:
                break
            if status == NEED_CHUNKS:
                self._make_room(need)
        return res, _concat_samples(samples, self.depth)

    def _make_room(self, need: int) -> None:
        if need > int(self.meta[M_NFREE]):
            self._alloc_pool(max(2 * self.ck.shape[0], self.ck.shape[0] + need))
        if need > self.order.shape[1] - int(self.nch.max(initial=0)):
            self._alloc_order(max(2 * self.order.shape[1], int(self.nch.max(initial=0)) + need))

    def _take_samples(self) -> Samples:
        n = int(self.meta[M_NSAMPLES])
        out = Samples(
            self.s_prod[:n].copy(),
            self.s_ts[:n].copy(),
            self.s_valid[:n].copy(),
            self.s_bpx[:n].copy(),
            self.s_bsz[:n].copy(),
            self.s_apx[:n].copy(),
            self.s_asz[:n].copy(),
        )
        self.meta[M_NSAMPLES] = 0
        return out

    # ---- inspection and checkpoints ---------------------------------------------------------
    def levels(self, product_id: str, side: int) -> tuple[np.ndarray, np.ndarray]:
        """(prices, sizes) of one side, best first, int64 units."""
        b = 2 * self.product_index[product_id] + side
        keys, sizes = book_levels(b, self.ck, self.cs, self.cn, self.order, self.nch)
        keys, sizes = keys[::-1], sizes[::-1]
        return (keys if side == 0 else -keys), sizes

    def counters(self, product_id: str) -> dict[str, int]:
        row = self.pcount[self.product_index[product_id]]
        return {"gaps": int(row[C_GAPS]), "crossed": int(row[C_CROSSED]), "snapshots": int(row[C_SNAPSHOTS]),
                "dropped_before_snapshot": int(row[C_DROPPED]), "one_sided": int(row[C_ONE_SIDED])}  # fmt: skip

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to resume, as plain arrays (saved with ``np.savez``)."""
        n = len(self.products)
        out: dict[str, np.ndarray] = {
            "valid": self.valid[:n].copy(),
            "has_book": self.has_book[:n].copy(),
            "book_conn": self.book_conn[:n].copy(),
            "next_sample": self.next_sample[:n].copy(),
            "last_sample": self.last_sample[:n].copy(),
            "pcount": self.pcount[:n].copy(),
            "conn_ids": np.array(list(self.conns), np.int64),
            "last_seq": self.last_seq[: len(self.conns)].copy(),
        }
        for p in range(n):
            for side in (0, 1):
                keys, sizes = book_levels(2 * p + side, self.ck, self.cs, self.cn, self.order, self.nch)
                out[f"keys_{p}_{side}"] = keys
                out[f"sizes_{p}_{side}"] = sizes
        return out

    @classmethod
    def from_arrays(
        cls, products: list[str], arrays: dict[str, np.ndarray], interval_ns: int, depth: int, chunk_size: int = CHUNK
    ) -> BookSet:
        books = cls(interval_ns, depth, chunk_size=chunk_size)
        for name in products:
            books.product_slot(name)
        n = len(products)
        books.valid[:n] = arrays["valid"]
        books.has_book[:n] = arrays["has_book"]
        books.next_sample[:n] = arrays["next_sample"]
        # checkpoints written before last_sample existed: the last grid time passed is the last sample
        last = arrays.get("last_sample")
        books.last_sample[:n] = books.next_sample[:n] - interval_ns if last is None else last
        pcount = arrays["pcount"]
        books.pcount[:n, : pcount.shape[1]] = pcount  # older checkpoints have fewer counters
        for conn in arrays["conn_ids"].tolist():
            books.conn_slot(int(conn))
        books.last_seq[: len(books.conns)] = arrays["last_seq"]
        books.book_conn[:n] = arrays["book_conn"]
        for p in range(n):
            for side in (0, 1):
                keys = arrays[f"keys_{p}_{side}"]
                need = keys.shape[0] // (books.chunk_size // 2) + 4
                if need > int(books.meta[M_NFREE]) or need > books.order.shape[1]:
                    books._make_room(need)
                _load(2 * p + side, keys, arrays[f"sizes_{p}_{side}"], books.ck, books.cs, books.cn, books.free,
                      books.meta, books.order, books.cmax, books.nch)  # fmt: skip
        return books


def _grow(old: np.ndarray | None, shape: tuple[int, ...], dtype: type, fill: object) -> np.ndarray:
    new = np.full(shape, fill, dtype)
    if old is not None:
        new[tuple(slice(0, s) for s in old.shape)] = old
    return new


def _concat_samples(parts: list[Samples], depth: int) -> Samples:
    parts = [p for p in parts if len(p)]
    if not parts:
        e = np.zeros((0, depth), np.int64)
        return Samples(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.bool_), e, e, e, e)
    if len(parts) == 1:
        return parts[0]
    return Samples(*(np.concatenate([getattr(p, f) for p in parts]) for f in Samples.__dataclass_fields__))
