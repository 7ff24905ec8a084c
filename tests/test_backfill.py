"""``daedalus etl --dask``: the backfill on a LocalCluster of 2 worker processes equals the
sequential ETL on the same segments, file for file and byte for byte, also when a worker or
the whole client is SIGKILLed mid-run."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import psutil
import pytest
import yaml

from daedalus.sim import SimConfig, SimServer
from daedalus.sim.faults import FaultConfig
from tests.capture_helpers import ingest_config, segment_files
from tests.conftest import REPO, built_once
from tests.s3_server import BUCKET, KEY_ID, REGION, SECRET, S3Server, free_port

DEADLINE = 180.0
SEGMENTS = 14


async def _capture(data: Path) -> None:
    """A real capture from the simulator with faults: dropped frames (gaps), disconnects every
    1.5 s (reconnects, fresh snapshots, replayed trades), malformed lines (quarantine)."""
    faults = FaultConfig(drop_rate=0.01, disconnect_every=1.5, malformed_rate=0.003)
    async with SimServer(SimConfig(rate=400, seed=7, levels=150, heartbeat_interval=0.2, faults=faults)) as sim:
        config = data.parent / "ingest.yaml"
        config.write_text(yaml.safe_dump(ingest_config(data, sim.ws_url, segment_max_mb=0.06)))
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "daedalus", "ingest", "--config",
                                                    str(config), stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL, cwd=REPO)  # fmt: skip
        deadline = time.monotonic() + DEADLINE
        while len(segment_files(data)) < SEGMENTS or len(sim.closed_connections) < 3:
            assert time.monotonic() < deadline, "the capture made too few segments"
            await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


@pytest.fixture(scope="module")
def raw_ready(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The capture, made once for the session and shared (read only) by every xdist worker."""
    shared = built_once(tmp_path_factory, "backfill-capture", lambda root: asyncio.run(_capture(root / "data")))
    return shared / "data" / "raw" / "ready" / "coinbase"


def data_dir(tmp_path: Path, name: str, raw_ready: Path) -> Path:
    """A data directory holding a copy of the captured segments, and its config file."""
    data = tmp_path / name
    shutil.copytree(raw_ready, data / "raw" / "ready" / "coinbase")
    config = {"data_dir": str(data), "etl": {"channels": {"bars": {"interval": "1s"}}},
              "logging": {"format": "json"}}
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return data


def etl(tmp_path: Path, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "daedalus", "etl", "--config", str(tmp_path / f"{name}.yaml"), "--no-progress"]
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=DEADLINE, cwd=REPO)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def tree(data: Path) -> dict[str, bytes]:
    """Everything the ETL leaves: the processed dataset with its checkpoint, the quarantine,
    and what is left of the raw segments."""
    out = {}
    for root in ("processed", "raw"):
        for path in sorted((data / root).rglob("*")):
            if path.is_file() and path.name != "coinbase.lock":
                out[path.relative_to(data).as_posix()] = path.read_bytes()
    return out


def parse_results(data: Path) -> list[Path]:
    """The finished parse tasks in a backfill's scratch folder."""
    return list((data / "tmp").glob("backfill-coinbase-*/parse/*/result.json"))


def assert_same(expected: Path, got: Path) -> None:
    want, have = tree(expected), tree(got)
    assert sorted(have) == sorted(want)
    different = [key for key in want if want[key] != have[key]]
    assert not different, different[:10]
    assert not list((got / "tmp").glob("backfill-coinbase-*"))  # the scratch area is removed after the commit


@pytest.fixture(scope="module")
def sequential(tmp_path_factory: pytest.TempPathFactory, raw_ready: Path) -> Path:
    """The reference: the sequential ETL over the capture, run once for the session (the tests
    only read it); its summary is in ``sequential.parent / "sequential.txt"``."""

    def build(root: Path) -> None:
        data_dir(root, "sequential", raw_ready)
        done = etl(root, "sequential")
        assert "gaps=0 " not in done.stdout and "duplicates_dropped=0" not in done.stdout  # the faults show
        assert "quarantined: lines=0" not in done.stdout
        (root / "sequential.txt").write_text(done.stdout)

    return built_once(tmp_path_factory, "backfill-sequential", build) / "sequential"


def test_the_dask_backfill_equals_the_sequential_etl(tmp_path: Path, raw_ready: Path, sequential: Path) -> None:
    assert len(list(raw_ready.iterdir())) >= SEGMENTS
    data = data_dir(tmp_path, "dask", raw_ready)
    done = etl(tmp_path, "dask", "--dask", "local:2")
    assert_same(sequential, data)
    # the same summary as the sequential run, but for the first line (times and rates)
    assert done.stdout.splitlines()[1:] == (sequential.parent / "sequential.txt").read_text().splitlines()[1:]
    level2 = str(data / "processed" / "coinbase" / "level2" / "**" / "*.parquet")
    count, invalid = duckdb.sql(f"SELECT count(*), count(*) FILTER (WHERE NOT book_valid) "
                                f"FROM read_parquet('{level2}', hive_partitioning=true)").fetchall()[0]  # fmt: skip
    assert count > 5_000 and invalid > 0  # books rebuilt, and invalid after gaps


def test_a_worker_killed_mid_run_changes_nothing(tmp_path: Path, raw_ready: Path, sequential: Path) -> None:
    data = data_dir(tmp_path, "dask", raw_ready)
    child = subprocess.Popen([sys.executable, "-m", "daedalus", "etl", "--config", str(tmp_path / "dask.yaml"),
                              "--no-progress", "--dask", "local:2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO)  # fmt: skip
    deadline = time.monotonic() + DEADLINE
    while not parse_results(data):
        assert child.poll() is None, child.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    workers = [p for p in psutil.Process(child.pid).children(recursive=True) if "spawn" in " ".join(p.cmdline())
               and p.children() == []]  # fmt: skip
    assert workers and child.poll() is None, "the backfill ended before a worker could be killed"
    workers[0].send_signal(signal.SIGKILL)
    _, err = child.communicate(timeout=DEADLINE)
    assert child.returncode == 0, err[-3000:]
    assert_same(sequential, data)


def test_a_killed_client_is_finished_by_a_rerun(tmp_path: Path, raw_ready: Path, sequential: Path) -> None:
    data = data_dir(tmp_path, "dask", raw_ready)
    child = subprocess.Popen([sys.executable, "-m", "daedalus", "etl", "--config", str(tmp_path / "dask.yaml"),
                              "--no-progress", "--dask", "local:2"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + DEADLINE
    while len(parse_results(data)) < 3:
        assert child.poll() is None, "the backfill ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(child.pid, signal.SIGKILL)  # the client, its scheduler and its workers: the machine went away
    child.wait()
    assert (data / "raw" / "ready" / "coinbase").exists() and not (data / "processed" / "_state" /
                                                                   "coinbase.json").exists()  # fmt: skip
    rerun = etl(tmp_path, "dask", "--dask", "local:2")
    events = [json.loads(line) for line in rerun.stderr.splitlines() if line.startswith("{")]
    parsed = [e for e in events if e.get("event") == "backfill_parsed"]
    assert parsed and parsed[0]["reused"] >= 3  # finished work is not done again
    assert_same(sequential, data)


def test_a_commit_repeated_after_a_crash_does_not_count_twice(tmp_path: Path, raw_ready: Path,
                                                               sequential: Path) -> None:  # fmt: skip
    """A crash after the checkpoint was saved but before the scratch folder went: the rerun
    finishes the commit from its note and must leave the same checkpoint, not add the chains'
    trades, bars and totals to it once more."""
    from daedalus.backfill.run import Backfill, dask_client
    from daedalus.config import load_config

    data = data_dir(tmp_path, "dask", raw_ready)
    backfill = Backfill(load_config(tmp_path / "dask.yaml"), "coinbase")
    items = backfill.plan(None, None)
    backfill.scratch.mkdir(parents=True, exist_ok=True)
    with dask_client("local:1", backfill.scratch) as client:
        parsed, chains = backfill._fan_out(client, items, False)
    backfill.write_note(parsed, chains)
    backfill._commit(parsed, chains)  # ... and the process dies here, before the scratch folder is removed
    backfill.job._lock.close()  # type: ignore[union-attr]
    rerun = etl(tmp_path, "dask", "--dask", "local:1")
    assert f"segments: {len(parsed)} " in rerun.stdout  # the commit of the note, finished
    assert_same(sequential, data)


def test_the_backfill_from_s3_to_s3_equals_the_sequential_etl(tmp_path: Path, raw_ready: Path, sequential: Path,
                                                               s3_server: S3Server) -> None:  # fmt: skip
    client = s3_server.client()
    for path in sorted(raw_ready.iterdir()):
        client.upload_file(str(path), BUCKET, f"pi-1/raw/archive/coinbase/{path.name}")
    config = {"data_dir": str(tmp_path / "worker"), "logging": {"format": "json"},
              "etl": {"channels": {"bars": {"interval": "1s"}}},
              "sync": {"endpoint_url": s3_server.endpoint, "region": REGION, "access_key_id": KEY_ID,
                       "secret_access_key": SECRET}}  # fmt: skip
    (tmp_path / "worker.yaml").write_text(yaml.safe_dump(config))
    stores = ("--input", f"s3://{BUCKET}/pi-1/raw", "--output", f"s3://{BUCKET}/lake/processed")
    # the work area on S3 too, as for workers on separate machines
    done = etl(tmp_path, "worker", "--dask", "local:2", "--scratch", f"s3://{BUCKET}/scratch", *stores)
    assert done.stdout.splitlines()[1:] == (sequential.parent / "sequential.txt").read_text().splitlines()[1:]

    got = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="lake/processed/"):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
            got[item["Key"].removeprefix("lake/processed/")] = body
    want = tree(sequential)
    datasets = {k.removeprefix("processed/"): v for k, v in want.items() if k.startswith("processed/coinbase/")}
    assert datasets and {k: v for k, v in got.items() if k.startswith("coinbase/")} == datasets
    quarantine = {k.replace("raw/quarantine/", "_quarantine/"): v for k, v in want.items() if "quarantine" in k}
    assert quarantine and {k: v for k, v in got.items() if k.startswith("_quarantine/")} == quarantine
    state = json.loads(got["_state/coinbase.json"])
    keys = state.pop("committed_segments")
    assert state == json.loads(want["processed/_state/coinbase.json"])
    assert got[f"_state/{state['books_file']}"] == want[f"processed/_state/{state['books_file']}"]
    markers = sorted(k.removeprefix("_state/coinbase.committed.d/") for k in got if ".committed.d/" in k)
    assert markers == sorted(keys) == sorted(p.name for p in raw_ready.iterdir())
    # nothing left for a second backfill, nor for the sequential ETL between the same stores
    assert "segments: 0" in etl(tmp_path, "worker", "--dask", "local:1", *stores).stdout
    assert "segments: 0" in etl(tmp_path, "worker", *stores).stdout
    assert len(list(client.list_objects_v2(Bucket=BUCKET, Prefix="pi-1/raw/")["Contents"])) == len(markers)
    assert not client.list_objects_v2(Bucket=BUCKET, Prefix="scratch/").get("Contents")  # removed after the commit
    assert not list((tmp_path / "worker" / "tmp").glob("backfill-*"))


def test_a_running_scheduler_by_address(tmp_path: Path, raw_ready: Path, sequential: Path) -> None:
    """``--dask tcp://HOST:PORT``: a scheduler and a worker started as a cluster operator would
    (``dask scheduler``, ``dask worker``), on loopback."""
    port = free_port()
    space = tmp_path / "dask-space"
    cluster = [
        subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port",
                          str(port), "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", f"tcp://127.0.0.1:{port}",
                          "--nworkers", "2", "--nthreads", "1", "--no-dashboard", "--local-directory", str(space)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]  # fmt: skip
    try:
        data = data_dir(tmp_path, "dask", raw_ready)
        etl(tmp_path, "dask", "--dask", f"tcp://127.0.0.1:{port}")
        assert_same(sequential, data)
    finally:
        for process in reversed(cluster):
            process.terminate()
        for process in reversed(cluster):
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_a_note_older_than_the_checkpoint_is_not_finished(tmp_path: Path, raw_ready: Path,
                                                          sequential: Path) -> None:  # fmt: skip
    """The client died after planning its commit; then the sequential ETL processed those
    segments. Finishing the old commit would put an older checkpoint back: it is dropped."""
    from daedalus.backfill.run import Backfill, dask_client
    from daedalus.config import load_config

    data = data_dir(tmp_path, "dask", raw_ready)
    ready = data / "raw" / "ready" / "coinbase"
    last = sorted(ready.iterdir())[-1]
    held_back = last.rename(tmp_path / last.name)  # arrives after the backfill planned
    backfill = Backfill(load_config(tmp_path / "dask.yaml"), "coinbase")
    items = backfill.plan(None, None)
    backfill.scratch.mkdir(parents=True, exist_ok=True)
    with dask_client("local:1", backfill.scratch) as client:
        parsed, chains = backfill._fan_out(client, items, False)
    backfill.write_note(parsed, chains)  # ... and the process dies here
    backfill.job._lock.close()  # type: ignore[union-attr]
    held_back.rename(last)
    etl(tmp_path, "dask")  # the sequential ETL meanwhile: every segment, the late one included
    rerun = etl(tmp_path, "dask", "--dask", "local:1")
    assert "backfill_note_discarded" in rerun.stderr and "segments: 0 " in rerun.stdout
    assert_same(sequential, data)


def test_a_backfill_continues_from_the_sequential_etls_checkpoint(tmp_path: Path, raw_ready: Path,
                                                                  sequential: Path) -> None:  # fmt: skip
    """The sequential ETL committed the first half; the backfill takes the rest from that
    checkpoint (each product's chain starts from its part of it) and the result is the one
    run over everything."""
    data = data_dir(tmp_path, "dask", raw_ready)
    ready = data / "raw" / "ready" / "coinbase"
    later = sorted(ready.iterdir())[len(list(ready.iterdir())) // 2 :]
    aside = tmp_path / "later"
    aside.mkdir()
    for path in later:
        path.rename(aside / path.name)
    etl(tmp_path, "dask")
    for path in later:
        (aside / path.name).rename(path)
    etl(tmp_path, "dask", "--dask", "local:2")
    assert_same(sequential, data)
