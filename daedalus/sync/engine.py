"""One sync pass: discover closed files, upload what the ledger does not know, verify each
object (size and our own SHA-256 on a HEAD) before it is recorded, and delete raw archive
files only once their remote copy verified.

What moves (architecture 3.1), keys as ``<prefix>/<path below data_dir>``:

- ``raw/archive/**`` (and ``raw/ready/**`` only when asked: the ETL does not run here),
  when ``sync.include_raw``; never ``active/``, ``processing/`` or ``quarantine/``;
- ``processed/**`` when ``sync.include_processed``, except ``processed/_state`` (ETL
  checkpoints and this ledger: live internals, not data);
- never a ``*.tmp``, a dot-file or dot-folder, or a symlink.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from daedalus.config import DaedalusConfig, SyncConfig
from daedalus.layout import prune_empty_dirs
from daedalus.sync.ledger import Ledger, LedgerEntry
from daedalus.sync.s3 import SyncError, parse_destination, scrub

log = logging.getLogger(__name__)

SHA256_META = "sha256"  # x-amz-meta-sha256
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
HASH_CHUNK = 1024 * 1024
LEDGER_NAME = "sync.ledger.jsonl"

_PERMANENT = {
    "AccessDenied": "access denied",
    "AllAccessDisabled": "access denied",
    "AccountProblem": "access denied",
    "InvalidAccessKeyId": "bad credentials (the access key id is not known to the server)",
    "SignatureDoesNotMatch": "bad credentials (the secret access key does not match)",
    "ExpiredToken": "bad credentials (the session token expired)",
    "InvalidToken": "bad credentials (invalid session token)",
    "NoSuchBucket": "no such bucket",
    "403": "access denied or bad credentials",
}


@dataclass(frozen=True)
class SyncFile:
    path: Path
    rel: str  # below data_dir, '/'-separated: the ledger's name for it
    key: str
    size: int
    mtime_ns: int
    deletable: bool  # under raw/archive: may go once its remote copy verified


@dataclass
class SyncSummary:
    files_uploaded: int = 0
    bytes_uploaded: int = 0
    skipped: int = 0  # already in the ledger
    verified: int = 0
    failed: int = 0
    deleted: int = 0
    pending_files: int = 0  # dry run: what would move
    pending_bytes: int = 0
    errors: list[str] = field(default_factory=list)


def _walk(root: Path) -> Iterator[Path]:
    """Regular files below ``root``, recursively, sorted; no symlink, dot-entry or ``*.tmp``."""
    if not root.is_dir():
        return
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name.endswith(".tmp"):
                continue
            path = Path(folder) / name
            if path.is_symlink() or not path.is_file():
                continue
            yield path


def discover(config: DaedalusConfig, *, include_ready: bool = False) -> list[SyncFile]:
    """Every file a pass would consider, ledger or not."""
    sync = config.sync
    if sync.destination is None:
        raise SyncError("sync.destination is not set (s3://bucket/prefix)")
    _, prefix = parse_destination(sync.destination)
    layout = config.layout
    roots: list[tuple[Path, str, bool]] = []  # (folder, its name below data_dir, deletable)
    if sync.include_raw:
        roots.append((layout.raw / "archive", "raw/archive", True))
        if include_ready:
            roots.append((layout.raw / "ready", "raw/ready", False))
    if sync.include_processed:
        roots.append((config.processed_dir, "processed", False))
    found: list[SyncFile] = []
    for root, name, deletable in roots:
        for path in _walk(root):
            below = path.relative_to(root).as_posix()
            if name == "processed" and below.split("/", 1)[0] == "_state":
                continue
            rel = f"{name}/{below}"
            stat = path.stat()
            key = f"{prefix}/{rel}" if prefix else rel
            found.append(SyncFile(path, rel, key, stat.st_size, stat.st_mtime_ns, deletable))
    return found


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def permanent_error(exc: BaseException, sync: SyncConfig, bucket: str) -> SyncError | None:
    """A :class:`SyncError` naming the problem if ``exc`` is permanent, else None."""
    if isinstance(exc, NoCredentialsError):
        return SyncError("S3 sync failed: no credentials (set sync.access_key_id/secret_access_key "
                         "or the standard AWS credential chain)")  # fmt: skip
    code = ""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
    elif isinstance(exc, S3UploadFailedError):
        code = next((c for c in _PERMANENT if not c.isdigit() and c in str(exc)), "")
    if code not in _PERMANENT:
        return None
    return SyncError(scrub(f"S3 sync to bucket {bucket!r} failed: {_PERMANENT[code]} ({code})", sync))


class SyncPass:
    """One pass over a data dir; ``run()`` returns its :class:`SyncSummary`."""

    def __init__(self, config: DaedalusConfig, client: Any, *, ledger: Ledger | None = None,
                 include_ready: bool = False, dry_run: bool = False,
                 multipart_threshold: int = MULTIPART_THRESHOLD,
                 multipart_chunksize: int = MULTIPART_CHUNKSIZE) -> None:  # fmt: skip
        if config.sync.destination is None:
            raise SyncError("sync.destination is not set (s3://bucket/prefix)")
        self.config = config
        self.sync = config.sync
        self.client = client
        self.bucket, self.prefix = parse_destination(config.sync.destination)
        self.ledger = ledger if ledger is not None else Ledger(config.layout.state_dir / LEDGER_NAME)
        self.include_ready = include_ready
        self.dry_run = dry_run
        bandwidth = self.sync.bandwidth_limit_mbps
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=self.sync.max_concurrency,
            use_threads=True,
            max_bandwidth=int(bandwidth * 1_000_000 / 8) if bandwidth else None,
        )
        # A bandwidth limit holds per transfer: with one file at a time it holds for the pass.
        self.workers = 1 if bandwidth else self.sync.max_concurrency
        self.summary = SyncSummary()
        self._lock = threading.Lock()
        self._fatal: SyncError | None = None

    def preflight(self) -> None:
        """One cheap request that turns a wrong bucket or key into one clear error up front."""
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as exc:
            error = permanent_error(exc, self.sync, self.bucket)
            if error is not None:
                raise error from None
            raise SyncError(scrub(f"S3 sync to bucket {self.bucket!r} failed: {exc}", self.sync)) from None

    def run(self) -> SyncSummary:
        files = discover(self.config, include_ready=self.include_ready)
        todo: list[SyncFile] = []
        for item in files:
            if self.ledger.is_synced(item.rel, item.size, item.mtime_ns, item.key):
                self.summary.skipped += 1
                if item.deletable and self.sync.delete_after_upload and not self.dry_run:
                    todo.append(item)  # verified on a HEAD again before it goes
            else:
                todo.append(item)
        if self.dry_run:
            pending = [item for item in todo if not self.ledger.is_synced(item.rel, item.size, item.mtime_ns)]
            self.summary.pending_files = len(pending)
            self.summary.pending_bytes = sum(item.size for item in pending)
            return self.summary
        if not todo:
            return self.summary
        self.preflight()
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sync") as pool:
            for _ in pool.map(self._one, todo):
                pass
        if self._fatal is not None:
            raise self._fatal
        return self.summary

    def _one(self, item: SyncFile) -> None:
        if self._fatal is not None:
            return
        try:
            entry = self.ledger.get(item.rel)
            if entry is not None and self.ledger.is_synced(item.rel, item.size, item.mtime_ns, item.key):
                if self._verify(item.key, item.size, entry.sha256):
                    self._delete(item)
                    return
                log.warning("%s is in the ledger but not (or not intact) in the bucket: uploading it again", item.rel)
            self._upload(item)
        except Exception as exc:  # one file's failure must not stop the pass
            error = permanent_error(exc, self.sync, self.bucket)
            with self._lock:
                if error is not None:
                    self._fatal = self._fatal or error
                    return
                self.summary.failed += 1
                self.summary.errors.append(scrub(f"{item.rel}: {exc}", self.sync))
            log.warning("sync of %s failed: %s", item.rel, scrub(str(exc), self.sync))

    def _upload(self, item: SyncFile) -> None:
        digest = sha256_file(item.path)
        self.client.upload_file(str(item.path), self.bucket, item.key, Config=self.transfer,
                                ExtraArgs={"Metadata": {SHA256_META: digest}})  # fmt: skip
        with self._lock:
            self.summary.files_uploaded += 1
            self.summary.bytes_uploaded += item.size
        stat = item.path.stat()
        if stat.st_size != item.size or stat.st_mtime_ns != item.mtime_ns:
            raise RuntimeError("changed while it was uploaded; next pass uploads it again")
        if not self._verify(item.key, item.size, digest):
            raise RuntimeError(f"remote object {item.key} did not verify (size or sha256 differ)")
        with self._lock:
            self.summary.verified += 1
            self.ledger.record(LedgerEntry(item.rel, item.size, item.mtime_ns, digest, item.key))
        self._delete(item)

    def _verify(self, key: str, size: int, digest: str) -> bool:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return int(head.get("ContentLength", -1)) == size and head.get("Metadata", {}).get(SHA256_META) == digest

    def _delete(self, item: SyncFile) -> None:
        if not (item.deletable and self.sync.delete_after_upload):
            return
        stat = item.path.stat()
        if stat.st_size != item.size or stat.st_mtime_ns != item.mtime_ns:
            return  # not the file that verified
        item.path.unlink()
        prune_empty_dirs(item.path.parent, self.config.layout.raw / "archive")
        with self._lock:
            self.summary.deleted += 1


def sync_once(config: DaedalusConfig, client: Any, **kwargs: Any) -> SyncSummary:
    """One pass (see :class:`SyncPass`)."""
    return SyncPass(config, client, **kwargs).run()
