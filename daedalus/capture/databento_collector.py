"""Databento live collector: one session per dataset through the official client's protocol.

``databento.live.protocol.DatabentoLiveProtocol`` does the gateway's work (CRAM
authentication, subscription lines, ``start_session``, DBN decoding); it runs on our own event
loop (``loop.create_connection``) instead of inside ``databento.Live``, so that each network
read is stamped with our receive time and every record goes to the segment writer as the bytes
the client decoded (``bytes(record)``, byte-identical to the wire for DBN v3). Nothing is parsed
beyond the record header: symbol mappings are kept for the segments, error and system
messages are logged (rate-limited) and counted, and each rtype's newest ``ts_event`` is kept
for the refill.

Reconnects back off (:mod:`daedalus.backoff`); each new session starts a new segment and writes
a ``gap`` event. With ``reconnect_refill`` each subscription is sent again with ``start`` = its
schema's newest ``ts_event`` minus the largest backward step of ``ts_event`` seen in that rtype
(records arrive in receive order, not ``ts_event`` order), at least ``REFILL_FLOOR_NS``
(:class:`~daedalus.sources.databento_raw.RefillTracker`: the gateway filters a replay on each
schema's ``ts_event``); the replayed records already written (every record from that start on is
kept, bounded) are dropped; ``refill_start`` says from when (the earliest start). Definition,
statistics and status subscriptions are never refilled (their ``ts_event`` are old exchange times):
they go on live, and the gap event lists them in ``not_refilled``. A schema with no record yet
refills from the configured ``start`` (nothing of it was written) or from when this process first
subscribed.

When the gateway refuses the refill (``REPLAY_DATA_AGED_OUT``, or :data:`REFILL_TRIES` refill
sessions that end without a record), capture goes live-only (mbo with a snapshot) and the gap
stays: ``refill_start`` null. A dataset without live snapshots answers ``INVALID_SUBSCRIPTION`` to
that: the collector then stops asking for snapshots (for the rest of the process) and goes live
without one. Refills are tried again only after a live-only session delivered market records. A
``REPLAY_COMPLETED`` ("Finished <schema> replay") proves a refill honoured (a quiet market sends
no new record: not a refusal) and ends that schema's duplicate drop.

A restart refills too: the writer keeps ``raw/active/databento/<DATASET>/.refill_state`` (what it
wrote: per rtype newest ts_event, step, hashes of the window, and the segment offset it covers;
replaced atomically at most every second after a flush and before every rotation) and a new
process reads it first (the raw segments may already be deleted by the ETL), then the records
written after its offset if still on disk; only without it the newest segment left is read. A
configured ``start`` is never sent again once a run captured records of that schema.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
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
from daedalus.sources.databento_raw import (
    NO_REFILL_RTYPES,
    DbnSegmentWriter,
    RefillTracker,
    last_events,
    newest_segment,
    read_refill_state,
    state_path,
    written_after,
)

log = get_logger(__name__)

CONNECT_TIMEOUT_S = 10.0  # as databento.live.session
AUTH_TIMEOUT_S = 30.0
RESUME_POLL_S = 0.02  # how often a paused session checks whether the writer caught up
SILENCE_SLACK_S = 10.0  # the gateway heartbeats every heartbeat_interval_s; silent this much longer: dead
ERROR_RTYPE, MAPPING_RTYPE, SYSTEM_RTYPE = 21, 22, 23
CONTROL_RTYPES = frozenset((ERROR_RTYPE, MAPPING_RTYPE, SYSTEM_RTYPE))
LOG_EVERY_S = 10.0  # a repeated gateway message is logged at most this often (the rest counted)
REFILL_TRIES = 2  # refill sessions in a row that end without a record: the gateway will not refill
# the rtypes of each subscription's records (DBN v3): a subscription refills from the newest of these
SCHEMA_RTYPES: dict[str, tuple[int, ...]] = {
    "mbo": (160,),
    "trades": (0,),
    "mbp-1": (1,),
    "tbbo": (1,),
    "mbp-10": (10,),
    "ohlcv-1s": (32,),
    "ohlcv-1m": (33,),
    "ohlcv-1h": (34,),
    "ohlcv-1d": (35, 36),
    "definition": (19,),
    "statistics": (24,),
    "status": (18,),
    "imbalance": (20,),
}
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
    177: "cmbp-1",
    192: "cbbo-1s",
    193: "cbbo-1m",
    194: "tcbbo",
    195: "bbo-1s",
    196: "bbo-1m",
}


def schema_rtypes(schema: str) -> tuple[int, ...]:
    return SCHEMA_RTYPES.get(schema, ())


def last_ts_events(tracker: RefillTracker) -> dict[str, int]:
    """schema name -> newest ts_event, for the gap event and the logs."""
    return {RTYPE_SCHEMA.get(r, f"rtype_{r}"): ts for r, ts in sorted(tracker.newest.items())}


def gateway_host(dataset: str, override: str | None) -> str:
    """Databento's per-dataset host (``glbx-mdp3.lsg.databento.com``) unless overridden."""
    return override or f"{dataset.lower().replace('.', '-')}.lsg.databento.com"


def key_hint(key: str) -> str:
    """What logs may say of an API key: its last 5 characters (the gateway's bucket id)."""
    return f"...{key[-5:]}" if len(key) > 5 else "(short key)"


class LogLimiter:
    """At most one log line per key every ``every_s`` seconds: a gateway repeating an error (or
    a slow-reader warning) many times a second must not flood the logs. :meth:`allow` says how
    many were held back since the last line, or None to stay silent."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, key: str) -> int | None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every_s:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._held.pop(key, 0)


@dataclass
class DatabentoStats:
    records: int = 0
    bytes: int = 0
    reads: int = 0
    sessions: int = 0
    reconnects: int = 0
    gaps: int = 0
    refills: int = 0
    refills_refused: int = 0  # the gateway would not replay (aged out): went live-only
    duplicates_dropped: int = 0  # replayed records already written, dropped
    refill_before_capture: int = 0  # replayed records older than capture's first (a refill reaching back), dropped
    replays_completed: int = 0  # REPLAY_COMPLETED messages (one per refilled schema)
    heartbeats: int = 0
    gateway_errors: int = 0
    slow_reader_warnings: int = 0
    skips_merged: int = 0  # slow-reader skips with no record since the previous one: no gap event of their own
    read_pauses: int = 0  # on_queue_full: block, times the socket stopped being read
    errors: int = 0
    state: str = "starting"
    last_error: str = ""
    session_id: str = ""
    connected_since: float | None = None
    last_read_at: float | None = None  # monotonic
    last_ts_event: int | None = None
    rtypes: list[int] = field(default_factory=lambda: [0] * 256)  # records per rtype
    # the heartbeat's products: each configured symbol (ALL_SYMBOLS included) -> recv_ns of its
    # newest record. Bounded by the configuration, not by the instruments of a whole dataset.
    products: dict[str, int] = field(default_factory=dict)
    # instrument_id -> the configured symbols that resolved to it (a set: ESM6 may come under a
    # raw symbol and a parent ES.FUT at once); ALL_SYMBOLS mappings are not kept (see whole_rtypes)
    instrument_keys: dict[int, set[str]] = field(default_factory=dict)

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
        self.refill = False  # subscribed with refill starts
        self.snapshot = False  # asked for an mbo snapshot
        self.replay_completed = False  # the gateway said a replay finished (REPLAY_COMPLETED): the refill was honoured
        self.market = 0  # market records received (not mappings, system or error messages)
        self.tracker = collector.tracker
        self.whole_rtypes = collector.whole_rtypes

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
        rtype = data[1]
        if rtype in CONTROL_RTYPES:
            self.records.append(data)
            self.stats.rtypes[rtype] += 1
            self.collector.control_record(self, rtype, record, data)
            return
        if not self.tracker.admit(rtype, data):  # written already, or from before capture began
            self.stats.duplicates_dropped = self.tracker.dropped
            self.stats.refill_before_capture = self.tracker.early
            return
        stats = self.stats
        self.records.append(data)
        stats.rtypes[rtype] += 1
        self.market += 1
        keys = stats.instrument_keys.get(int.from_bytes(data[4:8], "little"))
        if keys:
            for key in keys:
                stats.products[key] = self.recv_ns
        if rtype in self.whole_rtypes:
            stats.products[ALL_SYMBOLS] = self.recv_ns


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
        # the official protocol logs every gateway ErrorMsg, system message and disconnect itself,
        # unthrottled; this collector logs each of them (errors once per code every 10 s, with
        # repeated=N), so the client's own lines would only flood the log in an error storm
        logging.getLogger("databento.live.protocol").setLevel(logging.CRITICAL)
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
        self._refill_start: int | None = None  # the earliest start asked of the current session by a refill
        self.tracker = RefillTracker(settings.ts_out)
        writer.refill = RefillTracker(settings.ts_out)  # what is on disk: the state file a restart reads
        self._no_snapshot = False  # the gateway refused an mbo snapshot: this dataset has none live
        # rtypes of the whole-dataset (ALL_SYMBOLS) subscriptions: their records are that product's
        self.whole_rtypes = frozenset(
            rtype for sub in subscriptions if ALL_SYMBOLS in sub.symbols for rtype in SCHEMA_RTYPES[sub.schema_]
        )
        # the configured symbols: a mapping under ALL_SYMBOLS may name its instrument's own symbol as
        # subscribed (the simulator does), which is no product of its own
        self.configured_symbols = frozenset(symbol for sub in subscriptions for symbol in sub.symbols) - {ALL_SYMBOLS}
        self._covered_since: int | None = None  # when this process first subscribed (ns): refill floor
        self._refused: str | None = None  # why the gateway will not refill: next session live-only
        self._refill_failures = 0  # refill sessions in a row that ended without a market record
        self._block = ingestion.on_queue_full == "block"
        self._logs = LogLimiter()
        self._not_refilled: list[str] = []  # schemas of the current refill session sent live (gap event)
        self._skip_gap_at: tuple[int, int] | None = None  # (conn, market records) at the last skip's gap event
        self._paused = False  # reading paused until the writer catches up (block)

    # -- the session loop ----------------------------------------------------------------

    async def run(self) -> None:
        """Connect and capture until cancelled, reconnecting with backoff."""
        if self.settings.reconnect_refill:
            await self._resume()
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

    async def _resume(self) -> None:
        """A restart refills too: from the refill state file the writer keeps, else from the newest
        segment an earlier run left (read off the loop; unreadable means no refill, not no capture)."""
        writer = self.writer
        try:
            state = await asyncio.to_thread(read_refill_state, state_path(writer.layout, self.dataset))
            if state is not None:
                trackers = [self.tracker] if writer.refill is None else [self.tracker, writer.refill]
                for tracker in trackers:  # the writer's: the next state file still knows the earlier run's window
                    tracker.load(state)
                tail = await asyncio.to_thread(
                    written_after, writer.layout, self.dataset, state.get("segment", ""), state.get("offset", 0)
                )
                for record in tail:  # written after the state (a crash between the two)
                    for tracker in trackers:
                        tracker.admit(record[1], record)
                source = f"state (+{len(tail)} records after it)"
            else:
                path = await asyncio.to_thread(newest_segment, writer.layout, self.dataset)
                events = await asyncio.to_thread(last_events, path) if path is not None else {}
                self.tracker.seed(events)
                source = path.name if path else None
        except Exception as exc:  # a damaged file is the ETL's (or the operator's) to report: capture goes on
            log.warning("databento_resume_unreadable", dataset=self.dataset, error=repr(exc))
            return
        newest = self.tracker.newest
        if newest:
            self.stats.last_ts_event = max(newest.values())
            log.info("databento_resume", dataset=self.dataset, source=source,
                     last_ts_events=last_ts_events(self.tracker))  # fmt: skip

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
            self._session_ended(session)

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

    def _session_ended(self, session: _Session) -> None:
        """After a session: the next one writes a gap; a refill session that began and ended
        without a record counts as refused once it happened :data:`REFILL_TRIES` times in a row."""
        if session.streamed:
            self._gap_pending, self._gap_reason = True, "reconnect"
        if not session.refill:
            if session.market:  # live-only delivered: the next reconnect may refill again
                self._refused, self._refill_failures = None, 0
            return
        if session.market or session.replay_completed:
            self._refill_failures = 0
            return
        if not session.streamed:  # it never began (a network fault): that says nothing of the refill
            return
        self._refill_failures += 1
        if self._refused is None and self._refill_failures >= REFILL_TRIES:
            self._refuse(f"{self._refill_failures} refill sessions ended without a record")

    def _refuse(self, reason: str) -> None:
        """The gateway will not replay from our starts: go live-only, leaving the gap."""
        self._refused = reason
        self.stats.refills_refused += 1
        self.tracker.disarm()
        log.warning("databento_refill_refused", dataset=self.dataset, reason=reason, action="live only; gap kept")

    def _plan(self) -> tuple[list[tuple[int | None, bool]], bool]:
        """((start, snapshot) per subscription, refill?): as configured; after a gap (a reconnect,
        or a restart that found an earlier run's state), each from its own schema's refill start
        (at a restart, a subscription asking for a snapshot gets it instead); definition,
        statistics and status live; live-only with an mbo snapshot once the gateway refused a
        refill (without one if the dataset has no live snapshot)."""
        subs = self.subscriptions
        snapshots = not self._no_snapshot
        configured = [(sub.start_ns, sub.snapshot and snapshots) for sub in subs]
        after_capture = self._gap_reason != "start" or bool(self.tracker.newest)
        if not self._gap_pending or not after_capture:
            return configured, False
        if self._refused is not None:
            return [(None, sub.schema_ == "mbo" and snapshots) for sub in subs], False
        if not self.settings.reconnect_refill:
            return configured, False
        plan: list[tuple[int | None, bool]] = []
        for sub in subs:
            rtypes = schema_rtypes(sub.schema_)
            if self._gap_reason == "start" and sub.snapshot and snapshots:  # a restart: the book from the snapshot
                plan.append((None, True))
                continue
            if rtypes and set(rtypes) <= NO_REFILL_RTYPES:  # old exchange times: live, never refilled
                plan.append((None, False))
                continue
            start = self._schema_start(sub.schema_)
            if start is None and not any(r in self.tracker.newest for r in rtypes):
                # nothing of it written: the configured start, else from when this process began
                start = sub.start_ns if sub.start_ns is not None else self._covered_since
            plan.append((start, sub.snapshot and snapshots and start is None))
        return plan, any(start is not None for start, _snapshot in plan)

    def _schema_start(self, schema: str) -> int | None:
        starts = [s for s in map(self.tracker.start, schema_rtypes(schema)) if s is not None]
        return min(starts) if starts else None

    def _subscribe(self, session: _Session, conn: int) -> None:
        """Send every subscription (see :meth:`_plan`)."""
        now = self.clock()
        self._prelude = [
            (
                now,
                "connect",
                {"gateway": f"{self.host}:{self.port}", "dataset": self.dataset, "session_id": self.stats.session_id},
            )
        ]
        plan, refill = self._plan()
        session.refill = refill
        session.snapshot = any(snapshot for _start, snapshot in plan)
        # the gap is filled only if every mbo book can go on: refilled, or rebuilt from a snapshot
        # (a restart whose newest segment has no mbo record cannot refill mbo: its books are unknown)
        pairs = zip(self.subscriptions, plan, strict=True)
        whole = all(start is not None or snapshot for sub, (start, snapshot) in pairs if sub.schema_ == "mbo")
        starts = [start for start, _snapshot in plan if start is not None]
        self._refill_start = min(starts) if refill and whole else None
        self._not_refilled = [
            sub.schema_
            for sub, (start, _s) in zip(self.subscriptions, plan, strict=True)
            if refill and start is None and set(schema_rtypes(sub.schema_)) <= NO_REFILL_RTYPES
        ]
        if refill:
            armed: dict[int, int] = {}
            for sub, (start, _s) in zip(self.subscriptions, plan, strict=True):
                for rtype in schema_rtypes(sub.schema_) if start is not None else ():
                    armed[rtype] = min(start, armed.get(rtype, start))
            self.tracker.arm(armed)
        else:
            self.tracker.disarm()
        if self._covered_since is None:
            self._covered_since = now
        for index, (sub, (start, snapshot)) in enumerate(zip(self.subscriptions, plan, strict=True)):
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
            if self._refused is not None:
                reason = f"{reason}; refill refused: {self._refused}"
            extra = {"not_refilled": self._not_refilled} if self._not_refilled else {}
            writer.put_control(recv_ns, conn, "gap", last_ts_event=last, refill_start=refill, reason=reason,
                               last_ts_events=last_ts_events(self.tracker), **extra)  # fmt: skip
            if self._gap_reason != "start":
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
        elif not writer.put_records(session.recv_ns, session.conn, records, mappings):
            self.tracker.forget(records)  # not written: a refill must not drop their replay
            if mappings:
                writer.put_records(session.recv_ns, session.conn, mappings, mappings, force=True)

    def control_record(self, session: _Session, rtype: int, record: Any, data: bytes) -> None:
        stats = self.stats
        if rtype == MAPPING_RTYPE:
            session.mappings.append(data)
            symbol = record.stype_in_symbol  # the symbol subscribed
            if symbol in self.configured_symbols:
                stats.instrument_keys.setdefault(record.instrument_id, set()).add(symbol)
        elif rtype == SYSTEM_RTYPE:
            if record.is_heartbeat():
                stats.heartbeats += 1
                return
            code = str(record.code)
            if record.code == SystemCode.REPLAY_COMPLETED:
                self._replay_completed(session, record.msg)
            if record.code == SystemCode.SLOW_READER_WARNING:
                stats.slow_reader_warnings += 1
            held = self._logs.allow(f"system:{code}")
            if held is not None:
                level = log.warning if record.code == SystemCode.SLOW_READER_WARNING else log.info
                level("databento_system_msg", dataset=self.dataset, code=code, msg=record.msg, repeated=held)
        else:
            self._gateway_error(session, record)

    def _replay_completed(self, session: _Session, msg: str) -> None:
        """``Finished <schema> replay``: that schema's refill was honoured (a quiet market sends no new
        record, and that is not a refusal) and its replayed duplicates are over (stop looking)."""
        self.stats.replays_completed += 1
        session.replay_completed = True
        self._refill_failures = 0
        words = msg.split()
        if len(words) == 3 and words[0] == "Finished" and words[2] == "replay":
            self.tracker.complete(schema_rtypes(words[1]))

    def _gateway_error(self, session: _Session, record: Any) -> None:
        """An ErrorMsg: counted; an aged-out refill goes live-only; records skipped for a slow
        reader are a gap (one event per run of skips with no record between them)."""
        stats = self.stats
        stats.gateway_errors += 1
        stats.last_error = f"gateway: {record.err}"
        if record.code == ErrorCode.REPLAY_DATA_AGED_OUT and session.refill and self._refused is None:
            self._refuse(f"gateway: {record.err}")
            session.transport.close()  # reconnect live-only now rather than wait on a refused replay
        if record.code == ErrorCode.INVALID_SUBSCRIPTION and session.snapshot and not self._no_snapshot:
            self._no_snapshot = True  # asking again would be refused again, forever
            log.warning("databento_snapshot_refused", dataset=self.dataset, error=record.err,
                        action="live without a snapshot; gap kept")  # fmt: skip
            session.transport.close()
        if record.code == ErrorCode.SKIPPED_RECORDS_AFTER_SLOW_READING:
            stats.slow_reader_warnings += 1
            if self._skip_gap_at == (session.conn, session.market):
                stats.skips_merged += 1  # nothing came since the last skip's gap: the same gap
            else:
                stats.gaps += 1
                self.hand_records(session)  # the records before it, so the gap event comes after them
                self.writer.put_control(session.recv_ns, session.conn, "gap", last_ts_event=stats.last_ts_event,
                                        refill_start=None, reason=str(record.err))  # fmt: skip
                self._skip_gap_at = (session.conn, session.market)
        held = self._logs.allow(f"error:{record.code}")
        if held is not None:
            log.error("databento_gateway_error", dataset=self.dataset, code=str(record.code), error=record.err,
                      repeated=held)  # fmt: skip

    def status_text(self) -> str:
        s = self.stats
        age = s.last_read_age()
        error = f" error={s.last_error!r}" if s.state in ("auth_failed", "backoff") and s.last_error else ""
        return (
            f"[databento:{self.dataset}] {s.state} up={s.uptime():.0f}s records={s.records:,} "
            f"bytes={s.bytes / 1e6:.1f}MB reconnects={s.reconnects} gaps={s.gaps} heartbeats={s.heartbeats} "
            f"gateway_errors={s.gateway_errors} last={'-' if age is None else f'{age:.2f}s'} ago{error}"
        )
