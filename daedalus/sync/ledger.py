"""The local record of verified uploads: one JSON line per object, appended and fsynced.

A line is written only after the remote object was verified (size and SHA-256 on a HEAD),
so a line means "this exact file is safely in the bucket". A torn last line (a crash mid
append) is ignored, and the next append starts on a fresh line.

Multipart uploads in progress live in the same file as separate lines, so that a run killed
mid-upload resumes from the parts already sent: ``{"upload": {...}}`` when the upload is
created (its id, key, and the file's size, mtime and SHA-256 it was created for, and the part
size), ``{"part": {...}}`` for each part the server acknowledged (number and ETag), and
``{"upload_end": id}`` once the upload completed (after its verified line) or was aborted.
None of these has the keys of a verified line, so older readers skip them.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from daedalus.capture.segments import write_all


@dataclass(frozen=True)
class LedgerEntry:
    path: str  # relative to the data dir, '/'-separated
    size: int
    mtime_ns: int
    sha256: str
    key: str


@dataclass
class UploadRecord:
    """A multipart upload in progress for the file at ``path`` (relative to the data dir)."""

    path: str
    key: str
    upload_id: str
    size: int
    mtime_ns: int
    sha256: str
    part_size: int
    parts: dict[int, str] = field(default_factory=dict)  # part number -> ETag, as acknowledged

    def fields(self) -> dict[str, object]:
        return {"path": self.path, "key": self.key, "upload_id": self.upload_id, "size": self.size,
                "mtime_ns": self.mtime_ns, "sha256": self.sha256, "part_size": self.part_size}  # fmt: skip


class Ledger:
    """``<data_dir>/processed/_state/sync.ledger.jsonl`` (or any path given)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, LedgerEntry] = {}
        self._uploads: dict[str, UploadRecord] = {}  # upload id -> record, in progress only
        self._lock = threading.Lock()
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
                if isinstance(record, dict) and ({"upload", "part", "upload_end"} & record.keys()):
                    self._load_upload_line(record)
                    continue
                entry = LedgerEntry(str(record["path"]), int(record["size"]), int(record["mtime_ns"]),
                                    str(record["sha256"]), str(record["key"]))  # fmt: skip
            except (ValueError, KeyError, TypeError):
                continue  # a torn or foreign line: that file is simply uploaded again
            self._entries[entry.path] = entry

    def _load_upload_line(self, record: dict[str, object]) -> None:
        if "upload" in record:
            up = record["upload"]
            if not isinstance(up, dict):
                raise TypeError("not an upload record")
            upload = UploadRecord(str(up["path"]), str(up["key"]), str(up["upload_id"]), int(up["size"]),
                                  int(up["mtime_ns"]), str(up["sha256"]), int(up["part_size"]))  # fmt: skip
            self._uploads[upload.upload_id] = upload
        elif "part" in record:
            part = record["part"]
            if not isinstance(part, dict):
                raise TypeError("not a part record")
            known = self._uploads.get(str(part["upload_id"]))
            if known is not None:
                known.parts[int(part["number"])] = str(part["etag"])
        else:
            self._uploads.pop(str(record["upload_end"]), None)

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
        with self._lock:
            self._append(asdict(entry))
            self._entries[entry.path] = entry

    # multipart uploads in progress

    def uploads(self) -> list[UploadRecord]:
        """Every upload in progress (created, neither completed nor aborted)."""
        with self._lock:
            return list(self._uploads.values())

    def upload_for(self, path: str) -> UploadRecord | None:
        """The newest upload in progress for ``path``, if any."""
        with self._lock:
            found = [u for u in self._uploads.values() if u.path == path]
        return found[-1] if found else None

    def begin_upload(self, upload: UploadRecord) -> None:
        """Append (and fsync) the record of a newly created multipart upload."""
        with self._lock:
            self._append({"upload": upload.fields()})
            self._uploads[upload.upload_id] = upload

    def record_part(self, upload_id: str, number: int, etag: str) -> None:
        """Append (and fsync) one part the server acknowledged."""
        with self._lock:
            self._append({"part": {"upload_id": upload_id, "number": number, "etag": etag}})
            known = self._uploads.get(upload_id)
            if known is not None:
                known.parts[number] = etag

    def end_upload(self, upload_id: str) -> None:
        """Append (and fsync) that an upload completed or was aborted: nothing to resume."""
        with self._lock:
            self._append({"upload_end": upload_id})
            self._uploads.pop(upload_id, None)

    def _append(self, record: dict[str, object]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:  # a torn last line from a crash: end it, so this line stands alone
                with self.path.open("rb") as existing:
                    existing.seek(size - 1)
                    if existing.read(1) != b"\n":
                        line = b"\n" + line
            write_all(fd, line)  # os.write may write less than asked
            os.fsync(fd)
        finally:
            os.close(fd)
