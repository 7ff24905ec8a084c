"""The local record of verified uploads: one JSON line per object, appended and fsynced.

A line is written only after the remote object was verified (size and SHA-256 on a HEAD),
so a line means "this exact file is safely in the bucket". A torn last line (a crash mid
append) is ignored, and the next append starts on a fresh line.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class LedgerEntry:
    path: str  # relative to the data dir, '/'-separated
    size: int
    mtime_ns: int
    sha256: str
    key: str


class Ledger:
    """``<data_dir>/processed/_state/sync.ledger.jsonl`` (or any path given)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, LedgerEntry] = {}
        self._load()

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                entry = LedgerEntry(str(record["path"]), int(record["size"]), int(record["mtime_ns"]),
                                    str(record["sha256"]), str(record["key"]))  # fmt: skip
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line: that file is simply uploaded again
            self._entries[entry.path] = entry

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, path: str) -> LedgerEntry | None:
        return self._entries.get(path)

    def is_synced(self, path: str, size: int, mtime_ns: int, key: str | None = None) -> bool:
        """True when ``path`` was verified in the bucket with this size and mtime (and key)."""
        entry = self._entries.get(path)
        if entry is None or entry.size != size or entry.mtime_ns != mtime_ns:
            return False
        return key is None or entry.key == key

    def record(self, entry: LedgerEntry) -> None:
        """Append ``entry`` and fsync before returning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(asdict(entry), separators=(",", ":")).encode() + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:  # a torn last line from a crash: end it, so this line stands alone
                with self.path.open("rb") as existing:
                    existing.seek(size - 1)
                    if existing.read(1) != b"\n":
                        line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._entries[entry.path] = entry
