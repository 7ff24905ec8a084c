"""The real supervisor against the simulator: a configuration error makes a child
``fatal`` (never restarted), one supervisor per data directory, a status record that
cannot be written, SIGKILL of the supervisor leaves no child behind, restarts forced by a
tiny memory limit lose nothing (and leak no pipe, file or zombie), SIGTERM during
start-up."""

from __future__ import annotations

import contextlib
import os
import signal

import psutil
import pytest

from tests.supervisor_helpers import (
    INGEST,
    Supervised,
    check_capture_intact,
    cli,
    open_handles,
    started_pids,
    supervisor_config,
    up,
    wait_gone,
    write_yaml,
)


def block_status_record(path) -> None:
    """A directory where the status record goes: replacing it fails, as on a full disk."""
    while True:
        path.unlink(missing_ok=True)
        try:
            path.mkdir()
            return
        except FileExistsError:  # the supervisor wrote it again in between
            continue


async def test_fatal_child_single_supervisor_and_sigkill_of_the_supervisor(tmp_path, make_sim):
    sim = await make_sim(rate=100.0, heartbeat_interval=0.2)
    data = tmp_path / "data"
    config = supervisor_config(data, sim.ws_url, cpu_affinity={"ingest": [0]})
    config["ingestion"]["segment_max_mb"] = 0.05  # segments become ready often: the ETL reads its checkpoint
    path = write_yaml(tmp_path / "c.yaml", config)
    sup = await Supervised(tmp_path, path, data).start()
    try:
        ingest = await sup.wait_child(INGEST, up, "ingest running")
        etl = await sup.wait_child("etl", lambda c: up(c) and c.counters["segments_processed"] > 0, "etl working")
        assert psutil.Process(etl.pid).nice() == 10 and psutil.Process(ingest.pid).cpu_affinity() == [0]

        # one supervisor per data directory
        code, _, err = await cli("run", "--config", str(path))
        assert code == 1 and f"another supervisor runs on {data}" in err

        # the ETL checkpoint is damaged and the ETL dies: its restart exits 2 -> fatal, left alone
        os.kill(etl.pid, signal.SIGSTOP)  # so it cannot replace the checkpoint we damage
        (data / "processed" / "_state").mkdir(parents=True, exist_ok=True)
        (data / "processed" / "_state" / "coinbase.json").write_text('{"version": -1}')
        os.kill(etl.pid, signal.SIGKILL)
        fatal = await sup.wait_child("etl", lambda c: c.state == "fatal", "etl fatal")
        assert fatal.pid is None and fatal.restarts == 1 and fatal.next_start_at is None
        assert fatal.exit_reason.startswith("exit 2: ") and "--rebuild-state" in fatal.exit_reason
        # several backoff periods later (backoff_max_seconds is 1 s) it is still fatal, never started again
        await sup.wait_child("etl", lambda c: sup.status().time > fatal.state_since + 3.0, "time to pass")
        still = sup.child("etl")
        assert still.state == "fatal" and still.restarts == 1 and still.pid is None
        assert sup.child(INGEST).pid == ingest.pid  # the others keep running
        code, out, _ = await cli("status", "--config", str(path))
        assert code == 0 and "not restarted" in next(line for line in out.splitlines() if line.startswith("etl "))
        assert "child_fatal" in sup.text()

        # the status record cannot be written: logged, supervising goes on, written again once it can be
        block_status_record(sup.layout.supervisor_status_file)
        await sup.wait(lambda: "status_write_failed" in sup.text(), "status_write_failed")
        sup.layout.supervisor_status_file.rmdir()
        await sup.wait(lambda: "status_write_recovered" in sup.text(), "status_write_recovered")
        assert sup.child(INGEST).pid == ingest.pid

        # SIGKILL of the supervisor: its children stop with it, ingest closing its segment
        assert await sup.stop(signal.SIGKILL) == -signal.SIGKILL
        await wait_gone([ingest.pid])
    finally:
        await sup.kill_all()
    code, out, _ = await cli("status", "--config", str(path))
    assert code == 1 and "no supervisor is running" in out and "last status written" in out
    check_capture_intact(data)


async def test_tiny_memory_limit_forces_graceful_restarts_that_lose_nothing(tmp_path, make_sim):
    sim = await make_sim(rate=300.0, heartbeat_interval=0.2)
    data = tmp_path / "data"
    config = supervisor_config(data, sim.ws_url, memory_check_seconds=1.5, memory_warning_mb=0.5,
                               memory_critical_mb=1024.0, max_restarts=1)  # fmt: skip
    path = write_yaml(tmp_path / "c.yaml", config)
    sup = await Supervised(tmp_path, path, data).start("--memory-limit-mb", "1")  # overrides memory_critical_mb
    try:
        child = await sup.wait_child(INGEST, lambda c: c.memory_restarts >= 3, "three memory restarts", timeout=45)
        assert child.state != "crashloop"  # restarts it asks for itself do not count towards crashloop
        # (what the children captured across the restarts is checked at the end: check_capture_intact;
        # the current child's own counter may still be 0 when a loaded machine slows its start-up)
        await sup.wait_child("etl", lambda c: c.memory_restarts >= 3, "three etl memory restarts")
        # nothing piles up over restarts: one output pipe per child at most, each log file open once
        pipes, files, zombies = await open_handles(sup.pid)
        logs = [str(data / "logs" / f"{name}.log") for name in ("etl", INGEST)]
        assert pipes <= 2 and zombies == 0
        assert sorted(set(files) - {str(sup.layout.supervisor_lock)}) == logs and len(files) == len(set(files))
        pids = [p for p in (sup.child(INGEST).pid, sup.child("etl").pid) if p]
        assert await sup.stop(signal.SIGTERM) == 0
        await wait_gone(pids)
    finally:
        await sup.kill_all()
    text = sup.text()
    assert "child_memory_restart" in text and "child_memory_high" in text and "child_kill" not in text
    check_capture_intact(data)


@pytest.mark.parametrize("after", ["supervisor_started", "child_started"])
async def test_sigterm_twice_during_start_up_stops_cleanly(tmp_path, make_sim, after):
    """SIGTERM as soon as the signal handlers are in place (no child yet), or as soon as the
    first child is spawned (still importing, its own handlers not yet in place)."""
    sim = await make_sim(rate=50.0)
    data = tmp_path / "data"
    path = write_yaml(tmp_path / "c.yaml", supervisor_config(data, sim.ws_url))
    sup = await Supervised(tmp_path, path, data).start()
    try:
        await sup.wait(lambda: after in sup.text(), after)
        sup.proc.send_signal(signal.SIGTERM)
        await sup.wait(lambda: "supervisor_stopping" in sup.text(), "supervisor_stopping")
        with contextlib.suppress(ProcessLookupError):  # gone already: nothing for it to interrupt
            await sup.stop(signal.SIGTERM)  # a second one while stopping changes nothing
        assert await sup.stop() == 0
    finally:
        await sup.kill_all()
    await wait_gone(started_pids(sup.text()))
    final = sup.status()
    assert final is not None and {c.state for c in final.children} == {"exited"}
    assert "supervisor_failed" not in sup.text() and "child_kill" not in sup.text()
