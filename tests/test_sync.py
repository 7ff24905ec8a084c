"""``daedalus sync`` against moto's standalone S3 server over real HTTP on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from daedalus.config import DaedalusConfig, SyncConfig
from daedalus.layout import DataLayout
from daedalus.sync.engine import LEDGER_NAME, discover, sync_once
from daedalus.sync.ledger import Ledger, LedgerEntry
from daedalus.sync.s3 import SyncError, make_client, parse_destination, scrub
from tests.s3_server import BUCKET, KEY_ID, REGION, SECRET, S3Server, s3_auth_server

__all__ = ["s3_auth_server"]  # fixture (s3_server: conftest.py)

PREFIX = "pi-1/daedalus"


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_tree(root: Path) -> tuple[set[str], set[str]]:
    """A small realistic data dir: ``(names that must move, names that must not)``."""
    layout = DataLayout(root)
    moved: list[Path] = []
    for counter in (1, 2):
        lines = 200 if counter == 1 else 220_000  # the second is ~6 MiB: a multipart upload below
        body = b"".join(json.dumps({"seq": i, "counter": counter}).encode() + b"\n" for i in range(lines))
        moved.append(write(layout.archive("coinbase") / f"segment_20260809T21_{counter:05d}.ndjson", body))
    ccxt_dir = layout.raw_partition_dir("archive", "ccxt", "trades", exchange="kraken", symbol="BTC/USD",
                                        hour="20260809T21")  # fmt: skip
    raw_table = pa.table({"price": [1.0, 2.0, 3.0], "amount": [0.1, 0.2, 0.3]})
    ccxt_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(raw_table, ccxt_dir / "segment_20260809T21_00001.parquet")
    moved.append(ccxt_dir / "segment_20260809T21_00001.parquet")
    for product, prices in (("BTC-USD", [60000.0, 60001.5]), ("ETH-USD", [3000.0, 3001.0, 3002.0])):
        part = layout.part_file("coinbase", "ticker", {"product_id": product, "date": "2026-08-09"},
                                "segment_20260809T21_00001")  # fmt: skip
        part.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"price": prices}), part)
        moved.append(part)
    skipped = [
        write(layout.active("coinbase") / "segment_20260809T22_00001.ndjson", b"{}\n"),
        write(layout.processing("coinbase") / "segment_20260809T21_00003.ndjson", b"{}\n"),
        write(layout.ready("coinbase") / "segment_20260809T21_00004.ndjson", b"{}\n"),
        write(layout.quarantine("coinbase") / "segment_20260809T20_00001.ndjson", b"torn"),
        write(layout.archive("coinbase") / "segment_20260809T21_00005.ndjson.tmp", b"half"),
        write(layout.channel_dir("coinbase", "ticker") / "product_id=BTC-USD" / ".hidden.parquet", b"x"),
        write(layout.channel_dir("coinbase", "ticker") / "part-x.parquet.tmp", b"x"),
        write(layout.state_file("coinbase"), b"{}"),
    ]
    rel = {p.relative_to(root).as_posix() for p in moved}
    return rel, {p.relative_to(root).as_posix() for p in skipped}


def config_for(root: Path, server: S3Server, **sync: object) -> DaedalusConfig:
    values: dict[str, object] = {"enabled": True, "destination": f"s3://{BUCKET}/{PREFIX}",
                                 "endpoint_url": server.endpoint, "region": REGION,
                                 "access_key_id": KEY_ID, "secret_access_key": SECRET}  # fmt: skip
    values.update(sync)
    return DaedalusConfig(data_dir=root, sync=SyncConfig(**values))  # type: ignore[arg-type]


def remote(server: S3Server) -> dict[str, dict]:
    client = server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    return {key: client.head_object(Bucket=BUCKET, Key=key) for key in keys}


def test_destination_client_and_scrub() -> None:
    assert parse_destination("s3://bucket") == ("bucket", "")
    assert parse_destination("s3://my.bucket/a//b/") == ("my.bucket", "a/b")
    with pytest.raises(ValueError):
        parse_destination("s3://bucket/a/../b")
    sync = SyncConfig(destination="s3://bkt/p", access_key_id="AKIDX", secret_access_key="s3cr3t")
    assert scrub("key AKIDX secret s3cr3t", sync) == "key *** secret ***"
    client = make_client(sync)
    assert client.meta.config.request_checksum_calculation == "when_required"
    assert client.meta.config.response_checksum_validation == "when_required"
    assert client.meta.config.retries["mode"] == "standard"


def test_ledger_append_and_torn_line(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_NAME
    ledger = Ledger(path)
    ledger.record(LedgerEntry("raw/archive/a/x", 10, 5, "ab" * 32, "p/raw/archive/a/x"))
    with path.open("ab") as handle:
        handle.write(b'{"path": "raw/archive/a/y", "size": 3')  # torn by a crash
    again = Ledger(path)
    assert again.is_synced("raw/archive/a/x", 10, 5) and not again.is_synced("raw/archive/a/x", 11, 5)
    assert again.get("raw/archive/a/y") is None
    again.record(LedgerEntry("raw/archive/a/z", 1, 1, "cd" * 32, "k"))
    assert len(Ledger(path)) == 2


def test_uploads_tree_verifies_skips_and_reads_back(tmp_path: Path, s3_server: S3Server,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    root = tmp_path / "data"
    moved, skipped = make_tree(root)
    config = config_for(root, s3_server)
    assert {f.rel for f in discover(config)} == moved
    dry = sync_once(config, make_client(config.sync), dry_run=True)
    assert dry.pending_files == len(moved) and dry.files_uploaded == 0 and not remote(s3_server)
    # small multipart threshold: the ccxt Parquet and the NDJSON segments go up in parts
    summary = sync_once(config, make_client(config.sync), multipart_threshold=5 * 1024 * 1024,
                        multipart_chunksize=5 * 1024 * 1024)  # fmt: skip
    assert summary.files_uploaded == summary.verified == len(moved) and summary.failed == 0
    objects = remote(s3_server)
    assert set(objects) == {f"{PREFIX}/{rel}" for rel in moved}
    for rel in moved:
        head = objects[f"{PREFIX}/{rel}"]
        data = (root / rel).read_bytes()
        assert head["ContentLength"] == len(data)
        assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    big = objects[f"{PREFIX}/raw/archive/coinbase/segment_20260809T21_00002.ndjson"]
    assert big["ETag"].strip('"').endswith("-2")  # went up in two parts
    assert all((root / rel).exists() for rel in moved | skipped)  # nothing deleted by default

    second = sync_once(config, make_client(config.sync))
    assert second.files_uploaded == 0 and second.skipped == len(moved)

    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fs = pafs.S3FileSystem(access_key=KEY_ID, secret_key=SECRET, region=REGION, scheme="http",
                           endpoint_override=f"127.0.0.1:{s3_server.port}")  # fmt: skip
    dataset = ds.dataset(f"{BUCKET}/{PREFIX}/processed/coinbase/ticker", filesystem=fs, format="parquet",
                         partitioning="hive")  # fmt: skip
    table = dataset.to_table().sort_by("price")
    assert table.num_rows == 5
    assert set(table.column("product_id").to_pylist()) == {"BTC-USD", "ETH-USD"}
    assert set(table.column("date").to_pylist()) == {"2026-08-09"}


def test_changed_file_uploads_again(tmp_path: Path, s3_server: S3Server) -> None:
    root = tmp_path / "data"
    make_tree(root)
    config = config_for(root, s3_server)
    sync_once(config, make_client(config.sync))
    segment = DataLayout(root).archive("coinbase") / "segment_20260809T21_00001.ndjson"
    segment.write_bytes(b'{"rewritten": true}\n')
    summary = sync_once(config, make_client(config.sync))
    assert summary.files_uploaded == 1
    head = remote(s3_server)[f"{PREFIX}/raw/archive/coinbase/segment_20260809T21_00001.ndjson"]
    assert head["Metadata"]["sha256"] == hashlib.sha256(b'{"rewritten": true}\n').hexdigest()


def test_delete_after_upload_only_verified_raw_archive(tmp_path: Path, s3_server: S3Server) -> None:
    root = tmp_path / "data"
    moved, skipped = make_tree(root)
    config = config_for(root, s3_server, delete_after_upload=True)
    summary = sync_once(config, make_client(config.sync))
    archive = {rel for rel in moved if rel.startswith("raw/archive/")}
    assert summary.deleted == len(archive) == 3
    assert not any((root / rel).exists() for rel in archive)
    assert all((root / rel).exists() for rel in (moved - archive) | skipped)
    assert not (root / "raw/archive/ccxt/trades").exists()  # emptied partition folders pruned
    objects = remote(s3_server)
    assert {f"{PREFIX}/{rel}" for rel in moved} == set(objects)


def test_delete_after_upload_turned_on_later_deletes_verified(tmp_path: Path, s3_server: S3Server) -> None:
    root = tmp_path / "data"
    moved, _ = make_tree(root)
    sync_once(config_for(root, s3_server), s3_server.client())
    # someone removed one object remotely: it goes up again before its local file goes
    lost = "raw/archive/coinbase/segment_20260809T21_00002.ndjson"
    s3_server.client().delete_object(Bucket=BUCKET, Key=f"{PREFIX}/{lost}")
    config = config_for(root, s3_server, delete_after_upload=True)
    summary = sync_once(config, make_client(config.sync))
    assert summary.failed == 0 and summary.files_uploaded == 1 and summary.deleted == 3
    assert not any((root / rel).exists() for rel in moved if rel.startswith("raw/archive/"))
    assert f"{PREFIX}/{lost}" in remote(s3_server)


def test_wrong_secret_is_one_clear_error(tmp_path: Path, s3_auth_server: tuple[S3Server, str, str]) -> None:
    server, key_id, secret = s3_auth_server
    root = tmp_path / "data"
    moved, _ = make_tree(root)
    good = config_for(root, server, access_key_id=key_id, secret_access_key=secret)
    assert sync_once(good, make_client(good.sync)).verified == len(moved)
    write(DataLayout(root).archive("coinbase") / "segment_20260809T22_00001.ndjson", b"{}\n")
    wrong = "Wr0ngSecretValue-must-not-leak"
    bad = config_for(root, server, access_key_id=key_id, secret_access_key=wrong, delete_after_upload=True)
    with pytest.raises(SyncError) as caught:
        sync_once(bad, make_client(bad.sync))
    message = str(caught.value)
    assert "bad credentials" in message and BUCKET in message
    assert wrong not in message and key_id not in message and secret not in message
    assert (DataLayout(root).archive("coinbase") / "segment_20260809T22_00001.ndjson").exists()


def test_no_such_bucket_is_one_clear_error(tmp_path: Path, s3_server: S3Server) -> None:
    root = tmp_path / "data"
    make_tree(root)
    config = config_for(root, s3_server, destination="s3://no-such-bucket/x")
    with pytest.raises(SyncError, match="no such bucket"):
        sync_once(config, make_client(config.sync))


def test_server_errors_and_slow_answers_are_retried_until_the_pass_completes(
    tmp_path: Path, s3_server: S3Server
) -> None:
    """A fault-injecting proxy in front of the real server answers 500s for a while, then slowly:
    the pass retries (botocore's standard mode, capped backoff with jitter) and every object
    ends up complete and verified."""
    from tests.s3_faults import FaultProxy

    root = tmp_path / "data"
    moved, _ = make_tree(root)
    with FaultProxy(s3_server.endpoint) as proxy:
        config = config_for(root, s3_server, endpoint_url=proxy.url)
        proxy.faults.fail_next = 5
        proxy.faults.delay_seconds = 0.05
        summary = sync_once(config, make_client(config.sync))
        assert proxy.faults.failed == 5  # every injected failure was met, and retried
    assert summary.failed == 0 and summary.files_uploaded == summary.verified == len(moved), summary.errors
    objects = remote(s3_server)
    assert {key.removeprefix(f"{PREFIX}/") for key in objects} == moved
    for rel in moved:
        head = objects[f"{PREFIX}/{rel}"]
        data = (root / rel).read_bytes()
        assert head["ContentLength"] == len(data)
        assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_the_command_dry_run_once_and_a_missing_bucket(tmp_path: Path, s3_server: S3Server) -> None:
    """``daedalus sync`` as an operator runs it: a dry run says how much would move and moves
    nothing, ``--once`` moves it and says so, a second ``--once`` moves nothing, and a bucket
    that does not exist is one line and exit 2 (the supervisor will not retry that)."""
    import subprocess
    import sys

    import yaml

    root = tmp_path / "data"
    moved, _ = make_tree(root)
    settings = config_for(root, s3_server)
    sync = {"destination": settings.sync.destination, "endpoint_url": s3_server.endpoint, "region": REGION,
            "access_key_id": KEY_ID, "secret_access_key": SECRET}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(root), "sync": sync}))

    def sync_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "daedalus", "sync", "--config", str(path), *args],
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    dry = sync_cli("--dry-run")
    assert dry.returncode == 0, dry.stderr
    total = sum((root / rel).stat().st_size for rel in moved)
    assert f"dry run: {len(moved)} files, {total / 1e6:,.1f} MB would be uploaded" in dry.stdout
    assert remote(s3_server) == {}
    once = sync_cli("--once")
    assert once.returncode == 0, once.stderr
    assert f"uploaded {len(moved)} files" in once.stdout and f"verified {len(moved)}" in once.stdout
    assert len(remote(s3_server)) == len(moved)
    again = sync_cli("--once")
    assert again.returncode == 0 and "uploaded 0 files" in again.stdout
    assert f"already synced {len(moved)}" in again.stdout
    path.write_text(yaml.safe_dump({"data_dir": str(root), "sync": {**sync, "destination": "s3://no-such-bucket"}}))
    missing = sync_cli("--once")
    assert missing.returncode == 2 and "no such bucket" in missing.stderr and "Traceback" not in missing.stderr
    assert SECRET not in missing.stderr + missing.stdout


def test_continuous_sync_publishes_its_heartbeat_and_the_supervisor_plans_it(
    tmp_path: Path, s3_server: S3Server
) -> None:
    """Continuous mode: a pass every ``--interval``, a heartbeat (``run/sync.json``) with counters
    that add up across passes, a clean stop on SIGTERM; ``daedalus run`` starts it as ``sync``
    when ``sync.enabled`` (and not with ``--no-sync``)."""
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from daedalus.ops.records import read_record

    root = tmp_path / "data"
    moved, _ = make_tree(root)
    sync = {"enabled": True, "destination": f"s3://{BUCKET}/{PREFIX}", "endpoint_url": s3_server.endpoint,
            "region": REGION, "access_key_id": KEY_ID, "secret_access_key": SECRET}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(root), "sync": sync, "supervisor": {"heartbeat_seconds": 0.2}}))
    beat = DataLayout(root).heartbeat_file("sync")
    proc = subprocess.Popen([sys.executable, "-m", "daedalus", "sync", "--config", str(path), "--interval", "0.3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60

        def counters() -> dict:
            record = read_record(beat) if beat.exists() else None
            return record.get("counters", {}) if isinstance(record, dict) else {}

        while counters().get("files_verified", 0) < len(moved):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        extra = write(DataLayout(root).archive("coinbase") / "segment_20260809T23_00001.ndjson", b"{}\n")
        while counters().get("files_verified", 0) < len(moved) + 1:  # the next pass takes the new file
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        assert counters()["files_uploaded"] == len(moved) + 1 and extra.exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not beat.exists()  # removed at a clean stop
    planned = subprocess.run([sys.executable, "-m", "daedalus", "run", "--config", str(path), "--dry-run"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert planned.returncode == 0 and any(line.startswith("sync: ") and line.endswith(f"sync --config {path}")
                                           for line in planned.stdout.splitlines()), planned.stdout  # fmt: skip
    without = subprocess.run([sys.executable, "-m", "daedalus", "run", "--config", str(path), "--dry-run", "--no-sync"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "sync: " not in without.stdout


def test_a_terminal_gets_a_progress_bar_and_a_second_sync_is_refused(tmp_path: Path, s3_server: S3Server) -> None:
    """On a terminal (a pty here) ``daedalus sync --once`` draws a rich progress bar over the
    bytes it sends, with the rate, then the summary; piped (the supervisor's log) it prints only
    the summary. A second sync on the same data dir is refused (exit 1: the supervisor retries),
    since two would rewrite the ledger under each other."""
    import os
    import pty
    import subprocess
    import sys

    import yaml

    from daedalus.locks import hold_lock

    root = tmp_path / "data"
    moved, _ = make_tree(root)
    sync = {"destination": f"s3://{BUCKET}/{PREFIX}", "endpoint_url": s3_server.endpoint, "region": REGION,
            "access_key_id": KEY_ID, "secret_access_key": SECRET}  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data_dir": str(root), "sync": sync}))
    command = [sys.executable, "-m", "daedalus", "sync", "--config", str(path), "--once"]

    state = DataLayout(root).state_dir
    state.mkdir(parents=True, exist_ok=True)
    held = hold_lock(state / "sync.lock", "test")
    refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
    held.close()
    assert refused.returncode == 1 and "daedalus sync is already running" in refused.stderr, refused.stderr
    assert remote(s3_server) == {}

    primary, secondary = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "160"}
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=secondary, stderr=subprocess.PIPE, env=env)
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(primary)
    assert child.wait(timeout=120) == 0, child.stderr.read() if child.stderr else ""
    text = out.decode(errors="replace")
    total = sum((root / rel).stat().st_size for rel in moved)
    assert "━" in text and f"{len(moved)} files" in text  # the bar, over this pass's backlog
    assert f"{total / 1e6:.1f}/{total / 1e6:.1f} MB" in text and "/s" in text  # bytes sent of all, and the rate
    assert f"uploaded {len(moved)} files" in text
    piped = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0 and "━" not in piped.stdout and "\x1b[" not in piped.stdout
