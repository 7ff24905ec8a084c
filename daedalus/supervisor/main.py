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
from daedalus.ops.records import ChildStatus, Heartbeat, SupervisorStatus, read_heartbeat, write_record
from daedalus.supervisor.children import ChildPolicy, ChildSpec, SupervisorUsageError, add_counters, plan_children
from daedalus.supervisor.logfiles import RotatingLog
from daedalus.supervisor.process import ChildProcess
from daedalus.supervisor.systemd import SystemdNotifier

__all__ = ["SupervisorUsageError", "run_supervisor"]

log = get_logger(__name__)

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
    Raises :class:`SupervisorUsageError` for flags it cannot act on."""
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
        self.carried: dict[str, Any] = {}  # counters of earlier processes, added up
        self.rss: int | None = None
        self.memory_warned = False
        self.stalled_since: float | None = None
        self.exit_reason: str | None = None


class Supervisor:
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
        self.started_at = time.time()
        self.status_url: str | None = None
        self.stop_event = asyncio.Event()
        self.shutting_down = False
        self.ready_sent = False
        self._status_failed = False

    # ---- the loop ------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
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
        log.info("supervisor_stopped", exit_code=code)
        return code

    async def _supervise(self) -> None:
        """The loop, until SIGTERM/SIGINT."""
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
        if not self.stop_event.is_set():
            log.info("supervisor_signal", signal=signal.Signals(signum).name)
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
        elif child.policy.due(now) and not self.shutting_down:
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
        child.process, child.heartbeat, child.stalled_since, child.rss = process, None, None, None
        child.memory_warned = False
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
        heartbeat = read_heartbeat(child.heartbeat_path)
        if heartbeat is not None and heartbeat.pid == process.pid:
            child.heartbeat = heartbeat
        hang = self.cfg.hang_timeout_seconds
        uptime = now - process.started_mono
        if uptime <= hang:
            return
        if child.heartbeat is None or child.heartbeat.age() > hang:
            age = None if child.heartbeat is None else round(child.heartbeat.age(), 1)
            log.warning("child_hung", child=child.spec.name, pid=process.pid, hang_timeout_seconds=hang,
                        heartbeat_age_seconds=age if age is not None else "none since start")  # fmt: skip
            self._request_stop(child, "hang", now)
            return
        stalled = child.heartbeat.gauges.get("stalled") == 1
        if not stalled:
            child.stalled_since = None
        elif child.stalled_since is None:
            child.stalled_since = now
        elif now - child.stalled_since > hang:
            log.warning("child_stalled", child=child.spec.name, pid=process.pid,
                        reason="connected but no frame for longer than the ingest watchdog",
                        watchdog_seconds=child.heartbeat.gauges.get("watchdog_seconds"),
                        stalled_seconds=round(now - child.stalled_since, 1))  # fmt: skip
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
                self._request_stop(child, "shutdown", now)
                child.policy.stop_reason = "shutdown"  # also when it was already stopping for a restart
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
        """The live status (also what the status page and metrics read)."""
        now, wall = time.monotonic(), time.time()

        def epoch(mono: float | None) -> float | None:
            return None if mono is None else wall - (now - mono)

        children = []
        for child in self.children:
            policy, process, heartbeat = child.policy, child.process, child.heartbeat
            counters = add_counters(child.carried, heartbeat.counters) if heartbeat is not None else child.carried
            children.append(ChildStatus(
                name=child.spec.name, kind=child.spec.kind, source=child.spec.source, command=list(child.spec.argv),
                state=policy.state, state_since=epoch(policy.state_since) or wall,
                pid=None if process is None else process.pid,
                started_at=None if process is None else process.started_at,
                restarts=policy.restarts, memory_restarts=policy.memory_restarts, hang_restarts=policy.hang_restarts,
                rss_bytes=child.rss, heartbeat_age=None if heartbeat is None else round(heartbeat.age(wall), 2),
                exit_reason=child.exit_reason,
                next_start_at=epoch(policy.next_start_at) if policy.state in ("backoff", "crashloop") else None,
                log_file=str(child.log_path), counters=counters,
                gauges=dict(heartbeat.gauges) if heartbeat is not None else {},
                products=dict(heartbeat.products) if heartbeat is not None else {},
            ))  # fmt: skip
        return SupervisorStatus(
            pid=os.getpid(), started_at=self.started_at, time=wall, data_dir=str(self.layout.root),
            config_file=str(self.config_file), status_url=self.status_url, children=children,
        )  # fmt: skip

    def _write_status(self) -> None:
        try:
            write_record(self.layout.supervisor_status_file, self.snapshot().to_dict())
        except OSError as exc:
            if not self._status_failed:
                log.warning("status_write_failed", path=str(self.layout.supervisor_status_file),
                            error=exc.strerror or repr(exc))  # fmt: skip
            self._status_failed = True
        else:
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
