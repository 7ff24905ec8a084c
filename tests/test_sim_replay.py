"""Replay: recorded frames go out in order, byte-equal except the renumbered sequence_num."""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import orjson
import pytest
import zstandard

from tests.conftest import RECORDING

SEQ = re.compile(r'"sequence_num":\d+')
needs_recording = pytest.mark.skipif(not RECORDING.exists(), reason=f"reference recording {RECORDING} is absent")


def recorded() -> tuple[list[str], list[str]]:
    """(received frames, channels subscribed) of the reference recording."""
    with RECORDING.open("rb") as f:
        text = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read().decode()
    frames, channels = [], []
    for line in text.splitlines():
        doc = json.loads(line)
        if doc["t"] == "recv":
            frames.append(doc["data"])
        elif doc["t"] == "send":
            channels.append(json.loads(doc["data"])["channel"])
    return frames, channels


async def receive_all(client, count: int) -> list[str]:
    return [await client.recv_text(timeout=10) for _ in range(count)]


def assert_same_except_sequence(received: list[str], expected: list[str]) -> None:
    assert len(received) == len(expected)
    for index, (got, want) in enumerate(zip(received, expected, strict=True)):
        assert SEQ.sub("", got, count=1) == SEQ.sub("", want, count=1), index
        assert json.loads(got)["sequence_num"] == index


@needs_recording
async def test_replay_delivers_every_recorded_frame_byte_equal(make_sim, connect):
    frames, channels = recorded()
    assert len(frames) == 1030 and max(len(f) for f in frames) > 5_000_000
    sim = await make_sim(replay=RECORDING, speed=0)
    client = await connect(sim.ws_url)
    for channel in channels:
        await client.subscribe(channel, ["BTC-USD", "ETH-USD"])
    received = await receive_all(client, len(frames))
    assert_same_except_sequence(received, frames)
    assert await client.quiet(0.3) == []  # nothing more, nothing generated


@needs_recording
async def test_replay_waits_for_slow_subscribers(make_sim, connect):
    frames, channels = recorded()
    sim = await make_sim(replay=RECORDING, speed=0)
    client = await connect(sim.ws_url)
    reader = asyncio.create_task(receive_all(client, len(frames)))
    for channel in reversed(channels):  # a different order, with pauses in between
        await client.subscribe(channel, ["BTC-USD", "ETH-USD"])
        await asyncio.sleep(0.4)
    received = await reader
    assert_same_except_sequence(received, frames)


@needs_recording
async def test_replay_skips_channels_never_subscribed(make_sim, connect):
    frames, _ = recorded()
    sim = await make_sim(replay=RECORDING, speed=0, subscribe_timeout=0.5)
    client = await connect(sim.ws_url)
    await client.subscribe("market_trades", ["BTC-USD", "ETH-USD"])
    received = await client.quiet(2.0)
    wanted = [f for f in frames if '"channel":"market_trades"' in f[:40] or '"channel":"subscriptions"' in f[:40]]
    assert_same_except_sequence(received, wanted)


@needs_recording
async def test_replay_serves_the_recorded_products_response(make_sim):
    sim = await make_sim(replay=RECORDING, speed=0)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sim.rest_url}/api/v3/brokerage/market/products") as r:
            body = await r.json()
        async with http.get(f"{sim.rest_url}/v2/currencies/crypto") as r:
            crypto = {c["code"] for c in (await r.json())["data"]}
    assert body["num_products"] == 920 and len(body["products"]) == 920
    assert body["products"][0]["product_id"] == "BTC-USD"
    assert {"BTC", "ETH"} <= crypto


def write_segment(path, frames: list[bytes], start_ns: int, step_ns: int) -> None:
    """A Daedalus raw segment as the capture layer writes it (architecture 3.2)."""
    lines = [b'{"recv_ns":%d,"conn":1,"event":"connect","url":"ws://x"}' % start_ns]
    for i, frame in enumerate(frames):
        lines.append(b'{"recv_ns":%d,"conn":1,"msg":%s}' % (start_ns + i * step_ns, frame))
    lines.append(b'{"recv_ns":%d,"conn":1,"raw":%s}' % (start_ns + len(frames) * step_ns, orjson.dumps("not json {")))
    path.write_bytes(b"\n".join(lines) + b"\n")


async def test_replay_of_raw_segments_with_speed(make_sim, connect, tmp_path):
    frames = [
        b'{"channel":"heartbeats","timestamp":"2026-01-01T00:00:00Z","sequence_num":41,'
        b'"events":[{"current_time":"x","heartbeat_counter":%d}]}' % i
        for i in range(5)
    ]
    segments = tmp_path / "ready" / "coinbase"
    segments.mkdir(parents=True)
    write_segment(segments / "segment_20260101T00_00001.ndjson", frames[:3], 10**18, 200_000_000)
    compressed = tmp_path / "part2.ndjson"
    write_segment(compressed, frames[3:], 10**18 + 10**9, 200_000_000)
    (segments / "segment_20260101T00_00002.ndjson.zst").write_bytes(
        zstandard.ZstdCompressor().compress(compressed.read_bytes())
    )
    sim = await make_sim(replay=segments, speed=2.0)
    # no products response recorded and no product in the frames: the configured products are described
    async with aiohttp.ClientSession() as http, http.get(f"{sim.rest_url}/api/v3/brokerage/market/products") as r:
        assert [p["product_id"] for p in (await r.json())["products"]] == ["BTC-USD", "ETH-USD"]
    client = await connect(sim.ws_url)
    started = time.monotonic()
    await client.subscribe("heartbeats")
    received = [await client.recv_text() for _ in range(7)]
    elapsed = time.monotonic() - started
    # 5 frames + 2 invalid frames kept verbatim; 1.0 s of recorded time at speed 2
    assert received[3] == "not json {" and received[6] == "not json {"
    data = [r for r in received if r != "not json {"]
    assert_same_except_sequence(data, [f.decode() for f in frames])
    assert elapsed >= 0.4  # paced, not sent at once (no upper bound: a loaded machine may be late)
