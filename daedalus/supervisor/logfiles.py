"""A child's stdout and stderr, kept in ``<log_dir>/<child>.log`` with size rotation.

Rotation is done here (not by logrotate) because the supervisor holds the file open and
knows when a write would cross the limit: ``name.log`` becomes ``name.log.1``, ``.1``
becomes ``.2`` ... and the oldest beyond ``backups`` is removed. A write that fails (full
disk) is dropped and counted: a child's log is never worth stopping capture for.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO

from daedalus.logs import get_logger

log = get_logger(__name__)


class RotatingLog:
    def __init__(self, path: Path, *, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max(1, max_bytes)
        self.backups = backups
        self.failures = 0
        self._handle: BinaryIO | None = None
        self._size = 0

    def _open(self) -> BinaryIO:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "ab")  # noqa: SIM115 - kept open across writes
            self._size = self._handle.tell()
        return self._handle

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating first when it would cross ``max_bytes``. A write is not
        split, so a file may pass ``max_bytes`` by one write (the output pump reads 64 KiB at
        most): the logs of a child flooding its output stay bounded at about
        ``(backups + 1) * max_bytes``."""
        if not data:
            return
        try:
            handle = self._open()
            if self._size > 0 and self._size + len(data) > self.max_bytes:
                self._rotate()
                handle = self._open()
            handle.write(data)
            handle.flush()
            self._size += len(data)
        except OSError as exc:
            self.failures += 1
            self.close()
            if self.failures == 1 or self.failures % 100 == 0:
                log.warning("child_log_write_failed", path=str(self.path), error=exc.strerror or repr(exc),
                            failures=self.failures)  # fmt: skip

    def _rotate(self) -> None:
        self.close()
        if self.backups <= 0:
            self.path.unlink(missing_ok=True)
            return
        oldest = self.path.with_name(f"{self.path.name}.{self.backups}")
        oldest.unlink(missing_ok=True)
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def close(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
            self._handle = None
