"""What the demo runs: the simulator's flags and the config the supervisor gets, from the run's length.

The numbers are chosen so that any length shows the same story: several segments rotate, a
handful of frames are dropped (sequence gaps, each resynced by a fresh snapshot) and the
simulator closes the connection exactly once, around 60% of the way through.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

MIN_SECONDS = 5.0
MAX_SECONDS = 3600.0
PRODUCTS = ("BTC-USD", "ETH-USD", "SOL-USD")
RATE = 200  # market frames per second over all products: a busy hour on Coinbase for three products
SEED = 1  # the simulator's drops follow a seeded generator: the same run drops the same frames
GAPS_PER_RUN = 6  # expected dropped frames, whatever the length
SEGMENTS_PER_RUN = 10  # about: raw NDJSON is ~1.5 MB of first snapshots, then ~0.14 MB/s at RATE (measured)
RAW_MB_FIRST, RAW_MB_PER_SECOND = 1.5, 0.14
DISCONNECT_AT = 0.6  # of the run: one disconnect; the next would come at 1.2 (after the end)


@dataclass(frozen=True)
class DemoPlan:
    seconds: float
    work_dir: Path  # config.yaml, data/, logs/ (and the report when kept)

    @property
    def config_file(self) -> Path:
        return self.work_dir / "config.yaml"

    @property
    def data_dir(self) -> Path:
        return self.work_dir / "data"

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    @property
    def drop_rate(self) -> float:
        return round(min(0.01, GAPS_PER_RUN / (RATE * self.seconds)), 6)

    @property
    def disconnect_every(self) -> float:
        return round(max(2.0, DISCONNECT_AT * self.seconds), 1)

    @property
    def segment_max_mb(self) -> float:
        return round(max(0.1, (RAW_MB_FIRST + RAW_MB_PER_SECOND * self.seconds) / SEGMENTS_PER_RUN), 2)

    def sim_command(self) -> list[str]:
        return [
            sys.executable, "-m", "daedalus", "sim", "--port", "0", "--products", ",".join(PRODUCTS),
            "--rate", str(RATE), "--seed", str(SEED), "--drop-rate", str(self.drop_rate),
            "--disconnect-every", str(self.disconnect_every),
        ]  # fmt: skip

    def supervisor_command(self) -> list[str]:
        return [sys.executable, "-m", "daedalus", "run", "--config", str(self.config_file), "--no-sync"]

    def etl_command(self) -> list[str]:
        return [sys.executable, "-m", "daedalus", "etl", "--config", str(self.config_file), "--no-progress"]

    def config(self, ws_url: str, rest_url: str) -> dict[str, object]:
        """The supervisor's config: the simulator's URLs, small segments, quick reconnects and
        polls (a minute is short), raw segments archived rather than deleted (to look at, or
        to replay with ``daedalus sim --replay``), the status page on a free port."""
        return {
            "data_dir": str(self.data_dir),
            "coinbase": {
                "ws_url": ws_url,
                "rest_url": rest_url,
                "product_ids": list(PRODUCTS),
                "channels": ["ticker", "level2", "market_trades"],
            },
            "ingestion": {
                "raw_compression": "none",  # the summary counts frames in plain NDJSON
                "flush_interval_seconds": 0.5,
                "segment_max_mb": self.segment_max_mb,
                "reconnect_delay": 0.5,
                "max_reconnect_delay": 2.0,
            },
            "etl": {"poll_interval_seconds": 1.0, "after_processing": "archive"},
            "supervisor": {"status_port": 0, "heartbeat_seconds": 1.0, "log_dir": str(self.log_dir)},
        }

    def write_config(self, ws_url: str, rest_url: str) -> Path:
        text = "# Written by `daedalus demo`: the supervisor against the local simulator.\n"
        self.config_file.write_text(text + yaml.safe_dump(self.config(ws_url, rest_url), sort_keys=False))
        return self.config_file
