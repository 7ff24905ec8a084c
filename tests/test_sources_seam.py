"""The source seam under partitioned keys: the ETL job over ccxt Parquet segments nested in
``raw/<state>/ccxt/<channel>/exchange=/symbol=/year=/.../hour=`` keeps its claim, commit,
cleanup and SIGKILL promises, and leaves the record writer's folders alone; ingest of a
Parquet source stops with one clear line when recovery meets a disk error."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from daedalus.capture.pipeline import IngestPipeline
from daedalus.capture.record_writer import RecordWriter
from daedalus.config import IngestionConfig, parse_config
from daedalus.etl.job import EtlJob, segment_order
from daedalus.layout import DataLayout
from tests.conftest import REPO
from tests.test_ccxt_etl import HOUR0, book, ticker, trade

HOUR_NS = 3_600 * 1_000_000_000
SYMBOLS = ("BTC/USD", "ETH/USD", "SOL/USD")


def write_segments(data_dir: Path, per_partition: int = 24, hours: int = 2) -> int:
    """Parquet raw segments by the real RecordWriter: 3 channels x 3 symbols x ``hours`` hours,
    several segments per partition (two open writers evict each other). Returns the count."""
    layout = DataLayout(data_dir)
    writer = RecordWriter(layout, IngestionConfig(batch_size=4, fsync=False, max_open_writers=2))
    for hour in range(hours):
        for i in range(per_partition):
            for symbol in SYMBOLS:
                recv = HOUR0 + hour * HOUR_NS + i * 1_000_000
                ok = [writer.put_record(channel="trades", exchange="coinbase", symbol=symbol, recv_ns=recv,
                                        record=trade(i + 1000 * hour, symbol)),
                      writer.put_record(channel="ticker", exchange="coinbase", symbol=symbol, recv_ns=recv + 1,
                                        record=ticker(i, symbol)),
                      writer.put_record(channel="orderbook", exchange="coinbase", symbol=symbol, recv_ns=recv + 2,
                                        record=book(i, symbol))]  # fmt: skip
                assert all(ok)
    assert writer.close(30)
    return len(files(layout.ready("ccxt")))


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def config(data_dir: Path, **etl: Any):
    return parse_config({"data_dir": str(data_dir), "etl": etl})


def dataset(data_dir: Path) -> dict[str, list[bytes]]:
    """Every processed file (path below processed/ccxt) with its rows (as JSON, timestamps as
    integers), sorted."""
    root = data_dir / "processed" / "ccxt"
    out = {}
    for path in files(root):
        table = pq.read_table(path)
        table = table.cast(pa.schema([pa.field(f.name, pa.int64()) if pa.types.is_timestamp(f.type) else f
                                      for f in table.schema]))  # fmt: skip
        rows = [orjson.dumps(row, option=orjson.OPT_SORT_KEYS) for row in table.to_pylist()]
        out[path.relative_to(root).as_posix()] = sorted(rows)
    return out


def committed(data_dir: Path) -> list[str]:
    path = data_dir / "processed" / "_state" / "ccxt.committed"
    return sorted(path.read_text().split()) if path.exists() else []


def assert_clean(data_dir: Path) -> None:
    """Nothing left half-done: no raw segment waiting or claimed, no partition folder left
    behind, no temporary output, no commit note, nothing quarantined."""
    raw = data_dir / "raw"
    for state in ("ready", "processing", "quarantine"):
        assert files(raw / state / "ccxt") == [], state
    for state in ("ready", "processing"):
        folder = raw / state / "ccxt"
        assert not folder.exists() or list(folder.iterdir()) == [], f"empty folders left in {state}/"
    assert [p for p in files(data_dir / "processed") if p.name.endswith(".tmp")] == []
    assert not (data_dir / "processed" / "_state" / "ccxt.committing").exists()


def reference(tmp_path: Path) -> tuple[dict[str, list[bytes]], list[str]]:
    """The dataset and committed list of one uninterrupted run."""
    data = tmp_path / "reference"
    write_segments(data)
    summary = EtlJob(config(data), "ccxt").run()
    assert summary.quarantined_segments == 0 and summary.quarantined_lines == 0
    assert_clean(data)
    return dataset(data), committed(data)


# ---- a segment committed but not yet cleaned up, nested in processing/ ---------------------------

DIE_AT_FINISH = """
import os, sys
import daedalus.etl.job as job
from daedalus.config import parse_config
real, calls = job.EtlJob._finish, []
def finish(self, path):
    calls.append(1)
    if len(calls) == int(sys.argv[2]):
        os._exit(9)  # as SIGKILL: the segment's commit is recorded, it is still in processing/
    real(self, path)
job.EtlJob._finish = finish
job.EtlJob(parse_config({"data_dir": sys.argv[1]}), "ccxt").run()
"""


def test_a_committed_segment_left_in_a_nested_processing_folder_is_finished_not_quarantined(tmp_path):
    expected, expected_committed = reference(tmp_path)
    data = tmp_path / "data"
    write_segments(data)
    killed = subprocess.run([sys.executable, "-c", DIE_AT_FINISH, str(data), "5"], cwd=REPO)
    assert killed.returncode == 9
    (left,) = files(data / "raw" / "processing" / "ccxt")
    assert left.relative_to(data / "raw" / "processing" / "ccxt").as_posix() in committed(data)
    summary = EtlJob(config(data), "ccxt").run()
    assert summary.quarantined_segments == 0
    assert_clean(data)
    assert dataset(data) == expected and committed(data) == expected_committed


# ---- SIGKILL at random moments, then rerun: the same dataset --------------------------------------

RUN = """
import sys
from daedalus.config import parse_config
from daedalus.etl.job import EtlJob
EtlJob(parse_config({"data_dir": sys.argv[1], "etl": {"after_processing": sys.argv[2]}}), "ccxt").run()
"""


def _kill_mid_run(data: Path, after: str, rng: random.Random) -> int | None:
    """Start a run, SIGKILL it a random moment after it committed something new; its exit
    code if it finished first."""
    ledger = data / "processed" / "_state" / "ccxt.committed"
    before = ledger.stat().st_size if ledger.exists() else 0
    child = subprocess.Popen([sys.executable, "-c", RUN, str(data), after], cwd=REPO)
    try:
        while child.poll() is None and (not ledger.exists() or ledger.stat().st_size == before):
            time.sleep(0.002)
        if child.poll() is None:
            time.sleep(rng.uniform(0, 0.05))  # somewhere inside a later segment's claim/commit/cleanup
            child.send_signal(signal.SIGKILL)
        return child.wait(30) if child.returncode is None else child.returncode
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_sigkilled_ccxt_etl_reruns_to_the_uninterrupted_dataset(tmp_path):
    expected, expected_committed = reference(tmp_path)
    rng = random.Random(11)
    for after in ("delete", "archive"):
        data = tmp_path / after
        segments = write_segments(data)
        kills = 0
        while kills < 4:  # up to 4 kills per mode, each at a random moment inside a later segment
            code = _kill_mid_run(data, after, rng)
            if code == 0:
                break
            assert code == -signal.SIGKILL
            kills += 1
        assert kills >= 2, "the runs finished before they could be killed"
        summary = EtlJob(config(data, after_processing=after), "ccxt").run()
        assert summary.quarantined_segments == 0 and summary.quarantined_lines == 0
        assert_clean(data)
        got = dataset(data)
        assert sorted(got) == sorted(expected)
        for name, rows in got.items():
            assert rows == expected[name], name  # same rows, none twice
        assert committed(data) == expected_committed
        archived = files(data / "raw" / "archive" / "ccxt")
        assert len(archived) == (segments if after == "archive" else 0)


# ---- the record writer's folders in ready/ ----------------------------------------------------------


def test_a_claim_leaves_a_ready_folder_whose_partition_the_writer_has_open(tmp_path):
    """The writer makes ready/<partition>/ and only then its Parquet file in it, while the
    partition's IPC segment is in active/<partition>/: the ETL must not remove that folder."""
    write_segments(tmp_path, per_partition=4, hours=1)
    ready, active = DataLayout(tmp_path).ready("ccxt"), DataLayout(tmp_path).active("ccxt")
    busy = sorted(files(ready))[0].parent
    (active / busy.relative_to(ready)).mkdir(parents=True)
    (active / busy.relative_to(ready) / "segment_20260809T21_00099.arrow").write_bytes(b"")
    EtlJob(config(tmp_path), "ccxt").run()
    assert files(ready) == []
    assert busy.is_dir()  # kept for the writer
    others = [p for p in ready.rglob("*") if p.is_dir() and p != busy and p not in busy.parents]
    assert others == []  # every other partition folder the claims emptied is gone


# ---- checkpoint order of partitioned keys ------------------------------------------------------------


def test_partitioned_keys_are_ordered_by_time_not_by_channel(tmp_path):
    """An ordered source with partitioned keys: a later hour of another channel is not older
    than the checkpoint because its channel sorts first."""
    later = "ticker/exchange=x/symbol=A-B/year=2026/month=08/day=09/hour=22/segment_20260809T22_00001.parquet"
    earlier = "trades/exchange=x/symbol=A-B/year=2026/month=08/day=09/hour=21/segment_20260809T21_00001.parquet"
    assert segment_order(earlier) < segment_order(later)
    assert segment_order("segment_20260809T21_00002.ndjson") < segment_order("segment_20260809T21_00010.ndjson")

    records = [("trades", trade(1)), ("ticker", ticker(1))]
    layout = DataLayout(tmp_path)
    writer = RecordWriter(layout, IngestionConfig(batch_size=1, fsync=False))
    for hour, (channel, record) in enumerate(records):
        assert writer.put_record(channel=channel, exchange="coinbase", symbol="BTC/USD",
                                 recv_ns=HOUR0 + hour * HOUR_NS, record=record)  # fmt: skip
    assert writer.close(30)
    job = EtlJob(config(tmp_path), "ccxt")
    job.plugin = dataclasses.replace(job.plugin, ordered=True)
    assert job.run().segments == 2
    state = orjson.loads((tmp_path / "processed" / "_state" / "ccxt.json").read_bytes())
    assert state["last_segment"].startswith("ticker/") and state["last_segment"].endswith("T22_00001.parquet")


# ---- ingest of a Parquet source: recovery meets a disk error ---------------------------------------


def test_parquet_recovery_on_a_broken_ready_folder_stops_with_recovery_failed(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data = tmp_path / "data"
    layout = DataLayout(data)
    relative = "trades/exchange=coinbase/symbol=BTC-USD/year=2026/month=08/day=09/hour=21"
    leftover = layout.active("ccxt") / relative / "segment_20260809T21_00001.arrow"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"")  # whatever it holds: recovery cannot even make its folder in ready/
    (layout.ready("ccxt") / "trades").mkdir(parents=True)
    (layout.ready("ccxt") / "trades" / "exchange=coinbase").write_bytes(b"not a folder")
    exchanges = {"coinbase": {"channels": {"watchTrades": ["BTC/USD"]}}}
    settings = parse_config({"data_dir": str(data), "coinbase": {"enabled": False},
                             "ingestion": {"raw_format": "parquet"}, "ccxt": {"enabled": True, "exchanges": exchanges}})
    pipeline = IngestPipeline(settings, source="ccxt")
    asyncio.run(asyncio.wait_for(pipeline.run(asyncio.Event(), out=io.StringIO()), 30))
    assert pipeline.failed
    events = [r for r in caplog.records if "recovery_failed" in r.getMessage()]
    assert events, [r.getMessage() for r in caplog.records]
    assert leftover.exists()  # kept for the next start


# ---- ingest of a Parquet source: shutdown accounting --------------------------------------------------


def test_parquet_raw_close_is_not_clean_when_a_batch_was_lost(tmp_path, monkeypatch):
    """``ingest_stopped clean=True`` promises every accepted record is on disk: a batch whose
    write failed mid-run breaks that promise even though the writer thread ends in time."""
    from daedalus.capture import record_writer
    from daedalus.capture.raw_writers import ParquetRaw

    def no_disk(self, partition):
        raise OSError(28, "No space left on device")

    settings = parse_config({"data_dir": str(tmp_path), "ingestion": {"raw_format": "parquet", "fsync": False}})
    raw = ParquetRaw(settings, "ccxt", lambda: HOUR0)
    monkeypatch.setattr(record_writer.RecordWriter, "_open_segment", no_disk)
    raw.start()
    assert raw.writer.put_record(channel="trades", exchange="coinbase", symbol="BTC/USD", recv_ns=HOUR0,
                                 record=trade(1))  # fmt: skip
    assert raw.close(30) is False
    assert raw.writer.stats.records_lost == 1
    assert raw.stopped_fields(False)["lost"] == 1


def test_a_raw_format_without_a_writer_is_an_error_not_ndjson(tmp_path):
    import pytest

    from daedalus.capture.raw_writers import NdjsonRaw, ParquetRaw, raw_writer

    settings = parse_config({"data_dir": str(tmp_path)})
    assert isinstance(raw_writer(settings, "ccxt", "ndjson"), NdjsonRaw)
    assert isinstance(raw_writer(settings, "ccxt", "parquet"), ParquetRaw)
    with pytest.raises(ValueError, match="'dbn'"):
        raw_writer(settings, "databento", "dbn")
