"""One client connection of the gateway: the text handshake, subscriptions, then the DBN stream.

Why a plain :class:`asyncio.Protocol`: the stream is written record-batch by record-batch and
the slow-reader fault needs the transport's write-buffer size, which streams hide.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import socket
import string
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import databento_dbn as dbn
import zstandard

from daedalus.logs import get_logger
from daedalus.sim.databento import records as rec

if TYPE_CHECKING:
    from daedalus.sim.databento.gateway import DatabentoGateway
    from daedalus.sim.databento.model import Event

log = get_logger(__name__)

AUTH_FAILED = "Authentication failed."
_AUTH_KEYS = {"auth", "dataset", "encoding", "ts_out", "compression", "heartbeat_interval_s", "client", "details"}
_AUTH_KEYS |= {"slow_reader_behavior"}
_SUB_KEYS = {"schema", "stype_in", "symbols", "snapshot", "id", "is_last", "start"}
MAX_LINE = 1 << 20  # a control line longer than this is refused (symbols come in chunks of 500)


def cram_reply(challenge: str, key: str) -> str:
    """The client's answer to ``cram=<challenge>``: sha256 of ``challenge|key``, ``-``, the key's last 5 chars."""
    return hashlib.sha256(f"{challenge}|{key}".encode()).hexdigest() + "-" + key[-5:]


class ProtocolError(Exception):
    """A line the gateway does not accept; the text goes back to the client, then the connection closes."""


def parse_line(line: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for token in line.split("|"):
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise ProtocolError(f"Invalid control message: expected key=value fields, got {line[:80]!r}")
        fields[key] = value
    return fields


@dataclass
class Subscription:
    """A resolved subscription: its instruments and the input symbol each was asked as."""

    sub_id: str
    schema: str
    stype_in: str
    instruments: list[tuple[int, str]]  # (instrument_id, stype_in_symbol)
    not_found: list[str]
    snapshot: bool
    start: int | None


@dataclass
class SessionStats:
    records: int = 0
    bytes: int = 0
    skipped: int = 0
    slow_warnings: int = 0
    heartbeats: int = 0


@dataclass
class _Pending:
    symbols: list[str] = field(default_factory=list)


class GatewaySession(asyncio.Protocol):
    """Server side of one live session. The gateway feeds it market events with :meth:`on_event`."""

    def __init__(self, gateway: DatabentoGateway, session_id: int) -> None:
        self.gw = gateway
        self.session_id = session_id
        self.state = "connecting"  # -> auth -> ready -> streaming -> closed
        self.challenge = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
        self.transport: asyncio.Transport | None = None
        self._buf = b""
        self.dataset = ""
        self.ts_out = False
        self.compression = "none"
        self.heartbeat_s = 30.0
        self._cobj = None
        self._out: list[bytes] = []
        self._chunks: dict[str, _Pending] = {}
        self.queued: list[Subscription] = []
        self.subscriptions: list[Subscription] = []
        self.live: dict[str, set[int]] = {}  # schema -> instrument ids streamed live
        self.stats = SessionStats()
        self.sent: list[bytes] | None = [] if gateway.config.keep_sent else None
        self.slow = False
        self._skipped_episode = 0
        self.last_write = 0.0
        self._tasks: list[asyncio.Task] = []
        self.closed = asyncio.get_running_loop().create_future()

    # -- connection --------------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.state = "auth"
        transport.write(f"lsg_version={self.gw.config.lsg_version}\ncram={self.challenge}\n".encode())
        self.gw.sessions.add(self)
        log.info("dbsim_connect", session=self.session_id, peer=str(transport.get_extra_info("peername")))
        after = self.gw.config.disconnect_after_s
        if after is not None:
            self._tasks.append(asyncio.ensure_future(self._disconnect_later(after)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = "closed"
        self.gw.sessions.discard(self)
        for task in self._tasks:
            task.cancel()
        if not self.closed.done():
            self.closed.set_result(None)
        log.info("dbsim_disconnect", session=self.session_id, records=self.stats.records, skipped=self.stats.skipped)

    def data_received(self, data: bytes) -> None:
        if self.state == "closed":
            return
        self._buf += data
        try:
            while b"\n" in self._buf and self.state != "closed":
                line, _, self._buf = self._buf.partition(b"\n")
                self._handle(line.decode("utf-8", errors="replace").rstrip("\r"))
            if len(self._buf) > MAX_LINE:
                raise ProtocolError(f"Control message longer than {MAX_LINE} bytes")
        except ProtocolError as exc:
            self.fail(str(exc))
        except Exception as exc:  # never let one client's bad input take the server down
            log.error("dbsim_session_error", session=self.session_id, error=repr(exc), exc_info=True)
            self.fail(f"Internal error: {type(exc).__name__}")

    def fail(self, message: str) -> None:
        """Tell the client what went wrong, in the form it can read in the current state, then close."""
        log.warning("dbsim_refused", session=self.session_id, state=self.state, reason=message)
        if self.transport is None or self.transport.is_closing():
            return
        if self.state == "auth":
            self.transport.write(f"success=0|error={message.replace('|', '/')}\n".encode())
        else:
            if self.state != "streaming":
                self._start_stream()
            self._emit([rec.error(time.time_ns(), message, dbn.ErrorCode.INVALID_SUBSCRIPTION)])
            self.flush()
        self.state = "closed"
        # half-close and drain what the client still sends: closing with unread input would reset the
        # connection and could destroy the error before the client reads it
        self._buf = b""
        if self.transport.can_write_eof():
            self.transport.write_eof()
            asyncio.get_running_loop().call_later(2.0, self.transport.close)
        else:
            self.transport.close()

    async def _disconnect_later(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.disconnect("disconnect_after_s")

    def disconnect(self, reason: str) -> None:
        """Fault: drop the connection with a TCP reset, as a network failure would (the official client
        reconnects only when the connection ends in an error, never after a clean close)."""
        if self.transport is None or self.transport.is_closing():
            return
        log.info("dbsim_fault_disconnect", session=self.session_id, reason=reason, records=self.stats.records)
        self.flush()
        self.state = "closed"
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def close(self) -> None:
        """Clean end of the session (gateway shutdown): buffered records still go out."""
        if self.transport is not None and not self.transport.is_closing():
            self.flush()
            self.state = "closed"
            self.transport.close()

    # -- text phase ----------------------------------------------------------------------------------------------------

    def _handle(self, line: str) -> None:
        if not line:
            return
        fields = parse_line(line)
        if self.state == "auth":
            self._authenticate(fields)
        elif "schema" in fields:
            self._subscribe(fields)
        elif "start_session" in fields:
            if self.state == "streaming":
                raise ProtocolError("Session already started")
            self._start_session()
        else:
            raise ProtocolError(f"Unknown control message with fields {sorted(fields)}")

    def _authenticate(self, fields: dict[str, str]) -> None:
        unknown = set(fields) - _AUTH_KEYS
        if "auth" not in fields or unknown:
            raise ProtocolError(f"Invalid authentication request: fields {sorted(unknown) or 'auth missing'}")
        key = self.gw.config.api_key
        if not secrets.compare_digest(fields["auth"], cram_reply(self.challenge, key)):
            bucket = fields["auth"].rpartition("-")[2][-5:]
            log.warning("dbsim_auth_failed", session=self.session_id, bucket=bucket)
            raise ProtocolError(self.gw.config.auth_error)
        if fields.get("dataset") != self.gw.dataset:
            raise ProtocolError(f"Unknown dataset {fields.get('dataset', '')!r}: this gateway serves {self.gw.dataset}")
        if fields.get("encoding", "dbn") != "dbn":
            raise ProtocolError(f"Unsupported encoding {fields['encoding']!r}: only dbn")
        self.compression = fields.get("compression", "none")
        if self.compression not in ("none", "zstd"):
            raise ProtocolError(f"Unsupported compression {self.compression!r}: none or zstd")
        self.ts_out = fields.get("ts_out", "0") == "1"
        try:
            self.heartbeat_s = float(fields.get("heartbeat_interval_s", "30"))
        except ValueError:
            raise ProtocolError("heartbeat_interval_s must be a number") from None
        self.dataset = fields["dataset"]
        self.state = "ready"
        assert self.transport is not None
        self.transport.write(f"success=1|session_id={self.session_id}\n".encode())
        log.info("dbsim_auth_ok", session=self.session_id, ts_out=self.ts_out, compression=self.compression)

    def _subscribe(self, fields: dict[str, str]) -> None:
        unknown = set(fields) - _SUB_KEYS
        if unknown:
            raise ProtocolError(f"Invalid subscription: unknown fields {sorted(unknown)}")
        sub_id = fields.get("id", "0")
        pending = self._chunks.setdefault(sub_id, _Pending())
        pending.symbols += [s for s in fields.get("symbols", "ALL_SYMBOLS").split(",") if s]
        if fields.get("is_last", "1") == "0":
            return
        del self._chunks[sub_id]
        start = fields.get("start")
        if start is not None:
            try:
                start_ns: int | None = int(start)
            except ValueError:
                raise ProtocolError(f"Invalid subscription: start must be integer nanoseconds, got {start!r}") from None
        else:
            start_ns = None
        snapshot = fields.get("snapshot", "0") == "1"
        schema = fields["schema"]
        if schema not in self.gw.schemas:
            raise ProtocolError(
                f"Invalid subscription: schema {schema!r} is not served (serves {', '.join(self.gw.schemas)})"
            )
        if snapshot and (schema != "mbo" or start_ns is not None):
            raise ProtocolError("Invalid subscription: snapshot=1 is only for mbo and without start")
        stype_in = fields.get("stype_in", "raw_symbol")
        found, missing = self.gw.resolve(stype_in, pending.symbols)
        sub = Subscription(sub_id, schema, stype_in, found, missing, snapshot, start_ns)
        log.info("dbsim_subscribe", session=self.session_id, schema=schema, stype_in=stype_in, found=len(found))
        if self.state == "streaming":
            self._activate(sub)
            self.flush()
        else:
            self.queued.append(sub)

    # -- DBN phase -----------------------------------------------------------------------------------------------------

    def _start_stream(self) -> None:
        if self.compression == "zstd":
            self._cobj = zstandard.ZstdCompressor(level=3).compressobj()
        start = min((s.start for s in self.queued if s.start is not None), default=self.gw.clock())
        self._out.append(rec.live_metadata(self.dataset or self.gw.dataset, start, self.ts_out))
        self.state = "streaming"

    def _start_session(self) -> None:
        self._start_stream()
        for sub in self.queued:
            self._activate(sub)
        self.queued = []
        self.flush()
        self.gw.on_session_started(self)
        self._tasks.append(asyncio.ensure_future(self._heartbeats()))

    def _activate(self, sub: Subscription) -> None:
        """Mappings, errors for unresolved symbols, the ack, then definitions/snapshot/replay; then it goes live."""
        ts = self.gw.clock()
        self.subscriptions.append(sub)
        self._emit([rec.symbol_mapping(iid, sym_in, self.gw.symbol_of(iid), ts) for iid, sym_in in sub.instruments])
        if sub.not_found:
            text = f"Failed to resolve symbols for stype_in {sub.stype_in}: {','.join(sub.not_found)[:200]}"
            self._emit([rec.error(ts, text, dbn.ErrorCode.SYMBOL_RESOLUTION_FAILED)])
        ack = f"Subscription request {sub.sub_id} for {sub.schema} data succeeded"
        self._emit([rec.system(ts, ack, dbn.SystemCode.SUBSCRIPTION_ACK)])
        iids = [iid for iid, _ in sub.instruments]
        self._emit(self.gw.initial_records(sub.schema, iids, snapshot=sub.snapshot))
        if sub.start is not None:
            replayed = 0
            for records in self.gw.history_records(sub.schema, set(iids), sub.start):
                self._emit(records)
                replayed += len(records)
            self._emit([rec.system(ts, f"Finished {sub.schema} replay", dbn.SystemCode.REPLAY_COMPLETED)])
            log.info("dbsim_replay", session=self.session_id, schema=sub.schema, start=sub.start, records=replayed)
        self.live.setdefault(sub.schema, set()).update(iids)

    def _emit(self, records: list[bytes]) -> None:
        """Queue whole records (ts_out added when asked); the disconnect-after-N-records fault counts here."""
        if not records:
            return
        if self.ts_out:
            now = time.time_ns()
            records = [rec.with_ts_out(r, now) for r in records]
        self._out.extend(records)
        if self.sent is not None:
            self.sent.extend(records)
        self.stats.records += len(records)
        limit = self.gw.config.disconnect_after_records
        if limit is not None and self.stats.records >= limit:
            self.disconnect("disconnect_after_records")

    def flush(self) -> None:
        """Write what is queued; with zstd the whole post-auth stream is one zstd stream, block-flushed here."""
        if not self._out or self.transport is None or self.transport.is_closing():
            self._out.clear()
            return
        data = b"".join(self._out)
        self._out.clear()
        if self._cobj is not None:
            data = self._cobj.compress(data) + self._cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        self.stats.bytes += len(data)
        self.transport.write(data)
        self.last_write = time.monotonic()

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def on_event(self, ev: Event) -> None:
        """Queue the event's records for every schema this session streams for its instrument."""
        if self.state != "streaming":
            return
        out: list[bytes] = []
        for schema, iids in self.live.items():
            if ev.instrument_id in iids:
                out += rec.event_records(ev, schema)
        if out:
            self.offer(out)

    def offer(self, records: list[bytes]) -> None:
        """Send live records unless the client reads too slowly (then warn once, skip and count)."""
        limit = self.gw.config.slow_reader_bytes
        size = self.buffered()
        if self.slow:
            if size > limit // 2:
                self._skipped_episode += len(records)
                self.stats.skipped += len(records)
                return
            self.slow = False
            text = f"Skipped {self._skipped_episode} records after slow reading"
            log.warning("dbsim_slow_reader_resumed", session=self.session_id, skipped=self._skipped_episode)
            self._emit([rec.error(self.gw.clock(), text, dbn.ErrorCode.SKIPPED_RECORDS_AFTER_SLOW_READING)])
            self._skipped_episode = 0
        elif size > limit:
            self.slow = True
            self.stats.slow_warnings += 1
            log.warning("dbsim_slow_reader", session=self.session_id, buffered=size)
            self._emit(
                [
                    rec.system(
                        self.gw.clock(), "Slow reader: records will be skipped", dbn.SystemCode.SLOW_READER_WARNING
                    )
                ]
            )
            self._skipped_episode += len(records)
            self.stats.skipped += len(records)
            return
        self._emit(records)

    async def _heartbeats(self) -> None:
        """A heartbeat SystemMsg after ``heartbeat_interval_s`` without any record (the client's watchdog needs it)."""
        interval = max(0.05, self.heartbeat_s)
        while self.state == "streaming":
            await asyncio.sleep(min(interval, 1.0))
            if self.state == "streaming" and time.monotonic() - self.last_write >= interval:
                self._emit([rec.system(self.gw.clock(), "Heartbeat", dbn.SystemCode.HEARTBEAT)])
                self.stats.heartbeats += 1
                self.flush()
