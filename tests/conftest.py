"""Shared fixtures: a simulator on a free loopback port and a small WebSocket client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from daedalus.sim import SimConfig, SimServer

REPO = Path(__file__).resolve().parents[1]
RECORDING = REPO.parent / "shared" / "data" / "coinbase-advanced-trade-2026-08-09.jsonl.zst"


@pytest.fixture
async def make_sim() -> AsyncIterator[Callable[..., Any]]:
    """``sim = await make_sim(rate=0, ...)``: started now, stopped after the test."""
    servers: list[SimServer] = []

    async def start(**kwargs: Any) -> SimServer:
        server = SimServer(SimConfig(**kwargs))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


class Client:
    """A plain aiohttp WebSocket client with helpers for reading JSON frames."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(orjson.dumps(message).decode())

    async def subscribe(self, channel: str, products: list[str] | None = None, kind: str = "subscribe") -> None:
        await self.send({"type": kind, "channel": channel, "product_ids": products or []})

    async def recv_text(self, timeout: float = 5.0) -> str:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"expected a text frame, got {msg.type!r} {msg.data!r}")
        return msg.data

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        return orjson.loads(await self.recv_text(timeout))

    async def recv_n(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        return [await self.recv(timeout) for _ in range(n)]

    async def recv_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """Frames up to and including the first one matching ``predicate``."""
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                frames.append(await self.recv(timeout))
                if predicate(frames[-1]):
                    return frames

    async def quiet(self, seconds: float) -> list[str]:
        """Everything that arrives within ``seconds``."""
        frames: list[str] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    frames.append(await self.recv_text(seconds))
        return frames


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Any]]:
    """``client = await connect(url)``; closed after the test."""
    session = aiohttp.ClientSession()
    sockets: list[aiohttp.ClientWebSocketResponse] = []

    async def open_client(url: str, **kwargs: Any) -> Client:
        ws = await session.ws_connect(url, max_msg_size=64 * 1024 * 1024, **kwargs)
        sockets.append(ws)
        return Client(ws)

    yield open_client
    for ws in sockets:
        await ws.close()
    await session.close()


def apply_l2(book: dict[str, dict[float, float]], frame: dict[str, Any]) -> None:
    """Apply one l2_data frame to ``{product: {signed price: size}}`` (bids keyed negative)."""
    for event in frame["events"]:
        side_books = book.setdefault(event["product_id"], {})
        if event["type"] == "snapshot":
            side_books.clear()
        for u in event["updates"]:
            key = (u["side"], u["price_level"])
            if u["new_quantity"] == "0" or float(u["new_quantity"]) == 0:
                side_books.pop(key, None)
            else:
                side_books[key] = u["new_quantity"]


def top_of(levels: dict[tuple[str, str], str], depth: int) -> dict[str, list[tuple[str, str]]]:
    bids = sorted(((p, s) for (side, p), s in levels.items() if side == "bid"), key=lambda x: -float(x[0]))
    asks = sorted(((p, s) for (side, p), s in levels.items() if side == "offer"), key=lambda x: float(x[0]))
    return {"bids": bids[:depth], "asks": asks[:depth]}
