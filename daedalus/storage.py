"""Where a job reads and writes whole files: a local directory or an S3 prefix, behind one
small interface (:class:`Store`).

The ETL keeps its exact local protocol (``*.tmp`` + rename, fsync) on a staging directory and
publishes finished files through a store (see :mod:`daedalus.etl.remote`): S3 has no rename,
but a PUT is all-or-nothing, which is the property the rename gives locally. The store adds
what S3 needs for a shared output: a SHA-256 in each object's metadata (a second writer's
different bytes under a committed name are refused) and a *lease*, an object created with a
conditional write (``If-None-Match: *``) and renewed with ``If-Match`` on its ETag, so two
jobs on one output never run at once (locally the same is a ``flock``).

S3 endpoint settings (endpoint_url, region, keys) are the ``sync:`` section's: one place for
the credentials of one store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from daedalus.capture.segments import fsync_path, write_atomically
from daedalus.config import SyncConfig
from daedalus.locks import AlreadyRunning, hold_lock

SHA256_META = "sha256"  # x-amz-meta-sha256, as daedalus sync writes it
_PERMANENT = {"AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
              "InvalidBucketName", "AuthorizationHeaderMalformed", "ExpiredToken", "InvalidToken"}  # fmt: skip


class StorageError(RuntimeError):
    """A store cannot be used: no such bucket, access denied, server unreachable after the
    client's retries. The message names the store, never a credential."""


class LeaseLost(StorageError):
    """Another job took this job's lease (it had expired): stop before publishing anything."""


@dataclass(frozen=True)
class Entry:
    key: str  # below the store's root, '/'-separated
    size: int


class Lease(Protocol):
    def renew(self) -> None: ...
    def release(self) -> None: ...


class Store(Protocol):
    """Whole files under one root; keys are '/'-separated paths below it."""

    url: str

    def list(self, prefix: str) -> Iterator[Entry]: ...
    def download(self, key: str, target: Path) -> None: ...
    def upload(self, source: Path, key: str, sha256: str) -> None: ...
    def sha256(self, key: str) -> str | None: ...
    def read(self, key: str) -> bytes | None: ...
    def write(self, key: str, data: bytes) -> None: ...
    def delete(self, key: str) -> None: ...
    def lease(self, key: str, ttl_seconds: float, holder: str) -> Lease:
        """Exclusive use of what ``key`` names, for ``ttl_seconds`` past each renewal."""
        ...


def sha256_file(path: Path) -> str:
    """The file's SHA-256 (hex), read a MiB at a time: the digest sync and the stores keep in
    each object's metadata."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def is_url(location: str | Path) -> bool:
    return str(location).startswith("s3://")


def open_store(location: str | Path, s3: SyncConfig) -> Store:
    """A store for a directory or an ``s3://bucket/prefix`` URL (endpoint settings from ``s3``)."""
    if is_url(location):
        return S3Store(str(location), s3)
    return LocalStore(Path(location))


# ---- a local directory ------------------------------------------------------------------
class LocalStore:
    """A directory: writes are ``.tmp`` + fsync + rename, so a reader never sees half a file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"{key!r} is not a key below {self.root}")
        return self.root.joinpath(*parts)

    def list(self, prefix: str) -> Iterator[Entry]:
        """Files whose key starts with ``prefix`` (a folder or part of a name, as on S3)."""
        folder = self.root.joinpath(*prefix.split("/")[:-1])
        if not folder.is_dir():
            return
        for path in sorted(folder.rglob("*")):
            key = path.relative_to(self.root).as_posix()
            if key.startswith(prefix) and path.is_file() and not path.name.endswith(".tmp"):
                yield Entry(key, path.stat().st_size)

    def download(self, key: str, target: Path) -> None:
        tmp = target.with_name(target.name + ".tmp")
        try:
            shutil.copyfile(self._path(key), tmp)
        except OSError as exc:  # e.g. claimed (moved) by a local ETL since the listing
            tmp.unlink(missing_ok=True)
            raise StorageError(f"{self.url}: reading {key}: {exc.strerror or exc}") from None
        os.replace(tmp, target)

    def upload(self, source: Path, key: str, sha256: str) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(source, tmp)
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)

    def sha256(self, key: str) -> str | None:
        path = self._path(key)
        return sha256_file(path) if path.is_file() else None

    def read(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def write(self, key: str, data: bytes) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, data)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def lease(self, key: str, ttl_seconds: float, holder: str) -> Lease:
        """A ``flock`` on ``<key>.lock``: the same lock file the local ETL job takes."""
        path = self._path(key + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        return _FileLease(hold_lock(path, holder))


class _FileLease:
    """A ``flock``: held until released or the process ends (the OS frees it on SIGKILL)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def renew(self) -> None:
        pass

    def release(self) -> None:
        self.handle.close()


# ---- an S3 prefix -----------------------------------------------------------------------
class S3Store:
    """``s3://bucket/prefix`` on any S3-compatible server, through boto3 (with the sync's
    client settings: checksums only when required, standard retries with capped backoff)."""

    def __init__(self, url: str, s3: SyncConfig) -> None:
        from daedalus.sync.s3 import make_client, parse_destination

        self.url = url.rstrip("/")
        self.bucket, self.prefix = parse_destination(url)
        self.settings = s3
        self.client = make_client(s3)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, exc: Exception, what: str) -> StorageError:
        from daedalus.sync.s3 import scrub

        code = error_code(exc)
        text = scrub(str(exc), self.settings)
        if code in _PERMANENT:
            return StorageError(f"{self.url}: {what}: {code} ({text})")
        return StorageError(f"{self.url}: {what}: the server did not answer after retries ({text})")

    def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(Bucket=self.bucket, **kwargs)
        except Exception as exc:  # botocore's ClientError and connection errors alike
            if error_code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._error(exc, what) from None

    def list(self, prefix: str) -> Iterator[Entry]:
        base = self._key("")
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                for item in page.get("Contents", []):
                    yield Entry(item["Key"][len(base):], int(item["Size"]))
        except Exception as exc:
            raise self._error(exc, f"listing {prefix}") from None

    def download(self, key: str, target: Path) -> None:
        tmp = target.with_name(target.name + ".tmp")
        try:
            self.client.download_file(self.bucket, self._key(key), str(tmp))
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            raise self._error(exc, f"reading {key}") from None
        os.replace(tmp, target)

    def upload(self, source: Path, key: str, sha256: str) -> None:
        try:
            self.client.upload_file(str(source), self.bucket, self._key(key),
                                    ExtraArgs={"Metadata": {SHA256_META: sha256}})  # fmt: skip
        except Exception as exc:
            raise self._error(exc, f"writing {key}") from None

    def sha256(self, key: str) -> str | None:
        head = self._call(f"reading {key}", "head_object", Key=self._key(key))
        return None if head is None else head.get("Metadata", {}).get(SHA256_META, "")

    def read(self, key: str) -> bytes | None:
        got = self._call(f"reading {key}", "get_object", Key=self._key(key))
        return None if got is None else got["Body"].read()

    def _read_with_etag(self, key: str) -> tuple[bytes, str] | None:
        got = self._call(f"reading {key}", "get_object", Key=self._key(key))
        return None if got is None else (got["Body"].read(), got["ETag"])

    def write(self, key: str, data: bytes) -> None:
        self._call(f"writing {key}", "put_object", Key=self._key(key), Body=data,
                   Metadata={SHA256_META: hashlib.sha256(data).hexdigest()})  # fmt: skip

    def delete(self, key: str) -> None:
        self._call(f"deleting {key}", "delete_object", Key=self._key(key))

    def lease(self, key: str, ttl_seconds: float, holder: str) -> Lease:
        """The lease object ``<key>.lease`` (see :class:`S3Lease`)."""
        return S3Lease.acquire(self, key + ".lease", ttl_seconds, holder)

    def _put_if(self, key: str, body: bytes, **condition: str) -> str | None:
        """PUT ``body`` only if the condition holds (``IfNoneMatch='*'`` or ``IfMatch=etag``);
        the new ETag, or None when the condition failed (someone else's object is there)."""
        try:
            return self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=body, **condition)["ETag"]
        except Exception as exc:
            if error_code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "NoSuchKey", "404"):
                return None
            raise self._error(exc, f"writing {key}") from None


def error_code(exc: BaseException) -> str:
    """The S3 error code of a botocore ``ClientError`` (``NoSuchKey``, ``AccessDenied``, ...);
    empty for anything else (a connection error)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


@dataclass
class S3Lease:
    """A lease object: JSON naming its holder and when it expires. Taken with a conditional
    create; renewed, and released, on the condition that its ETag is still ours; taken over
    when it has expired or its holder is a dead process on this host (SIGKILL leaves one)."""

    store: S3Store
    key: str
    ttl: float
    holder: str
    owner: str
    etag: str

    @classmethod
    def acquire(cls, store: S3Store, key: str, ttl: float, holder: str) -> S3Lease:
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        body = _lease_body(owner, ttl)
        etag = store._put_if(key, body, IfNoneMatch="*")
        if etag is None:
            current = store._read_with_etag(key)
            if current is not None:
                held = _parse_lease(current[0])
                if not _lease_is_dead(held):
                    raise AlreadyRunning(
                        f"another {holder} {store.url} (lease {key} held by {held.get('owner', '?')} until "
                        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(float(held.get('expires', 0))))})"
                    )
                etag = store._put_if(key, body, IfMatch=current[1])
            else:  # released meanwhile
                etag = store._put_if(key, body, IfNoneMatch="*")
            if etag is None:
                raise AlreadyRunning(f"another {holder} {store.url} (lease {key} was taken meanwhile)")
        return cls(store, key, ttl, holder, owner, etag)

    def renew(self) -> None:
        etag = self.store._put_if(self.key, _lease_body(self.owner, self.ttl), IfMatch=self.etag)
        if etag is None:
            raise LeaseLost(f"{self.store.url}: the lease {self.key} was taken by another job after it expired; "
                            "stopping before publishing anything more")  # fmt: skip
        self.etag = etag

    def release(self) -> None:
        # taken over, or a server without conditional deletes: then it expires by itself
        with contextlib.suppress(Exception):
            self.store.client.delete_object(Bucket=self.store.bucket, Key=self.store._key(self.key), IfMatch=self.etag)


def _lease_body(owner: str, ttl: float) -> bytes:
    host, pid, _ = owner.split(":")
    return json.dumps({"owner": owner, "host": host, "pid": int(pid), "expires": time.time() + ttl}).encode()


def _parse_lease(data: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(data)
        return parsed if isinstance(parsed, dict) else {}
    except ValueError:
        return {}


def _lease_is_dead(held: dict[str, Any]) -> bool:
    """Expired (or unreadable), or held by a process of this host that no longer exists."""
    try:
        if float(held["expires"]) < time.time():
            return True
    except (KeyError, TypeError, ValueError):
        return True
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
        try:
            os.kill(held["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def publish(store: Store, path: Path, key: str) -> None:
    """Upload ``path`` under ``key`` unless the same bytes (by SHA-256) are there already;
    refuse to replace other bytes: a committed name is never overwritten."""
    digest = sha256_file(path)
    remote = store.sha256(key)
    if remote is None:
        store.upload(path, key, digest)
    elif remote != digest:
        raise StorageError(f"{store.url}/{key} is already committed with other content (a different segment "
                           "under the same name?): not overwritten; the run stops")  # fmt: skip
