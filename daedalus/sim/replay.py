"""Load recordings for ``daedalus sim --replay``.

Two formats are understood, line by line:

- the reference recording format of ``shared/data`` (``{"t":"recv","ts":...,"data":"<frame>"}``
  plus ``header``/``http``/``connect``/``send`` lines), plain or zstd-compressed;
- Daedalus raw segments (``{"recv_ns":...,"conn":...,"msg":<frame>}``, control lines with
  ``event``, invalid frames as ``"raw":"<text>"``), a file or a directory of segments.

Frames are kept as the exact bytes that were received; only the digits of the envelope's
``sequence_num`` are cut out so each connection can renumber them. Frames may use any
JSON spacing (compact, ``json.dumps`` defaults, pretty-printed): the envelope keys and
product ids are found with whitespace-tolerant patterns, without parsing the frames.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from daedalus.capture.records import ZstdFrame, iter_lines, split_frame_record
from daedalus.logs import get_logger
from daedalus.sim.protocol import SUBSCRIBE_NAME

log = get_logger(__name__)

_WS = rb"[ \t\n\r]*"  # JSON whitespace, allowed around every ':'
_SEQUENCE = re.compile(rb'"sequence_num"' + _WS + rb":" + _WS + rb"(\d+)")
_CHANNEL = re.compile(rb'"channel"' + _WS + rb":" + _WS + rb'"([^"]*)"')
_PRODUCT_ID = re.compile(rb'"product_id"' + _WS + rb":" + _WS + rb'"([^"\\]+)"')
PRODUCT_SCAN_BYTES = 8192
"""Product ids are looked for in the first bytes of each frame only: every event names its
product near its start (the envelope before ``sequence_num`` and the events after it are
scanned apart), and a 5 MB snapshot need not be scanned to its end."""
PROBE_LINES = 1000
"""A file whose first lines hold nothing recognisable is not a recording: stop reading it."""


class RecordingError(ValueError):
    """The path cannot be replayed (missing, unreadable, or holds no Coinbase frames)."""


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
    skipped: int = 0  # lines that were neither a frame nor a known control line
    damaged: list[str] = field(default_factory=list)  # damaged zstd frames skipped: file, where, why


def products_in(frame: bytes) -> set[str]:
    """Product ids named in the first :data:`PRODUCT_SCAN_BYTES` of a frame, whatever its spacing."""
    return {m.group(1).decode(errors="replace") for m in _PRODUCT_ID.finditer(frame, 0, PRODUCT_SCAN_BYTES)}


def _split_frame(ts: float, frame: bytes) -> RecordedFrame:
    head_end = frame.find(b'"events"')
    scope = frame if head_end < 0 else frame[:head_end]
    channel_match = _CHANNEL.search(scope)
    wire = channel_match.group(1).decode(errors="replace") if channel_match else None
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


def _readable_lines(file: Path, rec: Recording) -> Iterator[bytes]:
    """The lines of ``file``. A damaged zstd frame costs only its own lines (noted in
    ``rec.damaged``); a vanished file ends it (what was read is kept)."""
    damaged: list[ZstdFrame] = []
    try:
        yield from iter_lines(file, damaged)
    except FileNotFoundError:
        rec.damaged.append(f"{file.name}: vanished while loading")  # moved on by ingest or the ETL
    except OSError as exc:
        raise RecordingError(f"cannot read {file}: {exc.strerror or exc}") from None
    finally:
        rec.damaged += (f"{file.name}: {frame.describe()}" for frame in damaged)


def _add_line(rec: Recording, line: bytes) -> bool:
    """Add what ``line`` holds to ``rec``; False when it is a line of neither format."""
    record = split_frame_record(line)
    if record is not None:  # a Daedalus segment record carrying a frame verbatim
        _add_frame(rec, _split_frame(record[0] / 1e9, record[2]))
        return True
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False  # a torn or foreign line: the rest of the recording still plays
    if not isinstance(doc, dict):
        return False
    if isinstance(doc.get("recv_ns"), int):  # control line, or an invalid frame kept as text
        if isinstance(doc.get("raw"), str):  # sent verbatim: no sequence_num to renumber
            _add_frame(rec, RecordedFrame(doc["recv_ns"] / 1e9, None, doc["raw"].encode(), b""))
        return True
    kind = doc.get("t")
    data = doc.get("data")
    if kind == "recv" and isinstance(data, str) and isinstance(doc.get("ts"), int | float):
        _add_frame(rec, _split_frame(float(doc["ts"]), data.encode()))
        return True
    if kind == "http" and isinstance(data, str):
        url = str(doc.get("url", ""))
        if "/market/products" in url and "product_type" not in url:
            rec.products_response = data.encode()
        return True
    return kind in ("header", "connect", "send")


def _add_frame(rec: Recording, frame: RecordedFrame) -> None:
    rec.frames.append(frame)
    rec.products |= products_in(frame.head) | products_in(frame.tail)


def load_recording(path: str | Path) -> Recording:
    """Read a recording (file or directory of segments) into memory, in recorded order.

    Raises :class:`RecordingError` when ``path`` is not a file or directory, cannot be read,
    or holds no frame in either format (``/etc/passwd`` is not a recording).
    """
    path = Path(path)
    if not path.exists():
        raise RecordingError("does not exist")
    if not (path.is_file() or path.is_dir()):
        raise RecordingError("is neither a file nor a directory")
    rec = Recording()
    files = _files(path)
    if not files:
        raise RecordingError("no segment_*.ndjson[.zst] files in this directory")
    for file in files:
        recognised = False
        for number, line in enumerate(_readable_lines(file, rec), 1):
            if _add_line(rec, line):
                recognised = True
            else:
                rec.skipped += 1
                if not recognised and number >= PROBE_LINES:
                    break  # nothing recognisable so far: not a recording, stop reading it
    if not rec.frames:
        damage = f"; {rec.damaged[0]}" if rec.damaged else ""
        raise RecordingError(f"no Coinbase frames found ({rec.skipped} lines in neither recording format{damage})")
    for damage in rec.damaged:
        log.warning("sim_replay_damaged", detail=damage, kept_frames=len(rec.frames))
    return rec
