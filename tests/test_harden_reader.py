"""The ETL reader under damage (issue 8, items 4 and 8): a cut, a flipped bit or a damaged
header in one zstd frame costs only that frame (its bytes kept byte-exact for forensics),
and a line DuckDB refuses (a duplicate JSON key) costs only that line."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import orjson
import pytest
import zstandard

from daedalus.etl.reader import clean_copy, connect, read_batches, zstd_is_complete
from tests.conftest import RECORDING
from tests.etl_helpers import channel_table, recording_lines, run_etl, write_segments

pytestmark = pytest.mark.skipif(not RECORDING.exists(), reason=f"reference recording missing: {RECORDING}")

SEGMENT = "segment_20260809T21_00001.ndjson.zst"
LINES_PER_FLUSH = 50
BAD = 10  # index of the damaged frame: one in the middle
DAMAGE = ["cut", "bit_in_data", "magic", "descriptor"]


@cache
def lines_of_recording() -> list[bytes]:
    return recording_lines()


def flushes() -> list[list[bytes]]:
    lines = lines_of_recording()
    return [lines[i : i + LINES_PER_FLUSH] for i in range(0, len(lines), LINES_PER_FLUSH)]


def capture_frames(chunks: list[list[bytes]]) -> list[bytes]:
    """One independent zstd frame per flush, as the capture writer makes them."""
    compressor = zstandard.ZstdCompressor(level=3)
    return [compressor.compress(b"".join(chunk)) for chunk in chunks]


def damaged(frame: bytes, kind: str) -> bytes:
    """``frame`` with one kind of damage (what the file holds instead of it)."""
    if kind == "cut":
        return frame[: len(frame) // 2]
    if kind == "magic":
        return bytes([frame[0] ^ 0xFF]) + frame[1:]
    if kind == "descriptor":  # the frame header descriptor's reserved bit set: unreadable header
        return frame[:4] + bytes([frame[4] | 0x08]) + frame[5:]
    return _flip_a_bit_the_headers_do_not_show(frame)


def _flip_a_bit_the_headers_do_not_show(frame: bytes) -> bytes:
    """The first one-bit flip inside compressed data that leaves every header intact but
    does not decode (no checksum: the capture writer writes none)."""
    for position in range(len(frame) // 2, len(frame)):
        flipped = bytearray(frame)
        flipped[position] ^= 0x10
        try:
            zstandard.ZstdDecompressor().decompress(bytes(flipped))
        except zstandard.ZstdError:
            return bytes(flipped)
    raise AssertionError("no undecodable one-bit flip found")


def write_damaged_segment(ready: Path, kind: str) -> tuple[Path, int, bytes, list[bytes]]:
    """(segment, offset of the bad bytes, the bad bytes, every line of every other frame)."""
    chunks = flushes()
    frames = capture_frames(chunks)
    bad = damaged(frames[BAD], kind)
    ready.mkdir(parents=True, exist_ok=True)
    path = ready / SEGMENT
    path.write_bytes(b"".join(frames[:BAD]) + bad + b"".join(frames[BAD + 1 :]))
    good = [line for i, chunk in enumerate(chunks) if i != BAD for line in chunk]
    return path, sum(map(len, frames[:BAD])), bad, good


@pytest.mark.parametrize("kind", DAMAGE)
def test_one_damaged_frame_costs_only_its_own_bytes_which_are_kept_exactly(tmp_path, kind):
    path, offset, bad, good = write_damaged_segment(tmp_path / "ready", kind)
    if kind == "bit_in_data":
        assert zstd_is_complete(path)  # damage the header walk cannot see
    quarantine = tmp_path / "quarantine"
    copy = clean_copy(path, tmp_path / "clean.ndjson", damaged_dir=quarantine)
    assert copy.path.read_bytes().splitlines(keepends=True) == good
    assert copy.kept == len(good)
    assert [(d.offset, d.length) for d in copy.damaged] == [(offset, len(bad))]
    saved = quarantine / f"{SEGMENT}.damaged-{offset}.zst"
    assert copy.damaged[0].saved_to == saved and saved.read_bytes() == bad
    assert [line for _, line in copy.rejected] == [b""]
    reason = copy.rejected[0][0]
    assert f"damaged zstd frame at byte {offset} ({len(bad)} bytes)" in reason and str(saved) in reason
    assert not list(quarantine.glob("*.tmp"))


def test_damage_in_the_last_frame_and_frames_with_a_checksum(tmp_path):
    """A torn tail is one more damaged frame; a content checksum (if a writer adds one)
    turns an otherwise silent bit flip into a damaged frame."""
    chunks = flushes()[:6]
    frames = [zstandard.ZstdCompressor(level=3, write_checksum=True).compress(b"".join(c)) for c in chunks]
    flipped = bytearray(frames[2])
    flipped[-6] ^= 0x01  # inside the last block's data: decodes, but to other bytes
    tail = frames[5][:-7]
    path = tmp_path / SEGMENT
    path.write_bytes(b"".join(frames[:2]) + bytes(flipped) + b"".join(frames[3:5]) + tail)
    copy = clean_copy(path, tmp_path / "clean.ndjson", damaged_dir=tmp_path / "q")
    good = [line for i, chunk in enumerate(chunks) if i not in (2, 5) for line in chunk]
    assert copy.path.read_bytes().splitlines(keepends=True) == good
    assert [d.saved_to.read_bytes() for d in copy.damaged if d.saved_to] == [bytes(flipped), tail]


def test_frames_whose_content_does_not_end_a_line_are_damaged(tmp_path):
    compressor = zstandard.ZstdCompressor(level=3)
    lines = lines_of_recording()[:20]
    half = compressor.compress(lines[10][:30])  # a flush never splits a line: this is not one
    path = tmp_path / SEGMENT
    path.write_bytes(compressor.compress(b"".join(lines[:10])) + half + compressor.compress(b"".join(lines[10:])))
    copy = clean_copy(path, tmp_path / "clean.ndjson", damaged_dir=tmp_path / "q")
    assert copy.path.read_bytes().splitlines(keepends=True) == lines
    assert len(copy.damaged) == 1 and "does not end with a newline" in copy.damaged[0].reason


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The dataset of every line except the damaged frame's, from an undamaged segment."""
    data = tmp_path_factory.mktemp("reference")
    write_segments(data, [[line for i, chunk in enumerate(flushes()) if i != BAD for line in chunk]])
    run_etl(data)
    return data


@pytest.mark.parametrize("kind", ["cut", "bit_in_data", "magic"])
def test_etl_processes_every_frame_around_a_damaged_one(tmp_path, reference, kind):
    write_damaged_segment(tmp_path / "raw" / "ready" / "coinbase", kind)
    summary = run_etl(tmp_path)
    for channel in ("level2", "market_trades", "ticker", "book_snapshot_10"):
        assert channel_table(tmp_path, channel) == channel_table(reference, channel), channel
    assert summary.segments == 1 and summary.quarantined_segments == 0 and summary.quarantined_lines == 1


def test_etl_keeps_the_damaged_frame_bytes_in_quarantine(tmp_path):
    _, offset, bad, _ = write_damaged_segment(tmp_path / "raw" / "ready" / "coinbase", "cut")
    run_etl(tmp_path)
    saved = tmp_path / "raw" / "quarantine" / "coinbase" / f"{SEGMENT}.damaged-{offset}.zst"
    assert saved.read_bytes() == bad


def with_duplicate_keys(lines: list[bytes]) -> list[bytes]:
    """Copies of good lines with a key twice: at the top, deep in a list, and spelled with an escape."""
    ticker = next(line for line in lines if b'"channel":"ticker"' in line)
    return [
        ticker.replace(b'"conn":1,', b'"conn":1,"conn":1,', 1),
        ticker.replace(b'"type":"ticker",', b'"type":"ticker","type":"ticker",', 1),
        ticker.replace(b'"conn":1,', b'"conn":1,"c\\u006fnn":1,', 1),
    ]


def test_a_line_with_a_duplicate_key_is_quarantined_alone(tmp_path):
    lines = lines_of_recording()
    hostile = with_duplicate_keys(lines)
    write_segments(tmp_path, [lines[:300] + hostile + lines[300:]])
    clean = tmp_path / "clean"
    write_segments(clean, [lines])
    summary = run_etl(tmp_path)
    run_etl(clean)
    assert summary.segments == 1 and summary.quarantined_segments == 0 and summary.quarantined_lines == 3
    rejects = tmp_path / "raw" / "quarantine" / "coinbase" / "segment_20260809T21_00001.etl-rejects.ndjson"
    entries = [orjson.loads(line) for line in rejects.read_bytes().splitlines()]
    assert [e["line"].encode() + b"\n" for e in entries] == hostile
    assert [e["reason"] for e in entries] == ["duplicate JSON key 'conn'", "duplicate JSON key 'type'",
                                              "duplicate JSON key 'conn'"]  # fmt: skip
    for channel in ("level2", "market_trades", "ticker"):
        assert channel_table(tmp_path, channel) == channel_table(clean, channel), channel


HOSTILE = [
    b'{"recv_ns":1,"conn":1,"msg":{"events":[{"updates":[{"side":"bid","side":"offer"}]}]}}',
    b'{"recv_ns":1,"conn":1,"other":{"a":1,"a":2}}',
    b'{"recv_ns":1,"conn":1,"msg":{"sequence_num":18446744073709551615}}',
    b'{"recv_ns":9223372036854775808,"conn":1}',
    b'{"recv_ns":1,"conn":1,"msg":{"sequence_num":"12"}}',
    b'{"recv_ns":1,"conn":1,"msg":{"events":{"a":1}}}',
    b'{"recv_ns":1,"conn":1,"msg":"text"}',
    b'{"recv_ns":1,"conn":1,"msg":{"message":NaN}}',
    b'{"recv_ns":1,"conn":1,"x":1e400}',
    b'{"recv_ns":1,"conn":1,"x":' + b"[" * 3000 + b"]" * 3000 + b"}",
    b'{"recv_ns":1,"conn":1,"x":' + b"[" * 990 + b"]" * 990 + b"}",
    b'{"recv_ns":1,"conn":1,"msg":{"message":"\\ud800"}}',
    b'{"recv_ns":1,"conn":1,"msg":{"message":"a\\u0000b"}}',
    b'{"recv_ns":1,"conn":1,"x":123456789012345678901234567890}',
    b'{"recv_ns":1,"conn":1,}',
]


def test_duckdb_reads_every_line_the_clean_copy_keeps(tmp_path):
    """The second DuckDB pass over a clean copy cannot fail: the line check is at least as
    strict as DuckDB's JSON reader with the record schema."""
    good = lines_of_recording()[:30]
    source = tmp_path / "segment.ndjson"
    source.write_bytes(b"".join(good) + b"\n".join(HOSTILE) + b"\n")
    copy = clean_copy(source, tmp_path / "clean.ndjson")
    rows = sum(batch.num_rows for batch in read_batches(connect(), copy.path))
    assert rows == copy.kept and copy.kept + len(copy.rejected) == len(good) + len(HOSTILE)
    assert copy.kept >= len(good) + 2  # the valid odd ones (NUL escape, big number elsewhere) are kept
