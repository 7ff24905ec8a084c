"""Prometheus metrics of a running Daedalus, and the short history behind the status page's chart.

:class:`DaedalusCollector` is a custom ``prometheus_client`` collector over the supervisor's
live snapshot (each child's heartbeat statistics, counters already added up across restarts)
and the last health report (backlog, disk, freshness). It is *not* ``prometheus_client``'s
multiprocess mode: that keeps one file per pid, which grows without bound when children are
restarted for months. Every family is always present; data that does not exist yet (no
heartbeat, no health report) gives a family without samples, never an exception.

:class:`History` keeps the last minutes of message rates and mid prices, sampled by the
status server, for the page's chart.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from daedalus.ops.health import LEVELS, HealthReport
from daedalus.ops.records import CHILD_STATES, ChildStatus, SupervisorStatus

Inputs = tuple[SupervisorStatus | None, HealthReport | None]


def number(value: Any) -> float | None:
    """A finite float, or None for anything else (a missing or malformed heartbeat field)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def per_label(value: Any) -> dict[str, float]:
    """``{label: n}`` of a nested heartbeat counter/gauge, non-numbers dropped."""
    if not isinstance(value, dict):
        return {}
    return {str(k): n for k, v in value.items() if (n := number(v)) is not None}


def source_of(child: ChildStatus) -> str:
    return child.source or "unknown"


# Ingest heartbeat counters/gauges -> families. (heartbeat key, metric name, help)
_CONNECTION_COUNTERS = (
    ("frames_received", "daedalus_frames_received", "WebSocket frames received, per source and connection."),
    ("bytes_received", "daedalus_received_bytes", "WebSocket payload bytes received, per source and connection."),
    ("reconnects", "daedalus_reconnects", "Reconnections of a connection after a disconnect or watchdog."),
    ("gaps", "daedalus_gaps", "Sequence gaps detected (missed frames), per source and connection."),
    ("errors", "daedalus_connection_errors", "Failed sessions of a connection (ccxt: per exchange)."),
)
_CONNECTION_GAUGES = (
    ("connected", "daedalus_connection_up", "1 while the connection is open and subscribed, else 0."),
    ("last_frame_age_seconds", "daedalus_last_frame_age_seconds", "Seconds since the connection's last frame."),
    ("uptime_seconds", "daedalus_connection_uptime_seconds",
     "Seconds the connection has been up (ccxt: since the exchange's collector started)."),
    ("failing", "daedalus_connection_failing", "1 while a connection (ccxt: exchange) failed and has not recovered."),
)
_SOURCE_COUNTERS = (
    ("overflow_drops", "daedalus_overflow_drops", "Frames dropped because the capture queue was full."),
    ("write_errors", "daedalus_write_errors", "Failed segment writes (e.g. disk full)."),
    ("flushes", "daedalus_flushes", "Segment flushes (write + fsync of a batch)."),
    ("segment_rotations", "daedalus_segment_rotations", "Segments closed and moved to ready/."),
    ("frames_written", "daedalus_frames_written", "Frames written durably to segments."),
    ("bytes_written", "daedalus_written_bytes", "Bytes written to segments."),
    ("segment_evictions", "daedalus_segment_evictions", "Open Parquet segments closed early (max_open_writers)."),
    ("segments_finalised", "daedalus_segments_finalised", "Parquet segments converted and moved to ready/."),
    ("quarantined_records", "daedalus_quarantined_records", "Records that did not fit their schema (quarantine/)."),
    ("records_lost", "daedalus_records_lost", "Records of a batch whose write failed."),
    ("unserialisable_records", "daedalus_unserialisable_records", "ccxt records that could not become a JSON line."),
)
_SOURCE_GAUGES = (
    ("queue_depth", "daedalus_queue_depth", "Frames waiting in the capture queue."),
    ("queue_capacity", "daedalus_queue_capacity", "Capacity of the capture queue (ingestion.queue_maxsize)."),
    ("stalled", "daedalus_ingest_stalled",
     "1 when a connected connection is silent longer than the watchdog (ccxt: every running exchange is)."),
    ("segment_bytes", "daedalus_active_segment_bytes", "Size of the open (active) segment."),
    ("open_writers", "daedalus_open_writers", "Open Parquet segments (raw_format: parquet)."),
    ("buffered_bytes", "daedalus_buffered_bytes", "Rows buffered by the Parquet writer, in bytes."),
    ("queued_bytes", "daedalus_queued_bytes", "Estimated bytes of records in the Parquet writer's queue."),
)
_ETL_COUNTERS = (
    ("segments_processed", "daedalus_etl_segments_processed", "Raw segments turned into Parquet."),
    ("bytes_processed", "daedalus_etl_processed_bytes", "Raw segment bytes processed by the ETL."),
    ("quarantined_lines", "daedalus_etl_quarantined_lines", "Raw lines the ETL could not decode (set aside)."),
    ("quarantined_segments", "daedalus_etl_quarantined_segments", "Raw segments moved to quarantine/."),
    ("l2_scanner_fallbacks", "daedalus_etl_l2_scanner_fallbacks",
     "Level2 frames the compiled scanner handed back to DuckDB."),
)
_SYNC_COUNTERS = (
    ("files_uploaded", "daedalus_sync_files_uploaded", "Files uploaded to S3 by daedalus sync."),
    ("bytes_uploaded", "daedalus_sync_uploaded_bytes", "Bytes uploaded to S3 by daedalus sync."),
    ("files_verified", "daedalus_sync_files_verified", "Uploads verified by a HEAD (size and SHA-256)."),
    ("files_failed", "daedalus_sync_files_failed", "Files whose upload or verification failed (retried next pass)."),
    ("files_deleted", "daedalus_sync_files_deleted", "Local raw archive files deleted after a verified upload."),
    ("files_retried", "daedalus_sync_files_retried", "Files with at least one S3 request retried, per pass."),
    ("bytes_retried", "daedalus_sync_retried_bytes", "Request body bytes sent again by retried S3 requests."),
    ("requests_retried", "daedalus_sync_requests_retried", "S3 requests retried (5xx, throttling, lost connection)."),
)
_SYNC_GAUGES = (
    ("backlog_files", "daedalus_sync_backlog_files", "Files the last discovery found to upload and not yet verified."),
    ("backlog_bytes", "daedalus_sync_backlog_bytes", "Bytes of those files."),
    ("last_success_time", "daedalus_sync_last_success_time", "Unix time of the last pass without a failure."),
)
LATENCY = "daedalus_receive_to_durable_seconds"


class DaedalusCollector(Collector):
    """Families over ``inputs()``: the supervisor snapshot and the health report to expose.

    ``inputs`` is called once per scrape from the thread that runs :func:`generate_latest`;
    the status server hands it values it took on the event loop, so nothing here blocks.
    """

    def __init__(self, inputs: Callable[[], Inputs]) -> None:
        self.inputs = inputs

    def collect(self) -> Iterator[Metric]:
        status, health = self.inputs()
        children = list(status.children) if status is not None else []
        yield from self._children(children, time.time() if status is None else status.time)
        ingest = [c for c in children if c.kind == "ingest"]
        yield from self._ingest(ingest)
        yield from self._etl([c for c in children if c.kind == "etl"], health)
        yield from self._sync([c for c in children if c.kind == "sync"])
        yield from self._health(health)

    # ---- per child ----------------------------------------------------------------------------
    def _children(self, children: list[ChildStatus], now: float) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "daedalus_child_state", "1 for the child's current state, 0 for the others.", labels=["child", "state"]
        )
        restarts = CounterMetricFamily(
            "daedalus_child_restarts", "Starts of a child after its first.", labels=["child"]
        )
        memory = CounterMetricFamily(
            "daedalus_child_memory_restarts", "Restarts forced by memory_critical_mb.", labels=["child"]
        )
        hang = CounterMetricFamily(
            "daedalus_child_hang_restarts", "Restarts of a hung child (stale heartbeat).", labels=["child"]
        )
        rss = GaugeMetricFamily(
            "daedalus_child_rss_bytes", "Resident memory of the child and its descendants.", labels=["child"]
        )
        uptime = GaugeMetricFamily(
            "daedalus_child_uptime_seconds", "Seconds since the child started.", labels=["child"]
        )
        age = GaugeMetricFamily(
            "daedalus_child_heartbeat_age_seconds", "Seconds since the child's last heartbeat.", labels=["child"]
        )
        for child in children:
            for name in CHILD_STATES:
                state.add_metric([child.name, name], 1.0 if child.state == name else 0.0)
            restarts.add_metric([child.name], number(child.restarts) or 0.0)
            memory.add_metric([child.name], number(child.memory_restarts) or 0.0)
            hang.add_metric([child.name], number(child.hang_restarts) or 0.0)
            if (value := number(child.rss_bytes)) is not None:
                rss.add_metric([child.name], value)
            if (value := child.uptime(now)) is not None:
                uptime.add_metric([child.name], value)
            if (value := number(child.heartbeat_age)) is not None:
                age.add_metric([child.name], value)
        yield from (state, restarts, memory, hang, rss, uptime, age)

    # ---- capture ------------------------------------------------------------------------------
    def _ingest(self, children: list[ChildStatus]) -> Iterator[Metric]:
        for key, name, doc in _CONNECTION_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["source", "connection"])
            for child in children:
                for conn, value in sorted(per_label(child.counters.get(key)).items()):
                    family.add_metric([source_of(child), conn], value)
            yield family
        for key, name, doc in _CONNECTION_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["source", "connection"])
            for child in children:
                for conn, value in sorted(per_label(child.gauges.get(key)).items()):
                    family.add_metric([source_of(child), conn], value)
            yield family
        yield from _per_source(children, "counters", _SOURCE_COUNTERS, CounterMetricFamily)
        yield from _per_source(children, "gauges", _SOURCE_GAUGES, GaugeMetricFamily)
        latency = HistogramMetricFamily(
            LATENCY, "Seconds from a frame's arrival to its fsync in a segment.", labels=["source"]
        )
        for child in children:
            histogram = histogram_of(child.counters.get("durable_latency_seconds"))
            if histogram is not None:
                buckets, total = histogram
                latency.add_metric([source_of(child)], buckets, total)
        yield latency

    # ---- ETL ----------------------------------------------------------------------------------
    def _sync(self, children: list[ChildStatus]) -> Iterator[Metric]:
        for key, name, doc in _SYNC_COUNTERS:
            family = CounterMetricFamily(name, doc)
            for child in children:
                if (value := number(child.counters.get(key))) is not None:
                    family.add_metric([], value)
            yield family
        for key, name, doc in _SYNC_GAUGES:
            gauge = GaugeMetricFamily(name, doc)
            for child in children:
                if (value := number(child.gauges.get(key))) is not None:
                    gauge.add_metric([], value)
            yield gauge

    def _etl(self, children: list[ChildStatus], health: HealthReport | None) -> Iterator[Metric]:
        yield from _per_source(children, "counters", _ETL_COUNTERS, CounterMetricFamily)
        rows = CounterMetricFamily(
            "daedalus_etl_rows", "Rows written to Parquet by the ETL, per channel.", labels=["source", "channel"]
        )
        for child in children:
            for channel, value in sorted(per_label(child.counters.get("rows")).items()):
                rows.add_metric([source_of(child), channel], value)
        yield rows
        busy = GaugeMetricFamily("daedalus_etl_busy", "1 while the ETL works on a segment.", labels=["source"])
        for child in children:
            if (value := number(child.gauges.get("busy"))) is not None:
                busy.add_metric([source_of(child)], value)
        yield busy
        lag = GaugeMetricFamily(
            "daedalus_etl_lag_seconds", "Age of the oldest segment waiting in ready/ (0 when none).", labels=["source"]
        )
        for source, data in sorted((health.sources if health else {}).items()):
            lag.add_metric([source], etl_lag(data))
        yield lag

    # ---- health: backlog, disk, freshness -----------------------------------------------------
    def _health(self, health: HealthReport | None) -> Iterator[Metric]:
        files = GaugeMetricFamily(
            "daedalus_backlog_files", "Raw segment files per state directory.", labels=["source", "state"]
        )
        size = GaugeMetricFamily(
            "daedalus_backlog_bytes", "Bytes of raw segment files per state directory.", labels=["source", "state"]
        )
        for source, data in sorted((health.sources if health else {}).items()):
            states = data.get("states") if isinstance(data, dict) else None
            for state, counts in sorted((states or {}).items()):
                if not isinstance(counts, dict):
                    continue
                files.add_metric([source, state], number(counts.get("files")) or 0.0)
                size.add_metric([source, state], number(counts.get("bytes")) or 0.0)
        yield files
        yield size
        disk = health.disk if health else {}
        free = GaugeMetricFamily("daedalus_disk_free_bytes", "Free bytes on the data directory's filesystem.")
        total = GaugeMetricFamily("daedalus_disk_total_bytes", "Size of the data directory's filesystem.")
        if (value := number(disk.get("free_bytes"))) is not None:
            free.add_metric([], value)
        if (value := number(disk.get("total_bytes"))) is not None:
            total.add_metric([], value)
        yield free
        yield total
        fresh = GaugeMetricFamily(
            "daedalus_data_age_seconds", "Age of the newest captured record per product.", labels=["source", "product"]
        )
        for key, data in sorted((health.freshness if health else {}).items()):
            if isinstance(data, dict) and (value := number(data.get("age_seconds"))) is not None:
                fresh.add_metric([str(data.get("source") or "unknown"), str(data.get("product") or key)], value)
        yield fresh
        level = GaugeMetricFamily("daedalus_health_level", "Health verdict: 0 ok, 1 warning, 2 critical.")
        if health is not None and health.level in LEVELS:
            level.add_metric([], float(LEVELS.index(health.level)))
        yield level


def _per_source(
    children: list[ChildStatus],
    where: str,
    table: Iterable[tuple[str, str, str]],
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
) -> Iterator[Metric]:
    """One family per ``table`` row with a sample per child's source (flat heartbeat values)."""
    for key, name, doc in table:
        family = kind(name, doc, labels=["source"])
        for child in children:
            if (value := number(getattr(child, where).get(key))) is not None:
                family.add_metric([source_of(child)], value)
        yield family


def histogram_of(value: Any) -> tuple[list[tuple[str, float]], float] | None:
    """``(buckets, sum)`` of a heartbeat histogram (``{"buckets": {le: cumulative}, "sum", "count"}``),
    buckets in ascending order ending with ``+Inf``; None when it is missing or malformed
    (a bound that is not a number, counts that are not cumulative), as a scraper would
    reject the whole page over one bad histogram.

    Bounds are written as Prometheus writes them (``1.0``, not the heartbeat's ``1``), so a
    series keeps its ``le`` label whatever the child's formatting."""
    if not isinstance(value, dict) or not isinstance(value.get("buckets"), dict):
        return None
    buckets: dict[float, float] = {}
    for bound, count in value["buckets"].items():
        try:
            upper = float(bound)
        except (TypeError, ValueError):
            return None
        if math.isnan(upper) or upper in buckets or (n := number(count)) is None:
            return None
        buckets[upper] = n
    if math.inf not in buckets:
        buckets[math.inf] = number(value.get("count")) or max(buckets.values(), default=0.0)
    ordered = sorted(buckets.items())
    counts = [n for _, n in ordered]
    if counts != sorted(counts):
        return None
    return [(floatToGoString(upper), n) for upper, n in ordered], number(value.get("sum")) or 0.0


def etl_lag(source: Any) -> float:
    """Age of the oldest ready segment of a health ``sources`` entry (its backlog's age), 0 when none waits."""
    backlog = source.get("backlog") if isinstance(source, dict) else None
    age = number(backlog.get("oldest_age_seconds")) if isinstance(backlog, dict) else None
    return 0.0 if age is None else age


def frames_by_source(children: Iterable[ChildStatus]) -> dict[str, float]:
    """Frames received per source, summed over connections and the source's ingest children."""
    frames: dict[str, float] = {}
    for child in children:
        if child.kind == "ingest":
            received = sum(per_label(child.counters.get("frames_received")).values())
            frames[source_of(child)] = frames.get(source_of(child), 0.0) + received
    return frames


# ---- history for the chart ----------------------------------------------------------------------
SAME_HEARTBEAT_SECONDS = 0.05  # two readings of one heartbeat differ by its age's rounding, never this much


@dataclass
class _Reading:
    """The last heartbeat seen of a source's ingest: when it was written, its frame count,
    and the rate it gave."""

    beat_time: float
    frames: float
    rate: float | None = None


@dataclass
class History:
    """The last ``seconds`` of samples: per source the message rate, per product the mid.

    A rate is the growth of ``frames_received`` (over connections and ingest children of the
    source) between two *heartbeats*, over the time between them as the child wrote them: the
    sampler and the children's heartbeats tick at about the same period but not in step, so
    growth per sampler tick would read 0 for a tick that saw no new heartbeat and twice the
    rate for the next. A sample that sees the same heartbeat again repeats its rate while
    that heartbeat is fresher than ``stale_seconds`` (no rate after, a gap in the chart). A
    counter that went down means a child restarted with fresh counters: its value is the growth.
    """

    seconds: float = 600.0
    interval: float = 2.0
    stale_seconds: float = 8.0
    samples: deque[dict[str, Any]] = field(default_factory=deque)
    _last: dict[str, _Reading] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.samples = deque(maxlen=max(2, math.ceil(self.seconds / self.interval)))

    def add(self, status: SupervisorStatus | None, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        children = list(status.children) if status is not None else []
        rates: dict[str, float] = {}
        beats = _beat_times(children, status.time) if status is not None else {}
        for source, frames in frames_by_source(children).items():
            if (beat := beats.get(source)) is not None and (rate := self._rate(source, *beat, frames)) is not None:
                rates[source] = rate
        self.samples.append({"time": now, "rates": rates, "mids": _mids(children)})

    def _rate(self, source: str, beat_time: float, beat_age: float, frames: float) -> float | None:
        last = self._last.get(source)
        if last is not None and abs(beat_time - last.beat_time) < SAME_HEARTBEAT_SECONDS:
            return last.rate if beat_age <= self.stale_seconds else None
        rate = None
        if last is not None and beat_time > last.beat_time:
            rate = (frames - last.frames if frames >= last.frames else frames) / (beat_time - last.beat_time)
        self._last[source] = _Reading(beat_time, frames, rate)
        return rate

    def to_dict(self) -> dict[str, Any]:
        return {"interval_seconds": self.interval, "samples": list(self.samples)}

    def latest_rates(self) -> dict[str, float]:
        return dict(self.samples[-1]["rates"]) if self.samples else {}


def _beat_times(children: list[ChildStatus], now: float) -> dict[str, tuple[float, float]]:
    """``{source: (time, age)}`` of the newest heartbeat among a source's ingest children."""
    beats: dict[str, tuple[float, float]] = {}
    for child in children:
        if child.kind == "ingest" and (age := number(child.heartbeat_age)) is not None:
            source = source_of(child)
            if source not in beats or now - age > beats[source][0]:
                beats[source] = (now - age, age)
    return beats


def _mids(children: list[ChildStatus]) -> dict[str, float]:
    """The last mid price per product the children report."""
    mids: dict[str, float] = {}
    for child in children:
        for product, data in (child.products or {}).items():
            if isinstance(data, dict) and (mid := number(data.get("mid"))) is not None:
                mids[str(product)] = mid
    return mids
