"""``daedalus run``: one asyncio loop that starts the children, watches them (exit,
heartbeat, memory), restarts them by :class:`~daedalus.supervisor.children.ChildPolicy`,
writes ``<data_dir>/run/supervisor.json`` every second, serves the status page and talks
to systemd. Nothing here blocks for long: the loop ticks every :data:`TICK` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from daedalus.config import DaedalusConfig
from daedalus.logs import get_logger
from daedalus.ops.records import (
    ChildStatus,
    Heartbeat,
    SupervisorStatus,
    read_heartbeat,
    remove_stale_temporaries,
    write_record,
)
from daedalus.supervisor.children import ChildPolicy, ChildSpec, SupervisorUsageError, add_counters, plan_children
from daedalus.supervisor.logfiles import RotatingLog
from daedalus.supervisor.process import ChildProcess
from daedalus.supervisor.systemd import SystemdNotifier

__all__ = ["SupervisorUsageError", "run_supervisor"]

log = get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
TICK = 0.25  # seconds between looks at the children
STATUS_EVERY = 1.0
LOCK_WAIT = 2.0  # `daedalus status` probes the lock with a shared lock for an instant
MIB = 1024 * 1024


def run_supervisor(
    settings: DaedalusConfig,
    *,
    config_file: Path,
    sources: list[str] | None,
    sync: bool,
    dry_run: bool,
    memory_limit_mb: float | None,
) -> int:
    """Run until SIGTERM/SIGINT; 0 after a clean stop, 1 when another supervisor runs here.
    Raises :class:`SupervisorUsageError` for flags it cannot act on. Returns with SIGTERM and
    SIGINT ignored (:func:`ignore_stop_signals`): the caller is meant to exit."""
    specs = plan_children(settings, config_file, sources, sync=sync)
    if dry_run:
        for spec in specs:
            print(f"{spec.name}: {shlex.join(spec.argv)}")
        return 0
    layout = settings.layout
    lock = take_lock(layout.supervisor_lock, LOCK_WAIT)
    if lock is None:
        sys.stderr.write(f"daedalus run: another supervisor runs on {layout.root} (lock {layout.supervisor_lock})\n")
        return 1
    try:
        remove_stale_temporaries(layout.run_dir)  # half-written records of a killed predecessor
        supervisor = Supervisor(settings, specs, Path(config_file).resolve(), memory_limit_mb)
        return asyncio.run(supervisor.run())
    finally:
        lock.close()  # the OS would let go at exit anyway; this is for tests calling us in-process


def take_lock(path: Path, wait: float) -> TextIO | None:
    """The supervisor's exclusive lock on ``path``, retried for ``wait`` seconds (a
    ``daedalus status`` probe holds a shared lock for an instant); None if another holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held for the life of the supervisor
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if time.monotonic() >= deadline:
                handle.close()
                return None
            time.sleep(0.05)
            continue
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return handle


def ignore_stop_signals(loop: asyncio.AbstractEventLoop) -> None:
    """Once everything is stopped, a late SIGTERM/SIGINT (systemd's second, an impatient
    Ctrl-C) must not turn a clean exit into death by signal or a KeyboardInterrupt, which is
    what asyncio's closing the loop would allow: it puts the default handlers back. The
    process is about to exit; nothing is left to stop."""
    for signum in STOP_SIGNALS:
        loop.remove_signal_handler(signum)
        signal.signal(signum, signal.SIG_IGN)


class Child:
    """One supervised child across its processes: its policy, current process, log, and
    what is carried over from earlier processes (counters)."""

    def __init__(self, spec: ChildSpec, settings: DaedalusConfig, rng: random.Random) -> None:
        cfg = settings.supervisor
        self.spec = spec
        self.policy = ChildPolicy(cfg, rng, state_since=time.monotonic())
        self.log_path = settings.log_dir / f"{spec.name}.log"
        self.output = RotatingLog(self.log_path, max_bytes=int(cfg.log_max_mb * MIB), backups=cfg.log_backups)
        self.heartbeat_path = settings.layout.heartbeat_file(spec.name)
        self.process: ChildProcess | None = None
        self.stop_task: asyncio.Task[int] | None = None
        self.heartbeat: Heartbeat | None = None  # the newest of the current process
        self.heartbeat_seen = 0.0  # monotonic: when that heartbeat last changed, or the process started
        self.carried: dict[str, Any] = {}  # counters of earlier processes, added up
        self.rss: int | None = None
        self.memory_warned = False
        self.stalled_since: float | None = None
        self.exit_reason: str | None = None

    def new_process(self, process: ChildProcess, now: float) -> None:
        self.process, self.heartbeat, self.heartbeat_seen = process, None, now
        self.stalled_since, self.rss, self.memory_warned = None, None, False

    def observe(self, heartbeat: Heartbeat | None, pid: int, now: float) -> None:
        """Keep the newest heartbeat of the current process (one left by an earlier pid is
        not its own) and note on the monotonic clock when it last changed. Hangs are judged
        by that, not by the record's wall-clock time: a Pi has no RTC and NTP steps its
        clock at boot, which must neither make every child look hung nor hide a real hang."""
        if heartbeat is None or heartbeat.pid != pid:
            return
        if self.heartbeat is None or heartbeat.time != self.heartbeat.time:
            self.heartbeat_seen = now
        self.heartbeat = heartbeat

    def silent_for(self, now: float) -> float:
        """Seconds without a new heartbeat (since the process started when none came yet)."""
        return max(0.0, now - self.heartbeat_seen)

    def stalled_for(self, now: float) -> float:
        """Seconds the heartbeat has said ``stalled`` without a break; 0 when it does not."""
        if self.heartbeat is None or self.heartbeat.gauges.get("stalled") != 1:
            self.stalled_since = None
            return 0.0
        if self.stalled_since is None:
            self.stalled_since = now
        return now - self.stalled_since


class Supervisor:
    """The children, the loop that watches them, and what it tells the world (status record,
    status server, systemd)."""

    def __init__(
        self, settings: DaedalusConfig, specs: list[ChildSpec], config_file: Path, memory_limit_mb: float | None
    ) -> None:
        self.settings = settings
        self.cfg = settings.supervisor
        self.layout = settings.layout
        self.config_file = config_file
        self.rng = random.Random()
        self.children = [Child(spec, settings, self.rng) for spec in specs]
        critical = memory_limit_mb if memory_limit_mb is not None else self.cfg.memory_critical_mb
        self.memory_critical = None if critical is None else critical * MIB
        self.memory_warning = None if self.cfg.memory_warning_mb is None else self.cfg.memory_warning_mb * MIB
        self.notifier = SystemdNotifier()
        self.started_mono = time.monotonic()
        self.status_url: str | None = None
        self.stop_event = asyncio.Event()
        self.shutting_down = False
        self.ready_sent = False
        self._status_failed = False

    # ---- the loop ------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        log.info("supervisor_started", pid=os.getpid(), data_dir=str(self.layout.root),
                 children=",".join(c.spec.name for c in self.children), log_dir=str(self.settings.log_dir))  # fmt: skip
        server = await self._start_status_server()
        code = 0
        try:
            await self._supervise()
        except Exception:  # a bug of ours: stop the children cleanly, exit 1 (systemd restarts us)
            log.error("supervisor_failed", exc_info=True)
            code = 1
        try:
            await self._shutdown()
        finally:
            if server is not None:
                with contextlib.suppress(Exception):
                    await server.stop()
            for child in self.children:
                child.output.close()
            ignore_stop_signals(loop)
        log.info("supervisor_stopped", exit_code=code)
        return code

    async def _supervise(self) -> None:
        """The loop, until SIGTERM/SIGINT. It is what systemd's watchdog watches: WATCHDOG=1
        goes out only from a tick that completed, so a loop that stops ticking (a blocking
        call, an await that never returns) stops the pings and systemd restarts the service.
        READY=1 once every child has been spawned (not "running": a crash-looping child must
        not keep the service from starting)."""
        next_status, next_memory = 0.0, time.monotonic() + self.cfg.memory_check_seconds
        while not self.stop_event.is_set():
            now = time.monotonic()
            for child in self.children:
                await self._tick(child, now)
            if now >= next_memory:
                next_memory = now + self.cfg.memory_check_seconds
                self._check_memory(now)
            if not self.ready_sent and all(c.policy.starts > 0 or c.policy.state == "fatal" for c in self.children):
                self.ready_sent = True
                self.notifier.ready(f"supervising {len(self.children)} children")
            if now >= next_status:
                next_status = now + STATUS_EVERY
                self._write_status()
            self.notifier.watchdog()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), TICK)

    def _on_signal(self, signum: int) -> None:
        """SIGTERM/SIGINT: stop. Another one while stopping changes nothing (each child keeps
        its shutdown timeout, then SIGKILL); it is only logged."""
        log.info("supervisor_signal", signal=signal.Signals(signum).name, already_stopping=self.stop_event.is_set())
        self.stop_event.set()

    async def _tick(self, child: Child, now: float) -> None:
        process = child.process
        if process is not None and process.done.done():
            self._on_exit(child, process, now)
            process = None
        if process is not None:
            child.policy.tick(now)
            if child.policy.state != "stopping":
                self._check_liveness(child, process, now)
        elif child.policy.due(now) and not self.stop_event.is_set():  # a signal may come while spawning
            await self._start(child, now)

    async def _start(self, child: Child, now: float) -> None:
        spec = child.spec
        try:
            process = await ChildProcess.spawn(spec, child.output)
        except OSError as exc:
            reason = f"cannot start: {exc.strerror or exc}"
            child.exit_reason = reason
            child.policy.started(now)
            state = child.policy.exited(now, None)
            log.error("child_start_failed", child=spec.name, error=reason, state=state)
            return
        child.new_process(process, now)
        child.policy.started(now)
        process.apply_priority(self.cfg.process_nice.get(spec.kind), self.cfg.cpu_affinity.get(spec.kind))
        log.info("child_started", child=spec.name, pid=process.pid, restarts=child.policy.restarts)

    def _on_exit(self, child: Child, process: ChildProcess, now: float) -> None:
        code = process.done.result()
        reason = process.exit_reason(code)
        if child.heartbeat is not None:
            child.carried = add_counters(child.carried, child.heartbeat.counters)
        child.process, child.heartbeat, child.stop_task, child.rss = None, None, None, None
        child.exit_reason = reason
        planned = child.policy.stop_reason
        state = child.policy.exited(now, code, shutting_down=self.shutting_down)
        fields: dict[str, Any] = {"child": child.spec.name, "pid": process.pid, "reason": reason, "state": state}
        if child.policy.next_start_at is not None:
            fields["retry_in_seconds"] = round(max(0.0, child.policy.next_start_at - now), 2)
        if state == "fatal":
            log.error("child_fatal", **fields, log_file=str(child.log_path),
                      hint="configuration or state needs the operator; fix it and restart daedalus run")  # fmt: skip
        elif state == "crashloop":
            log.error("child_crashloop", **fields, restarts_in_window=len(child.policy.restart_times),
                      window_seconds=self.cfg.restart_window_seconds, log_file=str(child.log_path))  # fmt: skip
        elif planned is not None:
            log.info("child_stopped", **fields, why=planned)
        else:
            log.warning("child_exited", **fields, log_file=str(child.log_path))

    # ---- liveness and memory -------------------------------------------------------------
    def _check_liveness(self, child: Child, process: ChildProcess, now: float) -> None:
        """Hung: no new heartbeat for ``hang_timeout_seconds``. Stalled: an ingest whose own
        watchdog says "connected but silent" for as long."""
        child.observe(read_heartbeat(child.heartbeat_path), process.pid, now)
        hang = self.cfg.hang_timeout_seconds
        if child.silent_for(now) > hang:
            age = "none since start" if child.heartbeat is None else round(child.silent_for(now), 1)
            log.warning("child_hung", child=child.spec.name, pid=process.pid, hang_timeout_seconds=hang,
                        heartbeat_age_seconds=age)  # fmt: skip
            self._request_stop(child, "hang", now)
        elif (stalled := child.stalled_for(now)) > hang:
            assert child.heartbeat is not None
            log.warning("child_stalled", child=child.spec.name, pid=process.pid,
                        reason="connected but no frame for longer than the ingest watchdog",
                        watchdog_seconds=child.heartbeat.gauges.get("watchdog_seconds"),
                        stalled_seconds=round(stalled, 1))  # fmt: skip
            self._request_stop(child, "stalled", now)

    def _check_memory(self, now: float) -> None:
        for child in self.children:
            process = child.process
            if process is None or child.policy.state == "stopping":
                continue
            rss = child.rss = process.rss_bytes()
            if rss is None:
                continue
            warning = self.memory_warning
            if warning is not None and rss > warning and not child.memory_warned:
                child.memory_warned = True
                log.warning("child_memory_high", child=child.spec.name, pid=process.pid, rss_mb=round(rss / MIB, 1),
                            warning_mb=round(warning / MIB, 1))  # fmt: skip
            elif warning is not None and rss <= warning:
                child.memory_warned = False
            if self.memory_critical is not None and rss > self.memory_critical:
                log.warning("child_memory_restart", child=child.spec.name, pid=process.pid,
                            rss_mb=round(rss / MIB, 1), limit_mb=round(self.memory_critical / MIB, 1))  # fmt: skip
                self._request_stop(child, "memory", now)

    def _request_stop(self, child: Child, reason: str, now: float) -> None:
        process = child.process
        if process is None:
            return
        child.policy.stopping(now, reason)
        if child.stop_task is None:
            child.stop_task = asyncio.create_task(process.stop(self.cfg.shutdown_timeout(child.spec.kind)))

    # ---- shutdown ------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        self.shutting_down = True
        self.notifier.stopping()
        now = time.monotonic()
        log.info("supervisor_stopping", children=sum(1 for c in self.children if c.process is not None))
        for child in self.children:
            if child.process is None:
                child.policy.shutdown(now)
            else:
                self._request_stop(child, "shutdown", now)  # keeps a stop already under way (and its timeout)
        self._write_status()
        tasks = [c.stop_task for c in self.children if c.stop_task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        now = time.monotonic()
        for child in self.children:
            if child.process is not None:
                with contextlib.suppress(Exception):
                    await child.process.done
                self._on_exit(child, child.process, now)
        self._write_status()

    # ---- status --------------------------------------------------------------------------
    def snapshot(self) -> SupervisorStatus:
        """The live status (also what the status page and metrics read). Times are kept on
        the monotonic clock and turned into epoch seconds here, so uptimes and retry times stay
        right when NTP steps the wall clock."""
        now, wall = time.monotonic(), time.time()

        def epoch(mono: float) -> float:
            return wall - (now - mono)

        children = []
        for child in self.children:
            policy, process, heartbeat = child.policy, child.process, child.heartbeat
            retry = policy.next_start_at if policy.state in ("backoff", "crashloop") else None
            counters = add_counters(child.carried, heartbeat.counters) if heartbeat is not None else child.carried
            children.append(ChildStatus(
                name=child.spec.name, kind=child.spec.kind, source=child.spec.source, command=list(child.spec.argv),
                state=policy.state, state_since=epoch(policy.state_since),
                pid=None if process is None else process.pid,
                started_at=None if process is None else epoch(process.started_mono),
                restarts=policy.restarts, memory_restarts=policy.memory_restarts, hang_restarts=policy.hang_restarts,
                rss_bytes=child.rss, heartbeat_age=None if heartbeat is None else round(child.silent_for(now), 2),
                exit_reason=child.exit_reason,
                next_start_at=None if retry is None else epoch(retry),
                log_file=str(child.log_path), counters=counters,
                gauges=dict(heartbeat.gauges) if heartbeat is not None else {},
                products=dict(heartbeat.products) if heartbeat is not None else {},
            ))  # fmt: skip
        return SupervisorStatus(
            pid=os.getpid(), started_at=epoch(self.started_mono), time=wall, data_dir=str(self.layout.root),
            config_file=str(self.config_file), status_url=self.status_url, children=children,
        )  # fmt: skip

    def _write_status(self) -> None:
        """The status record (and systemd's STATUS line). Failing to write it (full disk, a
        bug in a record) is logged once and retried next second: never worth stopping capture."""
        path = self.layout.supervisor_status_file
        try:
            status = self.snapshot()
            self.notifier.status_changed(status_line(status))
            write_record(path, status.to_dict())
        except Exception as exc:
            if not self._status_failed:
                error = (exc.strerror if isinstance(exc, OSError) else None) or repr(exc)
                log.warning("status_write_failed", path=str(path), error=error, exc_info=not isinstance(exc, OSError))
            self._status_failed = True
            return
        if self._status_failed:
            log.info("status_write_recovered", path=str(path))
        self._status_failed = False

    async def _start_status_server(self) -> Any:
        """The status page and /metrics; losing them is not worth losing capture."""
        host, port = self.cfg.status_host, self.cfg.status_port
        try:
            from daedalus.ops.web import StatusServer

            server = StatusServer(host=host, port=port, config=self.settings, snapshot=self.snapshot)
            self.status_url = await server.start()
        except Exception as exc:  # whatever it is (missing module, port taken): keep supervising
            reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or repr(exc)
            log.warning("status_server_failed", host=host, port=port, reason=reason)
            return None
        log.info("status_server_started", url=self.status_url)
        return server


def status_line(status: SupervisorStatus) -> str:
    """One line for ``systemctl status``: each child and its state."""
    return ", ".join(f"{child.name} {child.state}" for child in status.children)
