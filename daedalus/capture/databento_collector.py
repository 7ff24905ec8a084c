"""Databento live collector: one session per dataset through the official client's protocol.

``databento.live.protocol.DatabentoLiveProtocol`` does the gateway's work (CRAM
authentication, subscription lines, ``start_session``, DBN decoding); it runs on our own event
loop (``loop.create_connection``) instead of inside ``databento.Live``, so that each network
read is stamped with our receive time and every record goes to the segment writer as the bytes
the client decoded (``bytes(record)``, byte-identical to the wire for DBN v3). Nothing is parsed
beyond the record header's rtype: symbol mappings are kept for the segment heads, error and
system messages are logged and counted, and the last ``ts_event`` is kept for the refill.

Reconnects back off (:mod:`daedalus.backoff`); each new session starts a new segment and writes
a ``gap`` event: with ``reconnect_refill`` the subscriptions are sent again with
``start = last ts_event + 1`` (the gateway replays what was missed; ``refill_start`` says
from when), else ``refill_start`` is null and the gap stays.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import databento_dbn
from databento.common.error import BentoError
from databento.live.protocol import DatabentoLiveProtocol
from databento_dbn import ErrorCode, SystemCode

from daedalus.backoff import backoff_delay
from daedalus.config import ALL_SYMBOLS, DatabentoConfig, DatabentoSubscription, IngestionConfig
from daedalus.logs import get_logger
from daedalus.sources.databento_raw import DbnSegmentWriter

log = get_logger(__name__)

CONNECT_TIMEOUT_S = 10.0  # as databento.live.session
AUTH_TIMEOUT_S = 30.0
RESUME_POLL_S = 0.02  # how often a paused session checks whether the writer caught up
SILENCE_SLACK_S = 10.0  # the gateway heartbeats every heartbeat_interval_s; silent this much longer: dead
ERROR_RTYPE, MAPPING_RTYPE, SYSTEM_RTYPE = 21, 22, 23
RTYPE_SCHEMA = {
    160: "mbo",
    0: "trades",
    1: "mbp-1",
    10: "mbp-10",
    18: "status",
    19: "definition",
    20: "imbalance",
    21: "error",
    22: "symbol_mapping",
    23: "system",
    24: "statistics",
    32: "ohlcv-1s",
    33: "ohlcv-1m",
    34: "ohlcv-1h",
    35: "ohlcv-1d",
    36: "ohlcv-eod",
    195: "cmbp-1",
}


def gateway_host(dataset: str, override: str | None) -> str:
    """Databento's per-dataset host (``glbx-mdp3.lsg.databento.com``) unless overridden."""
    return override or f"{dataset.lower().replace('.', '-')}.lsg.databento.com"


def key_hint(key: str) -> str:
    """What logs may say of an API key: its last 5 characters (the gateway's bucket id)."""
    return f"...{key[-5:]}" if len(key) > 5 else "(short key)"


@dataclass
class DatabentoStats:
    records: int = 0
    bytes: int = 0
    reads: int = 0
    sessions: int = 0
    reconnects: int = 0
    gaps: int = 0
    refills: int = 0
    heartbeats: int = 0
    gateway_errors: int = 0
    slow_reader_warnings: int = 0
    read_pauses: int = 0  # on_queue_full: block, times the socket stopped being read
    errors: int = 0
    state: str = "starting"
    last_error: str = ""
    session_id: str = ""
    connected_since: float | None = None
    last_read_at: float | None = None  # monotonic
    last_ts_event: int | None = None
    rtypes: list[int] = field(default_factory=lambda: [0] * 256)  # records per rtype
    seen: dict[int, int] = field(default_factory=dict)  # instrument_id -> recv_ns of its last record
    symbols: dict[int, str] = field(default_factory=dict)  # instrument_id -> subscribed symbol

    def uptime(self) -> float:
        return time.monotonic() - self.connected_since if self.connected_since else 0.0

    def last_read_age(self) -> float | None:
        return time.monotonic() - self.last_read_at if self.last_read_at else None

    def schema_counts(self) -> dict[str, int]:
        return {RTYPE_SCHEMA.get(rtype, f"rtype_{rtype}"): n for rtype, n in enumerate(self.rtypes) if n}


class _Session(DatabentoLiveProtocol):
    """The official protocol, with each read stamped and its records handed to the collector."""

    def __init__(self, collector: DatabentoCollector, conn: int, api_key: str) -> None:
        settings = collector.settings
        super().__init__(
            api_key=api_key,
            dataset=collector.dataset,
            ts_out=settings.ts_out,
            heartbeat_interval_s=settings.heartbeat_interval_s,
        )
        self.collector = collector
        self.conn = conn
        self.clock = collector.clock
        self.stats = collector.stats
        self.recv_ns = 0
        self.records: list[bytes] = []  # completed by the current read
        self.mappings: list[bytes] = []
        self.streamed = False  # the session's metadata arrived

    def buffer_updated(self, nbytes: int) -> None:
        self.recv_ns = self.clock()
        stats = self.stats
        stats.reads += 1
        stats.bytes += nbytes
        stats.last_read_at = time.monotonic()
        try:
            super().buffer_updated(nbytes)  # decodes: received_metadata / received_record run in here
        finally:
            if self.records:
                self.collector.hand_records(self)

    def received_metadata(self, metadata: databento_dbn.Metadata) -> None:
        super().received_metadata(metadata)
        self.streamed = True
        self.collector.session_started(self, metadata.encode())

    def received_record(self, record: Any) -> None:
        data = bytes(record)
        self.records.append(data)
        rtype = data[1]
        self.stats.rtypes[rtype] += 1
        if rtype in (ERROR_RTYPE, MAPPING_RTYPE, SYSTEM_RTYPE):
            self.collector.control_record(self, rtype, record, data)
        else:
            self.stats.seen[record.instrument_id] = self.recv_ns


class DatabentoCollector:
    """One dataset's live session, kept up with reconnects, into one segment writer."""

    def __init__(
        self,
        dataset: str,
        subscriptions: list[DatabentoSubscription],
        settings: DatabentoConfig,
        ingestion: IngestionConfig,
        writer: DbnSegmentWriter,
        clock: Callable[[], int] = time.time_ns,
        conn_ids: Iterator[int] | None = None,
    ) -> None:
        self.dataset = dataset
        self.subscriptions = subscriptions
        self.settings = settings
        self.ingestion = ingestion
        self.writer = writer
        self.clock = clock
        self.host = gateway_host(dataset, settings.gateway)
        self.port = settings.port
        self.stats = DatabentoStats()
        self._conn_ids = conn_ids or itertools.count(1)
        self._rng = random.Random()
        self._session: _Session | None = None
        self._stopping = False
        self._prelude: list[tuple[int, str, dict[str, Any]]] = []  # events of a session before its metadata
        # the next session writes a gap: at start-up (nothing joins it to what an earlier run
        # captured, so the ETL must not continue that run's books) and after a session that streamed
        self._gap_pending = True
        self._gap_reason = "start"
        self._refill_start: int | None = None  # the start asked of the current session by a refill
        self._block = ingestion.on_queue_full == "block"
        self._paused = False  # reading paused until the writer catches up (block)

    # -- the session loop ----------------------------------------------------------------

    async def run(self) -> None:
        """Connect and capture until cancelled, reconnecting with backoff."""
        attempt = 0
        while not self._stopping:
            conn = next(self._conn_ids)
            records_before = self.stats.records
            try:
                reason = await self._connect_and_stream(conn)
            except asyncio.CancelledError:
                self._disconnected(conn, "shutdown")
                raise
            except BentoError as exc:
                reason = f"gateway: {exc}"
                self.stats.errors += 1
                self.stats.last_error = reason
            except (OSError, TimeoutError, ValueError) as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self.stats.errors += 1
                self.stats.last_error = reason
            except Exception as exc:  # a bug must not end capture: log it, back off, go on
                reason = f"unexpected {type(exc).__name__}: {exc}"
                self.stats.errors += 1
                self.stats.last_error = reason
                log.error("collector_error", dataset=self.dataset, conn=conn, error=repr(exc), exc_info=True)
            self._disconnected(conn, "shutdown" if self._stopping else reason)
            if self._stopping:
                break
            if self.stats.records > records_before:
                attempt = 0  # only a session that delivered data resets the backoff
            attempt += 1
            limit = self.ingestion.max_reconnect_attempts
            if not self.ingestion.auto_reconnect or (limit >= 0 and attempt > limit):
                log.error("collector_gave_up", dataset=self.dataset, attempts=attempt, reason=reason)
                self.stats.state = "failed"
                return
            delay = backoff_delay(
                attempt, self.ingestion.reconnect_delay, self.ingestion.max_reconnect_delay, self._rng
            )
            log.warning(
                "collector_reconnecting",
                dataset=self.dataset,
                gateway=f"{self.host}:{self.port}",
                reason=reason,
                attempt=attempt,
                retry_in=round(delay, 2),
            )
            if self.stats.state != "auth_failed":
                self.stats.state = "backoff"
            await asyncio.sleep(delay)
            self.stats.reconnects += 1

    async def stop(self) -> None:
        """Close the connection politely; ``run`` then ends."""
        self._stopping = True
        session = self._session
        if session is not None:
            session.transport.close()

    async def _connect_and_stream(self, conn: int) -> str:
        loop = asyncio.get_running_loop()
        key = self.settings.api_key.get_secret_value()
        if self.stats.state != "auth_failed":  # an operator keeps seeing why until a key works
            self.stats.state = "connecting"
        transport, session = await asyncio.wait_for(
            loop.create_connection(lambda: _Session(self, conn, key), self.host, self.port), CONNECT_TIMEOUT_S
        )
        self._session = session
        try:
            try:
                session_id = await self._authenticated(session)
            except BentoError as exc:
                self.stats.state = "auth_failed"
                log.error(
                    "databento_auth_failed",
                    dataset=self.dataset,
                    gateway=f"{self.host}:{self.port}",
                    error=str(exc),
                    key=key_hint(key),
                    action="check databento.api_key; retrying with backoff",
                )
                raise
            self.stats.session_id = str(session_id or "")
            self._subscribe(session, conn)
            session.start()
            self.stats.state = "connected"
            self.stats.sessions += 1
            self.stats.connected_since = time.monotonic()
            log.info(
                "collector_connected",
                dataset=self.dataset,
                conn=conn,
                gateway=f"{self.host}:{self.port}",
                session_id=self.stats.session_id,
                subscriptions=len(self.subscriptions),
            )
            return await self._stream(session)
        finally:
            self._session = None
            self._paused = False
            transport.close()
            for future in (session.authenticated, session.disconnected):
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved: asyncio must not log it as forgotten
            if session.streamed:
                self._gap_pending, self._gap_reason = True, "reconnect"

    @staticmethod
    async def _authenticated(session: _Session) -> str | None:
        """The session id once the gateway accepts the key; its error text (BentoError) when it
        does not; ConnectionError when it hangs up first."""
        authenticated, disconnected = session.authenticated, session.disconnected
        await asyncio.wait([authenticated, disconnected], timeout=AUTH_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if authenticated.done():
            return authenticated.result()
        if disconnected.done():
            raise ConnectionError("the gateway closed the connection before authentication")
        raise TimeoutError(f"no authentication answer within {AUTH_TIMEOUT_S:.0f}s")

    def _subscribe(self, session: _Session, conn: int) -> None:
        """Send every subscription: as configured, or from the last record on (refill)."""
        now = self.clock()
        self._prelude = [
            (
                now,
                "connect",
                {"gateway": f"{self.host}:{self.port}", "dataset": self.dataset, "session_id": self.stats.session_id},
            )
        ]
        last = self.stats.last_ts_event
        refill = self._gap_pending and self.settings.reconnect_refill and last is not None
        self._refill_start = last + 1 if refill and last is not None else None
        for index, sub in enumerate(self.subscriptions):
            start = self._refill_start if refill else sub.start_ns
            snapshot = sub.snapshot and not refill
            session.subscribe(
                schema=sub.schema_,
                symbols=sub.symbols,
                stype_in=sub.stype_in,
                start=start,
                snapshot=snapshot,
                subscription_id=index,
            )
            self._prelude.append(
                (
                    now,
                    "subscribe",
                    {
                        "schema": sub.schema_,
                        "symbols": sub.symbols,
                        "stype_in": sub.stype_in,
                        "start": start,
                        "snapshot": snapshot,
                        "id": index,
                    },
                )
            )

    async def _stream(self, session: _Session) -> str:
        """Wait for the session to end; a gateway silent past its heartbeat interval is dropped.
        While reading is paused (``on_queue_full: block``), reading resumes once the writer's
        queue is half empty; the silence clock starts again then."""
        silence = self.settings.heartbeat_interval_s + SILENCE_SLACK_S
        disconnected = session.disconnected
        started = time.monotonic()
        while not disconnected.done():
            await asyncio.wait([disconnected], timeout=RESUME_POLL_S if self._paused else min(1.0, silence))
            if self._paused:
                if self.writer.queue_depth <= self.ingestion.queue_maxsize // 2:
                    self._paused = False
                    started = time.monotonic()
                    session.transport.resume_reading()
                continue
            last = self.stats.last_read_at or started
            if not disconnected.done() and time.monotonic() - max(last, started) > silence:
                session.transport.close()
                return f"gateway silent for more than {silence:.0f}s"
        disconnected.result()  # raises the gateway's ErrorMsg text (BentoError) or the socket error
        return "closed by gateway"

    def _disconnected(self, conn: int, reason: str) -> None:
        if self.stats.state == "connected":
            self.writer.put_control(self.clock(), conn, "disconnect", reason=reason)
            log.info("collector_disconnected", dataset=self.dataset, conn=conn, reason=reason)
        self.stats.connected_since = None
        if self.stats.state != "auth_failed" or self._stopping:
            self.stats.state = "disconnected"

    # -- called by the protocol, on the event loop ------------------------------------------

    def session_started(self, session: _Session, metadata: bytes) -> None:
        """The session's metadata: a new segment, then its connect/subscribe events and the gap."""
        writer, conn, recv_ns = self.writer, session.conn, session.recv_ns
        writer.put_metadata(recv_ns, conn, metadata)
        for at, event, fields in self._prelude:
            writer.put_control(at, conn, event, **fields)
        self._prelude = []
        writer.put_control(recv_ns, conn, "session", session_id=self.stats.session_id)
        if self._gap_pending:
            self._gap_pending = False
            refill, reason, last = self._refill_start, self._gap_reason, self.stats.last_ts_event
            writer.put_control(recv_ns, conn, "gap", last_ts_event=last, refill_start=refill, reason=reason)
            if reason != "start":
                self.stats.gaps += 1
                self.stats.refills += refill is not None
                log.warning("databento_gap", dataset=self.dataset, conn=conn, last_ts_event=last, refill_start=refill)
        self.stats.state = "connected"

    def hand_records(self, session: _Session) -> None:
        """The records one read completed, to the writer (counted as dropped when it is full)."""
        records, mappings = session.records, session.mappings
        session.records, session.mappings = [], []
        self.stats.records += len(records)
        for data in reversed(records):
            if data[1] not in (ERROR_RTYPE, MAPPING_RTYPE, SYSTEM_RTYPE):
                self.stats.last_ts_event = int.from_bytes(data[8:16], "little")
                break
        writer = self.writer
        if self._block:  # back-pressure: nothing dropped, the socket stops being read instead
            writer.put_records(session.recv_ns, session.conn, records, mappings, force=True)
            if not writer.has_room() and not self._paused:
                self._paused = True
                self.stats.read_pauses += 1
                session.transport.pause_reading()
        elif not writer.put_records(session.recv_ns, session.conn, records, mappings) and mappings:
            writer.put_records(session.recv_ns, session.conn, mappings, mappings, force=True)

    def control_record(self, session: _Session, rtype: int, record: Any, data: bytes) -> None:
        stats = self.stats
        if rtype == MAPPING_RTYPE:
            session.mappings.append(data)
            # the symbol subscribed; under ALL_SYMBOLS, the instrument's own
            symbol = record.stype_in_symbol
            stats.symbols[record.instrument_id] = record.stype_out_symbol if symbol == ALL_SYMBOLS else symbol
        elif rtype == SYSTEM_RTYPE:
            if record.is_heartbeat():
                stats.heartbeats += 1
            elif record.code == SystemCode.SLOW_READER_WARNING:
                stats.slow_reader_warnings += 1
                log.warning("databento_slow_reader", dataset=self.dataset, msg=record.msg)
            else:
                log.info("databento_system_msg", dataset=self.dataset, code=str(record.code), msg=record.msg)
        else:
            stats.gateway_errors += 1
            stats.last_error = f"gateway: {record.err}"
            if record.code == ErrorCode.SKIPPED_RECORDS_AFTER_SLOW_READING:
                stats.slow_reader_warnings += 1
                stats.gaps += 1
                self.hand_records(session)  # the records before it, so the gap event comes after them
                self.writer.put_control(session.recv_ns, session.conn, "gap", last_ts_event=stats.last_ts_event,
                                        refill_start=None, reason=str(record.err))  # fmt: skip
            log.error("databento_gateway_error", dataset=self.dataset, code=str(record.code), error=record.err)

    def status_text(self) -> str:
        s = self.stats
        age = s.last_read_age()
        error = f" error={s.last_error!r}" if s.state in ("auth_failed", "backoff") and s.last_error else ""
        return (
            f"[databento:{self.dataset}] {s.state} up={s.uptime():.0f}s records={s.records:,} "
            f"bytes={s.bytes / 1e6:.1f}MB reconnects={s.reconnects} gaps={s.gaps} heartbeats={s.heartbeats} "
            f"gateway_errors={s.gateway_errors} last={'-' if age is None else f'{age:.2f}s'} ago{error}"
        )
