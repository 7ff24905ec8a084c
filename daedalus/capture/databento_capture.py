"""The Databento source's capture: one live session per dataset
(:class:`~daedalus.capture.databento_collector.DatabentoCollector`), each over its own DBN
segment writer (:class:`~daedalus.sources.databento_raw.DbnSegmentWriter`, segments in
``raw/<state>/databento/<DATASET>/``); :class:`DbnRaw` drives those writers as the one raw
writer ``daedalus ingest`` expects."""

from __future__ import annotations

import contextlib
import itertools
import statistics
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from daedalus.capture.databento_collector import DatabentoCollector
from daedalus.capture.raw_writers import mb
from daedalus.config import ConfigError, DaedalusConfig
from daedalus.sources.databento_raw import SOURCE, DbnSegmentWriter, recover_dbn_active


class DbnRaw:
    """``raw format dbn``: one :class:`DbnSegmentWriter` per dataset, recovered, started,
    closed and reported together (:class:`daedalus.capture.pipeline.RawWriter`)."""

    def __init__(self, config: DaedalusConfig, clock: Callable[[], int]) -> None:
        self.layout, self.config = config.layout, config.ingestion
        self.writers = {
            dataset: DbnSegmentWriter(self.layout, dataset, config.ingestion, clock)
            for dataset in config.databento.datasets
        }
        self.writer = next(iter(self.writers.values()), None)  # tests and benches read the first's stats
        self._last_written = 0

    @property
    def error(self) -> BaseException | None:
        return next((w.error for w in self.writers.values() if w.error is not None), None)

    def recover(self, stopping: threading.Event) -> int:
        return recover_dbn_active(self.layout, stopping).write_errors

    def add_write_errors(self, count: int) -> None:
        if self.writer is not None:
            self.writer.stats.write_errors += count

    def start(self) -> None:
        for writer in self.writers.values():
            writer.start()

    def close(self, timeout: float) -> bool:
        results = [writer.close(timeout) for writer in self.writers.values()]
        return all(results)

    def _sum(self, name: str) -> int:
        return sum(getattr(w.stats, name) for w in self.writers.values())

    def heartbeat(self) -> tuple[dict[str, object], dict[str, object]]:
        counters = {
            "frames_written": self._sum("written"),
            "bytes_written": self._sum("bytes"),
            "overflow_drops": sum(w.dropped for w in self.writers.values()),
            "events_dropped": sum(w.events_dropped for w in self.writers.values()),
            "write_errors": self._sum("write_errors"),
            "flushes": self._sum("flushes"),
            "segment_rotations": self._sum("rotations"),
        }
        if self.writer is not None:
            counters["durable_latency_seconds"] = self.writer.stats.latency.to_dict()
        gauges = {
            "queue_depth": sum(w.queue_depth for w in self.writers.values()),
            "queue_capacity": self.config.queue_maxsize * max(1, len(self.writers)),
            "segment": {d: w.stats.segment or None for d, w in self.writers.items()},
            "segment_bytes": self._sum("segment_bytes"),
        }
        return counters, gauges

    def status_line(self, span: float) -> str:
        written = self._sum("written")
        rate = (written - self._last_written) / span
        self._last_written = written
        latency = sorted(ns for w in self.writers.values() for ns in w.stats.latencies_ns)
        p50 = statistics.median(latency) / 1e6 if latency else 0.0
        p99 = latency[min(len(latency) - 1, int(len(latency) * 0.99))] / 1e6 if latency else 0.0
        depth = sum(w.queue_depth for w in self.writers.values())
        segments = ",".join(w.stats.segment for w in self.writers.values() if w.stats.segment) or "-"
        unwritten = self._sum("unwritten")
        return (
            f"[writer] written={written:,} ({rate:,.0f}/s) bytes={mb(self._sum('bytes'))} queue={depth} "
            f"overflow={sum(w.dropped for w in self.writers.values()):,} flushes={self._sum('flushes'):,} "
            f"rotations={self._sum('rotations')} write_errors={self._sum('write_errors'):,} segment={segments} "
            f"latency p50={p50:.1f}ms p99={p99:.1f}ms" + (f" unwritten={unwritten:,}" if unwritten else "")
        )

    def stopped_fields(self, clean: bool) -> dict[str, object]:
        fields: dict[str, object] = {
            "written": self._sum("written"),
            "overflow": sum(w.dropped for w in self.writers.values()),
            "write_errors": self._sum("write_errors"),
        }
        if not clean:
            fields.update(
                unwritten=self._sum("unwritten"),
                unwritten_events=self._sum("unwritten_events"),
                still_queued=sum(w.queue_depth for w in self.writers.values()),
            )
        return fields


class DatabentoCapture:
    def __init__(self, config: DaedalusConfig, clock: Callable[[], int]) -> None:
        self.source = SOURCE
        self.config = config
        self.clock = clock
        self.raw = DbnRaw(config, clock)
        settings = config.databento
        conn_ids = itertools.count(1)  # one number per TCP connection of the process
        self.collectors = [
            DatabentoCollector(
                dataset,
                [s for s in settings.subscriptions if s.dataset == dataset],
                settings,
                config.ingestion,
                self.raw.writers[dataset],
                clock,
                conn_ids,
            )
            for dataset in settings.datasets
        ]
        self._last_records: dict[str, int] = {}

    def check_settings(self) -> None:
        settings = self.config.databento
        problems = []
        if not settings.subscriptions:
            problems.append("databento.subscriptions: none configured (e.g. {dataset: GLBX.MDP3, schema: mbo})")
        if not settings.api_key.get_secret_value():
            problems.append("databento.api_key: not set (e.g. api_key: ${DATABENTO_API_KEY})")
        if problems:
            raise ConfigError("databento", problems)

    def tasks(self) -> dict[str, Coroutine[Any, Any, None]]:
        return {f"databento-{c.dataset}": c.run() for c in self.collectors}

    async def stop(self) -> None:
        for collector in self.collectors:
            with contextlib.suppress(Exception):
                await collector.stop()

    def started_fields(self) -> dict[str, object]:
        subs = self.config.databento.subscriptions
        return {
            "datasets": len(self.collectors),
            "subscriptions": len(subs),
            "gateway": self.collectors[0].host if self.collectors else "-",
        }

    def heartbeat(self) -> tuple[dict[str, object], dict[str, object], dict[str, dict[str, float | None]]]:
        stats = {c.dataset: c.stats for c in self.collectors}
        watchdog = self.config.ingestion.watchdog_timeout_seconds
        ages = {d: s.last_read_age() for d, s in stats.items()}
        connected = {d: int(s.state == "connected") for d, s in stats.items()}
        failing = {
            d: int(s.state in ("auth_failed", "backoff", "failed") and bool(s.last_error)) for d, s in stats.items()
        }
        silent = [d for d in stats if connected[d] and (ages[d] is None or ages[d] > watchdog)]
        counters = {
            "frames_received": {d: s.records for d, s in stats.items()},
            "bytes_received": {d: s.bytes for d, s in stats.items()},
            "records_by_schema": {d: s.schema_counts() for d, s in stats.items()},
            "reconnects": {d: s.reconnects for d, s in stats.items()},
            "gaps": {d: s.gaps for d, s in stats.items()},
            "refills": {d: s.refills for d, s in stats.items()},
            "refills_refused": {d: s.refills_refused for d, s in stats.items()},
            "duplicates_dropped": {d: s.duplicates_dropped for d, s in stats.items()},
            "refill_before_capture": {d: s.refill_before_capture for d, s in stats.items()},
            # replayed records past the duplicate window's bound: written, though they may be duplicates
            "refill_unsure": {c.dataset: c.tracker.unsure for c in self.collectors},
            "replays_completed": {d: s.replays_completed for d, s in stats.items()},
            "gateway_heartbeats": {d: s.heartbeats for d, s in stats.items()},
            "gateway_errors": {d: s.gateway_errors for d, s in stats.items()},
            "slow_reader_warnings": {d: s.slow_reader_warnings for d, s in stats.items()},
            "skips_merged": {d: s.skips_merged for d, s in stats.items()},
            "read_pauses": {d: s.read_pauses for d, s in stats.items()},
            "errors": {d: s.errors for d, s in stats.items()},
        }
        gauges = {
            "connected": connected,
            "failing": failing,
            "state": {d: s.state for d, s in stats.items()},
            "last_error": {d: s.last_error or None for d, s in stats.items()},
            "last_frame_age_seconds": ages,
            "uptime_seconds": {d: round(s.uptime(), 3) for d, s in stats.items()},
            "watchdog_seconds": watchdog,
            "stalled": int(bool(silent) and len(silent) == sum(connected.values())),
        }
        products = {  # the configured symbols only (ALL_SYMBOLS as one): health's products(config)
            f"{dataset}:{symbol}": {"last_time": seen_ns / 1e9, "mid": None}
            for dataset, s in stats.items()
            for symbol, seen_ns in list(s.products.items())
        }
        return counters, gauges, products

    def status_lines(self, span: float) -> list[str]:
        lines = []
        for c in self.collectors:
            rate = (c.stats.records - self._last_records.get(c.dataset, 0)) / span
            self._last_records[c.dataset] = c.stats.records
            lines.append(f"{c.status_text()} ({rate:,.0f}/s)")
        return lines
