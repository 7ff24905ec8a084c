"""One zstd frame walker for every reader of .zst segments (issue 8, item 4 and its review):
replay, ``iter_lines``, the ETL's clean copy and start-up recovery all keep every frame
that decodes, and no frame can make them hold more than a bounded amount of memory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import zstandard

from daedalus.capture.records import ZstdFrameDamaged, frame_line, iter_lines
from daedalus.capture.segments import recover_active
from daedalus.etl.reader import clean_copy
from daedalus.layout import DataLayout
from daedalus.sim.replay import load_recording
from tests.conftest import REPO

SEGMENT = "segment_20260809T21_00001.ndjson.zst"
LINES_PER_FRAME = 1000
HOSTILE_MB = 512  # what one hostile frame of 16 KB expands to
PEAK_GROWTH_LIMIT_MB = 300  # the walker holds at most one 128 MB line; the old readers held it all


def record_lines(start: int, count: int) -> list[bytes]:
    """Raw record lines, as capture writes them, of small level2-like frames."""
    out = []
    for seq in range(start, start + count):
        frame = {"channel": "l2_data", "sequence_num": seq, "events": [{"type": "update", "product_id": "BTC-USD"}]}
        out.append(frame_line(1786309548000000000 + seq, 1, orjson.dumps(frame).decode()))
    return out


def capture_frames(count: int) -> tuple[list[bytes], list[list[bytes]]]:
    """``count`` frames as the capture writer makes them (content checksum on), and their lines."""
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True)
    chunks = [record_lines(i * LINES_PER_FRAME, LINES_PER_FRAME) for i in range(count)]
    return [compressor.compress(b"".join(chunk)) for chunk in chunks], chunks


def flipped(frame: bytes) -> bytes:
    """The frame with one byte in its middle inverted (the checksum makes any such flip visible)."""
    damaged = bytearray(frame)
    damaged[len(frame) // 2] ^= 0xFF
    return bytes(damaged)


def three_frames_middle_damaged(path: Path) -> tuple[list[bytes], int, int]:
    """(lines of the good frames, offset and length of the damaged one) of a fresh segment."""
    frames, chunks = capture_frames(3)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(frames[0] + flipped(frames[1]) + frames[2])
    return [line.rstrip(b"\n") for line in chunks[0] + chunks[2]], len(frames[0]), len(frames[1])


def test_replay_keeps_every_good_frame_of_a_damaged_segment(tmp_path):
    """Before: the buffered reader lost the frames after the damage (and up to 1 MB before),
    and this segment replayed nothing at all."""
    folder = tmp_path / "ready" / "coinbase"
    good, offset, length = three_frames_middle_damaged(folder / SEGMENT)
    rec = load_recording(folder)
    assert len(rec.frames) == len(good) == 2 * LINES_PER_FRAME
    sent = [orjson.loads(line)["msg"] for line in good]
    assert [f.render(msg["sequence_num"]) for f, msg in zip(rec.frames, sent, strict=True)] == list(
        map(orjson.dumps, sent)
    )
    assert rec.products == {"BTC-USD"}
    assert len(rec.damaged) == 1
    assert rec.damaged[0].startswith(f"{SEGMENT}: damaged zstd frame at byte {offset} ({length} bytes): ")


def test_iter_lines_skips_only_the_damaged_frame_and_says_so(tmp_path):
    path = tmp_path / SEGMENT
    good, offset, length = three_frames_middle_damaged(path)
    damaged: list = []
    assert list(iter_lines(path, damaged)) == good
    assert [(d.offset, d.length) for d in damaged] == [(offset, length)]
    seen = []
    with pytest.raises(ZstdFrameDamaged, match=f"{SEGMENT}: damaged zstd frame at byte {offset} "):
        seen.extend(iter_lines(path))  # without a list to note it in, the damage is an error...
    assert seen == good[:LINES_PER_FRAME]  # ...raised after every line before it


def test_lines_of_tens_of_mb_are_read_whole(tmp_path):
    """Real BTC-USD snapshots are ~5 MB: a 40 MB line (decoded a few blocks at a time) still passes."""
    frames, chunks = capture_frames(2)
    huge = b'{"recv_ns":1,"conn":1,"msg":{"pad":"' + b"0123456789" * 4_000_000 + b'"}}\n'
    path = tmp_path / SEGMENT
    path.write_bytes(frames[0] + zstandard.ZstdCompressor(write_checksum=True).compress(huge) + frames[1])
    expected = [line.rstrip(b"\n") for line in [*chunks[0], huge, *chunks[1]]]
    assert list(iter_lines(path)) == expected
    copy = clean_copy(path, tmp_path / "clean.ndjson")
    assert copy.kept == len(expected) and not copy.damaged
    assert copy.path.read_bytes() == b"".join(line + b"\n" for line in expected)


def test_recovery_keeps_the_frames_before_the_first_damaged_one(tmp_path):
    """Start-up recovery cuts at the first frame that does not decode: the rest is the tail."""
    frames, _ = capture_frames(3)
    active = DataLayout(tmp_path).active("coinbase")
    active.mkdir(parents=True)
    (active / SEGMENT).write_bytes(frames[0] + flipped(frames[1]) + frames[2])
    report = recover_active(DataLayout(tmp_path), "coinbase")
    assert report.records_kept == LINES_PER_FRAME
    assert (DataLayout(tmp_path).ready("coinbase") / SEGMENT).read_bytes() == frames[0]
    (tail,) = DataLayout(tmp_path).quarantine("coinbase").iterdir()
    assert tail.read_bytes() == flipped(frames[1]) + frames[2]


def hostile_frame(megabytes: int) -> bytes:
    """A valid zstd frame of ~8 bytes per MB: RLE blocks of 128 KB of ``x``, no newline."""
    header = (0xFD2FB528).to_bytes(4, "little") + bytes([0x00, 7 << 3])  # no size, no checksum, 128 KB window
    block = 128 << 10
    rle = (0b010 | block << 3).to_bytes(3, "little") + b"x"
    last = (0b011 | block << 3).to_bytes(3, "little") + b"x"
    return header + rle * (megabytes * 8 - 1) + last


CHILD = """
import json, sys
from pathlib import Path
from daedalus.capture.records import iter_lines
from daedalus.capture.segments import recover_active
from daedalus.etl.reader import clean_copy
from daedalus.layout import DataLayout

def peak_rss_mb():  # this process's own high-water mark (ru_maxrss would carry the parent's across exec)
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024

reader, data, segment = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
before = peak_rss_mb()
if reader == "iter_lines":
    damaged = []
    kept = sum(1 for _ in iter_lines(segment, damaged))
    reasons = [d.problem for d in damaged]
elif reader == "clean_copy":
    copy = clean_copy(segment, data / "clean.ndjson", data / "damaged")
    kept, reasons = copy.kept, [d.reason for d in copy.damaged]
else:
    report = recover_active(DataLayout(data), "coinbase")
    kept, reasons = report.records_kept, report.quarantined
print(json.dumps({"kept": kept, "reasons": reasons, "grown_mb": peak_rss_mb() - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
@pytest.mark.parametrize("reader", ["iter_lines", "clean_copy", "recovery"])
def test_a_hostile_frame_cannot_take_the_memory(tmp_path, reader):
    """16 KB of valid zstd that decodes to 512 MB without a newline, between good frames:
    every reader stops holding it at 128 MB and keeps the good frames (the old readers
    expanded it whole: 0.5 to 1 GB). Peak RSS is measured in a child process."""
    frames, _ = capture_frames(2)
    layout = DataLayout(tmp_path)
    folder = layout.active("coinbase") if reader == "recovery" else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    segment = folder / SEGMENT
    segment.write_bytes(frames[0] + hostile_frame(HOSTILE_MB) + frames[1])
    child = subprocess.run(
        [sys.executable, "-c", CHILD, reader, str(tmp_path), str(segment)],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout)
    assert result["grown_mb"] < PEAK_GROWTH_LIMIT_MB, result
    if reader == "recovery":  # recovery keeps the frames before the damage; the rest is the tail
        assert result["kept"] == LINES_PER_FRAME and len(result["reasons"]) == 1
        assert (layout.ready("coinbase") / SEGMENT).read_bytes() == frames[0]
    else:
        assert result["kept"] == 2 * LINES_PER_FRAME
        assert result["reasons"] == ["a line longer than 128 MB (not kept in memory)"]


def test_garbage_that_holds_a_magic_number_is_one_damaged_run(tmp_path):
    """Resuming at a false magic number inside garbage fails again: the clean copy keeps the
    whole run of bad bytes as one piece, byte-exact, and every good frame around it."""
    frames, chunks = capture_frames(2)
    garbage = b"garbage " + (0xFD2FB528).to_bytes(4, "little") + b"\xff" * 40
    path = tmp_path / SEGMENT
    path.write_bytes(frames[0] + garbage + frames[1])
    copy = clean_copy(path, tmp_path / "clean.ndjson", tmp_path / "damaged")
    assert copy.path.read_bytes() == b"".join(chunks[0] + chunks[1])
    assert [(d.offset, d.length) for d in copy.damaged] == [(len(frames[0]), len(garbage))]
    assert copy.damaged[0].saved_to.read_bytes() == garbage
    damaged: list = []
    assert len(list(iter_lines(path, damaged))) == 2 * LINES_PER_FRAME
    assert [(d.offset, d.length) for d in damaged] == [(len(frames[0]), 8), (len(frames[0]) + 8, len(garbage) - 8)]


def hostile_frame_of_lines(megabytes: int) -> bytes:
    """A valid zstd frame of ~12 bytes per MB that decodes to 128 KB lines of ``x``."""
    header = (0xFD2FB528).to_bytes(4, "little") + bytes([0x00, 7 << 3])  # no size, no checksum, 128 KB window
    block = 128 << 10
    xs = (0b010 | block << 3).to_bytes(3, "little") + b"x"
    line = xs + (0b000 | 1 << 3).to_bytes(3, "little") + b"\n"
    last = xs + (0b001 | 1 << 3).to_bytes(3, "little") + b"\n"  # the last block ends the frame
    return header + line * (megabytes * 8 - 1) + last


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
def test_a_hostile_frame_of_many_lines_is_let_go_by_iter_lines(tmp_path):
    """iter_lines holds one frame's lines until the frame is known whole: a frame decoding to
    more than MAX_FRAME_HOLD_BYTES (here 600 MB of 128 KB lines) is dropped as damaged."""
    frames, _ = capture_frames(2)
    segment = tmp_path / SEGMENT
    segment.write_bytes(frames[0] + hostile_frame_of_lines(600) + frames[1])
    child = subprocess.run(
        [sys.executable, "-c", CHILD, "iter_lines", str(tmp_path), str(segment)],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout)
    assert result["grown_mb"] < PEAK_GROWTH_LIMIT_MB, result
    assert result["kept"] == 2 * LINES_PER_FRAME
    assert result["reasons"] == ["decodes to more than 256 MB"]
