"""Coinbase Advanced Trade collector: connect, subscribe, stamp, hand on. I/O only.

The WebSocket client is ``picows`` (Cython): its parser calls :class:`_Reader.on_ws_frame`
for each frame, with no future and no task switch per frame. Frames are kept as the bytes
they arrived as and handed to the writer a network read at a time: every frame one read
completed is stamped with the same ``time.time_ns()``, taken when the read's first frame is
parsed (they arrived together), and queued with one append. Nothing is parsed on the hot
path. ``sequence_num`` is checked for gaps a read at a time (:func:`consecutive`); a gap
writes a ``gap`` control line and re-subscribes level2 for this connection's products, so a
fresh snapshot follows.

Small reads that follow each other closely (a few thousand frames/s arrive a frame or two
a read) are held for up to :data:`HOLD_S` and handed over together, each frame keeping its
read's stamp: see :meth:`_Reader._read_done`.

picows hands over frames, not messages: fragmented messages (continuation frames) are put
back together here, up to :data:`MAX_FRAME_BYTES`; pings are answered by picows itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import groupby, repeat
from operator import itemgetter

import orjson
import picows
from picows import WSCloseCode, WSMsgType, WSProtocolError

from daedalus.backoff import reconnect_pause
from daedalus.capture.auth import ws_jwt
from daedalus.capture.segments import SegmentWriter
from daedalus.config import CoinbaseConfig, IngestionConfig
from daedalus.logs import get_logger

log = get_logger(__name__)

SEQ_KEY = b'"sequence_num":'
SEQ_SCAN = 256  # the envelope's sequence_num comes before the events
PRODUCT_SCAN = 400  # the first event's product_id follows the envelope closely
# the first product_id that lies wholly within the first PRODUCT_SCAN bytes
PRODUCT_RE = re.compile(rb'"product_id":"([^"]{0,80})"')
TICKER_PREFIX = b'{"channel":"ticker'  # ticker and ticker_batch
L2_PREFIX = b'{"channel":"l2_data"'
SNAPSHOT_MARK = b'"type":"snapshot"'
MAX_TICKER_BYTES = 16 * 1024
MAX_FRAME_BYTES = 64 * 1024 * 1024  # level2 snapshots of busy books exceed 5 MB
READ_BUFFER_BYTES = 256 * 1024  # picows' initial read buffer (it doubles for larger frames)
# The socket's receive buffer, fixed instead of autotuned (up to tcp_rmem's 32 MB): it bounds
# what one read brings (and so memory: the read, its frames, their lines), and smaller reads
# let the collector parse the next one while the writer fsyncs the last (2 MB reads made
# the two take turns: ~25 % more CPU per frame in bench/capture.py). It still leaves a TCP
# window of ~15-20 MB/s at 50 ms round trip, far above one connection's feed.
RECEIVE_BUFFER_BYTES = 1024 * 1024
HANDSHAKE_TIMEOUT_S = 10.0
RESUBSCRIBE_GRACE_S = 5.0
HOUR_NS = 3_600_000_000_000
PAUSE_POLL_S = 0.001  # how often a paused reader looks for room in the writer's queue
# on_queue_full: drop. Past PAUSE_AT of the queue the collector stops reading and lets TCP hold the
# frames (the kernel's socket buffer, then the server's), so a disk that stalls for less than
# HOLD_LIMIT_S loses nothing; longer, it reads on and drops what does not fit (counted) until
# the queue is down to RESUME_AT again. Until then each read is queued whole: it is in memory
# already, and one read can hold more frames than the queue (up to the socket buffer's bytes).
PAUSE_AT, RESUME_AT = 0.9, 0.5  # fractions of ingestion.queue_maxsize
HOLD_LIMIT_S = 1.0
# At low rates a read brings one or two frames, and the collector's work per read (the
# checks, the lines, the hand-over), run with cold caches after each wake-up, costs more than
# picows' and the loop's own (at 2,000 frames/s sent frame by frame: ~20-30 us a read against
# ~15 for a client that only takes the payloads). So a read of fewer than HOLD_FRAMES frames
# that comes within HOLD_S of the previous read is held, and the held reads are handed over
# together (each frame keeping its read's stamp) once they reach HOLD_FRAMES frames or the
# first was held HOLD_S: ~35 % less CPU per frame there (bench/capture.py --frames-per-write 1).
# Bigger reads (high rates) and isolated ones (a quiet feed: no timer, no extra wake-up) go
# at once, as before.
# A hold never spans a UTC hour (segments and the hourly snapshot follow the hour), and
# anything else the connection does (a control frame, its end) hands over what is held first.
HOLD_S = 0.005
HOLD_NS = int(HOLD_S * 1e9)
HOLD_FRAMES = 16

_GROUP1 = itemgetter(1)
_TEXT, _BINARY, _CONTINUATION, _CLOSE = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION, WSMsgType.CLOSE


def sequence_of(frame: bytes) -> int | None:
    """The envelope's ``sequence_num`` without parsing the frame (None if absent)."""
    at = frame.find(SEQ_KEY, 0, SEQ_SCAN)
    if at < 0:
        return None
    start = at + len(SEQ_KEY)
    end = frame.find(b",", start, start + 24)
    if end < 0:  # a cut-off frame: no trustworthy number
        return None
    try:
        return int(frame[start:end])
    except ValueError:
        return None


def consecutive(frames: list[bytes], expected: int) -> bool:
    """True when frame ``i`` carries ``"sequence_num":expected+i,`` in its first
    :data:`SEQ_SCAN` bytes, for every ``i`` (the usual case: no gap, nothing to do).

    One formatting call builds the ``n`` needles and one C-level find per frame checks them,
    instead of parsing each number in Python; anything else (a gap, a frame without a
    number, a number that went back) is left to the frame-by-frame path.
    """
    n = len(frames)
    needles = ((b'"sequence_num":%d,\n' * n) % tuple(range(expected, expected + n))).split(b"\n")
    return -1 not in map(bytes.find, frames, needles, repeat(0), repeat(SEQ_SCAN))


def product_of(frame: bytes) -> bytes | None:
    """The first event's ``product_id`` by a bounded scan (None if not near the start)."""
    match = PRODUCT_RE.search(frame, 0, PRODUCT_SCAN)
    return match[1] if match else None


def products_in(frames: list[bytes]) -> set[bytes]:
    """The :func:`product_of` of every frame of a read, C-level (one regex search a frame)."""
    return set(map(_GROUP1, filter(None, map(PRODUCT_RE.search, frames, repeat(0), repeat(PRODUCT_SCAN)))))


def ticker_mids(frame: bytes) -> dict[str, float]:
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


def is_l2_snapshot(frame: bytes) -> bool:
    return frame.startswith(L2_PREFIX) and SNAPSHOT_MARK in frame[:SEQ_SCAN]


def close_code_of(code: object) -> int:
    """A close code as a number (picows gives enum members for the registered ones)."""
    return int(getattr(code, "value", code))  # type: ignore[call-overload]


@dataclass
class CollectorStats:
    messages: int = 0
    bytes: int = 0
    errors: int = 0
    reconnects: int = 0
    gaps: int = 0
    hourly_snapshots: int = 0  # level2 re-subscriptions at the hour (ingestion.snapshot_every_hour)
    read_pauses: int = 0  # times reading stopped because the writer's queue was over PAUSE_AT
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


class _Reader(picows.WSListener):  # type: ignore[misc]
    """One connection's frames, as picows' parser finds them (on the event loop).

    The hot path is :meth:`on_ws_frame` for a whole text frame: a stamp at the first frame
    of a read, an append, and at the read's last frame one hand-over of the lot.
    """

    def __init__(self, collector: CoinbaseCollector) -> None:
        self.collector = collector
        self.clock = collector.clock
        self.frames: list[bytes] = []  # whole messages of the read being parsed
        self.stamp = 0
        self.parts: list[bytes] | None = None  # a fragmented message being put back together
        self.parts_binary = False
        self.parts_size = 0
        self.close_reason: str | None = None  # what the server's CLOSE frame said
        self.transport: picows.WSTransport | None = None
        # reads held for one hand-over (see HOLD_S): their frames, and each frame's stamp
        self.held: list[bytes] = []
        self.held_stamps: list[int] = []
        self.last_read = 0  # stamp of the previous read
        self.hold_until = 0  # end of the UTC hour of the last read handed over at once
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        """Before any frame of the connection is parsed: the ``connect`` line comes first."""
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.collector._connected(self)

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        if frame.msg_type is _TEXT and frame.fin and self.parts is None:  # the hot path
            frames = self.frames
            if not frames:
                self.stamp = self.clock()
            frames.append(frame.get_payload_as_bytes())
            if frame.last_in_buffer:
                self.frames = []
                self._read_done(self.stamp, frames)
            return
        self._other_frame(transport, frame)
        if frame.last_in_buffer and self.frames:
            self.flush()

    def _read_done(self, stamp: int, frames: list[bytes]) -> None:
        """A read's frames: held with the reads before it, or handed over at once (see HOLD_S)."""
        previous, self.last_read = self.last_read, stamp
        held = self.held
        if len(frames) < HOLD_FRAMES and 0 <= stamp - previous < HOLD_NS and stamp < self.hold_until:
            held += frames
            self.held_stamps += repeat(stamp, len(frames))
            if len(held) >= HOLD_FRAMES:
                self.release()
            elif self.timer is None and self.loop is not None:
                self.timer = self.loop.call_later(HOLD_S, self.release)
            return
        if held:
            self.release()
        self.hold_until = (stamp // HOUR_NS + 1) * HOUR_NS
        self.collector._deliver(self, stamp, frames)

    def release(self) -> None:
        """Hand over the held reads (timer, size, or anything else the connection does)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.held:
            frames, stamps = self.held, self.held_stamps
            self.held, self.held_stamps = [], []
            self.collector._deliver_held(self, stamps, frames)

    def flush(self) -> None:
        """Hand over what is held and what this read completed so far (before a control
        action, at the end)."""
        self.release()
        if self.frames:
            frames, self.frames = self.frames, []
            self.collector._deliver(self, self.stamp, frames)

    def _message(self, data: bytes) -> None:
        if not self.frames:
            self.stamp = self.clock()
        self.frames.append(data)

    def _other_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        kind = frame.msg_type
        if kind is _CONTINUATION:
            if self.parts is None:
                raise WSProtocolError(WSCloseCode.PROTOCOL_ERROR, "continuation frame outside a fragmented message")
            self._add_part(frame)
            if frame.fin:
                data, binary = b"".join(self.parts), self.parts_binary
                self.parts = None
                self._message(data.decode("utf-8", "replace").encode() if binary else data)
        elif kind is _TEXT or kind is _BINARY:
            if self.parts is not None:
                raise WSProtocolError(WSCloseCode.PROTOCOL_ERROR, "a new message inside a fragmented one")
            if frame.fin:  # a whole binary message: kept as text, as it decodes (never seen from Coinbase)
                self._message(frame.get_payload_as_bytes().decode("utf-8", "replace").encode())
            else:
                self.parts, self.parts_binary, self.parts_size = [], kind is _BINARY, 0
                self._add_part(frame)
        elif kind is _CLOSE:
            self.flush()
            code, reason = close_code_of(frame.get_close_code()), frame.get_close_reason()
            self.close_reason = f"closed by server (code {code})" + (f": {reason}" if reason else "")
            log.info("collector_close_frame", conn=self.collector.conn_id, code=code, reason=reason)
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
        # PONG: nothing to do (pings are answered by picows: enable_auto_pong)

    def _add_part(self, frame: picows.WSFrame) -> None:
        assert self.parts is not None
        self.parts_size += frame.payload_size
        if self.parts_size > MAX_FRAME_BYTES:
            self.parts = None
            raise WSProtocolError(WSCloseCode.MESSAGE_TOO_BIG, f"fragmented message over {MAX_FRAME_BYTES} bytes")
        self.parts.append(frame.get_payload_as_bytes())

    def on_ws_disconnected(self, transport: picows.WSTransport) -> None:
        self.flush()


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
        self._transport: picows.WSTransport | None = None
        self._resubscribed_at: float | None = None
        self._stopping = False
        self._close_reason: str | None = None  # why we closed (watchdog)
        # only these are tracked: the wire cannot grow the map
        self._wanted = {p.encode(): p for p in product_ids}
        self._block = ingestion.on_queue_full == "block"
        # block: read again only once there is room, never drop; drop: see PAUSE_AT
        size = ingestion.queue_maxsize
        self._pause_depth = size if self._block else max(1, int(size * PAUSE_AT))
        self._resume_depth = size - 1 if self._block else int(size * RESUME_AT)
        self._dropping = False  # drop mode, the queue stayed full past HOLD_LIMIT_S: reads are cut to fit
        self._expected = 0  # the next sequence_num of this session
        self._next_hour: int | None = None
        self._resume: asyncio.Task[None] | None = None

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
        while not self._stopping:
            reason = "closed by server"
            try:
                messages_before = self.stats.messages
                reason = await self._connect_and_read()
                if self.stats.messages > messages_before:
                    attempt = 0  # only a session that delivered data resets the backoff
            except asyncio.CancelledError:
                self._disconnected("shutdown")
                raise
            except (picows.WSError, OSError, TimeoutError) as exc:  # refused, TLS, handshake, protocol
                reason = f"{type(exc).__name__}: {exc}"
                self.stats.errors += 1
                self.stats.last_error = reason
            except Exception as exc:  # a bug must not end capture: log it, back off, go on
                reason = f"unexpected {type(exc).__name__}: {exc}"
                self.stats.errors += 1
                self.stats.last_error = reason
                log.error("collector_error", conn=self.conn_id, error=repr(exc), exc_info=True)
            finally:
                self._transport = None
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

    async def _connect_and_read(self) -> str:
        """One connection: handshake (TLS verified for wss://), subscribe, read until it ends."""
        url = self.coinbase.ws_url
        context = ssl.create_default_context() if url.startswith("wss://") else None
        self._close_reason = None
        try:
            transport, reader = await picows.ws_connect(
                lambda: _Reader(self),
                url,
                ssl_context=context,
                max_frame_size=MAX_FRAME_BYTES,
                enable_auto_pong=True,
                websocket_handshake_timeout=HANDSHAKE_TIMEOUT_S,
                read_buffer_init_size=READ_BUFFER_BYTES,
                logger_name=f"coinbase-{self.conn_id}",
            )
        except OSError as exc:  # refused, unreachable, TLS verification: say where it failed
            host = url.split("://", 1)[-1].split("/", 1)[0]
            raise ConnectionError(f"Cannot connect to host {host} ({type(exc).__name__}: {exc})") from exc
        self._transport = transport
        try:
            if not transport.is_disconnected:
                for message in self.subscribe_messages():
                    self._send_subscribe(transport, message)
            watchdog = asyncio.create_task(self._watchdog(transport))
            try:
                await transport.wait_disconnected()
            finally:
                watchdog.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watchdog
        except BaseException:
            transport.disconnect(graceful=False)
            raise
        finally:
            reader.flush()  # held reads before the disconnect line, however the connection ended
            if self._resume is not None:
                self._resume.cancel()
                self._resume = None
        if self._close_reason:
            return self._close_reason
        return reader.close_reason or "closed by server (no close frame)"

    def _connected(self, reader: _Reader) -> None:
        """The handshake is done (called by the reader before any frame)."""
        assert reader.transport is not None
        sock = reader.transport.underlying_transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
        self.writer.put_control(self.clock(), self.conn_id, "connect", url=self.coinbase.ws_url,
                                products=self.product_ids)  # fmt: skip
        self.stats.state = "connected"
        self.stats.connected_since = time.monotonic()
        self._expected = 0
        # ingestion.snapshot_every_hour: the first read of each UTC hour asks for fresh level2
        # snapshots, so every hour's segments start from a whole book (None: off)
        hourly = self.ingestion.snapshot_every_hour and "level2" in self.channels
        self._next_hour = (self.clock() // HOUR_NS + 1) * HOUR_NS if hourly else None
        log.info(
            "collector_connected", conn=self.conn_id, url=self.coinbase.ws_url, products=",".join(self.product_ids)
        )

    def _disconnected(self, reason: str) -> None:
        if self.stats.state == "connected":
            self.writer.put_control(self.clock(), self.conn_id, "disconnect", reason=reason)
            log.info("collector_disconnected", conn=self.conn_id, reason=reason)
        self.stats.connected_since = None
        self.stats.state = "disconnected"

    # -- the frames of one read ------------------------------------------------------------

    def _deliver(self, reader: _Reader, stamp: int, frames: list[bytes]) -> None:
        """Everything done with the frames one read completed: counters, the hand-over to the
        writer, the gap check, freshness per product. Bulk (C-level) unless a gap needs care."""
        self._count(frames)
        transport = reader.transport
        force = self._block or not self._dropping
        if consecutive(frames, self._expected):
            self._put(transport, stamp, frames, force)
            self._expected += len(frames)
        else:
            self._deliver_one_by_one(transport, stamp, frames, force)
        if self._next_hour is not None and stamp >= self._next_hour:
            self._next_hour = (stamp // HOUR_NS + 1) * HOUR_NS
            self._resnapshot(transport, stamp)
        wanted, seen = self._wanted, self.stats.product_seen
        for product in products_in(frames):
            name = wanted.get(product)
            if name is not None:
                seen[name] = stamp
        self._look_into(frames)

    def _deliver_held(self, reader: _Reader, stamps: list[int], frames: list[bytes]) -> None:
        """Held reads (see HOLD_S), ``stamps[i]`` the stamp of ``frames[i]``, all in one UTC
        hour: one hand-over when their sequence numbers run on (the usual case), else read by
        read (each run of one stamp), exactly as if they had never been held."""
        if not consecutive(frames, self._expected):
            start = 0
            for stamp, run in groupby(stamps):
                end = start + sum(1 for _ in run)
                self._deliver(reader, stamp, frames[start:end])
                start = end
            return
        self._count(frames)
        self._put(reader.transport, stamps[0], frames, self._block or not self._dropping, stamps)
        self._expected += len(frames)
        wanted, seen = self._wanted, self.stats.product_seen
        for product, stamp in zip(map(product_of, frames), stamps, strict=True):
            name = wanted.get(product)  # type: ignore[arg-type]
            if name is not None:
                seen[name] = stamp
        self._look_into(frames)

    def _count(self, frames: list[bytes]) -> None:
        stats = self.stats
        stats.messages += len(frames)
        stats.bytes += sum(map(len, frames))
        stats.last_message_at = time.monotonic()

    def _look_into(self, frames: list[bytes]) -> None:
        """Ticker mids for the status page; a level2 snapshot that answers a re-subscribe."""
        stats = self.stats
        wanted = self._wanted
        if any(map(bytes.startswith, frames, repeat(TICKER_PREFIX))):
            for frame in frames:
                if frame.startswith(TICKER_PREFIX) and product_of(frame) in wanted:
                    stats.product_mid.update((p, m) for p, m in ticker_mids(frame).items() if p.encode() in wanted)
        if self._resubscribed_at is not None and any(map(is_l2_snapshot, frames)):
            self._resubscribed_at = None

    def _deliver_one_by_one(
        self, transport: picows.WSTransport | None, stamp: int, frames: list[bytes], force: bool
    ) -> None:
        """The frame-by-frame gap check; a gap line goes right after the frame that showed it."""
        expected, start = self._expected, 0
        for index, frame in enumerate(frames):
            seq = sequence_of(frame)
            if seq is None:
                continue
            if seq > expected:
                self._put(transport, stamp, frames[start : index + 1], force)
                start = index + 1
                self._on_gap(transport, stamp, expected, seq)
            expected = seq + 1
        self._expected = expected
        if start < len(frames):
            self._put(transport, stamp, frames[start:] if start else frames, force)

    def _put(
        self,
        transport: picows.WSTransport | None,
        stamp: int,
        frames: list[bytes],
        force: bool,
        stamps: list[int] | None = None,
    ) -> None:
        """Queue the frames, then stop reading while the writer's queue is over
        ``_pause_depth``: TCP pushes back on the server meanwhile. ``force`` takes a read
        whole however full the queue (see :data:`PAUSE_AT`); ``stamps``: one per frame (held reads)."""
        writer = self.writer
        writer.put_frames(stamp, self.conn_id, frames, force=force, stamps=stamps)
        depth = writer.queue_depth
        if self._dropping:  # the disk is slow: read on (and drop) until the queue drained
            self._dropping = depth > self._resume_depth
            return
        if self._resume is None and transport is not None and depth >= self._pause_depth:
            transport.underlying_transport.pause_reading()
            self.stats.read_pauses += 1
            self._resume = asyncio.get_running_loop().create_task(self._resume_when_room(transport))

    async def _resume_when_room(self, transport: picows.WSTransport) -> None:
        """Read again once the queue is down to ``_resume_depth`` (block mode: room for one);
        in drop mode after :data:`HOLD_LIMIT_S` at the latest, dropping what does not fit."""
        writer = self.writer
        deadline = None if self._block else time.monotonic() + HOLD_LIMIT_S
        try:
            while writer.queue_depth > self._resume_depth:
                if deadline is not None and time.monotonic() > deadline:
                    log.warning("collector_queue_full", conn=self.conn_id, held_for=HOLD_LIMIT_S,
                                depth=writer.queue_depth, action="reading on, dropping what does not fit")  # fmt: skip
                    self._dropping = True
                    break
                await asyncio.sleep(PAUSE_POLL_S)
            if not transport.is_disconnected:
                transport.underlying_transport.resume_reading()
        finally:
            self._resume = None

    def _send_subscribe(self, transport: picows.WSTransport | None, message: dict[str, object]) -> None:
        shown = {k: v for k, v in message.items() if k != "jwt"}  # the token never reaches the segments
        self.writer.put_control(self.clock(), self.conn_id, "subscribe", message=shown)
        if transport is not None and not transport.is_disconnected:
            transport.send(WSMsgType.TEXT, orjson.dumps(message))

    def _on_gap(self, transport: picows.WSTransport | None, recv_ns: int, expected: int, received: int) -> None:
        self.stats.gaps += 1
        self.writer.put_control(recv_ns, self.conn_id, "gap", expected=expected, received=received)
        log.warning("collector_gap", conn=self.conn_id, expected=expected, received=received)
        if "level2" not in self.channels:
            return
        now = time.monotonic()
        if self._resubscribed_at is not None and now - self._resubscribed_at < RESUBSCRIBE_GRACE_S:
            return  # a fresh snapshot is already on its way
        self._resubscribed_at = now
        self._send_subscribe(transport, self._subscribe_message("level2"))

    def _resnapshot(self, transport: picows.WSTransport | None, recv_ns: int) -> None:
        """A new UTC hour: subscribe to level2 again, which makes the exchange send a fresh
        snapshot of every product (the subscribe line in the segment says when it was asked)."""
        self.stats.hourly_snapshots += 1
        log.info("collector_hourly_snapshot", conn=self.conn_id, hour_ns=recv_ns - recv_ns % HOUR_NS)
        self._resubscribed_at = time.monotonic()
        self._send_subscribe(transport, self._subscribe_message("level2"))

    async def _watchdog(self, transport: picows.WSTransport) -> None:
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
                transport.send_close(WSCloseCode.GOING_AWAY)
                transport.disconnect()
                return

    async def stop(self) -> None:
        self._stopping = True
        transport = self._transport
        if transport is not None and not transport.is_disconnected:
            transport.send_close(WSCloseCode.OK)
            transport.disconnect()
            await transport.wait_disconnected()
