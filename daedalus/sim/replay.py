"""Load recordings for ``daedalus sim --replay``.

Two formats are understood, line by line:

- the reference recording format of ``shared/data`` (``{"t":"recv","ts":...,"data":"<frame>"}``
  plus ``header``/``http``/``connect``/``send`` lines), plain or zstd-compressed;
- Daedalus raw segments (``{"recv_ns":...,"conn":...,"msg":<frame>}``, control lines with
  ``event``, invalid frames as ``"raw":"<text>"``), a file or a directory of segments.

Frames are kept as the exact bytes that were received; only the digits of the envelope's
``sequence_num`` are cut out so each connection can renumber them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from daedalus.capture.records import iter_lines, split_frame_record
from daedalus.sim.protocol import SUBSCRIBE_NAME

_SEQUENCE = re.compile(rb'"sequence_num":\s*(\d+)')
_CHANNEL = re.compile(rb'"channel":\s*"([^"]*)"')


@dataclass(frozen=True)
class RecordedFrame:
    ts: float
    channel: str | None  # subscribe name (``level2``); None for acks and unknown frames
    head: bytes  # everything before the sequence_num digits
    tail: bytes  # everything after them (empty head+tail: the frame had no sequence_num)

    def render(self, sequence_num: int) -> bytes:
        if not self.tail:
            return self.head
        return self.head + str(sequence_num).encode() + self.tail


@dataclass
class Recording:
    frames: list[RecordedFrame] = field(default_factory=list)
    products_response: bytes | None = None
    products: set[str] = field(default_factory=set)
    skipped: int = 0


def _split_frame(ts: float, frame: bytes) -> RecordedFrame:
    head_end = frame.find(b'"events"')
    scope = frame if head_end < 0 else frame[:head_end]
    channel_match = _CHANNEL.search(scope)
    wire = channel_match.group(1).decode() if channel_match else None
    channel = SUBSCRIBE_NAME.get(wire) if wire else None
    seq = _SEQUENCE.search(scope)
    if seq is None:
        return RecordedFrame(ts, channel, frame, b"")
    return RecordedFrame(ts, channel, frame[: seq.start(1)], frame[seq.end(1) :])


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        segments = (p for p in path.rglob("segment_*") if p.suffix in (".ndjson", ".zst"))
        return sorted(segments, key=lambda p: (p.name, str(p)))  # names sort in time, whatever their folder
    return [path]


def load_recording(path: str | Path) -> Recording:
    """Read a recording (file or directory of segments) into memory, in recorded order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recording {path} does not exist")
    rec = Recording()
    for file in _files(path):
        for line in iter_lines(file):
            record = split_frame_record(line)
            if record is not None:  # a Daedalus segment record carrying a frame verbatim
                rec.frames.append(_split_frame(record[0] / 1e9, record[2]))
                continue
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                rec.skipped += 1  # a torn or foreign line: the rest of the recording still plays
                continue
            if "recv_ns" in doc:  # control line, or an invalid frame kept as text
                if "raw" in doc:
                    rec.frames.append(RecordedFrame(doc["recv_ns"] / 1e9, None, doc["raw"].encode(), b""))
                continue
            kind = doc.get("t")
            if kind == "recv":
                rec.frames.append(_split_frame(float(doc["ts"]), doc["data"].encode()))
            elif kind == "http" and "/market/products" in doc.get("url", "") and "product_type" not in doc["url"]:
                rec.products_response = doc["data"].encode()
    for frame in rec.frames:
        for match in re.finditer(rb'"product_id":"([^"]+)"', frame.head[:4096] + frame.tail[:4096]):
            rec.products.add(match.group(1).decode())
    return rec
