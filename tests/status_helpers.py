"""Helpers of the status server's tests: a supervisor-like snapshot from real heartbeats, a
real ``daedalus ingest`` process, and reading /metrics back with prometheus_client's parser."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import yaml
from prometheus_client.parser import text_string_to_metric_families

from daedalus.capture.segments import LatencyHistogram
from daedalus.config import DaedalusConfig, parse_config
from daedalus.ops.records import ChildStatus, Heartbeat, SupervisorStatus, read_heartbeat
from tests.capture_helpers import ingest_config
from tests.conftest import REPO


def config_for(tmp_path: Path, ws_url: str, **ingestion: Any) -> tuple[DaedalusConfig, Path]:
    """A config for ingest against ``ws_url`` publishing heartbeats often; and its file."""
    data = ingest_config(tmp_path / "data", ws_url, **ingestion)
    data["supervisor"] = {"heartbeat_seconds": 0.2, "hang_timeout_seconds": 5}
    data["etl"] = {"poll_interval_seconds": 0.2}
    # this machine's disk is not what these tests are about
    data["health"] = {"disk_warning_free_percent": 0, "disk_critical_free_percent": 0,
                      "disk_warning_hours_left": 0, "disk_critical_hours_left": 0}  # fmt: skip
    path = tmp_path / "daedalus.yaml"
    path.write_text(yaml.safe_dump(data))
    return parse_config(data), path


def child_from(heartbeat: Heartbeat, state: str = "running", **extra: Any) -> ChildStatus:
    """The ChildStatus a supervisor would make of a live child's heartbeat."""
    try:
        rss = psutil.Process(heartbeat.pid).memory_info().rss
    except psutil.Error:
        rss = None
    fields: dict[str, Any] = {
        "name": heartbeat.child, "kind": heartbeat.kind, "source": heartbeat.source,
        "command": ["daedalus", heartbeat.kind], "state": state, "state_since": heartbeat.started_at,
        "pid": heartbeat.pid, "started_at": heartbeat.started_at, "rss_bytes": rss,
        "heartbeat_age": heartbeat.age(), "counters": heartbeat.counters, "gauges": heartbeat.gauges,
        "products": heartbeat.products,
    }  # fmt: skip
    fields.update(extra)
    return ChildStatus(**fields)


def status_of(config: DaedalusConfig, children: list[ChildStatus]) -> SupervisorStatus:
    return SupervisorStatus(pid=1, started_at=time.time() - 10, time=time.time(), data_dir=str(config.data_dir),
                            config_file="daedalus.yaml", status_url=None, children=children)  # fmt: skip


def snapshot_from_run_dir(config: DaedalusConfig) -> SupervisorStatus:
    """Every heartbeat under ``<data_dir>/run/`` as a running child."""
    children = []
    for path in sorted(config.layout.run_dir.glob("*.json")):
        if path != config.layout.supervisor_status_file and (beat := read_heartbeat(path)) is not None:
            children.append(child_from(beat))
    return status_of(config, children)


def ingest_heartbeat(frames: int = 1000, *, pid: int = 0, mids: dict[str, float] | None = None) -> Heartbeat:
    """An ingest heartbeat holding every field the ingest child publishes."""
    now = time.time()
    latency = LatencyHistogram()  # as the ingest child fills and writes it
    latency.observe_ns([(i % 50) * 1_000_000 for i in range(frames)])  # 0 to 49 ms
    mids = mids if mids is not None else {"BTC-USD": 60_000.0, "ETH-USD": 3_000.0}
    return Heartbeat(
        child="ingest-coinbase", kind="ingest", source="coinbase", pid=pid, started_at=now - 30, time=now,
        counters={
            "frames_received": {"1": frames, "2": frames // 2}, "bytes_received": {"1": frames * 300, "2": 10},
            "reconnects": {"1": 1, "2": 0}, "gaps": {"1": 2, "2": 0}, "frames_written": frames,
            "bytes_written": frames * 320, "overflow_drops": 3, "write_errors": 0, "flushes": 40,
            "segment_rotations": 2,
            "durable_latency_seconds": latency.to_dict(),
        },
        gauges={"queue_depth": 7, "queue_capacity": 10_000, "connected": {"1": 1, "2": 1},
                "last_frame_age_seconds": {"1": 0.1, "2": None}, "watchdog_seconds": 30, "stalled": 0,
                "segment": "segment_20260809T21_00003.ndjson", "segment_bytes": 12_345},
        products={p: {"last_time": now, "mid": mid} for p, mid in mids.items()},
    )  # fmt: skip


def etl_heartbeat() -> Heartbeat:
    now = time.time()
    return Heartbeat(
        child="etl", kind="etl", source="coinbase", pid=0, started_at=now - 20, time=now,
        counters={"segments_processed": 4, "bytes_processed": 1 << 20, "rows": {"ticker": 100, "level2": 900},
                  "quarantined_lines": 1, "quarantined_segments": 0},
        gauges={"busy": 0, "current_segment": None},
    )  # fmt: skip


# ---- a real ingest process ------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def daedalus_process(config_file: Path, *command: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``daedalus <command> --config F`` as a process, SIGTERMed (then killed) at the end."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daedalus", *command, "--config", str(config_file),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def wait_for(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# family name (as the parser names it: counters without _total) -> type
FAMILIES = {
    "daedalus_frames_received": "counter", "daedalus_received_bytes": "counter", "daedalus_reconnects": "counter",
    "daedalus_gaps": "counter", "daedalus_connection_up": "gauge", "daedalus_last_frame_age_seconds": "gauge",
    "daedalus_queue_depth": "gauge", "daedalus_queue_capacity": "gauge", "daedalus_overflow_drops": "counter",
    "daedalus_write_errors": "counter", "daedalus_flushes": "counter", "daedalus_segment_rotations": "counter",
    "daedalus_frames_written": "counter", "daedalus_written_bytes": "counter", "daedalus_ingest_stalled": "gauge",
    "daedalus_active_segment_bytes": "gauge", "daedalus_receive_to_durable_seconds": "histogram",
    "daedalus_backlog_files": "gauge", "daedalus_backlog_bytes": "gauge",
    "daedalus_etl_segments_processed": "counter", "daedalus_etl_processed_bytes": "counter",
    "daedalus_etl_rows": "counter", "daedalus_etl_quarantined_lines": "counter",
    "daedalus_etl_quarantined_segments": "counter", "daedalus_etl_lag_seconds": "gauge", "daedalus_etl_busy": "gauge",
    "daedalus_child_state": "gauge", "daedalus_child_restarts": "counter", "daedalus_child_memory_restarts": "counter",
    "daedalus_child_hang_restarts": "counter", "daedalus_child_rss_bytes": "gauge",
    "daedalus_child_uptime_seconds": "gauge", "daedalus_child_heartbeat_age_seconds": "gauge",
    "daedalus_disk_free_bytes": "gauge", "daedalus_disk_total_bytes": "gauge", "daedalus_data_age_seconds": "gauge",
    "daedalus_health_level": "gauge",
    "daedalus_sync_files_uploaded": "counter", "daedalus_sync_uploaded_bytes": "counter",
    "daedalus_sync_files_verified": "counter", "daedalus_sync_files_failed": "counter",
    "daedalus_sync_files_deleted": "counter", "daedalus_sync_files_retried": "counter",
    "daedalus_sync_retried_bytes": "counter", "daedalus_sync_requests_retried": "counter",
    "daedalus_sync_backlog_files": "gauge", "daedalus_sync_backlog_bytes": "gauge",
    "daedalus_sync_last_success_time": "gauge",
}  # fmt: skip


class Metrics:
    """A /metrics page as parsed by prometheus_client: ``value(sample name, **labels)``."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def samples(self, family: str) -> list[Any]:
        return self.families[family].samples

    def value(self, sample: str, **labels: str) -> float:
        family = sample.removesuffix("_total").removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
        found = [s.value for s in self.samples(family) if s.name == sample and s.labels == labels]
        assert len(found) == 1, f"{sample}{labels}: {found} in {self.samples(family)}"
        return found[0]


async def get(url: str, **headers: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, response.headers["Content-Type"], await response.text()


def assert_every_family(metrics: Metrics) -> None:
    assert {name: metrics.families[name].type for name in FAMILIES if name in metrics.families} == FAMILIES
