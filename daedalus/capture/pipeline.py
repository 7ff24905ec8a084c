"""``daedalus ingest``: recovery, segment writer, collectors, statistics, clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from daedalus.capture.auth import ws_jwt
from daedalus.capture.coinbase import CoinbaseCollector
from daedalus.capture.segments import (
    DiskGaveUp,
    RecoveryInterrupted,
    RecoveryReport,
    SegmentWriter,
    recover_active,
    retry_disk,
)
from daedalus.config import ConfigError, DaedalusConfig
from daedalus.locks import hold_lock
from daedalus.logs import get_logger
from daedalus.ops.heartbeat import HeartbeatPublisher
from daedalus.signals import stop_on_signals

log = get_logger(__name__)

SOURCE = "coinbase"
SHUTDOWN_TIMEOUT_S = 10.0


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}MB"


class IngestPipeline:
    """Collectors -> bounded queue -> segment writer, for the Coinbase source."""

    def __init__(self, config: DaedalusConfig, clock: Callable[[], int] = time.time_ns) -> None:
        self.config = config
        self.layout = config.layout
        self.clock = clock
        self.writer = SegmentWriter(self.layout, SOURCE, config.ingestion, clock)
        products = config.coinbase.product_ids
        per_conn = config.coinbase.max_products_per_connection
        self.collectors = [
            CoinbaseCollector(
                i + 1, products[start : start + per_conn], config.coinbase, config.ingestion, self.writer, clock
            )
            for i, start in enumerate(range(0, len(products), per_conn))
        ]
        self._started = time.monotonic()
        self.failed = False
        self._lock: TextIO | None = None
        self._last_report: tuple[float, int, dict[int, int]] = (self._started, 0, {})
        self.heartbeat = HeartbeatPublisher(
            self.layout, child=f"ingest-{SOURCE}", kind="ingest", source=SOURCE,
            every_seconds=config.supervisor.heartbeat_seconds,
        )  # fmt: skip

    def check_settings(self) -> None:
        """Fail fast, with the reason, on settings this source cannot honour."""
        if self.config.ingestion.raw_format != "ndjson":
            raise ConfigError(
                "ingestion",
                ["ingestion.raw_format: the coinbase collector writes ndjson; parquet is for the ccxt path"],
            )
        self.check_credentials()

    def check_credentials(self) -> None:
        """Fail fast, with the reason, when API keys are set but cannot sign a token."""
        key = self.config.coinbase.api_key.get_secret_value()
        if key:
            ws_jwt(key, self.config.coinbase.api_secret.get_secret_value())

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
        w = self.writer.stats
        conns = {str(c.conn_id): c.stats for c in self.collectors}
        watchdog = self.config.ingestion.watchdog_timeout_seconds
        ages = {k: s.last_message_age() for k, s in conns.items()}
        connected = {k: int(s.state == "connected") for k, s in conns.items()}
        stalled = any(connected[k] and (ages[k] if ages[k] is not None else s.uptime()) > watchdog
                      for k, s in conns.items())  # fmt: skip
        products: dict[str, dict[str, float | None]] = {}
        for c in self.collectors:
            for product, seen_ns in c.stats.product_seen.items():
                products[product] = {"last_time": seen_ns / 1e9, "mid": c.stats.product_mid.get(product)}
        counters = {
            "frames_received": {k: s.messages for k, s in conns.items()},
            "bytes_received": {k: s.bytes for k, s in conns.items()},
            "reconnects": {k: s.reconnects for k, s in conns.items()},
            "gaps": {k: s.gaps for k, s in conns.items()},
            "frames_written": w.written,
            "bytes_written": w.bytes,
            "overflow_drops": self.writer.dropped,
            "write_errors": w.write_errors,
            "flushes": w.flushes,
            "segment_rotations": w.rotations,
            "durable_latency_seconds": w.latency.to_dict(),
        }
        gauges = {
            "queue_depth": self.writer.queue_depth,
            "queue_capacity": self.config.ingestion.queue_maxsize,
            "connected": connected,
            "last_frame_age_seconds": ages,
            "watchdog_seconds": watchdog,
            "stalled": int(stalled),
            "segment": w.segment or None,
            "segment_bytes": w.segment_bytes,
        }
        return {"counters": counters, "gauges": gauges, "products": products}

    async def _run(self, stop: asyncio.Event, stats_interval: float | None, out: TextIO) -> None:
        if not await self._recover(stop):
            if self._lock is not None:  # nothing was started: only the lock to give back
                self._lock.close()
                self._lock = None
            self._log_stopped(False, time.monotonic() - self._started)
            return
        self.writer.start()
        log.info(
            "ingest_started",
            source=SOURCE,
            connections=len(self.collectors),
            products=len(self.config.coinbase.product_ids),
            data_dir=str(self.layout.root),
        )
        tasks = [asyncio.create_task(c.run(), name=f"collector-{c.conn_id}") for c in self.collectors]
        reporter = asyncio.create_task(self._report(stats_interval, out)) if stats_interval else None
        stopper = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                await asyncio.wait([*tasks, stopper], timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                if all(t.done() for t in tasks):
                    log.error("ingest_all_collectors_stopped", source=SOURCE)
                    self.failed = True
                    break
                if self.writer.error is not None:
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
            report = await asyncio.to_thread(self._prepare_and_recover, stopping)
        except RecoveryInterrupted as exc:
            self.writer.stats.write_errors += exc.write_errors  # the writer has not started yet
            log.error(
                "recovery_interrupted",
                source=SOURCE,
                segment=exc.segment,
                error=exc.error,
                failures=exc.failures,
                action="stopped as asked; the segment stays in raw/active/ and is recovered at the next start",
            )
            return False
        except OSError as exc:  # not a full disk (a permission, a read-only or failing disk): waiting cannot help
            log.error(
                "recovery_failed",
                source=SOURCE,
                error=f"{exc.strerror or exc!r}: {exc.filename}" if exc.filename else (exc.strerror or repr(exc)),
                action="fix the data directory and start again; recovery resumes where it stopped",
            )
            return False
        finally:
            relay.cancel()
        self.writer.stats.write_errors += report.write_errors  # shown in the statistics block
        return True

    def _prepare_and_recover(self, stopping: threading.Event) -> RecoveryReport:
        """The raw folders and the writer lock, then recovery. On a fresh data directory on
        a full disk even creating those waits for space, like every other disk step."""

        def prepare() -> None:
            self.layout.ensure(SOURCE)
            if self._lock is None:
                self._lock = hold_lock(self.layout.active(SOURCE) / ".lock")

        failures = 0

        def count() -> None:
            nonlocal failures
            failures += 1

        try:
            retry_disk("prepare", prepare, stop=stopping, attempts_after_stop=0, event="recovery_write",
                       fields=lambda: {"source": SOURCE, "segment": "-"}, on_failure=count)  # fmt: skip
        except DiskGaveUp as exc:
            raise RecoveryInterrupted("-", exc.error, exc.failures, failures) from exc
        try:
            report = recover_active(self.layout, SOURCE, stopping)
        except RecoveryInterrupted as exc:
            exc.write_errors += failures
            raise
        report.write_errors += failures
        return report

    async def shutdown(
        self,
        tasks: list[asyncio.Task[None]],
        reporter: asyncio.Task[None] | None,
        stopper: asyncio.Task[bool],
        out: TextIO,
    ) -> None:
        """Stop collectors, then flush and close the writer, within a bounded time."""
        started = time.monotonic()
        for collector in self.collectors:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(collector.stop(), 2.0)
        for task in [*tasks, stopper] + ([reporter] if reporter else []):
            task.cancel()
        results = await asyncio.gather(*tasks, stopper, *([reporter] if reporter else []), return_exceptions=True)
        for task, result in zip(tasks, results, strict=False):
            if isinstance(result, Exception):
                log.error("collector_crashed", task=task.get_name(), error=repr(result))
        clean = await asyncio.to_thread(self.writer.close, SHUTDOWN_TIMEOUT_S)
        if self._lock is not None:
            self._lock.close()  # releases the writer lock
            self._lock = None
        with contextlib.suppress(OSError):  # a supervisor that died took our stdout pipe with it
            print(self.status_text(), file=out, flush=True)
        self._log_stopped(clean, time.monotonic() - started)

    def _log_stopped(self, clean: bool, seconds: float) -> None:
        """The last word on the run: clean only if every accepted frame is on disk."""
        w = self.writer.stats
        fields = {
            "clean": clean,
            "seconds": round(seconds, 2),
            "written": w.written,
            "overflow": self.writer.dropped,
            "write_errors": w.write_errors,
        }
        if clean:
            log.info("ingest_stopped", **fields)
            return
        self.failed = True  # the exit status says it too
        log.error(
            "ingest_stopped",
            **fields,
            unwritten=w.unwritten,
            unwritten_events=w.unwritten_events,
            still_queued=self.writer.queue_depth,  # non-zero only if the writer did not stop in time
        )

    async def _report(self, interval: float, out: TextIO) -> None:
        while True:
            await asyncio.sleep(interval)
            print(self.status_text(), file=out, flush=True)

    def status_text(self) -> str:
        """The statistics block: one line per connection, one for the writer."""
        now = time.monotonic()
        last_at, last_written, last_msgs = self._last_report
        span = max(now - last_at, 1e-9)
        lines = []
        for c in self.collectors:
            s = c.stats
            rate = (s.messages - last_msgs.get(c.conn_id, 0)) / span
            age = s.last_message_age()
            lines.append(
                f"[coinbase#{c.conn_id}] {s.state} up={s.uptime():.0f}s msgs={s.messages:,} ({rate:,.0f}/s) "
                f"bytes={_mb(s.bytes)} errors={s.errors} reconnects={s.reconnects} gaps={s.gaps} "
                f"last={'-' if age is None else f'{age:.2f}s'} ago"
            )
        w = self.writer.stats
        depth, cap = self.writer.queue_depth, self.config.ingestion.queue_maxsize
        latency = sorted(w.latencies_ns)
        p50 = statistics.median(latency) / 1e6 if latency else 0.0
        p99 = latency[min(len(latency) - 1, int(len(latency) * 0.99))] / 1e6 if latency else 0.0
        lines.append(
            f"[writer] written={w.written:,} ({(w.written - last_written) / span:,.0f}/s) bytes={_mb(w.bytes)} "
            f"queue={depth}/{cap} ({depth / cap:.1%}) overflow={self.writer.dropped:,} "
            f"flushes={w.flushes:,} rotations={w.rotations} write_errors={w.write_errors:,} "
            f"segment={w.segment or '-'} ({_mb(w.segment_bytes)}) latency p50={p50:.1f}ms p99={p99:.1f}ms"
            + (f" unwritten={w.unwritten:,}" if w.unwritten else "")
        )
        self._last_report = (now, w.written, {c.conn_id: c.stats.messages for c in self.collectors})
        return "\n".join(lines)


async def ingest(config: DaedalusConfig, stats_interval: float | None) -> bool:
    """Run until SIGINT/SIGTERM; False when it had to stop on its own (writer or collectors
    failed) or could not write everything it had accepted before stopping."""
    stop = stop_on_signals()
    pipeline = IngestPipeline(config)
    await pipeline.run(stop, stats_interval)
    return not pipeline.failed
