"""``ingestion.snapshot_every_hour``: the Coinbase collector asks for fresh level2 snapshots at
every UTC hour, so each hour's segments start from whole books (against the simulator, with
a receive clock that reaches the next hour 1.5 s into the test)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from daedalus.capture.pipeline import IngestPipeline
from daedalus.config import parse_config
from daedalus.etl.job import EtlJob
from tests.capture_helpers import ingest_config, read_records, segment_files

HOUR_NS = 3_600_000_000_000


async def capture_across_an_hour(sim, data: Path, hourly: bool) -> int:  # type: ignore[no-untyped-def]
    """Capture until the clock is 1.5 s past the next UTC hour; returns that hour (ns)."""
    now = time.time_ns()
    hour = (now // HOUR_NS + 1) * HOUR_NS
    offset = hour - now - 1_500_000_000
    config = parse_config(ingest_config(data, sim.ws_url, snapshot_every_hour=hourly))
    pipeline = IngestPipeline(config, lambda: time.time_ns() + offset)
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop))
    async with asyncio.timeout(30):
        while time.time_ns() + offset < hour + 1_500_000_000:
            await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 15)
    return hour


def level2_subscribes(records: list[dict]) -> list[int]:
    return [r["recv_ns"] for r in records if r.get("event") == "subscribe" and r["message"]["channel"] == "level2"]


def snapshots(records: list[dict]) -> list[tuple[int, str]]:
    out = []
    for record in records:
        if "msg" in record and record["msg"].get("channel") == "l2_data":
            out += [(record["recv_ns"], e["product_id"]) for e in record["msg"]["events"] if e["type"] == "snapshot"]
    return out


@pytest.mark.parametrize("hourly", [True, False])
async def test_each_hour_starts_with_fresh_snapshots(make_sim, tmp_path: Path, hourly: bool) -> None:
    sim = await make_sim(rate=200, levels=50)
    hour = await capture_across_an_hour(sim, tmp_path, hourly)
    records = read_records(tmp_path)
    subscribes = level2_subscribes(records)
    taken = snapshots(records)
    before = {p for t, p in taken if t < hour}
    after = {p for t, p in taken if t >= hour}
    assert before == {"BTC-USD", "ETH-USD"}
    if not hourly:  # off (the default): one subscription, one snapshot per product
        assert len(subscribes) == 1 and not after
        return
    assert len(subscribes) == 2 and subscribes[1] >= hour
    assert after == {"BTC-USD", "ETH-USD"}
    hour_name = time.strftime("%Y%m%dT%H", time.gmtime(hour / 1e9))
    first_of_hour = next(p for p in segment_files(tmp_path) if f"_{hour_name}_" in p.name)
    assert b'"type":"snapshot"' in first_of_hour.read_bytes()  # the hour's own segments hold its snapshots
    summary = EtlJob(parse_config({"data_dir": str(tmp_path)})).run()
    assert summary.counts["snapshots"] == 4 and summary.counts["gaps"] == 0
