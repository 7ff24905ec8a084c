"""Issue 8 item 14, start-up recovery on a failing disk: ingest started on a full disk with
leftovers in ``active/`` waits for space instead of dying with a traceback, quarantines
each torn tail exactly once, never half moves a segment, and stops cleanly on SIGTERM.
Real files, a real simulator on loopback, a real process for the signal; the full disk is
ENOSPC injected into the capture module's own write_all and fsync (tests/capture_helpers)."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from daedalus.capture import segments
from daedalus.capture.pipeline import IngestPipeline
from daedalus.capture.records import frame_line
from daedalus.capture.segments import RecoveryInterrupted, recover_active
from daedalus.config import parse_config
from daedalus.layout import DataLayout
from tests.capture_helpers import FullDisk, async_wait_until, events, frame, frame_bytes, ingest_config, segment_files
from tests.conftest import REPO

T21 = 1_786_309_200_000_000_000  # 2026-08-09T21:00:00Z
LEFTOVER = "segment_20260809T21_00001.ndjson"


def torn_segment(tmp_path: Path, records: int = 20) -> tuple[bytes, bytes]:
    """A segment left in ``active/`` by a crash: ``records`` whole lines and half of one more."""
    whole = b"".join(frame_line(T21 + i, 1, frame(i)) for i in range(records))
    tail = frame_line(T21 + records, 1, frame(records))[:30]
    active = DataLayout(tmp_path).active("coinbase")
    active.mkdir(parents=True, exist_ok=True)
    (active / LEFTOVER).write_bytes(whole + tail)
    return whole, tail


def quarantined(tmp_path: Path) -> list[Path]:
    folder = DataLayout(tmp_path).quarantine("coinbase")
    return sorted(folder.iterdir()) if folder.exists() else []


async def capture_then_stop(sim, pipeline: IngestPipeline, frames: int, stop: asyncio.Event, task: asyncio.Task):
    """Once capture starts: ``frames`` market frames, all written, then a clean stop."""
    await async_wait_until(lambda: sim.connections and len(sim.connections[0].subs) == 4, what="capture to start")
    await sim.advance(frames)
    collector = pipeline.collectors[0]
    await async_wait_until(lambda: pipeline.writer.stats.written == collector.stats.messages >= frames, what="frames")
    stop.set()
    await asyncio.wait_for(task, 15)


async def test_ingest_waits_for_space_to_recover_then_captures(make_sim, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    whole, tail = torn_segment(tmp_path)
    disk = FullDisk(monkeypatch)
    sim = await make_sim(rate=0, keep_sent=True)
    pipeline = IngestPipeline(parse_config(ingest_config(tmp_path, sim.ws_url, flush_interval_seconds=0.05)))
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop, out=io.StringIO()))
    await async_wait_until(lambda: disk.failures >= 3 or task.done(), what="recovery retries on the full disk")
    assert not task.done()  # alive, retrying
    assert not sim.connections  # nothing captured before the leftovers are recovered
    assert (DataLayout(tmp_path).active("coinbase") / LEFTOVER).exists()
    assert len(events(caplog, "recovery_write_failed")) == 1  # the first failure, not one per retry

    disk.full = False  # space comes back
    await capture_then_stop(sim, pipeline, 50, stop, task)

    assert not pipeline.failed
    assert pipeline.writer.stats.write_errors >= 3  # the failed recovery attempts are counted
    ready = {path.name: path for path in segment_files(tmp_path)}
    assert ready.pop(LEFTOVER).read_bytes() == whole  # the complete records, byte-exact
    assert frame_bytes(tmp_path)[20:] == sim.closed_connections[0].sent_frames  # then the new capture
    (torn,) = quarantined(tmp_path)  # exactly once, though the first attempts wrote part of it
    assert torn.name.startswith(f"{LEFTOVER}.tail-") and torn.read_bytes() == tail
    assert not segment_files(tmp_path, "active")
    assert events(caplog, "recovery_write_recovered")[0]["segment"] == LEFTOVER


def test_every_disk_step_fails_once_and_each_tail_is_still_quarantined_once(tmp_path, monkeypatch):
    """Space comes and goes: each retry finds the work of the last one and goes on from there."""
    whole, tail = torn_segment(tmp_path)
    middle = DataLayout(tmp_path).active("coinbase") / "segment_20260809T21_00002.ndjson"
    first = whole.index(b"\n") + 1
    middle.write_bytes(whole[:first] + b"\x00garbage\n" + whole[first:])  # a bad line inside: rewritten
    real_fsync, real_rename = os.fsync, os.rename
    failed: set[object] = set()

    def fail_once(key: object) -> None:
        if key not in failed:
            failed.add(key)
            raise OSError(errno.ENOSPC, "No space left on device")

    def fsync(fd: int) -> None:
        fail_once(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: object, dst: object) -> None:
        fail_once(("rename", str(dst)))
        real_rename(src, dst)

    monkeypatch.setattr(segments, "fsync", fsync)
    monkeypatch.setattr(segments.os, "rename", rename)
    monkeypatch.setattr(segments, "retry_pause", lambda failures: 0.0)
    report = recover_active(DataLayout(tmp_path), "coinbase")
    monkeypatch.undo()

    assert report.segments == 2 and report.records_kept == 40 and report.write_errors > 2
    ready = {path.name: path.read_bytes() for path in segment_files(tmp_path)}
    assert ready == {LEFTOVER: whole, middle.name: whole}
    tails = sorted(path.read_bytes() for path in quarantined(tmp_path))
    assert tails == sorted([tail, b"\x00garbage\n"])
    assert not list(DataLayout(tmp_path).active("coinbase").iterdir())  # no .tmp left either


def test_a_tail_quarantined_by_a_run_that_died_before_the_cut_is_not_copied_again(tmp_path):
    whole, tail = torn_segment(tmp_path)
    folder = DataLayout(tmp_path).quarantine("coinbase")
    folder.mkdir(parents=True)
    (folder / f"{LEFTOVER}.tail-1").write_bytes(tail)  # written, then SIGKILL before the cut
    (folder / f"{LEFTOVER}.tail-2.partial").write_bytes(tail[:5])  # SIGKILL while writing
    report = recover_active(DataLayout(tmp_path), "coinbase")
    assert report.quarantined == [f"{LEFTOVER}.tail-1"]
    assert [path.name for path in quarantined(tmp_path)] == [f"{LEFTOVER}.tail-1"]
    assert segment_files(tmp_path)[0].read_bytes() == whole


def test_recovery_stops_when_asked_and_leaves_the_segment_whole(tmp_path, monkeypatch, caplog):
    whole, tail = torn_segment(tmp_path)
    disk = FullDisk(monkeypatch)
    stopping = threading.Event()
    result: list[BaseException] = []

    def run() -> None:
        try:
            recover_active(DataLayout(tmp_path), "coinbase", stopping)
        except BaseException as exc:  # handed to the test thread
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 10
    while disk.failures < 2:
        assert time.monotonic() < deadline, "timed out waiting for recovery retries"
        time.sleep(0.01)
    stopping.set()
    thread.join(10)
    assert not thread.is_alive()
    (error,) = result
    assert isinstance(error, RecoveryInterrupted) and error.segment == LEFTOVER
    assert error.error == "No space left on device"
    assert (DataLayout(tmp_path).active("coinbase") / LEFTOVER).read_bytes() == whole + tail
    assert not quarantined(tmp_path)  # no half-written copy of the tail


def test_sigterm_while_the_disk_is_full_stops_ingest_with_one_clear_line(tmp_path):
    """A real ``daedalus ingest`` process whose fsync fails with ENOSPC (patched in a tiny
    launcher), stopped by SIGTERM while recovery is still waiting for space."""
    whole, tail = torn_segment(tmp_path / "data")
    config = tmp_path / "ingest.yaml"
    config.write_text(yaml.safe_dump(ingest_config(tmp_path / "data", "ws://127.0.0.1:9/ws")))
    launcher = (
        "import errno, os, sys\n"
        "def full(fd):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "os.fsync = full\n"
        "from daedalus.cli import app\n"
        "sys.argv = ['daedalus', 'ingest', '--config', sys.argv[1]]\n"
        "app()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    lines: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:  # the process logs to stderr; wait for it to be retrying
        lines.append(line)
        if "recovery_write_failed" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    err = "".join(lines) + err
    assert proc.returncode == 1, err  # stopped before doing its job: not a clean run
    assert "Traceback" not in err
    (interrupted,) = [line for line in err.splitlines() if "recovery_interrupted" in line]
    assert LEFTOVER in interrupted and "No space left on device" in interrupted
    assert "ingest_started" not in err  # nothing was captured meanwhile
    (stopped,) = [line for line in err.splitlines() if "ingest_stopped" in line]
    assert "clean=False" in stopped and "write_errors=0" not in stopped
    assert (DataLayout(tmp_path / "data").active("coinbase") / LEFTOVER).read_bytes() == whole + tail
    assert not quarantined(tmp_path / "data")


# -- review findings: the run's total on interruption, errors waiting cannot cure, a failed fsync --


class PerSegmentDisk:
    """fsync of a file named after ``segment_..._00001`` fails ``first`` times, then works;
    of one named after ``..._00002`` it always fails. ``failures`` counts them by segment."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, first: int) -> None:
        self.failures = {"00001": 0, "00002": 0}
        real_fsync = segments.fsync

        def fsync(fd: int) -> None:
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            for counter in self.failures:
                if f"_{counter}." in name and (counter == "00002" or self.failures[counter] < first):
                    self.failures[counter] += 1
                    raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(fd)

        monkeypatch.setattr(segments, "fsync", fsync)
        monkeypatch.setattr(segments, "retry_pause", lambda failures: 0.01)


async def test_an_interrupted_recovery_counts_the_failures_of_every_segment(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    whole, _tail = torn_segment(tmp_path)
    (DataLayout(tmp_path).active("coinbase") / "segment_20260809T21_00002.ndjson").write_bytes(whole)
    disk = PerSegmentDisk(monkeypatch, first=3)
    pipeline = IngestPipeline(parse_config(ingest_config(tmp_path, "ws://127.0.0.1:9/ws")))
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop, out=io.StringIO()))
    await async_wait_until(lambda: disk.failures["00002"] >= 2 or task.done(), what="the second segment to fail")
    stop.set()
    await asyncio.wait_for(task, 15)
    assert pipeline.failed and LEFTOVER in {path.name for path in segment_files(tmp_path)}  # the first one done
    (interrupted,) = events(caplog, "recovery_interrupted")
    assert interrupted["segment"] == "segment_20260809T21_00002.ndjson"
    assert pipeline.writer.stats.write_errors == disk.failures["00001"] + disk.failures["00002"]
    assert disk.failures["00001"] == 3


async def test_recovery_on_a_read_only_disk_stops_with_one_line_instead_of_waiting(tmp_path, monkeypatch, caplog):
    whole, tail = torn_segment(tmp_path)

    def fsync(fd: int) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(segments, "fsync", fsync)
    pipeline = IngestPipeline(parse_config(ingest_config(tmp_path, "ws://127.0.0.1:9/ws")))
    await asyncio.wait_for(pipeline.run(asyncio.Event(), out=io.StringIO()), 15)  # no stop needed: it ends
    assert pipeline.failed and pipeline.writer.stats.write_errors == 0  # not retried
    (failed,) = events(caplog, "recovery_failed")
    assert "Read-only file system" in str(failed["error"])
    assert (DataLayout(tmp_path).active("coinbase") / LEFTOVER).read_bytes() == whole + tail  # untouched
    assert not quarantined(tmp_path)


def test_a_segment_whose_fsync_failed_is_written_anew_not_fsynced_again(tmp_path, monkeypatch):
    """After a failed fsync the kernel may have dropped the pages while reads still return
    them: the recovered segment must be a new file written from what was read."""
    whole, _tail = torn_segment(tmp_path)
    leftover = DataLayout(tmp_path).active("coinbase") / LEFTOVER
    original = leftover.stat().st_ino
    real_fsync = segments.fsync
    failed: list[int] = []

    def fsync(fd: int) -> None:
        if os.fstat(fd).st_ino == original and not failed:
            failed.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(segments, "fsync", fsync)
    monkeypatch.setattr(segments, "retry_pause", lambda failures: 0.0)
    report = recover_active(DataLayout(tmp_path), "coinbase")
    assert failed and report.write_errors == 1 and report.segments == 1
    (ready,) = segment_files(tmp_path)
    assert ready.read_bytes() == whole and ready.stat().st_ino != original
    assert not list(DataLayout(tmp_path).active("coinbase").iterdir())  # no .tmp left either


async def test_ingest_on_a_fresh_data_dir_of_a_full_disk_waits_to_create_its_folders(make_sim, tmp_path, monkeypatch):
    """Not even ``raw/`` exists yet and the disk is full: creating the folders and the lock
    file waits for space like every other disk step, then capture starts."""
    real_ensure, full = DataLayout.ensure, [True]
    attempts = []

    def ensure(layout: DataLayout, source: str) -> None:
        attempts.append(1)
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device", str(layout.raw))
        real_ensure(layout, source)

    monkeypatch.setattr(DataLayout, "ensure", ensure)
    monkeypatch.setattr(segments, "retry_pause", lambda failures: 0.01)
    sim = await make_sim(rate=0, keep_sent=True)
    pipeline = IngestPipeline(parse_config(ingest_config(tmp_path / "fresh", sim.ws_url, flush_interval_seconds=0.05)))
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop, out=io.StringIO()))
    await async_wait_until(lambda: len(attempts) >= 3 or task.done(), what="retries on the full disk")
    assert not task.done() and not sim.connections
    full[0] = False
    await capture_then_stop(sim, pipeline, 20, stop, task)
    assert not pipeline.failed and pipeline.writer.stats.write_errors >= 3
    assert frame_bytes(tmp_path / "fresh") == sim.closed_connections[0].sent_frames
