"""Databento capture cost: `daedalus ingest --source databento` against `daedalus sim --protocol databento`.

Both run as their own processes (the simulator at --rate max, or a given rate, mbo + trades for
ESM6 and NQM6). After a warm-up, over --seconds: records/s captured, CPU seconds of the ingest
process (psutil), so records per core-second, and the raw segment bytes per record, so MB/hour
at a given record rate. Ingestion settings are the defaults (batch 100, fsync per flush).

    .venv/bin/python bench/databento_capture.py [--seconds 10] [--rate max]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1] if (Path(__file__).parents[1] / "daedalus").is_dir() else Path.cwd()
KEY = "db-sim00000000000000000000000TEST"


def beat(data: Path) -> dict:
    try:
        return orjson.loads((data / "run" / "ingest-databento.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}


def counter(data: Path, name: str) -> int:
    value = beat(data).get("counters", {}).get(name, 0)
    return sum(value.values()) if isinstance(value, dict) else int(value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rate", default="max")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        sim = subprocess.Popen(
            [sys.executable, "-m", "daedalus", "sim", "--protocol", "databento", "--port", "0", "--rate", args.rate],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
        )  # fmt: skip
        port = int(re.search(r"port=(\d+)", sim.stdout.readline()).group(1))
        subs = [{"dataset": "GLBX.MDP3", "schema": s, "symbols": ["ESM6", "NQM6"]} for s in ("mbo", "trades")]
        config = {
            "data_dir": str(data),
            "coinbase": {"enabled": False},
            "supervisor": {"heartbeat_seconds": 0.5},
            "databento": {"enabled": True, "api_key": KEY, "gateway": "127.0.0.1", "port": port, "subscriptions": subs},
        }
        path = Path(tmp) / "ingest.yaml"
        path.write_text(yaml.safe_dump(config))
        ingest = subprocess.Popen(
            [sys.executable, "-m", "daedalus", "ingest", "--source", "databento", "--config", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
        )  # fmt: skip
        proc = psutil.Process(ingest.pid)
        time.sleep(args.warmup)
        cpu0, rec0, t0 = sum(proc.cpu_times()[:2]), counter(data, "frames_received"), time.monotonic()
        time.sleep(args.seconds)
        cpu1, rec1, t1 = sum(proc.cpu_times()[:2]), counter(data, "frames_received"), time.monotonic()
        rss = proc.memory_info().rss
        ingest.terminate()
        ingest.wait(30)
        sim.terminate()
        sim.wait(10)
        written = sum(p.stat().st_size for p in (data / "raw").rglob("segment_*"))
        from daedalus.sources.databento_raw import open_dbn_segment

        final = sum(len(c.local_ns) for p in (data / "raw").rglob("segment_*") for c in open_dbn_segment(p))
    rate = (rec1 - rec0) / (t1 - t0)
    cpu = cpu1 - cpu0
    per_core = (rec1 - rec0) / cpu if cpu else float("nan")
    print(f"records/s captured: {rate:,.0f}  ingest CPU: {cpu / (t1 - t0):.0%} of one core  "
          f"records per core-second: {per_core:,.0f}  rss: {rss / 1e6:.0f} MB")  # fmt: skip
    print(f"raw segments: {written / 1e6:.1f} MB for {final:,} records = {written / max(final, 1):.1f} bytes/record; "
          f"MB/hour at 1,000 records/s: {written / max(final, 1) * 1000 * 3600 / 1e6:,.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
