"""The ccxt collector against the real simulator (ccxt.pro coinbase, urls pointed at 127.0.0.1)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

import ccxt.pro
import orjson
import pytest

from daedalus.capture.ccxt_collector import (
    CcxtCollector,
    CcxtConfigError,
    CcxtSource,
    TradeCursor,
    create_exchange,
    plan_subscriptions,
)
from daedalus.config import CcxtConfig, CcxtExchangeConfig

SYMBOLS = {"BTC/USD": "BTC-USD", "ETH/USD": "ETH-USD"}
DEPTH = 10


class MemorySink:
    """Test double of the raw writer: keeps every record; refuses beyond ``capacity``."""

    def __init__(self, capacity: int | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self.capacity = capacity

    def put_record(self, *, channel: str, exchange: str, symbol: str, recv_ns: int, record: dict[str, Any]) -> bool:
        if self.capacity is not None and len(self.records) >= self.capacity:
            return False
        self.records.append(
            {"channel": channel, "exchange": exchange, "symbol": symbol, "recv_ns": recv_ns, "record": record}
        )
        return True

    def of(self, channel: str, symbol: str | None = None, exchange: str | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records
            if r["channel"] == channel and symbol in (None, r["symbol"]) and exchange in (None, r["exchange"])
        ]


def sim_config(sim: Any, channels: dict[str, list[str]] | None = None, **extra: Any) -> CcxtExchangeConfig:
    methods = ("watchOrderBook", "watchTrades", "watchTicker")
    return CcxtExchangeConfig(
        urls={"api": {"rest": sim.rest_url, "ws": sim.ws_url}},
        channels=channels or {m: list(SYMBOLS) for m in methods},
        max_orderbook_depth=DEPTH,
        **extra,
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_urls(exchange_id: str, port: int) -> dict[str, Any]:
    """Every url ccxt knows for the exchange, rewritten to a closed port on 127.0.0.1."""

    def rewrite(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: rewrite(v) for k, v in value.items()}
        if isinstance(value, str):
            return f"{'ws' if value.startswith('ws') else 'http'}://127.0.0.1:{port}"
        return value

    return rewrite(getattr(ccxt.pro, exchange_id)().describe()["urls"])


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)
    assert predicate(), what


@contextlib.asynccontextmanager
async def running(runner: Any):  # type: ignore[no-untyped-def]
    task = asyncio.create_task(runner.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def sent_trade_ids(sim: Any) -> dict[str, list[str]]:
    """The simulator's truth: every trade id it sent, per product, oldest first."""
    ids: dict[str, list[str]] = {pid: [] for pid in SYMBOLS.values()}
    for conn in [*sim.connections, *sim.closed_connections]:
        for frame in conn.sent_frames:
            msg = orjson.loads(frame)
            if msg.get("channel") != "market_trades":
                continue
            for event in msg["events"]:
                for trade in reversed(event["trades"]):  # newest first on the wire
                    if trade["trade_id"] not in ids[trade["product_id"]]:
                        ids[trade["product_id"]].append(trade["trade_id"])
    return ids


def top(levels: list[list[float]]) -> list[list[float]]:
    return [[float(level[0]), float(level[1])] for level in levels]


async def test_two_symbols_three_channels_match_the_simulator(make_sim):
    sim = await make_sim(rate=300, keep_sent=True, ticker_batch_interval=0.2, candles_interval=0.1)
    sink = MemorySink()
    collector = CcxtCollector("coinbase", sim_config(sim), sink)

    def moved_on(seen: int) -> Callable[[], bool]:
        return lambda: len(sink.of("trades")) >= seen + 20

    async with running(collector):
        await wait_for(
            lambda: (
                all(len(sink.of(c, s)) >= 3 for c in ("orderbook", "trades", "ticker") for s in SYMBOLS)
                and all(len(sink.of("trades", s)) >= 130 for s in SYMBOLS)
            ),  # 100 from the snapshot, 30+ live
            "records for every (channel, symbol)",
        )
        assert collector.stats.state == "running"
        for moment in range(2):  # compare at two moments while the market moves
            await sim.pause()

            def caught_up() -> bool:
                truth = sent_trade_ids(sim)
                for symbol, pid in SYMBOLS.items():
                    if [r["record"]["id"] for r in sink.of("trades", symbol)] != truth[pid]:
                        return False
                    book = sink.of("orderbook", symbol)[-1]["record"]
                    want = sim.true_book(pid, DEPTH)
                    if (top(book["bids"]), top(book["asks"])) != (top(want["bids"]), top(want["asks"])):
                        return False
                return True

            await wait_for(caught_up, f"trades and last book equal the simulator's at moment {moment}")
            sim.resume()
            await wait_for(moved_on(len(sink.of("trades"))), "the market moves again")

    assert len(sim.connections) + len(sim.closed_connections) == 1  # one ccxt connection, no reconnect
    for symbol in SYMBOLS:
        trades = [r["record"] for r in sink.of("trades", symbol)]
        ids = [t["id"] for t in trades]
        assert len(ids) == len(set(ids)), Counter(ids).most_common(3)
        assert [t["timestamp"] for t in trades] == sorted(t["timestamp"] for t in trades)
        assert all(t["symbol"] == symbol for t in trades)
        for r in sink.of("orderbook", symbol):
            book = r["record"]
            assert book["symbol"] == symbol and book["timestamp"] and "nonce" in book
            assert 0 < len(book["bids"]) <= DEPTH and 0 < len(book["asks"]) <= DEPTH
            assert book["bids"][0][0] < book["asks"][0][0]
        tickers = [r["record"] for r in sink.of("ticker", symbol)]
        assert all(t["symbol"] == symbol and t["bid"] < t["ask"] for t in tickers)
    recv = [r["recv_ns"] for r in sink.records]
    assert recv == sorted(recv) and all(isinstance(v, int) for v in recv)
    assert collector.stats.messages == len(sink.records) and collector.stats.overflow == 0
    assert {r["exchange"] for r in sink.records} == {"coinbase"}


async def test_full_sink_is_counted_not_blocking(make_sim):
    sim = await make_sim(rate=3000)
    sink = MemorySink(capacity=50)
    collector = CcxtCollector("coinbase", sim_config(sim, {"watchTrades": ["BTC/USD"]}), sink)
    async with running(collector):
        await wait_for(lambda: collector.stats.overflow > 100, "overflow counted")
    assert collector.stats.messages == 50 and len(sink.records) == 50


async def test_per_symbol_loops_when_bulk_is_not_supported():
    has = {"watchTradesForSymbols": False, "watchOrderBookForSymbols": True, "watchTickers": True}
    plan = plan_subscriptions(has, {"watchTrades": ["A/B", "C/D"], "watchOrderBook": ["A/B", "C/D"]})
    assert [(s.ccxt_method, s.symbols) for s in plan] == [
        ("watchTrades", ["A/B"]),
        ("watchTrades", ["C/D"]),
        ("watchOrderBookForSymbols", ["A/B", "C/D"]),
    ]


def test_trade_cursor_emits_each_trade_once():
    cursor = TradeCursor()

    def trade(i: int, ts: int) -> dict[str, Any]:
        return {"id": str(i), "timestamp": ts}

    cache = [trade(1, 10), trade(2, 10), trade(3, 11)]
    assert [t["id"] for t in cursor.new_trades(cache)] == ["1", "2", "3"]
    assert cursor.new_trades(cache) == []  # ccxt re-delivers its cache
    cache += [trade(4, 11), trade(5, 12)]
    assert [t["id"] for t in cursor.new_trades(cache[-3:])] == ["4", "5"]  # the cache was trimmed too


def test_unknown_exchange_id_names_the_closest():
    config = CcxtExchangeConfig(urls={}, channels={"watchTrades": ["BTC/USD"]})
    with pytest.raises(CcxtConfigError, match=r"'coinbse'.*closest: .*coinbase"):
        create_exchange("coinbse", config)


async def test_unknown_symbol_names_the_closest_and_is_unhealthy(make_sim):
    sim = await make_sim(rate=0)
    config = sim_config(sim, {"watchTrades": ["BTC/USDX", "ETH/USD"]})
    collector = CcxtCollector("coinbase", config, MemorySink(), backoff_initial=0.05, backoff_max=0.1)
    async with running(collector):
        await wait_for(lambda: collector.stats.reconnects >= 1, "retried")
    assert collector.stats.state == "stopped"
    assert "'BTC/USDX' (closest: BTC/USD" in (collector.stats.last_error or "")
    assert "ETH/USD'" not in (collector.stats.last_error or "")


async def test_failing_exchanges_are_retried_while_another_keeps_collecting(make_sim):
    sim = await make_sim(rate=200)
    port = closed_port()
    config = CcxtConfig(
        enabled=True,
        exchanges={
            "kraken": CcxtExchangeConfig(urls=loopback_urls("kraken", port), channels={"watchTrades": ["BTC/USD"]}),
            "coinbse": CcxtExchangeConfig(channels={"watchTrades": ["BTC/USD"]}),  # unknown id: never connects
            "coinbase": sim_config(sim, {"watchTrades": ["BTC/USD"], "watchTicker": ["ETH/USD"]}),
        },
    )
    sink = MemorySink()
    source = CcxtSource(config, sink, backoff_initial=0.05, backoff_max=0.2)
    kraken, typo, coinbase = source.collectors
    async with running(source):
        await wait_for(lambda: kraken.stats.reconnects >= 3 and typo.stats.reconnects >= 3, "both retried")
        before = coinbase.stats.messages
        await wait_for(lambda: coinbase.stats.messages > before + 20, "coinbase keeps collecting")
        assert kraken.stats.state in ("unhealthy", "connecting") and kraken.stats.errors >= 3
        assert f"127.0.0.1:{port}" in (kraken.stats.last_error or "")
        assert "closest: coinbase" in (typo.stats.last_error or "")
        assert coinbase.stats.state == "running" and coinbase.stats.errors == 0
        assert source.healthy() == {"kraken": False, "coinbse": False, "coinbase": True}
        lines = source.status_text().splitlines()
    assert {r["exchange"] for r in sink.records} == {"coinbase"}
    pattern = r"ccxt_(\w+): msgs=[\d,]+, errors=\d+, reconnects=\d+, uptime=\d+s, overflow=[\d,]+, state=\w+"
    assert [re.match(pattern, line).group(1) for line in lines] == ["kraken", "coinbse", "coinbase"]  # type: ignore[union-attr]
    assert "last_error=" in lines[0] and "last_error=" not in lines[2]


async def test_a_dropped_connection_is_reported_with_its_cause_and_without_secrets(make_sim):
    """A WebSocket that drops mid-session fails inside the session's task group: the error the
    operator sees names the cause (not 'unhandled errors in a TaskGroup'), and an exchange's
    credentials never appear in it, whatever ccxt quotes."""
    sim = await make_sim(rate=200)
    config = sim_config(sim, {"watchTrades": ["BTC/USD"]}, api_key="KEY-sekrit-123", api_secret="")
    collector = CcxtCollector("coinbase", config, MemorySink(), backoff_initial=0.05, backoff_max=0.1)
    async with running(collector):
        await wait_for(lambda: collector.stats.state == "running", "running")
        await sim.disconnect_all("simulated disconnect")
        await wait_for(lambda: collector.stats.errors >= 1, "the drop is counted")
        error = collector.stats.last_error or ""
        await wait_for(lambda: collector.stats.state == "running", "back after the drop")
    assert "TaskGroup" not in error and "ExceptionGroup" not in error, error
    assert error.split(":")[0].endswith(("Error", "Exception", "Closed", "NetworkError")), error

    collector._fail(RuntimeError("GET https://x/api?apiKey=KEY-sekrit-123 failed"), 0.1)
    assert "KEY-sekrit-123" not in (collector.stats.last_error or "") and "***" in (collector.stats.last_error or "")
