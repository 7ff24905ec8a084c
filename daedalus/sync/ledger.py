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

Appending alone would grow the file forever (a line per part of every multipart upload, a
line per re-upload of a changed file), so opening a ledger compacts it when most of its lines
are stale: the live records (the last verified line per file, and each upload in progress with
its parts) are written to ``<name>.compact.tmp`` in the same folder, fsynced, renamed over the
ledger, and the folder fsynced. A crash before the rename leaves the old ledger whole and a
``.compact.tmp`` that nothing reads (the next compaction replaces it); after the rename the new
one is complete.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from daedalus.capture.segments import write_all
from daedalus.logs import get_logger

log = get_logger(__name__)

#: compact on open when at least this many lines are stale, and at least as many as are live
COMPACT_MIN_STALE = 1000


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

    def __init__(self, path: Path, *, compact: bool = True) -> None:
        self.path = path
        self._entries: dict[str, LedgerEntry] = {}
        self._uploads: dict[str, UploadRecord] = {}  # upload id -> record, in progress only
        self._lock = threading.Lock()
        self.lines = 0  # lines in the file, live or stale
        self._load()
        if compact and self.stale_lines() >= max(COMPACT_MIN_STALE, self.live_lines()):
            self.compact()

    @property
    def tmp_path(self) -> Path:
        return self.path.with_name(self.path.name + ".compact.tmp")

    def live_lines(self) -> int:
        """Lines a compacted ledger holds: a verified line per file, each upload in progress and its parts."""
        return len(self._entries) + sum(1 + len(upload.parts) for upload in self._uploads.values())

    def stale_lines(self) -> int:
        return max(0, self.lines - self.live_lines())

    def compact(self) -> bool:
        """Rewrite the ledger with its live records only, atomically (see the module's doc).
        False when it could not (a full disk, say): the ledger stays as it was, still valid."""
        with self._lock:
            records: list[dict[str, object]] = [asdict(entry) for entry in self._entries.values()]
            for upload in self._uploads.values():
                records.append({"upload": upload.fields()})
                records.extend({"part": {"upload_id": upload.upload_id, "number": number, "etag": etag}}
                               for number, etag in sorted(upload.parts.items()))  # fmt: skip
            data = b"".join(json.dumps(record, separators=(",", ":")).encode() + b"\n" for record in records)
            before = self.lines
            try:
                self._replace(data)
            except OSError as exc:
                log.warning("sync_ledger_compact_failed", path=str(self.path), error=str(exc),
                            effect="the ledger stays as it was")  # fmt: skip
                self.tmp_path.unlink(missing_ok=True)
                return False
            self.lines = len(records)
        log.info("sync_ledger_compacted", path=str(self.path), lines_before=before, lines_after=len(records))
        return True

    def _replace(self, data: bytes) -> None:
        """``data`` becomes the ledger: tmp file, fsync, rename, fsync of the folder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.tmp_path, self.path)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            self.lines += 1
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

    def entries(self) -> list[LedgerEntry]:
        """Every verified file, oldest first."""
        with self._lock:
            return list(self._entries.values())

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
            self.lines += 1
        finally:
            os.close(fd)
