"""The ETL between stores (S3 raw in, S3 processed out) beside the local ETL, same segments.

Starts moto's standalone S3 server on 127.0.0.1 (the one the tests use), cuts the real
recording (``../shared/data``) into ``--segments`` Coinbase segments, uploads them under
``raw/archive/``, then in the same run: (1) the local ETL (``EtlJob``) on a copy in a data
directory, (2) ``StoreEtl`` from the S3 raw prefix to an S3 processed prefix. Reported per
side: wall seconds, raw MB/s, level2 rows/s and the CPU seconds of this process
(``time.process_time``; the moto server is another process). The difference is the price of
the stores: a download per segment, a HEAD + PUT per output file, the checkpoint, the marker
and the lease renewal, all on loopback here (a real endpoint adds its round trips).

    .venv/bin/python bench/etl_s3.py [--segments 8] [--repeat 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import boto3
from botocore.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from daedalus.config import DaedalusConfig, EtlConfig, SyncConfig
from daedalus.etl.job import EtlJob, Summary
from daedalus.etl.remote import StoreEtl
from daedalus.layout import DataLayout
from tests.etl_helpers import recording_lines
from tests.s3_server import BUCKET, KEY_ID, REGION, SECRET, start_server, stop_server


def write_segments(ready: Path, segments: int, repeat: int) -> int:
    """The recording (``repeat`` times over) cut into ``segments`` files; returns the bytes."""
    lines = recording_lines() * repeat
    ready.mkdir(parents=True, exist_ok=True)
    size = len(lines) // segments + 1
    total = 0
    for i in range(segments):
        body = b"".join(lines[i * size : (i + 1) * size])
        (ready / f"segment_20260809T21_{i + 1:05d}.ndjson").write_bytes(body)
        total += len(body)
    return total


def measure(label: str, run, raw_bytes: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    cpu, wall = time.process_time(), time.perf_counter()
    summary: Summary = run()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(f"{label:<22} {wall:7.2f} s wall  {cpu:7.2f} CPU-s  {raw_bytes / 1e6 / wall:7.1f} MB/s raw  "
          f"{summary.rows['level2'] / wall:>12,.0f} level2 rows/s  segments={summary.segments}")  # fmt: skip
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=1, help="the recording this many times over")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-etl-s3-") as tmp:
        root = Path(tmp)
        process, endpoint, _ = start_server(root / "moto.log")
        try:
            s3 = SyncConfig(endpoint_url=endpoint, region=REGION, access_key_id=KEY_ID, secret_access_key=SECRET)
            client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=KEY_ID,
                                  aws_secret_access_key=SECRET, config=Config(
                                      request_checksum_calculation="when_required"))  # fmt: skip
            client.create_bucket(Bucket=BUCKET)
            local = DaedalusConfig(data_dir=root / "local", etl=EtlConfig())
            raw_bytes = write_segments(DataLayout(root / "local").ready("coinbase"), args.segments, args.repeat)
            for path in sorted(DataLayout(root / "local").ready("coinbase").iterdir()):
                client.upload_file(str(path), BUCKET, f"raw/archive/coinbase/{path.name}")
            print(f"{args.segments} segments, {raw_bytes / 1e6:.1f} MB raw NDJSON, moto at {endpoint}")
            local_wall, local_cpu = measure("local ETL", lambda: EtlJob(local, "coinbase").run(), raw_bytes)
            worker = DaedalusConfig(data_dir=root / "worker", sync=s3)
            job = StoreEtl(worker, "coinbase", raw=f"s3://{BUCKET}/raw", processed=f"s3://{BUCKET}/processed")
            try:
                store_wall, store_cpu = measure("S3 -> S3 (StoreEtl)", job.run, raw_bytes)
            finally:
                job.close()
            objects = sum(1 for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                          Prefix="processed/coinbase/") for _ in page.get("Contents", []))  # fmt: skip
            print(f"S3/local: wall {store_wall / local_wall:.2f}x, CPU {store_cpu / local_cpu:.2f}x; "
                  f"{objects} Parquet objects published, "
                  f"{(store_wall - local_wall) / args.segments * 1000:.0f} ms more per segment")  # fmt: skip
        finally:
            stop_server(process)


if __name__ == "__main__":
    main()
