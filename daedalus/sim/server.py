"""The exchange simulator: Coinbase Advanced Trade WebSocket + REST on one port.

``ws://HOST:PORT/ws`` speaks the market-data protocol; ``http://HOST:PORT/...`` serves
the REST endpoints ccxt loads markets from. Two modes:

- **market**: a seeded :class:`~daedalus.sim.market.MarketModel` per product produces
  frames at ``rate`` frames/s (``None`` = as fast as clients read, ``0`` = only when a
  test calls :meth:`SimServer.advance`). Every connection gets snapshots, acks and
  updates like the real feed, and :meth:`SimServer.true_book` reports the ground truth.
- **replay**: the frames of a recording are sent to each subscriber in recorded order,
  byte for byte except the renumbered ``sequence_num``.

Use in-process as ``async with SimServer(SimConfig(...)) as sim:`` (free port on
127.0.0.1 by default) or from the command line as ``daedalus sim``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from daedalus.config import validate_product_id  # the config's rule, one place
from daedalus.logs import get_logger
from daedalus.signals import stop_on_signals
from daedalus.sim import protocol as wire
from daedalus.sim import rest
from daedalus.sim.checks import SimConfigError, check_int, check_range
from daedalus.sim.faults import FaultConfig
from daedalus.sim.market import SIZE_DECIMALS, MarketModel, StepResult, format_decimal, product_spec
from daedalus.sim.replay import Recording, load_recording

log = get_logger(__name__)

MAX_FRAME_BYTES = 16 * 1024 * 1024
MONITOR_TICK = 0.05
BACKLOG_PACE = 256  # frames queued behind a busy connection before producers wait


DEFAULT_PRODUCTS = ("BTC-USD", "ETH-USD")
MAX_LEVELS = 100_000  # per side and product: the reference BTC-USD snapshot holds ~46,000 in all


@dataclass
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port
    products: tuple[str, ...] | None = None  # None: DEFAULT_PRODUCTS; in replay, served besides the recording's
    rate: float | None = 100.0  # frames/s; None = max; 0 = manual (SimServer.advance)
    seed: int = 1
    levels: int = 1000  # initial levels per side
    replay: Path | None = None
    speed: float = 1.0  # replay speed factor; 0 = as fast as possible
    client_id: str | None = None
    subscribe_timeout: float = 5.0
    heartbeat_interval: float = 1.0
    candles_interval: float = 1.0
    ticker_batch_interval: float = 5.0
    max_frame_bytes: int = MAX_FRAME_BYTES
    faults: FaultConfig = field(default_factory=FaultConfig)
    keep_sent: bool = False  # tests: keep every frame written to each connection

    def validate(self) -> None:
        """Raise :class:`SimConfigError` naming the first setting out of range."""
        check_int("port", self.port, 0, 65535)
        check_int("levels", self.levels, 1, MAX_LEVELS)
        check_int("seed", self.seed)
        check_int("max_frame_bytes", self.max_frame_bytes, 1)  # aiohttp takes 0 as "no limit"
        check_range("speed", self.speed, 0.0)
        if self.rate is not None:
            check_range("rate", self.rate, 0.0)
        if self.products is not None and not self.products:
            raise SimConfigError("products", "give at least one product id")
        for product_id in self.products or ():
            try:
                validate_product_id(product_id)
            except ValueError as exc:
                raise SimConfigError("products", str(exc)) from None
        self.faults.validate()


class SimConnection:
    """One client WebSocket: its subscriptions, sequence counter and fault state."""

    def __init__(self, server: SimServer, ws: web.WebSocketResponse, index: int) -> None:
        self.server = server
        self.ws = ws
        self.index = index
        self.seq = 0
        self.subs: dict[str, list[str]] = {}
        now = time.monotonic()
        self.opened_at = now
        self.last_sent_at = now
        self.last_subscribe_at: float | None = None
        self.last_stall_at = now
        self.stalled_until = 0.0
        self.subs_changed = asyncio.Event()
        self.rng = random.Random(server.config.seed * 7919 + index)
        # (sequence_num, product_id, market version) of every level2 frame, for true_book()
        self.l2_frames: deque[tuple[int, str, int]] = deque(maxlen=200_000)
        self.requests: deque[dict[str, Any]] = deque(maxlen=100)  # the last requests, for tests
        self.sent = 0
        self.dropped = 0
        self.malformed = 0
        self.closed = False
        self.close_reason: str | None = None
        self._backlog: list[bytes] = []
        self._sending = False
        self._idle = asyncio.Event()
        self.sent_frames: list[bytes] | None = [] if server.config.keep_sent else None
        self.replay_task: asyncio.Task[None] | None = None

    def wants(self, channel: str, product_id: str) -> bool:
        products = self.subs.get(channel)
        return products is not None and product_id in products

    async def send(self, channel: str, events: str, *, droppable: bool = False) -> int:
        """Wrap ``events`` in an envelope with the next ``sequence_num`` and send it."""
        seq = self.seq
        self.seq += 1
        faults = self.server.faults
        if droppable and faults.drop_rate and self.rng.random() < faults.drop_rate:
            self.dropped += 1
            return seq
        frame = wire.envelope(channel, wire.rfc3339(time.time_ns()), seq, events, self.server.config.client_id)
        await self.send_frame(frame)
        return seq

    async def send_error(self, message: str) -> None:
        await self.send_frame(wire.error_frame(message), faults=False)

    async def send_frame(self, frame: bytes, *, faults: bool = True) -> None:
        """Send in ``sequence_num`` order: while one send waits on the socket (or a stall
        holds frames back), later frames queue behind it instead of overtaking."""
        if self.closed:
            return
        if faults and self.server.faults.malformed_rate and self.rng.random() < self.server.faults.malformed_rate:
            self._backlog.append(self.truncated(frame))
        self._backlog.append(frame)
        if self._sending:
            if len(self._backlog) > BACKLOG_PACE:  # back-pressure: let the current writer catch up
                await self._idle.wait()
            return
        if time.monotonic() < self.stalled_until:
            return
        await self.flush_backlog()

    async def flush_backlog(self) -> None:
        """Write every held-back frame, in order (one writer at a time)."""
        if self._sending or time.monotonic() < self.stalled_until:
            return
        self._sending = True
        self._idle.clear()
        try:
            while self._backlog and not self.closed:
                frames, self._backlog = self._backlog, []
                for item in frames:
                    await self.ws.send_frame(item, WSMsgType.TEXT)
                    if self.sent_frames is not None:
                        self.sent_frames.append(item)
                self.sent += len(frames)
                self.last_sent_at = time.monotonic()
        except (ConnectionError, RuntimeError) as exc:
            self.closed = True
            self.close_reason = self.close_reason or f"send failed: {exc}"
        finally:
            self._sending = False
            self._idle.set()

    def truncated(self, frame: bytes) -> bytes:
        """A cut-off copy of ``frame``: valid UTF-8, invalid JSON."""
        self.malformed += 1
        return frame[: max(1, len(frame) // 2)].decode("utf-8", "ignore").encode()

    async def close(self, reason: str, code: int = WSCloseCode.GOING_AWAY) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = reason
            log.info("sim_disconnect", conn=self.index, reason=reason)
            with contextlib.suppress(Exception):
                await self.ws.close(code=code, message=reason.encode()[:120])


class SimServer:
    """In-process exchange simulator; see the module docstring."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.faults = self.config.faults
        self.config.validate()
        self.recording: Recording | None = None
        self.markets: dict[str, MarketModel] = {}
        self.connections: list[SimConnection] = []
        self.closed_connections: deque[SimConnection] = deque(maxlen=100)
        self.port = 0
        self.frames_generated = 0
        self._rng = random.Random(self.config.seed)
        self._conn_ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._market_wanted = asyncio.Event()
        self._running = asyncio.Event()
        self._running.set()
        self._parked = asyncio.Event()
        self._started_ns = time.time_ns()
        self._heartbeat_counter = 0
        if self.config.replay is not None:
            self.recording = load_recording(self.config.replay)
            self.products = sorted(self.recording.products | set(self.config.products or ())) or list(DEFAULT_PRODUCTS)
        else:
            self.products = list(dict.fromkeys(self.config.products or DEFAULT_PRODUCTS))
            for index, product_id in enumerate(self.products):
                rng = random.Random(self.config.seed * 1_000_003 + index)
                self.markets[product_id] = MarketModel(product_spec(product_id), rng, levels=self.config.levels)

    # -- lifecycle --------------------------------------------------------------

    @property
    def ws_url(self) -> str:
        return f"ws://{self.config.host}:{self.port}/ws"

    @property
    def rest_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    async def start(self) -> SimServer:
        app = web.Application()
        app.router.add_get("/ws", self._ws_handler)
        app.router.add_get("/api/v3/brokerage/market/products", self._products)
        app.router.add_get("/api/v3/brokerage/market/products/{product_id}", self._product)
        app.router.add_get("/api/v3/brokerage/time", self._time_v3)
        app.router.add_get("/v2/time", self._time_v2)
        app.router.add_get("/v2/currencies", self._currencies)
        app.router.add_get("/v2/currencies/crypto", self._crypto_currencies)
        app.router.add_get("/v2/exchange-rates", self._exchange_rates)
        app.router.add_get("/sim/status", self._status)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._tasks.append(asyncio.create_task(self._monitor(), name="sim-monitor"))
        if self.recording is None:
            self._tasks += [
                asyncio.create_task(self._market_loop(), name="sim-market"),
                asyncio.create_task(self._heartbeat_loop(), name="sim-heartbeats"),
                asyncio.create_task(self._periodic_loop(), name="sim-periodic"),
            ]
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for conn in list(self.connections):
            if conn.replay_task:
                conn.replay_task.cancel()
            await conn.close("simulator shutting down")
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):  # the port must close regardless
                await task
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> SimServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- test API ------------------------------------------------------------------

    async def pause(self) -> None:
        """Stop producing market events; returns once every produced frame is sent."""
        self._running.clear()
        if self._market_wanted.is_set() and self.config.rate != 0:
            await self._parked.wait()

    def resume(self) -> None:
        self._running.set()

    async def advance(self, steps: int) -> int:
        """Produce ``steps`` market events now (for ``rate=0``); returns frames produced."""
        models = list(self.markets.values())
        produced = 0
        for _ in range(steps):
            model = self._rng.choice(models)
            produced += await self._publish(model, model.step(time.time_ns()))
        return produced

    def true_book(
        self,
        product_id: str,
        depth: int = 20,
        *,
        connection: SimConnection | None = None,
        after_seq: int | None = None,
    ) -> dict[str, Any]:
        """The ground-truth top ``depth`` levels as decimal strings (best first).

        With ``connection`` and ``after_seq``: the book as it was right after that
        connection's frame ``after_seq`` (the latest level2 frame of the product at or
        before it), so a client's reconstruction can be checked frame by frame.
        """
        model = self.markets[product_id]
        version = None
        if connection is not None and after_seq is not None:
            version = 0
            for seq, pid, ver in reversed(connection.l2_frames):
                if seq <= after_seq and pid == product_id:
                    version = ver
                    break
        bids, asks = model.top(depth, version)
        pd = model.spec.price_decimals

        def fmt(levels: list[tuple[int, int]]) -> list[tuple[str, str]]:
            return [(format_decimal(p, pd), format_decimal(s, SIZE_DECIMALS)) for p, s in levels]

        return {"product_id": product_id, "bids": fmt(bids), "asks": fmt(asks), "version": version or model.version}

    async def disconnect_all(self, reason: str = "simulated disconnect") -> None:
        for conn in list(self.connections):
            await conn.close(reason)

    def stall(self, seconds: float, connection: SimConnection | None = None) -> None:
        """Hold back every frame to ``connection`` (default: all) for ``seconds``."""
        for conn in [connection] if connection else list(self.connections):
            conn.stalled_until = time.monotonic() + seconds

    async def inject_malformed(self, connection: SimConnection | None = None) -> None:
        """Send one frame that is not valid JSON to ``connection`` (default: all)."""
        for conn in [connection] if connection else list(self.connections):
            await conn.send_frame(conn.truncated(b'{"channel":"l2_data","timestamp":"'), faults=False)

    def stats(self) -> dict[str, Any]:
        return {
            "mode": "replay" if self.recording else "market",
            "products": self.products,
            "frames_generated": self.frames_generated,
            "connections": [
                {
                    "conn": c.index,
                    "subscriptions": c.subs,
                    "next_sequence_num": c.seq,
                    "sent": c.sent,
                    "dropped": c.dropped,
                    "malformed": c.malformed,
                }
                for c in self.connections
            ],
        }

    # -- WebSocket protocol ------------------------------------------------------------

    async def _ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=self.config.max_frame_bytes, compress=False, autoping=True)
        await ws.prepare(request)
        conn = SimConnection(self, ws, next(self._conn_ids))
        self.connections.append(conn)
        log.info("sim_connect", conn=conn.index, peer=request.remote)
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_request(conn, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await conn.send_error("binary frames are not supported; send JSON text")
        finally:
            conn.closed = True
            if conn.replay_task:
                conn.replay_task.cancel()
            self.connections.remove(conn)
            self.closed_connections.append(conn)
            conn.l2_frames.clear()
            self._update_market_wanted()
        return ws

    async def _on_request(self, conn: SimConnection, text: str) -> None:
        try:
            request = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            await conn.send_error(f"invalid JSON: {exc}")
            return
        if isinstance(request, dict):
            conn.requests.append(request)
        problem = self._check_request(request)
        if problem:
            await conn.send_error(problem)
            return
        channel: str = request["channel"]
        products: list[str] = list(dict.fromkeys(request.get("product_ids") or []))
        if request["type"] == "subscribe":
            await self._subscribe(conn, channel, products)
        else:
            await self._unsubscribe(conn, channel, products)

    def _check_request(self, request: Any) -> str | None:
        if not isinstance(request, dict):
            return "request must be a JSON object"
        kind = request.get("type")
        if kind not in ("subscribe", "unsubscribe"):
            return f"unknown message type {kind!r}: expected 'subscribe' or 'unsubscribe'"
        channel = request.get("channel")
        if channel is None:
            if "channels" in request:
                return 'name exactly one channel per message with "channel"; "channels" is not supported'
            return 'missing "channel"'
        if not isinstance(channel, str) or channel not in wire.WIRE_CHANNEL:
            return f"unknown channel {channel!r}; channels: {', '.join(sorted(wire.WIRE_CHANNEL))}"
        products = request.get("product_ids", [])
        if not isinstance(products, list) or not all(isinstance(p, str) for p in products):
            return "product_ids must be a list of strings"
        if not products and channel not in ("heartbeats", "status") and request["type"] == "subscribe":
            return f"product_ids is required for channel {channel!r}"
        if channel != "heartbeats":
            unknown = [p for p in products if p not in self.products]
            if unknown:
                return f"unknown product_id {unknown[0]!r}; this simulator serves {', '.join(self.products)}"
        return None

    async def _subscribe(self, conn: SimConnection, channel: str, products: list[str]) -> None:
        conn.last_subscribe_at = time.monotonic()
        if channel == "status" and not products:
            products = list(self.products)
        if self.recording is not None:
            self._register(conn, channel, products)
            if conn.replay_task is None:
                conn.replay_task = asyncio.create_task(self._replay_to(conn), name=f"sim-replay-{conn.index}")
            return
        name = wire.WIRE_CHANNEL[channel]
        if channel == "status":
            self._register(conn, channel, products)
            events = wire.status_events([self.markets[p].spec for p in products])
            await conn.send(name, events)
        else:
            for product_id in products if channel != "heartbeats" else []:
                # register and encode with no await in between: no update can slip
                # between the snapshot and the subscription
                self._register(conn, channel, [product_id])
                events = self._snapshot(channel, product_id)
                version = self.markets[product_id].version
                seq = await conn.send(name, events)
                if channel == "level2":
                    conn.l2_frames.append((seq, product_id, version))
            if channel == "heartbeats":
                self._register(conn, channel, ["heartbeats"])
        await conn.send("subscriptions", wire.subscriptions_events(conn.subs))

    def _register(self, conn: SimConnection, channel: str, products: list[str]) -> None:
        current = conn.subs.setdefault(channel, [])
        current += [p for p in products if p not in current]
        conn.subs_changed.set()
        self._update_market_wanted()

    def _snapshot(self, channel: str, product_id: str) -> str:
        model = self.markets[product_id]
        now = time.time_ns()
        if channel == "level2":
            return wire.l2_snapshot_events(model, now)
        if channel == "market_trades":
            return wire.trades_events(model, list(model.trades), "snapshot")
        if channel in ("ticker", "ticker_batch"):
            return wire.ticker_events(model, "snapshot")
        model.candle_at(now)
        return wire.candles_events(model, list(model.candles), "snapshot")

    async def _unsubscribe(self, conn: SimConnection, channel: str, products: list[str]) -> None:
        current = conn.subs.get(channel, [])
        remaining = [] if channel == "heartbeats" or not products else [p for p in current if p not in products]
        if remaining:
            conn.subs[channel] = remaining
        else:
            conn.subs.pop(channel, None)
        conn.subs_changed.set()
        self._update_market_wanted()
        await conn.send("subscriptions", wire.subscriptions_events(conn.subs))

    def _update_market_wanted(self) -> None:
        wanted = any(wire.MARKET_CHANNELS.intersection(c.subs) for c in self.connections)
        if wanted:
            self._market_wanted.set()
        else:
            self._market_wanted.clear()

    # -- market mode -------------------------------------------------------------------

    async def _publish(self, model: MarketModel, step: StepResult) -> int:
        """Send one market step to every interested connection; returns frames produced."""
        produced = 1 + (2 if step.trade else 0)
        self.frames_generated += produced
        product_id = step.product_id
        l2 = trades = ticker = None
        for conn in list(self.connections):
            if step.changes and conn.wants("level2", product_id):
                l2 = l2 or wire.l2_update_events(model, step)
                seq = await conn.send("l2_data", l2, droppable=True)
                conn.l2_frames.append((seq, product_id, step.version))
            if step.trade is None:
                continue
            if conn.wants("market_trades", product_id):
                trades = trades or wire.trades_events(model, [step.trade], "update")
                await conn.send("market_trades", trades, droppable=True)
            if conn.wants("ticker", product_id):
                ticker = ticker or wire.ticker_events(model, "update")
                await conn.send("ticker", ticker, droppable=True)
        return produced

    async def _market_loop(self) -> None:
        rate = self.config.rate
        if rate == 0:
            return
        models = list(self.markets.values())
        choose = self._rng.choice
        while True:
            if not (self._market_wanted.is_set() and self._running.is_set()):
                self._parked.set()
                await self._market_wanted.wait()
                await self._running.wait()
                continue
            self._parked.clear()
            start, produced = time.monotonic(), 0
            while self._market_wanted.is_set() and self._running.is_set():
                if rate is None:
                    budget = 256
                else:
                    budget = min(int((time.monotonic() - start) * rate) - produced, 10_000)
                    if budget <= 0:
                        await asyncio.sleep(max(0.001, min(0.02, 1 / rate)))
                        continue
                while budget > 0:
                    model = choose(models)
                    n = await self._publish(model, model.step(time.time_ns()))
                    budget -= n
                    produced += n
                await asyncio.sleep(0)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            self._heartbeat_counter += 1
            now = time.time_ns()
            events = wire.heartbeat_events(now, now - self._started_ns, self._heartbeat_counter)
            for conn in list(self.connections):
                if "heartbeats" in conn.subs:
                    await conn.send("heartbeats", events, droppable=True)

    async def _periodic_loop(self) -> None:
        """Candle updates every ``candles_interval``, ticker_batch every ``ticker_batch_interval``."""
        last_batch = time.monotonic()
        while True:
            await asyncio.sleep(self.config.candles_interval)
            now_ns = time.time_ns()
            batch_due = time.monotonic() - last_batch >= self.config.ticker_batch_interval
            if batch_due:
                last_batch = time.monotonic()
            for product_id, model in self.markets.items():
                candle = None
                for conn in list(self.connections):
                    if conn.wants("candles", product_id):
                        candle = candle or wire.candles_events(model, [model.candle_at(now_ns)], "update")
                        await conn.send("candles", candle, droppable=True)
                    if batch_due and conn.wants("ticker_batch", product_id):
                        await conn.send("ticker_batch", wire.ticker_events(model, "update"), droppable=True)

    # -- replay mode ------------------------------------------------------------------

    async def _replay_to(self, conn: SimConnection) -> None:
        """Send the recording to ``conn`` in order, waiting for channels it has yet to subscribe.

        A frame of a channel the client has not subscribed yet waits until the client
        subscribes to it, or until ``subscribe_timeout`` passed since its last subscribe
        message; from then on that channel's frames are skipped (until subscribed).
        """
        assert self.recording is not None
        speed = self.config.speed
        origin: tuple[float, float] | None = None  # (recorded ts, loop time) the schedule counts from
        given_up: set[str] = set()
        for frame in self.recording.frames:
            channel = frame.channel
            wanted = channel is None or channel in conn.subs
            if not wanted:
                if channel in given_up or not await self._await_channel(conn, channel):
                    given_up.add(channel)
                    continue
                origin = None  # waiting for a subscription shifts the schedule, never compresses it
            if speed > 0:
                now = time.monotonic()
                if origin is None:
                    origin = (frame.ts, now)
                ahead = origin[1] + (frame.ts - origin[0]) / speed - now
                if ahead > 0.001:  # sleep only when ahead: keeps high rates exact on average
                    await asyncio.sleep(ahead)
            if conn.closed:
                return
            if frame.tail:
                conn.seq += 1
            await conn.send_frame(frame.render(conn.seq - 1))
        log.info("sim_replay_done", conn=conn.index, frames=conn.sent)

    async def _await_channel(self, conn: SimConnection, channel: str) -> bool:
        while channel not in conn.subs:
            assert conn.last_subscribe_at is not None
            remaining = conn.last_subscribe_at + self.config.subscribe_timeout - time.monotonic()
            if remaining <= 0:
                return False
            conn.subs_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(conn.subs_changed.wait(), remaining)
        return True

    # -- faults and housekeeping -----------------------------------------------------

    async def _monitor(self) -> None:
        """Enforce the subscribe deadline and the timed faults, every ``MONITOR_TICK``."""
        while True:
            await asyncio.sleep(MONITOR_TICK)
            now = time.monotonic()
            faults = self.faults
            for conn in list(self.connections):
                age = now - conn.opened_at
                if conn.last_subscribe_at is None and age > self.config.subscribe_timeout:
                    await conn.close(
                        f"no subscribe within {self.config.subscribe_timeout:g}s", WSCloseCode.POLICY_VIOLATION
                    )
                elif faults.disconnect_every and age >= faults.disconnect_every:
                    await conn.close("simulated disconnect")
                elif (
                    faults.idle_timeout
                    and "heartbeats" not in conn.subs
                    and now - conn.last_sent_at > faults.idle_timeout
                ):
                    await conn.close(f"idle for {faults.idle_timeout:g}s without heartbeats")
                elif faults.stall_every and faults.stall_seconds and now - conn.last_stall_at >= faults.stall_every:
                    conn.last_stall_at = now
                    conn.stalled_until = now + faults.stall_seconds
                elif conn.stalled_until and now >= conn.stalled_until:
                    conn.stalled_until = 0.0
                    await conn.flush_backlog()

    # -- REST ------------------------------------------------------------------------

    def _products_json(self) -> bytes:
        if self.recording is not None and self.recording.products_response is not None:
            return self.recording.products_response
        products = []
        for product_id in self.products:
            model = self.markets.get(product_id)
            if model is not None:
                products.append(rest.product_object(model.spec, model.last_price, model.stats.volume_24h))
            else:  # replay without a recorded response: describe the recording's products
                spec = product_spec(product_id)
                products.append(rest.product_object(spec, round(spec.start_price * 10**spec.price_decimals), 0))
        return rest.products_body(products)

    def _currency_codes(self) -> set[str]:
        return rest.currency_codes(self._products_json())

    @staticmethod
    def _json(body: bytes) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def _products(self, request: web.Request) -> web.Response:
        if request.query.get("product_type", "SPOT").upper() != "SPOT":
            return self._json(rest.products_body([]))
        return self._json(self._products_json())

    async def _product(self, request: web.Request) -> web.Response:
        product_id = request.match_info["product_id"]
        for product in orjson.loads(self._products_json()).get("products", []):
            if product.get("product_id") == product_id:
                return self._json(orjson.dumps(product))
        return web.json_response({"error": "NOT_FOUND", "message": f"product {product_id} not found"}, status=404)

    async def _time_v3(self, request: web.Request) -> web.Response:
        now = time.time()
        return web.json_response(
            {"iso": wire.rfc3339(time.time_ns()), "epochSeconds": str(int(now)), "epochMillis": str(int(now * 1000))}
        )

    async def _time_v2(self, request: web.Request) -> web.Response:
        return web.json_response({"data": {"iso": wire.rfc3339(time.time_ns(), 0), "epoch": int(time.time())}})

    async def _currencies(self, request: web.Request) -> web.Response:
        return self._json(rest.fiat_currencies_body(self._currency_codes()))

    async def _crypto_currencies(self, request: web.Request) -> web.Response:
        return self._json(rest.crypto_currencies_body(self._currency_codes()))

    async def _exchange_rates(self, request: web.Request) -> web.Response:
        return self._json(rest.exchange_rates_body(self._currency_codes()))

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())


async def serve(config: SimConfig, ready: Any = None) -> None:
    """Run until SIGINT/SIGTERM or cancellation; ``ready(server)`` is called once the port accepts connections."""
    stop = stop_on_signals()
    async with SimServer(config) as server:
        if ready is not None:
            ready(server)
        await stop.wait()
        log.info("sim_stopping", connections=len(server.connections))
