"""The compiled scanner: raw record lines of ``l2_data`` and ``market_trades`` frames -> columns.

Why. DuckDB's generic JSON reader builds nested Arrow for every line before the parser reads
it back; for level2, the bulk of a segment, that is most of the ETL's time, and trades are
most of the rest of the lines. This scanner reads the segment's bytes once and writes the
columns the book engine, the level2 table and the trades table need, and nothing else.

What it takes. A line is *accepted* only when it is a record whose frame the DuckDB path
would turn into exactly these values with no special case: strict JSON (RFC 8259: no
NaN, no trailing commas, no leading zeros, no control characters, ASCII only: ``\\uXXXX``
escapes below 0x80), the envelope ``recv_ns``/``conn``/``msg`` (integers, an object), the
frame's ``channel`` exactly ``l2_data`` or ``market_trades``, ``sequence_num`` an integer
when present, a plausible receive time, and then per channel:

- ``l2_data``: every event a ``type``/``product_id``/``updates`` object, every update its
  four strings (a side ``bid``/``offer``/``ask``, a time the fast RFC 3339 parser reads and
  that is plausible, a plain decimal price > 0 and size);
- ``market_trades`` (the channel named before the events, as Coinbase sends it): every
  event a ``type`` and a ``trades`` list, every trade its six strings (``trade_id`` and
  ``side`` without escapes, taken as they are; a plain decimal price > 0 and size; a
  plausible time the fast parser reads: else the DuckDB path would fall back to the frame's);

and a product id matching ``PRODUCT_ID_PATTERN`` (escapes in it are decoded). Keys may come
in any order with any JSON whitespace; unknown keys are skipped whatever their value
(validated). A known key twice, an escape in a key or in a value it reads (other than a
product id), a number with a fraction or an exponent where an integer goes, a key DuckDB
reads into a typed column where the scanner does not expect it, or anything else it does
not expect: the line is not accepted and is handed back as a byte range, for DuckDB (the
reference path) to decode. So the result never depends on which path read a line.

Speed: the helpers are compiled with ``_nrt=False`` (they never allocate), so numba does not
reference-count the arrays passed to them, which on this path cost more than the parsing
itself (~20 ns a call; measured), and LLVM inlines them. The record parser is compiled once
per channel (the events parser is chosen by the type of its outputs, an ``overload``, so each
copy holds only its channel's code): one parser holding both made level2 ~18 % slower.

Everything here works on one buffer of whole lines; :mod:`daedalus.etl.fastpath` feeds it
and merges its output with DuckDB's for the lines it hands back.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from daedalus.etl.decode import time_at, units_at

# status (meta[M_STATUS])
S_MAX_ROWS = 0  # stopped at the row limit
S_NEED_DATA = 1  # the buffer ends inside a line: refill and call again
S_NEED_ROOM = 2  # an output array is full: grow and call again
S_END = 3  # every line of the buffer consumed (at the end of the input)

# meta slots: the scanner's cursor and output counts (cumulative over calls)
M_POS, M_ROW, M_FRAMES, M_ROWS, M_EVENTS, M_FALLBACK, M_STATUS, M_TRADES, M_ID_BYTES, M_SIDE_BYTES = range(10)
N_META = 10
# the channel of an accepted frame (f_chan)
CH_L2, CH_TRADES = 1, 2
# product table meta
P_FORMS, P_BYTES = 0, 1
MAX_PRODUCT = 64  # PRODUCT_ID_PATTERN: at most 64 characters

EARLIEST_NS = 1_230_768_000 * 10**9  # as daedalus.etl.coinbase (imported from there would be circular)
CLOCK_SLACK_NS = 86_400 * 10**9

_OK, _FALLBACK, _ROOM = 0, 1, 2
O_RECV, O_CONN, O_SEQ, O_END, O_OTHER = range(5)  # _record's out
_OUT = 5
_INT64_MAX = 2**63 - 1


def _lit(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), np.uint8).copy()


K_RECV, K_CONN, K_MSG = _lit("recv_ns"), _lit("conn"), _lit("msg")
K_EVENT, K_RAW, K_RECEIVED, K_DROPPED = _lit("event"), _lit("raw"), _lit("received"), _lit("dropped")
K_CHANNEL, K_TIMESTAMP, K_SEQ, K_EVENTS = _lit("channel"), _lit("timestamp"), _lit("sequence_num"), _lit("events")
K_TYPE, K_MESSAGE, K_PRODUCT, K_UPDATES = _lit("type"), _lit("message"), _lit("product_id"), _lit("updates")
K_TRADES, K_TICKERS, K_CANDLES = _lit("trades"), _lit("tickers"), _lit("candles")
K_SIDE, K_TIME, K_PRICE, K_SIZE = _lit("side"), _lit("event_time"), _lit("price_level"), _lit("new_quantity")
K_TRADE_ID, K_TRADE_PRICE, K_TRADE_SIZE, K_TRADE_TIME = _lit("trade_id"), _lit("price"), _lit("size"), _lit("time")
V_TRADES = _lit("market_trades")
V_L2, V_SNAPSHOT, V_BID, V_OFFER, V_ASK = _lit("l2_data"), _lit("snapshot"), _lit("bid"), _lit("offer"), _lit("ask")
# an update exactly as Coinbase writes it (no whitespace, this key order): read without the general parser
L_SIDE, L_TIME = _lit('{"side":"'), _lit('","event_time":"')
L_PRICE, L_SIZE = _lit('","price_level":"'), _lit('","new_quantity":"')

QUOTE, BSLASH, COLON, COMMA = 34, 92, 58, 44
_CLASS = np.zeros(256, np.uint8)  # string bytes: 0 plain, 1 quote, 2 backslash, 3 not allowed (control, non-ASCII)
_CLASS[:32] = 3
_CLASS[128:] = 3
_CLASS[QUOTE] = 1
_CLASS[BSLASH] = 2
LBRACE, RBRACE, LBRACK, RBRACK = 123, 125, 91, 93


@intrinsic
def _load8(typingctx, arr, idx):
    """The 8 bytes of a uint8 array from ``idx`` as one uint64 (an unaligned load; little-endian
    on x86-64 and aarch64, the machines we run on). The caller keeps ``idx + 8`` in the data.
    Contiguous arrays only (typed so): the load reads the bytes as they lie in memory."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.uint8 and arr.ndim == 1 and arr.layout == "C"
            and isinstance(idx, types.Integer)):  # fmt: skip
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        word = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(64).as_pointer())
        return builder.load(word, align=1)

    return types.uint64(arr, idx), codegen


_ONES, _HIGHS, _QUOTES = np.uint64(0x0101010101010101), np.uint64(0x8080808080808080), np.uint64(0x2222222222222222)
_BACKSLASHES, _SPACES, _ZERO = np.uint64(0x5C5C5C5C5C5C5C5C), np.uint64(0x2020202020202020), np.uint64(0)


@njit(cache=True, _nrt=False)
def _has_zero_byte(w):
    """Whether a byte of ``w`` is zero (exact: the classic test, its false bits only above a zero)."""
    return (w - _ONES) & ~w & _HIGHS != _ZERO


@njit(cache=True, _nrt=False)
def _plain_word(w):
    """Whether 8 string bytes are all plain (no quote, backslash, control or non-ASCII byte)."""
    below_space = (w - _SPACES) & ~w & _HIGHS  # a byte < 0x20 (exact for bytes < 0x80)
    return (w & _HIGHS) == _ZERO and below_space == _ZERO and not _has_zero_byte(w ^ _QUOTES) and not (
        _has_zero_byte(w ^ _BACKSLASHES))


@njit(cache=True, _nrt=False)
def _same(b, p, other, q, n):
    """Whether ``b[p:p+n]`` equals ``other[q:q+n]`` (both in bounds), eight bytes at a time."""
    k = 0
    while k + 8 <= n:
        if _load8(b, p + k) != _load8(other, q + k):
            return False
        k += 8
    while k < n:
        if b[p + k] != other[q + k]:
            return False
        k += 1
    return True


@njit(cache=True, _nrt=False)
def _is(b, a, z, lit):
    return z - a == lit.shape[0] and _same(b, a, lit, 0, lit.shape[0])


@njit(cache=True, _nrt=False)
def _ws(b, p, e):
    while p < e:  # never a newline: lines are cut at newlines, and the parser must not cross one
        c = b[p]
        if c != 32 and c != 9 and c != 13:
            break
        p += 1
    return p


@njit(cache=True, _nrt=False)
def _hex(c):
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 102:
        return c - 87
    if 65 <= c <= 70:
        return c - 55
    return -1


@njit(cache=True, _nrt=False)
def _string(b, p, e):
    """``b[p]`` is a quote: (end after the closing quote or -1, escaped). Strict JSON, ASCII only."""
    p += 1
    while p + 8 <= e and _plain_word(_load8(b, p)):  # plain runs eight bytes at a time
        p += 8
    esc = False
    while p < e:
        c = b[p]
        k = _CLASS[c]
        if k == 0:
            p += 1
            continue
        if c == QUOTE:
            return p + 1, esc
        if k == 3:
            return -1, esc
        if c == BSLASH:
            esc = True
            if p + 1 >= e:
                return -1, esc
            d = b[p + 1]
            if d == 117:  # \uXXXX, below 0x80 only
                if p + 5 >= e:
                    return -1, esc
                v = 0
                for k in range(2, 6):
                    h = _hex(b[p + k])
                    if h < 0:
                        return -1, esc
                    v = v * 16 + h
                if v >= 128:
                    return -1, esc
                p += 6
                continue
            if d != QUOTE and d != BSLASH and d != 47 and d != 98 and d != 102 and d != 110 and d != 114 and d != 116:
                return -1, esc
            p += 2
            continue
        p += 1
    return -1, esc


@njit(cache=True, _nrt=False)
def _unescape(b, a, z, out):
    """The JSON string body ``b[a:z]`` (validated by :func:`_string`) decoded into ``out``;
    its length, or -1 when longer than ``out``."""
    n = 0
    p = a
    while p < z:
        if n >= out.shape[0]:
            return -1
        c = b[p]
        if c == BSLASH:
            d = b[p + 1]
            if d == 117:
                c = _hex(b[p + 2]) * 4096 + _hex(b[p + 3]) * 256 + _hex(b[p + 4]) * 16 + _hex(b[p + 5])
                p += 6
            else:
                p += 2
                if d == 98:
                    c = 8
                elif d == 102:
                    c = 12
                elif d == 110:
                    c = 10
                elif d == 114:
                    c = 13
                elif d == 116:
                    c = 9
                else:
                    c = d
        else:
            p += 1
        out[n] = c
        n += 1
    return n


@njit(cache=True, _nrt=False)
def _integer(b, p, e):
    """A JSON integer within int64 at ``p`` (-2**63 excluded): (value, end) or (0, -1)."""
    neg = False
    if p < e and b[p] == 45:
        neg = True
        p += 1
    start = p
    v = 0
    while p < e and 48 <= b[p] <= 57:
        d = b[p] - 48
        if v > (_INT64_MAX - d) // 10:
            return 0, -1
        v = v * 10 + d
        p += 1
    n = p - start
    if n == 0 or (n > 1 and b[start] == 48):
        return 0, -1
    if p < e and (b[p] == 46 or b[p] == 101 or b[p] == 69):  # a fraction or an exponent: not an integer here
        return 0, -1
    return (-v if neg else v), p


@njit(cache=True, _nrt=False)
def _number_end(b, p, e):
    """End of a JSON number (RFC 8259 grammar) at ``p``, or -1."""
    if p < e and b[p] == 45:
        p += 1
    if p >= e:
        return -1
    if b[p] == 48:
        p += 1
    elif 49 <= b[p] <= 57:
        while p < e and 48 <= b[p] <= 57:
            p += 1
    else:
        return -1
    if p < e and b[p] == 46:
        p += 1
        s = p
        while p < e and 48 <= b[p] <= 57:
            p += 1
        if p == s:
            return -1
    if p < e and (b[p] == 101 or b[p] == 69):
        p += 1
        if p < e and (b[p] == 43 or b[p] == 45):
            p += 1
        s = p
        while p < e and 48 <= b[p] <= 57:
            p += 1
        if p == s:
            return -1
    return p


@njit(cache=True, _nrt=False)
def _literal(b, p, e):
    """End of ``true``/``false``/``null`` at ``p``, or -1."""
    c = b[p]
    if c == 116 and p + 4 <= e and b[p + 1] == 114 and b[p + 2] == 117 and b[p + 3] == 101:
        return p + 4
    if c == 110 and p + 4 <= e and b[p + 1] == 117 and b[p + 2] == 108 and b[p + 3] == 108:
        return p + 4
    if c == 102 and p + 5 <= e and b[p + 1] == 97 and b[p + 2] == 108 and b[p + 3] == 115 and b[p + 4] == 101:
        return p + 5
    return -1


@njit(cache=True, _nrt=False)
def _key(b, p, e):
    """A key and its colon at ``p``: (key start, key end, position after the colon) or -1s.
    Escaped keys are refused (DuckDB would decode them; we do not)."""
    p = _ws(b, p, e)
    if p >= e or b[p] != QUOTE:
        return -1, -1, -1
    end, esc = _string(b, p, e)
    if end < 0 or esc:
        return -1, -1, -1
    q = _ws(b, end, e)
    if q >= e or b[q] != COLON:
        return -1, -1, -1
    return p + 1, end - 1, q + 1


@njit(cache=True, _nrt=False)
def _skip(b, p, e, stack):
    """End of any JSON value at ``p`` (after whitespace), validated, or -1. Iterative, depth
    bounded by ``stack``."""
    depth = 0
    while True:
        p = _ws(b, p, e)
        if p >= e:
            return -1
        c = b[p]
        closed = False
        if c == LBRACE or c == LBRACK:  # noqa: SIM109 (numba: plain comparisons)
            if depth >= stack.shape[0]:
                return -1
            stack[depth] = c
            depth += 1
            p = _ws(b, p + 1, e)
            if p >= e:
                return -1
            if (c == LBRACE and b[p] == RBRACE) or (c == LBRACK and b[p] == RBRACK):
                depth -= 1
                p += 1
                closed = True
            elif c == LBRACE:
                _, _, p = _key(b, p, e)
                if p < 0:
                    return -1
                continue
            else:
                continue
        if not closed:
            if c == QUOTE:
                p, _ = _string(b, p, e)
            elif c == 45 or 48 <= c <= 57:
                p = _number_end(b, p, e)
            else:
                p = _literal(b, p, e)
            if p < 0:
                return -1
        # after a value: close containers, or go on with the next element
        nxt = False
        while depth > 0:
            p = _ws(b, p, e)
            if p >= e:
                return -1
            c = b[p]
            top = stack[depth - 1]
            if c == COMMA:
                p += 1
                if top == LBRACE:
                    _, _, p = _key(b, p, e)
                    if p < 0:
                        return -1
                nxt = True
                break
            if (top == LBRACE and c == RBRACE) or (top == LBRACK and c == RBRACK):
                depth -= 1
                p += 1
                continue
            return -1
        if not nxt:
            return p


@njit(cache=True, _nrt=False)
def _plain_string(b, p, e):
    """A string value without escapes at ``p``: (body start, body end) or (-1, -1)."""
    p = _ws(b, p, e)
    if p >= e or b[p] != QUOTE:
        return -1, -1
    end, esc = _string(b, p, e)
    if end < 0 or esc:
        return -1, -1
    return p + 1, end - 1


@njit(cache=True, _nrt=False)
def _after_member(b, p, e, close):
    """After a member's value ending at ``p`` (-1: the value was refused, which passes on):
    (position after ``,``, False) or (after ``close``, True), or (-1, _)."""
    if p < 0:
        return -1, False
    p = _ws(b, p, e)
    if p >= e:
        return -1, False
    if b[p] == COMMA:
        return p + 1, False
    if b[p] == close:
        return p + 1, True
    return -1, False


@njit(cache=True, _nrt=False)
def _product(b, a, z, tmp, pt_slot, pt_bytes, pt_off, pt_ok, pmeta):
    """The product id ``b[a:z]`` (a string body, maybe escaped) -> its form number in the
    product table (interned by decoded bytes), or -1 when it is not a valid id or the table is full."""
    n = _unescape(b, a, z, tmp)
    if n <= 0 or n > MAX_PRODUCT:
        return -1
    h = np.uint64(14695981039346656037)
    for i in range(n):
        h = (h ^ np.uint64(tmp[i])) * np.uint64(1099511628211)
    mask = pt_slot.shape[0] - 1
    s = np.int64(h & np.uint64(mask))
    while True:
        f = pt_slot[s]
        if f < 0:
            break
        lo, hi = pt_off[f], pt_off[f + 1]
        if hi - lo == n:
            same = True
            for i in range(n):
                if pt_bytes[lo + i] != tmp[i]:
                    same = False
                    break
            if same:
                return f if pt_ok[f] else -1
        s = (s + 1) & mask
    nf = pmeta[P_FORMS]
    used = pmeta[P_BYTES]
    if 2 * (nf + 1) > pt_slot.shape[0] or nf + 1 >= pt_ok.shape[0] or used + n > pt_bytes.shape[0]:
        return -1  # full: the line goes to DuckDB
    ok = True
    for i in range(n):  # PRODUCT_ID_PATTERN: ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$
        c = tmp[i]
        alnum = (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122)
        if not alnum and (i == 0 or (c != 46 and c != 95 and c != 45)):
            ok = False
        pt_bytes[used + i] = c
    pt_off[nf + 1] = used + n
    pt_ok[nf] = ok
    pt_slot[s] = nf
    pmeta[P_FORMS] = nf + 1
    pmeta[P_BYTES] = used + n
    return nf if ok else -1


@njit(cache=True, _nrt=False)
def _match(b, p, e, lit):
    """Whether ``b[p:]`` starts with ``lit``."""
    return p + lit.shape[0] <= e and _same(b, p, lit, 0, lit.shape[0])


@njit(cache=True, _nrt=False)
def _quote_within(b, p, e, limit):
    """Position of the first quote in ``b[p:p+limit]``, or -1. Eight bytes at a time: a word
    holds a quote when one of its bytes XOR 0x22 is zero (the classic zero-byte test)."""
    z = min(e, p + limit)
    while p + 8 <= z:
        if _has_zero_byte(_load8(b, p) ^ _QUOTES):
            break  # the quote is in these 8 bytes: the loop below finds it
        p += 8
    while p < z:
        if b[p] == QUOTE:
            return p
        p += 1
    return -1


@njit(cache=True, _nrt=False)
def _update_canonical(b, p, e, r, r_side, r_px, r_sz, r_ts, tbytes, tmeta):
    """One update written exactly as Coinbase does (``{"side":"bid","event_time":"...",
    "price_level":"...","new_quantity":"..."}``): its end; -2 when it is written otherwise
    (the general :func:`_update` reads it then); -1 when a value is wrong. The time string
    of the previous update is kept (``tbytes``/``tmeta``): a frame's updates mostly share it."""
    if not _match(b, p, e, L_SIDE):
        return -2
    p += L_SIDE.shape[0]
    if p + 5 < e and b[p] == 98 and b[p + 1] == 105 and b[p + 2] == 100:  # bid
        r_side[r] = 0
        p += 3
    elif p + 5 < e and b[p] == 111 and b[p + 1] == 102 and b[p + 2] == 102 and b[p + 3] == 101 and b[p + 4] == 114:
        r_side[r] = 1  # offer
        p += 5
    elif p + 3 < e and b[p] == 97 and b[p + 1] == 115 and b[p + 2] == 107:  # ask
        r_side[r] = 1
        p += 3
    else:
        return -2
    if not _match(b, p, e, L_TIME):
        return -2
    p += L_TIME.shape[0]
    q = _quote_within(b, p, e, 40)
    if q < 0:
        return -2
    n = q - p
    if n == tmeta[0] and _same(b, p, tbytes, 0, n):
        r_ts[r] = tmeta[1]
    else:
        ns, ok = time_at(b, p, q)
        if not ok:
            return -2  # (an escape, say: the general reader decides)
        r_ts[r] = ns
        for i in range(n):
            tbytes[i] = b[p + i]
        tmeta[0] = n
        tmeta[1] = ns
    p = q
    if not _match(b, p, e, L_PRICE):
        return -2
    p += L_PRICE.shape[0]
    q = _quote_within(b, p, e, 40)
    if q < 0:
        return -2
    v, ok = units_at(b, p, q, True)
    if not ok or v <= 0:
        return -2
    r_px[r] = v
    p = q
    if not _match(b, p, e, L_SIZE):
        return -2
    p += L_SIZE.shape[0]
    q = _quote_within(b, p, e, 40)
    if q < 0:
        return -2
    v, ok = units_at(b, p, q, True)
    if not ok:
        return -2
    r_sz[r] = v
    if q + 1 >= e or b[q + 1] != RBRACE:
        return -2
    return q + 2


@njit(cache=True, _nrt=False)
def _update(b, p, e, r, r_side, r_px, r_sz, r_ts, stack):
    """One update object at ``p`` into row ``r``: its end, or -1."""
    p = _ws(b, p, e)
    if p >= e or b[p] != LBRACE:
        return -1
    p = _ws(b, p + 1, e)
    if p < e and b[p] == RBRACE:
        return -1  # all four are required
    seen = 0
    while True:
        ka, kz, p = _key(b, p, e)
        if p < 0:
            return -1
        bit = 0
        if _is(b, ka, kz, K_SIDE):
            bit = 1
        elif _is(b, ka, kz, K_TIME):
            bit = 2
        elif _is(b, ka, kz, K_PRICE):
            bit = 4
        elif _is(b, ka, kz, K_SIZE):
            bit = 8
        if bit == 0:
            p = _skip(b, p, e, stack)
            if p < 0:
                return -1
        else:
            if seen & bit:
                return -1  # a known key twice: DuckDB refuses the line
            seen |= bit
            va, vz = _plain_string(b, p, e)
            if va < 0:
                return -1
            p = vz + 1
            if bit == 1:
                if _is(b, va, vz, V_BID):
                    r_side[r] = 0
                elif _is(b, va, vz, V_OFFER) or _is(b, va, vz, V_ASK):
                    r_side[r] = 1
                else:
                    return -1
            elif bit == 2:
                ns, ok = time_at(b, va, vz)
                if not ok:
                    return -1
                r_ts[r] = ns
            elif bit == 4:
                v, ok = units_at(b, va, vz, True)
                if not ok or v <= 0:
                    return -1
                r_px[r] = v
            else:
                v, ok = units_at(b, va, vz, True)
                if not ok:
                    return -1
                r_sz[r] = v
        p, done = _after_member(b, p, e, RBRACE)
        if p < 0:
            return -1
        if done:
            return p if seen == 15 else -1


@njit(cache=True, _nrt=False)
def _copy_text(b, a, z, chars, used):
    """Append ``b[a:z]`` to ``chars`` from ``used``: the new end, or -1 when it does not fit."""
    n = z - a
    if used + n > chars.shape[0]:
        return -1
    for i in range(n):
        chars[used + i] = b[a + i]
    return used + n


@njit(cache=True, _nrt=False)
def _trade(b, p, e, t, tmp, pt_slot, pt_bytes, pt_off, pt_ok, pmeta, t_ts, t_prod, t_px, t_sz, t_idc, t_ide,
           t_sidec, t_sidee, ic, sc, stack):  # fmt: skip
    """One trade object at ``p`` into trade ``t``, its ``trade_id`` and ``side`` appended to
    the text arrays from ``ic`` / ``sc``: (its end, or -1 to hand the line back, or -3 when a
    text array is full; the new ``ic``, ``sc``). All six fields are required, each a string
    DuckDB would read to the same value (only a product id may hold escapes)."""
    p = _ws(b, p, e)
    if p >= e or b[p] != LBRACE:
        return -1, ic, sc
    p = _ws(b, p + 1, e)
    if p < e and b[p] == RBRACE:
        return -1, ic, sc
    seen = 0
    while True:
        ka, kz, p = _key(b, p, e)
        if p < 0:
            return -1, ic, sc
        bit = 0
        if _is(b, ka, kz, K_TRADE_ID):
            bit = 1
        elif _is(b, ka, kz, K_PRODUCT):
            bit = 2
        elif _is(b, ka, kz, K_TRADE_PRICE):
            bit = 4
        elif _is(b, ka, kz, K_TRADE_SIZE):
            bit = 8
        elif _is(b, ka, kz, K_SIDE):
            bit = 16
        elif _is(b, ka, kz, K_TRADE_TIME):
            bit = 32
        if bit == 0:
            p = _skip(b, p, e, stack)
            if p < 0:
                return -1, ic, sc
        else:
            if seen & bit:
                return -1, ic, sc  # a known key twice: DuckDB refuses the line
            seen |= bit
            p = _ws(b, p, e)
            if p >= e or b[p] != QUOTE:
                return -1, ic, sc
            end, esc = _string(b, p, e)
            if end < 0 or (esc and bit != 2):
                return -1, ic, sc
            va, vz = p + 1, end - 1
            p = end
            if bit == 1:
                ic = _copy_text(b, va, vz, t_idc, ic)
                if ic < 0:
                    return -3, ic, sc
                t_ide[t] = ic
            elif bit == 2:
                prod = _product(b, va, vz, tmp, pt_slot, pt_bytes, pt_off, pt_ok, pmeta)
                if prod < 0:
                    return -1, ic, sc
                t_prod[t] = prod
            elif bit == 4:
                v, ok = units_at(b, va, vz, True)
                if not ok or v <= 0:
                    return -1, ic, sc
                t_px[t] = v
            elif bit == 8:
                v, ok = units_at(b, va, vz, True)
                if not ok:
                    return -1, ic, sc
                t_sz[t] = v
            elif bit == 16:
                sc = _copy_text(b, va, vz, t_sidec, sc)
                if sc < 0:
                    return -3, ic, sc
                t_sidee[t] = sc
            else:
                ns, ok = time_at(b, va, vz)
                if not ok:
                    return -1, ic, sc
                t_ts[t] = ns
        p, done = _after_member(b, p, e, RBRACE)
        if p < 0:
            return -1, ic, sc
        if done:
            return (p if seen == 63 else -1), ic, sc


# The events parsers of the two channels: ``outs``, the channel's output arrays (a tuple);
# ``cnt``, the working counters, committed by :func:`scan` only when the line is accepted
# (C_ROWS, C_EVENTS: level2; C_TRADES, C_ID_BYTES, C_SIDE_BYTES: trades). Each returns the
# end of the events array, -1 (hand the line back) or -3 (an output is full).
C_ROWS, C_EVENTS, C_TRADES, C_ID_BYTES, C_SIDE_BYTES = range(5)


@njit(cache=True, _nrt=False)
def _open(b, p, e, opener, closer):
    """A container at ``p`` (after whitespace): (position after the opener and whitespace,
    False), (position after the closer, True) when it is empty, or (-1, False)."""
    p = _ws(b, p, e)
    if p >= e or b[p] != opener:
        return -1, False
    p = _ws(b, p + 1, e)
    if p < e and b[p] == closer:
        return p + 1, True
    return p, False


@njit(cache=True, _nrt=False)
def _event_type(b, p, e, eseen):
    """An event's ``type`` (bit 1 of ``eseen``): (position after it, is it ``snapshot``), or -1."""
    if eseen & 1:
        return -1, False
    va, vz = _plain_string(b, p, e)
    if va < 0:
        return -1, False
    return vz + 1, _is(b, va, vz, V_SNAPSHOT)


@njit(cache=True, _nrt=False)
def _l2_events(b, p, e, frame, outs, cnt, tmp, pt_slot, pt_bytes, pt_off, pt_ok, pmeta, stack, tbytes, tmeta):
    """The ``events`` array of an ``l2_data`` frame: each a ``type``/``product_id``/``updates`` object."""
    r_prod, r_side, r_px, r_sz, r_snap, r_ts, e_frame, e_prod = outs
    cap_rows = r_prod.shape[0]
    cap_events = e_prod.shape[0]
    n_rows = cnt[C_ROWS]
    n_events = cnt[C_EVENTS]
    p, empty = _open(b, p, e, LBRACK, RBRACK)
    if p < 0 or empty:
        return p
    while True:  # ---- one event ----
        p, empty = _open(b, p, e, LBRACE, RBRACE)
        if p < 0 or empty:
            return -1
        if n_events >= cap_events:
            return -3
        eseen = 0  # 1 type, 2 product_id, 4 updates
        snap = False
        prod = -1
        first = n_rows
        while True:
            ka, kz, p = _key(b, p, e)
            if p < 0:
                return -1
            if _is(b, ka, kz, K_TYPE):
                p, snap = _event_type(b, p, e, eseen)
                eseen |= 1
            elif _is(b, ka, kz, K_PRODUCT):
                if eseen & 2:
                    return -1
                eseen |= 2
                p = _ws(b, p, e)
                if p >= e or b[p] != QUOTE:
                    return -1
                end, _ = _string(b, p, e)
                if end < 0:
                    return -1
                prod = _product(b, p + 1, end - 1, tmp, pt_slot, pt_bytes, pt_off, pt_ok, pmeta)
                if prod < 0:
                    return -1
                p = end
            elif _is(b, ka, kz, K_UPDATES):
                if eseen & 4:
                    return -1
                eseen |= 4
                p, empty = _open(b, p, e, LBRACK, RBRACK)
                while p >= 0 and not empty:
                    if n_rows >= cap_rows:
                        return -3
                    q = -2
                    if b[p] == LBRACE:
                        q = _update_canonical(b, p, e, n_rows, r_side, r_px, r_sz, r_ts, tbytes, tmeta)
                    if q == -2:
                        q = _update(b, p, e, n_rows, r_side, r_px, r_sz, r_ts, stack)
                    if q < 0:
                        return -1
                    n_rows += 1
                    p, empty = _after_member(b, q, e, RBRACK)
            elif _is(b, ka, kz, K_TRADES) or _is(b, ka, kz, K_TICKERS) or _is(b, ka, kz, K_CANDLES):
                return -1
            else:
                p = _skip(b, p, e, stack)
            p, done = _after_member(b, p, e, RBRACE)
            if p < 0:
                return -1
            if done:
                break
        if eseen != 7:
            return -1
        for r in range(first, n_rows):
            r_prod[r] = prod
            r_snap[r] = snap
        e_frame[n_events] = frame
        e_prod[n_events] = prod
        n_events += 1
        cnt[C_ROWS] = n_rows
        cnt[C_EVENTS] = n_events
        p, done = _after_member(b, p, e, RBRACK)
        if p < 0 or done:
            return p


@njit(cache=True, _nrt=False)
def _trade_events(b, p, e, frame, outs, cnt, tmp, pt_slot, pt_bytes, pt_off, pt_ok, pmeta, stack, tbytes, tmeta):
    """The ``events`` array of a ``market_trades`` frame: each a ``type`` and a ``trades``
    list; another key DuckDB reads there (into a typed column) sends the line back."""
    t_frame, t_ts, t_prod, t_px, t_sz, t_snap, t_idc, t_ide, t_sidec, t_sidee = outs
    cap = t_frame.shape[0]
    nt, ic, sc = cnt[C_TRADES], cnt[C_ID_BYTES], cnt[C_SIDE_BYTES]
    p, empty = _open(b, p, e, LBRACK, RBRACK)
    if p < 0 or empty:
        return p
    while True:
        p, empty = _open(b, p, e, LBRACE, RBRACE)
        if p < 0 or empty:
            return -1
        eseen = 0  # 1 type, 2 trades
        snap = False
        first = nt
        while True:
            ka, kz, p = _key(b, p, e)
            if p < 0:
                return -1
            if _is(b, ka, kz, K_TYPE):
                p, snap = _event_type(b, p, e, eseen)
                eseen |= 1
            elif _is(b, ka, kz, K_TRADES):
                if eseen & 2:
                    return -1
                eseen |= 2
                p, empty = _open(b, p, e, LBRACK, RBRACK)
                while p >= 0 and not empty:
                    if nt >= cap:
                        return -3
                    q, ic, sc = _trade(b, p, e, nt, tmp, pt_slot, pt_bytes, pt_off, pt_ok, pmeta, t_ts, t_prod, t_px,
                                       t_sz, t_idc, t_ide, t_sidec, t_sidee, ic, sc, stack)  # fmt: skip
                    if q < 0:
                        return q
                    t_frame[nt] = frame
                    nt += 1
                    p, empty = _after_member(b, q, e, RBRACK)
            elif (_is(b, ka, kz, K_PRODUCT) or _is(b, ka, kz, K_UPDATES) or _is(b, ka, kz, K_TICKERS)
                  or _is(b, ka, kz, K_CANDLES)):  # fmt: skip
                return -1
            else:
                p = _skip(b, p, e, stack)
            p, done = _after_member(b, p, e, RBRACE)
            if p < 0:
                return -1
            if done:
                break
        if eseen != 3:
            return -1
        for t in range(first, nt):
            t_snap[t] = snap
        cnt[C_TRADES], cnt[C_ID_BYTES], cnt[C_SIDE_BYTES] = nt, ic, sc
        p, done = _after_member(b, p, e, RBRACK)
        if p < 0 or done:
            return p


N_TRADE_OUTS = 10  # arrays of the trades' outputs (the level2 outputs are 8)


def _events(b, p, e, frame, outs, cnt, tmp, pt_slot, pt_bytes, pt_off, pt_ok, pmeta, stack, tbytes, tmeta):
    """The events parser of the channel whose outputs ``outs`` are, chosen when numba compiles
    the caller (see the overload below): each copy of :func:`_record` holds only its own."""
    raise NotImplementedError("compiled code only")


@overload(_events)
def _events_for(b, p, e, frame, outs, cnt, tmp, pt_slot, pt_bytes, pt_off, pt_ok, pmeta, stack, tbytes, tmeta):
    parser = _trade_events if len(outs) == N_TRADE_OUTS else _l2_events

    def impl(b, p, e, frame, outs, cnt, tmp, pt_slot, pt_bytes, pt_off, pt_ok, pmeta, stack, tbytes, tmeta):
        return parser(b, p, e, frame, outs, cnt, tmp, pt_slot, pt_bytes, pt_off, pt_ok, pmeta, stack, tbytes, tmeta)

    return impl


@njit(cache=True, _nrt=False)
def _record(b, a, e, frame, channel, other, outs, cnt, tmp, pt_slot, pt_bytes, pt_off, pt_ok, pmeta, stack, out,
            tbytes, tmeta):  # fmt: skip
    """One record line from ``b[a]`` whose frame's channel is ``channel``, its events read into
    ``outs`` by that channel's parser (``e``: the end of the buffer; nothing it accepts spans a
    newline): _OK with out = (recv, conn, seq, end of the record and the whitespace after it),
    _FALLBACK (``out[O_OTHER]``: the channel is ``other``, worth reading as that), or _ROOM (an
    output array is full). Compiled once per channel (the type of ``outs`` differs)."""
    out[O_OTHER] = 0
    p = _ws(b, a, e)
    if p >= e or b[p] != LBRACE:
        return _FALLBACK
    p += 1
    recv = -1
    conn = 0
    seq = -1
    seen = 0  # 1 recv_ns, 2 conn, 4 msg
    while True:
        ka, kz, p = _key(b, p, e)
        if p < 0:
            return _FALLBACK
        if _is(b, ka, kz, K_RECV) or _is(b, ka, kz, K_CONN):
            bit = 1 if kz - ka == 7 else 2
            if seen & bit:
                return _FALLBACK
            seen |= bit
            v, p = _integer(b, _ws(b, p, e), e)
            if p < 0:
                return _FALLBACK
            if bit == 1:
                recv = v
            else:
                conn = v
        elif _is(b, ka, kz, K_MSG):
            if seen & 4:
                return _FALLBACK
            seen |= 4
            # ---- the frame ----
            p = _ws(b, p, e)
            if p >= e or b[p] != LBRACE:
                return _FALLBACK
            p = _ws(b, p + 1, e)
            if p < e and b[p] == RBRACE:
                return _FALLBACK  # no channel
            fseen = 0  # 1 channel, 2 timestamp, 4 sequence_num, 8 events
            while True:
                ka, kz, p = _key(b, p, e)
                if p < 0:
                    return _FALLBACK
                if _is(b, ka, kz, K_CHANNEL):
                    if fseen & 1:
                        return _FALLBACK
                    fseen |= 1
                    va, vz = _plain_string(b, p, e)
                    if va < 0:
                        return _FALLBACK
                    if not _is(b, va, vz, channel):
                        out[O_OTHER] = _is(b, va, vz, other) and not fseen & 8  # worth reading as ``other``
                        return _FALLBACK
                    p = vz + 1
                elif _is(b, ka, kz, K_TIMESTAMP):  # read by the DuckDB path only when an item's time is
                    if fseen & 2:  # missing or implausible, which the scanner never accepts: checked, not parsed
                        return _FALLBACK
                    fseen |= 2
                    p = _ws(b, p, e)
                    if p >= e or b[p] != QUOTE:
                        return _FALLBACK
                    p, _ = _string(b, p, e)
                    if p < 0:
                        return _FALLBACK
                elif _is(b, ka, kz, K_SEQ):
                    if fseen & 4:
                        return _FALLBACK
                    fseen |= 4
                    seq, p = _integer(b, _ws(b, p, e), e)
                    if p < 0:
                        return _FALLBACK
                elif _is(b, ka, kz, K_EVENTS):  # (before the channel: read as this channel's, checked after)
                    if fseen & 8:
                        return _FALLBACK
                    fseen |= 8
                    p = _events(b, p, e, frame, outs, cnt, tmp, pt_slot, pt_bytes, pt_off, pt_ok, pmeta, stack, tbytes,
                                tmeta)  # fmt: skip
                    if p == -3:
                        return _ROOM
                    if p < 0:
                        return _FALLBACK
                elif _is(b, ka, kz, K_TYPE) or _is(b, ka, kz, K_MESSAGE):
                    return _FALLBACK  # errors and other frame kinds: DuckDB's path decides
                else:
                    p = _skip(b, p, e, stack)
                p, done = _after_member(b, p, e, RBRACE)
                if p < 0:
                    return _FALLBACK
                if done:
                    break
            if not fseen & 1:
                return _FALLBACK
        elif (_is(b, ka, kz, K_EVENT) or _is(b, ka, kz, K_RAW) or _is(b, ka, kz, K_RECEIVED)
              or _is(b, ka, kz, K_DROPPED)):  # fmt: skip
            return _FALLBACK  # control lines and undecodable frames: the DuckDB path
        else:
            p = _skip(b, p, e, stack)
        p, done = _after_member(b, p, e, RBRACE)
        if p < 0:
            return _FALLBACK
        if done:
            break
    if seen != 7:
        return _FALLBACK
    out[O_END] = _ws(b, p, e)  # where the line should end
    out[O_RECV] = recv
    out[O_CONN] = conn
    out[O_SEQ] = seq
    return _OK


@njit(cache=True)
def scan(b, end, eof, max_row, now_ns, pt_slot, pt_bytes, pt_off, pt_ok, pmeta,
         f_row, f_recv, f_conn, f_seq, f_re, f_chan, r_prod, r_side, r_px, r_sz, r_snap, r_ts, e_frame, e_prod,
         t_frame, t_ts, t_prod, t_px, t_sz, t_snap, t_idc, t_ide, t_sidec, t_sidee, x_row, x_a, x_b, meta):  # fmt: skip
    """Scan the lines of ``b[meta[M_POS]:end]`` until the segment row ``max_row`` (a row is a
    line with something besides whitespace, as DuckDB counts them). Accepted lines append a
    frame (``f_*``, its channel ``f_chan``; level2 rows ``f_re[k-1]:f_re[k]``), their level2
    rows (``r_*``) and events (``e_*``) or their trades (``t_*``, frame ``t_frame``; trade ids
    and sides as text ending at ``t_ide`` / ``t_sidee`` in ``t_idc`` / ``t_sidec``); the
    others append their row number and byte range (``x_*``). Stops at a line it cannot
    finish (not ``eof``: S_NEED_DATA), at an output that is full (S_NEED_ROOM, nothing of the
    line written), at ``max_row`` (S_MAX_ROWS) or at ``end`` (S_END)."""
    stack = np.empty(64, np.uint8)
    tmp = np.empty(256, np.uint8)
    out = np.zeros(_OUT, np.int64)
    tbytes = np.zeros(64, np.uint8)
    tmeta = np.full(2, -1, np.int64)
    l2_outs = (r_prod, r_side, r_px, r_sz, r_snap, r_ts, e_frame, e_prod)
    trade_outs = (t_frame, t_ts, t_prod, t_px, t_sz, t_snap, t_idc, t_ide, t_sidec, t_sidee)
    latest_recv = now_ns + CLOCK_SLACK_NS
    pos = meta[M_POS]
    row = meta[M_ROW]
    nf, nx = meta[M_FRAMES], meta[M_FALLBACK]
    done = np.empty(5, np.int64)  # the counters of the accepted lines (``cnt``: the line's, working)
    done[C_ROWS], done[C_EVENTS], done[C_TRADES] = meta[M_ROWS], meta[M_EVENTS], meta[M_TRADES]
    done[C_ID_BYTES], done[C_SIDE_BYTES] = meta[M_ID_BYTES], meta[M_SIDE_BYTES]
    cnt = done.copy()
    status = S_END
    while pos < end:
        if row >= max_row:
            status = S_MAX_ROWS
            break
        if nf >= f_row.shape[0] or nx >= x_row.shape[0]:
            status = S_NEED_ROOM
            break
        # parse first (the line's end is where the record ends): one pass over the bytes
        chan = CH_L2
        code = _record(b, pos, end, nf, V_L2, V_TRADES, l2_outs, cnt, tmp, pt_slot, pt_bytes, pt_off,
                       pt_ok, pmeta, stack, out, tbytes, tmeta)  # fmt: skip
        if code == _FALLBACK and out[O_OTHER]:  # a market_trades frame: read again as one (its start only twice)
            cnt[:] = done
            chan = CH_TRADES
            code = _record(b, pos, end, nf, V_TRADES, V_L2, trade_outs, cnt, tmp, pt_slot, pt_bytes,
                           pt_off, pt_ok, pmeta, stack, out, tbytes, tmeta)  # fmt: skip
        if code == _ROOM:
            status = S_NEED_ROOM
            break
        nl = out[O_END]
        if code == _OK and nl == end and not eof:
            status = S_NEED_DATA  # whatever follows decides
            break
        if code != _OK or (nl < end and b[nl] != 10):
            code = _FALLBACK
            nl = pos
            while nl < end and b[nl] != 10:
                nl += 1
            if nl == end and not eof:
                status = S_NEED_DATA
                break
            blank = True
            for j in range(pos, nl):
                c = b[j]
                if c != 32 and c != 9 and c != 13:
                    blank = False
                    break
            if blank:
                pos = nl + 1
                cnt[:] = done
                continue
        if code == _OK:
            recv = out[O_RECV]
            if recv < EARLIEST_NS or recv > latest_recv:
                code = _FALLBACK
            else:  # an implausible exchange time falls back to another time: DuckDB's path decides
                latest_ts = recv + CLOCK_SLACK_NS
                for r in range(done[C_ROWS], cnt[C_ROWS]):
                    if r_ts[r] < EARLIEST_NS or r_ts[r] > latest_ts:
                        code = _FALLBACK
                        break
                for t in range(done[C_TRADES], cnt[C_TRADES]):
                    if t_ts[t] < EARLIEST_NS or t_ts[t] > latest_ts:
                        code = _FALLBACK
                        break
        if code == _OK:
            f_row[nf] = row
            f_recv[nf] = out[O_RECV]
            f_conn[nf] = out[O_CONN]
            f_seq[nf] = out[O_SEQ]
            f_re[nf] = cnt[C_ROWS]
            f_chan[nf] = chan
            nf += 1
            done[:] = cnt
        else:
            x_row[nx] = row
            x_a[nx] = pos
            x_b[nx] = nl
            nx += 1
            cnt[:] = done
        row += 1
        pos = nl + 1
    meta[M_POS] = min(pos, end)
    meta[M_ROW] = row
    meta[M_FRAMES], meta[M_FALLBACK] = nf, nx
    meta[M_ROWS], meta[M_EVENTS], meta[M_TRADES] = done[C_ROWS], done[C_EVENTS], done[C_TRADES]
    meta[M_ID_BYTES], meta[M_SIDE_BYTES] = done[C_ID_BYTES], done[C_SIDE_BYTES]
    meta[M_STATUS] = status
    return status


@njit(cache=True, _nrt=False)
def gather(b, x_a, x_b, lo, hi, out):
    """Lines ``b[x_a[k]:x_b[k]]`` for k in ``lo..hi``, each with a newline, into ``out`` (sized
    by the caller); returns the bytes written. One write for the lines handed back."""
    n = 0
    for k in range(lo, hi):
        for j in range(x_a[k], x_b[k]):
            out[n] = b[j]
            n += 1
        out[n] = 10
        n += 1
    return n
