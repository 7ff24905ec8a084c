"""Helpers for the ETL tests: raw segments from the reference recording, runs, read-back."""

from __future__ import annotations

import io
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from daedalus.capture.records import control_line, frame_line
from daedalus.config import parse_config
from daedalus.etl.job import EtlJob, Summary
from tests.conftest import RECORDING, REPO

DATABENTO_FIXTURES = REPO.parent / "shared" / "data" / "databento"  # Databento's own test files


def recording_frames() -> list[tuple[int, dict[str, Any], str]]:
    """(recv_ns, parsed frame, frame text) of every received frame of the recording, in order."""
    out = []
    with RECORDING.open("rb") as handle:
        for line in io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(handle)):
            record = orjson.loads(line)
            if record["t"] == "recv":
                out.append((int(record["ts"] * 1e9), orjson.loads(record["data"]), record["data"]))
    return out


def recording_lines() -> list[bytes]:
    """The recording as raw record lines (one connection), starting with a connect line."""
    frames = recording_frames()
    lines = [control_line(frames[0][0] - 1, 1, "connect", {"url": "wss://advanced-trade-ws.coinbase.com"})]
    lines += [frame_line(recv_ns, 1, text) for recv_ns, _, text in frames]
    return lines


def write_segments(data_dir: Path, chunks: list[list[bytes]], hour: str = "20260809T21", zstd_every: int = 0) -> None:
    ready = data_dir / "raw" / "ready" / "coinbase"
    ready.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(chunks, 1):
        name = f"segment_{hour}_{i:05d}.ndjson"
        if zstd_every and i % zstd_every == 0:
            (ready / (name + ".zst")).write_bytes(zstandard.ZstdCompressor().compress(b"".join(chunk)))
        else:
            (ready / name).write_bytes(b"".join(chunk))


def run_etl(data_dir: Path, **etl: Any) -> Summary:
    config = parse_config({"data_dir": str(data_dir), "etl": etl})
    return EtlJob(config).run()


def channel_table(data_dir: Path, channel: str) -> pa.Table:
    """Every file of a channel, partition values added as columns, in (partition, file) order;
    timestamps as int64 ns."""
    root = data_dir / "processed" / "coinbase" / channel
    tables = []
    for path in sorted(root.rglob("*.parquet")):
        table = pq.read_table(path)
        for i, f in enumerate(table.schema):  # ns timestamps as int64: Python datetimes stop at µs
            if pa.types.is_timestamp(f.type):
                table = table.set_column(i, f.name, table.column(i).cast(pa.int64()))
        for part in path.relative_to(root).parts[:-1]:
            key, value = part.split("=", 1)
            table = table.append_column(key, pa.array([value] * table.num_rows, pa.string()))
        tables.append(table)
    return pa.concat_tables(tables) if tables else pa.table({})


class DictBooks:
    """The obvious reconstruction of level2 from parsed frames (Decimal, dicts, max/min)."""

    def __init__(self) -> None:
        self.books: dict[str, dict[str, dict[Decimal, Decimal]]] = {}

    def apply(self, frame: dict[str, Any]) -> list[tuple]:
        """Rows (product, side, price, size, is_snapshot, best_bid, best_ask) of one l2_data frame."""
        rows = []
        for event in frame["events"]:
            product = event["product_id"]
            snapshot = event["type"] == "snapshot"
            if snapshot:
                self.books[product] = {"bid": {}, "ask": {}}
            book = self.books[product]
            start = len(rows)
            for update in event["updates"]:
                side = "bid" if update["side"] == "bid" else "ask"
                price, size = Decimal(update["price_level"]), Decimal(update["new_quantity"])
                if size:
                    book[side][price] = size
                else:
                    book[side].pop(price, None)
                rows.append([product, side, float(price), float(size), snapshot])
            best_bid = float(max(book["bid"])) if book["bid"] else None
            best_ask = float(min(book["ask"])) if book["ask"] else None
            for row in rows[start:]:
                row += [best_bid, best_ask]
        return [tuple(r) for r in rows]


def databento_fixtures() -> list[tuple[str, Path]]:
    """(dataset folder, file) of every Databento fixture; the live file lands in GLBX.MDP3 (its dataset)."""
    return [(p.parent.name if p.parent.name != "LIVE" else "GLBX.MDP3", p)
            for p in sorted(DATABENTO_FIXTURES.glob("*/*.dbn.zst"))]  # fmt: skip


def place_databento_segment(data_dir: Path, dataset: str, n: int, data: bytes, suffix: str = ".dbn.zst",
                            state: str = "ready") -> str:  # fmt: skip
    """Write a segment into ``raw/<state>/databento/<dataset>/``; returns its stem."""
    stem = f"segment_20201228T00_{n:05d}"
    target = data_dir / "raw" / state / "databento" / dataset / (stem + suffix)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return stem


def place_databento_fixtures(data_dir: Path) -> dict[Path, tuple[str, str]]:
    """Every Databento fixture as a segment; fixture -> (dataset, output stem)."""
    return {path: (ds, place_databento_segment(data_dir, ds, n, path.read_bytes()))
            for n, (ds, path) in enumerate(databento_fixtures(), 1)}  # fmt: skip
