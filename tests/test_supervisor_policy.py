"""The supervisor's parts without processes: restart policy over times, counters over
restarts, child log rotation, the systemd datagram, the status table."""

from __future__ import annotations

import fcntl
import random
import socket
import time
from pathlib import Path

import pytest

from daedalus.config import DaedalusConfig, SupervisorConfig
from daedalus.exitcodes import FAILED, NEEDS_OPERATOR
from daedalus.layout import DataLayout
from daedalus.ops.records import ChildStatus, Heartbeat, SupervisorStatus, write_record
from daedalus.supervisor.children import ChildPolicy, SupervisorUsageError, add_counters, plan_children
from daedalus.supervisor.logfiles import RotatingLog
from daedalus.supervisor.main import Child
from daedalus.supervisor.report import duration, status_text
from daedalus.supervisor.systemd import SystemdNotifier

CFG = SupervisorConfig(
    start_seconds=5, backoff_initial_seconds=1, backoff_max_seconds=8, reset_after_seconds=60, max_restarts=3,
    restart_window_seconds=300, crashloop_cooldown_seconds=600,
)  # fmt: skip


def policy() -> ChildPolicy:
    return ChildPolicy(CFG, random.Random(3))


def fail(p: ChildPolicy, now: float, code: int = FAILED, after: float = 0.5) -> str:
    """Start ``p`` at ``now`` and let the process die ``after`` seconds later."""
    assert p.due(now)
    p.started(now)
    return p.exited(now + after, code)


def test_starting_becomes_running_after_start_seconds():
    p = policy()
    assert p.due(0.0)
    p.started(0.0)
    p.tick(4.9)
    assert p.state == "starting"
    p.tick(5.0)
    assert p.state == "running" and p.restarts == 0


def test_backoff_doubles_to_the_cap_with_jitter_and_resets_after_a_long_run():
    cfg = CFG.model_copy(update={"max_restarts": 100})
    p = ChildPolicy(cfg, random.Random(1))
    now, delays = 0.0, []
    for _ in range(6):
        assert fail(p, now) == "backoff"
        delays.append(p.next_start_at - (now + 0.5))
        assert not p.due(p.next_start_at - 0.01)
        now = p.next_start_at
    for delay, nominal in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert 0.8 * nominal <= delay <= nominal  # jitter only ever shortens: the cap holds
    assert len(set(delays[3:])) == 3  # jittered, not lockstep
    p.started(now)
    p.exited(now + 61, FAILED)  # ran longer than reset_after_seconds: back to the first delay
    assert p.next_start_at - (now + 61) <= 1.0 and p.restarts == 6


def test_more_than_max_restarts_in_the_window_is_a_crashloop_retried_after_the_cooldown():
    p = policy()
    now = 0.0
    for _ in range(3):
        assert fail(p, now) == "backoff"
        now = p.next_start_at
    assert fail(p, now) == "crashloop"
    assert p.next_start_at == pytest.approx(now + 0.5 + 600) and p.restarts == 3
    assert not p.due(now + 599)
    assert p.due(now + 601)  # never given up
    now += 601
    assert fail(p, now, after=30) == "crashloop"  # the retry failed (before reset_after_seconds): at once again
    assert p.next_start_at == pytest.approx(now + 30 + 600) and p.restarts == 4
    now = p.next_start_at
    p.started(now)
    p.tick(now + 100)
    assert p.state == "running" and p.restarts == 5
    assert p.exited(now + 100, FAILED) == "backoff"  # it ran long enough: an ordinary failure again
    # failures older than the window no longer count
    q = policy()
    for start in (0.0, 400.0, 800.0, 1200.0, 1600.0):
        assert fail(q, start) == "backoff"


def test_exit_code_2_is_fatal_and_never_due_again():
    p = policy()
    assert fail(p, 0.0, NEEDS_OPERATOR) == "fatal"
    assert p.next_start_at is None and not p.due(10**9)
    p.shutdown(5.0)
    assert p.state == "fatal"


def test_restarts_the_supervisor_asks_for_are_counted_start_at_once_and_never_crashloop():
    p = policy()
    p.started(0.0)
    for i in range(10):
        p.stopping(1.0 + i, "memory" if i % 2 else "hang")
        assert p.state == "stopping"
        assert p.exited(1.5 + i, 0) == "backoff" and p.due(1.5 + i)
        p.started(1.5 + i)
    assert (p.memory_restarts, p.hang_restarts, p.restarts) == (5, 5, 10)
    p.stopping(20.0, "shutdown")
    assert p.exited(21.0, 0) == "exited" and not p.due(10**9)


def test_counters_add_up_leaf_by_leaf_over_restarts():
    first = {"frames_received": {"1": 10, "2": 5}, "frames_written": 15,
             "durable_latency_seconds": {"buckets": {"0.01": 3, "+Inf": 4}, "sum": 0.5, "count": 4}}  # fmt: skip
    second = {"frames_received": {"1": 1, "3": 7}, "frames_written": 8, "gaps": {"1": 0},
              "durable_latency_seconds": {"buckets": {"0.01": 1, "+Inf": 1}, "sum": 0.25, "count": 1}}  # fmt: skip
    total = add_counters(add_counters({}, first), second)
    assert total == {
        "frames_received": {"1": 11, "2": 5, "3": 7}, "frames_written": 23, "gaps": {"1": 0},
        "durable_latency_seconds": {"buckets": {"0.01": 4, "+Inf": 5}, "sum": 0.75, "count": 5},
    }  # fmt: skip
    assert first["frames_received"] == {"1": 10, "2": 5}  # inputs untouched


def test_plan_rejects_disabled_and_empty_sources(tmp_path):
    settings = DaedalusConfig(data_dir=tmp_path, coinbase={"enabled": False})
    with pytest.raises(SupervisorUsageError, match="every source is disabled"):
        plan_children(settings, tmp_path / "c.yaml", None, sync=True)
    with pytest.raises(SupervisorUsageError, match="coinbase is disabled in the config"):
        plan_children(settings, tmp_path / "c.yaml", ["coinbase"], sync=True)
    with pytest.raises(SupervisorUsageError, match="give at least one source"):
        plan_children(DaedalusConfig(data_dir=tmp_path), tmp_path / "c.yaml", [], sync=True)


def test_child_log_rotates_by_size_keeping_n_files(tmp_path):
    log = RotatingLog(tmp_path / "logs" / "etl.log", max_bytes=100, backups=2)
    for i in range(10):
        log.write(f"{i:02d}".encode() * 20 + b"\n")  # 41 bytes: two lines per file
    log.close()
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["etl.log", "etl.log.1", "etl.log.2"]
    assert (tmp_path / "logs" / "etl.log").read_bytes().startswith(b"0808")
    assert (tmp_path / "logs" / "etl.log.2").read_bytes().startswith(b"0404")
    assert all(p.stat().st_size <= 100 for p in (tmp_path / "logs").iterdir())


def test_systemd_notify_to_an_abstract_socket_and_no_op_without_one():
    name = f"daedalus-test-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        notifier = SystemdNotifier({"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "2000000"})
        assert notifier.watchdog_interval == 1.0
        notifier.ready("supervising 2 children")
        assert sock.recv(4096) == b"READY=1\nSTATUS=supervising 2 children"
        notifier.watchdog(100.0)
        notifier.watchdog(100.5)  # not due yet: nothing sent
        notifier.watchdog(101.0)
        assert sock.recv(4096) == b"WATCHDOG=1" and sock.recv(4096) == b"WATCHDOG=1"
        # a watchdog meant for another process is not ours to ping
        assert SystemdNotifier({"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}
                               ).watchdog_interval is None  # fmt: skip
    silent = SystemdNotifier({})
    assert not silent.enabled and silent.notify("READY=1") is False
    silent.watchdog()


def test_status_text_needs_a_live_supervisor(tmp_path: Path):
    layout = DataLayout(tmp_path)
    text, code = status_text(layout)
    assert code == 1 and "no supervisor is running" in text
    now = time.time()
    child = ChildStatus(name="etl", kind="etl", source="coinbase", command=["daedalus"], state="crashloop",
                        state_since=now, restarts=6, memory_restarts=1, hang_restarts=2,
                        exit_reason="exit 1: boom", next_start_at=now + 125)  # fmt: skip
    write_record(layout.supervisor_status_file, SupervisorStatus(
        pid=1, started_at=now - 3700, time=now, data_dir=str(tmp_path), config_file="c.yaml",
        status_url="http://127.0.0.1:8787/", children=[child]).to_dict())  # fmt: skip
    text, code = status_text(layout)
    assert code == 1 and "last status written" in text
    with open(layout.supervisor_lock, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text, code = status_text(layout)
    assert code == 0
    header, _columns, row = text.splitlines()
    assert "up 1h01m" in header and "http://127.0.0.1:8787/" in header
    assert row.split()[:5] == ["etl", "-", "crashloop", "-", "6"] and "(1/2)" in row
    assert "retry in 2m0" in row and "exit 1: boom" in row


def beat(pid: int, wall: float, **gauges: float) -> Heartbeat:
    return Heartbeat(child="ingest-coinbase", kind="ingest", source="coinbase", pid=pid, started_at=wall, time=wall,
                     gauges=dict(gauges))  # fmt: skip


def test_hangs_are_judged_on_the_monotonic_clock_not_the_heartbeats_wall_clock(tmp_path):
    spec = plan_children(DaedalusConfig(data_dir=tmp_path), tmp_path / "c.yaml", None, sync=False)[0]
    child = Child(spec, DaedalusConfig(data_dir=tmp_path), random.Random(1))
    child.heartbeat_seen = 100.0  # the process started at monotonic 100
    child.observe(beat(41, time.time()), 42, 101.0)  # left by an earlier process: not ours
    assert child.heartbeat is None and child.silent_for(130.0) == 30.0
    # NTP steps the wall clock an hour back, then two hours ahead: new records keep the child alive
    now = time.time()
    for mono, wall in ((102.0, now - 3600), (104.0, now + 7200), (106.0, now + 7202)):
        child.observe(beat(42, wall), 42, mono)
        assert child.silent_for(mono + 1) == 1.0
    child.observe(beat(42, now + 7202), 42, 200.0)  # the same record read again and again: it hangs
    assert child.silent_for(200.0) == 94.0
    # stalled counts while every record says so, and starts again after a break
    for mono, stalled, expected in ((300.0, 1, 0.0), (310.0, 1, 10.0), (320.0, 0, 0.0), (321.0, 1, 0.0)):
        child.observe(beat(42, mono, stalled=stalled), 42, mono)
        assert child.stalled_for(mono) == expected


def test_watchdog_usec_that_is_not_a_positive_number_disables_the_pings():
    for usec in ("0", "-5", "soon"):
        assert SystemdNotifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": usec}).watchdog_interval is None
    assert SystemdNotifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    assert SystemdNotifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval is None  # not under systemd


def test_systemd_status_is_sent_when_it_changes(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(5)
        notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "notify")})
        for line in ("etl running", "etl running", "etl crashloop"):
            notifier.status_changed(line)
        sock.setblocking(False)
        got = [sock.recv(4096), sock.recv(4096)]
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
    assert got == [b"STATUS=etl running", b"STATUS=etl crashloop"]


def test_durations_never_show_negative():
    assert [duration(s) for s in (-3.0, 0.25, 42, 303, 11_220, 1_051_200)] == [
        "0.0s", "0.2s", "42s", "5m03s", "3h07m", "12d04h"
    ]  # fmt: skip
