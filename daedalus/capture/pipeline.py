"""``daedalus ingest --source NAME``: recovery, raw writer, collectors, statistics, clean shutdown.

The same for every source: the source's plug-in (:mod:`daedalus.sources`) builds a
:class:`Capture` (its collectors over a :class:`RawWriter` of the configured raw format); this
module takes the source's writer lock, recovers ``active/`` before anything is captured,
runs the collectors, publishes the heartbeat and the statistics block, and shuts down within
a bounded time, telling whether every accepted record reached the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TextIO

from daedalus import sources
from daedalus.capture.segments import DiskGaveUp, RecoveryInterrupted, retry_disk
from daedalus.config import DaedalusConfig
from daedalus.locks import hold_lock
from daedalus.logs import get_logger
from daedalus.ops.heartbeat import HeartbeatPublisher
from daedalus.signals import stop_on_signals

log = get_logger(__name__)

SHUTDOWN_TIMEOUT_S = 10.0


class RawWriter(Protocol):
    """A raw writer as ``daedalus ingest`` drives it (adapters in :mod:`daedalus.capture.raw_writers`)."""

    writer: Any  # the writer itself (SegmentWriter, RecordWriter): tests and benches read its stats
    error: BaseException | None  # set when the writer gave up: ingest stops (and is restarted)

    def recover(self, stopping: threading.Event) -> int:
        """Recover what a killed run left in ``active/``; returns the disk errors met (counted)."""
        ...

    def add_write_errors(self, count: int) -> None: ...

    def start(self) -> None: ...

    def close(self, timeout: float) -> bool: ...

    def heartbeat(self) -> tuple[dict[str, object], dict[str, object]]:
        """(counters, gauges) for the heartbeat (see :mod:`daedalus.ops.records`)."""
        ...

    def status_line(self, span: float) -> str: ...

    def stopped_fields(self, clean: bool) -> dict[str, object]: ...


class Capture(Protocol):
    """One source's collectors over its raw writer, built by the source's plug-in."""

    source: str
    raw: RawWriter
    collectors: list[Any]

    def check_settings(self) -> None:
        """Fail fast with :class:`ConfigError` on settings this source cannot honour."""
        ...

    def tasks(self) -> dict[str, Coroutine[Any, Any, None]]:
        """The collectors' coroutines by task name; ingest fails when all of them end."""
        ...

    async def stop(self) -> None:
        """Close connections politely (bounded by the caller)."""
        ...

    def heartbeat(self) -> tuple[dict[str, object], dict[str, object], dict[str, dict[str, float | None]]]:
        """(counters, gauges, products) of the collectors; products keyed as the source's
        ``products(config)`` (:class:`daedalus.sources.Source`)."""
        ...

    def status_lines(self, span: float) -> list[str]:
        """One line per connection or exchange; rates over ``span`` seconds since the last call."""
        ...

    def started_fields(self) -> dict[str, object]: ...


class IngestPipeline:
    """A source's collectors -> bounded queue -> raw writer, for any registered source."""

    def __init__(self, config: DaedalusConfig, clock: Callable[[], int] = time.time_ns, *,
                 source: str = "coinbase") -> None:  # fmt: skip
        self.config = config
        self.layout = config.layout
        self.clock = clock
        self.source = source
        self.capture: Capture = sources.get(source).capture(config, clock)
        self.raw = self.capture.raw
        self.writer = self.raw.writer
        self.collectors = self.capture.collectors
        self._started = time.monotonic()
        self.failed = False
        self._lock: TextIO | None = None
        self._last_report = self._started
        self.heartbeat = HeartbeatPublisher(
            self.layout, child=f"ingest-{source}", kind="ingest", source=source,
            every_seconds=config.supervisor.heartbeat_seconds,
        )  # fmt: skip

    def check_settings(self) -> None:
        """Fail fast, with the reason, on settings this source cannot honour."""
        self.capture.check_settings()

    async def run(self, stop: asyncio.Event, stats_interval: float | None = None, out: TextIO = sys.stdout) -> None:
        self.check_settings()
        beating = asyncio.create_task(self._beat(), name="heartbeat")
        try:
            await self._run(stop, stats_interval, out)
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
            self.heartbeat.remove()

    async def _beat(self) -> None:
        """Publish the heartbeat from the event loop itself, so a stuck loop stops it;
        it starts before recovery, which runs in a thread and may take a while."""
        while True:
            self.heartbeat.publish(**self.heartbeat_stats())
            await asyncio.sleep(self.heartbeat.every)

    def heartbeat_stats(self) -> dict[str, dict[str, object]]:
        """Counters, gauges and products for the heartbeat (see daedalus.ops.records)."""
        counters, gauges, products = self.capture.heartbeat()
        written, writer_gauges = self.raw.heartbeat()
        return {"counters": {**counters, **written}, "gauges": {**gauges, **writer_gauges}, "products": products}

    async def _run(self, stop: asyncio.Event, stats_interval: float | None, out: TextIO) -> None:
        if not await self._recover(stop):
            if self._lock is not None:  # nothing was started: only the lock to give back
                self._lock.close()
                self._lock = None
            self._log_stopped(False, time.monotonic() - self._started)
            return
        self.raw.start()
        log.info("ingest_started", source=self.source, **self.capture.started_fields(), data_dir=str(self.layout.root))
        tasks = [asyncio.create_task(coro, name=name) for name, coro in self.capture.tasks().items()]
        reporter = asyncio.create_task(self._report(stats_interval, out)) if stats_interval else None
        stopper = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                await asyncio.wait([*tasks, stopper], timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                if all(t.done() for t in tasks):
                    log.error("ingest_all_collectors_stopped", source=self.source)
                    self.failed = True
                    break
                if self.raw.error is not None:
                    self.failed = True
                    break
        finally:
            await self.shutdown(tasks, reporter, stopper, out)

    async def _recover(self, stop: asyncio.Event) -> bool:
        """Recover ``active/`` before anything is captured; False if asked to stop while
        the disk kept failing, or if it failed in a way waiting cannot cure (the leftovers
        stay, intact, for the next start).

        Collectors and the writer start only afterwards, so no frame arrives meanwhile and
        the new segment's name is chosen knowing the recovered ones. The retries run in a
        thread so that the event loop still sees SIGTERM.
        """
        stopping = threading.Event()
        relay = asyncio.create_task(stop.wait())
        relay.add_done_callback(lambda _: stopping.set())
        try:
            write_errors = await asyncio.to_thread(self._prepare_and_recover, stopping)
        except RecoveryInterrupted as exc:
            self.raw.add_write_errors(exc.write_errors)  # the writer has not started yet
            log.error(
                "recovery_interrupted",
                source=self.source,
                segment=exc.segment,
                error=exc.error,
                failures=exc.failures,
                action="stopped as asked; the segment stays in raw/active/ and is recovered at the next start",
            )
            return False
        except OSError as exc:  # not a full disk (a permission, a read-only or failing disk): waiting cannot help
            log.error(
                "recovery_failed",
                source=self.source,
                error=f"{exc.strerror or exc!r}: {exc.filename}" if exc.filename else (exc.strerror or repr(exc)),
                action="fix the data directory and start again; recovery resumes where it stopped",
            )
            return False
        finally:
            relay.cancel()
        self.raw.add_write_errors(write_errors)  # shown in the statistics block
        return True

    def _prepare_and_recover(self, stopping: threading.Event) -> int:
        """The raw folders and the writer lock, then recovery. On a fresh data directory on
        a full disk even creating those waits for space, like every other disk step."""

        def prepare() -> None:
            self.layout.ensure(self.source)
            if self._lock is None:
                self._lock = hold_lock(self.layout.active(self.source) / ".lock")

        failures = 0

        def count() -> None:
            nonlocal failures
            failures += 1

        try:
            retry_disk("prepare", prepare, stop=stopping, attempts_after_stop=0, event="recovery_write",
                       fields=lambda: {"source": self.source, "segment": "-"}, on_failure=count)  # fmt: skip
        except DiskGaveUp as exc:
            raise RecoveryInterrupted("-", exc.error, exc.failures, failures) from exc
        try:
            return self.raw.recover(stopping) + failures
        except RecoveryInterrupted as exc:
            exc.write_errors += failures
            raise

    async def shutdown(
        self,
        tasks: list[asyncio.Task[None]],
        reporter: asyncio.Task[None] | None,
        stopper: asyncio.Task[bool],
        out: TextIO,
    ) -> None:
        """Stop collectors, then flush and close the writer, within a bounded time."""
        started = time.monotonic()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.capture.stop(), 2.0)
        for task in [*tasks, stopper] + ([reporter] if reporter else []):
            task.cancel()
        results = await asyncio.gather(*tasks, stopper, *([reporter] if reporter else []), return_exceptions=True)
        for task, result in zip(tasks, results, strict=False):
            if isinstance(result, Exception):
                log.error("collector_crashed", task=task.get_name(), error=repr(result))
        clean = await asyncio.to_thread(self.raw.close, SHUTDOWN_TIMEOUT_S)
        if self._lock is not None:
            self._lock.close()  # releases the writer lock
            self._lock = None
        with contextlib.suppress(OSError):  # a supervisor that died took our stdout pipe with it
            print(self.status_text(), file=out, flush=True)
        self._log_stopped(clean, time.monotonic() - started)

    def _log_stopped(self, clean: bool, seconds: float) -> None:
        """The last word on the run: clean only if every accepted record is on disk."""
        fields = {"source": self.source, "clean": clean, "seconds": round(seconds, 2),
                  **self.raw.stopped_fields(clean)}  # fmt: skip
        if clean:
            log.info("ingest_stopped", **fields)
            return
        self.failed = True  # the exit status says it too
        log.error("ingest_stopped", **fields)

    async def _report(self, interval: float, out: TextIO) -> None:
        while True:
            await asyncio.sleep(interval)
            print(self.status_text(), file=out, flush=True)

    def status_text(self) -> str:
        """The statistics block: one line per connection (or exchange), one for the writer."""
        now = time.monotonic()
        span = max(now - self._last_report, 1e-9)
        self._last_report = now
        return "\n".join([*self.capture.status_lines(span), self.raw.status_line(span)])


# Sources whose ingest runs on uvloop: Coinbase's collector (picows) hands frames over from
# the loop's read callbacks, where uvloop's C event loop saves most per read. ccxt (aiohttp,
# ~1.3 CPU-s per 100k frames of its own Python parsing) and Databento keep asyncio's loop:
# the loop is not where their time goes, and they were hardened on it.
UVLOOP_SOURCES = frozenset({"coinbase"})


def loop_factory(source: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``daedalus ingest --source`` runs on (None: asyncio's own)."""
    if source in UVLOOP_SOURCES:
        import uvloop

        return uvloop.new_event_loop
    return None


def run_ingest(config: DaedalusConfig, stats_interval: float | None, source: str = "coinbase") -> bool:
    """:func:`ingest` on its event loop (:func:`loop_factory`), for the ``ingest`` command."""
    with asyncio.Runner(loop_factory=loop_factory(source)) as runner:
        return runner.run(ingest(config, stats_interval, source))


async def ingest(config: DaedalusConfig, stats_interval: float | None, source: str = "coinbase") -> bool:
    """Run until SIGINT/SIGTERM; False when it had to stop on its own (writer or collectors
    failed) or could not write everything it had accepted before stopping."""
    stop = stop_on_signals()
    pipeline = IngestPipeline(config, source=source)
    await pipeline.run(stop, stats_interval)
    return not pipeline.failed
