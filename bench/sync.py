"""``daedalus sync`` upload throughput to a local S3 server, beside plain boto3 ``upload_file``.

Starts moto's standalone S3 server on 127.0.0.1 (the one the tests use), writes a tree of files
(a few large raw segments and many small processed parts), then, in the same run and on the same
server: (1) a sync pass (SHA-256 per file, multipart above the threshold, HEAD verification,
fsynced ledger lines), (2) the same files uploaded with plain ``boto3`` ``upload_file`` and the
same TransferConfig, as ``aws s3 cp``-style tools do (no hashing, no verification). Reported per
side: MB/s (wall) and the CPU seconds the process spent (``time.process_time``: the moto server
runs in another process and is not counted). The server's own speed bounds both, so the ratio
is what to read: the price of verification.

    .venv/bin/python bench/sync.py [--large 4] [--large-mb 48] [--small 200] [--small-kb 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from daedalus.config import DaedalusConfig, SyncConfig
from daedalus.layout import DataLayout
from daedalus.sync.engine import MULTIPART_CHUNKSIZE, MULTIPART_THRESHOLD, SyncPass
from daedalus.sync.s3 import client_config
from tests.s3_server import BUCKET, KEY_ID, REGION, SECRET, start_server, stop_server


def make_tree(root: Path, large: int, large_mb: int, small: int, small_kb: int) -> int:
    """Raw archive segments and processed parts of random bytes; returns the total size."""
    layout = DataLayout(root)
    total = 0
    for i in range(large):
        path = layout.archive("coinbase") / f"segment_20261126T{i:02d}_00001.ndjson"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(large_mb << 20))
        total += large_mb << 20
    for i in range(small):
        path = layout.channel_dir("coinbase", "level2") / f"product_id=P{i % 20}" / "date=2026-11-26"
        path.mkdir(parents=True, exist_ok=True)
        (path / f"part-segment_20261126T00_{i:05d}.parquet").write_bytes(os.urandom(small_kb << 10))
        total += small_kb << 10
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=4)
    parser.add_argument("--large-mb", type=int, default=48)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--small-kb", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        root = Path(tmp) / "data"
        total = make_tree(root, args.large, args.large_mb, args.small, args.small_kb)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        process, endpoint, _ = start_server(Path(tmp) / "moto.log")
        try:
            sync = SyncConfig(enabled=True, destination=f"s3://{BUCKET}/sync", endpoint_url=endpoint, region=REGION,
                              access_key_id=KEY_ID, secret_access_key=SECRET, max_concurrency=args.concurrency)
            client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=KEY_ID,
                                  aws_secret_access_key=SECRET, config=client_config(sync))  # fmt: skip
            client.create_bucket(Bucket=BUCKET)
            print(f"{len(files)} files, {total / 1e6:,.0f} MB ({args.large} x {args.large_mb} MB + "
                  f"{args.small} x {args.small_kb} KB), moto server on {endpoint}, concurrency {args.concurrency}")
            print(f"{'side':<26}{'wall s':>8}{'MB/s':>8}{'CPU s':>8}{'CPU s/GB':>10}")

            def report(name: str, wall: float, cpu: float) -> None:
                print(f"{name:<26}{wall:>8.2f}{total / 1e6 / wall:>8.1f}{cpu:>8.2f}{cpu / (total / 1e9):>10.2f}")

            config = DaedalusConfig(data_dir=root, sync=sync)
            wall, cpu = time.perf_counter(), time.process_time()
            summary = SyncPass(config, client).run()
            report("daedalus sync (verified)", time.perf_counter() - wall, time.process_time() - cpu)
            assert summary.verified == len(files) and summary.failed == 0, summary

            transfer = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE,
                                      max_concurrency=args.concurrency)  # fmt: skip
            wall, cpu = time.perf_counter(), time.process_time()
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
                list(pool.map(lambda p: client.upload_file(str(p), BUCKET, f"plain/{p.relative_to(root).as_posix()}",
                                                            Config=transfer), files))  # fmt: skip
            report("boto3 upload_file (plain)", time.perf_counter() - wall, time.process_time() - cpu)
        finally:
            stop_server(process)


if __name__ == "__main__":
    main()
