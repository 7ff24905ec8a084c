"""The market model: a consistent, realistic, reproducible ground-truth book."""

from __future__ import annotations

import random

import pytest

from daedalus.sim.market import MarketModel, format_decimal, product_spec


def model(seed: int = 7, product: str = "BTC-USD", **kwargs) -> MarketModel:
    return MarketModel(product_spec(product), random.Random(seed), **kwargs)


def test_book_stays_consistent_over_many_steps():
    m = model()
    trades = 0
    for i in range(50_000):
        result = m.step(1_700_000_000_000_000_000 + i)
        trades += result.trade is not None
        if i % 250 == 0:
            m.check_invariants()
            assert 500 <= len(m.bids) <= 5000 and 500 <= len(m.asks) <= 5000
            assert 1 <= m.best_ask - m.best_bid <= 50  # a spread of a few ticks
    m.check_invariants()
    assert 0.05 * 50_000 <= trades <= 0.12 * 50_000


def test_trade_consumes_the_touch():
    m = model()
    for i in range(5000):
        bid, ask = m.best_bid, m.best_ask
        bid_size, ask_size = m.bids[bid], m.asks[ask]
        result = m.step(i)
        if result.trade is not None:
            t = result.trade
            if t.maker_side == "SELL":
                assert t.price == ask and m.asks.get(ask, 0) == ask_size - t.size
            else:
                assert t.price == bid and m.bids.get(bid, 0) == bid_size - t.size
            maker_book = m.bids if t.maker_side == "BUY" else m.asks
            assert m.last_price == t.price
            assert result.changes == [(t.maker_side == "BUY", t.price, maker_book.get(t.price, 0))]


def test_same_seed_same_market():
    a, b = model(3), model(3)
    steps_a = [a.step(i).changes for i in range(2000)]
    steps_b = [b.step(i).changes for i in range(2000)]
    assert steps_a == steps_b and a.bids == b.bids
    assert model(4).bids != a.bids


def test_top_at_a_past_version_is_the_book_as_it_was():
    m = model()
    for i in range(1000):
        m.step(i)
    version, then = m.version, m.top(30)
    for i in range(3000):
        m.step(i)
    assert m.top(30) != then
    assert m.top(30, version) == then


def test_history_is_bounded():
    m = model(history=100)
    for i in range(500):
        m.step(i)
    with pytest.raises(LookupError):
        m.top(10, 10)


@pytest.mark.parametrize(
    ("value", "decimals", "text"),
    [(6500001, 2, "65000.01"), (6500000, 2, "65000"), (6500010, 2, "65000.1"), (1, 8, "0.00000001"), (0, 8, "0")],
)
def test_format_decimal(value, decimals, text):
    assert format_decimal(value, decimals) == text


def test_unknown_products_get_a_plausible_spec():
    spec = product_spec("XYZ-EUR")
    assert (spec.base, spec.quote, spec.price_increment) == ("XYZ", "EUR", "0.01")
    assert product_spec("DOGE-USD").price_increment == "0.00001"
