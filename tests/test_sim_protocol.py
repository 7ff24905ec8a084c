"""The simulator speaks the Coinbase Advanced Trade protocol: acks, numbering, errors, rules."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import aiohttp
import orjson
import pytest

from daedalus.sim import SimConfig
from tests.conftest import apply_l2, top_of

RFC3339_NS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
PRODUCTS = ["BTC-USD", "ETH-USD"]


async def test_subscribe_sends_snapshots_then_cumulative_ack(make_sim, connect):
    sim = await make_sim(rate=0)
    client = await connect(sim.ws_url)

    await client.subscribe("level2", PRODUCTS)
    frames = await client.recv_n(3)
    assert [f["channel"] for f in frames] == ["l2_data", "l2_data", "subscriptions"]
    assert [f["events"][0]["product_id"] for f in frames[:2]] == PRODUCTS
    assert frames[2]["events"] == [{"subscriptions": {"level2": PRODUCTS}}]
    raw = await connect(sim.ws_url)  # key order of the envelope, like the real feed
    await raw.subscribe("heartbeats")
    assert re.match(
        r'^\{"channel":"subscriptions","timestamp":"[^"]+","sequence_num":0,"events":', await raw.recv_text()
    )

    for frame in frames:
        assert list(frame) == ["channel", "timestamp", "sequence_num", "events"]  # no client_id
        assert RFC3339_NS.match(frame["timestamp"]), frame["timestamp"]
        assert isinstance(frame["sequence_num"], int)
    snapshot = frames[0]["events"][0]
    assert snapshot["type"] == "snapshot"
    bids = [float(u["price_level"]) for u in snapshot["updates"] if u["side"] == "bid"]
    offers = [float(u["price_level"]) for u in snapshot["updates"] if u["side"] == "offer"]
    assert {u["side"] for u in snapshot["updates"]} == {"bid", "offer"}
    assert bids == sorted(bids, reverse=True) and offers == sorted(offers)
    assert 500 <= len(bids) <= 5000 and 500 <= len(offers) <= 5000
    assert bids[0] < offers[0] and offers[0] - bids[0] <= 0.1  # a spread of a few ticks
    assert all(isinstance(u["new_quantity"], str) and float(u["new_quantity"]) > 0 for u in snapshot["updates"])
    assert len({u["new_quantity"] for u in snapshot["updates"]}) > 100  # sizes vary

    # market_trades: the last 100 trades, newest first; then the ack grows
    await client.subscribe("market_trades", ["BTC-USD"])
    trades_frame, ack = await client.recv_n(2)
    trades = trades_frame["events"][0]["trades"]
    assert trades_frame["events"][0]["type"] == "snapshot" and len(trades) == 100
    ids = [int(t["trade_id"]) for t in trades]
    assert ids == sorted(ids, reverse=True)
    assert all(isinstance(t["price"], str) and t["side"] in ("BUY", "SELL") for t in trades)
    assert ack["events"][0]["subscriptions"] == {"level2": PRODUCTS, "market_trades": ["BTC-USD"]}

    # a repeated subscribe adds products
    await client.subscribe("market_trades", ["ETH-USD"])
    _, ack = await client.recv_n(2)
    assert ack["events"][0]["subscriptions"]["market_trades"] == PRODUCTS

    # heartbeats: no snapshot, acknowledged under its own name
    await client.subscribe("heartbeats", ["BTC-USD"])
    ack = await client.recv()
    assert ack["channel"] == "subscriptions"
    assert ack["events"][0]["subscriptions"] == {
        "heartbeats": ["heartbeats"],
        "level2": PRODUCTS,
        "market_trades": PRODUCTS,
    }
    assert ack["sequence_num"] == 7  # 3 + 2 + 2 frames before it


async def test_re_subscribe_sends_a_fresh_snapshot(make_sim, connect):
    sim = await make_sim(rate=0)
    client = await connect(sim.ws_url)
    await client.subscribe("level2", ["BTC-USD"])
    await client.recv_n(2)
    await sim.advance(50)
    await client.subscribe("level2", ["BTC-USD"])
    frames = await client.recv_until(lambda f: f["channel"] == "subscriptions")
    book: dict = {}
    for frame in frames[:-1]:
        apply_l2(book, frame)
    assert frames[-2]["events"][0]["type"] == "snapshot"
    truth = sim.true_book("BTC-USD", 50)
    assert top_of(book["BTC-USD"], 50) == {"bids": truth["bids"], "asks": truth["asks"]}


async def test_sequence_num_counts_per_connection_across_channels(make_sim, connect):
    sim = await make_sim(rate=None, heartbeat_interval=0.05)
    first, second = await connect(sim.ws_url), await connect(sim.ws_url)
    for channel in ("level2", "market_trades", "ticker", "heartbeats"):
        await first.subscribe(channel, PRODUCTS)
    await second.subscribe("ticker", ["ETH-USD"])
    frames = await first.recv_n(3000)
    assert [f["sequence_num"] for f in frames] == list(range(3000))
    assert {f["channel"] for f in frames} >= {"l2_data", "market_trades", "ticker", "subscriptions"}
    other = await second.recv_n(20)
    assert [f["sequence_num"] for f in other] == list(range(20))
    assert all(f["channel"] in ("ticker", "subscriptions") for f in other)


async def test_client_id_only_when_configured(make_sim, connect):
    sim = await make_sim(rate=0, client_id="")
    client = await connect(sim.ws_url)
    await client.subscribe("heartbeats")
    assert list(await client.recv()) == ["channel", "client_id", "timestamp", "sequence_num", "events"]


async def test_updates_rebuild_the_true_book_frame_by_frame(make_sim, connect):
    sim = await make_sim(rate=0)
    client = await connect(sim.ws_url)
    await client.subscribe("level2", PRODUCTS)
    book: dict = {}
    for frame in (await client.recv_n(3))[:2]:
        apply_l2(book, frame)
    conn = sim.connections[0]
    await sim.advance(3000)
    checked = 0
    for _ in range(conn.seq - 3):
        frame = await client.recv()
        apply_l2(book, frame)
        product = frame["events"][0]["product_id"]
        if frame["sequence_num"] % 97 == 0:  # the truth as it was right after this frame
            truth = sim.true_book(product, 25, connection=conn, after_seq=frame["sequence_num"])
            assert top_of(book[product], 25) == {"bids": truth["bids"], "asks": truth["asks"]}
            checked += 1
    assert checked >= 20
    for product in PRODUCTS:
        truth = sim.true_book(product, 100)
        assert top_of(book[product], 100) == {"bids": truth["bids"], "asks": truth["asks"]}
        assert float(truth["bids"][0][0]) < float(truth["asks"][0][0])


async def test_trades_take_the_touch_and_ticker_follows(make_sim, connect):
    sim = await make_sim(rate=0, products=("BTC-USD",))
    client = await connect(sim.ws_url)
    for channel in ("level2", "market_trades", "ticker"):
        await client.subscribe(channel, ["BTC-USD"])
    opening = await client.recv_n(6)
    book: dict = {}
    apply_l2(book, opening[0])
    await sim.advance(1500)
    frames = await client.recv_n(sim.connections[0].seq - 6)
    trades = tickers = 0
    touch_before = None
    for frame in frames:
        event = frame["events"][0]
        if frame["channel"] == "l2_data":
            top = top_of(book["BTC-USD"], 1)
            touch_before = (top["bids"][0][0], top["asks"][0][0])
            apply_l2(book, frame)
        elif frame["channel"] == "market_trades":
            trade = event["trades"][0]
            # the maker side is reported: SELL = a resting offer lifted at the best ask
            assert trade["price"] == (touch_before[1] if trade["side"] == "SELL" else touch_before[0])
            trades += 1
        elif frame["channel"] == "ticker":
            ticker = event["tickers"][0]
            top = top_of(book["BTC-USD"], 1)
            assert (ticker["best_bid"], ticker["best_bid_quantity"]) == top["bids"][0]
            assert (ticker["best_ask"], ticker["best_ask_quantity"]) == top["asks"][0]
            assert ticker["price"] == trade["price"]  # the last trade
            tickers += 1
    assert trades > 50 and tickers == trades


async def test_unsubscribe_removes_products_then_everything(make_sim, connect):
    sim = await make_sim(rate=0)
    client = await connect(sim.ws_url)
    await client.subscribe("level2", PRODUCTS)
    await client.subscribe("ticker", PRODUCTS)
    await client.recv_until(lambda f: f["channel"] == "subscriptions" and "ticker" in f["events"][0]["subscriptions"])
    await client.subscribe("level2", ["BTC-USD"], kind="unsubscribe")
    ack = await client.recv()
    assert ack["events"][0]["subscriptions"] == {"level2": ["ETH-USD"], "ticker": PRODUCTS}
    await client.subscribe("ticker", PRODUCTS, kind="unsubscribe")
    await client.subscribe("level2", ["ETH-USD"], kind="unsubscribe")
    await client.recv()
    ack = await client.recv()
    assert ack["events"] == [{"subscriptions": {}}]
    await sim.advance(200)
    assert await client.quiet(0.3) == []


async def test_bad_requests_get_error_replies_and_the_connection_stays(make_sim, connect):
    sim = await make_sim(rate=0)
    client = await connect(sim.ws_url)
    cases = [
        ("{not json", "invalid JSON"),
        ('["subscribe"]', "JSON object"),
        ('{"type":"subscribe","channel":"level3","product_ids":["BTC-USD"]}', "unknown channel 'level3'"),
        ('{"type":"subscribe","channel":"level2","product_ids":["DOGE-JPY"]}', "unknown product_id 'DOGE-JPY'"),
        ('{"type":"subscribe","channels":["level2"],"product_ids":["BTC-USD"]}', "exactly one channel"),
        ('{"type":"hello","channel":"level2"}', "unknown message type"),
        ('{"type":"subscribe","channel":"level2"}', "product_ids is required"),
        ('{"type":"subscribe","channel":"level2","product_ids":"BTC-USD"}', "list of strings"),
    ]
    for text, expected in cases:
        await client.ws.send_str(text)
        reply = await client.recv()
        assert reply["type"] == "error", reply
        assert expected in reply["message"], (expected, reply)
    await client.ws.send_bytes(b'{"type":"subscribe"}')
    assert "binary" in (await client.recv())["message"]
    await client.subscribe("heartbeats")
    assert (await client.recv())["channel"] == "subscriptions"  # still served
    assert sim.connections[0].seq == 1  # errors carry no sequence_num


async def test_large_requests_up_to_16mb_and_jwt_ignored(make_sim, connect):
    sim = await make_sim(rate=0)
    client = await connect(sim.ws_url)
    big = {"type": "subscribe", "channel": "heartbeats", "product_ids": [], "jwt": "x" * (10 * 1024 * 1024)}
    await client.send(big)
    assert (await client.recv())["events"] == [{"subscriptions": {"heartbeats": ["heartbeats"]}}]
    too_big = {"type": "subscribe", "channel": "heartbeats", "jwt": "x" * (17 * 1024 * 1024)}
    with contextlib.suppress(ConnectionError):  # the server may close before we finish sending
        await client.send(too_big)
    msg = await client.ws.receive(timeout=5)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    # 1009 when the close frame arrives before our send is cut, 1006 otherwise
    assert client.ws.close_code in (aiohttp.WSCloseCode.MESSAGE_TOO_BIG, aiohttp.WSCloseCode.ABNORMAL_CLOSURE)
    assert not sim.connections  # the server dropped the oversized client


async def test_pings_are_answered(make_sim, connect):
    sim = await make_sim(rate=0)
    client = await connect(sim.ws_url, autoping=False)
    await client.ws.ping(b"are-you-there")
    msg = await client.ws.receive(timeout=5)
    assert msg.type == aiohttp.WSMsgType.PONG and msg.data == b"are-you-there"


async def test_no_subscribe_within_5s_disconnects(make_sim, connect):
    """Coinbase's 5 s (the default) is checked with a 2 s deadline: the same code path, 3 s less
    waiting. A subscribe late in the window keeps the other connection."""
    assert SimConfig().subscribe_timeout == 5.0
    sim = await make_sim(rate=0, heartbeat_interval=0.5, subscribe_timeout=2.0)
    idle, active = await connect(sim.ws_url), await connect(sim.ws_url)
    started = time.monotonic()
    await asyncio.sleep(0.5)
    await active.subscribe("heartbeats")
    msg = await idle.ws.receive(timeout=10)
    waited = time.monotonic() - started
    assert msg.type == aiohttp.WSMsgType.CLOSE
    assert idle.ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
    assert "no subscribe within 2s" in msg.extra
    assert waited >= 1.9  # not before the deadline (no upper bound: a loaded machine may be late)
    frames = await active.quiet(0.8)
    assert frames and not active.ws.closed  # the subscribed client is still served


async def test_heartbeats_every_second_with_integer_counter(make_sim, connect):
    sim = await make_sim(rate=0)
    client = await connect(sim.ws_url)
    await client.subscribe("heartbeats")
    await client.recv()
    started = time.monotonic()
    beats = await client.recv_n(3, timeout=3)
    assert time.monotonic() - started >= 1.5  # not faster than 1/s; slower misses recv's 3 s deadline
    counters = [b["events"][0]["heartbeat_counter"] for b in beats]
    assert all(isinstance(c, int) for c in counters)
    assert counters == list(range(counters[0], counters[0] + 3))
    assert re.match(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{9} \+0000 UTC m=\+\d+\.\d{9}$", beats[0]["events"][0]["current_time"]
    )


async def test_candles_status_and_ticker_batch(make_sim, connect):
    sim = await make_sim(rate=200, candles_interval=0.1, ticker_batch_interval=0.3)
    client = await connect(sim.ws_url)
    await client.subscribe("candles", ["BTC-USD"])
    snapshot, _ack = await client.recv_n(2)
    candles = snapshot["events"][0]["candles"]
    assert snapshot["events"][0]["type"] == "snapshot" and candles
    assert all(int(c["start"]) % 300 == 0 and c["product_id"] == "BTC-USD" for c in candles)
    assert all(float(c["low"]) <= float(c["open"]) <= float(c["high"]) for c in candles)
    update = (await client.recv_until(lambda f: f["channel"] == "candles"))[-1]
    assert update["events"][0]["type"] == "update"

    await client.subscribe("status", PRODUCTS)
    status = (await client.recv_until(lambda f: f["channel"] == "status"))[-1]
    assert [p["id"] for p in status["events"][0]["products"]] == PRODUCTS
    assert status["events"][0]["products"][0]["quote_increment"] == "0.01"

    await client.subscribe("ticker_batch", ["ETH-USD"])
    batch = await client.recv_until(lambda f: f["channel"] == "ticker_batch" and f["events"][0]["type"] == "update")
    ticker = batch[-1]["events"][0]["tickers"][0]
    assert ticker["product_id"] == "ETH-USD" and float(ticker["best_bid"]) < float(ticker["best_ask"])
    assert next(f["events"][0]["type"] for f in batch if f["channel"] == "ticker_batch") == "snapshot"


async def test_rest_endpoints_for_ccxt(make_sim):
    sim = await make_sim(rate=0, products=("BTC-USD", "ETH-USD", "SOL-EUR"))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sim.rest_url}/api/v3/brokerage/market/products") as r:
            assert r.status == 200
            products = (await r.json())["products"]
        async with http.get(f"{sim.rest_url}/api/v3/brokerage/market/products?product_type=FUTURE") as r:
            assert (await r.json())["products"] == []
        async with http.get(f"{sim.rest_url}/v2/currencies") as r:
            fiat = {c["id"] for c in (await r.json())["data"]}
        async with http.get(f"{sim.rest_url}/v2/currencies/crypto") as r:
            crypto = {c["code"] for c in (await r.json())["data"]}
        async with http.get(f"{sim.rest_url}/v2/exchange-rates") as r:
            rates = (await r.json())["data"]["rates"]
        async with http.get(f"{sim.rest_url}/api/v3/brokerage/market/products/ETH-USD") as r:
            single = await r.json()
        async with http.get(f"{sim.rest_url}/api/v3/brokerage/market/products/NOPE-USD") as r:
            assert r.status == 404
    assert [p["product_id"] for p in products] == ["BTC-USD", "ETH-USD", "SOL-EUR"]
    btc = products[0]
    assert btc["base_currency_id"] == "BTC" and btc["quote_currency_id"] == "USD" and btc["product_type"] == "SPOT"
    assert btc["price_increment"] == "0.01" and btc["base_increment"] == "0.00000001"
    assert fiat == {"USD", "EUR"} and crypto == {"BTC", "ETH", "SOL"} and set(rates) == fiat | crypto
    assert single["product_id"] == "ETH-USD"


@pytest.mark.parametrize("rate", [50.0, 400.0])
async def test_rate_is_respected(make_sim, connect, rate):
    sim = await make_sim(rate=rate)
    client = await connect(sim.ws_url)
    for channel in ("level2", "market_trades", "ticker"):
        await client.subscribe(channel, PRODUCTS)
    await client.recv_until(lambda f: f["channel"] == "subscriptions" and "ticker" in f["events"][0]["subscriptions"])
    generated, started = sim.frames_generated, time.monotonic()
    await asyncio.sleep(1.0)  # a sample of the rate, not an assertion: judged by the time it really took
    produced, elapsed = sim.frames_generated - generated, time.monotonic() - started
    assert 0.6 * rate * elapsed <= produced <= 1.4 * rate * elapsed + 5
    orjson.loads(await client.recv_text())
