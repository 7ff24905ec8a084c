"""One child process under the supervisor, with real processes: its output flooding the
rotating log (one endless line included), the whole process group stopped (SIGTERM, then
SIGKILL for one that ignores it), memory counted over descendants, a vanished pid."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from daedalus.supervisor.children import ChildSpec
from daedalus.supervisor.logfiles import RotatingLog
from daedalus.supervisor.process import _CHUNK, ChildProcess
from tests.supervisor_helpers import wait_gone

MAX_BYTES = 200_000

#: starts a grandchild (in the child's process group), says both pids, then waits
FAMILY = """
import os, signal, subprocess, sys, time
if sys.argv[1:] == ["deaf"]:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(os.getpid(), kid.pid, flush=True)
time.sleep(120)
"""


async def spawn(tmp_path: Path, script: str, *args: str) -> tuple[ChildProcess, RotatingLog]:
    output = RotatingLog(tmp_path / "logs" / "etl.log", max_bytes=MAX_BYTES, backups=2)
    spec = ChildSpec("etl", "etl", "coinbase", (sys.executable, "-c", script, *args))
    return await ChildProcess.spawn(spec, output), output


async def test_a_flood_and_an_endless_line_stay_bounded_and_the_last_words_are_kept(tmp_path):
    script = (
        "import sys\nw = sys.stdout.buffer.write\n"
        "for i in range(20000): w(b'line %d\\n' % i)\n"  # about 200 kB of lines
        "w(b'x' * 3_000_000)\n"  # one line of 3 MB with no newline for a long while
        "w(b'\\nlast words')\nsys.exit(3)"
    )
    process, output = await spawn(tmp_path, script)
    code = await process.done
    output.close()
    assert code == 3 and process.exit_reason(code) == "exit 3: last words"
    assert max(len(line) for line in process.tail) <= 4096 + _CHUNK  # the long line was not kept whole
    logs = sorted((tmp_path / "logs").iterdir())
    assert [p.name for p in logs] == ["etl.log", "etl.log.1", "etl.log.2"]
    assert all(p.stat().st_size <= MAX_BYTES + _CHUNK for p in logs)  # a write may finish the file it begins
    end = f"last words\n--- daedalus run: etl pid {process.pid} exit 3: last words ---\n"
    assert (tmp_path / "logs" / "etl.log").read_bytes().endswith(end.encode())


async def test_stop_signals_the_whole_group_and_kills_what_ignores_sigterm(tmp_path):
    for args, reason in (((), "killed by SIGTERM"), (("deaf",), "killed by SIGKILL")):
        process, output = await spawn(tmp_path, FAMILY, *args)
        line = await wait_for_line(process)
        pid, grandchild = (int(n) for n in line.split())
        assert pid == process.pid
        rss = process.rss_bytes()
        assert rss is not None and rss > 0
        code = await process.stop(timeout=0.5)
        assert process.exit_reason(code) == reason
        await wait_gone([grandchild])
        assert process.rss_bytes() is None  # gone: no psutil error escapes
        output.close()


async def wait_for_line(process: ChildProcess) -> str:
    """The first line the child printed (read back from its output pump)."""
    while not process.tail:
        assert not process.done.done(), "the child died before saying its pids"
        await asyncio.sleep(0.02)
    return process.tail[0]
