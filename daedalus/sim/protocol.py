"""Coinbase Advanced Trade wire format: envelopes, events and timestamps.

Everything here builds JSON text by hand from values that are already safe (validated
product ids, digits), because the simulator's hot path is formatting frames: an
f-string is several times cheaper than building dicts and serialising them.
Field order and number formats follow the real feed (see ``shared/data``): prices and
sizes are strings, ``sequence_num`` and ``heartbeat_counter`` are integers, timestamps
are RFC 3339 with up to nine fractional digits and trailing zeros trimmed (Go style).
"""

from __future__ import annotations

import time

import orjson

from daedalus.sim.market import (
    SIZE_DECIMALS,
    Candle,
    MarketModel,
    ProductSpec,
    StepResult,
    Trade,
    format_decimal,
)

# subscribe name -> channel name carried by frames
WIRE_CHANNEL = {
    "heartbeats": "heartbeats",
    "candles": "candles",
    "status": "status",
    "ticker": "ticker",
    "ticker_batch": "ticker_batch",
    "level2": "l2_data",
    "market_trades": "market_trades",
}
SUBSCRIBE_NAME = {wire: name for name, wire in WIRE_CHANNEL.items()}
MARKET_CHANNELS = frozenset({"level2", "market_trades", "ticker", "ticker_batch", "candles"})

_second_cache: tuple[int, str] = (-1, "")


def _seconds_text(seconds: int) -> str:
    global _second_cache
    if _second_cache[0] != seconds:
        _second_cache = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    return _second_cache[1]


def rfc3339(ns: int, digits: int = 9) -> str:
    """``2026-08-09T21:05:48.228568804Z``; ``digits=6`` gives exchange event times."""
    seconds, frac = divmod(ns, 1_000_000_000)
    fraction = f"{frac:09d}"[:digits].rstrip("0")
    base = _seconds_text(seconds)
    return f"{base}.{fraction}Z" if fraction else f"{base}Z"


def go_time(ns: int, uptime_ns: int) -> str:
    """Go's ``time.Time.String()`` with a monotonic reading, as heartbeats carry it."""
    seconds, frac = divmod(ns, 1_000_000_000)
    up_s, up_frac = divmod(uptime_ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))
    return f"{stamp}.{frac:09d} +0000 UTC m=+{up_s}.{up_frac:09d}"


def envelope(channel: str, timestamp: str, sequence_num: int, events: str, client_id: str | None) -> bytes:
    client = f'"client_id":"{client_id}",' if client_id is not None else ""
    return (
        f'{{"channel":"{channel}",{client}"timestamp":"{timestamp}","sequence_num":{sequence_num},"events":{events}}}'
    ).encode()


def error_frame(message: str) -> bytes:
    return orjson.dumps({"type": "error", "message": message})


# -- level2 ------------------------------------------------------------------


def _level(side: str, event_time: str, price: str, size: str) -> str:
    return f'{{"side":"{side}","event_time":"{event_time}","price_level":"{price}","new_quantity":"{size}"}}'


def l2_update_events(model: MarketModel, step: StepResult) -> str:
    pd = model.spec.price_decimals
    event_time = rfc3339(step.time_ns, 6)
    levels = ",".join(
        _level(
            "bid" if is_bid else "offer",
            event_time,
            format_decimal(price, pd),
            format_decimal(size, SIZE_DECIMALS),
        )
        for is_bid, price, size in step.changes
    )
    return f'[{{"type":"update","product_id":"{step.product_id}","updates":[{levels}]}}]'


def l2_snapshot_events(model: MarketModel, now_ns: int) -> str:
    """The whole book: bids best first, then offers ascending."""
    pd = model.spec.price_decimals
    event_time = rfc3339(now_ns, 6)
    parts = [
        _level("bid", event_time, format_decimal(p, pd), format_decimal(s, SIZE_DECIMALS))
        for p, s in sorted(model.bids.items(), reverse=True)
    ]
    parts += [
        _level("offer", event_time, format_decimal(p, pd), format_decimal(s, SIZE_DECIMALS))
        for p, s in sorted(model.asks.items())
    ]
    return f'[{{"type":"snapshot","product_id":"{model.spec.product_id}","updates":[{",".join(parts)}]}}]'


# -- market_trades ---------------------------------------------------------------


def _trade(model: MarketModel, trade: Trade) -> str:
    return (
        f'{{"product_id":"{model.spec.product_id}","trade_id":"{trade.trade_id}",'
        f'"price":"{format_decimal(trade.price, model.spec.price_decimals)}",'
        f'"size":"{format_decimal(trade.size, SIZE_DECIMALS)}",'
        f'"time":"{rfc3339(trade.time_ns, 6)}","side":"{trade.maker_side}"}}'
    )


def trades_events(model: MarketModel, trades: list[Trade], kind: str) -> str:
    """``kind`` is ``snapshot`` (the last 100, newest first) or ``update``."""
    return f'[{{"type":"{kind}","trades":[{",".join(_trade(model, t) for t in trades)}]}}]'


# -- ticker / ticker_batch -----------------------------------------------------------


def _pct(now: int, then: int) -> str:
    return repr((now - then) / then * 100) if then else "0"


def ticker_object(model: MarketModel) -> str:
    pd = model.spec.price_decimals
    st = model.stats
    return (
        f'{{"type":"ticker","product_id":"{model.spec.product_id}",'
        f'"price":"{format_decimal(model.last_price, pd)}",'
        f'"volume_24_h":"{format_decimal(st.volume_24h, SIZE_DECIMALS)}",'
        f'"low_24_h":"{format_decimal(st.low_24h, pd)}","high_24_h":"{format_decimal(st.high_24h, pd)}",'
        f'"low_52_w":"{format_decimal(st.low_52w, pd)}","high_52_w":"{format_decimal(st.high_52w, pd)}",'
        f'"price_percent_chg_24_h":"{_pct(model.last_price, st.open_24h)}",'
        f'"best_bid":"{format_decimal(model.best_bid, pd)}",'
        f'"best_ask":"{format_decimal(model.best_ask, pd)}",'
        f'"best_bid_quantity":"{format_decimal(model.bids[model.best_bid], SIZE_DECIMALS)}",'
        f'"best_ask_quantity":"{format_decimal(model.asks[model.best_ask], SIZE_DECIMALS)}"}}'
    )


def ticker_events(model: MarketModel, kind: str) -> str:
    return f'[{{"type":"{kind}","tickers":[{ticker_object(model)}]}}]'


# -- candles, heartbeats, status, subscriptions ------------------------------------


def _candle(model: MarketModel, c: Candle) -> str:
    pd = model.spec.price_decimals
    return (
        f'{{"start":"{c.start}","high":"{format_decimal(c.high, pd)}","low":"{format_decimal(c.low, pd)}",'
        f'"open":"{format_decimal(c.open, pd)}","close":"{format_decimal(c.close, pd)}",'
        f'"volume":"{format_decimal(c.volume, SIZE_DECIMALS)}","product_id":"{model.spec.product_id}"}}'
    )


def candles_events(model: MarketModel, candles: list[Candle], kind: str) -> str:
    return f'[{{"type":"{kind}","candles":[{",".join(_candle(model, c) for c in candles)}]}}]'


def heartbeat_events(now_ns: int, uptime_ns: int, counter: int) -> str:
    return f'[{{"current_time":"{go_time(now_ns, uptime_ns)}","heartbeat_counter":{counter}}}]'


def status_events(specs: list[ProductSpec]) -> str:
    products = [
        {
            "product_type": "SPOT",
            "id": s.product_id,
            "base_currency": s.base,
            "quote_currency": s.quote,
            "base_increment": s.base_increment,
            "quote_increment": s.price_increment,
            "display_name": f"{s.base}/{s.quote}",
            "status": "online",
            "status_message": "",
            "min_market_funds": "1",
        }
        for s in specs
    ]
    return orjson.dumps([{"type": "snapshot", "products": products}]).decode()


def subscriptions_events(subscriptions: dict[str, list[str]]) -> str:
    """The cumulative acknowledgement: channel names as subscribed, sorted."""
    shown = {name: subscriptions[name] for name in sorted(subscriptions)}
    return orjson.dumps([{"subscriptions": shown}]).decode()
