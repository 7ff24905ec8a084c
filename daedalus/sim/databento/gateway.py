"""The gateway: a TCP server on 127.0.0.1, one market (model or replay file) broadcast to every session."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from daedalus.logs import get_logger
from daedalus.sim.checks import SimConfigError, check_int, check_range
from daedalus.sim.databento import records as rec
from daedalus.sim.databento.model import Event, MarketModel
from daedalus.sim.databento.replay import ReplayFile, load_replay
from daedalus.sim.databento.session import AUTH_FAILED, GatewaySession

log = get_logger(__name__)

TEST_API_KEY = "db-sim00000000000000000000000TEST"  # the default key (32 chars, like Databento's)
DEFAULT_SYMBOLS = ("ESM6", "NQM6")
_BATCH = 200  # events generated between two yields of the event loop at rate 'max'
_HIGH_WATER = 256 * 1024  # at rate 'max', wait (up to 1 s) while a session has more than this buffered


@dataclass
class GatewayConfig:
    """Settings of :class:`DatabentoGateway` (the CLI flags of ``daedalus sim --protocol databento``)."""

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str = TEST_API_KEY
    dataset: str = "GLBX.MDP3"
    symbols: tuple[str, ...] = DEFAULT_SYMBOLS
    seed: int = 1
    rate: float | None = 1000.0  # market events per second (replay: records per second); None = as fast as possible
    start_ns: int = 1_767_225_600_000_000_000  # the simulated clock's start (2026-01-01T00:00:00Z)
    initial_orders: int = 20  # per instrument, the opening book (part of the history)
    history: int = 20_000  # events kept for start= replay (~3 KB each with every schema encoded)
    truth: Path | None = None  # NDJSON of the true top of book after every MBO record
    replay: Path | None = None  # serve this DBN file instead of the model
    disconnect_after_s: float | None = None  # fault: close each connection N s after it opened
    disconnect_after_records: int | None = None  # fault: close each connection after N records
    slow_reader_bytes: int = 16 * 1024 * 1024  # fault threshold: write buffer above this skips records
    auth_error: str = AUTH_FAILED
    lsg_version: str = "0.7.2"
    keep_sent: bool = False  # keep every record sent per session (tests compare with what the client got)
    market: bool = True  # run the market loop (False: only the history of the initial book, step by hand)

    def validate(self) -> None:
        check_int("port", self.port, 0, 65535)
        if self.rate is not None:
            check_range("rate", self.rate, 0, low_open=True)
        check_int("history", self.history, 1)
        check_int("initial_orders", self.initial_orders, 0)
        check_int("slow_reader_bytes", self.slow_reader_bytes, 1)
        if self.disconnect_after_s is not None:
            check_range("disconnect_after_s", self.disconnect_after_s, 0, low_open=True)
        if self.disconnect_after_records is not None:
            check_int("disconnect_after_records", self.disconnect_after_records, 1)
        if not self.api_key:
            raise SimConfigError("api_key", "api_key must not be empty")
        if not self.symbols and self.replay is None:
            raise SimConfigError("symbols", "symbols must name at least one instrument")
        for symbol in self.symbols:
            if not symbol or any(c in symbol for c in ",|= \n"):
                raise SimConfigError("symbols", f"invalid symbol {symbol!r}")


class DatabentoGateway:
    """A Databento live gateway on a local port: ``async with DatabentoGateway(cfg) as gw`` (see the package doc)."""

    def __init__(self, config: GatewayConfig | None = None) -> None:
        self.config = config or GatewayConfig()
        self.config.validate()
        self.sessions: set[GatewaySession] = set()
        self.started_sessions = 0
        self._next_session = 1
        self.replay: ReplayFile | None = None
        self.model: MarketModel | None = None
        self.history: collections.deque[Event] = collections.deque(maxlen=self.config.history)
        if self.config.replay is not None:
            self.replay = load_replay(self.config.replay)
            self.dataset = self.replay.dataset
            self.schemas = tuple(rec.SCHEMA_RTYPES)
            self._symbols = dict(self.replay.symbols)
        else:
            self.model = MarketModel(
                self.config.symbols, self.config.seed, self.config.start_ns, self.config.initial_orders
            )
            self.dataset = self.config.dataset
            self.schemas = rec.SCHEMAS
            self._symbols = {s: i.instrument_id for s, i in self.model.by_symbol.items()}
        self._names = {iid: s for s, iid in self._symbols.items()}
        self._server: asyncio.Server | None = None
        self._market: asyncio.Task | None = None
        self._truth: IO[bytes] | None = None
        self.running = asyncio.Event()  # cleared = market paused
        self.running.set()
        self.events_published = 0

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    async def __aenter__(self) -> DatabentoGateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self.config.truth is not None:
            self._truth = open(self.config.truth, "wb")  # noqa: SIM115 (closed in stop)
        if self.model is not None:
            for ev in self.model.initial_events():
                self.publish(ev)
            self._flush_truth()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_session, self.config.host, self.config.port)
        if self.model is not None and self.config.market:
            self._market = asyncio.ensure_future(self._run_market())
        log.info("dbsim_ready", port=self.port, dataset=self.dataset, symbols=",".join(self._symbols))

    async def stop(self) -> None:
        if self._market is not None:
            self._market.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._market
        if self._server is not None:
            self._server.close()
        sessions = list(self.sessions)
        for session in sessions:
            session.close()
        if sessions:  # let connection_lost run (and log) while the loop is still alive
            await asyncio.wait([s.closed for s in sessions], timeout=2)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        if self._truth is not None:
            self._truth.close()
            self._truth = None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.sockets[0].getsockname()[1]

    def _new_session(self) -> GatewaySession:
        session = GatewaySession(self, self._next_session)
        self._next_session += 1
        return session

    def on_session_started(self, session: GatewaySession) -> None:
        self.started_sessions += 1
        if self.replay is not None:
            session._tasks.append(asyncio.ensure_future(self._serve_replay(session)))

    # -- symbols -----------------------------------------------------------------------------------------------------

    def instrument_id(self, symbol: str) -> int:
        return self._symbols[symbol]

    def symbol_of(self, instrument_id: int) -> str:
        return self._names.get(instrument_id, str(instrument_id))

    def resolve(self, stype_in: str, symbols: list[str]) -> tuple[list[tuple[int, str]], list[str]]:
        """Map requested symbols to instrument ids: raw_symbol and instrument_id only (others fail to resolve)."""
        if stype_in not in ("raw_symbol", "instrument_id"):
            return [], symbols
        if symbols == ["ALL_SYMBOLS"]:
            return [(iid, s if stype_in == "raw_symbol" else str(iid)) for s, iid in self._symbols.items()], []
        found, missing = [], []
        for s in symbols:
            if stype_in == "raw_symbol" and s in self._symbols:
                found.append((self._symbols[s], s))
            elif stype_in == "instrument_id" and s.isdigit() and int(s) in self._names:
                found.append((int(s), s))
            else:
                missing.append(s)
        return found, missing

    # -- market ------------------------------------------------------------------------------------------------------

    def clock(self) -> int:
        return self.model.clock if self.model is not None else time.time_ns()

    def true_top(self, instrument_id: int) -> tuple[int, int, int, int]:
        """(bid_px, bid_sz, ask_px, ask_sz) of the true book now (call from the gateway's loop thread)."""
        assert self.model is not None, "no model in replay mode"
        return self.model.true_top(instrument_id)

    def publish(self, ev: Event) -> None:
        """Record the event in the history and the truth file and hand it to every streaming session."""
        self.history.append(ev)
        self.events_published += 1
        if self._truth is not None:
            self._truth.write(
                b"".join(
                    orjson.dumps(
                        {
                            "instrument_id": ev.instrument_id,
                            "sequence": u.sequence,
                            "ts_event": ev.ts_event,
                            "bid_px": u.top[0],
                            "bid_sz": u.top[1],
                            "ask_px": u.top[2],
                            "ask_sz": u.top[3],
                        }
                    )
                    + b"\n"
                    for u in ev.updates
                )
            )
        for session in self.sessions:
            session.on_event(ev)

    def _flush_truth(self) -> None:
        if self._truth is not None:
            self._truth.flush()

    def _flush_sessions(self) -> None:
        for session in list(self.sessions):
            session.flush()

    def step(self, n: int = 1) -> None:
        """Generate and broadcast ``n`` events now (tests with ``market=False`` drive the market by hand)."""
        assert self.model is not None
        for _ in range(n):
            self.publish(self.model.step())
        self._flush_truth()
        self._flush_sessions()

    async def _run_market(self) -> None:
        loop = asyncio.get_running_loop()
        rate = self.config.rate
        t0, made = loop.time(), 0
        while True:
            if not self.running.is_set():
                await self.running.wait()
                t0, made = loop.time(), 0
            if rate is None:
                self.step(_BATCH)
                await self._backpressure()
                await asyncio.sleep(0)
                continue
            due = int((loop.time() - t0) * rate) - made
            if due <= 0:
                await asyncio.sleep(min(0.01, 1 / rate))
                continue
            if due > rate:  # more than 1 s behind (the rate is more than one core can make): do not catch up
                log.warning("dbsim_rate_behind", rate=rate, behind=due)
                t0, made, due = loop.time(), 0, min(due, _BATCH)
            due = min(due, _BATCH)
            self.step(due)
            made += due
            await asyncio.sleep(0)  # let the sessions' sockets drain between batches

    async def _backpressure(self) -> None:
        """At rate 'max', let readers catch up; a reader stuck past 1 s is left to the slow-reader fault."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(s.buffered() > _HIGH_WATER and not s.slow for s in self.sessions):
            await asyncio.sleep(0.001)

    # -- per-subscription records --------------------------------------------------------------------------------------

    def initial_records(self, schema: str, iids: list[int], snapshot: bool) -> list[bytes]:
        """What a new subscription gets before live records: definitions, or an MBO snapshot."""
        if self.model is None:
            return []
        ts = self.model.clock
        if schema == "definition":
            return [rec.definition(self.model.instruments[iid], ts) for iid in iids]
        if snapshot:
            out: list[bytes] = []
            for iid in iids:
                inst = self.model.instruments[iid]
                out += rec.snapshot_records(inst, self.model.snapshot(iid), ts, ts)
            return out
        return []

    def history_records(self, schema: str, iids: set[int], start: int) -> Iterator[list[bytes]]:
        """The kept history from ``start`` (ts_event, ns) in ``schema`` for these instruments."""
        for ev in list(self.history):
            if ev.ts_event >= start and ev.instrument_id in iids:
                yield rec.event_records(ev, schema)

    async def _serve_replay(self, session: GatewaySession) -> None:
        """Stream the replay file's records that match the session's subscriptions, in file order."""
        assert self.replay is not None
        rtypes = {schema: set(rec.SCHEMA_RTYPES[schema]) for schema in self.schemas}
        rate = self.config.rate
        batch: list[bytes] = []
        sent = 0
        for rtype, iid, raw in self.replay.records:
            if any(rtype in rtypes[s] and iid in ids for s, ids in session.live.items()):
                batch.append(raw)
            if len(batch) >= 500:
                session.offer(batch)
                session.flush()
                sent += len(batch)
                batch = []
                await asyncio.sleep(500 / rate if rate else 0)
                while session.buffered() > _HIGH_WATER and session.state == "streaming":
                    await asyncio.sleep(0.005)
        if batch:
            session.offer(batch)
            sent += len(batch)
        session._emit([rec.system(time.time_ns(), "Finished replay", rec.dbn.SystemCode.REPLAY_COMPLETED)])
        session.flush()
        log.info("dbsim_replay_file_done", session=session.session_id, records=sent)

    def stats(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "events": self.events_published,
            "sessions": len(self.sessions),
            "records_sent": sum(s.stats.records for s in self.sessions),
            "skipped": sum(s.stats.skipped for s in self.sessions),
        }


class ThreadedGateway:
    """The gateway on its own event loop in a thread, for synchronous code (the official client blocks).

    ``call(fn, *args)`` runs ``fn`` on the gateway's loop and returns its result, so reading the
    model (``true_top``) never races the market."""

    def __init__(self, config: GatewayConfig | None = None) -> None:
        self.config = config or GatewayConfig()
        self.loop = asyncio.new_event_loop()
        self.gateway: DatabentoGateway | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="dbsim", daemon=True)

    def __enter__(self) -> ThreadedGateway:
        self._thread.start()

        async def start() -> DatabentoGateway:
            gw = DatabentoGateway(self.config)
            await gw.start()
            return gw

        self.gateway = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        return self

    @property
    def port(self) -> int:
        assert self.gateway is not None
        return self.gateway.port

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        async def run() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(30)

    def __exit__(self, *exc: object) -> None:
        if self.gateway is not None:
            asyncio.run_coroutine_threadsafe(self.gateway.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


async def serve(config: GatewayConfig, ready: Callable[[DatabentoGateway], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM; ``ready(gateway)`` once the port accepts connections (the CLI prints its line)."""
    from daedalus.signals import stop_on_signals

    stop = stop_on_signals()
    async with DatabentoGateway(config) as gateway:
        if ready is not None:
            ready(gateway)
        await stop.wait()
        log.info("dbsim_stopping", sessions=len(gateway.sessions))
