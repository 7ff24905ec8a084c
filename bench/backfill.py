"""The Dask backfill (``daedalus etl --dask local:N``) beside the sequential ETL, same segments.

1. **Generation** (not timed as a result): ``bench/etl.py``'s generator (the simulator's market
   model for BTC-USD with a ~40,000-level book and ETH-USD, 6.3 changes per level2 frame, a
   reconnect every few thousand rounds) writes ``--gb`` of raw NDJSON cut into segments of
   ``--segment-mb``.
2. **Runs**, each on a fresh copy, each a ``daedalus etl`` child process: the sequential ETL,
   then the backfill with 1 and with 2 workers. Reported: wall seconds, raw MB/s, level2
   rows/s, CPU seconds of the whole process tree (the client, its scheduler, nannies and
   workers: ``RUSAGE_CHILDREN`` around the run) and the peak RSS of each process of the tree
   (sampled every 0.1 s). Every backfill's output is compared with the sequential one, file
   for file.
3. **Projection** of the seeds' 12-month backfill (2.6 TB of raw deltas) from the 2-worker
   run's own per-task costs (the ``backfill_parsed`` / ``backfill_books_done`` log events):
   parse CPU-seconds per GB (phase 1 fans out per segment group), book CPU-seconds per GB for
   each product (phase 2: one chain per product, sequential inside), so with W workers
   ``wall ~ parse/W + max(books/W, longest chain)``; the longest chain is the critical path.
   It assumes the generated product mix (BTC-USD ~ half the bytes) and this machine's cores.

    .venv/bin/python bench/backfill.py [--gb 0.5] [--segment-mb 32] [--keep DIR]
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SEEDS_TB = 2.6
WORKERS = (1, 8, 32, 128)


def _etl_bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_etl", REPO / "bench" / "etl.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_etl"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


class TreeSampler:
    """Peak RSS of every process below ``pid``, sampled while it runs."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peaks: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for proc in processes:
                try:
                    rss = proc.memory_info().rss / 1e6
                    name = "worker" if "spawn" in " ".join(proc.cmdline()) else "client"
                except psutil.Error:
                    continue
                if rss > self.peaks.get(proc.pid, ("", 0.0))[1]:
                    self.peaks[proc.pid] = (name, rss)
            self._stop.wait(0.1)

    def stop(self) -> dict[int, tuple[str, float]]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def run(data: Path, *args: str) -> dict[str, Any]:
    """One ``daedalus etl`` child on ``data``: wall, tree CPU, peak RSS per process, its log."""
    config = data.parent / f"{data.name}.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(data), "logging": {"format": "json"}}))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "daedalus", "etl", "--config", str(config), "--no-progress",
                              *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)  # fmt: skip
    sampler = TreeSampler(child.pid)
    out, err = child.communicate()
    wall = time.perf_counter() - started
    peaks = sampler.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if child.returncode != 0:
        raise RuntimeError(f"etl {args} failed: {err[-3000:]}")
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    rows = next(line for line in out.splitlines() if line.startswith("rows:"))
    level2 = int(re.search(r"level2=([\d,]+)", rows).group(1).replace(",", ""))  # type: ignore[union-attr]
    return {"wall": wall, "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "peaks": peaks, "events": events, "level2": level2}  # fmt: skip


def two_halves(root: Path, raw_mb: float) -> float:
    """The machine's own ceiling for 2 processes: two sequential ETLs at once, each on half the
    segments (not the same output: the second half starts from empty books). Returns the wall
    time of the pair."""
    segments = sorted((root / "template" / "raw" / "ready" / "coinbase").iterdir())
    halves = [segments[: len(segments) // 2], segments[len(segments) // 2 :]]
    children = []
    started = time.perf_counter()
    for i, half in enumerate(halves):
        data = root / f"half{i}"
        ready = data / "raw" / "ready" / "coinbase"
        ready.mkdir(parents=True)
        for path in half:
            os.link(path, ready / path.name)
        config = root / f"half{i}.yaml"
        config.write_text(yaml.safe_dump({"data_dir": str(data)}))
        children.append(subprocess.Popen([sys.executable, "-m", "daedalus", "etl", "--config", str(config),
                                          "--no-progress"], stdout=subprocess.DEVNULL, cwd=REPO))  # fmt: skip
    if any(child.wait() != 0 for child in children):
        raise RuntimeError("a half failed")
    wall = time.perf_counter() - started
    print(f"{'2 x sequential':<14} {wall:7.2f} s wall {raw_mb / wall:7.1f} MB/s  (two processes on half the "
          "segments each, at once: this machine's parallel ceiling)")  # fmt: skip
    return wall


def same_output(a: Path, b: Path) -> bool:
    left = sorted(p.relative_to(a).as_posix() for p in (a / "processed").rglob("*") if p.is_file())
    right = sorted(p.relative_to(b).as_posix() for p in (b / "processed").rglob("*") if p.is_file())
    return left == right and all(filecmp.cmp(a / k, b / k, shallow=False) for k in left if not k.endswith(".lock"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=0.5)
    parser.add_argument("--segment-mb", type=float, default=32)
    parser.add_argument("--keep", type=Path, default=None)
    args = parser.parse_args()
    bench_etl = _etl_bench()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    try:
        template = root / "template" / "raw" / "ready" / "coinbase"
        data = bench_etl.generate(template, int(args.gb * 1e9), int(args.segment_mb * 1e6), False, 6.3)
        raw_mb = data.raw_bytes / 1e6
        print(f"dataset: {len(data.segments)} segments, {raw_mb:,.0f} MB raw NDJSON, {data.frames:,} frames, "
              f"{data.connections} connections; machine: {bench_etl.machine()}")  # fmt: skip
        sides = [("sequential", ()), ("dask local:1", ("--dask", "local:1")), ("dask local:2", ("--dask", "local:2"))]
        results = {}
        for label, extra in sides:
            target = root / label.replace(" ", "-").replace(":", "")
            shutil.copytree(root / "template", target, copy_function=os.link)  # the ETL only renames and unlinks
            results[label] = result = run(target, *extra)
            workers = [rss for name, rss in result["peaks"].values() if name == "worker"]
            client = max((rss for name, rss in result["peaks"].values() if name == "client"), default=0.0)
            same = "" if label == "sequential" else (
                "  output == sequential" if same_output(root / "sequential", target) else "  OUTPUT DIFFERS")
            print(f"{label:<14} {result['wall']:7.2f} s wall {raw_mb / result['wall']:7.1f} MB/s "
                  f"{result['level2'] / result['wall']:>11,.0f} level2 rows/s {result['cpu']:7.2f} CPU-s  "
                  f"peak RSS client {client:5.0f} MB, workers {', '.join(f'{w:.0f}' for w in workers) or '-'} MB"
                  f"{same}")  # fmt: skip
            start = next((e for e in result["events"] if e.get("event") == "backfill_started"), None)
            if start:
                print(f"{'':<14} of which cluster start {start['cluster_seconds']:.2f} s, worker warm-up "
                      f"{start['warm_up_seconds']:.2f} s")  # fmt: skip
        seq, two = results["sequential"]["wall"], results["dask local:2"]["wall"]
        ceiling = two_halves(root, raw_mb)
        print(f"speed-up with 2 workers: {seq / two:.2f}x (target >= 1.8x); 1 worker: "
              f"{seq / results['dask local:1']['wall']:.2f}x; what this machine gives two independent "
              f"processes: {seq / ceiling:.2f}x")  # fmt: skip
        project(results["dask local:2"]["events"], data.raw_bytes)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


def project(events: list[dict[str, Any]], raw_bytes: int) -> None:
    """The seeds' 12-month backfill from this run's measured task costs."""
    parsed = next(e for e in events if e.get("event") == "backfill_parsed")
    books = next(e for e in events if e.get("event") == "backfill_books_done")
    gb = raw_bytes / 1e9
    parse_per_gb = parsed["task_cpu_seconds"] / gb
    chain_per_gb = {p: s / gb for p, s in books["chain_cpu_seconds"].items()}
    total = SEEDS_TB * 1000
    parse_s = parse_per_gb * total
    chains_s = {p: c * total for p, c in chain_per_gb.items()}
    longest = max(chains_s.values())
    print(f"task costs (CPU): parse {parse_per_gb:.1f} s/GB; book chains "
          + ", ".join(f"{p} {c:.1f} s/GB" for p, c in chain_per_gb.items()))  # fmt: skip
    print(f"projection, {SEEDS_TB} TB (12 months at 220 GB/month, this product mix, these cores):")
    for workers in WORKERS:
        wall = parse_s / workers + max(sum(chains_s.values()) / workers, longest)
        bound = "critical path" if longest >= sum(chains_s.values()) / workers else "workers"
        print(f"  {workers:>4} workers: {wall / 3600:8.1f} h  (parse {parse_s / workers / 3600:.1f} h + books "
              f"{max(sum(chains_s.values()) / workers, longest) / 3600:.1f} h, bound by {bound})")  # fmt: skip
    print(f"  critical path: the longest chain ({max(chains_s, key=chains_s.get)}) alone takes {longest / 3600:.1f} h")


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") is None:
        os.environ["PYTHONHASHSEED"] = "0"
    main()
