"""The real supervisor (``daedalus run``) as a process against the simulator: restarts after
SIGKILL, the crash-loop guard and its cool-down, a hung (SIGSTOPped) child, systemd's
notify protocol and a clean SIGTERM stop."""

from __future__ import annotations

import fcntl
import os
import signal

import orjson

from daedalus.ops.records import SupervisorStatus
from tests.capture_helpers import segment_files
from tests.status_helpers import Metrics, assert_every_family, get
from tests.supervisor_helpers import (
    INGEST,
    NotifySocket,
    Supervised,
    check_capture_intact,
    cli,
    raw_segments,
    supervisor_config,
    up,
    wait_gone,
    write_yaml,
)


async def test_restarts_crashloop_hang_notify_and_clean_stop(tmp_path, make_sim):
    sim = await make_sim(rate=200.0, heartbeat_interval=0.2)
    data = tmp_path / "data"
    config = supervisor_config(data, sim.ws_url, max_restarts=2, restart_window_seconds=120.0,
                               crashloop_cooldown_seconds=15.0, hang_timeout_seconds=10.0)  # fmt: skip
    path = write_yaml(tmp_path / "c.yaml", config)
    # hold the ETL's lock: `daedalus etl --watch` exits 1 at once, every time
    lock_path = data / "processed" / "_state" / "coinbase.lock"
    lock_path.parent.mkdir(parents=True)
    etl_lock = open(lock_path, "a+")  # noqa: SIM115 - released in the middle of the test
    fcntl.flock(etl_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    notify = NotifySocket(tmp_path / "notify.sock")
    sup = await Supervised(tmp_path, path, data).start(
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
    )
    try:
        await notify.wait("READY=1")
        await notify.wait("WATCHDOG=1")
        first = await sup.wait_child(INGEST, up, "ingest running")
        status = sup.status()
        assert status is not None
        assert status.status_url is None or status.status_url.startswith("http://")

        # SIGKILL of the ingest child: restarted after backoff, capture goes on
        await sup.wait_child(INGEST, lambda c: c.counters.get("frames_written", 0) > 0, "frames written")
        before_kill = {p.name for p in raw_segments(data, ("active", "ready", "processing", "archive"))}
        os.kill(first.pid, signal.SIGKILL)
        second = await sup.wait_child(INGEST, lambda c: c.pid not in (None, first.pid) and up(c), "ingest restarted")
        assert second.restarts == 1 and second.exit_reason == "killed by SIGKILL"
        written = second.counters["frames_written"]
        await sup.wait_child(INGEST, lambda c: c.counters["frames_written"] > written, "counters carried and growing")

        # the ETL exits at once each time: crashloop, shown by `daedalus status`, ingest untouched
        # (the cool-down is 15 s so that the checks below, slow on a loaded machine, all see it)
        etl = await sup.wait_child("etl", lambda c: c.state == "crashloop", "etl crashloop")
        assert etl.restarts == 2 and "another daedalus etl is already processing" in (etl.exit_reason or "")
        code, out, _ = await cli("status", "--config", str(path))
        assert code == 0
        etl_row = next(line for line in out.splitlines() if line.startswith("etl "))
        assert "crashloop" in etl_row and "retry in" in etl_row
        assert "running" in next(line for line in out.splitlines() if line.startswith(INGEST))
        await notify.wait("etl crashloop", part=True)  # systemctl status shows it too
        assert sup.child(INGEST).pid == second.pid
        await check_http_during_crashloop(sup.status())

        # after the cool-down it is tried again; with the lock free it runs
        etl_lock.close()
        await sup.wait_child("etl", lambda c: c.state == "running" and c.restarts == 3, "etl retried and running")

        # a hung child (SIGSTOP): its heartbeat goes stale, it is stopped and restarted
        os.kill(second.pid, signal.SIGSTOP)
        third = await sup.wait_child(INGEST, lambda c: c.hang_restarts == 1 and c.pid not in (None, second.pid)
                                     and up(c), "hung ingest restarted")  # fmt: skip
        assert third.restarts == 2
        assert "child_hung" in sup.text()
        pids = [third.pid, sup.child("etl").pid]

        # SIGTERM: everything stops in time, the open segment lands in ready/
        assert await sup.stop(signal.SIGTERM) == 0
        await wait_gone(pids)
        await notify.wait("STOPPING=1")
    finally:
        etl_lock.close()
        await sup.kill_all()
        await notify.close()
    final = sup.status()
    assert final is not None and {c.state for c in final.children} == {"exited"}
    assert all(c.pid is None for c in final.children)
    check_capture_intact(data)
    after = {p.name for p in raw_segments(data)}
    assert after - before_kill, "no new segment after the restart"
    assert segment_files(data, "ready") or segment_files(data, "archive")
    log = (data / "logs" / f"{INGEST}.log").read_text()
    assert f"pid {first.pid} killed by SIGKILL" in log
    code, out, _ = await cli("status", "--config", str(path))
    assert code == 1 and "no supervisor is running" in out


async def check_http_during_crashloop(status: SupervisorStatus | None) -> None:
    """The supervisor's own HTTP server says it too: /healthz critical (503) naming the
    crash-looping child, /metrics with every family and the states as they are."""
    assert status is not None and status.status_url and status.status_url.startswith("http://127.0.0.1:")
    code, content_type, body = await get(status.status_url + "healthz")
    report = orjson.loads(body)
    assert code == 503 and content_type.startswith("application/json") and report["level"] == "critical"
    assert any(f["level"] == "critical" and "etl" in f["subject"] and "crashloop" in f["message"]
               for f in report["findings"]), report["findings"]  # fmt: skip
    code, _, text = await get(status.status_url + "metrics")
    assert code == 200
    metrics = Metrics(text)
    assert_every_family(metrics)
    assert metrics.value("daedalus_child_state", child="etl", state="crashloop") == 1
    assert metrics.value("daedalus_child_state", child=INGEST, state="running") == 1
    assert metrics.value("daedalus_child_restarts_total", child="etl") == 2
    assert metrics.value("daedalus_frames_received_total", source="coinbase", connection="1") > 0
    assert metrics.value("daedalus_health_level") == 2
    code, _, page = await get(status.status_url)
    assert code == 200 and "<canvas" in page
