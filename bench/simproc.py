"""Start ``daedalus sim`` as a child process for the benchmarks (its own core, its own GIL)."""

from __future__ import annotations

import asyncio
import re
import sys


async def start_sim(*flags: str, ready_timeout: float = 120.0) -> tuple[asyncio.subprocess.Process, str]:
    """Run ``daedalus sim --port 0 FLAGS``; returns the process and its WebSocket URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daedalus",
        "sim",
        "--port",
        "0",
        "--log-level",
        "WARNING",
        *flags,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), ready_timeout)).decode()
    match = re.search(r"ws=(\S+)", line)
    if match is None:
        proc.kill()
        raise RuntimeError(f"daedalus sim did not start: {line!r}")
    return proc, match.group(1)
