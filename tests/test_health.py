"""``daedalus health`` as a process: exit codes for ok, backlog, stale data, low disk and
children in trouble, against real files, a real statvfs and the real simulator."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
import zstandard

from daedalus.capture.records import frame_line
from daedalus.ops.records import ChildStatus, Heartbeat, SupervisorStatus, write_record
from daedalus.ops.tails import newest_in_tail
from tests.capture_helpers import ingest_config, segment_files
from tests.conftest import REPO

PRODUCTS = ["BTC-USD", "ETH-USD"]
NO_DISK_LIMITS = {  # the test machine's real disk must not decide the other tests
    "disk_warning_free_percent": 0.0,
    "disk_critical_free_percent": 0.0,
    "disk_warning_hours_left": 0.0,
    "disk_critical_hours_left": 0.0,
}


def write_config(tmp_path: Path, name: str = "health.yaml", extra: dict[str, Any] | None = None, **health: Any) -> Path:
    config: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "coinbase": {"product_ids": PRODUCTS},
        "health": {**NO_DISK_LIMITS, **health},
        **(extra or {}),
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def health(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "daedalus", "health", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    return result


def health_json(config: Path) -> tuple[int, dict[str, Any]]:
    result = health(config, "--json")
    return result.returncode, orjson.loads(result.stdout)


def ticker_line(recv_s: float, product: str, seq: int = 1) -> bytes:
    ticker = f'{{"type":"ticker","product_id":"{product}","price":"1"}}'
    frame = (f'{{"channel":"ticker","client_id":"","timestamp":"2026-08-09T21:00:00Z","sequence_num":{seq},'
             f'"events":[{{"type":"update","tickers":[{ticker}]}}]}}')  # fmt: skip
    return frame_line(int(recv_s * 1e9), 1, frame)


def fresh_lines(recv_s: float, n: int = 20) -> list[bytes]:
    return [ticker_line(recv_s, PRODUCTS[i % 2], i) for i in range(n)]


def write_segment(
    tmp_path: Path, state: str, counter: int, lines: list[bytes], *, zstd: bool = False, mtime: float | None = None
) -> Path:
    folder = tmp_path / "data" / "raw" / state / "coinbase"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"segment_20260809T21_{counter:05d}.ndjson{'.zst' if zstd else ''}"
    if zstd:  # one frame per "flush" of five lines, as capture writes them
        compressor = zstandard.ZstdCompressor()
        path.write_bytes(b"".join(compressor.compress(b"".join(lines[i : i + 5])) for i in range(0, len(lines), 5)))
    else:
        path.write_bytes(b"".join(lines))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def codes(tmp_path: Path, **health_settings: Any) -> int:
    return health(write_config(tmp_path, **health_settings)).returncode


# ---- ok: fresh data captured from the simulator ----------------------------------------------
async def test_fresh_capture_from_the_simulator_is_ok(tmp_path, make_sim):
    sim = await make_sim(rate=200.0, heartbeat_interval=0.2)
    data = tmp_path / "data"
    config = ingest_config(data, sim.ws_url)
    config["coinbase"]["product_ids"] = PRODUCTS
    config["health"] = NO_DISK_LIMITS
    config["supervisor"] = {"heartbeat_seconds": 0.2, "hang_timeout_seconds": 5}
    path = tmp_path / "ingest.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daedalus", "ingest", "--config", str(path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=REPO,
    )  # fmt: skip
    try:
        beat_file = data / "run" / "ingest-coinbase.json"
        async with asyncio.timeout(20):
            while True:
                beat = orjson.loads(beat_file.read_bytes()) if beat_file.exists() else {}
                if set(PRODUCTS) <= set(beat.get("products", {})):
                    break
                await asyncio.sleep(0.05)
        # while ingest runs: freshness from its heartbeat, and no supervisor is fine
        code, report = await asyncio.to_thread(health_json, path)
        assert code == 0, report["findings"]
        assert {report["freshness"][p]["from"] for p in PRODUCTS} == {"heartbeat"}
        assert report["supervisor"]["running"] is False
        assert [s["child"] for s in report["supervisor"]["standalone"]] == ["ingest-coinbase"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    # after a clean stop: the heartbeat is gone, freshness comes from the segment's tail
    assert segment_files(data, "ready") and not beat_file.exists()
    result = await asyncio.to_thread(health, path)
    assert result.returncode == 0, result.stdout
    assert result.stdout.startswith("health: OK (0 findings)")
    code, report = await asyncio.to_thread(health_json, path)
    assert code == 0
    for product in PRODUCTS:
        fresh = report["freshness"][product]
        assert fresh["from"].startswith("segment segment_") and fresh["level"] == "ok"
        assert fresh["age_seconds"] >= 0
    assert report["sources"]["coinbase"]["states"]["ready"]["files"] >= 1


# ---- backlog ---------------------------------------------------------------------------------
def test_backlog_of_many_ready_segments_warns_then_is_critical(tmp_path):
    now = time.time()
    for i in range(1, 13):
        write_segment(tmp_path, "ready", i, fresh_lines(now))
    result = health(write_config(tmp_path, backlog_warning_segments=10, backlog_critical_segments=100))
    assert result.returncode == 1, result.stdout
    assert "ETL is 12 segments" in result.stdout
    assert "is the ETL watcher running? `daedalus status`" in result.stdout
    assert "etl.poll_interval_seconds (now 10 s)" in result.stdout
    assert codes(tmp_path, backlog_warning_segments=5, backlog_critical_segments=12) == 2


def test_an_old_ready_segment_is_a_backlog_by_age(tmp_path):
    now = time.time()
    write_segment(tmp_path, "active", 2, fresh_lines(now))
    write_segment(tmp_path, "ready", 1, fresh_lines(now - 7200), mtime=now - 7200)
    code, report = health_json(write_config(tmp_path))  # 2 h >= 30 min warning, < 6 h critical
    assert code == 1
    backlog = report["sources"]["coinbase"]["backlog"]
    assert backlog["segments"] == 1 and backlog["level"] == "warning" and backlog["oldest_age_seconds"] >= 7200
    assert [f["check"] for f in report["findings"]] == ["backlog"]
    assert codes(tmp_path, backlog_critical_seconds=3600) == 2


def test_quarantine_is_a_warning_with_where_to_look(tmp_path):
    now = time.time()
    write_segment(tmp_path, "active", 2, fresh_lines(now))
    folder = write_segment(tmp_path, "quarantine", 1, [b"not json\n"]).parent
    (folder / "segment_20260809T21_00001.ndjson.reason.txt").write_text("undecodable\n")
    result = health(write_config(tmp_path))
    assert result.returncode == 1
    assert "2 files" in result.stdout and str(folder) in result.stdout


# ---- freshness -------------------------------------------------------------------------------
def test_stale_records_warn_then_are_critical(tmp_path):
    then = time.time() - 300
    write_segment(tmp_path, "active", 1, fresh_lines(then))  # 5 min: >= 2 min warning, < 15 min critical
    code, report = health_json(write_config(tmp_path))
    assert code == 1
    assert {report["freshness"][p]["level"] for p in PRODUCTS} == {"warning"}
    btc = report["freshness"]["BTC-USD"]
    assert btc["last_time"] == pytest.approx(then, abs=1e-3)
    assert btc["age_seconds"] == pytest.approx(report["time"] - then, abs=1e-3)
    assert codes(tmp_path, stale_critical_seconds=240) == 2


def test_freshness_reads_only_the_tail_of_zstd_segments_and_finds_every_product(tmp_path):
    now = time.time()
    # a big old head, then ETH-USD long ago, then fresh BTC-USD only at the very end
    lines = [ticker_line(now - 5000, "ETH-USD", i) for i in range(200)]
    lines += [ticker_line(now - 4000, "ETH-USD", 1000), ticker_line(now - 1, "BTC-USD", 1001)]
    write_segment(tmp_path, "ready", 1, lines, zstd=True)
    code, report = health_json(write_config(tmp_path))
    assert code == 2  # ETH-USD is over an hour old
    assert report["freshness"]["BTC-USD"]["level"] == "ok"
    assert report["freshness"]["ETH-USD"]["level"] == "critical"
    assert report["freshness"]["ETH-USD"]["age_seconds"] >= 4000
    assert report["freshness"]["BTC-USD"]["from"] == "segment segment_20260809T21_00001.ndjson.zst"


def test_a_product_missing_from_the_tail_is_a_warning(tmp_path):
    write_segment(tmp_path, "active", 1, [ticker_line(time.time(), "BTC-USD")])
    code, report = health_json(write_config(tmp_path))
    assert code == 1
    assert report["freshness"]["ETH-USD"] == {
        "source": "coinbase", "product": "ETH-USD", "last_time": None, "age_seconds": None, "level": "warning",
        "from": None,
    }  # fmt: skip
    assert report["freshness"]["BTC-USD"]["level"] == "ok"


def test_huge_segments_are_read_only_from_their_tails(tmp_path):
    now = time.time()
    huge = 8 << 30  # 8 GiB of holes before the records: read whole, it would not fit in memory
    plain = write_segment(tmp_path, "ready", 1, [])
    compressed = write_segment(tmp_path, "ready", 2, [], zstd=True)
    tails = {  # the plain one's cut first line (holes) ends with a newline, as a real one does
        plain: b"\n" + ticker_line(now - 30, "ETH-USD"),
        compressed: zstandard.ZstdCompressor().compress(ticker_line(now - 20, "BTC-USD")),
    }
    for path, tail in tails.items():
        with open(path, "r+b") as handle:
            handle.truncate(huge)
            handle.seek(huge)
            handle.write(tail)
    code, report = health_json(write_config(tmp_path))
    assert code == 0, report["findings"]
    assert report["freshness"]["BTC-USD"]["from"] == f"segment {compressed.name}"
    assert report["freshness"]["ETH-USD"]["from"] == f"segment {plain.name}"
    assert report["sources"]["coinbase"]["states"]["ready"]["bytes"] > 2 * huge


def test_a_closed_segments_tail_is_remembered_until_it_changes(tmp_path):
    now = time.time()
    path = write_segment(tmp_path, "ready", 1, [ticker_line(now, "BTC-USD")])
    assert newest_in_tail(path, PRODUCTS)[0] == {"BTC-USD": pytest.approx(now)}
    before = path.stat()
    # other content of the same size and time: the answer is remembered, the file not read again
    path.write_bytes(ticker_line(now, "ETH-USD"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert newest_in_tail(path, PRODUCTS)[0] == {"BTC-USD": pytest.approx(now)}
    with open(path, "ab") as handle:  # it grew: read again
        handle.write(ticker_line(now + 1, "BTC-USD"))
    assert newest_in_tail(path, PRODUCTS)[0] == {"ETH-USD": pytest.approx(now), "BTC-USD": pytest.approx(now + 1)}


def test_the_active_segment_of_a_live_ingest_is_not_read(tmp_path):
    """Its products are all in the ingest's heartbeat; a product missing there comes from the
    closed segments (remembered), not from megabytes of the segment being written."""
    now = time.time()
    ready = write_segment(tmp_path, "ready", 1, [ticker_line(now - 60, "ETH-USD")])
    # inconsistent on purpose: an ETH-USD record the heartbeat does not know of, to see it is not read
    write_segment(tmp_path, "active", 2, [ticker_line(now - 5, "BTC-USD"), ticker_line(now - 4, "ETH-USD")])
    beat = Heartbeat(child="ingest-coinbase", kind="ingest", source="coinbase", pid=os.getpid(), started_at=now - 10,
                     time=now, products={"BTC-USD": {"last_time": now - 1, "mid": None}})  # fmt: skip
    write_record(tmp_path / "data" / "run" / "ingest-coinbase.json", beat.to_dict())
    code, report = health_json(write_config(tmp_path))
    assert code == 0, report["findings"]
    assert report["freshness"]["BTC-USD"]["from"] == "heartbeat"
    assert report["freshness"]["ETH-USD"]["from"] == f"segment {ready.name}"
    assert report["freshness"]["ETH-USD"]["last_time"] == pytest.approx(now - 60, abs=1e-3)


# ---- disk ------------------------------------------------------------------------------------
def test_low_disk_against_the_real_free_space(tmp_path):
    write_segment(tmp_path, "active", 1, fresh_lines(time.time()))
    result = health(write_config(tmp_path, disk_warning_free_percent=99.99, disk_critical_free_percent=0.0))
    assert result.returncode == 1, result.stdout
    assert "free of" in result.stdout and "etl.after_processing" in result.stdout
    code, report = health_json(
        write_config(tmp_path, disk_warning_free_percent=99.99, disk_critical_free_percent=99.99)
    )
    assert code == 2
    assert report["disk"]["level"] == "critical" and 0 < report["disk"]["free_percent"] < 99.99
    assert report["disk"]["free_bytes"] > 0 and report["disk"]["total_bytes"] >= report["disk"]["free_bytes"]


def test_hours_until_full_from_the_write_rate_of_the_last_hour(tmp_path):
    now = time.time()
    # two minutes of capture: the first record of the oldest recent segment is 120 s old
    head = [ticker_line(now - 120, "ETH-USD")]
    ready = write_segment(tmp_path, "ready", 1, head + fresh_lines(now, 10_000), mtime=now - 60)
    active = write_segment(tmp_path, "active", 2, fresh_lines(now))
    code, report = health_json(write_config(tmp_path))
    assert code == 0
    rate = report["disk"]["write_bytes_per_second"]
    # every byte of the last hour, over the time since the first record of the oldest segment
    expected = (ready.stat().st_size + active.stat().st_size) / (report["time"] - (now - 120))
    assert rate == pytest.approx(expected, rel=1e-6)
    hours = report["disk"]["hours_until_full"]
    assert hours == pytest.approx(report["disk"]["free_bytes"] / rate / 3600, rel=0.01)
    # thresholds above the real hours left: a warning, then critical
    above = min(100_000.0, hours * 2)
    assert codes(tmp_path, disk_warning_hours_left=above, disk_critical_hours_left=0.0) == 1
    assert codes(tmp_path, disk_warning_hours_left=above, disk_critical_hours_left=above) == 2


def test_write_rate_is_unknown_with_too_little_data(tmp_path):
    write_segment(tmp_path, "active", 1, fresh_lines(time.time()))
    code, report = health_json(write_config(tmp_path))
    assert code == 0
    assert report["disk"]["write_bytes_per_second"] is None and report["disk"]["hours_until_full"] is None
    assert "write rate unknown" in health(write_config(tmp_path)).stdout


# ---- the supervisor's children -----------------------------------------------------------------
def child(name: str, state: str, **fields: Any) -> ChildStatus:
    kind = "etl" if name == "etl" else "ingest"
    command = ["daedalus", kind, "--config", "F"]
    return ChildStatus(name=name, kind=kind, source="coinbase", command=command, state=state, state_since=time.time(),
                       **fields)  # fmt: skip


def write_status(tmp_path: Path, *children: ChildStatus) -> None:
    data = tmp_path / "data"
    status = SupervisorStatus(pid=os.getpid(), started_at=time.time() - 60, time=time.time(), data_dir=str(data),
                              config_file="F", status_url=None, children=list(children))  # fmt: skip
    write_record(data / "run" / "supervisor.json", status.to_dict())


class HeldLock:
    """The supervisor's lock, held by this process as a running supervisor holds it."""

    def __init__(self, tmp_path: Path) -> None:
        path = tmp_path / "data" / "run" / "supervisor.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a+b")  # noqa: SIM115 - closed in __exit__
        fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def test_a_fatal_child_is_critical_while_the_supervisor_runs(tmp_path):
    write_segment(tmp_path, "active", 1, fresh_lines(time.time()))
    fatal = child("etl", "fatal", exit_reason="exit 2: invalid configuration", log_file="/var/log/etl.log")
    write_status(tmp_path, child("ingest-coinbase", "running", pid=os.getpid()), fatal)
    config = write_config(tmp_path)
    with HeldLock(tmp_path):
        result = health(config)
        code, report = health_json(config)
    assert result.returncode == 2 and code == 2, result.stdout
    assert "etl is fatal" in result.stdout and "exit 2: invalid configuration" in result.stdout
    assert "/var/log/etl.log" in result.stdout
    assert report["supervisor"]["running"] is True
    assert {c["name"]: c["state"] for c in report["supervisor"]["children"]} == {"ingest-coinbase": "running",
                                                                                 "etl": "fatal"}  # fmt: skip
    # the same status record without a supervisor holding the lock: a leftover, not judged
    code, report = health_json(config)
    assert code == 0 and report["supervisor"] == {"running": False}


def test_a_crashloop_is_critical_and_a_backoff_a_warning(tmp_path):
    write_segment(tmp_path, "active", 1, fresh_lines(time.time()))
    config = write_config(tmp_path)
    with HeldLock(tmp_path):
        write_status(tmp_path, child("ingest-coinbase", "crashloop", restarts=6, next_start_at=time.time() + 300),
                     child("etl", "running", pid=os.getpid()))  # fmt: skip
        result = health(config)
        assert result.returncode == 2, result.stdout
        assert "ingest-coinbase is in crashloop" in result.stdout and "retried in" in result.stdout
        write_status(tmp_path, child("ingest-coinbase", "backoff", restarts=1), child("etl", "running"))
        assert health(config).returncode == 1


def test_an_ingest_connected_but_silent_is_a_warning(tmp_path):
    now = time.time()
    write_segment(tmp_path, "active", 1, fresh_lines(now))
    beat = Heartbeat(child="ingest-coinbase", kind="ingest", source="coinbase", pid=os.getpid(), started_at=now - 100,
                     time=now, gauges={"connected": {"1": 1}, "last_frame_age_seconds": {"1": 45.0},
                                       "watchdog_seconds": 30.0, "stalled": 1},
                     products={p: {"last_time": now - 1, "mid": 1.0} for p in PRODUCTS})  # fmt: skip
    write_record(tmp_path / "data" / "run" / "ingest-coinbase.json", beat.to_dict())
    result = health(write_config(tmp_path))
    assert result.returncode == 1, result.stdout
    assert "ingest connected but silent for 45 s (watchdog 30 s)" in result.stdout


# ---- reports and odd content -------------------------------------------------------------------
def test_json_report_has_the_documented_keys(tmp_path):
    write_segment(tmp_path, "active", 1, fresh_lines(time.time()))
    code, report = health_json(write_config(tmp_path))
    assert code == 0
    assert set(report) >= {"level", "time", "findings", "sources", "disk", "freshness", "supervisor"}
    states = report["sources"]["coinbase"]["states"]
    assert set(states) == {"active", "ready", "processing", "quarantine"}
    assert set(states["active"]) == {"files", "bytes", "oldest_age_seconds", "newest_age_seconds"}
    assert states["active"]["files"] == 1
    assert set(report["sources"]["coinbase"]["backlog"]) >= {"segments", "bytes", "oldest_age_seconds"}
    assert set(report["disk"]) >= {"path", "free_bytes", "total_bytes", "free_percent", "write_bytes_per_second",
                                   "hours_until_full"}  # fmt: skip
    assert set(report["freshness"]["BTC-USD"]) >= {"source", "last_time", "age_seconds", "level"}


def test_odd_content_is_skipped_never_a_crash(tmp_path):
    now = time.time()
    data = tmp_path / "data"
    active = write_segment(tmp_path, "active", 3, [*fresh_lines(now), b'{"recv_ns":12,"conn":1,"msg":{"cut'])
    (active.parent / ".lock").write_text("x")
    (active.parent / ".segment_20260809T21_00004.ndjson.tmp").write_bytes(b"x" * 1000)
    (active.parent / "notes.txt").write_text("not a segment")
    ready = write_segment(tmp_path, "ready", 1, fresh_lines(now), zstd=True)
    ready.write_bytes(ready.read_bytes()[:-7])  # a cut zstd frame
    (data / "raw" / "ready" / "coinbase" / "segment_20260809T21_00002.ndjson").mkdir()  # a folder named like one
    (data / "raw" / "ready" / "weird=name").mkdir(parents=True)
    run = data / "run"
    run.mkdir(parents=True)
    (run / "ingest-coinbase.json").write_bytes(b"\x00garbage{")
    (run / "etl.json").write_bytes(orjson.dumps({"version": 1, "pid": "nope", "time": "soon"}))
    (run / "supervisor.json").write_bytes(b"[1, 2]")
    code, report = health_json(write_config(tmp_path))
    assert code == 0, report["findings"]
    assert report["sources"]["coinbase"]["states"]["active"]["files"] == 1
    assert report["sources"]["coinbase"]["states"]["ready"]["files"] == 1
    assert report["freshness"]["BTC-USD"]["from"] == f"segment {active.name}"
    with HeldLock(tmp_path):  # a running supervisor whose status record is garbage: said, not a crash
        code, report = health_json(write_config(tmp_path))
    assert code == 1 and [f["check"] for f in report["findings"]] == ["supervisor"]
