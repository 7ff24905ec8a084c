"""The ETL job keeps its promises when things go wrong: what was committed is recorded, not
guessed; committed output is never replaced; a bug stops the job instead of quarantining
data; a damaged checkpoint, a SIGTERM, a vanished segment or a SIGKILL get a clean answer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from daedalus.capture.records import frame_line
from daedalus.config import parse_config
from daedalus.etl import processors
from daedalus.etl.job import EtlJob, EtlStuck
from daedalus.etl.output import PartitionedWriter
from tests.conftest import REPO
from tests.etl_helpers import channel_table, recording_lines, run_etl, write_segments

DAEDALUS = [sys.executable, "-m", "daedalus"]


def raw(data_dir: Path, state: str) -> Path:
    return data_dir / "raw" / state / "coinbase"


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def write_config(data_dir: Path, **etl: object) -> Path:
    path = data_dir / "c.yaml"
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(orjson.dumps({"data_dir": str(data_dir), "etl": etl}).decode())
    return path


def wait_for(condition, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def segment_rows(data_dir: Path, stem: str, channel: str = "level2") -> int:
    files = list((data_dir / "processed" / "coinbase" / channel).rglob(f"part-{stem}.parquet"))
    return sum(pq.read_metadata(f).num_rows for f in files)


# ---- item 1: what was committed is recorded, not inferred from name order -------------------------


def test_a_crash_inside_an_out_of_order_segment_does_not_delete_it_unprocessed(tmp_path):
    lines = recording_lines()
    write_segments(tmp_path, [lines[:400]], hour="20260808T21")  # older, left for later by --mode date
    write_segments(tmp_path, [lines[400:800], lines[800:]], hour="20260809T21")
    job = EtlJob(parse_config({"data_dir": str(tmp_path)}))
    assert job.run(start=date(2026, 8, 9), end=date(2026, 8, 9)).segments == 2
    # a later run claimed the older segment and was killed before committing it
    older = "segment_20260808T21_00001.ndjson"
    raw(tmp_path, "processing").mkdir(parents=True, exist_ok=True)
    os.rename(raw(tmp_path, "ready") / older, raw(tmp_path, "processing") / older)
    summary = job.run()
    assert summary.segments == 1
    assert segment_rows(tmp_path, "segment_20260808T21_00001") > 0  # processed, not deleted with 0 rows
    assert older in (tmp_path / "processed" / "_state" / "coinbase.committed").read_text().split()
    assert names(raw(tmp_path, "processing")) == [] and names(raw(tmp_path, "quarantine")) == []


# ---- item 2: committed output is never overwritten with other content -----------------------------


def test_a_second_segment_under_a_committed_name_is_quarantined_not_written_over(tmp_path):
    lines = recording_lines()
    write_segments(tmp_path, [lines[:500], lines[500:900]])
    run_etl(tmp_path)
    before = channel_table(tmp_path, "level2")
    # the first name again (not the checkpoint's last one), other content: a clock stepped back before the fix
    write_segments(tmp_path, [lines[500:]])
    summary = run_etl(tmp_path)
    assert summary.segments == 0 and summary.quarantined_segments == 1
    assert channel_table(tmp_path, "level2") == before
    quarantine = raw(tmp_path, "quarantine")
    reason = (quarantine / "segment_20260809T21_00001.ndjson.reason.txt").read_text()
    assert "already processed and committed" in reason
    assert (quarantine / "segment_20260809T21_00001.ndjson").read_bytes() == b"".join(lines[500:])


def test_commit_refuses_to_replace_files_of_another_segment_even_without_the_committed_list(tmp_path):
    lines = recording_lines()
    write_segments(tmp_path, [lines[:500]])
    run_etl(tmp_path)
    before = channel_table(tmp_path, "level2")
    for path in (tmp_path / "processed" / "_state").glob("coinbase.*"):  # e.g. a state rebuilt by hand
        path.unlink()
    write_segments(tmp_path, [lines[500:]])
    summary = run_etl(tmp_path)
    assert summary.quarantined_segments == 1
    assert channel_table(tmp_path, "level2") == before
    assert "already committed with other content" in next(raw(tmp_path, "quarantine").glob("*.reason.txt")).read_text()
    assert not list((tmp_path / "processed").rglob("*.tmp"))


def test_a_rerun_of_an_uncommitted_segment_may_replace_identical_output(tmp_path):
    lines = recording_lines()
    write_segments(tmp_path, [lines[:500]])
    run_etl(tmp_path)
    reference = channel_table(tmp_path, "level2")
    # killed after renaming the outputs, before the checkpoint: the outputs are there, nothing recorded
    for path in (tmp_path / "processed" / "_state").glob("coinbase.*"):
        path.unlink()
    write_segments(tmp_path, [lines[:500]])
    summary = run_etl(tmp_path)
    assert summary.segments == 1 and summary.quarantined_segments == 0
    assert channel_table(tmp_path, "level2") == reference


DIE_AT_SECOND_CHECKPOINT = """
import os, sys
import daedalus.etl.job as job
from daedalus.config import parse_config
real, calls = job.save_state, []
def save_state(*args):
    calls.append(1)
    if len(calls) == 2:
        os._exit(9)  # as SIGKILL: the outputs are renamed into place, the checkpoint is not saved
    real(*args)
job.save_state = save_state
job.EtlJob(parse_config({"data_dir": sys.argv[1]})).run()
"""


def test_a_commit_cut_short_is_rolled_back_even_after_the_checkpoint_moved_on(tmp_path):
    lines = recording_lines()
    write_segments(tmp_path, [lines[:400], lines[400:800]])  # W, X on 2026-08-09
    killed = subprocess.run([sys.executable, "-c", DIE_AT_SECOND_CHECKPOINT, str(tmp_path)], cwd=REPO)
    assert killed.returncode == 9
    assert segment_rows(tmp_path, "segment_20260809T21_00002", "market_trades") > 0  # X's files are in place
    assert (tmp_path / "processed" / "_state" / "coinbase.committing").exists()
    # a later day is processed first and moves the checkpoint past X
    write_segments(tmp_path / "staged", [lines[800:]], hour="20260810T00")
    staged = raw(tmp_path / "staged", "ready") / "segment_20260810T00_00001.ndjson"
    os.rename(staged, raw(tmp_path, "ready") / staged.name)
    job = EtlJob(parse_config({"data_dir": str(tmp_path)}))
    assert job.run(start=date(2026, 8, 10), end=date(2026, 8, 10)).segments == 1
    summary = job.run()  # X again, now older than the checkpoint: other rows than its cut-short commit
    assert summary.segments == 1 and summary.quarantined_segments == 0
    assert names(raw(tmp_path, "processing")) == [] and names(raw(tmp_path, "quarantine")) == []
    committed = (tmp_path / "processed" / "_state" / "coinbase.committed").read_text().split()
    assert sorted(committed) == sorted(
        ["segment_20260809T21_00001.ndjson", "segment_20260809T21_00002.ndjson", "segment_20260810T00_00001.ndjson"]
    )
    assert not (tmp_path / "processed" / "_state" / "coinbase.committing").exists()
    trades = channel_table(tmp_path, "market_trades").to_pylist()
    assert len({(t["product_id"], t["trade_id"]) for t in trades}) == len(trades)


def test_the_committed_list_survives_a_torn_append(tmp_path):
    from daedalus.etl.state import CommittedSegments

    (tmp_path / "coinbase.committed").write_bytes(b"segment_20260809T21_00001.ndjson\nsegment_20260809T21_000")
    ledger = CommittedSegments(tmp_path, "coinbase")
    assert ledger.names == {"segment_20260809T21_00001.ndjson"}
    ledger.add("segment_20260809T21_00003.ndjson")
    again = CommittedSegments(tmp_path, "coinbase")
    assert again.names == {"segment_20260809T21_00001.ndjson", "segment_20260809T21_00003.ndjson"}


# ---- item 7: distinct ids never share an output file ---------------------------------------------


def test_ids_that_sanitise_alike_get_their_own_partitions_and_every_file_stays_readable(tmp_path):
    ids = ["BTC-USD", "BTC/USD", "BTC:USD", "BTC-USD\x00", "", ".", "x" * 10_000, "BTC-USD~1"]
    writer = PartitionedWriter(tmp_path / "ch", ["product_id"], "segment_20260809T21_00001", "zstd", {})
    codes = np.arange(len(ids), dtype=np.int64)
    writer.write(pa.table({"n": pa.array(codes)}), (codes, ids), np.zeros(len(ids), np.int64))
    files = writer.close()
    assert len({f.parent for f in files}) == len(ids)
    from daedalus.etl.output import commit

    commit(files)
    rows = duckdb.sql(f"SELECT product_id, n FROM read_parquet('{tmp_path}/ch/**/*.parquet', hive_partitioning=true)")
    got = sorted(rows.fetchall(), key=lambda r: r[1])
    assert [n for _, n in got] == list(range(len(ids)))
    assert got[0][0] == "BTC-USD" and len({p for p, _ in got}) == len(ids)


def test_hostile_product_ids_beside_real_ones_do_not_wedge_the_etl(tmp_path):
    lines = recording_lines()[:600]
    recv = int(orjson.loads(lines[1])["recv_ns"])
    hostile = []
    for i, product in enumerate(["BTC/USD", "BTC:USD", "BTC-USD\u0000"]):
        frame = {"channel": "market_trades", "timestamp": "2026-08-09T21:00:00.5Z", "sequence_num": 10**6 + i,
                 "events": [{"type": "update", "trades": [{"trade_id": f"h{i}", "product_id": product, "price": "1",
                                                           "size": "1", "side": "BUY",
                                                           "time": "2026-08-09T21:00:00.5Z"}]}]}  # fmt: skip
        hostile.append(frame_line(recv + i, 7, orjson.dumps(frame).decode()))
    write_segments(tmp_path, [lines[:300] + hostile + lines[300:]])
    clean = tmp_path / "clean"
    write_segments(clean, [lines])
    summary = run_etl(tmp_path)
    run_etl(clean)
    assert summary.segments == 1 and summary.quarantined_segments == 0
    assert names(raw(tmp_path, "processing")) == []
    # every file of the dataset reads; the real BTC-USD rows are exactly the clean run's
    con = duckdb.connect()
    glob = f"{tmp_path}/processed/coinbase/market_trades/**/*.parquet"
    con.sql(f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning=true)").fetchall()
    for channel in ("level2", "ticker"):
        assert channel_table(tmp_path, channel) == channel_table(clean, channel)
    trades = channel_table(tmp_path, "market_trades").to_pylist()
    real = [t for t in trades if not str(t["trade_id"]).startswith("h")]
    assert real == channel_table(clean, "market_trades").to_pylist()


# ---- item 9: a bug in our code is not bad input -----------------------------------------------------


def test_a_bug_keeps_the_segment_in_processing_and_stops_the_run(tmp_path, monkeypatch):
    lines = recording_lines()
    write_segments(tmp_path, [lines[:400], lines[400:]])

    def buggy(*args, **kwargs):
        raise ZeroDivisionError("a bug in an upgrade")

    monkeypatch.setattr(processors, "level2_table", buggy)
    job = EtlJob(parse_config({"data_dir": str(tmp_path)}))
    with pytest.raises(EtlStuck, match="a bug, not bad data"):
        job.run()
    assert names(raw(tmp_path, "processing")) == ["segment_20260809T21_00001.ndjson"]
    assert names(raw(tmp_path, "ready")) == ["segment_20260809T21_00002.ndjson"]
    assert names(raw(tmp_path, "quarantine")) == []
    monkeypatch.undo()
    assert job.run().segments == 2
    clean = tmp_path / "clean"
    write_segments(clean, [lines[:400], lines[400:]])
    run_etl(clean)
    assert channel_table(tmp_path, "level2") == channel_table(clean, "level2")


def test_the_watcher_retries_a_bug_a_few_times_then_exits_without_quarantining(tmp_path, monkeypatch):
    lines = recording_lines()
    write_segments(tmp_path, [lines[i : i + 200] for i in range(0, 1000, 200)])
    calls = []

    def buggy(*args, **kwargs):
        calls.append(1)
        raise ZeroDivisionError("a bug in an upgrade")

    monkeypatch.setattr(processors, "level2_table", buggy)
    job = EtlJob(parse_config({"data_dir": str(tmp_path)}))
    with pytest.raises(EtlStuck):
        job.watch(0.01, lambda: False)
    assert len(calls) == 3  # the same segment, three rounds in a row
    assert names(raw(tmp_path, "quarantine")) == []
    assert len(names(raw(tmp_path, "ready"))) + len(names(raw(tmp_path, "processing"))) == 5


# ---- item 16: a damaged or incompatible checkpoint ---------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "version", "books"])
def test_a_damaged_checkpoint_gets_one_clear_error_and_a_way_out(tmp_path, damage):
    lines = recording_lines()
    write_segments(tmp_path, [lines[:500]])
    config = write_config(tmp_path)
    subprocess.run([*DAEDALUS, "etl", "-c", str(config)], check=True, capture_output=True, cwd=REPO)
    state = tmp_path / "processed" / "_state" / "coinbase.json"
    if damage == "truncate":
        state.write_bytes(state.read_bytes()[:50])
    elif damage == "version":
        state.write_bytes(orjson.dumps({**orjson.loads(state.read_bytes()), "version": 99}))
    else:
        next(state.parent.glob("coinbase.books-*.npz")).write_bytes(b"not an npz")
    staged = tmp_path / "staged"
    write_segments(staged, [lines[500:]])
    os.rename(raw(staged, "ready") / "segment_20260809T21_00001.ndjson",
              raw(tmp_path, "ready") / "segment_20260809T21_00002.ndjson")  # fmt: skip
    failed = subprocess.run([*DAEDALUS, "etl", "-c", str(config)], capture_output=True, text=True, cwd=REPO)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    assert str(state) in failed.stderr and "daedalus etl --rebuild-state" in failed.stderr
    assert names(raw(tmp_path, "ready")) == ["segment_20260809T21_00002.ndjson"]  # nothing was touched
    done = subprocess.run([*DAEDALUS, "etl", "-c", str(config), "--rebuild-state"], capture_output=True, text=True,
                          cwd=REPO, check=True)  # fmt: skip
    assert "segments: 1 " in done.stdout and "checkpoint moved to" in done.stderr
    assert list(state.parent.glob("broken-coinbase-*/coinbase.json"))
    assert segment_rows(tmp_path, "segment_20260809T21_00002", "market_trades") > 0  # books wait for a snapshot


# ---- item 17: SIGTERM stops the watcher between segments ---------------------------------------------


def test_the_watcher_stops_between_segments_on_sigterm_with_a_backlog(tmp_path):
    lines = recording_lines()
    write_segments(tmp_path, [lines] * 30)
    config = write_config(tmp_path, poll_interval_seconds=0.2)
    proc = subprocess.Popen([*DAEDALUS, "etl", "-c", str(config), "--watch"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: len(names(raw(tmp_path, "ready"))) < 29, "the watcher to take a segment")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert len(names(raw(tmp_path, "ready"))) >= 20  # the backlog was left for the next run
    assert names(raw(tmp_path, "processing")) == []
    done = int(out.split("segments: ")[1].split()[0])
    assert done + len(names(raw(tmp_path, "ready"))) == 30


# ---- item 18: a segment removed from processing/ while the ETL runs ------------------------------------


def test_a_segment_removed_from_processing_mid_run_gives_one_line_and_the_rerun_completes(tmp_path):
    lines = recording_lines()
    write_segments(tmp_path, [lines] * 6)
    config = write_config(tmp_path, after_processing="archive")
    proc = subprocess.Popen([*DAEDALUS, "etl", "-c", str(config)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    removed = []
    try:
        wait_for(lambda: names(raw(tmp_path, "processing")) or proc.poll() is not None, "a claimed segment")
        for name in names(raw(tmp_path, "processing")):
            (raw(tmp_path, "processing") / name).unlink(missing_ok=True)
            removed.append(name)
    finally:
        _, err = proc.communicate(timeout=120)
    assert removed, "the run finished before a segment could be removed"
    assert "Traceback" not in err and proc.returncode in (0, 1), err
    if proc.returncode:
        assert len([line for line in err.splitlines() if "etl stopped" in line]) == 1
    subprocess.run([*DAEDALUS, "etl", "-c", str(config)], check=True, capture_output=True, cwd=REPO)
    assert names(raw(tmp_path, "ready")) == [] and names(raw(tmp_path, "processing")) == []
    assert len(names(raw(tmp_path, "archive"))) >= 5


def test_a_segment_removed_right_after_its_commit_is_skipped_with_a_warning(tmp_path, monkeypatch):
    import daedalus.etl.job as job_module

    lines = recording_lines()
    write_segments(tmp_path, [lines[:500], lines[500:]])
    real_commit = job_module.commit

    def commit_then_operator_deletes(files):
        real_commit(files)
        for path in raw(tmp_path, "processing").iterdir():
            path.unlink()

    monkeypatch.setattr(job_module, "commit", commit_then_operator_deletes)
    job = EtlJob(parse_config({"data_dir": str(tmp_path), "etl": {"after_processing": "archive"}}))
    assert job.run().segments == 2  # both committed; nothing left to archive
    assert names(raw(tmp_path, "archive")) == [] and names(raw(tmp_path, "processing")) == []
    assert segment_rows(tmp_path, "segment_20260809T21_00002", "market_trades") > 0


# ---- item 19: temporary work lives under the data directory -------------------------------------------


def test_a_sigkilled_run_leaves_nothing_in_tmp_and_the_rerun_cleans_its_scratch(tmp_path):
    lines = recording_lines()
    bad = [*lines[:100], b'{"recv_ns":5,"conn":1,"msg":{"channel":"l2_data","events":"oops"}}\n', *lines[100:]]
    write_segments(tmp_path / "data", [bad * 8])
    config = write_config(tmp_path / "data")
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(system_tmp)}
    scratch = tmp_path / "data" / "tmp"
    proc = subprocess.Popen([*DAEDALUS, "etl", "-c", str(config)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        # the clean copy of a segment with a bad line is being written: kill the run there
        wait_for(lambda: any(p.is_file() for d in (system_tmp, scratch) for p in d.rglob("*"))
                 or proc.poll() is not None, "the clean copy")  # fmt: skip
    finally:
        proc.kill()
        proc.wait()
    assert list(system_tmp.iterdir()) == []
    assert any(p.is_file() for p in scratch.rglob("*"))
    subprocess.run([*DAEDALUS, "etl", "-c", str(config)], check=True, capture_output=True, cwd=REPO, env=env)
    assert not any(p.is_file() for p in scratch.rglob("*"))
    assert list(system_tmp.iterdir()) == []
