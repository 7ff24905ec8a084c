"""How many frames/s the simulator sustains at ``--rate max`` to one client.

Starts ``daedalus sim --rate max`` as a child process (so it has a core of its own),
connects one aiohttp client that subscribes to level2, market_trades and ticker for two
products, and counts frames for ``--seconds``. The simulator's CPU time comes from
psutil, so the figure per fully used core is reported beside the wall-clock rate.

    .venv/bin/python bench/sim.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time

import aiohttp
import psutil
from simproc import start_sim

CHANNELS = ("level2", "market_trades", "ticker")
PRODUCTS = ["BTC-USD", "ETH-USD"]


async def measure(seconds: float) -> dict[str, float]:
    proc, url = await start_sim("--rate", "max", ready_timeout=30)
    try:
        sim = psutil.Process(proc.pid)
        async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
            for channel in CHANNELS:
                await ws.send_json({"type": "subscribe", "channel": channel, "product_ids": PRODUCTS})
            for _ in range(50):  # snapshots and acks; let the stream reach speed
                await ws.receive()
            frames = size = 0
            cpu_start, wall_start = sim.cpu_times(), time.perf_counter()
            while (elapsed := time.perf_counter() - wall_start) < seconds:
                msg = await ws.receive()
                frames += 1
                size += len(msg.data)
            cpu_end = sim.cpu_times()
            rss = sim.memory_info().rss
        cpu = (cpu_end.user - cpu_start.user) + (cpu_end.system - cpu_start.system)
        return {
            "frames": frames,
            "seconds": elapsed,
            "frames_per_s": frames / elapsed,
            "mb_per_s": size / elapsed / 1e6,
            "sim_cpu_share": cpu / elapsed,
            "frames_per_cpu_s": frames / cpu,
            "sim_rss_mb": rss / 1e6,
        }
    finally:
        proc.terminate()
        await proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    r = asyncio.run(measure(args.seconds))
    print(f"machine: {platform.machine()} {psutil.cpu_count()} cpus, Python {platform.python_version()}")
    print(f"simulator --rate max -> 1 client, {r['seconds']:.1f} s, {r['frames']:,} frames")
    print(f"  delivered:        {r['frames_per_s']:>10,.0f} frames/s  ({r['mb_per_s']:.1f} MB/s)")
    print(f"  simulator CPU:    {r['sim_cpu_share'] * 100:>10.0f} % of one core")
    print(f"  per core-second:  {r['frames_per_cpu_s']:>10,.0f} frames (target >= 50,000)")
    print(f"  simulator RSS:    {r['sim_rss_mb']:>10.0f} MB")


if __name__ == "__main__":
    main()
