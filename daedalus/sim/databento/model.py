"""Seeded, deterministic market model: one order-level (MBO) book per instrument.

Why a model and not random records: the ETL rebuilds the L2 book from MBO records, and an
end-to-end test needs the *true* book to compare with after every record. The model owns
that truth (:meth:`MarketModel.true_top`, :meth:`MarketModel.levels`) and every schema the
gateway serves (mbo, mbp-1, mbp-10, trades, ohlcv-1m) is derived from its events, so they
agree with each other by construction.

Prices are integers in Databento's fixed-point unit (1e-9). Book convention (Databento's):
'A' adds an order, 'C' removes ``size`` from it (the whole order when it reaches 0), 'M'
sets a new price and/or size (a new price or a bigger size loses queue priority), 'R'
clears, and 'T'/'F'/'N' change nothing. An aggressive order produces 'T' records (one
per price level, side = aggressor), an 'F' per resting order hit, then a 'C' (fully filled)
or 'M' (partly filled) per resting order; ``F_LAST`` marks the last record of each event.
The clock is simulated (starts at ``start_ns``, advances a seeded random step per event),
so a given seed always yields the same records, timestamps included.
"""

from __future__ import annotations

import bisect
import random
import re
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

UNDEF_PRICE = 2**63 - 1
PRICE_SCALE = 1_000_000_000
F_LAST = 128
F_SNAPSHOT = 32
MINUTE_NS = 60 * PRICE_SCALE
_FUTURES = re.compile(r"^[A-Z]{1,4}[FGHJKMNQUVXZ]\d{1,2}$")

# (bid_px, ask_px, bid_sz, ask_sz, bid_ct, ask_ct): the field order of databento_dbn.BidAskPair
Level = tuple[int, int, int, int, int, int]
EMPTY_LEVEL: Level = (UNDEF_PRICE, UNDEF_PRICE, 0, 0, 0, 0)
LEVEL = struct.Struct("<qqIIII")


def instrument_id_for(symbol: str) -> int:
    """A stable instrument id per symbol (same symbol, same id, in every run and process)."""
    return 100_000 + zlib.crc32(symbol.encode()) % 900_000


def tick_for(symbol: str) -> int:
    """0.25 for futures-like symbols (ESM6, NQM6), 0.01 otherwise, in 1e-9 units."""
    return PRICE_SCALE // 4 if _FUTURES.match(symbol) else PRICE_SCALE // 100


@dataclass(slots=True)
class MboUpdate:
    """One MBO record of an event, with the book after it (``top``; ``levels`` for book changes)."""

    order_id: int
    price: int
    size: int
    action: str
    side: str
    flags: int
    sequence: int
    top: tuple[int, int, int, int]  # bid_px, bid_sz, ask_px, ask_sz (UNDEF_PRICE / 0 when empty)
    # top 10 after a book-changing or trade record (what MBP shows), packed with LEVELS (320 bytes: the
    # history keeps every update, and 60 Python ints per update would cost ~2.5 KB)
    levels: bytes | None = None
    depth: int = 0  # the updated price's level index on its side


@dataclass(slots=True)
class Bar:
    """An OHLCV bar built from trades; ``ts_event`` is the start of its minute."""

    ts_event: int
    open: int
    high: int
    low: int
    close: int
    volume: int


@dataclass(slots=True)
class Event:
    """One market event of one instrument: records sharing ts_event/ts_recv, plus a bar it closed."""

    instrument_id: int
    ts_event: int
    ts_recv: int
    ts_in_delta: int
    updates: list[MboUpdate]
    bar: Bar | None = None
    index: int = 0  # position in the model's history (0, 1, 2, ...)
    cache: dict = field(default_factory=dict)  # encoded records per schema (filled by the gateway)


@dataclass(slots=True)
class PriceLevel:
    orders: dict[int, int] = field(default_factory=dict)  # order_id -> size, in queue order
    size: int = 0


class Book:
    """An order-level book with L2 aggregation (sorted price lists + level totals)."""

    def __init__(self) -> None:
        self.orders: dict[int, tuple[str, int]] = {}  # order_id -> (side, price)
        self.sides: dict[str, dict[int, PriceLevel]] = {"B": {}, "A": {}}
        self.prices: dict[str, list[int]] = {"B": [], "A": []}  # ascending

    def best(self, side: str) -> int | None:
        prices = self.prices[side]
        if not prices:
            return None
        return prices[-1] if side == "B" else prices[0]

    def top(self) -> tuple[int, int, int, int]:
        bid, ask = self.best("B"), self.best("A")
        bid_sz = self.sides["B"][bid].size if bid is not None else 0
        ask_sz = self.sides["A"][ask].size if ask is not None else 0
        return (UNDEF_PRICE if bid is None else bid, bid_sz, UNDEF_PRICE if ask is None else ask, ask_sz)

    def depth_of(self, side: str, price: int) -> int:
        prices = self.prices[side]
        i = bisect.bisect_left(prices, price)
        return len(prices) - 1 - i if side == "B" else i

    def levels(self, n: int = 10) -> tuple[Level, ...]:
        bids = self.prices["B"][::-1][:n]
        asks = self.prices["A"][:n]
        out = []
        for i in range(n):
            bl = self.sides["B"][bids[i]] if i < len(bids) else None
            al = self.sides["A"][asks[i]] if i < len(asks) else None
            out.append(
                (
                    bids[i] if bl else UNDEF_PRICE,
                    asks[i] if al else UNDEF_PRICE,
                    bl.size if bl else 0,
                    al.size if al else 0,
                    len(bl.orders) if bl else 0,
                    len(al.orders) if al else 0,
                )
            )
        return tuple(out)

    def packed_levels(self) -> bytes:
        """The top 10 levels packed (10 x LEVEL), for MBP-1/MBP-10 records."""
        return b"".join(LEVEL.pack(*lvl) for lvl in self.levels(10))

    def add(self, order_id: int, side: str, price: int, size: int) -> None:
        level = self.sides[side].get(price)
        if level is None:
            level = self.sides[side][price] = PriceLevel()
            bisect.insort(self.prices[side], price)
        level.orders[order_id] = size
        level.size += size
        self.orders[order_id] = (side, price)

    def reduce(self, order_id: int, size: int) -> None:
        """'C': take ``size`` off the order; it leaves the book at 0."""
        side, price = self.orders[order_id]
        level = self.sides[side][price]
        left = level.orders[order_id] - size
        level.size -= size
        if left > 0:
            level.orders[order_id] = left
            return
        del level.orders[order_id]
        del self.orders[order_id]
        if not level.orders:
            del self.sides[side][price]
            prices = self.prices[side]
            del prices[bisect.bisect_left(prices, price)]

    def modify(self, order_id: int, price: int, size: int) -> None:
        """'M': new price/size; a new price or a larger size goes to the back of the queue."""
        side, old_price = self.orders[order_id]
        old_size = self.sides[side][old_price].orders[order_id]
        if price == old_price and size <= old_size:
            level = self.sides[side][price]
            level.orders[order_id] = size
            level.size += size - old_size
            return
        self.reduce(order_id, old_size)
        self.add(order_id, side, price, size)

    def clear(self) -> None:
        self.__init__()

    def size_of(self, order_id: int) -> int:
        side, price = self.orders[order_id]
        return self.sides[side][price].orders[order_id]

    def resting(self) -> Iterable[tuple[int, str, int, int]]:
        """Every resting order as (order_id, side, price, size), bids best first then asks best first."""
        for side, prices in (("B", self.prices["B"][::-1]), ("A", self.prices["A"])):
            for price in prices:
                for order_id, size in self.sides[side][price].orders.items():
                    yield order_id, side, price, size


@dataclass(slots=True)
class Instrument:
    symbol: str
    instrument_id: int
    tick: int
    mid: int  # reference price used when a side is empty
    book: Book = field(default_factory=Book)
    sequence: int = 0
    bar: Bar | None = None


class MarketModel:
    """Generates :class:`Event` objects for a set of symbols; deterministic for a seed and start_ns."""

    def __init__(
        self,
        symbols: Iterable[str],
        seed: int = 1,
        start_ns: int = 1_767_225_600 * PRICE_SCALE,  # 2026-01-01T00:00:00Z
        initial_orders: int = 20,
        max_orders: int = 200,
        mean_step_ns: int = 50_000_000,
    ) -> None:
        self.rng = random.Random(seed)
        self.clock = start_ns
        self.max_orders = max_orders
        self.mean_step_ns = mean_step_ns
        self.instruments: dict[int, Instrument] = {}
        self.by_symbol: dict[str, Instrument] = {}
        self._next_order_id = 1_000_000
        self.events = 0
        for symbol in symbols:
            iid = instrument_id_for(symbol)
            while iid in self.instruments:  # crc collision: keep ids unique, still deterministic
                iid += 1
            tick = tick_for(symbol)
            mid = (100 + zlib.crc32(symbol.encode(), 7) % 9900) * PRICE_SCALE
            inst = Instrument(symbol, iid, tick, mid - mid % tick)
            self.instruments[iid] = inst
            self.by_symbol[symbol] = inst
        self._initial_orders = initial_orders

    # -- truth ------------------------------------------------------------------------------------------------------

    def true_top(self, instrument_id: int) -> tuple[int, int, int, int]:
        """Best (bid_px, bid_sz, ask_px, ask_sz) of the true book now; UNDEF_PRICE/0 for an empty side."""
        return self.instruments[instrument_id].book.top()

    def levels(self, instrument_id: int, n: int = 10) -> tuple[Level, ...]:
        return self.instruments[instrument_id].book.levels(n)

    # -- event generation -------------------------------------------------------------------------------------------

    def initial_events(self) -> list[Event]:
        """The adds that build each instrument's opening book (one event per order)."""
        out = []
        for inst in self.instruments.values():
            for i in range(self._initial_orders):
                side = "B" if i % 2 == 0 else "A"
                offset = (1 + (i // 2) % 10) * inst.tick
                price = inst.mid - offset if side == "B" else inst.mid + offset
                out.append(self._event(inst, [self._add(inst, side, price, self.rng.randint(1, 20))]))
        return out

    def step(self) -> Event:
        """One random event of one random instrument."""
        inst = self.rng.choice(list(self.instruments.values()))
        book = inst.book
        n = len(book.orders)
        r = self.rng.random()
        if n < 4 or (r < 0.45 and n < self.max_orders):
            return self._event(inst, [self._random_add(inst)])
        if r < 0.70 or n >= self.max_orders:
            return self._event(inst, [self._random_cancel(inst)])
        if r < 0.85:
            return self._event(inst, [self._random_modify(inst)])
        return self._event(inst, self._aggress(inst))

    def _event(self, inst: Instrument, updates: list[MboUpdate]) -> Event:
        updates[-1].flags |= F_LAST
        ts_event = self.clock
        ts_in_delta = self.rng.randint(200, 20_000)
        ts_recv = ts_event + ts_in_delta + self.rng.randint(1_000, 100_000)
        self.clock += self.rng.randint(1, 2 * self.mean_step_ns)
        bar = self._update_bar(inst, ts_event, updates)
        event = Event(inst.instrument_id, ts_event, ts_recv, ts_in_delta, updates, bar, self.events)
        self.events += 1
        return event

    def _update_bar(self, inst: Instrument, ts_event: int, updates: list[MboUpdate]) -> Bar | None:
        """Close the open bar when this event starts a new minute; fold this event's trades in."""
        closed = None
        minute = ts_event - ts_event % MINUTE_NS
        if inst.bar is not None and inst.bar.ts_event != minute:
            closed, inst.bar = inst.bar, None
        for u in updates:
            if u.action != "T":
                continue
            if inst.bar is None:
                inst.bar = Bar(minute, u.price, u.price, u.price, u.price, 0)
            b = inst.bar
            b.high, b.low, b.close, b.volume = max(b.high, u.price), min(b.low, u.price), u.price, b.volume + u.size
        return closed

    def _record(
        self,
        inst: Instrument,
        order_id: int,
        price: int,
        size: int,
        action: str,
        side: str,
        change: tuple | None = None,
    ) -> MboUpdate:
        """Apply ``change`` to the book (if any) and return the MBO record with the book after it."""
        book = inst.book
        if change is not None:
            kind = change[0]
            if kind == "A":
                book.add(order_id, side, price, size)
            elif kind == "C":
                before = book.depth_of(side, price)
                book.reduce(order_id, size)
            elif kind == "M":
                book.modify(order_id, price, size)
        inst.sequence += 1
        update = MboUpdate(order_id, price, size, action, side, 0, inst.sequence, book.top())
        if change is not None:
            update.levels = book.packed_levels()
            update.depth = before if change[0] == "C" else book.depth_of(side, price)
        elif action == "T":
            update.levels = book.packed_levels()
        return update

    def _new_order_id(self) -> int:
        self._next_order_id += self.rng.randint(1, 7)
        return self._next_order_id

    def _passive_price(self, inst: Instrument, side: str) -> int:
        """A price that rests without crossing: 0-9 ticks behind the tick next to the opposite best."""
        book = inst.book
        opposite = book.best("A" if side == "B" else "B")
        own = book.best(side)
        k = min(self.rng.randint(0, 9), self.rng.randint(0, 9))  # nearer the touch more often
        sign = -1 if side == "B" else 1  # away from the spread
        if opposite is not None:
            anchor = opposite + sign * inst.tick
        elif own is not None:
            anchor = own - sign * inst.tick
        else:
            anchor = inst.mid if side == "B" else inst.mid + inst.tick
        return anchor + sign * k * inst.tick

    def _add(self, inst: Instrument, side: str, price: int, size: int) -> MboUpdate:
        order_id = self._new_order_id()
        return self._record(inst, order_id, price, size, "A", side, change=("A",))

    def _random_add(self, inst: Instrument) -> MboUpdate:
        side = self.rng.choice("BA")
        return self._add(inst, side, self._passive_price(inst, side), self.rng.randint(1, 25))

    def _random_cancel(self, inst: Instrument) -> MboUpdate:
        book = inst.book
        order_id = self.rng.choice(list(book.orders))
        side, price = book.orders[order_id]
        size = book.size_of(order_id)
        if size > 1 and self.rng.random() < 0.2:
            size = self.rng.randint(1, size - 1)  # partial cancel
        return self._record(inst, order_id, price, size, "C", side, change=("C",))

    def _random_modify(self, inst: Instrument) -> MboUpdate:
        book = inst.book
        order_id = self.rng.choice(list(book.orders))
        side, price = book.orders[order_id]
        size = book.size_of(order_id)
        if self.rng.random() < 0.5:
            size = max(1, size + self.rng.randint(-5, 5))
        else:
            price = self._passive_price(inst, side)
        return self._record(inst, order_id, price, size, "M", side, change=("M",))

    def _aggress(self, inst: Instrument) -> list[MboUpdate]:
        """A marketable order eating into the best 1-2 levels of one side: T per level, F per order, then C/M."""
        book = inst.book
        resting_side = self.rng.choice("BA")
        if not book.prices[resting_side]:
            resting_side = "A" if resting_side == "B" else "B"
        aggressor = "A" if resting_side == "B" else "B"
        prices = book.prices[resting_side]
        levels = prices[::-1][:2] if resting_side == "B" else prices[:2]
        available = sum(book.sides[resting_side][p].size for p in levels)
        qty = self.rng.randint(1, max(1, available - 1)) if available > 1 else 1
        trades: list[MboUpdate] = []
        fills: list[tuple[int, int, int]] = []  # order_id, price, filled
        left = qty
        for price in levels:
            traded = 0
            for order_id, size in book.sides[resting_side][price].orders.items():
                if left == 0:
                    break
                take = min(size, left)
                fills.append((order_id, price, take))
                traded += take
                left -= take
            if traded:
                trades.append(self._record(inst, 0, price, traded, "T", aggressor))
        updates = trades + [self._record(inst, oid, px, take, "F", resting_side) for oid, px, take in fills]
        for order_id, price, take in fills:
            size = book.size_of(order_id)
            if take == size:
                updates.append(self._record(inst, order_id, price, take, "C", resting_side, change=("C",)))
            else:
                updates.append(self._record(inst, order_id, price, size - take, "M", resting_side, change=("M",)))
        return updates

    def snapshot(self, instrument_id: int) -> list[MboUpdate]:
        """A book snapshot as Databento sends it: 'R' then an 'A' per resting order, all F_SNAPSHOT, F_LAST last."""
        inst = self.instruments[instrument_id]
        seq = inst.sequence
        top = inst.book.top()
        out = [MboUpdate(0, UNDEF_PRICE, 0, "R", "N", F_SNAPSHOT, seq, (UNDEF_PRICE, 0, UNDEF_PRICE, 0))]
        out += [MboUpdate(oid, px, sz, "A", side, F_SNAPSHOT, seq, top) for oid, side, px, sz in inst.book.resting()]
        out[-1].flags |= F_LAST
        return out
