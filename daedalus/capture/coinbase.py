"""Coinbase Advanced Trade collector: connect, subscribe, stamp, hand on. I/O only.

Each frame is stamped with ``time.time_ns()`` the moment it is read and queued as the
text it arrived as; nothing is parsed on the hot path. Only ``sequence_num`` is read,
with a bounded substring scan, to detect gaps: a gap writes a ``gap`` control line and
re-subscribes level2 for this connection's products, so a fresh snapshot follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

from daedalus.backoff import reconnect_pause
from daedalus.capture.auth import ws_jwt
from daedalus.capture.segments import SegmentWriter
from daedalus.config import CoinbaseConfig, IngestionConfig
from daedalus.logs import get_logger

log = get_logger(__name__)

SEQ_KEY = '"sequence_num":'
SEQ_SCAN = 256  # the envelope's sequence_num comes before the events
PRODUCT_KEY = '"product_id":"'
PRODUCT_SCAN = 400  # the first event's product_id follows the envelope closely
TICKER_PREFIX = '{"channel":"ticker'  # ticker and ticker_batch
MAX_TICKER_BYTES = 16 * 1024
MAX_FRAME_BYTES = 64 * 1024 * 1024  # level2 snapshots of busy books exceed 5 MB
RESUBSCRIBE_GRACE_S = 5.0
HOUR_NS = 3_600_000_000_000


def sequence_of(frame: str) -> int | None:
    """The envelope's ``sequence_num`` without parsing the frame (None if absent)."""
    at = frame.find(SEQ_KEY, 0, SEQ_SCAN)
    if at < 0:
        return None
    start = at + len(SEQ_KEY)
    end = frame.find(",", start, start + 24)
    if end < 0:  # a cut-off frame: no trustworthy number
        return None
    try:
        return int(frame[start:end])
    except ValueError:
        return None


def product_of(frame: str) -> str | None:
    """The first event's ``product_id`` by a bounded substring scan (None if not near the start)."""
    at = frame.find(PRODUCT_KEY, 0, PRODUCT_SCAN)
    if at < 0:
        return None
    start = at + len(PRODUCT_KEY)
    end = frame.find('"', start, start + 80)
    return frame[start:end] if end > 0 else None


def ticker_mids(frame: str) -> dict[str, float]:
    """Mid price (or last price) per product of a ticker frame; {} for anything unexpected.

    Ticker frames are small and a few per second, so parsing them costs nothing measurable;
    the mids feed the status page's chart, never the data.
    """
    if len(frame) > MAX_TICKER_BYTES:
        return {}
    try:
        message = orjson.loads(frame)
        mids = {}
        for event in message.get("events") or ():
            for ticker in event.get("tickers") or ():
                product = ticker.get("product_id")
                bid, ask = ticker.get("best_bid"), ticker.get("best_ask")
                price = (float(bid) + float(ask)) / 2 if bid and ask else float(ticker["price"])
                if isinstance(product, str) and math.isfinite(price):
                    mids[product] = price
        return mids
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        return {}


def is_l2_snapshot(frame: str) -> bool:
    return frame.startswith('{"channel":"l2_data"') and '"type":"snapshot"' in frame[:SEQ_SCAN]


@dataclass
class CollectorStats:
    messages: int = 0
    bytes: int = 0
    errors: int = 0
    reconnects: int = 0
    gaps: int = 0
    hourly_snapshots: int = 0  # level2 re-subscriptions at the hour (ingestion.snapshot_every_hour)
    connected_since: float | None = None
    last_message_at: float | None = None
    state: str = "starting"
    last_error: str = ""
    # configured product -> receive time (ns) of its newest frame, and its last ticker mid
    product_seen: dict[str, int] = field(default_factory=dict)
    product_mid: dict[str, float] = field(default_factory=dict)

    def uptime(self) -> float:
        return time.monotonic() - self.connected_since if self.connected_since else 0.0

    def last_message_age(self) -> float | None:
        return time.monotonic() - self.last_message_at if self.last_message_at else None


class CoinbaseCollector:
    """One WebSocket connection carrying ``product_ids`` on every configured channel."""

    def __init__(
        self,
        conn_id: int,
        product_ids: list[str],
        coinbase: CoinbaseConfig,
        ingestion: IngestionConfig,
        writer: SegmentWriter,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.conn_id = conn_id
        self.product_ids = product_ids
        self.coinbase = coinbase
        self.ingestion = ingestion
        self.writer = writer
        self.clock = clock
        self.stats = CollectorStats()
        self.channels = list(dict.fromkeys([*coinbase.channels, "heartbeats"]))
        self._rng = random.Random()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._resubscribed_at: float | None = None
        self._stopping = False
        self._close_reason: str | None = None

    def subscribe_messages(self) -> list[dict[str, object]]:
        return [self._subscribe_message(channel) for channel in self.channels]

    def _subscribe_message(self, channel: str) -> dict[str, object]:
        message: dict[str, object] = {"type": "subscribe", "product_ids": self.product_ids, "channel": channel}
        key = self.coinbase.api_key.get_secret_value()
        if key:
            message["jwt"] = ws_jwt(key, self.coinbase.api_secret.get_secret_value())
        return message

    async def run(self) -> None:
        """Connect and capture until cancelled, reconnecting with backoff."""
        attempt = 0
        async with aiohttp.ClientSession() as session:
            while not self._stopping:
                reason = "closed by server"
                try:
                    async with session.ws_connect(
                        self.coinbase.ws_url, max_msg_size=MAX_FRAME_BYTES, autoping=True, heartbeat=None
                    ) as ws:
                        self._ws = ws
                        messages_before = self.stats.messages
                        reason = await self._session(ws)
                        if self.stats.messages > messages_before:
                            attempt = 0  # only a session that delivered data resets the backoff
                except asyncio.CancelledError:
                    self._disconnected("shutdown")
                    raise
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                    self.stats.errors += 1
                    self.stats.last_error = reason
                except Exception as exc:  # a bug must not end capture: log it, back off, go on
                    reason = f"unexpected {type(exc).__name__}: {exc}"
                    self.stats.errors += 1
                    self.stats.last_error = reason
                    log.error("collector_error", conn=self.conn_id, error=repr(exc), exc_info=True)
                finally:
                    self._ws = None
                self._disconnected("shutdown" if self._stopping else reason)
                if self._stopping:
                    break
                attempt += 1
                delay = reconnect_pause(self.ingestion, attempt, self._rng)
                if delay is None:
                    log.error("collector_gave_up", conn=self.conn_id, attempts=attempt, reason=reason)
                    self.stats.state = "failed"
                    return
                log.warning(
                    "collector_reconnecting",
                    conn=self.conn_id,
                    url=self.coinbase.ws_url,
                    reason=reason,
                    attempt=attempt,
                    retry_in=round(delay, 2),
                )
                self.stats.state = "backoff"
                await asyncio.sleep(delay)
                self.stats.reconnects += 1

    def _disconnected(self, reason: str) -> None:
        if self.stats.state == "connected":
            self.writer.put_control(self.clock(), self.conn_id, "disconnect", reason=reason)
            log.info("collector_disconnected", conn=self.conn_id, reason=reason)
        self.stats.connected_since = None
        self.stats.state = "disconnected"

    async def _session(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        """One connected session: subscribe, then read until the socket ends."""
        writer, conn = self.writer, self.conn_id
        writer.put_control(self.clock(), conn, "connect", url=self.coinbase.ws_url, products=self.product_ids)
        self.stats.state = "connected"
        self.stats.connected_since = time.monotonic()
        log.info("collector_connected", conn=conn, url=self.coinbase.ws_url, products=",".join(self.product_ids))
        for message in self.subscribe_messages():
            await self._send_subscribe(ws, message)
        self._close_reason = None
        watchdog = asyncio.create_task(self._watchdog(ws))
        expected = 0
        stats = self.stats
        clock = self.clock
        monotonic = time.monotonic
        receive = ws.receive
        put_frame = writer.put_frame
        text = aiohttp.WSMsgType.TEXT
        block = self.ingestion.on_queue_full == "block"
        wanted = frozenset(self.product_ids)  # only these are tracked: the wire cannot grow the map
        product_seen = stats.product_seen
        # ingestion.snapshot_every_hour: the first frame of each UTC hour asks for fresh level2
        # snapshots, so every hour's segments start from a whole book (None: off)
        hourly = self.ingestion.snapshot_every_hour and "level2" in self.channels
        next_hour = (clock() // HOUR_NS + 1) * HOUR_NS if hourly else None
        try:
            while True:  # the hot path: keep it to a stamp, a queue append and a bounded scan
                msg = await receive()
                recv_ns = clock()
                if msg.type is not text:
                    if msg.type is aiohttp.WSMsgType.BINARY:
                        data = msg.data.decode("utf-8", "replace")
                    elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                        return self._close_reason or f"closed by server (code {ws.close_code})"
                    elif msg.type is aiohttp.WSMsgType.ERROR:
                        stats.errors += 1
                        return f"socket error: {ws.exception()!r}"
                    else:
                        continue
                else:
                    data = msg.data
                stats.messages += 1
                stats.bytes += len(data)
                stats.last_message_at = monotonic()
                if block and not writer.has_room():
                    while not writer.has_room():
                        await asyncio.sleep(0.001)
                put_frame(recv_ns, conn, data)
                if next_hour is not None and recv_ns >= next_hour:
                    next_hour = (recv_ns // HOUR_NS + 1) * HOUR_NS
                    await self._resnapshot(ws, recv_ns)
                product = product_of(data)
                if product in wanted:
                    product_seen[product] = recv_ns
                    if data.startswith(TICKER_PREFIX):
                        stats.product_mid.update((p, m) for p, m in ticker_mids(data).items() if p in wanted)
                seq = sequence_of(data)
                if seq is not None:
                    if seq > expected:
                        await self._on_gap(ws, recv_ns, expected, seq)
                    expected = seq + 1
                if self._resubscribed_at is not None and is_l2_snapshot(data):
                    self._resubscribed_at = None
        finally:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog

    async def _send_subscribe(self, ws: aiohttp.ClientWebSocketResponse, message: dict[str, object]) -> None:
        shown = {k: v for k, v in message.items() if k != "jwt"}  # the token never reaches the segments
        self.writer.put_control(self.clock(), self.conn_id, "subscribe", message=shown)
        await ws.send_str(orjson.dumps(message).decode())

    async def _on_gap(self, ws: aiohttp.ClientWebSocketResponse, recv_ns: int, expected: int, received: int) -> None:
        self.stats.gaps += 1
        self.writer.put_control(recv_ns, self.conn_id, "gap", expected=expected, received=received)
        log.warning("collector_gap", conn=self.conn_id, expected=expected, received=received)
        if "level2" not in self.channels:
            return
        now = time.monotonic()
        if self._resubscribed_at is not None and now - self._resubscribed_at < RESUBSCRIBE_GRACE_S:
            return  # a fresh snapshot is already on its way
        self._resubscribed_at = now
        await self._send_subscribe(ws, self._subscribe_message("level2"))

    async def _resnapshot(self, ws: aiohttp.ClientWebSocketResponse, recv_ns: int) -> None:
        """A new UTC hour: subscribe to level2 again, which makes the exchange send a fresh
        snapshot of every product (the subscribe line in the segment says when it was asked)."""
        self.stats.hourly_snapshots += 1
        log.info("collector_hourly_snapshot", conn=self.conn_id, hour_ns=recv_ns - recv_ns % HOUR_NS)
        self._resubscribed_at = time.monotonic()
        await self._send_subscribe(ws, self._subscribe_message("level2"))

    async def _watchdog(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Close a connection that has been silent longer than ``watchdog_timeout_seconds``."""
        timeout = self.ingestion.watchdog_timeout_seconds
        started = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            last = self.stats.last_message_at or started
            silent = time.monotonic() - max(last, started)
            if silent > timeout:
                self._close_reason = f"watchdog: silent for {silent:.1f}s (limit {timeout:g}s)"
                log.warning("collector_watchdog", conn=self.conn_id, silent_for=round(silent, 1))
                await ws.close()
                return

    async def stop(self) -> None:
        self._stopping = True
        if self._ws is not None:
            await self._ws.close()
