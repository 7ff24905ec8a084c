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
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import zstandard

RECORD_PREFIX = b'{"recv_ns":'
JSON_WHITESPACE = " \t\r\n"  # RFC 8259 section 2: the only whitespace allowed around a value


def frame_line(recv_ns: int, conn: int, frame: str) -> bytes:
    """One record line for a received text frame."""
    if "\n" in frame:
        frame = frame.replace("\n", " ")
    if (frame.startswith("{") and frame.endswith("}")) or _is_padded_object(frame):
        return b'{"recv_ns":%d,"conn":%d,"msg":%b}\n' % (recv_ns, conn, frame.encode())
    return b'{"recv_ns":%d,"conn":%d,"raw":%b}\n' % (recv_ns, conn, orjson.dumps(frame))


def _is_padded_object(frame: str) -> bool:
    """An object shape with JSON whitespace around it (newlines already replaced).

    Whitespace is valid JSON around a value, so the frame is spliced in as it came,
    padding included. Checked only after the fast test failed: the hot path stays as it was.
    """
    core = frame.strip(JSON_WHITESPACE)
    return core.startswith("{") and core.endswith("}")


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


def iter_lines(path: Path) -> Iterator[bytes]:
    """Every non-empty line of an NDJSON file, plain or zstd (any number of frames)."""
    with path.open("rb") as raw:
        stream: io.BufferedIOBase | io.BufferedReader
        if path.name.endswith(".zst"):
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            stream = io.BufferedReader(reader, buffer_size=1 << 20)  # type: ignore[arg-type]
        else:
            stream = raw
        for line in stream:
            line = line.rstrip(b"\r\n")
            if line:
                yield line
