"""The raw NDJSON record format (architecture 3.2), in one place.

```
{"recv_ns":1786309548629007800,"conn":2,"msg":{...the exact frame...}}
{"recv_ns":1786309548629007800,"conn":2,"event":"gap","expected":5,"received":7}
{"recv_ns":1786309548629007800,"conn":2,"raw":"not json {"}
```

Frames are spliced in verbatim (never re-encoded); a newline inside a frame becomes a
space (valid JSON whitespace), so one line is one record. A frame whose outer shape is
not a JSON object (JSON whitespace around the braces is allowed and kept) is stored as a
JSON string under ``raw``. Deeper validity is not checked
on the hot path: that would mean parsing every frame; the ETL parses anyway and
quarantines a line that does not decode.

Zstd segments hold one independent frame per flush; :func:`iter_zstd_frames` is the one
way every reader (ETL clean copy, replay, start-up recovery) walks them.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import zstandard

RECORD_PREFIX = b'{"recv_ns":'
JSON_WHITESPACE = b" \t\r\n"  # RFC 8259 section 2: the only whitespace allowed around a value


def frame_line(recv_ns: int, conn: int, frame: str | bytes) -> bytes:
    """One record line for a received text frame (as text, or as the bytes it arrived as)."""
    data = frame.encode() if type(frame) is str else frame
    if not _is_utf8(data):  # kept, readable, under raw: the ETL quarantines it
        text = data.decode("utf-8", "replace").replace("\n", " ")
        return b'{"recv_ns":%d,"conn":%d,"raw":%b}\n' % (recv_ns, conn, orjson.dumps(text))
    if b"\n" in data:
        data = data.replace(b"\n", b" ")
    if (data.startswith(b"{") and data.endswith(b"}")) or _is_padded_object(data):
        return _MSG_LINE % (recv_ns, conn, data)
    return b'{"recv_ns":%d,"conn":%d,"raw":%b}\n' % (recv_ns, conn, orjson.dumps(data.decode()))


def frame_lines(recv_ns: int, conn: int, frames: list[bytes]) -> bytes:
    """The record lines of the frames one network read completed (one stamp for all).

    The usual case (every frame a one-line ``{...}`` of valid UTF-8) is built with one
    ``join`` and checked with a handful of C-level passes; a batch with any other frame
    goes through :func:`frame_line` frame by frame, so the bytes are the same either way.
    """
    if len(frames) == 1:
        return frame_line(recv_ns, conn, frames[0])
    if _plain_objects(frames):
        head = b'{"recv_ns":%d,"conn":%d,"msg":' % (recv_ns, conn)
        return head + (b"}\n" + head).join(frames) + b"}\n"
    return b"".join([frame_line(recv_ns, conn, frame) for frame in frames])


def stamped_lines(stamps: list[int], conn: int, frames: list[bytes]) -> bytes:
    """:func:`frame_lines` for the frames of several reads, ``stamps[i]`` the stamp of
    ``frames[i]``; C-level in the usual case, frame by frame otherwise (the same bytes)."""
    if _plain_objects(frames):
        return b"".join(map(_MSG_LINE.__mod__, zip(stamps, itertools.repeat(conn), frames)))
    return b"".join(map(frame_line, stamps, itertools.repeat(conn), frames))


def _plain_objects(frames: list[bytes]) -> bool:
    """Every frame a one-line ``{...}`` of valid UTF-8: spliced as it came (a few C-level passes)."""
    n = len(frames)
    if all(frames) and bytes(map(_FIRST, frames)) == b"{" * n and bytes(map(_LAST, frames)) == b"}" * n:
        joined = b"".join(frames)
        return b"\n" not in joined and (joined.isascii() or _is_utf8(joined))
    return False


_FIRST, _LAST = itemgetter(0), itemgetter(-1)
_MSG_LINE = b'{"recv_ns":%d,"conn":%d,"msg":%b}\n'


def _is_utf8(data: bytes) -> bool:
    """Valid UTF-8 (ASCII checked first: it is the usual case and much faster)."""
    if data.isascii():
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _is_padded_object(frame: bytes) -> bool:
    """An object shape with JSON whitespace around it (newlines already replaced).

    Whitespace is valid JSON around a value, so the frame is spliced in as it came,
    padding included. Checked only after the fast test failed: the hot path stays as it was.
    """
    core = frame.strip(JSON_WHITESPACE)
    return core.startswith(b"{") and core.endswith(b"}")


def control_line(recv_ns: int, conn: int, event: str, fields: dict[str, Any]) -> bytes:
    """One control line (``connect``, ``subscribe``, ``disconnect``, ``gap``, ``overflow``)."""
    head = b'{"recv_ns":%d,"conn":%d,"event":%b' % (recv_ns, conn, orjson.dumps(event))
    body = orjson.dumps(fields) if fields else b"{}"
    return head + (b"," + body[1:] if len(body) > 2 else b"}") + b"\n"


_FRAME_RECORD = re.compile(rb'^\{"recv_ns":(\d+),"conn":(\d+),"msg":')


def split_frame_record(line: bytes) -> tuple[int, int, bytes] | None:
    """``(recv_ns, conn, frame bytes)`` of a frame record line (no newline); None for
    control and ``raw`` lines. The inverse of :func:`frame_line`, without parsing the frame."""
    match = _FRAME_RECORD.match(line)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), line[match.end() : -1]


def is_complete_record(line: bytes) -> bool:
    """Cheap shape check used by recovery: a whole record line, newline excluded."""
    return line.startswith(RECORD_PREFIX) and line.endswith(b"}")


def block_lines(block: bytes) -> Iterator[bytes]:
    """The non-empty lines of a block of whole lines (as a zstd frame decodes to)."""
    for line in block.split(b"\n"):
        line = line.rstrip(b"\r")
        if line:
            yield line


def iter_lines(path: Path, damaged: list[ZstdFrame] | None = None) -> Iterator[bytes]:
    """Every non-empty line of an NDJSON file, plain or zstd (any number of frames).

    A ``.zst`` file is read frame by frame (:func:`iter_zstd_frames`), holding one frame's
    lines at a time (one capture flush): a damaged frame costs only its own lines. It is
    appended to ``damaged`` when a list is given; otherwise :class:`ZstdFrameDamaged` is
    raised where it is found, after every line before it, so that no caller that counts
    lines (the ETL matches line numbers to rows) misses a gap silently.
    """
    with path.open("rb") as raw:
        if not path.name.endswith(".zst"):
            for line in raw:
                line = line.rstrip(b"\r\n")
                if line:
                    yield line
            return
        held: list[bytes] = []
        size = [0]  # bytes held; past MAX_FRAME_HOLD_BYTES the frame is let go (memory stays bounded)

        def hold(block: bytes) -> None:
            size[0] += len(block)
            if size[0] <= MAX_FRAME_HOLD_BYTES:
                held.append(block)
            else:
                held.clear()

        for frame in iter_zstd_frames(raw, hold):
            if frame.problem is None and size[0] > MAX_FRAME_HOLD_BYTES:
                frame = ZstdFrame(frame.offset, frame.length, f"decodes to more than {MAX_FRAME_HOLD_BYTES >> 20} MB")
            if frame.problem is None:
                for block in held:
                    yield from block_lines(block)
            elif damaged is None:
                raise ZstdFrameDamaged(f"{path.name}: {frame.describe()}")
            else:
                damaged.append(frame)
            held.clear()
            size[0] = 0


# -- zstd frames ---------------------------------------------------------------------------
# With ``raw_compression: zstd`` every flush is one independent frame (architecture 3.2).
# Every reader of .zst segments (ETL clean copy, replay, start-up recovery) walks them here,
# frame by frame from the frame and block headers: a damaged frame costs only itself, and
# the decoder is fed a few blocks at a time, which bounds what one call can expand to.

ZSTD_MAGIC_BYTES = (0xFD2FB528).to_bytes(4, "little")
_SKIPPABLE_MAGIC = 0x184D2A50  # 0x184D2A50..5F: skippable frames (4-byte length, no data)
_MAX_BLOCK = 128 << 10  # zstd's Block_Maximum_Size: no block holds or decodes to more
_BLOCKS_PER_FEED = 32  # blocks given to the decoder per call: at most 4 MB of output at a time
_ONE_CALL_MAX = 32 << 20  # a frame with at most this much content is decoded in one call
_SCAN_CHUNK = 1 << 20  # bytes read at a time when looking for the next frame
MAX_LINE_BYTES = 128 << 20
"""Longest line a frame may decode to: twice the largest frame capture accepts
(``coinbase.MAX_FRAME_BYTES``, 64 MB; real BTC-USD snapshots are ~5 MB), so the envelope and
a ``raw`` frame's escaping fit. A longer run without a newline is a damaged (or hostile)
frame: it is not held in memory."""


MAX_FRAME_HOLD_BYTES = 256 << 20
"""Most a frame may decode to in :func:`iter_lines`, which holds one frame's lines until the
frame is known whole. A capture flush is far smaller (it is bounded by ``queue_maxsize``
records); a larger frame is damaged or hostile."""


class ZstdFrameDamaged(ValueError):
    """A zstd frame (or what should be one) does not decode into whole lines."""


@dataclass(frozen=True)
class ZstdFrame:
    """One frame of a zstd file as :func:`iter_zstd_frames` found it.

    A damaged one covers the bytes from where a frame should start to the next zstd magic
    number (or the end of the file): what must be kept for forensics."""

    offset: int
    length: int
    problem: str | None = None  # why it does not decode into whole lines; None: it does

    def describe(self) -> str:
        return f"damaged zstd frame at byte {self.offset} ({self.length} bytes): {self.problem}"


def iter_zstd_frames(
    handle: BinaryIO, on_lines: Callable[[bytes], object] | None = None, max_line: int = MAX_LINE_BYTES
) -> Iterator[ZstdFrame]:
    """Walk the frames of a zstd file (``handle`` is seekable), yielding each after decoding it.

    While a frame decodes, ``on_lines`` receives its content as it comes, in blocks of whole
    lines (each block ends with a newline, at most ~4 MB plus one line): the frame's verdict
    follows, and a consumer drops what it received since the previous verdict when the
    frame turns out damaged (all or nothing). After a damaged frame the walk resumes at the
    next zstd magic number, so even a damaged header costs only its own frame.
    """
    size = handle.seek(0, os.SEEK_END)
    decompressor = zstandard.ZstdDecompressor()
    pos = 0
    while pos < size:
        try:
            cuts, content_size = _frame_cuts(handle, pos, size)
            holds_data = len(cuts) > 1  # a skippable frame holds none
            if holds_data and not _decode_in_one_call(decompressor, handle, cuts, content_size, on_lines):
                _decode_in_steps(decompressor, handle, cuts, on_lines, max_line)
        except ZstdFrameDamaged as exc:
            resume = _next_magic(handle, pos + 1, size)
            yield ZstdFrame(pos, resume - pos, str(exc))
            pos = resume
            continue
        yield ZstdFrame(pos, cuts[-1] - pos)
        pos = cuts[-1]


def zstd_frame_end(handle: BinaryIO, pos: int, size: int) -> int:
    """End offset of the frame starting at ``pos``, from its headers alone (no decoding);
    :class:`ZstdFrameDamaged` when they are not those of a frame that ends within ``size``."""
    return _frame_cuts(handle, pos, size)[0][-1]


def _frame_cuts(handle: BinaryIO, pos: int, size: int) -> tuple[list[int], int]:
    """``[pos, ..., end]`` for the frame at ``pos``: the offsets between which it is fed to
    the decoder (:data:`_BLOCKS_PER_FEED` blocks each), read from its frame and block
    headers; and the content size its header declares (-1: not declared). A skippable
    frame (no data) gives ``[end]``."""
    handle.seek(pos)
    head = handle.read(18)  # magic + the longest frame header
    if len(head) < 4:
        raise ZstdFrameDamaged("the file ends inside a frame's magic number")
    magic = int.from_bytes(head[:4], "little")
    if magic & 0xFFFFFFF0 == _SKIPPABLE_MAGIC:
        end = pos + 8 + int.from_bytes(head[4:8], "little")
        if len(head) < 8 or end > size:
            raise ZstdFrameDamaged("a skippable frame runs past the end of the file")
        return [end], 0
    if head[:4] != ZSTD_MAGIC_BYTES:
        raise ZstdFrameDamaged("no zstd magic number where a frame should start")
    try:
        cursor = pos + zstandard.frame_header_size(head)
        has_checksum = zstandard.get_frame_parameters(head).has_checksum
        content_size = zstandard.frame_content_size(head)
    except zstandard.ZstdError as exc:
        raise ZstdFrameDamaged(f"unreadable frame header ({exc})") from exc
    cuts, blocks, last = [pos], 0, 0
    while not last:
        handle.seek(cursor)
        block = handle.read(3)
        if len(block) < 3:
            raise ZstdFrameDamaged("the file ends inside the frame (cut)")
        value = int.from_bytes(block, "little")
        last, kind, length = value & 1, (value >> 1) & 3, value >> 3
        if kind == 3 or length > _MAX_BLOCK:
            raise ZstdFrameDamaged("invalid block header")
        cursor += 3 + (1 if kind == 1 else length)  # an RLE block stores its byte once
        if cursor > size:
            raise ZstdFrameDamaged("the file ends inside the frame (cut)")
        blocks += 1
        if not blocks % _BLOCKS_PER_FEED and not last:
            cuts.append(cursor)
    cursor += 4 if has_checksum else 0
    if cursor > size:
        raise ZstdFrameDamaged("the file ends inside the frame's checksum (cut)")
    cuts.append(cursor)
    return cuts, content_size


def _decode_in_one_call(
    decompressor: zstandard.ZstdDecompressor,
    handle: BinaryIO,
    cuts: list[int],
    content_size: int,
    on_lines: Callable[[bytes], object] | None,
) -> bool:
    """The fast way for the usual frame (a capture flush of a few MB): one zstd call into a
    buffer of at most :data:`_ONE_CALL_MAX`, no copies, the content handed over as one
    block. False when the frame is not for it: it declares more content, or declares none
    and fails (larger, or damaged), and :func:`_decode_in_steps` must tell."""
    if content_size > _ONE_CALL_MAX:
        return False
    handle.seek(cuts[0])
    try:
        content = decompressor.decompress(
            handle.read(cuts[-1] - cuts[0]), max_output_size=_ONE_CALL_MAX, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        if content_size < 0:
            return False
        raise ZstdFrameDamaged(f"does not decode ({exc})") from exc
    if content and not content.endswith(b"\n"):
        raise ZstdFrameDamaged("the frame's content does not end with a newline")
    if content and on_lines is not None:
        on_lines(content)
    return True


def _decode_in_steps(
    decompressor: zstandard.ZstdDecompressor,
    handle: BinaryIO,
    cuts: list[int],
    on_lines: Callable[[bytes], object] | None,
    max_line: int,
) -> None:
    """Decode the frame fed between ``cuts`` a few blocks at a time; hand its whole lines to ``on_lines``.

    Raises :class:`ZstdFrameDamaged` unless it decodes exactly to its last byte into
    content that ends with a newline and has no line longer than ``max_line``."""
    decoder = decompressor.decompressobj()
    pending: list[bytes | memoryview] = []  # the line being decoded, held until its newline arrives
    pending_bytes = 0
    handle.seek(cuts[0])
    try:
        for start, end in itertools.pairwise(cuts):
            out = decoder.decompress(handle.read(end - start))
            cut = out.rfind(b"\n") + 1
            if cut:
                if on_lines is not None:  # one copy at most: none for a chunk that ends a line
                    on_lines(b"".join((*pending, memoryview(out)[:cut])) if pending or cut < len(out) else out)
                pending.clear()
                pending_bytes = 0
            if cut < len(out):
                pending.append(memoryview(out)[cut:])
                pending_bytes += len(out) - cut
                if pending_bytes > max_line:
                    raise ZstdFrameDamaged(f"a line longer than {max_line >> 20} MB (not kept in memory)")
    except zstandard.ZstdError as exc:
        raise ZstdFrameDamaged(f"does not decode ({exc})") from exc
    if not decoder.eof or decoder.unused_data:
        raise ZstdFrameDamaged("the frame's blocks do not decode to its end (corrupted data)")
    if pending_bytes:
        raise ZstdFrameDamaged("the frame's content does not end with a newline")


def _next_magic(handle: BinaryIO, start: int, size: int) -> int:
    """Offset of the next zstd magic number at or after ``start`` (``size`` if none)."""
    pos = start
    while pos < size:
        handle.seek(pos)
        found = handle.read(_SCAN_CHUNK + 3).find(ZSTD_MAGIC_BYTES)
        if found >= 0:
            return pos + found
        pos += _SCAN_CHUNK
    return size
