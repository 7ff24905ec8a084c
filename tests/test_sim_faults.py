"""Each fault, set by flag or through the test API, does what it says."""

from __future__ import annotations

import asyncio
import itertools
import time

import aiohttp
import orjson

PRODUCTS = ["BTC-USD", "ETH-USD"]


async def test_drop_rate_leaves_sequence_gaps(make_sim, connect):
    sim = await make_sim(rate=0)
    sim.faults.drop_rate = 0.2
    client = await connect(sim.ws_url)
    await client.subscribe("level2", PRODUCTS)
    await client.recv_n(3)  # snapshots and acks are never dropped
    await sim.advance(2000)
    conn = sim.connections[0]
    expected = conn.seq - 3 - conn.dropped
    frames = await client.recv_n(expected)
    assert await client.quiet(0.2) == []
    seqs = [f["sequence_num"] for f in frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    missing = set(range(3, conn.seq)) - set(seqs)
    assert len(missing) == conn.dropped
    assert 0.12 * (conn.seq - 3) <= conn.dropped <= 0.28 * (conn.seq - 3)


async def test_disconnect_every(make_sim, connect):
    sim = await make_sim(rate=50)
    sim.faults.disconnect_every = 0.5
    client = await connect(sim.ws_url)
    started = time.monotonic()
    await client.subscribe("level2", ["BTC-USD"])
    while (msg := await client.ws.receive(timeout=5)).type == aiohttp.WSMsgType.TEXT:
        pass
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.extra == "simulated disconnect"
    assert client.ws.close_code == aiohttp.WSCloseCode.GOING_AWAY
    assert time.monotonic() - started >= 0.45  # not early; late beyond receive's 5 s deadline fails
    again = await connect(sim.ws_url)  # the server takes new connections
    await again.subscribe("level2", ["BTC-USD"])
    assert (await again.recv())["events"][0]["type"] == "snapshot"


async def test_idle_channel_is_closed_unless_heartbeats(make_sim, connect):
    sim = await make_sim(rate=0, heartbeat_interval=0.1)
    sim.faults.idle_timeout = 0.4
    quiet, beating = await connect(sim.ws_url), await connect(sim.ws_url)
    await quiet.subscribe("status")
    await beating.subscribe("status")
    await beating.subscribe("heartbeats")
    await quiet.recv_n(2)
    started = time.monotonic()
    while (msg := await quiet.ws.receive(timeout=5)).type == aiohttp.WSMsgType.TEXT:
        pass
    assert msg.type == aiohttp.WSMsgType.CLOSE and "idle" in msg.extra
    assert time.monotonic() - started >= 0.3  # not early; late beyond receive's 5 s deadline fails
    frames = await beating.quiet(0.8)
    assert not beating.ws.closed and any('"heartbeats"' in f for f in frames)


async def test_malformed_frames_are_injected_without_consuming_sequence(make_sim, connect):
    sim = await make_sim(rate=0)
    client = await connect(sim.ws_url)
    await client.subscribe("level2", PRODUCTS)
    await client.recv_n(3)
    sim.faults.malformed_rate = 0.1
    await sim.advance(1000)
    conn = sim.connections[0]
    texts = [await client.recv_text() for _ in range(conn.seq - 3 + conn.malformed)]
    good, bad = [], 0
    for text in texts:
        try:
            good.append(orjson.loads(text))
        except orjson.JSONDecodeError:
            bad += 1
    assert bad == conn.malformed and 50 <= bad <= 160
    assert [f["sequence_num"] for f in good] == list(range(3, conn.seq))
    await sim.inject_malformed()
    text = await client.recv_text()
    assert text.startswith('{"channel"')
    try:
        orjson.loads(text)
        raise AssertionError("expected invalid JSON")
    except orjson.JSONDecodeError:
        pass


async def test_stall_holds_frames_then_delivers_them_all(make_sim, connect):
    sim = await make_sim(rate=0)
    client = await connect(sim.ws_url)
    await client.subscribe("level2", ["BTC-USD"])
    await client.recv_n(2)
    sim.stall(0.6)
    started = time.monotonic()
    await sim.advance(300)
    conn = sim.connections[0]
    first = await client.recv(timeout=5)
    assert time.monotonic() - started >= 0.5  # nothing arrived during the stall
    rest = await client.recv_n(conn.seq - 3)
    assert [f["sequence_num"] for f in [first, *rest]] == list(range(2, conn.seq))


async def test_periodic_stall_flag(make_sim, connect):
    sim = await make_sim(rate=200)
    sim.faults.stall_every = 0.5
    sim.faults.stall_seconds = 0.3
    client = await connect(sim.ws_url)
    await client.subscribe("level2", ["BTC-USD"])
    arrivals: list[float] = []
    seqs: list[int] = []
    async with asyncio.timeout(3):
        while time.monotonic() - (arrivals[0] if arrivals else time.monotonic()) < 1.6:
            seqs.append((await client.recv())["sequence_num"])
            arrivals.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert max(gaps) >= 0.25  # stalled
    assert seqs == list(range(len(seqs)))  # and nothing lost
