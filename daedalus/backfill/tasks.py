"""The backfill's two kinds of task, as plain functions a Dask worker runs (see
:mod:`daedalus.backfill`). Each writes into a fresh temporary folder under the scratch root
and renames it into place when complete, so a task killed anywhere leaves nothing a rerun
would take for finished, and a task that finds its folder in place returns what it says
(finished work is reused). Results are small dicts: the scheduler never receives data.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daedalus.backfill.intermediate import IntermediateWriter, read_product
from daedalus.backfill.scratch import Scratch, scratch_for
from daedalus.config import DaedalusConfig
from daedalus.etl.coinbase_run import SegmentRun
from daedalus.etl.errors import SegmentDataError
from daedalus.etl.job import EtlJob
from daedalus.etl.output import commit
from daedalus.etl.remote import staged_job
from daedalus.etl.state import EtlState, load_state, save_state
from daedalus.storage import open_store

CHAIN_STATE = "chain"  # the name a chain's checkpoint files go by in its folder


def fresh_state(job: EtlJob) -> EtlState:
    return EtlState.fresh(job.sample_ns, job.depth, job.bar_ns)


def _files(root: Path) -> list[str]:
    out = root / "data"
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) if out.exists() else []


@dataclass
class _Work:
    """A task's local folder, the staged job writing into it, and its clocks."""

    tmp: Path
    job: EtlJob
    started: float
    cpu: float

    @classmethod
    def begin(cls, area: Scratch, folder: str, config: DaedalusConfig, source: str) -> _Work:
        tmp = area.new_folder(folder)
        return cls(tmp, staged_job(config, source, tmp), time.perf_counter(), time.process_time())

    def timing(self) -> dict[str, float]:
        """Wall and CPU seconds so far (CPU: what the projection of bench/backfill.py uses)."""
        return {"seconds": time.perf_counter() - self.started, "cpu_seconds": time.process_time() - self.cpu}


# ---- phase 1: one segment, no state ---------------------------------------------------------
class ParseRun(SegmentRun):
    """The stateless part of a Coinbase segment: tickers and candles written, every batch's
    book input split per product into the intermediate files; no books, no trades filter."""

    def __init__(self, job: EtlJob, name: str, sink: IntermediateWriter) -> None:
        super().__init__(job, name, fresh_state(job))
        self.sink = sink

    def _batch(self, parsed) -> None:  # type: ignore[no-untyped-def]
        self.counts.update(parsed.counts)
        self.quarantine += parsed.quarantine
        self.write_tickers_and_candles(parsed)
        self.sink.add(parsed)

    def finish(self, before: dict[str, dict[str, int]]) -> SegmentRun:
        self.sink.close()
        super().finish(before)
        del self.counts["duplicate_trades"]  # counted by the product chains
        return self

    def abandon(self) -> None:
        super().abandon()
        self.sink.close()


def parse_segments(config: DaedalusConfig, source: str, scratch: str, segments: list[dict[str, Any]]) -> list[dict]:
    """Phase 1 for a group of segments (``{"key", "id", "path" or "raw" + "location"}`` each),
    one after the other; ``scratch`` is the work area's location (:mod:`daedalus.backfill.scratch`)."""
    area = scratch_for(scratch, config)
    return [parse_segment(config, source, area, **segment) for segment in segments]


def parse_segment(config: DaedalusConfig, source: str, area: Scratch, key: str, id: str, path: str | None = None,
                  raw: str | None = None, location: str | None = None) -> dict:  # fmt: skip
    """Phase 1 for one segment, read from ``path``, or from ``location`` in the store ``raw``."""
    folder = f"parse/{id}"
    done = area.finished(folder)
    if done is not None:
        return done
    work = _Work.begin(area, folder, config, source)
    tmp, job = work.tmp, work.job
    sink: list[IntermediateWriter] = []
    if path is None:  # a copy from the store, named as the segment (its suffix says how to read it)
        assert raw is not None and location is not None
        (tmp / "input").mkdir()
        path = str(tmp / "input" / key.rsplit("/", 1)[-1])
        open_store(raw, config.sync).download(location, Path(path))

    def parser() -> ParseRun:
        shutil.rmtree(tmp / "books", ignore_errors=True)
        sink[:] = [IntermediateWriter(tmp / "books")]
        return ParseRun(job, key, sink[0])

    result: dict[str, Any] = {"key": key, "id": id, "bytes": Path(path).stat().st_size,
                              **({"location": location} if location else {})}  # fmt: skip
    try:
        outcome, quarantined = job.read_segment(Path(path), key, parser)
    except SegmentDataError as exc:  # the sequential job quarantines it whole: it takes no part in the books
        shutil.rmtree(tmp / "books", ignore_errors=True)
        shutil.rmtree(tmp / "input", ignore_errors=True)
        result.update(quarantined_segment=str(exc), batches=0, products=[], book_products=[], trade_products=[],
                      conns=[], rows={}, counts={}, quarantined=0, files=[])  # fmt: skip
        return area.publish(tmp, folder, result)
    commit(outcome.files)
    if quarantined:
        job._write_quarantine(key, quarantined)
    shutil.rmtree(tmp / "input", ignore_errors=True)
    writer = sink[0]
    result.update(batches=len(writer.clocks), products=writer.products, book_products=writer.book_products,
                  trade_products=writer.trade_products, conns=writer.conns, rows=dict(outcome.rows),
                  counts=dict(outcome.counts), quarantined=len(quarantined), files=_files(tmp),
                  **work.timing())  # fmt: skip
    shutil.rmtree(job.scratch, ignore_errors=True)
    return area.publish(tmp, folder, result)


# ---- phase 2: one product, a group of segments in order ------------------------------------
def run_chain(config: DaedalusConfig, source: str, scratch: str, product: str, folder: str,
              segments: list[dict[str, Any]], previous: dict[str, Any] | str | None) -> dict:  # fmt: skip
    """Product ``product``'s books, trades and bars over ``segments`` (parse results, in
    order), into the folder ``folder`` of the work area, starting from the chain state of
    ``previous``: the result of the chain's previous group (Dask hands the finished task's
    dict over), a folder key (the checkpoint's part), or None."""
    area = scratch_for(scratch, config)
    if isinstance(previous, dict):
        previous = previous["state"]
    done = area.finished(folder)
    if done is not None:
        return done
    work = _Work.begin(area, folder, config, source)
    tmp, job = work.tmp, work.job
    state = fresh_state(job)
    if previous is not None:
        state = load_state(area.state_folder(previous, CHAIN_STATE), CHAIN_STATE, job.sample_ns, job.depth, job.bar_ns)
    rows: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for segment in segments:
        run = SegmentRun(job, segment["key"], state)
        before = run.book_counters()
        books = area.folder(f"parse/{segment['id']}", input_files(segment, product))
        for parsed in read_product(books / "books", segment["batches"], product, segment["products"],
                                   segment["trade_products"]):  # fmt: skip
            run._batch(parsed)
        run.finish(before)
        counts.update(run.counts)
        rows.update(run.rows)
        commit(run.files)
        if area.remote:  # a download: this worker may never need it again
            shutil.rmtree(books, ignore_errors=True)
    state.last_segment = segments[-1]["key"] if segments else None
    save_state(tmp, CHAIN_STATE, state)
    result = {"product": product, "rows": dict(rows), "counts": dict(counts), "files": _files(tmp), "state": folder,
              **work.timing()}  # fmt: skip
    return area.publish(tmp, folder, result)


def input_files(segment: dict[str, Any], product: str) -> list[str]:
    """The files of a segment's parse folder that a chain of ``product`` reads."""
    files = ["books/none-frames.arrow"]
    if product in segment["products"]:
        k = segment["products"].index(product)
        files += [f"books/p{k}-frames.arrow", f"books/p{k}-rows.arrow"]
    if product in segment["trade_products"]:
        files.append(f"books/t{segment['trade_products'].index(product)}-trades.arrow")
    return files


# ---- worker warm-up -------------------------------------------------------------------------
_WARM_FRAMES = (
    '{"channel":"l2_data","timestamp":"2026-01-01T00:00:00.000001Z","sequence_num":0,"events":[{"type":"snapshot",'
    '"product_id":"WARM-USD","updates":[{"side":"bid","event_time":"2026-01-01T00:00:00Z","price_level":"1.5",'
    '"new_quantity":"2"},{"side":"offer","event_time":"2026-01-01T00:00:00Z","price_level":"1.6","new_quantity":"1"}]}]}',
    '{"channel":"market_trades","timestamp":"2026-01-01T00:00:00.000002Z","sequence_num":1,"events":[{"type":'
    '"update","trades":[{"trade_id":"1","product_id":"WARM-USD","price":"1.55","size":"1","side":"BUY",'
    '"time":"2026-01-01T00:00:00Z"}]}]}',
    '{"channel":"ticker","timestamp":"2026-01-01T00:00:00.000003Z","sequence_num":2,"events":[{"type":"update",'
    '"tickers":[{"type":"ticker","product_id":"WARM-USD","price":"1.55"}]}]}',
)


def warm_up(config: DaedalusConfig, source: str, scratch: str, dask_worker: Any = None) -> float:
    """Both phases on a tiny built-in segment, so the first real task of a worker does not pay
    for imports and loading the compiled code (numba's cache): the measured task costs are the
    work's. It works in the worker's own local directory (``client.run`` hands the worker
    over; a worker on another machine may not have ``scratch``). Returns the seconds it took."""
    from daedalus.capture.records import control_line, frame_line

    started = time.perf_counter()
    base = Path(dask_worker.local_directory) if dask_worker is not None else Path(scratch)
    folder = base / f"warm-{uuid.uuid4().hex[:8]}"
    segment = folder / "segment_20260101T00_00001.ndjson"
    folder.mkdir(parents=True)
    t = 1_767_225_600_000_000_000
    lines = [control_line(t, 1, "connect", {"url": "warm-up"})]
    lines += [frame_line(t + i + 1, 1, text) for i, text in enumerate(_WARM_FRAMES)]
    segment.write_bytes(b"".join(lines))
    try:
        parsed = parse_segment(config, source, Scratch(str(folder), config), segment.name, "warm", path=str(segment))
        run_chain(config, source, str(folder), "WARM-USD", "chain/p-warm/g000000", [parsed], None)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return time.perf_counter() - started
