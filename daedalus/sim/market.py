"""The simulator's market model: one ground-truth L2 book per product.

Prices are integer ticks and sizes integer base units (1e-8), so the book is exact and
cheap to mutate; strings are produced only when frames are encoded. The book evolves by
a seeded random process of adds, cancels and trades. Trades take liquidity at the touch
and change the book consistently, the ticker follows trades and the touch, and 5-minute
candles aggregate trades.

Every step bumps ``version`` and records undo entries, so the true book after any frame
that was sent can be rebuilt later (:meth:`MarketModel.top`).
"""

from __future__ import annotations

import heapq
import random
import time
from collections import deque
from dataclasses import dataclass, field

SIZE_DECIMALS = 8
CANDLE_SECONDS = 300

# product -> (start price, base name, typical order size in base units)
_KNOWN = {
    "BTC": (65_000.0, "Bitcoin", 0.25),
    "ETH": (1_900.0, "Ethereum", 3.0),
    "SOL": (150.0, "Solana", 20.0),
    "DOGE": (0.12, "Dogecoin", 5_000.0),
}
_QUOTE_NAMES = {"USD": "US Dollar", "EUR": "Euro", "GBP": "British Pound", "USDC": "USD Coin"}


def decimals_of(increment: str) -> int:
    return len(increment.split(".")[1].rstrip("0")) if "." in increment else 0


def format_decimal(value: int, decimals: int) -> str:
    """Integer in units of 10**-decimals -> shortest decimal string (``6500001, 2 -> 65000.01``)."""
    if decimals == 0:
        return str(value)
    digits = str(value).rjust(decimals + 1, "0")
    whole, frac = digits[:-decimals], digits[-decimals:].rstrip("0")
    return f"{whole}.{frac}" if frac else whole


@dataclass(frozen=True)
class ProductSpec:
    product_id: str
    base: str
    quote: str
    start_price: float
    price_increment: str
    base_increment: str = "0.00000001"
    base_name: str = ""
    quote_name: str = ""
    typical_size: float = 1.0

    @property
    def price_decimals(self) -> int:
        return decimals_of(self.price_increment)


def product_spec(product_id: str) -> ProductSpec:
    """A plausible spec for any ``BASE-QUOTE`` id; well-known bases get realistic prices."""
    base, _, quote = product_id.partition("-")
    quote = quote or "USD"
    price, name, typical = _KNOWN.get(base, (100.0, base.title(), 10.0))
    increment = "0.01" if price >= 1 else "0.00001"
    return ProductSpec(
        product_id=product_id,
        base=base,
        quote=quote,
        start_price=price,
        price_increment=increment,
        base_name=name,
        quote_name=_QUOTE_NAMES.get(quote, quote),
        typical_size=typical,
    )


@dataclass
class Trade:
    trade_id: int
    price: int
    size: int
    maker_side: str  # "BUY" or "SELL": Coinbase reports the maker's side
    time_ns: int


@dataclass
class Candle:
    start: int
    open: int
    high: int
    low: int
    close: int
    volume: int = 0


@dataclass
class StepResult:
    """What one market step changed: book levels, and the trade if there was one."""

    product_id: str
    version: int
    time_ns: int
    changes: list[tuple[bool, int, int]]  # (is_bid, price ticks, new absolute size)
    trade: Trade | None = None


@dataclass
class _Stats:
    volume_24h: int
    low_24h: int
    high_24h: int
    open_24h: int
    low_52w: int
    high_52w: int


@dataclass
class MarketModel:
    spec: ProductSpec
    rng: random.Random
    levels: int = 1000
    history: int = 200_000
    bids: dict[int, int] = field(default_factory=dict)
    asks: dict[int, int] = field(default_factory=dict)
    version: int = 0

    def __post_init__(self) -> None:
        self.tick_scale = 10**self.spec.price_decimals
        self.size_scale = 10**SIZE_DECIMALS
        self._mean_size = self.spec.typical_size * self.size_scale
        self._undo: deque[tuple[int, bool, int, int]] = deque(maxlen=self.history)
        self.trades: deque[Trade] = deque(maxlen=100)
        self.candles: deque[Candle] = deque(maxlen=100)
        self._next_trade_id = 100_000_000
        mid = round(self.spec.start_price * self.tick_scale)
        spread = self.rng.randint(1, 4)
        self.best_bid = mid - spread // 2 - 1
        self.best_ask = self.best_bid + spread
        for i in range(int(self.levels * 1.25)):
            if i == 0 or self.rng.random() < 0.8:
                if self.best_bid - i > 0:
                    self.bids[self.best_bid - i] = self._random_size()
                self.asks[self.best_ask + i] = self._random_size()
        self.last_price = self.best_ask
        self.stats = _Stats(
            volume_24h=int(self._mean_size * 20_000),
            low_24h=round(mid * 0.98),
            high_24h=round(mid * 1.02),
            open_24h=round(mid * 0.995),
            low_52w=round(mid * 0.6),
            high_52w=round(mid * 1.8),
        )
        self._seed_history(time.time_ns())

    def _seed_history(self, now_ns: int) -> None:
        """Give a new market a past: 100 trades and candles, so snapshots are never empty.

        Past trades do not touch the book; they print at the touch as it is now.
        """
        t = now_ns - 100 * 1_000_000_000
        for _ in range(100):
            t += self.rng.randint(1, 1_000_000_000)
            taker_buys = self.rng.random() < 0.5
            self._next_trade_id += 1
            price = self.best_ask if taker_buys else self.best_bid
            trade = Trade(self._next_trade_id, price, self._random_size(), "SELL" if taker_buys else "BUY", t)
            self.trades.appendleft(trade)
            self._record_trade(trade)

    # -- the random process -------------------------------------------------

    def _random_size(self) -> int:
        size = int(self.rng.expovariate(1.0) * self._mean_size) // 1000 * 1000
        return max(size, 1000)

    def step(self, now_ns: int) -> StepResult:
        """Advance the market by one event and report what changed."""
        self.version += 1
        r = self.rng.random()
        if r < 0.08:
            return self._trade(now_ns)
        changes: list[tuple[bool, int, int]] = []
        for _ in range(1 + (self.rng.random() < 0.3) + (self.rng.random() < 0.1)):
            if r < 0.55 or min(len(self.bids), len(self.asks)) < self.levels // 2:
                self._add(changes)
            else:
                self._cancel(changes)
        return StepResult(self.spec.product_id, self.version, now_ns, changes)

    def _set(self, is_bid: bool, price: int, size: int, changes: list[tuple[bool, int, int]]) -> None:
        book = self.bids if is_bid else self.asks
        self._undo.append((self.version, is_bid, price, book.get(price, 0)))
        if size:
            book[price] = size
        else:
            del book[price]
        changes.append((is_bid, price, size))

    def _add(self, changes: list[tuple[bool, int, int]]) -> None:
        is_bid = self.rng.random() < 0.5
        if self.best_ask - self.best_bid > 1 and self.rng.random() < 0.25:
            price = self.best_bid + 1 if is_bid else self.best_ask - 1  # improve the touch
        else:
            depth = int(self.rng.expovariate(0.08))
            price = self.best_bid - depth if is_bid else self.best_ask + depth
            if price <= 0:
                return
        book = self.bids if is_bid else self.asks
        self._set(is_bid, price, book.get(price, 0) + self._random_size(), changes)
        if is_bid and price > self.best_bid:
            self.best_bid = price
        elif not is_bid and price < self.best_ask:
            self.best_ask = price

    def _cancel(self, changes: list[tuple[bool, int, int]]) -> None:
        is_bid = self.rng.random() < 0.5
        depth = int(self.rng.expovariate(0.1))
        price = self.best_bid - depth if is_bid else self.best_ask + depth
        book = self.bids if is_bid else self.asks
        size = book.get(price)
        if size is None or len(book) < 2:
            return
        remaining = 0 if size <= 1000 or self.rng.random() < 0.6 else size // 2000 * 1000
        self._set(is_bid, price, remaining, changes)
        if remaining == 0:
            self._repair_touch(is_bid, price)

    def _trade(self, now_ns: int) -> StepResult:
        taker_buys = self.rng.random() < 0.5
        is_bid = not taker_buys  # a buyer takes the best offer, a seller hits the best bid
        price = self.best_ask if taker_buys else self.best_bid
        book = self.bids if is_bid else self.asks
        level = book[price]
        if level <= 1000 or self.rng.random() < 0.3 or len(book) < 2:
            qty = level if len(book) > 1 else level // 2 or level
        else:
            qty = self.rng.randint(1, level // 1000 - 1) * 1000 if level >= 2000 else level
        changes: list[tuple[bool, int, int]] = []
        self._set(is_bid, price, level - qty, changes)
        if level - qty == 0:
            self._repair_touch(is_bid, price)
        self._next_trade_id += 1
        trade = Trade(self._next_trade_id, price, qty, "SELL" if taker_buys else "BUY", now_ns)
        self.trades.appendleft(trade)
        self._record_trade(trade)
        return StepResult(self.spec.product_id, self.version, now_ns, changes, trade)

    def _repair_touch(self, is_bid: bool, removed: int) -> None:
        """Find the new best price after ``removed`` left the book: walk a few ticks, then scan."""
        if is_bid:
            if removed != self.best_bid:
                return
            for price in range(removed - 1, max(removed - 64, 0), -1):
                if price in self.bids:
                    self.best_bid = price
                    return
            self.best_bid = max(self.bids)
        else:
            if removed != self.best_ask:
                return
            for price in range(removed + 1, removed + 64):
                if price in self.asks:
                    self.best_ask = price
                    return
            self.best_ask = min(self.asks)

    def _record_trade(self, trade: Trade) -> None:
        self.last_price = trade.price
        stats = self.stats
        stats.volume_24h += trade.size
        stats.low_24h = min(stats.low_24h, trade.price)
        stats.high_24h = max(stats.high_24h, trade.price)
        self.candle_at(trade.time_ns)
        candle = self.candles[-1]
        candle.high = max(candle.high, trade.price)
        candle.low = min(candle.low, trade.price)
        candle.close = trade.price
        candle.volume += trade.size

    def candle_at(self, now_ns: int) -> Candle:
        """The current 5-minute candle, opening a new one when the bucket changed."""
        start = now_ns // 1_000_000_000 // CANDLE_SECONDS * CANDLE_SECONDS
        if not self.candles or self.candles[-1].start < start:
            p = self.last_price
            self.candles.append(Candle(start, p, p, p, p))
        return self.candles[-1]

    # -- ground truth ---------------------------------------------------------

    def top(self, depth: int = 20, version: int | None = None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Top ``depth`` levels (best first) now, or right after step ``version``.

        Raises :class:`LookupError` when ``version`` is older than the undo history.
        """
        bids, asks = self.bids, self.asks
        if version is not None and version < self.version:
            if len(self._undo) == self._undo.maxlen and self._undo[0][0] > version:
                raise LookupError(f"version {version} is older than the kept history")
            bids, asks = dict(bids), dict(asks)
            for entry_version, is_bid, price, old in reversed(self._undo):
                if entry_version <= version:
                    break
                book = bids if is_bid else asks
                if old:
                    book[price] = old
                else:
                    book.pop(price, None)
        top_bids = heapq.nlargest(depth, bids.items())
        top_asks = heapq.nsmallest(depth, asks.items())
        return top_bids, top_asks

    def check_invariants(self) -> None:
        """Assert the book is consistent: uncrossed and the cached touch is the real touch."""
        assert self.best_bid == max(self.bids), (self.best_bid, max(self.bids))
        assert self.best_ask == min(self.asks), (self.best_ask, min(self.asks))
        assert self.best_bid < self.best_ask, (self.best_bid, self.best_ask)
