"""The segment writer and start-up recovery, on real files."""

from __future__ import annotations

import os
import time

import orjson
import pytest
import zstandard

from daedalus.capture.records import control_line, frame_line, iter_lines, split_frame_record
from daedalus.capture.segments import SegmentWriter, recover_active
from daedalus.config import IngestionConfig
from daedalus.layout import DataLayout
from tests.capture_helpers import read_records, segment_files, wait_until

HOUR_NS = 3_600_000_000_000
T0 = 1_786_309_200_000_000_000  # 2026-08-09T21:00:00Z


def frame(i: int, pad: int = 0) -> str:
    return f'{{"channel":"ticker","sequence_num":{i},"events":[{{"x":"{"y" * pad}"}}]}}'


def test_record_lines():
    assert frame_line(5, 2, '{"a":\n1}') == b'{"recv_ns":5,"conn":2,"msg":{"a": 1}}\n'
    assert frame_line(5, 2, "not json {") == b'{"recv_ns":5,"conn":2,"raw":"not json {"}\n'
    assert orjson.loads(frame_line(5, 2, '{"half'))["raw"] == '{"half'
    line = control_line(7, 1, "gap", {"expected": 3, "received": 9})
    assert orjson.loads(line) == {"recv_ns": 7, "conn": 1, "event": "gap", "expected": 3, "received": 9}
    assert orjson.loads(control_line(7, 1, "connect", {})) == {"recv_ns": 7, "conn": 1, "event": "connect"}
    assert split_frame_record(frame_line(5, 2, '{"a":1}').rstrip(b"\n")) == (5, 2, b'{"a":1}')
    assert split_frame_record(line.rstrip(b"\n")) is None
    assert split_frame_record(frame_line(5, 2, "not json {").rstrip(b"\n")) is None


def make_writer(tmp_path, clock=lambda: T0, **config):
    writer = SegmentWriter(DataLayout(tmp_path), "coinbase", IngestionConfig(**config), clock)
    writer.start()
    return writer


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_writes_every_record_in_order_and_moves_the_segment_to_ready(tmp_path, compression):
    writer = make_writer(tmp_path, batch_size=10, flush_interval_seconds=0.05, raw_compression=compression)
    writer.put_control(T0, 1, "connect", url="ws://x")
    for i in range(1000):
        writer.put_frame(T0 + i, 1, frame(i))
        if i % 250 == 0:
            time.sleep(0.1)  # let the writer flush what it has
    assert writer.close()
    files = segment_files(tmp_path)
    suffix = ".ndjson.zst" if compression == "zstd" else ".ndjson"
    assert [f.name for f in files] == [f"segment_20260809T21_00001{suffix}"]
    records = read_records(tmp_path)
    assert records[0]["event"] == "connect"
    assert [r["msg"]["sequence_num"] for r in records[1:]] == list(range(1000))
    assert writer.stats.written == 1000 and writer.stats.flushes >= 2
    assert not segment_files(tmp_path, "active")
    if compression == "zstd":  # one independent zstd frame per flush
        data = files[0].read_bytes()
        frames = 0
        while data:
            d = zstandard.ZstdDecompressor().decompressobj()
            d.decompress(data)
            data = d.unused_data
            frames += 1
        assert frames == writer.stats.flushes


def test_flush_interval_makes_records_durable_without_a_full_batch(tmp_path):
    writer = make_writer(tmp_path, clock=time.time_ns, batch_size=1000, flush_interval_seconds=0.1)
    writer.put_frame(time.time_ns(), 1, frame(1))

    # The flush is counted after its write and fsync: wait for the count, then the bytes must be there
    # (waiting for the bytes first raced the count, which lags the write by the fsync).
    wait_until(lambda: writer.stats.flushes >= 1, what="a flush, 999 records short of a batch")
    active = segment_files(tmp_path, "active")
    assert len(active) == 1 and b'"sequence_num":1' in active[0].read_bytes()
    writer.close()


def test_rotation_by_size(tmp_path):
    writer = make_writer(tmp_path, batch_size=50, flush_interval_seconds=0.05, segment_max_mb=0.05)
    for i in range(3000):
        writer.put_frame(T0 + i, 1, frame(i, pad=100))
    writer.close()
    files = segment_files(tmp_path)
    assert len(files) >= 6
    assert [f.name for f in files] == [f"segment_20260809T21_{n:05d}.ndjson" for n in range(1, len(files) + 1)]
    assert all(f.stat().st_size <= 0.05 * 1024 * 1024 for f in files)
    assert writer.stats.rotations == len(files)
    assert [r["msg"]["sequence_num"] for r in read_records(tmp_path)] == list(range(3000))


def test_rotation_at_the_utc_hour_with_an_injected_clock(tmp_path):
    now = [T0 + HOUR_NS - 10**9]  # 21:59:59
    writer = make_writer(tmp_path, clock=lambda: now[0], batch_size=1, flush_interval_seconds=0.05)
    writer.put_frame(now[0], 1, frame(1))
    writer.put_frame(now[0] + 10**8, 1, frame(2))
    active = tmp_path / "raw" / "active" / "coinbase" / "segment_20260809T21_00001.ndjson"
    wait_until(lambda: active.exists() and b'"sequence_num":2' in active.read_bytes(), what="both records flushed")
    assert [f.name for f in segment_files(tmp_path, "active")] == ["segment_20260809T21_00001.ndjson"]
    now[0] = T0 + HOUR_NS + 10**9  # 22:00:01, no record yet: the idle segment still closes
    wait_until(lambda: not segment_files(tmp_path, "active"), what="the idle segment closed at the hour")
    assert [f.name for f in segment_files(tmp_path)] == ["segment_20260809T21_00001.ndjson"]
    writer.put_frame(now[0], 1, frame(3))
    writer.put_frame(now[0] + 2 * HOUR_NS, 1, frame(4))  # a record of a later hour rotates at once
    writer.close()
    assert [f.name for f in segment_files(tmp_path)] == [
        "segment_20260809T21_00001.ndjson",
        "segment_20260809T22_00001.ndjson",
        "segment_20260810T00_00001.ndjson",
    ]


def test_counter_is_never_reused_even_after_the_etl_deleted_segments(tmp_path):
    for expected in (1, 2, 3):
        writer = make_writer(tmp_path)
        writer.put_frame(T0, 1, frame(expected))
        writer.close()
        (file,) = segment_files(tmp_path)
        assert file.name == f"segment_20260809T21_{expected:05d}.ndjson"
        file.unlink()  # as `after_processing: delete` would


def test_full_queue_drops_are_counted_and_written_as_overflow(tmp_path):
    writer = SegmentWriter(DataLayout(tmp_path), "coinbase", IngestionConfig(queue_maxsize=100, batch_size=100))
    accepted = sum(writer.put_frame(T0 + i, 1, frame(i)) for i in range(250))  # thread not started yet
    assert accepted == 100 and writer.dropped == 150
    writer.start()
    writer.close()
    records = read_records(tmp_path)
    assert records[-1]["event"] == "overflow" and records[-1]["dropped"] == 150
    assert writer.stats.overflow == 150 and len(records) == 101


def write_active(tmp_path, name: str, data: bytes):
    active = DataLayout(tmp_path).active("coinbase")
    active.mkdir(parents=True, exist_ok=True)
    (active / name).write_bytes(data)


def lines(n: int, start: int = 0) -> bytes:
    return b"".join(frame_line(T0 + i, 1, frame(i)) for i in range(start, start + n))


def test_recovery_keeps_complete_records_and_quarantines_the_torn_tail(tmp_path):
    whole = lines(10)
    write_active(tmp_path, "segment_20260809T21_00001.ndjson", whole + lines(1, 10)[:25])
    write_active(tmp_path, "segment_20260809T21_00002.ndjson", lines(3) + b"\x00" * 64 + b"\n" + lines(2, 3))
    write_active(tmp_path, "segment_20260809T21_00003.ndjson", b'{"recv_ns":1,"co')
    cctx = zstandard.ZstdCompressor()
    torn_zstd = cctx.compress(lines(4)) + cctx.compress(lines(4, 4))
    write_active(tmp_path, "segment_20260809T21_00004.ndjson.zst", torn_zstd[:-7])
    report = recover_active(DataLayout(tmp_path), "coinbase")
    assert report.segments == 3 and report.records_kept == 10 + 5 + 4
    ready = {f.name: f for f in segment_files(tmp_path)}
    assert ready["segment_20260809T21_00001.ndjson"].read_bytes() == whole
    assert len(list(iter_lines(ready["segment_20260809T21_00002.ndjson"]))) == 5
    assert len(list(iter_lines(ready["segment_20260809T21_00004.ndjson.zst"]))) == 4
    assert "segment_20260809T21_00003.ndjson" not in ready
    quarantined = sorted(os.listdir(tmp_path / "raw" / "quarantine" / "coinbase"))
    assert len(quarantined) == 4 and all(".tail-" in q for q in quarantined)
    assert not segment_files(tmp_path, "active")
    assert recover_active(DataLayout(tmp_path), "coinbase").segments == 0  # idempotent


def test_a_failing_disk_is_retried_without_half_records_or_loss(tmp_path, monkeypatch):
    import errno

    from daedalus.capture import segments

    real_write_all = segments.write_all
    failures = [2]

    def flaky_write_all(fd, data):  # a full disk: half the bytes land, then ENOSPC
        if failures[0]:
            failures[0] -= 1
            real_write_all(fd, bytes(data)[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(fd, data)

    monkeypatch.setattr(segments, "write_all", flaky_write_all)
    writer = make_writer(tmp_path, batch_size=100, flush_interval_seconds=0.05)
    for i in range(300):
        writer.put_frame(T0 + i, 1, frame(i))
    assert writer.close()
    assert writer.stats.write_errors == 2
    assert [r["msg"]["sequence_num"] for r in read_records(tmp_path)] == list(range(300))
