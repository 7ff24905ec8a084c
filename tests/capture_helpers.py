"""Reading what capture wrote, and a full disk, for the tests."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from daedalus.capture import segments
from daedalus.capture.records import iter_lines, split_frame_record


def segment_files(root: Path, state: str = "ready") -> list[Path]:
    folder = root / "raw" / state / "coinbase"
    return sorted(p for p in folder.iterdir() if p.name.startswith("segment_")) if folder.exists() else []


def read_records(root: Path, state: str = "ready") -> list[dict[str, Any]]:
    """Every record of every segment in ``state``, in name order; each line must decode."""
    return [orjson.loads(line) for path in segment_files(root, state) for line in iter_lines(path)]


def frame_bytes(root: Path, state: str = "ready") -> list[bytes]:
    """The verbatim frames (``msg``) of every record, as spliced into the lines."""
    records = (split_frame_record(line) for path in segment_files(root, state) for line in iter_lines(path))
    return [record[2] for record in records if record is not None]


def ingest_config(data_dir: Path, ws_url: str, **ingestion: Any) -> dict[str, Any]:
    return {
        "data_dir": str(data_dir),
        "coinbase": {"ws_url": ws_url, "rest_url": ws_url.replace("ws://", "http://").removesuffix("/ws")},
        "ingestion": {"flush_interval_seconds": 0.1, "reconnect_delay": 0.05, "max_reconnect_delay": 0.2, **ingestion},
    }


def frame(i: int, pad: int = 0) -> str:
    """A ticker frame with sequence number ``i``, ``pad`` bytes longer than the shortest."""
    return f'{{"channel":"ticker","sequence_num":{i},"events":[{{"x":"{"y" * pad}"}}]}}'


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, object]]:
    """The fields of every log record called ``name``."""
    return [getattr(r, "daedalus_fields", {}) for r in caplog.records if r.getMessage() == name]


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds (a bound on a wait, not an assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


async def async_wait_until(condition: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class FullDisk:
    """While ``full``: a write of the segment writer or recovery lands half its bytes then
    fails with ENOSPC, their fsync fails with ENOSPC (delayed allocation reports it there).
    ``failures`` counts the injected errors. Only the capture module's own ``write_all`` and
    ``fsync`` are replaced: the rest of the process (the simulator, pytest) is untouched."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, full: bool = True) -> None:
        self.full = full
        self.failures = 0
        real_write_all, real_fsync = segments.write_all, segments.fsync

        def write_all(fd: int, data: bytes | memoryview) -> None:
            if self.full:
                real_write_all(fd, bytes(data)[: len(data) // 2])
                self.failures += 1
                raise OSError(errno.ENOSPC, "No space left on device")
            real_write_all(fd, data)

        def fsync(fd: int) -> None:
            if self.full:
                self.failures += 1
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(fd)

        monkeypatch.setattr(segments, "write_all", write_all)
        monkeypatch.setattr(segments, "fsync", fsync)
