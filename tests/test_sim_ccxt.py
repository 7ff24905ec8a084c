"""The real ccxt.pro coinbase client, pointed at the simulator, cannot tell the difference."""

from __future__ import annotations

import asyncio

import ccxt.pro
import pytest

SYMBOLS = {"BTC/USD": "BTC-USD", "ETH/USD": "ETH-USD"}


def ccxt_top(book, depth: int = 20) -> tuple[list[list[float]], list[list[float]]]:
    return [list(level[:2]) for level in book["bids"][:depth]], [list(level[:2]) for level in book["asks"][:depth]]


def truth_top(sim, product_id: str, depth: int = 20) -> tuple[list[list[float]], list[list[float]]]:
    truth = sim.true_book(product_id, depth)
    return (
        [[float(p), float(s)] for p, s in truth["bids"]],
        [[float(p), float(s)] for p, s in truth["asks"]],
    )


async def wait_until_equal(sim, exchange, timeout: float = 10.0) -> None:
    """After a pause, ccxt catches up with what was sent; its top 20 must equal the truth."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        mismatched = [s for s, pid in SYMBOLS.items() if ccxt_top(exchange.orderbooks[s]) != truth_top(sim, pid)]
        if not mismatched:
            return
        if asyncio.get_running_loop().time() > deadline:
            symbol = mismatched[0]
            assert ccxt_top(exchange.orderbooks[symbol]) == truth_top(sim, SYMBOLS[symbol])
        await asyncio.sleep(0.05)


@pytest.fixture
async def exchange_for(make_sim):
    exchanges = []

    async def create(**sim_kwargs):
        sim = await make_sim(**sim_kwargs)
        exchange = ccxt.pro.coinbase({"urls": {"api": {"rest": sim.rest_url, "ws": sim.ws_url}}})
        exchanges.append(exchange)
        return sim, exchange

    yield create
    for exchange in exchanges:
        await exchange.close()


async def test_ccxt_order_books_trades_and_tickers_match_the_truth(exchange_for):
    sim, exchange = await exchange_for(rate=400, products=("BTC-USD", "ETH-USD"))
    markets = await exchange.load_markets()
    assert {"BTC/USD", "ETH/USD"} <= set(markets)
    assert markets["BTC/USD"]["precision"]["price"] == 0.01

    for symbol in SYMBOLS:
        book = await exchange.watch_order_book(symbol)
        assert book["symbol"] == symbol and len(book["bids"]) >= 500
        trades = await exchange.watch_trades(symbol)
        assert trades and all(t["symbol"] == symbol for t in trades)
        ticker = await exchange.watch_ticker(symbol)
        assert ticker["symbol"] == symbol and ticker["bid"] < ticker["ask"]

    updates = 0
    for _ in range(200):
        book = await exchange.watch_order_book_for_symbols(list(SYMBOLS))
        assert book["symbol"] in SYMBOLS
        updates += 1
    for symbol in SYMBOLS:
        await exchange.watch_trades(symbol)
        await exchange.watch_ticker(symbol)

    for _ in range(3):  # compare at several moments while the market moves
        await sim.pause()
        await wait_until_equal(sim, exchange)
        for symbol, product_id in SYMBOLS.items():
            book = exchange.orderbooks[symbol]
            assert book["bids"][0][0] < book["asks"][0][0]
            newest = sim.markets[product_id].trades[0]
            trades = exchange.trades[symbol]
            assert trades[-1]["id"] == str(newest.trade_id)
            model = sim.markets[product_id]
            assert exchange.tickers[symbol]["last"] == model.last_price / model.tick_scale
        sim.resume()
        await asyncio.sleep(0.5)
    assert updates == 200
    stats = sim.stats()["connections"]
    assert len(stats) == 1  # ccxt multiplexes every watch over one connection
    assert set(stats[0]["subscriptions"]) == {"level2", "market_trades", "ticker"}
