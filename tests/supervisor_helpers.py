"""Running the real supervisor (``daedalus run``) as a process in tests, and reading what it
and its children left behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psutil
import yaml

from daedalus.capture.records import iter_lines
from daedalus.layout import DataLayout
from daedalus.ops.records import ChildStatus, SupervisorStatus, read_supervisor_status
from tests.capture_helpers import ingest_config, segment_files
from tests.conftest import REPO

DAEDALUS = [sys.executable, "-m", "daedalus"]
INGEST = "ingest-coinbase"
RAW_STATES = ("active", "ready", "processing", "archive", "quarantine")


def supervisor_config(data: Path, ws_url: str, **supervisor: Any) -> dict[str, Any]:
    """A config for fast tests: short start/backoff/hang times, status on a free port, the
    ETL archiving segments (so the raw records stay to be checked) and polling often."""
    config = ingest_config(data, ws_url, flush_interval_seconds=0.1)
    config["etl"] = {"after_processing": "archive", "poll_interval_seconds": 0.2}
    config["supervisor"] = {
        "status_port": 0,
        "start_seconds": 0.5,
        "backoff_initial_seconds": 0.2,
        "backoff_max_seconds": 1.0,
        "reset_after_seconds": 30.0,
        "heartbeat_seconds": 0.3,
        # the hang clock starts at spawn: a child still importing on a loaded machine (xdist
        # workers on 2 cores) must not count as hung; test_supervisor_run sets its own
        "hang_timeout_seconds": 20.0,
        "memory_check_seconds": 1.0,
        "ingestion_shutdown_timeout": 10.0,
        "etl_shutdown_timeout": 10.0,
        **supervisor,
    }
    return config


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


class Supervised:
    """``daedalus run`` as a process: its output in a file, its status record read on demand."""

    def __init__(self, tmp_path: Path, config: Path, data: Path) -> None:
        self.tmp_path, self.config, self.layout = tmp_path, config, DataLayout(data)
        self.output = tmp_path / "supervisor.out"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, *args: str, env: dict[str, str] | None = None) -> Supervised:
        with open(self.output, "ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *DAEDALUS, "run", "--config", str(self.config), *args,
                stdout=out, stderr=out, cwd=REPO, env={**os.environ, **(env or {})},
            )  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def status(self) -> SupervisorStatus | None:
        status = read_supervisor_status(self.layout.supervisor_status_file)
        return status if status is not None and status.pid == self.pid else None

    def child(self, name: str) -> ChildStatus | None:
        status = self.status()
        return next((c for c in status.children if c.name == name), None) if status else None

    async def wait_child(self, name: str, condition: Callable[[ChildStatus], bool], what: str,
                         timeout: float = 30.0) -> ChildStatus:  # fmt: skip
        """Poll the status record until ``condition`` holds for child ``name``."""
        seen: list[ChildStatus] = []

        def holds() -> bool:
            child = self.child(name)
            seen[:] = [child] if child is not None else []
            return child is not None and condition(child)

        await self.wait(holds, what, timeout, last=lambda: seen)
        return seen[0]

    async def wait(self, condition: Callable[[], bool], what: str, timeout: float = 30.0,
                   last: Callable[[], Any] | None = None) -> None:  # fmt: skip
        """Poll until ``condition()`` holds, failing at once if the supervisor exits meanwhile."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc is not None and self.proc.returncode is not None:
                raise AssertionError(
                    f"supervisor exited {self.proc.returncode} waiting for {what}:\n{self.text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                seen = f"; last: {last()}" if last is not None else ""
                raise AssertionError(f"timed out waiting for {what}{seen}\n{self.text()[-3000:]}")
            await asyncio.sleep(0.1)

    async def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signum)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill_all(self) -> None:
        """Cleanup after a failed test: the supervisor and every child it started."""
        if self.proc is None or self.proc.returncode is not None:
            return
        status = self.status()
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()
        for child in status.children if status else []:
            if child.pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child.pid, signal.SIGKILL)


async def cli(*args: str) -> tuple[int, str, str]:
    """A ``daedalus`` command run without blocking the test's loop (the simulator lives in it)."""
    proc = await asyncio.create_subprocess_exec(
        *DAEDALUS, *args, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def wait_gone(pids: list[int], timeout: float = 30.0) -> None:
    """Until none of ``pids`` is alive (a zombie counts as gone: it runs nothing)."""
    deadline = time.monotonic() + timeout
    while alive := [p for p in pids if _alive(p)]:
        assert time.monotonic() < deadline, f"processes still running: {alive}"
        await asyncio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return False
    return _status(proc) not in (psutil.STATUS_ZOMBIE, "gone")


def up(child: ChildStatus) -> bool:
    """Running (past start_seconds) with a heartbeat of its own."""
    return child.state == "running" and child.pid is not None and child.heartbeat_age is not None


def started_pids(output: str) -> list[int]:
    """Every child pid the supervisor's log says it started."""
    return [int(m) for m in re.findall(r"child_started .*?pid=(\d+)", output)]


async def open_handles(pid: int, samples: int = 10) -> tuple[int, list[str], int]:
    """What ``pid`` holds open beyond stdin/out/err: pipes, regular files (paths), and zombie
    children, at the quietest of a few looks (a spawn, a status write or a child exiting
    just now holds one for an instant; a leak holds it for good)."""
    best: tuple[int, list[str], int] | None = None
    for _ in range(samples):
        links = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                if int(fd) > 2:
                    links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        zombies = sum(1 for c in psutil.Process(pid).children() if _status(c) == psutil.STATUS_ZOMBIE)
        look = (sum(1 for link in links if link.startswith("pipe:")), sorted(p for p in links if p.startswith("/")),
                zombies)  # fmt: skip
        if best is None or look[0] + len(look[1]) + look[2] < best[0] + len(best[1]) + best[2]:
            best = look
        await asyncio.sleep(0.05)
    assert best is not None
    return best


def _status(proc: psutil.Process) -> str:
    try:
        return proc.status()
    except psutil.NoSuchProcess:
        return "gone"


def raw_segments(data: Path, states: tuple[str, ...] = ("ready", "processing", "archive")) -> list[Path]:
    return [path for state in states for path in segment_files(data, state)]


def check_capture_intact(data: Path) -> list[dict[str, Any]]:
    """After a clean stop: nothing in active/ or quarantine/, every segment decodes to its
    last line, no frame twice, no gap seen by capture. Returns every record."""
    assert not segment_files(data, "active"), "a segment was left in active/"
    assert not segment_files(data, "quarantine"), "a segment was quarantined"
    records = [orjson.loads(line) for path in raw_segments(data) for line in iter_lines(path)]
    frames = [orjson.dumps(r["msg"]) for r in records if "msg" in r]
    assert frames, "nothing was captured"
    assert len(frames) == len(set(frames)), "a frame was captured twice"
    assert not [r for r in records if r.get("event") in ("gap", "overflow")], "capture lost frames"
    return records


class NotifySocket:
    """Plays systemd's part: a datagram socket that collects every notification."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.messages.append((await loop.sock_recv(self.sock, 4096)).decode())

    def seen(self, line: str, *, part: bool = False) -> bool:
        """Whether a notification held ``line`` (with ``part``: a line containing it)."""
        return any(line in got if part else line == got for message in self.messages for got in message.splitlines())

    async def wait(self, line: str, timeout: float = 30.0, *, part: bool = False) -> None:
        deadline = time.monotonic() + timeout
        while not self.seen(line, part=part):
            assert time.monotonic() < deadline, f"no {line} among {self.messages}"
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sock.close()
