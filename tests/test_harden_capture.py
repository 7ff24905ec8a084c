"""Issue 8, capture side: names under clock steps and counter exhaustion, padded frames,
a full disk at start-up and at shutdown. Real files, a real simulator on loopback; the
full disk is ENOSPC injected into the capture module's own write_all and fsync."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest

from daedalus.capture import segments
from daedalus.capture.pipeline import IngestPipeline
from daedalus.capture.records import frame_line, split_frame_record
from daedalus.capture.segments import LAST_SEGMENT_FILE, SegmentWriter, recover_active
from daedalus.config import IngestionConfig, parse_config
from daedalus.etl.reader import connect, read_batches
from daedalus.layout import (
    DataLayout,
    next_segment_hour,
    segment_hour_start,
    segment_identity,
    segment_name,
    segment_name_for_hour,
)
from tests.capture_helpers import (
    FullDisk,
    async_wait_until,
    events,
    frame,
    frame_bytes,
    ingest_config,
    read_records,
    segment_files,
)

HOUR_NS = 3_600_000_000_000
MINUTE_NS = 60_000_000_000
T21 = 1_786_309_200_000_000_000  # 2026-08-09T21:00:00Z
T22 = T21 + HOUR_NS


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def make_writer(tmp_path: Path, clock: Callable[[], int], **config: object) -> SegmentWriter:
    writer = SegmentWriter(DataLayout(tmp_path), "coinbase", IngestionConfig(**config), clock)
    writer.start()
    return writer


def all_segment_names(tmp_path: Path) -> list[str]:
    return sorted(p.name for state in ("ready", "active") for p in segment_files(tmp_path, state))


# -- item 5: JSON whitespace around a frame ------------------------------------------------


@pytest.mark.parametrize("text", ['{"a":1} ', '{"a":1}\r\n', ' \t{"a":1}', '\r\n {"a":[1,2]}\t \n', "{} "])
def test_a_frame_padded_with_json_whitespace_is_stored_as_msg_verbatim(text):
    line = frame_line(5, 2, text)
    record = orjson.loads(line)
    assert "raw" not in record and record["msg"] == orjson.loads(text)
    assert split_frame_record(line.rstrip(b"\n")) == (5, 2, text.replace("\n", " ").encode())  # spliced, as sent


@pytest.mark.parametrize("text", ["", "   ", " {", "{ ", "\x0b{}", "{}\x0c", "[1] ", ' "{}" ', "\u00a0{}"])
def test_what_is_not_an_object_with_json_whitespace_stays_raw(text):
    assert orjson.loads(frame_line(5, 2, text)) == {"recv_ns": 5, "conn": 2, "raw": text.replace("\n", " ")}


def test_padded_frames_reach_the_etl_reader_as_messages(tmp_path):
    writer = make_writer(tmp_path, lambda: T21, batch_size=10, flush_interval_seconds=0.05)
    sent = [frame(0) + " ", "\t" + frame(1) + "\r\n", frame(2)]
    for i, text in enumerate(sent):
        writer.put_frame(T21 + i, 1, text)
    assert writer.close()
    assert [r["msg"]["sequence_num"] for r in read_records(tmp_path)] == [0, 1, 2]
    (segment,) = segment_files(tmp_path)
    rows = [row for batch in read_batches(connect(), segment) for row in batch.to_pylist()]
    assert [row["msg"]["sequence_num"] for row in rows] == [0, 1, 2]


# -- item 2: the clock steps back -----------------------------------------------------------


def test_a_clock_step_back_across_the_hour_never_reuses_a_deleted_name(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    now = [T21 + 30 * MINUTE_NS]
    for expected in ("segment_20260809T21_00001.ndjson", "segment_20260809T22_00001.ndjson"):
        writer = make_writer(tmp_path, lambda: now[0])
        writer.put_frame(now[0], 1, frame(1))
        assert writer.close()
        (file,) = segment_files(tmp_path)
        assert file.name == expected
        file.unlink()  # processed and deleted (`after_processing: delete`)
        now[0] += HOUR_NS
    now[0] = T21 + 40 * MINUTE_NS  # NTP (or a Pi without RTC) puts the clock back to 21:40
    writer = make_writer(tmp_path, lambda: now[0])
    writer.put_frame(now[0], 1, frame(2))
    assert writer.close()
    (file,) = segment_files(tmp_path)
    assert file.name == "segment_20260809T22_00002.ndjson"  # not T21_00001 again
    assert read_records(tmp_path)[0]["recv_ns"] == T21 + 40 * MINUTE_NS  # stamped as received
    (warning,) = events(caplog, "segment_clock_stepped_back")
    assert warning["clock_hour"] == "20260809T21" and warning["last_segment_hour"] == "20260809T22"


def test_names_stay_ordered_through_a_step_back_with_rotations_and_warn_once(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    now = [T22 + 10 * MINUTE_NS]
    writer = make_writer(tmp_path, lambda: now[0], batch_size=5, flush_interval_seconds=0.02, segment_max_mb=0.01)
    sent = 0

    def send(recv_ns: int, count: int) -> None:
        nonlocal sent
        for _ in range(count):
            writer.put_frame(recv_ns, 1, frame(sent, pad=2000))
            sent += 1
        wait_until(lambda: writer.stats.written == sent, what="the frames to be written")

    send(now[0], 3)
    now[0] = T21 + 50 * MINUTE_NS  # stepped back an hour: the open segment rotates
    send(now[0], 20)  # several size rotations while the clock is behind
    now[0] = T22 + 15 * MINUTE_NS  # the clock is right again
    send(now[0], 3)
    now[0] = T22 + HOUR_NS + MINUTE_NS
    send(now[0], 1)
    assert writer.close()
    names = [f.name for f in segment_files(tmp_path)]
    assert len(names) >= 5 and len(set(names)) == len(names)
    assert names[0] == "segment_20260809T22_00001.ndjson" and names[-1] == "segment_20260809T23_00001.ndjson"
    assert all(name.startswith("segment_20260809T22_") for name in names[:-1])
    records = read_records(tmp_path)  # in name order, which is the order of writing
    assert [r["msg"]["sequence_num"] for r in records] == list(range(sent))
    assert len(events(caplog, "segment_clock_stepped_back")) == 1


# -- item 3: the counter is bounded to five digits ---------------------------------------------


def seed_last_segment(tmp_path: Path, name: str) -> None:
    active = DataLayout(tmp_path).active("coinbase")
    active.mkdir(parents=True, exist_ok=True)
    (active / LAST_SEGMENT_FILE).write_text(name)


def test_an_exhausted_hour_suspends_size_rotation_instead_of_outgrowing_the_name(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    seed_last_segment(tmp_path, "segment_20260809T21_99997.ndjson")
    now = [T21 + MINUTE_NS]
    writer = make_writer(tmp_path, lambda: now[0], batch_size=5, flush_interval_seconds=0.02, segment_max_mb=0.01)
    for i in range(40):
        writer.put_frame(now[0] + i, 1, frame(i, pad=2000))
    wait_until(lambda: writer.stats.written == 40, what="the frames to be written")
    now[0] = T22 + MINUTE_NS
    writer.put_frame(now[0], 1, frame(40))
    assert writer.close()
    sizes = {f.name: f.stat().st_size for f in segment_files(tmp_path)}
    assert list(sizes) == [
        "segment_20260809T21_99998.ndjson",
        "segment_20260809T21_99999.ndjson",
        "segment_20260809T22_00001.ndjson",
    ]
    assert sizes["segment_20260809T21_99999.ndjson"] > 4 * 0.01 * 1024 * 1024  # kept growing until the hour changed
    assert [r["msg"]["sequence_num"] for r in read_records(tmp_path)] == list(range(41))
    assert len(events(caplog, "segment_counter_exhausted")) == 1


def test_a_restart_in_an_exhausted_hour_borrows_the_next_hour(tmp_path):
    seed_last_segment(tmp_path, "segment_20260809T21_99999.ndjson")
    now = [T21 + 30 * MINUTE_NS]
    writer = make_writer(tmp_path, lambda: now[0], batch_size=1, flush_interval_seconds=0.02)
    writer.put_frame(now[0], 1, frame(1))
    wait_until(lambda: writer.stats.written == 1, what="the first frame")
    now[0] = T22 + MINUTE_NS
    writer.put_frame(now[0], 1, frame(2))
    assert writer.close()
    assert [f.name for f in segment_files(tmp_path)] == [
        "segment_20260809T22_00001.ndjson",
        "segment_20260809T22_00002.ndjson",
    ]


def test_segment_names_refuse_a_sixth_counter_digit_and_identify_derived_files():
    hour = segment_hour_start("20260809T21")
    assert segment_name(hour, 99_999) == "segment_20260809T21_99999.ndjson"
    for counter in (0, 100_000):
        with pytest.raises(ValueError, match=r"outside 1\.\.99999"):
            segment_name(hour, counter)
    assert segment_identity("segment_20260809T21_00042.ndjson.zst.tail-1786309200") == ("20260809T21", 42)
    assert segment_identity("segment_20260809T21_100000.ndjson") == ("20260809T21", 100_000)
    assert segment_identity(".last_segment") is None


# -- item 14: a full disk ------------------------------------------------------------------


def test_a_writer_started_on_a_full_disk_waits_for_space_and_loses_nothing(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    disk = FullDisk(monkeypatch)
    writer = make_writer(tmp_path, lambda: T21, batch_size=10, flush_interval_seconds=0.02)
    for i in range(100):
        writer.put_frame(T21 + i, 1, frame(i))
    wait_until(lambda: writer.stats.write_errors >= 3 or writer.error is not None, what="retries")
    assert writer.error is None  # still retrying: not dead
    assert events(caplog, "segment_write_failed")[0]["step"] == "open"
    disk.full = False  # space is back
    wait_until(lambda: writer.stats.written == 100, what="the backlog to be written")
    assert writer.close()
    assert [r["msg"]["sequence_num"] for r in read_records(tmp_path)] == list(range(100))
    marker = DataLayout(tmp_path).active("coinbase") / LAST_SEGMENT_FILE
    assert marker.read_text() == "segment_20260809T21_00001.ndjson"
    assert events(caplog, "segment_write_recovered")


async def test_ingest_on_a_full_disk_keeps_running_and_tells_the_truth_at_shutdown(
    make_sim, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO)
    disk = FullDisk(monkeypatch)
    sim = await make_sim(rate=0, keep_sent=True)
    pipeline = IngestPipeline(parse_config(ingest_config(tmp_path, sim.ws_url, flush_interval_seconds=0.05)))
    stop, out = asyncio.Event(), io.StringIO()
    task = asyncio.create_task(pipeline.run(stop, stats_interval=0.2, out=out))
    writer, collector = pipeline.writer, pipeline.collectors[0]
    await async_wait_until(lambda: writer.stats.write_errors >= 2 or task.done(), what="retries on the full disk")
    assert not task.done() and writer.error is None  # started, and still running
    await async_wait_until(lambda: "write_errors=" in out.getvalue(), what="a statistics block")

    disk.full = False  # space comes back: everything received so far is written
    await async_wait_until(lambda: sim.connections and len(sim.connections[0].subs) == 4, what="subscriptions")
    await sim.advance(300)
    await async_wait_until(lambda: writer.stats.written == collector.stats.messages > 300, what="catching up")

    disk.full = True  # full again, then SIGTERM: what cannot be written is counted, not hidden
    await sim.advance(300)
    await async_wait_until(lambda: writer.stats.write_errors >= 4 and writer.queue_depth > 0, what="a backlog")
    stop.set()
    await asyncio.wait_for(task, 15)

    stats = writer.stats
    assert stats.unwritten > 0 and pipeline.failed
    assert stats.written + writer.dropped + stats.unwritten == collector.stats.messages  # every frame accounted
    (stopped,) = events(caplog, "ingest_stopped")
    assert stopped["clean"] is False and stopped["unwritten"] == stats.unwritten
    final = out.getvalue().splitlines()[-1]
    assert f"unwritten={stats.unwritten:,}" in final and f"write_errors={stats.write_errors:,}" in final
    disk.full = False  # the next start recovers exactly what was written
    recover_active(DataLayout(tmp_path), "coinbase")
    assert len(frame_bytes(tmp_path)) == stats.written
    assert frame_bytes(tmp_path) == sim.closed_connections[0].sent_frames[: stats.written]


# -- review findings: a far-ahead name, counting once, errors waiting cannot cure -----------------


def hour_text(recv_ns: int) -> str:
    return datetime.fromtimestamp(recv_ns // 1_000_000_000, UTC).strftime("%Y%m%dT%H")


def test_one_frame_stamped_years_ahead_keeps_names_unique_and_in_capture_order(tmp_path, caplog):
    """A clock gone wild for one frame: later names stay in its hour rather than go back to
    the real one, whose earlier names the ETL may have deleted (a reused name would be a
    second segment under a committed name; one sorting before the checkpoint's would be
    processed as out of order)."""
    caplog.set_level(logging.INFO)
    future = T21 + 3653 * 24 * HOUR_NS  # ten years ahead
    far = hour_text(future)
    now = [T21 + MINUTE_NS]
    writer = make_writer(tmp_path, lambda: now[0], batch_size=1, flush_interval_seconds=0.02)
    for seq, recv_ns in enumerate([T21 + MINUTE_NS, future, T21 + 2 * MINUTE_NS, T22 + MINUTE_NS]):
        now[0] = max(now[0], min(recv_ns, T22 + MINUTE_NS))
        writer.put_frame(recv_ns, 1, frame(seq))
        wait_until(lambda seq=seq: writer.stats.written == seq + 1, what=f"frame {seq}")
    assert writer.close()
    names = [f.name for f in segment_files(tmp_path)]
    assert names == ["segment_20260809T21_00001.ndjson", *[f"segment_{far}_{i:05d}.ndjson" for i in (1, 2, 3)]]
    (warning,) = events(caplog, "segment_clock_stepped_back")  # once for the step, not per segment
    assert warning["clock_hour"] == "20260809T21" and warning["last_segment_hour"] == far
    records = read_records(tmp_path)
    for path in segment_files(tmp_path):  # processed and deleted by the ETL
        path.unlink()

    now[0] = T22 + 2 * MINUTE_NS  # a restart: the deleted names are not used again
    writer = make_writer(tmp_path, lambda: now[0])
    writer.put_frame(now[0], 1, frame(4))
    assert writer.close()
    assert [f.name for f in segment_files(tmp_path)] == [f"segment_{far}_00004.ndjson"]
    records += read_records(tmp_path)
    assert [r["msg"]["sequence_num"] for r in records] == [0, 1, 2, 3, 4]  # name order = capture order


def test_a_step_back_of_most_of_a_day_keeps_the_last_hour(tmp_path):
    now = [T21 + 23 * HOUR_NS]
    writer = make_writer(tmp_path, lambda: now[0], batch_size=1, flush_interval_seconds=0.02)
    writer.put_frame(now[0], 1, frame(0))
    wait_until(lambda: writer.stats.written == 1, what="the first frame")
    now[0] = T21  # 23 hours back: names keep going forward
    writer.put_frame(now[0], 1, frame(1))
    assert writer.close()
    assert [f.name for f in segment_files(tmp_path)] == [
        "segment_20260810T20_00001.ndjson",
        "segment_20260810T20_00002.ndjson",
    ]


def test_giving_up_during_a_size_rotation_counts_each_frame_once(tmp_path, monkeypatch):
    disk = FullDisk(monkeypatch, full=False)
    writer = make_writer(tmp_path, lambda: T21, batch_size=1, flush_interval_seconds=0.02, segment_max_mb=0.01)
    writer.put_frame(T21, 1, frame(0, pad=6000))
    wait_until(lambda: writer.stats.written == 1, what="the first frame")
    disk.full = True  # the second frame does not fit: the rotation it starts fails
    writer.put_frame(T21 + 1, 1, frame(1, pad=6000))
    wait_until(lambda: writer.stats.write_errors >= 1, what="the rotation to fail")
    assert not writer.close()  # SIGTERM while the disk is still full
    stats = writer.stats
    assert stats.written == 1 and stats.unwritten == 1 and stats.unwritten_events == 0
    assert stats.written + writer.dropped + stats.unwritten == 2  # every frame received, counted once


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the writer thread dies, as meant
def test_an_error_that_waiting_cannot_cure_stops_the_writer_at_once(tmp_path, monkeypatch):
    real_write_all = segments.write_all
    read_only = [False]

    def write_all(fd: int, data: bytes | memoryview) -> None:
        if read_only[0]:
            raise OSError(errno.EROFS, "Read-only file system")
        real_write_all(fd, data)

    monkeypatch.setattr(segments, "write_all", write_all)
    writer = make_writer(tmp_path, lambda: T21, batch_size=1, flush_interval_seconds=0.02)
    writer.put_frame(T21, 1, frame(0))
    wait_until(lambda: writer.stats.written == 1, what="the first frame")
    read_only[0] = True  # remounted read-only (errors=remount-ro): no retry can help
    for i in range(1, 6):
        writer.put_frame(T21 + i, 1, frame(i))
    wait_until(lambda: writer.error is not None, what="the writer to stop")
    assert isinstance(writer.error, OSError) and writer.error.errno == errno.EROFS
    assert writer.stats.write_errors == 0  # not retried
    assert not writer.close()
    assert writer.stats.written + writer.stats.unwritten == 6  # what it held is counted, not hidden


def test_raw_folders_removed_while_running_are_created_again(tmp_path):
    now = [T21 + MINUTE_NS]
    writer = make_writer(tmp_path, lambda: now[0], batch_size=1, flush_interval_seconds=0.02)
    writer.put_frame(now[0], 1, frame(0))
    wait_until(lambda: writer.stats.written == 1, what="the first frame")
    now[0] = T22 + MINUTE_NS
    wait_until(lambda: writer.stats.rotations == 1, what="the hour's segment to be published")
    shutil.rmtree(tmp_path / "raw")  # an operator moved the raw data away
    writer.put_frame(now[0], 1, frame(1))
    assert writer.close()
    assert [f.name for f in segment_files(tmp_path)] == ["segment_20260809T22_00001.ndjson"]
    assert [r["msg"]["sequence_num"] for r in read_records(tmp_path)] == [1]


class LosingFsync:
    """The first fsync of a segment file fails and, as the kernel may, drops what was written
    since the file's last good fsync (those bytes read back as zeros). A second fsync of the
    same file then succeeds: trusting it would publish the zeros."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.failed = False
        durable: dict[str, int] = {}
        real_fsync = segments.fsync

        def fsync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if path.endswith(".ndjson") and not self.failed:
                self.failed = True
                size = os.fstat(fd).st_size
                os.ftruncate(fd, durable.get(path, 0))
                os.ftruncate(fd, size)  # the lost pages: a hole of zeros
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(fd)
            durable[path] = os.fstat(fd).st_size

        monkeypatch.setattr(segments, "fsync", fsync)


def test_a_failed_fsync_of_a_write_is_repaired_by_writing_again(tmp_path, monkeypatch):
    disk = LosingFsync(monkeypatch)
    writer = make_writer(tmp_path, lambda: T21, batch_size=5, flush_interval_seconds=0.02)
    for i in range(20):
        writer.put_frame(T21 + i, 1, frame(i))
    assert writer.close()
    assert disk.failed and writer.stats.write_errors == 1
    (segment,) = segment_files(tmp_path)
    assert b"\x00" not in segment.read_bytes()
    assert [r["msg"]["sequence_num"] for r in read_records(tmp_path)] == list(range(20))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the writer thread dies, as meant
def test_a_failed_fsync_after_unsynced_writes_is_not_retried_into_ready(tmp_path, monkeypatch):
    disk = LosingFsync(monkeypatch)
    now = [T21 + MINUTE_NS]
    writer = make_writer(tmp_path, lambda: now[0], batch_size=1, flush_interval_seconds=0.02, fsync=False)
    for i in range(3):
        writer.put_frame(now[0] + i, 1, frame(i))
    wait_until(lambda: writer.stats.written == 3, what="the frames to be written")
    now[0] = T22 + MINUTE_NS  # the rotation's fsync is the segment's first: it fails
    wait_until(lambda: writer.error is not None, what="the writer to stop")
    assert disk.failed and isinstance(writer.error, segments.SegmentNotDurable)
    assert not writer.close()
    assert not segment_files(tmp_path)  # nothing unverified reaches ready/
    (left,) = segment_files(tmp_path, "active")
    assert left.name == "segment_20260809T21_00001.ndjson"
    recover_active(DataLayout(tmp_path), "coinbase")  # the next start: the zeros go to quarantine
    assert not segment_files(tmp_path) and not segment_files(tmp_path, "active")
    assert len(list(DataLayout(tmp_path).quarantine("coinbase").iterdir())) == 1


def test_a_segment_name_is_built_from_the_hour_text():
    assert segment_name_for_hour("20260809T21", 7, ".ndjson.zst") == "segment_20260809T21_00007.ndjson.zst"
    assert segment_name_for_hour("20260809T21", 7) == segment_name(segment_hour_start("20260809T21"), 7)
    assert next_segment_hour("20261231T23") == "20270101T00"
    with pytest.raises(ValueError, match="not YYYYMMDDTHH"):
        segment_name_for_hour("2026-08-09T21", 1)
