"""Collect ccxt.pro's unified tickers, trades and order books and hand them to a sink.

One :class:`CcxtCollector` per exchange; :class:`CcxtSource` runs one per configured
exchange, each in its own task so a failing exchange (unknown id, unreachable URL, bad
symbol) is reported unhealthy and retried with capped, jittered exponential backoff while
the others keep collecting.

The sink is anything with ``put_record(*, channel, exchange, symbol, recv_ns, record) ->
bool`` (the raw writer). ``put_record`` must never block; ``False`` means the record was
dropped because the queue is full, which we count as overflow.

Why the caches are swept: ccxt's bulk watchers (``watch*ForSymbols``) race one future per
symbol and hand over only the winner; an update of another symbol that lands in the same
loop turn resolves a future nobody awaits any more. So after every hand-over we also look
at ccxt's caches (``exchange.trades``, ``exchange.orderbooks``, ``exchange.tickers``) of
the subscription's other symbols and emit what changed since we last emitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import ccxt.pro

from daedalus.backoff import backoff_delay
from daedalus.config import CcxtConfig, CcxtExchangeConfig
from daedalus.logs import get_logger

log = get_logger(__name__)

SUBSCRIPTION_STAGGER_MS = 100
MAX_CONCURRENT_SUBSCRIPTIONS = 5
BACKOFF_INITIAL_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
HEALTHY_AFTER_SECONDS = 30.0  # a session that ran this long resets the backoff

# config method -> (sink channel, per-symbol method, bulk method, ccxt cache attribute)
METHODS: dict[str, tuple[str, str, str, str]] = {
    "watchTicker": ("ticker", "watchTicker", "watchTickers", "tickers"),
    "watchTrades": ("trades", "watchTrades", "watchTradesForSymbols", "trades"),
    "watchOrderBook": ("orderbook", "watchOrderBook", "watchOrderBookForSymbols", "orderbooks"),
}


class RecordSink(Protocol):
    def put_record(self, *, channel: str, exchange: str, symbol: str, recv_ns: int, record: dict[str, Any]) -> bool:
        """Queue one record without blocking; False when the queue is full (record dropped)."""


class CcxtConfigError(ValueError):
    """A misconfiguration ccxt cannot serve (unknown exchange id or symbol), with suggestions."""


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.4)


def create_exchange(exchange_id: str, config: CcxtExchangeConfig) -> Any:
    """``ccxt.pro.<id>({...})``; ccxt deep-merges ``urls`` onto its own defaults."""
    if exchange_id not in ccxt.pro.exchanges:
        near = closest(exchange_id, ccxt.pro.exchanges)
        hint = f"; closest: {', '.join(near)}" if near else ""
        raise CcxtConfigError(f"unknown ccxt.pro exchange id {exchange_id!r}{hint}")
    settings: dict[str, Any] = {"enableRateLimit": True, "options": dict(config.options)}
    if config.urls:
        settings["urls"] = config.urls
    key, secret = config.api_key.get_secret_value(), config.api_secret.get_secret_value()
    if key:
        settings["apiKey"] = key
    if secret:
        settings["secret"] = secret
    return getattr(ccxt.pro, exchange_id)(settings)


def check_symbols(exchange_id: str, markets: dict[str, Any], symbols: Iterable[str]) -> None:
    """Raise naming every configured symbol the exchange does not list, with the closest listed ones."""
    unknown = sorted({s for s in symbols if s not in markets})
    if unknown:
        parts = []
        for symbol in unknown:
            near = closest(symbol, markets)
            parts.append(f"{symbol!r} (closest: {', '.join(near)})" if near else repr(symbol))
        raise CcxtConfigError(f"{exchange_id}: unknown symbol(s) {'; '.join(parts)}")


@dataclass
class Subscription:
    """One watch loop: a config method over some symbols, bulk or per symbol."""

    method: str  # config name, e.g. "watchTrades"
    symbols: list[str]
    bulk: bool

    @property
    def channel(self) -> str:
        return METHODS[self.method][0]

    @property
    def ccxt_method(self) -> str:
        return METHODS[self.method][2 if self.bulk else 1]

    @property
    def cache(self) -> str:
        return METHODS[self.method][3]


def plan_subscriptions(has: dict[str, Any], channels: dict[str, list[str]]) -> list[Subscription]:
    """Bulk where ``exchange.has`` says so (and there is more than one symbol), one loop per symbol otherwise."""
    plan: list[Subscription] = []
    for method, symbols in channels.items():
        symbols = list(dict.fromkeys(symbols))
        if len(symbols) > 1 and has.get(METHODS[method][2]):
            plan.append(Subscription(method, symbols, bulk=True))
        else:
            plan += [Subscription(method, [s], bulk=False) for s in symbols]
    return plan


@dataclass
class TradeCursor:
    """The last trade emitted for one symbol: ccxt re-delivers its cache, we emit only what is newer."""

    last_id: Any = None
    last_ts: int | None = None
    ids_at_last_ts: set[Any] = field(default_factory=set)

    def new_trades(self, cache: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Walk the (ascending) cache backwards until a trade already emitted; return the rest, oldest first."""
        fresh: list[dict[str, Any]] = []
        for trade in reversed(cache):
            tid, ts = trade.get("id"), trade.get("timestamp")
            seen_ts = self.last_ts is not None and ts is not None
            if seen_ts and (ts < self.last_ts or (ts == self.last_ts and (tid is None or tid in self.ids_at_last_ts))):
                break  # older than, or already emitted at, the newest timestamp we emitted
            if tid is not None and tid == self.last_id:
                break
            fresh.append(trade)
        fresh.reverse()
        for trade in fresh:
            ts = trade.get("timestamp")
            if ts is not None and (self.last_ts is None or ts > self.last_ts):
                self.last_ts, self.ids_at_last_ts = ts, set()
            if ts is not None and ts == self.last_ts:
                self.ids_at_last_ts.add(trade.get("id"))
            self.last_id = trade.get("id")
        return fresh


def book_marker(book: Any) -> tuple[Any, ...]:
    """What changes with every update ccxt applies to an order book it mutates in place."""
    return (book.get("nonce"), book.get("timestamp"), book.get("datetime"))


def cut_book(book: Any, depth: int) -> dict[str, Any]:
    """A detached copy of the top ``depth`` levels: ccxt keeps mutating its own book."""
    return {
        "symbol": book.get("symbol"),
        "timestamp": book.get("timestamp"),
        "datetime": book.get("datetime"),
        "nonce": book.get("nonce"),
        "bids": [list(level) for level in book["bids"][:depth]],
        "asks": [list(level) for level in book["asks"][:depth]],
    }


@dataclass
class CollectorStats:
    messages: int = 0  # records handed to the sink
    overflow: int = 0  # records the sink refused (queue full)
    errors: int = 0
    reconnects: int = 0
    state: str = "starting"  # starting, connecting, subscribing, running, unhealthy, stopped
    last_error: str | None = None
    started_at: float = field(default_factory=time.monotonic)

    def uptime(self) -> float:
        return time.monotonic() - self.started_at


class CcxtCollector:
    """Streams one exchange's configured channels into ``sink`` until cancelled."""

    def __init__(
        self,
        exchange_id: str,
        exchange_config: CcxtExchangeConfig,
        sink: RecordSink,
        clock: Callable[[], int] = time.time_ns,
        *,
        backoff_initial: float = BACKOFF_INITIAL_SECONDS,
        backoff_max: float = BACKOFF_MAX_SECONDS,
    ) -> None:
        self.exchange_id = exchange_id
        self.config = exchange_config
        self.sink = sink
        self.clock = clock
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stats = CollectorStats()
        self._rng = random.Random()
        self.exchange: Any = None
        self._cursors: dict[str, TradeCursor] = {}
        self._book_markers: dict[str, tuple[Any, ...]] = {}
        self._tickers: dict[str, Any] = {}  # ccxt replaces the ticker dict on each update: identity marks change

    # -- lifecycle -----------------------------------------------------------------

    async def run(self) -> None:
        """Run sessions forever; a failed session is logged, counted and retried after a backoff."""
        attempt = 0
        try:
            while True:
                began = time.monotonic()
                try:
                    await self._session()
                    raise ConnectionError("subscriptions ended")  # a session only ends by an error
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # isolation: any failure is reported and retried
                    if time.monotonic() - began >= HEALTHY_AFTER_SECONDS:
                        attempt = 0
                    delay = self._backoff(attempt)
                    attempt += 1
                    self._fail(exc, delay)
                finally:
                    await self._close()
                await asyncio.sleep(delay)
                self.stats.reconnects += 1
        finally:
            self.stats.state = "stopped"

    def _backoff(self, attempt: int) -> float:
        """The shared capped backoff (``attempt`` counts from 0 here), jittered so that
        exchanges do not retry in step."""
        return backoff_delay(attempt + 1, self.backoff_initial, self.backoff_max, self._rng)

    def _fail(self, exc: BaseException, delay: float) -> None:
        while isinstance(exc, BaseExceptionGroup):  # a subscription's failure, from the session's task group
            exc = exc.exceptions[0]
        text = exc.args[0] if isinstance(exc, CcxtConfigError) else f"{type(exc).__name__}: {exc}"
        self.stats.errors += 1
        self.stats.state = "unhealthy"
        self.stats.last_error = self._scrub(str(text))[:500]
        log.error("ccxt_exchange_unhealthy", exchange=self.exchange_id, error=self.stats.last_error, retry_in=delay)

    def _scrub(self, text: str) -> str:
        """The error text without the exchange's credentials: ccxt's errors quote URLs and
        response bodies, and some exchanges put the key in a query string."""
        for secret in (self.config.api_key.get_secret_value(), self.config.api_secret.get_secret_value()):
            if secret:
                text = text.replace(secret, "***")
        return text

    async def _close(self) -> None:
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            with contextlib.suppress(Exception):
                await exchange.close()

    async def _session(self) -> None:
        """Create the exchange, check the symbols, run every subscription in one task group."""
        self.stats.state = "connecting"
        self._cursors.clear()
        self._book_markers.clear()
        self._tickers.clear()
        self.exchange = create_exchange(self.exchange_id, self.config)
        markets = await self.exchange.load_markets()
        check_symbols(self.exchange_id, markets, (s for symbols in self.config.channels.values() for s in symbols))
        plan = plan_subscriptions(self.exchange.has, self.config.channels)
        self.stats.state = "subscribing"
        log.info("ccxt_subscribing", exchange=self.exchange_id, loops=len(plan))
        gate = asyncio.Semaphore(MAX_CONCURRENT_SUBSCRIPTIONS)
        async with asyncio.TaskGroup() as group:
            for index, sub in enumerate(plan):
                group.create_task(self._subscription(sub, index, gate), name=f"ccxt-{self.exchange_id}-{index}")

    async def _subscription(self, sub: Subscription, index: int, gate: asyncio.Semaphore) -> None:
        """Staggered start; at most MAX_CONCURRENT_SUBSCRIPTIONS first calls (the subscribe round trips) in flight."""
        await asyncio.sleep(index * SUBSCRIPTION_STAGGER_MS / 1000)
        watch = getattr(self.exchange, sub.ccxt_method)
        arg: Any = sub.symbols if sub.bulk else sub.symbols[0]
        async with gate:
            result = await watch(arg)
        self._deliver(sub, result)
        self.stats.state = "running"
        while True:
            self._deliver(sub, await watch(arg))

    # -- records -------------------------------------------------------------------

    def _deliver(self, sub: Subscription, result: Any) -> None:
        recv_ns = self.clock()  # capture time: the moment ccxt handed the update over
        if sub.channel == "trades":
            self._deliver_trades(sub, result, recv_ns)
        elif sub.channel == "orderbook":
            self._deliver_books(sub, result, recv_ns)
        else:
            self._deliver_tickers(sub, result, recv_ns)

    def _put(self, channel: str, symbol: str, recv_ns: int, record: dict[str, Any]) -> None:
        if self.sink.put_record(
            channel=channel, exchange=self.exchange_id, symbol=symbol, recv_ns=recv_ns, record=record
        ):
            self.stats.messages += 1
        else:
            self.stats.overflow += 1

    def _deliver_trades(self, sub: Subscription, result: Any, recv_ns: int) -> None:
        caches = getattr(self.exchange, "trades", None) or {}
        for symbol in sub.symbols:
            cache = caches.get(symbol)
            if cache is None:  # an exchange without the per-symbol cache: use what was handed over
                cache = [t for t in result or () if t.get("symbol") == symbol]
            for trade in self._cursors.setdefault(symbol, TradeCursor()).new_trades(list(cache)):
                self._put("trades", symbol, recv_ns, trade)

    def _deliver_books(self, sub: Subscription, result: Any, recv_ns: int) -> None:
        handed = result.get("symbol") if result else None
        books = getattr(self.exchange, "orderbooks", None) or {}
        for symbol in sub.symbols:
            book = result if symbol == handed else books.get(symbol)
            if book is None:
                continue
            marker = book_marker(book)
            if symbol != handed and self._book_markers.get(symbol) == marker:
                continue
            self._book_markers[symbol] = marker
            self._put("orderbook", symbol, recv_ns, cut_book(book, self.config.max_orderbook_depth))

    def _deliver_tickers(self, sub: Subscription, result: Any, recv_ns: int) -> None:
        single = bool(result) and "symbol" in result and not sub.bulk  # watchTicker: one ticker, not a dict
        handed = {result["symbol"]: result} if single else dict(result or {})
        cached = getattr(self.exchange, "tickers", None) or {}
        for symbol in sub.symbols:
            ticker = handed.get(symbol) or cached.get(symbol)
            if ticker is None or self._tickers.get(symbol) is ticker:
                continue
            self._tickers[symbol] = ticker
            self._put("ticker", symbol, recv_ns, ticker)

    # -- reporting -----------------------------------------------------------------

    def status_text(self) -> str:
        """The seeds' line, then what this port adds (overflow, state, last error)."""
        s = self.stats
        text = (
            f"ccxt_{self.exchange_id}: msgs={s.messages:,}, errors={s.errors}, reconnects={s.reconnects}, "
            f"uptime={s.uptime():.0f}s, overflow={s.overflow:,}, state={s.state}"
        )
        return text + (f", last_error={s.last_error}" if s.last_error and s.state == "unhealthy" else "")


class CcxtSource:
    """Every configured exchange, each isolated in its own collector task."""

    def __init__(
        self, config: CcxtConfig, sink: RecordSink, clock: Callable[[], int] = time.time_ns, **collector_kwargs: Any
    ) -> None:
        self.collectors = [
            CcxtCollector(exchange_id, exchange_config, sink, clock, **collector_kwargs)
            for exchange_id, exchange_config in config.exchanges.items()
        ]

    async def run(self) -> None:
        """Until cancelled: collectors never raise (they retry), so one cannot take the others down."""
        async with asyncio.TaskGroup() as group:
            for collector in self.collectors:
                group.create_task(collector.run(), name=f"ccxt-{collector.exchange_id}")

    def status_text(self) -> str:
        return "\n".join(c.status_text() for c in self.collectors)

    def healthy(self) -> dict[str, bool]:
        return {c.exchange_id: c.stats.state == "running" for c in self.collectors}
