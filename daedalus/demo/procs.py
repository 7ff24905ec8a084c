"""The demo's processes: each in its own session, tied to the demo's life, stopped by group.

Own session: a Ctrl-C in the terminal reaches the demo only, which then stops the others in
the right order (the supervisor first, so ingest closes its segment; the simulator last).
``PR_SET_PDEATHSIG``: if the demo itself is killed outright (SIGKILL), the kernel sends
SIGTERM to the simulator, the supervisor and the final ETL; the supervisor stops its own
children, which are tied to it the same way (:mod:`daedalus.ops.child`). Nothing is left
running. The demo starts them from its main thread only: the signal fires when the *thread*
that forked a child ends, not the process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from daedalus.logs import get_logger
from daedalus.ops.child import die_with_parent

log = get_logger(__name__)



def _die_with(parent: int) -> Callable[[], None]:
    """What the child runs between fork and exec: SIGTERM when ``parent`` dies; if it already
    died (between the fork and the request), do not start at all."""

    def tie() -> None:
        if not die_with_parent(parent):
            os._exit(1)

    return tie


def spawn(command: list[str], log_file: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` with stdout and stderr appended to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as out:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with(os.getpid()),
        )  # fmt: skip
    log.debug("demo_process_started", pid=proc.pid, command=" ".join(command[2:]), log=str(log_file))
    return proc


def wait_until(
    condition: Callable[[], object], deadline_seconds: float, *, alive: subprocess.Popen[bytes] | None = None
) -> object:
    """Poll ``condition`` until it returns something truthy (returned), the deadline passes or
    ``alive`` exits (None in both cases)."""
    deadline = time.monotonic() + deadline_seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        if alive is not None and alive.poll() is not None:
            return None
        time.sleep(0.1)
    return None


def stop(proc: subprocess.Popen[bytes], timeout: float, hurry: Callable[[], bool] = lambda: False) -> int | None:
    """SIGTERM to the process group, wait up to ``timeout`` (less once ``hurry()`` says so),
    then SIGKILL the group. Returns the exit code (None if it could not be reaped)."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline and not hurry():
            time.sleep(0.05)
    if proc.poll() is None:
        log.warning("demo_process_killed", pid=proc.pid)
        _signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    _signal_group(proc, signal.SIGKILL)  # anything of the group that outlived its leader
    return proc.returncode


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
