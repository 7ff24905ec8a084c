"""The two raw writers every source shares, behind the one interface ingest drives
(:class:`daedalus.capture.pipeline.RawWriter`): recovery, start, close, heartbeat counters and
the writer's line of the statistics block.

- :class:`NdjsonRaw`: :class:`~daedalus.capture.segments.SegmentWriter`, one line per record
  (verbatim frames for Coinbase, unified records for ccxt), optionally zstd-framed;
- :class:`ParquetRaw`: :class:`~daedalus.capture.record_writer.RecordWriter`, typed Arrow
  batches in directory-aligned partitions, Arrow IPC while open, Parquet once closed.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from daedalus.capture.segments import SegmentWriter, recover_active
from daedalus.config import DaedalusConfig

if TYPE_CHECKING:
    from daedalus.capture.record_writer import RecordWriter

# record_writer (pyarrow, numpy) is imported by the Parquet writer only: an NDJSON ingest
# (Coinbase) does without the ~40 MB of RSS and ~0.2 s of start-up they cost


def mb(n: float) -> str:
    return f"{n / 1e6:.1f}MB"


class NdjsonRaw:
    """``raw_format: ndjson``: rotating NDJSON segments in ``raw/<state>/<source>/``."""

    def __init__(self, config: DaedalusConfig, source: str, clock: Callable[[], int]) -> None:
        self.layout, self.source, self.config = config.layout, source, config.ingestion
        self.writer = SegmentWriter(self.layout, source, config.ingestion, clock)
        self._last_written = 0

    @property
    def error(self) -> BaseException | None:
        return self.writer.error

    def recover(self, stopping: threading.Event) -> int:
        return recover_active(self.layout, self.source, stopping).write_errors

    def add_write_errors(self, count: int) -> None:
        self.writer.stats.write_errors += count

    def start(self) -> None:
        self.writer.start()

    def close(self, timeout: float) -> bool:
        return self.writer.close(timeout)

    def heartbeat(self) -> tuple[dict[str, object], dict[str, object]]:
        w = self.writer.stats
        counters = {
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
            "queue_capacity": self.config.queue_maxsize,
            "segment": w.segment or None,
            "segment_bytes": w.segment_bytes,
        }
        return counters, gauges

    def status_line(self, span: float) -> str:
        w = self.writer.stats
        depth, cap = self.writer.queue_depth, self.config.queue_maxsize
        latency = sorted(w.latencies_ns)
        p50 = statistics.median(latency) / 1e6 if latency else 0.0
        p99 = latency[min(len(latency) - 1, int(len(latency) * 0.99))] / 1e6 if latency else 0.0
        rate = (w.written - self._last_written) / span
        self._last_written = w.written
        return (
            f"[writer] written={w.written:,} ({rate:,.0f}/s) bytes={mb(w.bytes)} "
            f"queue={depth}/{cap} ({depth / cap:.1%}) overflow={self.writer.dropped:,} "
            f"flushes={w.flushes:,} rotations={w.rotations} write_errors={w.write_errors:,} "
            f"segment={w.segment or '-'} ({mb(w.segment_bytes)}) latency p50={p50:.1f}ms p99={p99:.1f}ms"
            + (f" unwritten={w.unwritten:,}" if w.unwritten else "")
        )

    def stopped_fields(self, clean: bool) -> dict[str, object]:
        w = self.writer.stats
        fields: dict[str, object] = {"written": w.written, "overflow": self.writer.dropped,
                                     "write_errors": w.write_errors}  # fmt: skip
        if not clean:
            fields.update(unwritten=w.unwritten, unwritten_events=w.unwritten_events,
                          still_queued=self.writer.queue_depth)  # fmt: skip
        return fields


class ParquetRaw:
    """``raw_format: parquet``: unified records in ``raw/<state>/<source>/<channel>/exchange=/...``."""

    def __init__(self, config: DaedalusConfig, source: str, clock: Callable[[], int]) -> None:
        from daedalus.capture.record_writer import RecordWriter

        self.layout, self.source, self.config = config.layout, source, config.ingestion
        self.writer: RecordWriter = RecordWriter(self.layout, config.ingestion, source=source, clock=clock,
                                   max_queued_bytes=int(config.ingestion.parquet_queue_max_mb * 2**20))  # fmt: skip
        self.error: BaseException | None = None  # the record writer counts failures and goes on

    def recover(self, stopping: threading.Event) -> int:
        """Every IPC segment a killed run left becomes Parquet in ``ready/`` (no disk retries:
        an error here stops ingest, which the supervisor restarts with backoff)."""
        from daedalus.capture.record_writer import recover

        del stopping  # recovery converts what is there; it does not wait for space
        ingestion = self.config
        recover(self.layout, self.source, compression=ingestion.parquet_compression,
                compression_level=ingestion.parquet_compression_level, fsync=ingestion.fsync)  # fmt: skip
        return 0

    def add_write_errors(self, count: int) -> None:
        self.writer.stats.write_errors += count

    def start(self) -> None:
        self.writer.start()

    def close(self, timeout: float) -> bool:
        """True only when every accepted record reached a file: the writer thread finished in
        time, nothing is left queued, and no batch was lost to a failed write during the run
        (the record writer counts those and goes on, so its thread ending says nothing of them)."""
        done = self.writer.close(timeout)
        return done and self.writer.queue_depth == 0 and self.writer.stats.records_lost == 0

    def heartbeat(self) -> tuple[dict[str, object], dict[str, object]]:
        s = self.writer.snapshot()
        counters = {
            "frames_written": s["records_written"],
            "overflow_drops": s["overflow"],
            "write_errors": s["write_errors"],
            "flushes": s["flushes"],
            "segment_rotations": s["rotations"],
            "segment_evictions": s["evictions"],
            "segments_finalised": s["segments_finalised"],
            "quarantined_records": s["quarantined"],
            "records_lost": s["records_lost"],
        }
        gauges = {key: s[key] for key in ("queue_depth", "queue_capacity", "queued_bytes", "max_queued_bytes",
                                          "open_writers", "buffered_bytes")}  # fmt: skip
        return counters, gauges

    def status_line(self, span: float) -> str:
        del span  # the writer keeps its own rate clock
        return self.writer.status_line()

    def stopped_fields(self, clean: bool) -> dict[str, object]:
        s = self.writer.stats
        fields: dict[str, object] = {"written": s.records_written, "overflow": s.overflow,
                                     "write_errors": s.write_errors, "quarantined": s.quarantined}  # fmt: skip
        if not clean:
            fields.update(still_queued=self.writer.queue_depth, lost=s.records_lost)
        return fields


WRITERS: dict[str, type[NdjsonRaw] | type[ParquetRaw]] = {"ndjson": NdjsonRaw, "parquet": ParquetRaw}


def raw_writer(config: DaedalusConfig, source: str, raw_format: str, clock: Callable[[], int] = time.time_ns):
    """The raw writer of ``raw_format`` for ``source``. A format without a writer here (a new
    source's own, e.g. ``dbn``) is an error, not silently NDJSON: its bytes would be re-framed."""
    try:
        writer = WRITERS[raw_format]
    except KeyError:
        raise ValueError(f"no raw writer for raw format {raw_format!r} of source {source!r} "
                         f"(known: {', '.join(WRITERS)})") from None  # fmt: skip
    return writer(config, source, clock)
