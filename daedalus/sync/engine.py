"""One sync pass: discover closed files, upload what the ledger does not know, verify each
object (size and our own SHA-256 on a HEAD) before it is recorded, and delete raw archive
files only once their remote copy verified.

What moves (architecture 3.1), keys as ``<prefix>/<path below data_dir>``:

- ``raw/archive/**`` (and ``raw/ready/**`` only when asked: the ETL does not run here),
  when ``sync.include_raw``; never ``active/``, ``processing/`` or ``quarantine/``;
- ``processed/**`` when ``sync.include_processed``, except ``processed/_state`` (ETL
  checkpoints and this ledger: live internals, not data);
- never a ``*.tmp``, a dot-file or dot-folder, or a symlink.

Files at or above the multipart threshold go up through the low-level multipart calls, so
that a run killed mid-upload resumes: the ledger records the upload (id, key, the file's size,
mtime and SHA-256, the part size) and each part the server acknowledged; the next run lists the
upload's parts on the server and sends only the missing ones, if the file is unchanged, else
aborts that upload and starts over. At the start of a pass, incomplete uploads under the
prefix that no ledger record refers to (stale: another crash, an older version) are aborted.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as S3ConnectionError

from daedalus.config import DaedalusConfig, SyncConfig
from daedalus.layout import prune_empty_dirs
from daedalus.logs import get_logger
from daedalus.storage import SHA256_META, error_code, sha256_file
from daedalus.sync.ledger import Ledger, LedgerEntry, UploadRecord
from daedalus.sync.s3 import SyncError, observe_retries, parse_destination, scrub

log = get_logger(__name__)

MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
MAX_PARTS = 10_000
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
    parts_uploaded: int = 0  # multipart parts sent in this pass
    parts_resumed: int = 0  # multipart parts already on the server from an interrupted run
    stale_aborted: int = 0  # incomplete uploads aborted that no ledger record refers to
    pending_files: int = 0  # dry run: what would move
    pending_bytes: int = 0
    requests_retried: int = 0  # retries botocore made (any call: a 5xx, throttling, a refused connection)
    files_retried: int = 0  # files with at least one retried call in this pass
    bytes_retried: int = 0  # request bodies sent again by those retries
    backlog_files: int = 0  # found by discovery and not (yet) verified in the bucket
    backlog_bytes: int = 0
    unavailable: bool = False  # the pass stopped early: the server did not answer, even after retries
    discovered: bool = False  # discovery is done: the backlog figures are this pass's
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


class _RateLimit:
    """A pass-wide byte rate for the multipart path: each part reserves its airtime before it
    is sent (part-granular, so the average holds, not every instant)."""

    def __init__(self, bytes_per_second: float) -> None:
        self.rate = bytes_per_second
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + nbytes / self.rate
        if start > now:
            time.sleep(start - now)


def permanent_error(exc: BaseException, sync: SyncConfig, bucket: str) -> SyncError | None:
    """A :class:`SyncError` naming the problem if ``exc`` is permanent, else None."""
    if isinstance(exc, NoCredentialsError):
        return SyncError("S3 sync failed: no credentials (set sync.access_key_id/secret_access_key "
                         "or the standard AWS credential chain)")  # fmt: skip
    code = error_code(exc)
    if isinstance(exc, S3UploadFailedError):
        code = next((c for c in _PERMANENT if not c.isdigit() and c in str(exc)), "")
    if code not in _PERMANENT:
        return None
    return SyncError(scrub(f"S3 sync to bucket {bucket!r} failed: {_PERMANENT[code]} ({code})", sync))


class Progress:
    """What a pass reports as it goes (a terminal's progress bar); every method may be called
    from upload threads. The default reports nothing."""

    def start(self, files: int, total_bytes: int) -> None:
        """Discovery found ``files`` to upload, ``total_bytes`` in all."""

    def sent(self, nbytes: int) -> None:
        """``nbytes`` more of the backlog reached the server (negative: s3transfer rewound a retry)."""

    def close(self) -> None:
        """The pass is over."""


class SyncPass:
    """One pass over a data dir; ``run()`` returns its :class:`SyncSummary`."""

    def __init__(self, config: DaedalusConfig, client: Any, *, ledger: Ledger | None = None,
                 include_ready: bool = False, dry_run: bool = False,
                 multipart_threshold: int = MULTIPART_THRESHOLD,
                 multipart_chunksize: int = MULTIPART_CHUNKSIZE, progress: Progress | None = None) -> None:  # fmt: skip
        if config.sync.destination is None:
            raise SyncError("sync.destination is not set (s3://bucket/prefix)")
        self.config = config
        self.sync = config.sync
        self.client = client
        self.bucket, self.prefix = parse_destination(config.sync.destination)
        # a dry run may run beside a real sync: it reads the ledger but never rewrites it
        self.ledger = ledger if ledger is not None else Ledger(config.layout.state_dir / LEDGER_NAME,
                                                               compact=not dry_run)  # fmt: skip
        self.include_ready = include_ready
        self.dry_run = dry_run
        bandwidth = self.sync.bandwidth_limit_mbps
        self.multipart_threshold = multipart_threshold
        self.part_size = multipart_chunksize
        self.rate = _RateLimit(bandwidth * 1_000_000 / 8) if bandwidth else None
        self._parts_in_flight = threading.BoundedSemaphore(max(1, self.sync.max_concurrency))
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
        self.progress = progress or Progress()
        self._lock = threading.Lock()
        self._fatal: SyncError | None = None
        self._by_key: dict[str, SyncFile] = {}
        self._backlog: set[str] = set()  # rel of the files counted in the backlog
        self._retried_keys: set[str] = set()

    def preflight(self) -> None:
        """One cheap request that turns a wrong bucket or key into one clear error up front."""
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        except (ClientError, BotoCoreError) as exc:
            error = permanent_error(exc, self.sync, self.bucket)
            if error is not None:
                raise error from None
            raise

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
                self._backlog.add(item.rel)
        self.summary.backlog_files = len(self._backlog)
        self.summary.backlog_bytes = sum(item.size for item in todo if item.rel in self._backlog)
        self.summary.discovered = True
        if self.dry_run:
            self.summary.pending_files = self.summary.backlog_files
            self.summary.pending_bytes = self.summary.backlog_bytes
            return self.summary
        if not todo and not self.ledger.uploads():
            return self.summary
        self._by_key = {item.key: item for item in todo}
        observer = observe_retries(self.client)
        observer.attach(self._retried)
        self.progress.start(self.summary.backlog_files, self.summary.backlog_bytes)
        try:
            self._run(todo)
        finally:
            observer.detach(self._retried)
            self.progress.close()
        if self._fatal is not None:
            raise self._fatal
        return self.summary

    def _run(self, todo: list[SyncFile]) -> None:
        try:
            self.preflight()
        except (ClientError, BotoCoreError) as exc:  # transient, and botocore's retries ran out
            self._unavailable(exc)
            self._fail_rest(todo)
            return
        self._abort_stale({item.rel for item in todo})
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sync") as pool:
            for _ in pool.map(self._one, todo):
                pass

    def _retried(self, operation: str, key: str | None, retries: int, body_bytes: int | None) -> None:
        """A :class:`RetryObserver` sink: one call of this pass needed ``retries`` retries."""
        item = self._by_key.get(key) if key is not None else None
        if body_bytes is None:  # s3transfer's file chunk: a PutObject carries the whole file
            body_bytes = item.size if item is not None and operation == "PutObject" else 0
        with self._lock:
            self.summary.requests_retried += retries
            self.summary.bytes_retried += retries * body_bytes
            if item is not None and key not in self._retried_keys:
                self._retried_keys.add(key)
                self.summary.files_retried += 1
        log.info("sync_request_retried", operation=operation, key=key, retries=retries)

    def _unavailable(self, exc: BaseException) -> None:
        """The server did not answer (connection refused or dropped, or 5xx on the preflight)
        even after botocore's retries: stop the pass, whose files go up next pass, rather than
        spend the whole retry budget again on every file of a backlog."""
        with self._lock:
            first = not self.summary.unavailable
            self.summary.unavailable = True
        if first:
            log.error("sync_server_unavailable", endpoint=scrub(self.sync.endpoint_url or "aws", self.sync),
                      error=scrub(str(exc), self.sync), effect="pass stopped; the next pass tries again")  # fmt: skip

    def _fail_rest(self, todo: list[SyncFile]) -> None:
        with self._lock:
            self.summary.failed += len(todo)
            self.summary.errors.append(f"{len(todo)} files not tried: the server did not answer")

    def _one(self, item: SyncFile) -> None:
        if self._fatal is not None:
            return
        if self.summary.unavailable:
            self._fail_rest([item])
            return
        try:
            entry = self.ledger.get(item.rel)
            if entry is not None and self.ledger.is_synced(item.rel, item.size, item.mtime_ns, item.key):
                if self._verify(item.key, item.size, entry.sha256):
                    self._delete(item)
                    return
                log.warning("sync_object_missing", file=item.rel, effect="not (or not intact) in the bucket: "
                            "uploaded again")  # fmt: skip
            self._upload(item)
        except Exception as exc:  # one file's failure must not stop the pass
            error = permanent_error(exc, self.sync, self.bucket)
            with self._lock:
                if error is not None:
                    self._fatal = self._fatal or error
                    return
                self.summary.failed += 1
                self.summary.errors.append(scrub(f"{item.rel}: {exc}", self.sync))
            log.warning("sync_file_failed", file=item.rel, error=scrub(str(exc), self.sync))
            if isinstance(exc, S3ConnectionError):
                self._unavailable(exc)

    def _abort_stale(self, todo: set[str]) -> None:
        """Abort uploads in progress for files this pass will not upload (gone, or synced since),
        and incomplete uploads under the prefix that no ledger record refers to."""
        for upload in self.ledger.uploads():
            if upload.path not in todo:
                self._abort(upload.key, upload.upload_id)
                self.ledger.end_upload(upload.upload_id)
        known = {upload.upload_id for upload in self.ledger.uploads()}
        prefix = f"{self.prefix}/" if self.prefix else ""
        try:
            pages = self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=prefix)
            stale = [(u["Key"], u["UploadId"]) for page in pages for u in page.get("Uploads", [])
                     if u["UploadId"] not in known]  # fmt: skip
        except (ClientError, BotoCoreError) as exc:
            error = permanent_error(exc, self.sync, self.bucket)
            if error is not None:
                raise error from None
            log.warning("sync_list_uploads_failed", error=scrub(str(exc), self.sync))
            return
        for key, upload_id in stale:
            if self._abort(key, upload_id):
                log.info("sync_stale_upload_aborted", key=key)
                self.summary.stale_aborted += 1

    def _abort(self, key: str, upload_id: str) -> bool:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            if error_code(exc) in ("NoSuchUpload", "404"):
                return False  # completed, aborted or expired already
            log.warning("sync_abort_failed", key=key, error=scrub(str(exc), self.sync))
            return False
        except BotoCoreError as exc:
            log.warning("sync_abort_failed", key=key, error=scrub(str(exc), self.sync))
            return False
        return True

    def _upload(self, item: SyncFile) -> None:
        if item.size >= self.multipart_threshold and item.size > 0:
            digest = self._upload_multipart(item)
        else:
            digest = sha256_file(item.path)
            self.client.upload_file(str(item.path), self.bucket, item.key, Config=self.transfer,
                                    ExtraArgs={"Metadata": {SHA256_META: digest}},
                                    Callback=self.progress.sent)  # fmt: skip
            with self._lock:
                self.summary.bytes_uploaded += item.size
        with self._lock:
            self.summary.files_uploaded += 1
        stat = item.path.stat()
        if stat.st_size != item.size or stat.st_mtime_ns != item.mtime_ns:
            raise RuntimeError("changed while it was uploaded; next pass uploads it again")
        if not self._verify(item.key, item.size, digest):
            raise RuntimeError(f"remote object {item.key} did not verify (size or sha256 differ)")
        with self._lock:
            self.summary.verified += 1
            self.ledger.record(LedgerEntry(item.rel, item.size, item.mtime_ns, digest, item.key))
            if item.rel in self._backlog:
                self._backlog.discard(item.rel)
                self.summary.backlog_files -= 1
                self.summary.backlog_bytes -= item.size
        for upload in [u for u in self.ledger.uploads() if u.path == item.rel]:
            self.ledger.end_upload(upload.upload_id)  # completed: nothing left to resume
        self._delete(item)

    def _resumable(self, item: SyncFile) -> tuple[UploadRecord | None, dict[int, str] | None]:
        """The ledger's upload in progress for ``item`` and the parts the server holds, when the
        file is the one it was created for; otherwise that upload is aborted: ``(None, {})``.
        ``(upload, None)``: that upload was completed already (the object is there, intact)."""
        upload = self.ledger.upload_for(item.rel)
        if upload is None:
            return None, {}
        same = (upload.key, upload.size, upload.mtime_ns) == (item.key, item.size, item.mtime_ns)
        if same and upload.part_size > 0 and sha256_file(item.path) == upload.sha256:
            try:
                parts: dict[int, str] = {}
                pages = self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=upload.key,
                                                                        UploadId=upload.upload_id)  # fmt: skip
                for page in pages:
                    for part in page.get("Parts", []):
                        number, etag = int(part["PartNumber"]), str(part["ETag"])
                        expected = min(upload.part_size, item.size - (number - 1) * upload.part_size)
                        recorded = upload.parts.get(number)
                        if int(part["Size"]) == expected and (recorded is None or recorded == etag):
                            parts[number] = etag
                return upload, parts
            except ClientError as exc:
                if error_code(exc) not in ("NoSuchUpload", "404"):
                    raise
                if self._verify(item.key, item.size, upload.sha256):
                    return upload, None
                log.info("sync_upload_restarted", file=item.rel, reason="the upload is gone from the server")
        else:
            log.info("sync_upload_restarted", file=item.rel, reason="the file changed since the upload began")
            self._abort(upload.key, upload.upload_id)
        self.ledger.end_upload(upload.upload_id)
        return None, {}

    def _upload_multipart(self, item: SyncFile) -> str:
        """Create (or resume) the multipart upload of ``item``, send its missing parts in
        parallel, complete it; the SHA-256 of the file."""
        upload, done = self._resumable(item)
        if done is None:  # completed by the interrupted run, which died before its verified line
            assert upload is not None
            self.progress.sent(item.size)
            return upload.sha256
        if upload is None:
            digest = sha256_file(item.path)
            created = self.client.create_multipart_upload(Bucket=self.bucket, Key=item.key,
                                                          Metadata={SHA256_META: digest})  # fmt: skip
            part_size = max(self.part_size, -(-item.size // MAX_PARTS))  # S3 takes at most 10,000 parts
            upload = UploadRecord(item.rel, item.key, str(created["UploadId"]), item.size, item.mtime_ns, digest,
                                  part_size)  # fmt: skip
            self.ledger.begin_upload(upload)
        else:
            with self._lock:
                self.summary.parts_resumed += len(done)
            self.progress.sent(sum(min(upload.part_size, item.size - (n - 1) * upload.part_size) for n in done))
        count = -(-item.size // upload.part_size)
        missing = [number for number in range(1, count + 1) if number not in done]
        record = upload

        def send(number: int) -> tuple[int, str]:
            offset = (number - 1) * record.part_size
            length = min(record.part_size, item.size - offset)
            with self._parts_in_flight:  # pass-wide: bounds the parts held in memory and on the wire
                with item.path.open("rb") as handle:
                    handle.seek(offset)
                    body = handle.read(length)
                if len(body) != length:
                    raise RuntimeError("shrank while it was uploaded; next pass uploads it again")
                if self.rate is not None:
                    self.rate.wait(length)
                answer = self.client.upload_part(Bucket=self.bucket, Key=record.key, UploadId=record.upload_id,
                                                 PartNumber=number, Body=body)  # fmt: skip
            etag = str(answer["ETag"])
            self.ledger.record_part(record.upload_id, number, etag)
            with self._lock:
                self.summary.parts_uploaded += 1
                self.summary.bytes_uploaded += length
            self.progress.sent(length)
            return number, etag

        if missing:
            with ThreadPoolExecutor(max_workers=max(1, self.sync.max_concurrency),
                                    thread_name_prefix="sync-part") as pool:  # fmt: skip
                for number, etag in pool.map(send, missing):
                    done[number] = etag
        parts = [{"PartNumber": number, "ETag": done[number]} for number in range(1, count + 1)]
        self.client.complete_multipart_upload(Bucket=self.bucket, Key=record.key, UploadId=record.upload_id,
                                              MultipartUpload={"Parts": parts})  # fmt: skip
        return record.sha256

    def _verify(self, key: str, size: int, digest: str) -> bool:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
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
