"""Reading the newest records of a raw segment without reading the segment.

Health judges freshness from the last records of the newest segments every few seconds (the
status server's ``/healthz``), on a Pi, next to segments of hundreds of MB: so a segment is
read only from its end, a bounded number of bytes (plain) or whole zstd frames found in a
bounded window before its end (compressed), and what a closed segment said is remembered
(it never changes), so a product that stays silent for weeks costs no reads.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable
from pathlib import Path

from daedalus.capture.records import ZSTD_MAGIC_BYTES, block_lines, iter_zstd_frames, split_frame_record

TAIL_BYTES = 8 << 20
"""Decompressed bytes read per source for freshness (over a few segments): a real BTC-USD
level2 snapshot line is ~5 MB, so a tail ending in one still holds the lines before it."""
ZSTD_WINDOW_FIRST = 256 << 10  # compressed bytes looked at first at the end of a .zst segment
ZSTD_WINDOW_MAX = 4 << 20  # ... grown 4x while no whole frame was found, up to this
# answers remembered: a few NDJSON tails per source, and the newest Parquet footer of each of
# up to health.PARQUET_PARTITIONS (256) partitions, so a status poll re-reads none of them
CACHE_ENTRIES = 512
_PRODUCT_KEY = b'"product_id"'
_PRODUCT_ID_MAX = 128  # bytes: a longer "product_id" value is not one
# a ccxt NDJSON line's frame (daedalus.sources.ccxt_raw.NdjsonRecordSink) begins with these keys,
# in this order: its product is named ``<exchange>:<symbol>`` as the ccxt heartbeat names it
_CCXT_HEAD = re.compile(rb'^\{"channel":"[a-z]{1,32}","exchange":"([^"\\]{1,64})","symbol":"([^"\\]{1,128})"')
LINE_SUFFIXES = (".ndjson", ".ndjson.zst")  # segments made of lines: the only ones with a readable tail


def tail_lines(path: Path, budget: int = TAIL_BYTES) -> list[bytes]:
    """The last whole lines of a segment (plain or zstd), about ``budget`` decompressed bytes,
    oldest first. A line being written (no newline yet) is left out; OSError when the file
    cannot be read."""
    if path.name.endswith(".zst"):
        return _zstd_tail(path, budget)
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        start = max(0, size - budget)
        handle.seek(start)
        data = handle.read(size - start)
    if start > 0:  # the first line is cut: drop it
        data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
    return list(block_lines(data[: data.rfind(b"\n") + 1]))


def _zstd_tail(path: Path, budget: int) -> list[bytes]:
    """Decode the frames that lie wholly in the last compressed bytes of the file.

    Frames are independent (one per capture flush), so decoding may start at any frame: the
    first zstd magic number in the window is tried, and :func:`iter_zstd_frames` skips to the
    next one when that was a chance match inside compressed data. The window grows while no
    whole frame fits in it (a big snapshot flush)."""
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        window = ZSTD_WINDOW_FIRST
        while True:
            start = max(0, size - window)
            handle.seek(start)
            data = handle.read(size - start)
            lines, whole = _decode_frames(data, budget)
            if whole or start == 0 or window >= ZSTD_WINDOW_MAX:
                return lines
            window *= 4


def _decode_frames(data: bytes, budget: int) -> tuple[list[bytes], bool]:
    """The last ``budget`` bytes of lines of the good frames in ``data``; whether any was good."""
    first = data.find(ZSTD_MAGIC_BYTES)
    if first < 0:
        return [], False
    kept: deque[bytes] = deque()
    kept_bytes = 0
    held: list[bytes] = []
    whole = False
    for frame in iter_zstd_frames(io.BytesIO(data[first:]), held.append):
        if frame.problem is None:
            whole = True
            kept.extend(held)
            kept_bytes += sum(len(block) for block in held)
            while kept_bytes > budget and len(kept) > 1:
                kept_bytes -= len(kept.popleft())
        held.clear()
    lines = [line for block in kept for line in block_lines(block)]
    # trim to the budget from the end (a kept block may hold more than is needed)
    total, cut = 0, len(lines)
    while cut > 0 and total + len(lines[cut - 1]) <= budget:
        cut -= 1
        total += len(lines[cut])
    return lines[cut:], whole


def newest_per_product(lines: list[bytes], wanted: set[str]) -> dict[str, float]:
    """``{product: receive time (epoch s)}`` of the newest frame record naming each wanted
    product, from the end of ``lines``; a substring search for ``"product_id"`` (no parse of
    big snapshot frames)."""
    found: dict[str, float] = {}
    for line in reversed(lines):
        record = split_frame_record(line)
        if record is None:
            continue
        recv_ns, _, frame = record
        for product in _product_ids(frame):
            if product in wanted and product not in found:
                found[product] = recv_ns / 1e9
        if len(found) == len(wanted):
            break
    return found


def _product_ids(frame: bytes) -> Iterable[str]:
    """Every ``"product_id": "<value>"`` value in a frame's JSON text, in order; for a ccxt
    unified record, its ``<exchange>:<symbol>`` (the ``product_id`` of a Coinbase ticker inside
    ccxt's ``info`` is dropped by the sink, and would not be the ccxt market's name anyway)."""
    head = _CCXT_HEAD.match(frame)
    if head is not None:
        with contextlib.suppress(UnicodeDecodeError):
            yield f"{head.group(1).decode()}:{head.group(2).decode()}"
        return
    pos = frame.find(_PRODUCT_KEY)
    while pos >= 0:
        cursor = pos + len(_PRODUCT_KEY)
        while cursor < len(frame) and frame[cursor] in b" \t\r\n:":
            cursor += 1
        if cursor < len(frame) and frame[cursor] == 0x22:  # '"'
            end = frame.find(b'"', cursor + 1, cursor + 2 + _PRODUCT_ID_MAX)
            if end > 0:
                with contextlib.suppress(UnicodeDecodeError):
                    yield frame[cursor + 1 : end].decode()
        pos = frame.find(_PRODUCT_KEY, cursor)


def first_record_time(path: Path) -> float | None:
    """Receive time of a segment's first record (epoch s), from its first bytes; None when
    it cannot be told (unreadable, empty, not a frame record)."""
    try:
        with open(path, "rb") as handle:
            if path.name.endswith(".zst"):
                import zstandard

                head = zstandard.ZstdDecompressor().stream_reader(handle).read(64)
            else:
                head = handle.read(64)
    except Exception:  # OSError, or zstandard.ZstdError (not an OSError): unknown
        return None
    prefix = b'{"recv_ns":'
    if not head.startswith(prefix):
        return None
    digits = head[len(prefix) :].split(b",", 1)[0]
    return int(digits) / 1e9 if digits.isdigit() else None


# ---- remembered answers ------------------------------------------------------------------------
_answers: OrderedDict[tuple[object, ...], tuple[dict[str, float], int]] = OrderedDict()
_answers_lock = threading.Lock()


def newest_in_tail(path: Path, wanted: Iterable[str], budget: int = TAIL_BYTES) -> tuple[dict[str, float], int]:
    """``({product: newest receive time}, bytes of lines read)`` from the tail of ``path``.

    Remembered (the last :data:`CACHE_ENTRIES`) per path, size and modification time: a
    segment in ``ready/`` never changes, so asking again about a product that is not in its
    tail costs a ``stat``, not a read of megabytes. OSError when the file cannot be read."""
    st = path.stat()
    wanted = frozenset(wanted)
    key = (str(path), st.st_size, st.st_mtime_ns, budget, wanted)
    with _answers_lock:
        if (answer := _answers.get(key)) is not None:
            _answers.move_to_end(key)
            return dict(answer[0]), answer[1]
    if path.name.endswith(".parquet"):
        times = {p: t for p, t in newest_in_parquet(path).items() if p in wanted}
        answer = (times, 0)  # a footer, not lines: the byte budget is for lines
    elif not path.name.endswith(LINE_SUFFIXES):  # an open Arrow IPC stream: no tail to read cheaply
        answer = ({}, 0)
    else:
        lines = tail_lines(path, budget)
        answer = (newest_per_product(lines, set(wanted)), sum(len(line) + 1 for line in lines))
    with _answers_lock:
        _answers[key] = answer
        while len(_answers) > CACHE_ENTRIES:
            _answers.popitem(last=False)
    return dict(answer[0]), answer[1]


def newest_in_parquet(path: Path) -> dict[str, float]:
    """``{"<exchange>:<symbol>": newest receive time}`` of a partitioned Parquet raw segment (the
    ccxt layout ``<channel>/exchange=<id>/symbol=.../segment_....parquet``) from its footer alone:
    the largest ``ts_recv`` statistic of its row groups, the market from the ``exchange=`` folder
    and the ``unified_symbol`` statistics (one symbol a file; the folder's name is sanitised).
    Empty when the file says nothing usable; OSError when it cannot be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    exchange = next((part[len("exchange="):] for part in path.parts if part.startswith("exchange=")), None)
    if not exchange:
        return {}
    try:
        meta = pq.ParquetFile(path).metadata
    except pa.ArrowInvalid:  # not (yet) Parquet: a torn file, someone else's
        return {}
    names = meta.schema.to_arrow_schema().names
    if "ts_recv" not in names or "unified_symbol" not in names:
        return {}
    ts_col, symbol_col = names.index("ts_recv"), names.index("unified_symbol")
    ts_type = meta.schema.to_arrow_schema().field("ts_recv").type
    per_second = {"s": 1, "ms": 1e3, "us": 1e6, "ns": 1e9}.get(getattr(ts_type, "unit", ""))
    if per_second is None:
        return {}
    newest: int | None = None
    symbols: set[str] = set()
    for group in range(meta.num_row_groups):
        row_group = meta.row_group(group)
        ts, symbol = row_group.column(ts_col).statistics, row_group.column(symbol_col).statistics
        if ts is None or not ts.has_min_max or symbol is None or not symbol.has_min_max:
            continue
        if isinstance(ts.max_raw, int):
            newest = ts.max_raw if newest is None else max(newest, ts.max_raw)
        symbols.update((symbol.min, symbol.max))
    if newest is None or len(symbols) != 1:
        return {}
    return {f"{exchange}:{symbols.pop()}": newest / per_second}
