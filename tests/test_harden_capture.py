"""Issue 8, capture side: names under clock steps and counter exhaustion, padded frames,
a full disk at start-up and at shutdown. Real files, a real simulator on loopback; the
full disk is ENOSPC injected at the OS boundary (as in test_capture_segments)."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from daedalus.capture import segments
from daedalus.capture.pipeline import IngestPipeline
from daedalus.capture.records import frame_line, split_frame_record
from daedalus.capture.segments import LAST_SEGMENT_FILE, SegmentWriter, recover_active
from daedalus.config import IngestionConfig, parse_config
from daedalus.etl.reader import connect, read_batches
from daedalus.layout import DataLayout, segment_hour_start, segment_identity, segment_name
from tests.capture_helpers import frame_bytes, ingest_config, read_records, segment_files

HOUR_NS = 3_600_000_000_000
MINUTE_NS = 60_000_000_000
T21 = 1_786_309_200_000_000_000  # 2026-08-09T21:00:00Z
T22 = T21 + HOUR_NS


def frame(i: int, pad: int = 0) -> str:
    return f'{{"channel":"ticker","sequence_num":{i},"events":[{{"x":"{"y" * pad}"}}]}}'


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


async def async_wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def make_writer(tmp_path: Path, clock: Callable[[], int], **config: object) -> SegmentWriter:
    writer = SegmentWriter(DataLayout(tmp_path), "coinbase", IngestionConfig(**config), clock)
    writer.start()
    return writer


def all_segment_names(tmp_path: Path) -> list[str]:
    return sorted(p.name for state in ("ready", "active") for p in segment_files(tmp_path, state))


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, object]]:
    return [getattr(r, "daedalus_fields", {}) for r in caplog.records if r.getMessage() == name]


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


class FullDisk:
    """While ``full``: a write lands half its bytes then fails with ENOSPC, fsync fails with
    ENOSPC (delayed allocation reports it there). Patched at the OS boundary only."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, full: bool = True) -> None:
        self.full = full
        real_write_all, real_fsync = segments.write_all, os.fsync

        def write_all(fd: int, data: bytes | memoryview) -> None:
            if self.full:
                real_write_all(fd, bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            real_write_all(fd, data)

        def fsync(fd: int) -> None:
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(fd)

        monkeypatch.setattr(segments, "write_all", write_all)
        monkeypatch.setattr(segments.os, "fsync", fsync)


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
