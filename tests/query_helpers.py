"""A small processed dataset made from the simulator, for the query tests (and others that
need real processed data): the simulator with dropped frames (gaps), ``daedalus ingest`` as
a process for a few seconds, then the ETL."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from daedalus.config import DaedalusConfig, parse_config
from daedalus.etl.job import EtlJob, Summary
from daedalus.sim import SimConfig, SimServer
from daedalus.sim.faults import FaultConfig
from tests.capture_helpers import ingest_config
from tests.status_helpers import daedalus_process

PRODUCTS = ("BTC-USD", "ETH-USD")
CHANNELS = ["ticker", "level2", "market_trades", "candles"]
ETL = {"channels": {"bars": {"interval": "1s"}, "book_snapshot": {"levels": 5, "snapshot_interval_ms": 200}}}


@dataclass
class SimDataset:
    config: DaedalusConfig
    config_path: Path
    summary: Summary

    @property
    def processed(self) -> Path:
        return self.config.processed_dir / "coinbase"


def build_dataset(root: Path, seconds: float = 2.5, gaps: int = 6) -> SimDataset:
    """Capture ``seconds`` of simulated market (and at least ``gaps`` sequence gaps), run the ETL."""
    data = root / "data"
    settings = asyncio.run(_capture(data, seconds, gaps))
    settings["etl"] = ETL
    path = root / "query.yaml"
    path.write_text(yaml.safe_dump(settings))
    config = parse_config(settings)
    summary = EtlJob(config).run()
    return SimDataset(config, path, summary)


async def _capture(data: Path, seconds: float, gaps: int) -> dict:
    faults = FaultConfig(drop_rate=0.03)
    async with SimServer(SimConfig(rate=300, seed=7, products=PRODUCTS, candles_interval=0.5, faults=faults)) as sim:
        settings = ingest_config(data, sim.ws_url)
        settings["coinbase"] |= {"product_ids": list(PRODUCTS), "channels": CHANNELS}
        config_path = data.parent / "ingest.yaml"
        config_path.write_text(yaml.safe_dump(settings))
        async with daedalus_process(config_path, "ingest") as proc:
            await _wait_for_capture(data, seconds, gaps)
        assert proc.returncode == 0, f"ingest exited with {proc.returncode} on SIGTERM"
    return settings


async def _wait_for_capture(data: Path, seconds: float, gaps: int, timeout: float = 60.0) -> None:
    """Until the raw data spans ``seconds`` since the first frame and holds ``gaps`` gap lines."""
    deadline = time.monotonic() + timeout
    first: float | None = None
    while True:
        raw = b"".join(p.read_bytes() for p in (data / "raw").rglob("segment_*") if p.is_file())
        if first is None and b'"msg"' in raw:
            first = time.monotonic()
        if first is not None and time.monotonic() - first >= seconds and raw.count(b'"event":"gap"') >= gaps:
            return
        assert time.monotonic() < deadline, f"no {seconds}s of capture with {gaps} gaps within {timeout}s"
        await asyncio.sleep(0.1)
