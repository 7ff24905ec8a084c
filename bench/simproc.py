"""Start ``daedalus sim`` or ``bench/ws_feeder.py`` as a child process for the benchmarks (its own
core, its own GIL)."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

FEEDER = Path(__file__).resolve().parent / "ws_feeder.py"


async def start_sim(*flags: str, ready_timeout: float = 120.0) -> tuple[asyncio.subprocess.Process, str]:
    """Run ``daedalus sim --port 0 FLAGS``; returns the process and its WebSocket URL."""
    command = ["-m", "daedalus", "sim", "--port", "0", "--log-level", "WARNING", *flags]
    return await _start_ws_server("daedalus sim", command, ready_timeout)


async def start_feeder(
    recording: Path, rate: float = 0.0, ready_timeout: float = 120.0, frames_per_write: int = 0
) -> tuple[asyncio.subprocess.Process, str]:
    """Run ``bench/ws_feeder.py RECORDING --rate R --frames-per-write N`` (one connection,
    pre-encoded frames; N = 0: the frames of 1 ms per write); returns the process and its WebSocket URL."""
    args = [str(FEEDER), str(recording), "--rate", str(rate), "--frames-per-write", str(frames_per_write)]
    return await _start_ws_server("ws_feeder", args, ready_timeout)


async def _start_ws_server(
    name: str, args: list[str], ready_timeout: float
) -> tuple[asyncio.subprocess.Process, str]:
    """A Python child that prints ``ws=URL`` on its first line once it listens."""
    proc = await asyncio.create_subprocess_exec(sys.executable, *args, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), ready_timeout)).decode()
    match = re.search(r"ws=(\S+)", line)
    if match is None:
        proc.kill()
        raise RuntimeError(f"{name} did not start: {line!r}")
    return proc, match.group(1)
