"""One child process: started in its own session (so a signal to its process group
reaches everything it started), its output pumped into its rotating log, stopped with
SIGTERM then SIGKILL, measured with psutil.

Spawned from the supervisor's main thread on purpose: ``PR_SET_PDEATHSIG``, which the
child asks for (:func:`daedalus.ops.child.follow_supervisor`), fires when the *thread*
that forked it ends, not the process. asyncio forks on the loop's thread (here the main
one); its ``ThreadedChildWatcher`` (Python 3.11's default) only *waits* for each child on a
helper thread that ends with the child, which does not trigger it (checked: a child forked
by a thread that then ends gets its SIGTERM at once; ours outlive every helper thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import deque

import psutil

from daedalus.logs import get_logger
from daedalus.ops.child import SUPERVISOR_PID_ENV
from daedalus.supervisor.children import ChildSpec
from daedalus.supervisor.logfiles import RotatingLog
from daedalus.supervisor.systemd import SYSTEMD_ENV

log = get_logger(__name__)

TAIL_LINES = 20
_CHUNK = 64 * 1024


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_ENV}
    env[SUPERVISOR_PID_ENV] = str(os.getpid())
    env["PYTHONUNBUFFERED"] = "1"  # the last lines before a crash reach the log (and the exit reason)
    return env


class ChildProcess:
    def __init__(self, spec: ChildSpec, proc: asyncio.subprocess.Process, output: RotatingLog) -> None:
        self.spec = spec
        self.proc = proc
        self.pid = proc.pid
        self.started_mono = time.monotonic()
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._output = output
        self._partial = b""
        self._pump = asyncio.create_task(self._read_output(), name=f"output-{spec.name}")
        #: resolves to the exit code once the process is gone and its output is read
        self.done: asyncio.Task[int] = asyncio.create_task(self._finish(), name=f"wait-{spec.name}")

    @classmethod
    async def spawn(cls, spec: ChildSpec, output: RotatingLog) -> ChildProcess:
        proc = await asyncio.create_subprocess_exec(
            *spec.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            env=child_env(),
        )
        output.write(f"--- daedalus run: started {spec.name} pid {proc.pid} ---\n".encode())
        return cls(spec, proc, output)

    async def _read_output(self) -> None:
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(_CHUNK):
            self._output.write(chunk)
            lines = (self._partial + chunk).split(b"\n")
            self._partial = lines.pop()[-4096:]
            self.tail.extend(line.decode("utf-8", "replace").strip() for line in lines[-TAIL_LINES:] if line.strip())
        if self._partial.strip():
            self.tail.append(self._partial.decode("utf-8", "replace").strip())
            self._output.write(b"\n")

    async def _finish(self, output_grace: float = 1.0) -> int:
        """The exit code once the process is gone and its output read (a grandchild holding
        the pipe open does not hold us up longer than ``output_grace``)."""
        code = await self.proc.wait()
        try:
            await asyncio.wait_for(asyncio.shield(self._pump), output_grace)
        except TimeoutError:
            pass
        except Exception:  # losing the last lines must not lose the exit code (and the supervisor with it)
            log.warning("child_output_failed", child=self.spec.name, pid=self.pid, exc_info=True)
        self._kill_group(signal.SIGKILL)  # whatever it left behind in its group
        self._output.write(f"--- daedalus run: {self.spec.name} pid {self.pid} {self.exit_reason(code)} ---\n".encode())
        return code

    def exit_reason(self, code: int) -> str:
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"killed by {name}"
        if code == 0:
            return "exit 0"
        last = self.tail[-1] if self.tail else ""
        return f"exit {code}: {last[:500]}" if last else f"exit {code}"

    def _kill_group(self, signum: int) -> bool:
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    async def stop(self, timeout: float) -> int:
        """SIGTERM to the group (with SIGCONT, so a stopped process can act on it), up to
        ``timeout`` seconds to finish, then SIGKILL."""
        if self.proc.returncode is None:
            self._kill_group(signal.SIGTERM)
            self._kill_group(signal.SIGCONT)
            try:
                return await asyncio.wait_for(asyncio.shield(self.done), timeout)
            except TimeoutError:
                log.warning("child_kill", child=self.spec.name, pid=self.pid, after_seconds=timeout)
                self._kill_group(signal.SIGKILL)
        return await self.done

    def rss_bytes(self) -> int | None:
        """Resident memory of the child and all its descendants."""
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return None
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def apply_priority(self, nice: int | None, cpus: list[int] | None) -> None:
        """``process_nice`` / ``cpu_affinity`` for this child; a refusal is a warning."""
        try:
            proc = psutil.Process(self.pid)
        except psutil.Error:
            return
        if nice is not None:
            try:
                proc.nice(nice)
            except (psutil.Error, OSError) as exc:
                log.warning("child_nice_failed", child=self.spec.name, nice=nice, error=str(exc) or repr(exc))
        if cpus:
            try:
                proc.cpu_affinity(cpus)
            except (psutil.Error, OSError, ValueError, AttributeError) as exc:
                log.warning("child_affinity_failed", child=self.spec.name, cpus=cpus, error=str(exc) or repr(exc))
