"""``daedalus sync`` through a server outage, and what it counts: retried requests/files/bytes
and the backlog, in the summary, the heartbeat and the Prometheus metrics.

The outage is a :class:`FaultProxy` that goes down (its port closed: connections refused, and
kept-alive connections cut) in front of moto's server, which keeps its data meanwhile."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from daedalus.config import DaedalusConfig, SupervisorConfig, SyncConfig
from daedalus.layout import DataLayout
from daedalus.ops.metrics import DaedalusCollector
from daedalus.ops.records import ChildStatus
from daedalus.sync.command import SyncHeartbeat, run_passes, summary_text
from daedalus.sync.engine import SyncPass, SyncSummary
from daedalus.sync.s3 import make_client
from tests.capture_helpers import events
from tests.s3_faults import FaultProxy
from tests.s3_server import BUCKET, KEY_ID, REGION, SECRET, S3Server
from tests.status_helpers import Metrics, status_of

PREFIX = "pi-1/daedalus"
MIB = 1024 * 1024
PART = 5 * MIB
DEADLINE = 60.0


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def config_for(root: Path, endpoint: str, **sync: object) -> DaedalusConfig:
    values: dict[str, object] = {"enabled": True, "destination": f"s3://{BUCKET}/{PREFIX}", "endpoint_url": endpoint,
                                 "region": REGION, "access_key_id": KEY_ID, "secret_access_key": SECRET}  # fmt: skip
    values.update(sync)
    return DaedalusConfig(data_dir=root, sync=SyncConfig(**values),  # type: ignore[arg-type]
                          supervisor=SupervisorConfig(heartbeat_seconds=0.1))  # fmt: skip


def archive_tree(root: Path) -> dict[str, bytes]:
    """Raw archive segments: a multipart one (3 parts) and small ones; ``{rel: content}``."""
    archive = DataLayout(root).archive("coinbase")
    files = {archive / "segment_20260809T21_00001.ndjson": os.urandom(2 * PART + 1234)}
    for n in range(2, 6):
        files[archive / f"segment_20260809T21_{n:05d}.ndjson"] = os.urandom(20_000 + n)
    for path, data in files.items():
        write(path, data)
    return {path.relative_to(root).as_posix(): data for path, data in files.items()}


def verified_in_bucket(server: S3Server, rel: str, data: bytes) -> bool:
    """The object is there with our size and SHA-256 (asked of moto directly, not the proxy)."""
    try:
        head = server.client().head_object(Bucket=BUCKET, Key=f"{PREFIX}/{rel}")
    except Exception:
        return False
    return head["ContentLength"] == len(data) and head["Metadata"].get("sha256") == hashlib.sha256(data).hexdigest()


def wait_for(condition: Callable[[], bool], what: str, alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert alive(), f"gave up waiting for {what}: the sync is over"
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE}s"
        time.sleep(0.02)


def count_failed_attempts(client: Any) -> list[int]:
    """``[n]``: attempts of this client that met no answer (refused or cut connections)."""
    seen = [0]

    def on_attempt(caught_exception: BaseException | None = None, **_: Any) -> None:
        if caught_exception is not None:
            seen[0] += 1

    client.meta.events.register_first("needs-retry.s3", on_attempt)
    return seen


def test_a_pass_rides_out_a_server_outage_and_deletes_only_verified_files(tmp_path: Path,
                                                                          s3_server: S3Server) -> None:  # fmt: skip
    """The server goes away mid-pass (after a few requests: preflight, listing, the multipart
    upload's creation), refuses connections while botocore retries, and comes back: the same
    pass completes, every object verifies, and no local file went before its object verified.
    With retries off (``max_attempts=1``) this pass fails."""
    root = tmp_path / "data"
    files = archive_tree(root)
    with FaultProxy(s3_server.endpoint) as proxy:
        config = config_for(root, proxy.url, delete_after_upload=True, max_concurrency=2)
        client = make_client(config.sync)
        failed_attempts = count_failed_attempts(client)
        proxy.faults.down_at_request = 5  # mid-pass: parts and small files are on their way
        sync_pass = SyncPass(config, client, multipart_threshold=PART, multipart_chunksize=PART)
        result: list[SyncSummary] = []
        worker = threading.Thread(target=lambda: result.append(sync_pass.run()), daemon=True)
        worker.start()
        wait_for(lambda: proxy.faults.down, "outage")
        # refused for a while: several attempts (each a backoff of botocore's) met a closed port
        wait_for(lambda: failed_attempts[0] >= 4, "refused attempts", alive=worker.is_alive)
        gone = [rel for rel in files if not (root / rel).exists()]
        assert all(verified_in_bucket(s3_server, rel, files[rel]) for rel in gone)  # deleted only if verified
        proxy.up()
        worker.join(DEADLINE)
    assert not worker.is_alive()
    (summary,) = result
    assert summary.failed == 0 and not summary.unavailable, summary.errors
    assert summary.verified == summary.files_uploaded == len(files) and summary.deleted == len(files)
    assert summary.requests_retried >= failed_attempts[0] >= 4
    assert summary.files_retried >= 1 and summary.backlog_files == 0 and summary.backlog_bytes == 0
    assert all(verified_in_bucket(s3_server, rel, data) for rel, data in files.items())
    assert not any((root / rel).exists() for rel in files)
    assert s3_server.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


def test_an_outage_longer_than_the_retry_budget_fails_the_pass_and_the_next_pass_recovers(
    tmp_path: Path, s3_server: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Continuous mode with the server down past botocore's retries (a budget of 2 retries here,
    8 in production): the pass ends early and cleanly (every file counted failed, an error event,
    the backlog still all there, nothing deleted, no exception), the loop goes on, and once the
    server is back a later pass uploads and verifies everything."""
    caplog.set_level(logging.INFO)
    root = tmp_path / "data"
    files = archive_tree(root)
    total = sum(len(data) for data in files.values())
    with FaultProxy(s3_server.endpoint) as proxy:
        config = config_for(root, proxy.url, delete_after_upload=True)
        client = make_client(config.sync, max_attempts=2)
        proxy.down()
        stop = threading.Event()
        outcome: list[bool] = []
        with SyncHeartbeat(config) as heartbeat:

            def loop() -> None:
                outcome.append(run_passes(config, client, heartbeat, stop, once=False, dry_run=False,
                                          include_ready=False, wait=0.05, progress=False))  # fmt: skip

            worker = threading.Thread(target=loop, daemon=True)
            worker.start()
            wait_for(lambda: heartbeat.last is not None, "a first pass", alive=worker.is_alive)
            first = heartbeat.last
            assert first is not None and first.unavailable and first.failed == len(files) and first.verified == 0
            assert heartbeat.stats()["gauges"]["backlog_files"] == len(files)
            assert heartbeat.stats()["gauges"]["backlog_bytes"] == total
            assert heartbeat.last_success is None
            assert all((root / rel).exists() for rel in files)  # nothing deleted unverified
            assert "files not tried: the server did not answer" in first.errors[0]
            assert "stopped early: the server did not answer" in summary_text(first, dry_run=False)
            proxy.up()
            wait_for(lambda: heartbeat.done["files_verified"] == len(files), "the files verified", worker.is_alive)
            stop.set()
            worker.join(DEADLINE)
            stats = heartbeat.stats()
    assert outcome == [False]  # the loop ended on a good pass, without an exception
    assert stats["counters"]["files_failed"] >= len(files) and stats["counters"]["files_verified"] == len(files)
    assert stats["gauges"]["backlog_files"] == 0 and stats["gauges"]["last_success_time"] is not None
    assert all(verified_in_bucket(s3_server, rel, data) for rel, data in files.items())
    assert not any((root / rel).exists() for rel in files)
    unavailable = events(caplog, "sync_server_unavailable")
    assert unavailable and all(SECRET not in str(e) and KEY_ID not in str(e) for e in unavailable)
    assert next(r.levelno for r in caplog.records if r.getMessage() == "sync_pass_failed") == logging.ERROR


def test_retried_requests_files_and_bytes_are_counted_exactly(tmp_path: Path, s3_server: S3Server) -> None:
    """Counted from botocore's own attempt numbers: a small file's PutObject (through s3transfer)
    answered 500 twice, then a multipart upload's part 2 answered 500 once."""
    root = tmp_path / "data"
    archive = DataLayout(root).archive("coinbase")
    small = write(archive / "segment_20260809T21_00001.ndjson", b"x" * 1000)
    with FaultProxy(s3_server.endpoint) as proxy:
        config = config_for(root, proxy.url, max_concurrency=1)
        client = make_client(config.sync)
        proxy.faults.fail_match, proxy.faults.fail_next = r"^PUT /", 2
        first = SyncPass(config, client, multipart_threshold=PART, multipart_chunksize=PART).run()
        assert first.failed == 0 and first.verified == 1 and proxy.faults.failed == 2
        assert (first.requests_retried, first.files_retried, first.bytes_retried) == (2, 1, 2 * small.stat().st_size)
        big = write(archive / "segment_20260809T21_00002.ndjson", os.urandom(PART + 777))
        proxy.faults.fail_match, proxy.faults.fail_next = r"[?&]partNumber=2(&|$)", 1
        second = SyncPass(config, client, multipart_threshold=PART, multipart_chunksize=PART).run()
        assert second.failed == 0 and second.verified == 1 and proxy.faults.failed == 3
        assert (second.requests_retried, second.files_retried, second.bytes_retried) == (1, 1, 777)
        assert second.bytes_uploaded == big.stat().st_size  # what went up once, retries aside
    line = summary_text(first, dry_run=False)
    assert "retried 1 files (0.0 MB sent again, 2 requests retried), backlog 0 files (0.0 MB)" in line


def test_backlog_and_retries_reach_the_heartbeat_and_the_metrics(tmp_path: Path, s3_server: S3Server) -> None:
    """A dry run's backlog is everything; a pass's backlog ends at what failed. The heartbeat
    (run/sync.json) carries both, and /metrics exposes them as daedalus_sync_* families."""
    root = tmp_path / "data"
    files = archive_tree(root)
    config = config_for(root, s3_server.endpoint)
    dry = SyncPass(config, s3_server.client(), dry_run=True).run()
    assert (dry.backlog_files, dry.backlog_bytes) == (len(files), sum(map(len, files.values())))
    assert (dry.pending_files, dry.pending_bytes) == (dry.backlog_files, dry.backlog_bytes)

    with FaultProxy(s3_server.endpoint) as proxy:
        config = config_for(root, proxy.url, max_concurrency=1)
        with SyncHeartbeat(config) as heartbeat:
            proxy.faults.fail_match, proxy.faults.fail_next = r"^PUT /.*_00005\.ndjson", 3  # 1 attempt + 2 retries
            failed = run_passes(config, make_client(config.sync, max_attempts=2), heartbeat, threading.Event(),
                                once=True, dry_run=False, include_ready=False, wait=1, progress=False)  # fmt: skip
            stats = heartbeat.stats()
    assert failed and heartbeat.last is not None and heartbeat.last.failed == 1
    assert stats["counters"]["requests_retried"] == 2 and stats["counters"]["files_retried"] == 1
    assert stats["counters"]["bytes_retried"] == 2 * len(files["raw/archive/coinbase/segment_20260809T21_00005.ndjson"])
    assert stats["gauges"]["backlog_files"] == 1
    assert stats["gauges"]["backlog_bytes"] == len(files["raw/archive/coinbase/segment_20260809T21_00005.ndjson"])
    heartbeat.current = SyncSummary()  # the next pass, before its discovery: no dip to 0
    assert heartbeat.stats()["gauges"]["backlog_files"] == 1 and heartbeat.stats()["gauges"]["busy"] == 1

    child = ChildStatus(name="sync", kind="sync", source=None, command=["daedalus", "sync"], state="running",
                        state_since=time.time(), counters=stats["counters"], gauges=stats["gauges"])  # fmt: skip
    registry = CollectorRegistry()
    registry.register(DaedalusCollector(lambda: (status_of(config, [child]), None)))
    metrics = Metrics(generate_latest(registry).decode())
    assert metrics.value("daedalus_sync_requests_retried_total") == 2
    assert metrics.value("daedalus_sync_files_retried_total") == 1
    assert metrics.value("daedalus_sync_retried_bytes_total") == stats["counters"]["bytes_retried"]
    assert metrics.value("daedalus_sync_backlog_files") == 1
    assert metrics.value("daedalus_sync_backlog_bytes") == stats["gauges"]["backlog_bytes"]
    assert metrics.value("daedalus_sync_files_failed_total") == 1
    assert metrics.families["daedalus_sync_backlog_files"].type == "gauge"
    assert metrics.families["daedalus_sync_requests_retried"].type == "counter"
    # no heartbeat yet: the families are there, without samples
    registry = CollectorRegistry()
    registry.register(DaedalusCollector(lambda: (status_of(config, []), None)))
    empty = Metrics(generate_latest(registry).decode())
    assert "daedalus_sync_backlog_files" in empty.families and empty.samples("daedalus_sync_backlog_files") == []
