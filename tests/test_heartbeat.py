"""Children publish a heartbeat record with their statistics (ingest in-process against the
simulator, the ETL watcher as a real process), and remove it at a clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import yaml

from daedalus.layout import DataLayout
from daedalus.ops.records import read_heartbeat
from tests.capture_helpers import async_wait_until, ingest_config, read_records
from tests.conftest import REPO
from tests.etl_helpers import recording_lines, write_segments
from tests.test_capture_ingest import Running, subscribed


async def test_ingest_heartbeat_counts_what_the_segments_hold(make_sim, tmp_path):
    sim = await make_sim(rate=0, keep_sent=True)
    config = ingest_config(tmp_path, sim.ws_url)
    config["supervisor"] = {"heartbeat_seconds": 0.2}
    run = Running(config)
    path = DataLayout(tmp_path).heartbeat_file("ingest-coinbase")
    await subscribed(sim)
    await sim.advance(2000)
    sent = len(sim.connections[0].sent_frames)

    def caught_up() -> bool:
        beat = read_heartbeat(path)
        return beat is not None and beat.counters["frames_written"] == sent

    await async_wait_until(caught_up, what="a heartbeat counting every written frame")
    beat = read_heartbeat(path)
    assert beat is not None and beat.child == "ingest-coinbase" and beat.kind == "ingest"
    assert beat.counters["frames_received"]["1"] == sent > 2000
    assert beat.counters["flushes"] > 0 and beat.counters["write_errors"] == 0
    latency = beat.counters["durable_latency_seconds"]
    assert latency["count"] > 0 and latency["buckets"]["+Inf"] == latency["count"]
    assert beat.gauges["queue_capacity"] == 10_000 and beat.gauges["connected"] == {"1": 1}
    assert beat.gauges["stalled"] == 0
    for product in ("BTC-USD", "ETH-USD"):  # the simulator's default products, all with tickers
        seen = beat.products[product]
        assert abs(seen["last_time"] - time.time()) < 600 and seen["mid"] is not None and seen["mid"] > 0
    await run.close()
    assert not path.exists(), "a cleanly stopped ingest leaves no heartbeat behind"
    assert len([r for r in read_records(tmp_path) if "event" not in r]) == sent


async def test_etl_watcher_heartbeat_tracks_segments_and_stops_between_segments(tmp_path):
    lines = recording_lines()
    write_segments(tmp_path, [lines[:600], lines[600:1200], lines[1200:]])
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {"data_dir": str(tmp_path), "etl": {"poll_interval_seconds": 0.2}, "supervisor": {"heartbeat_seconds": 0.2}}
        )
    )
    path = DataLayout(tmp_path).heartbeat_file("etl")
    proc = subprocess.Popen(
        [sys.executable, "-m", "daedalus", "etl", "--config", str(config), "--watch"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def all_done() -> bool:
            beat = read_heartbeat(path)
            return beat is not None and beat.counters["segments_processed"] == 3 and beat.gauges["busy"] == 0

        await async_wait_until(all_done, timeout=60, what="the watcher's heartbeat counting 3 segments")
        beat = read_heartbeat(path)
        assert beat is not None and beat.pid == proc.pid and beat.kind == "etl" and beat.source == "coinbase"
        assert beat.counters["rows"]["level2"] > 0 and beat.counters["quarantined_segments"] == 0
        first = beat.time
        await async_wait_until(lambda: (read_heartbeat(path) or beat).time > first, what="a newer heartbeat while idle")
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert "segments: 3" in out
    assert not path.exists()


def test_half_written_records_of_killed_processes_are_cleaned_at_the_next_start(tmp_path):
    """A writer SIGKILLed between its write and its rename leaves ``.<name>.<pid>.tmp``; the next
    publisher (or supervisor) removes those of dead pids and leaves a live writer's alone."""
    from daedalus.ops.heartbeat import HeartbeatPublisher

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = DataLayout(tmp_path).run_dir
    run.mkdir(parents=True)
    stale = run / f".ingest-coinbase.json.{dead.pid}.tmp"
    live = run / f".etl.json.{os.getpid()}.tmp"
    for path in (stale, live):
        path.write_bytes(b'{"half": ')
    HeartbeatPublisher(DataLayout(tmp_path), child="ingest-coinbase", kind="ingest", source="coinbase",
                       every_seconds=1.0)  # fmt: skip
    assert not stale.exists() and live.exists()
