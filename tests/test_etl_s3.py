"""The ETL between stores (``daedalus etl --input/--output``, :mod:`daedalus.etl.remote`)
against moto's standalone S3 server: S3 raw in, S3 processed out, equal to a local run."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import yaml
import zstandard

from daedalus.layout import DataLayout
from tests.etl_helpers import recording_lines
from tests.s3_server import BUCKET, KEY_ID, REGION, SECRET, S3Server
from tests.test_ccxt_etl import all_records, write_parquet

RAW = f"s3://{BUCKET}/pi-1/raw"
PROCESSED = f"s3://{BUCKET}/lake/processed"
DEADLINE = 120.0


def make_raw(root: Path, chunks: int = 6) -> None:
    """Raw segments of both sources under ``root/raw/ready``: the real recording cut into
    ``chunks`` Coinbase segments (one zstd, one with a bad line) and ccxt Parquet segments."""
    lines = recording_lines()[:1500]
    ready = DataLayout(root).ready("coinbase")
    ready.mkdir(parents=True, exist_ok=True)
    size = len(lines) // chunks + 1
    for i in range(chunks):
        body = b"".join(lines[i * size:(i + 1) * size])
        name = f"segment_20260809T21_{i + 1:05d}.ndjson"
        if i == 1:
            body += b'{"t":"recv","ts":1,"data":"{not json"}\n'  # one bad line: a quarantine output
        if i == 2:
            (ready / (name + ".zst")).write_bytes(zstandard.ZstdCompressor().compress(body))
        else:
            (ready / name).write_bytes(body)
    write_parquet(root, all_records())


def settings(data: Path, server: S3Server, **etl: object) -> Path:
    path = data.parent / f"{data.name}.yaml"
    path.write_text(yaml.safe_dump({
        "data_dir": str(data),
        "etl": {"compression": "zstd", **etl},
        "sync": {"endpoint_url": server.endpoint, "region": REGION, "access_key_id": KEY_ID,
                 "secret_access_key": SECRET},
    }))  # fmt: skip
    return path


def etl(config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "daedalus", "etl", "--config", str(config), "--no-progress",
                           *args], capture_output=True, text=True, timeout=DEADLINE)  # fmt: skip
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def start_etl(config: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "daedalus", "etl", "--config", str(config), "--no-progress",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def upload_tree(server: S3Server, root: Path, url: str) -> None:
    client = server.client()
    prefix = url.removeprefix(f"s3://{BUCKET}/")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(root).as_posix()}")


def remote_files(server: S3Server, url: str) -> dict[str, bytes]:
    """Every object below ``url``: key relative to it -> bytes."""
    client = server.client()
    prefix = url.removeprefix(f"s3://{BUCKET}/") + "/"
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            out[item["Key"][len(prefix):]] = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
    return out


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def datasets(files: dict[str, bytes]) -> dict[str, bytes]:
    """The dataset's Parquet files (the checkpoint and bookkeeping aside)."""
    return {key: data for key, data in files.items() if key.endswith(".parquet") and not key.startswith("_")}


def rows(root: Path, channel: str, source: str = "coinbase") -> list[tuple]:
    glob = str(root / source / channel / "**" / "*.parquet")
    return duckdb.sql(f"SELECT * FROM read_parquet('{glob}', hive_partitioning=true) ORDER BY ALL").fetchall()


def local_reference(tmp_path: Path, server: S3Server) -> dict[str, bytes]:
    """A local run of both sources on the same segments: processed files by key."""
    data = tmp_path / "local"
    make_raw(data)
    config = settings(data, server)
    for source in ("coinbase", "ccxt"):
        etl(config, "--source", source)
    return local_files(data / "processed")


def test_s3_raw_to_s3_processed_equals_a_local_run(tmp_path: Path, s3_server: S3Server) -> None:
    expected = local_reference(tmp_path, s3_server)
    source = tmp_path / "source"
    make_raw(source)
    upload_tree(s3_server, source / "raw" / "ready", f"{RAW}/archive")  # as `daedalus sync` leaves them
    config = settings(tmp_path / "worker", s3_server)
    for name in ("coinbase", "ccxt"):
        etl(config, "--source", name, "--input", RAW, "--output", PROCESSED)

    got = remote_files(s3_server, PROCESSED)
    assert datasets(expected) and datasets(got) == datasets(expected)  # file for file, byte for byte
    for channel in ("level2", "market_trades", "ticker", "book_snapshot_10", "candles", "bars_1m"):
        assert any(k.startswith(f"coinbase/{channel}/") for k in got), channel
    quarantined = [k for k in got if k.startswith("_quarantine/coinbase/") and k.endswith(".etl-rejects.ndjson")]
    assert len(quarantined) == 1 and b"{not json" in got[quarantined[0]]
    # the checkpoint lives beside the output and says the same as the local one
    for name in ("coinbase", "ccxt"):
        remote_state, local_state = json.loads(got[f"_state/{name}.json"]), json.loads(expected[f"_state/{name}.json"])
        assert remote_state == local_state
        assert got[f"_state/{remote_state['books_file']}"] == expected[f"_state/{local_state['books_file']}"]
    # row for row, read back with DuckDB with the partition columns
    back = tmp_path / "back"
    for key, data in datasets(got).items():
        (back / key).parent.mkdir(parents=True, exist_ok=True)
        (back / key).write_bytes(data)
    for channel in ("level2", "market_trades", "ticker"):
        assert rows(back, channel) == rows(tmp_path / "local" / "processed", channel)
    assert rows(back, "trades", "ccxt") == rows(tmp_path / "local" / "processed", "trades", "ccxt")
    # the input is left as it was; a second run finds nothing to do and changes nothing
    assert len(remote_files(s3_server, RAW)) == len(local_files(source / "raw" / "ready"))
    again = etl(config, "--source", "coinbase", "--input", RAW, "--output", PROCESSED)
    assert "segments: 0" in again.stdout
    assert remote_files(s3_server, PROCESSED).keys() - {"_state/coinbase.lease", "_state/ccxt.lease"} == (
        got.keys() - {"_state/coinbase.lease", "_state/ccxt.lease"}
    )
    assert not (tmp_path / "worker" / "tmp" / "etl-store-coinbase").exists()  # staging cleaned


def test_sigkill_mid_run_then_rerun_gives_the_same_dataset(tmp_path: Path, s3_server: S3Server) -> None:
    source = tmp_path / "source"
    make_raw(source, chunks=12)
    data = tmp_path / "local"  # the reference: a local run on the same 12 segments
    make_raw(data, chunks=12)
    config_local = settings(data, s3_server)
    etl(config_local, "--source", "coinbase")
    expected = local_files(data / "processed")

    upload_tree(s3_server, source / "raw" / "ready", f"{RAW}/ready")
    config = settings(tmp_path / "worker", s3_server)
    child = start_etl(config, "--source", "coinbase", "--input", RAW, "--output", PROCESSED)
    client = s3_server.client()
    marker_prefix = PROCESSED.removeprefix(f"s3://{BUCKET}/") + "/_state/coinbase.committed.d/"
    deadline = time.monotonic() + DEADLINE
    while not client.list_objects_v2(Bucket=BUCKET, Prefix=marker_prefix).get("KeyCount"):
        assert child.poll() is None, child.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "no segment published in time"
        time.sleep(0.02)
    assert child.poll() is None, "finished before it could be killed: make the input longer"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    done_before = client.list_objects_v2(Bucket=BUCKET, Prefix=marker_prefix)["KeyCount"]
    assert 1 <= done_before < 12

    rerun = etl(config, "--source", "coinbase", "--input", RAW, "--output", PROCESSED)  # takes the dead one's lease
    assert "segments: " in rerun.stdout
    got = remote_files(s3_server, PROCESSED)
    assert datasets(got) == datasets(expected)
    assert json.loads(got["_state/coinbase.json"]) == json.loads(expected["_state/coinbase.json"])
    assert len([k for k in got if k.startswith("_state/coinbase.committed.d/")]) == 12
    assert len([k for k in got if k.startswith("_state/coinbase.books-")]) == 1  # old checkpoints removed


def test_a_live_lease_keeps_a_second_etl_out(tmp_path: Path, s3_server: S3Server) -> None:
    source = tmp_path / "source"
    make_raw(source, chunks=2)
    upload_tree(s3_server, source / "raw" / "ready", f"{RAW}/ready")
    config = settings(tmp_path / "worker", s3_server)
    lease_key = PROCESSED.removeprefix(f"s3://{BUCKET}/") + "/_state/coinbase.lease"
    held = {"owner": "other-host:4242:abcd", "host": "other-host", "pid": 4242, "expires": time.time() + 600}
    client = s3_server.client()
    client.put_object(Bucket=BUCKET, Key=lease_key, Body=json.dumps(held).encode())

    refused = etl(config, "--source", "coinbase", "--input", RAW, "--output", PROCESSED, check=False)
    assert refused.returncode != 0
    assert "lease" in refused.stderr and "other-host:4242:abcd" in refused.stderr
    assert not [k for k in remote_files(s3_server, PROCESSED) if k.endswith(".parquet")]  # nothing written

    held["expires"] = time.time() - 1  # the holder stopped renewing: the lease is taken over
    client.put_object(Bucket=BUCKET, Key=lease_key, Body=json.dumps(held).encode())
    etl(config, "--source", "coinbase", "--input", RAW, "--output", PROCESSED)
    assert [k for k in remote_files(s3_server, PROCESSED) if k.endswith(".parquet")]
    assert lease_key not in {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])}  # released


def test_two_etls_at_once_process_each_segment_once(tmp_path: Path, s3_server: S3Server) -> None:
    source = tmp_path / "source"
    make_raw(source, chunks=6)
    upload_tree(s3_server, source / "raw" / "ready", f"{RAW}/ready")
    runs = [start_etl(settings(tmp_path / f"worker{i}", s3_server), "--source", "coinbase", "--input", RAW,
                      "--output", PROCESSED) for i in (1, 2)]  # fmt: skip
    outputs = [run.communicate(timeout=DEADLINE) for run in runs]
    processed = 0
    for run, (out, err) in zip(runs, outputs, strict=True):
        if run.returncode == 0:
            processed += int(out.split("segments: ", 1)[1].split(" ", 1)[0])
        else:
            assert "lease" in err and "already writing" in err, err[-2000:]
    assert processed == 6  # never a segment twice, whatever the interleaving
    assert len([k for k in remote_files(s3_server, PROCESSED) if k.startswith("_state/coinbase.committed.d/")]) == 6


def test_s3_raw_to_a_local_directory_and_bad_locations(tmp_path: Path, s3_server: S3Server) -> None:
    source = tmp_path / "source"
    make_raw(source, chunks=2)
    upload_tree(s3_server, source / "raw" / "ready", f"{RAW}/ready")
    config = settings(tmp_path / "worker", s3_server)
    out = tmp_path / "lake"
    etl(config, "--source", "coinbase", "--input", RAW, "--output", str(out))
    reference = tmp_path / "local"
    make_raw(reference, chunks=2)
    etl(settings(reference, s3_server), "--source", "coinbase")
    assert datasets(local_files(out)) == datasets(local_files(reference / "processed"))
    assert rows(out, "level2") == rows(reference / "processed", "level2")

    (out / "_state").mkdir(parents=True, exist_ok=True)
    with (out / "_state" / "coinbase.lock").open("a+") as lock:  # a local `daedalus etl` on that directory
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = etl(config, "--source", "coinbase", "--input", RAW, "--output", str(out), check=False)
    assert busy.returncode != 0 and "already writing to" in busy.stderr

    missing = etl(config, "--input", f"s3://no-such-bucket-{os.getpid()}/raw", "--output", PROCESSED, check=False)
    assert missing.returncode != 0 and "NoSuchBucket" in missing.stderr and SECRET not in missing.stderr
    wrong = etl(config, "--input", "http://example.invalid/raw", check=False)
    assert wrong.returncode != 0 and "expected s3://bucket/prefix or a directory" in wrong.stderr


def test_digest_of_published_files_is_in_their_metadata(tmp_path: Path, s3_server: S3Server) -> None:
    source = tmp_path / "source"
    make_raw(source, chunks=1)
    upload_tree(s3_server, source / "raw" / "ready", f"{RAW}/ready")
    etl(settings(tmp_path / "worker", s3_server), "--source", "coinbase", "--input", RAW, "--output", PROCESSED)
    client = s3_server.client()
    prefix = PROCESSED.removeprefix(f"s3://{BUCKET}/") + "/"
    parquet = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]
               if o["Key"].endswith(".parquet")]  # fmt: skip
    assert parquet
    for key in parquet:
        body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert client.head_object(Bucket=BUCKET, Key=key)["Metadata"]["sha256"] == hashlib.sha256(body).hexdigest()


@pytest.fixture(autouse=True)
def _no_aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
