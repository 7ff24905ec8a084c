"""Resumable multipart uploads of ``daedalus sync``: a pass SIGKILLed mid-upload resumes from
the parts already on the server, and stale incomplete uploads are aborted (moto's S3 server)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from daedalus.config import DaedalusConfig, SyncConfig
from daedalus.layout import DataLayout
from daedalus.sync.engine import LEDGER_NAME, sync_once
from daedalus.sync.ledger import Ledger, LedgerEntry, UploadRecord
from daedalus.sync.s3 import make_client
from tests.s3_server import BUCKET, KEY_ID, REGION, SECRET, S3Server

PREFIX = "pi-1/daedalus"
MIB = 1024 * 1024
PART = 5 * MIB  # S3's smallest part but the last
KILL_DEADLINE = 60.0

CHILD = """
import json, sys
from daedalus.config import DaedalusConfig, SyncConfig
from daedalus.sync.engine import sync_once
from daedalus.sync.s3 import make_client
args = json.loads(sys.argv[1])
config = DaedalusConfig(data_dir=args["root"], sync=SyncConfig(**args["sync"]))
sync_once(config, make_client(config.sync), multipart_threshold=args["part"], multipart_chunksize=args["part"])
"""


def sync_values(server: S3Server, **extra: object) -> dict[str, object]:
    values: dict[str, object] = {"enabled": True, "destination": f"s3://{BUCKET}/{PREFIX}",
                                 "endpoint_url": server.endpoint, "region": REGION,
                                 "access_key_id": KEY_ID, "secret_access_key": SECRET}  # fmt: skip
    values.update(extra)
    return values


def config_for(root: Path, server: S3Server, **extra: object) -> DaedalusConfig:
    return DaedalusConfig(data_dir=root, sync=SyncConfig(**sync_values(server, **extra)))  # type: ignore[arg-type]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def uploads(server: S3Server) -> list[tuple[str, str]]:
    answer = server.client().list_multipart_uploads(Bucket=BUCKET)
    return [(u["Key"], u["UploadId"]) for u in answer.get("Uploads", [])]


def keys(server: S3Server) -> list[str]:
    return [o["Key"] for o in server.client().list_objects_v2(Bucket=BUCKET).get("Contents", [])]


def remote_sha256(server: S3Server, key: str) -> str:
    body = server.client().get_object(Bucket=BUCKET, Key=key)["Body"]
    digest = hashlib.sha256()
    while chunk := body.read(MIB):
        digest.update(chunk)
    return digest.hexdigest()


def test_ledger_keeps_uploads_in_progress(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_NAME
    ledger = Ledger(path)
    ledger.begin_upload(UploadRecord("raw/archive/a/x", "p/raw/archive/a/x", "up-1", 30, 7, "ab" * 32, 10))
    ledger.record_part("up-1", 1, '"e1"')
    ledger.record_part("up-1", 2, '"e2"')
    ledger.begin_upload(UploadRecord("raw/archive/a/y", "p/raw/archive/a/y", "up-2", 30, 7, "cd" * 32, 10))
    ledger.end_upload("up-2")
    with path.open("ab") as handle:
        handle.write(b'{"part": {"upload_id": "up-1", "num')  # torn by a crash
    again = Ledger(path)
    assert len(again) == 0  # none of these is a verified line
    (upload,) = again.uploads()
    assert upload.upload_id == "up-1" and upload.parts == {1: '"e1"', 2: '"e2"'} and upload.part_size == 10
    assert again.upload_for("raw/archive/a/x") == upload and again.upload_for("raw/archive/a/y") is None
    again.record(LedgerEntry("raw/archive/a/x", 30, 7, "ab" * 32, "p/raw/archive/a/x"))
    again.end_upload("up-1")
    final = Ledger(path)
    assert final.is_synced("raw/archive/a/x", 30, 7) and final.uploads() == []


def test_sigkill_mid_multipart_upload_resumes_from_uploaded_parts(tmp_path: Path, s3_server: S3Server) -> None:
    root = tmp_path / "data"
    layout = DataLayout(root)
    big = write(layout.archive("coinbase") / "segment_20260809T21_00001.ndjson", os.urandom(38 * MIB + 12345))
    small = write(layout.archive("coinbase") / "segment_20260809T21_00002.ndjson", b'{"seq": 1}\n')
    size, digest = big.stat().st_size, hashlib.sha256(big.read_bytes()).hexdigest()
    count = -(-size // PART)
    assert count == 8
    big_key = f"{PREFIX}/raw/archive/coinbase/{big.name}"
    client = s3_server.client()

    # the first run is capped at 5 MB/s (about a part a second), so it is mid-upload for seconds
    args = {"root": str(root), "part": PART,
            "sync": sync_values(s3_server, bandwidth_limit_mbps=40, delete_after_upload=True)}  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + KILL_DEADLINE
        listed = 0
        while listed < 1:
            assert child.poll() is None, f"the sync finished or died before a part was up: {child.stdout.read()!r}"
            assert time.monotonic() < deadline, "no part of the upload reached the server in time"
            for key, upload_id in uploads(s3_server):
                if key == big_key:
                    listed = len(client.list_parts(Bucket=BUCKET, Key=key, UploadId=upload_id).get("Parts", []))
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    # killed mid-upload: an incomplete upload, no object, nothing local deleted, the ledger knows it
    (killed,) = [upload_id for key, upload_id in uploads(s3_server) if key == big_key]
    assert keys(s3_server) == []  # one file at a time under a bandwidth cap: the small one comes after
    assert big.exists() and small.exists()
    ledger = Ledger(layout.state_dir / LEDGER_NAME)
    assert [u.upload_id for u in ledger.uploads()] == [killed]
    assert not ledger.is_synced(big.relative_to(root).as_posix(), size, big.stat().st_mtime_ns)

    config = config_for(root, s3_server, delete_after_upload=True)
    summary = sync_once(config, make_client(config.sync), multipart_threshold=PART, multipart_chunksize=PART)
    assert summary.failed == 0, summary.errors
    assert summary.parts_resumed >= 1 and summary.parts_uploaded == count - summary.parts_resumed
    assert summary.bytes_uploaded < size
    assert summary.stale_aborted == 0  # its own upload was resumed, not taken for stale
    assert summary.verified == summary.files_uploaded == 2

    # every object complete and verified, once; no incomplete upload left; local files gone only now
    assert sorted(keys(s3_server)) == sorted([big_key, f"{PREFIX}/raw/archive/coinbase/{small.name}"])
    head = client.head_object(Bucket=BUCKET, Key=big_key)
    assert head["ContentLength"] == size and head["Metadata"]["sha256"] == digest
    assert head["ETag"].strip('"').endswith(f"-{count}")
    assert remote_sha256(s3_server, big_key) == digest
    assert uploads(s3_server) == []
    assert not big.exists() and not small.exists() and summary.deleted == 2
    assert Ledger(layout.state_dir / LEDGER_NAME).uploads() == []

    again = sync_once(config, make_client(config.sync), multipart_threshold=PART, multipart_chunksize=PART)
    assert again.files_uploaded == 0 and again.parts_uploaded == 0 and uploads(s3_server) == []


def test_stale_incomplete_uploads_under_the_prefix_are_aborted(tmp_path: Path, s3_server: S3Server) -> None:
    root = tmp_path / "data"
    write(DataLayout(root).archive("coinbase") / "segment_20260809T21_00001.ndjson", b'{"seq": 1}\n')
    client = s3_server.client()
    stale = client.create_multipart_upload(Bucket=BUCKET, Key=f"{PREFIX}/raw/archive/coinbase/old.ndjson")
    client.upload_part(Bucket=BUCKET, Key=f"{PREFIX}/raw/archive/coinbase/old.ndjson", UploadId=stale["UploadId"],
                       PartNumber=1, Body=b"x" * 100)  # fmt: skip
    others = {(key, client.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"])
              for key in ("elsewhere/file", f"{PREFIX}-sibling/file")}  # fmt: skip
    config = config_for(root, s3_server)
    summary = sync_once(config, make_client(config.sync))
    assert summary.failed == 0 and summary.verified == 1 and summary.stale_aborted == 1
    assert set(uploads(s3_server)) == others  # only what is under the prefix, and not in the ledger


def test_a_changed_file_abandons_its_upload_and_starts_over(tmp_path: Path, s3_server: S3Server) -> None:
    root = tmp_path / "data"
    layout = DataLayout(root)
    path = write(layout.archive("coinbase") / "segment_20260809T21_00001.ndjson", os.urandom(2 * PART + 10))
    rel, key = path.relative_to(root).as_posix(), f"{PREFIX}/raw/archive/coinbase/{path.name}"
    client = s3_server.client()
    # an interrupted upload of an earlier version of the file: one part up, recorded in the ledger
    old = client.create_multipart_upload(Bucket=BUCKET, Key=key, Metadata={"sha256": "00" * 32})["UploadId"]
    etag = client.upload_part(Bucket=BUCKET, Key=key, UploadId=old, PartNumber=1, Body=b"y" * PART)["ETag"]
    ledger = Ledger(layout.state_dir / LEDGER_NAME)
    ledger.begin_upload(UploadRecord(rel, key, old, path.stat().st_size, path.stat().st_mtime_ns - 1, "00" * 32, PART))
    ledger.record_part(old, 1, etag)
    config = config_for(root, s3_server)
    summary = sync_once(config, make_client(config.sync), multipart_threshold=PART, multipart_chunksize=PART)
    assert summary.failed == 0, summary.errors
    assert summary.parts_resumed == 0 and summary.parts_uploaded == 3 and summary.verified == 1
    assert uploads(s3_server) == []  # the old upload was aborted, the new one completed
    assert remote_sha256(s3_server, key) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_upload_completed_before_the_kill_is_verified_not_sent_again(tmp_path: Path, s3_server: S3Server) -> None:
    """Killed after complete_multipart_upload but before the verified ledger line: the next
    pass finds the upload gone, the object intact (HEAD: size and SHA-256), and sends nothing."""
    root = tmp_path / "data"
    layout = DataLayout(root)
    data = os.urandom(PART + 10)
    path = write(layout.archive("coinbase") / "segment_20260809T21_00001.ndjson", data)
    rel, key = path.relative_to(root).as_posix(), f"{PREFIX}/raw/archive/coinbase/{path.name}"
    digest = hashlib.sha256(data).hexdigest()
    client = s3_server.client()
    upload_id = client.create_multipart_upload(Bucket=BUCKET, Key=key, Metadata={"sha256": digest})["UploadId"]
    ledger = Ledger(layout.state_dir / LEDGER_NAME)
    ledger.begin_upload(UploadRecord(rel, key, upload_id, len(data), path.stat().st_mtime_ns, digest, PART))
    parts = []
    for number, body in ((1, data[:PART]), (2, data[PART:])):
        etag = client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload_id, PartNumber=number, Body=body)["ETag"]
        ledger.record_part(upload_id, number, etag)
        parts.append({"PartNumber": number, "ETag": etag})
    client.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
    config = config_for(root, s3_server)
    summary = sync_once(config, make_client(config.sync), multipart_threshold=PART, multipart_chunksize=PART)
    assert summary.failed == 0 and summary.verified == 1, summary.errors
    assert summary.parts_uploaded == 0 and summary.bytes_uploaded == 0
    after = Ledger(layout.state_dir / LEDGER_NAME)
    assert after.is_synced(rel, len(data), path.stat().st_mtime_ns) and after.uploads() == []


def stale_ledger(path: Path, files: int = 300, rewrites: int = 3, done_parts: int = 2000) -> Ledger:
    """A ledger grown the way months of appends grow it: every file verified ``rewrites`` times
    (it changed and went up again), a finished multipart upload of ``done_parts`` parts, and
    uploads that were aborted; plus a torn last line."""
    ledger = Ledger(path)
    for round_ in range(rewrites):
        for n in range(files):
            rel = f"processed/coinbase/ticker/part-{n:05d}.parquet"
            ledger.record(LedgerEntry(rel, 100 + round_, 7 + round_, f"{round_:02d}" * 32, f"{PREFIX}/{rel}"))
    ledger.begin_upload(UploadRecord("raw/archive/a/done", "k/done", "up-done", done_parts * 10, 1, "ab" * 32, 10))
    for number in range(1, done_parts + 1):
        ledger.record_part("up-done", number, f'"etag-{number}"')
    ledger.record(LedgerEntry("raw/archive/a/done", done_parts * 10, 1, "ab" * 32, "k/done"))
    ledger.end_upload("up-done")
    for n in range(50):
        gone = UploadRecord(f"raw/archive/a/gone-{n}", f"k/gone-{n}", f"up-gone-{n}", 30, 1, "cd" * 32, 10)
        ledger.begin_upload(gone)
        ledger.end_upload(f"up-gone-{n}")
    with path.open("ab") as handle:
        handle.write(b'{"part": {"upload_id": "up-done", "num')  # torn by a crash
    return ledger


def snapshot(ledger: Ledger) -> tuple[list[LedgerEntry], list[tuple[str, dict[int, str]]]]:
    return ledger.entries(), [(u.upload_id, dict(u.parts)) for u in ledger.uploads()]


def test_opening_a_ledger_with_thousands_of_stale_lines_compacts_it(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_NAME
    stale_ledger(path)
    # an upload still in progress: its record and parts are live and must survive
    live = Ledger(path, compact=False)
    live.begin_upload(UploadRecord("raw/archive/a/big", "k/big", "up-live", 30, 1, "ef" * 32, 10))
    live.record_part("up-live", 2, '"e2"')
    live.record_part("up-live", 1, '"e1"')
    lines_before, size_before = len(path.read_bytes().splitlines()), path.stat().st_size
    assert lines_before > 3000
    expected = snapshot(Ledger(path, compact=False))

    compacted = Ledger(path)  # opening compacts: most lines are stale
    assert snapshot(compacted) == expected
    assert snapshot(Ledger(path, compact=False)) == expected  # and so does the rewritten file
    lines = path.read_bytes().splitlines()
    assert len(lines) == compacted.lines == 301 + 3 and path.stat().st_size < size_before / 5
    assert all(json.loads(line) for line in lines)  # no torn line left
    assert not compacted.tmp_path.exists()
    (upload,) = compacted.uploads()
    assert upload.upload_id == "up-live" and upload.parts == {1: '"e1"', 2: '"e2"'}
    assert compacted.is_synced("processed/coinbase/ticker/part-00007.parquet", 102, 9)  # the last verified line
    assert not compacted.is_synced("processed/coinbase/ticker/part-00007.parquet", 100, 7)

    # appends go on in the new file; a small ledger is not rewritten at every open
    compacted.record(LedgerEntry("raw/archive/a/new", 1, 1, "00" * 32, "k/new"))
    inode = path.stat().st_ino
    again = Ledger(path)
    assert path.stat().st_ino == inode and again.lines == 305 and again.get("raw/archive/a/new") is not None


def test_a_crash_mid_compaction_is_harmless(tmp_path: Path, monkeypatch) -> None:
    """Killed before the rename: the old ledger is whole, the half-written ``.compact.tmp`` is
    never read, and the next compaction replaces it. A failing rename (a full disk, say) only
    leaves the ledger as it was."""
    path = tmp_path / LEDGER_NAME
    stale_ledger(path)
    expected = snapshot(Ledger(path, compact=False))
    original = path.read_bytes()
    tmp = Ledger(path, compact=False).tmp_path
    tmp.write_bytes(b'{"path":"raw/archive/a/phantom","size":1,"mtime_ns":1,"sha256":"00","key":"x"}\n{"pa')

    def crash(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    failed = Ledger(path)  # tries to compact, cannot
    assert snapshot(failed) == expected and path.read_bytes() == original and not tmp.exists()
    monkeypatch.undo()

    tmp.write_bytes(b'{"path":"raw/archive/a/phantom","size":1,"mtime_ns":1,"sha256":"00","key":"x"}\n{"pa')
    done = Ledger(path)
    assert snapshot(done) == expected and done.get("raw/archive/a/phantom") is None and not tmp.exists()
    assert len(path.read_bytes().splitlines()) == 301


def test_resume_works_after_the_ledger_was_compacted(tmp_path: Path, s3_server: S3Server) -> None:
    """An upload interrupted with one part on the server, in a ledger that compaction rewrites
    on open: the pass resumes it from that part (the upload id and part survived)."""
    root = tmp_path / "data"
    layout = DataLayout(root)
    data = os.urandom(2 * PART + 99)
    path = write(layout.archive("coinbase") / "segment_20260809T21_00001.ndjson", data)
    rel, key = path.relative_to(root).as_posix(), f"{PREFIX}/raw/archive/coinbase/{path.name}"
    digest = hashlib.sha256(data).hexdigest()
    ledger_path = layout.state_dir / LEDGER_NAME
    stale_ledger(ledger_path)
    client = s3_server.client()
    upload_id = client.create_multipart_upload(Bucket=BUCKET, Key=key, Metadata={"sha256": digest})["UploadId"]
    ledger = Ledger(ledger_path, compact=False)
    ledger.begin_upload(UploadRecord(rel, key, upload_id, len(data), path.stat().st_mtime_ns, digest, PART))
    etag = client.upload_part(Bucket=BUCKET, Key=key, UploadId=upload_id, PartNumber=1, Body=data[:PART])["ETag"]
    ledger.record_part(upload_id, 1, etag)
    assert len(ledger_path.read_bytes().splitlines()) > 3000

    config = config_for(root, s3_server)
    summary = sync_once(config, make_client(config.sync), multipart_threshold=PART, multipart_chunksize=PART)
    assert summary.failed == 0 and summary.verified == 1, summary.errors
    assert summary.parts_resumed == 1 and summary.parts_uploaded == 2 and summary.bytes_uploaded == len(data) - PART
    assert remote_sha256(s3_server, key) == digest and uploads(s3_server) == []
    assert len(ledger_path.read_bytes().splitlines()) < 320  # compacted, then a few lines of this pass
