"""Reading what capture wrote, for the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from daedalus.capture.records import iter_lines, split_frame_record


def segment_files(root: Path, state: str = "ready") -> list[Path]:
    folder = root / "raw" / state / "coinbase"
    return sorted(p for p in folder.iterdir() if p.name.startswith("segment_")) if folder.exists() else []


def read_records(root: Path, state: str = "ready") -> list[dict[str, Any]]:
    """Every record of every segment in ``state``, in name order; each line must decode."""
    return [orjson.loads(line) for path in segment_files(root, state) for line in iter_lines(path)]


def frame_bytes(root: Path, state: str = "ready") -> list[bytes]:
    """The verbatim frames (``msg``) of every record, as spliced into the lines."""
    records = (split_frame_record(line) for path in segment_files(root, state) for line in iter_lines(path))
    return [record[2] for record in records if record is not None]


def ingest_config(data_dir: Path, ws_url: str, **ingestion: Any) -> dict[str, Any]:
    return {
        "data_dir": str(data_dir),
        "coinbase": {"ws_url": ws_url, "rest_url": ws_url.replace("ws://", "http://").removesuffix("/ws")},
        "ingestion": {"flush_interval_seconds": 0.1, "reconnect_delay": 0.05, "max_reconnect_delay": 0.2, **ingestion},
    }
