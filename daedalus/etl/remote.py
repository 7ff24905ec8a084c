"""The ETL between stores: raw segments read from a directory or an ``s3://`` prefix, the
processed dataset and its checkpoint written to a directory or an ``s3://`` prefix.

S3 has no rename and no append, so the local job's commit protocol (``.tmp`` + rename, an
appended committed list, ``ready/`` -> ``processing/`` claims) cannot run on it. Instead the
unchanged local job (:class:`daedalus.etl.job.EtlJob`) runs on a *staging* data directory
(``<data_dir>/tmp/etl-store-<source>/``, wiped at start), one segment at a time, and each
finished segment is *published* to the output store in an order that makes every crash
harmless:

1. the segment's Parquet files, under the same Hive keys a local run writes (a PUT is
   all-or-nothing; a name already holding other bytes, by SHA-256, is refused);
2. its quarantined lines or the quarantined segment, under ``_quarantine/<source>/``;
3. the checkpoint: the books ``.npz`` it names, then ``_state/<source>.json`` (the npz of the
   previous checkpoint is deleted after);
4. the marker ``_state/<source>.committed.d/<segment key>``: the segment is done.

A crash before 3 leaves the old checkpoint: the rerun processes the segment again from the
same state and writes the same bytes under the same names. A crash between 3 and 4: the
checkpoint's ``last_segment`` names the segment, and the rerun only writes its marker.

The input is read-only: segments are listed under ``ready/<source>/`` and ``archive/<source>/``
of the raw root (the layout ``daedalus sync`` uploads), de-duplicated by key, and never moved
or deleted; what is done is what has a marker beside the output.

Two ETLs on one output would interleave checkpoints, so the output holds a lease
(``_state/<source>.lease``, see :mod:`daedalus.storage`); it is renewed while the job works
and before each publish, and a job whose lease was taken over stops before publishing.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import orjson

from daedalus.config import DaedalusConfig
from daedalus.etl.job import EtlJob, Summary, _in_range, _progress, etl_child, segment_order
from daedalus.layout import parse_segment_name
from daedalus.logs import get_logger
from daedalus.ops.heartbeat import HeartbeatPublisher
from daedalus.storage import Lease, Store, open_store, publish, sha256_file

log = get_logger("daedalus.etl.remote")
INPUT_STATES = ("ready", "archive")  # closed segments; active/ and processing/ are someone's work in progress
LEASE_TTL_SECONDS = 300.0


@dataclass(frozen=True)
class PendingSegment:
    key: str  # below <state>/<source>/, as the local job names it
    location: str  # its key in the input store
    size: int


def staged_job(config: DaedalusConfig, source: str, folder: Path) -> EtlJob:
    """The local ETL job with ``folder/data`` as its data directory: its segments, outputs,
    quarantine and checkpoint all below it (a staged segment is deleted once processed)."""
    etl = config.etl.model_copy(update={"output_dir": None, "after_processing": "delete"})
    return EtlJob(config.model_copy(update={"data_dir": folder / "data", "etl": etl}), source)


def marker_prefix(source: str) -> str:
    """Where an output store records each committed segment: ``<prefix><segment key>``."""
    return f"_state/{source}.committed.d/"


def pull_checkpoint(output: Store, source: str, folder: Path) -> tuple[bytes | None, set[str]]:
    """The output's checkpoint into ``folder`` (``<source>.json`` and the npz it names).
    Returns the JSON (None: there is none) and the segments it holds as committed: its
    ``last_segment`` and, after a backfill, its ``committed_segments``."""
    data = output.read(f"_state/{source}.json")
    if data is None:
        return None, set()
    (folder / f"{source}.json").write_bytes(data)
    try:
        record = orjson.loads(data)
        books = record["books_file"]
    except (orjson.JSONDecodeError, KeyError, TypeError):  # load_state says what to do about it
        return data, set()
    if output.sha256(f"_state/{books}") is not None:
        output.download(f"_state/{books}", folder / books)
    held = set(record.get("committed_segments", []))
    if record.get("last_segment"):
        held.add(record["last_segment"])
    return data, held


def push_checkpoint(output: Store, source: str, folder: Path) -> bytes:
    """The checkpoint saved in ``folder`` to the output: its npz, then the JSON naming it,
    then the npz of the previous checkpoint goes. Returns the JSON."""
    data = (folder / f"{source}.json").read_bytes()
    books = orjson.loads(data)["books_file"]
    output.upload(folder / books, f"_state/{books}", sha256_file(folder / books))
    output.write(f"_state/{source}.json", data)
    for entry in list(output.list(f"_state/{source}.books-")):
        if entry.key != f"_state/{books}":
            output.delete(entry.key)
    return data


def pending_segments(raw: Store, output: Store, source: str, held: set[str], start: date | None = None,
                     end: date | None = None) -> list[PendingSegment]:  # fmt: skip
    """The raw root's segments without a marker in the output, in time order (one per key,
    ``ready/`` first). Segments the checkpoint holds (``held``) are done: their markers, if a
    crash came between the checkpoint and them, are written now."""
    markers = marker_prefix(source)
    done = {entry.key[len(markers) :] for entry in output.list(markers)}
    for key in sorted(held - done):
        output.write(markers + key, b"")
    done |= held
    found: dict[str, PendingSegment] = {}
    for state in INPUT_STATES:
        base = f"{state}/{source}/"
        for entry in raw.list(base):
            key = entry.key[len(base) :]
            name = key.rsplit("/", 1)[-1]
            if parse_segment_name(name) is None or key in done:
                continue
            if (start or end) and not _in_range(name, start, end):
                continue
            found.setdefault(key, PendingSegment(key, entry.key, entry.size))
    return sorted(found.values(), key=lambda item: segment_order(item.key))


class StoreEtl:
    """One source's ETL from an input store to an output store (see the module docstring)."""

    def __init__(self, config: DaedalusConfig, source: str, *, raw: str, processed: str) -> None:
        self.config = config
        self.source = source
        self.input: Store = open_store(raw, config.sync)
        self.output: Store = open_store(processed, config.sync)
        self.staging = config.layout.scratch(f"etl-store-{source}")
        self.job = staged_job(config, source, self.staging)
        self.markers = marker_prefix(source)
        self.lease: Lease | None = None
        self._renewed = 0.0
        self._published_state: bytes | None = None
        self.in_checkpoint: set[str] = set()  # segments the output's checkpoint holds
        self.on_beat: Callable[[], None] = lambda: None

    # ---- start: lease, staging, checkpoint ------------------------------------------------
    def prepare(self) -> None:
        """Take the output's lease, wipe the staging directory, fetch the checkpoint."""
        if self.lease is not None:
            return
        self.lease = self.output.lease(f"_state/{self.source}", LEASE_TTL_SECONDS,
                                       "daedalus etl is already writing to")  # fmt: skip
        self._renewed = time.monotonic()
        shutil.rmtree(self.staging, ignore_errors=True)
        self.job.state_dir.mkdir(parents=True, exist_ok=True)
        self._pull_state()
        self.job.prepare()
        self.job.beat = self._beat

    def close(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        shutil.rmtree(self.staging, ignore_errors=True)

    def _pull_state(self) -> None:
        self._published_state, self.in_checkpoint = pull_checkpoint(self.output, self.source, self.job.state_dir)

    def rebuild_state(self) -> str | None:
        """Move a damaged checkpoint aside, into ``_state/broken-<source>-<time>/`` of the output."""
        self.prepare()
        aside = f"_state/broken-{self.source}-{time.strftime('%Y%m%dT%H%M%S')}/"
        moved = 0
        for entry in list(self.output.list(f"_state/{self.source}.")):
            name = entry.key.rsplit("/", 1)[-1]
            if name == f"{self.source}.json" or name.startswith(f"{self.source}.books-"):
                data = self.output.read(entry.key)
                if data is not None:
                    self.output.write(aside + name, data)
                    self.output.delete(entry.key)
                    moved += 1
        for path in self.job.state_dir.glob(f"{self.source}.*"):
            if path.name != f"{self.source}.lock":
                path.unlink()
        self._published_state, self.in_checkpoint = None, set()
        log.warning("etl_state_rebuilt", moved_to=f"{self.output.url}/{aside}" if moved else None,
                    effect="books are empty until each product's next snapshot; open bars are lost")  # fmt: skip
        return f"{self.output.url}/{aside}" if moved else None

    # ---- work -------------------------------------------------------------------------------
    def pending(self, start: date | None = None, end: date | None = None) -> list[PendingSegment]:
        """Input segments without a marker, in time order (one per key, ``ready/`` first)."""
        return pending_segments(self.input, self.output, self.source, self.in_checkpoint, start, end)

    def run(self, start: date | None = None, end: date | None = None, progress: bool = False,
            should_stop: Callable[[], bool] = lambda: False) -> Summary:  # fmt: skip
        """Process and publish every pending segment once."""
        self.prepare()
        todo = self.pending(start, end)
        summary = Summary()
        bar = _progress(len(todo), sum(item.size for item in todo)) if progress and todo else None
        try:
            for index, item in enumerate(todo):
                if should_stop():
                    log.info("etl_stopping", segments_left=len(todo) - index)
                    break
                summary.merge(self._one(item))
                if bar is not None:
                    bar.advance(item.size, summary)
        finally:
            if bar is not None:
                bar.close()
        return summary

    def watch(self, poll_seconds: float, should_stop: Callable[[], bool], progress: bool = False) -> Summary:
        """Process new input segments as they appear until ``should_stop()``, with a heartbeat."""
        total = Summary()
        heartbeat = HeartbeatPublisher(self.config.layout, child=etl_child(self.source), kind="etl",
                                       source=self.source,
                                       every_seconds=self.config.supervisor.heartbeat_seconds)  # fmt: skip

        def publish() -> None:
            if heartbeat.due():
                heartbeat.publish(**self.job.heartbeat_stats(total))

        self.on_beat = publish
        try:
            while not should_stop():
                total.merge(self.run(progress=progress, should_stop=should_stop))
                deadline = time.monotonic() + poll_seconds
                while not should_stop() and time.monotonic() < deadline:
                    self._beat()
                    time.sleep(min(0.2, poll_seconds))
            return total
        finally:
            self.on_beat = lambda: None
            heartbeat.remove()

    def _beat(self) -> None:
        """Between batches and while idle: keep the lease (renewed at a third of its life)."""
        if self.lease is not None and time.monotonic() - self._renewed > LEASE_TTL_SECONDS / 3:
            self.lease.renew()
            self._renewed = time.monotonic()
        self.on_beat()

    def _one(self, item: PendingSegment) -> Summary:
        local = self.job.layout.ready(self.source) / item.key
        local.parent.mkdir(parents=True, exist_ok=True)
        self.input.download(item.location, local)
        done = self.job.run()  # this one segment, with the local job's every rule
        assert self.lease is not None
        self.lease.renew()  # lost: stop before publishing anything
        self._renewed = time.monotonic()
        files = self._publish_tree(self.job.config.processed_dir / self.source, f"{self.source}/")
        files += self._publish_tree(self.job.layout.quarantine(self.source), f"_quarantine/{self.source}/")
        self._publish_state()
        self.output.write(self.markers + item.key, b"")
        log.info("etl_segment_published", segment=item.key, files=files, output=self.output.url)
        return done

    def _publish_tree(self, folder: Path, prefix: str) -> int:
        """Upload every finished file under ``folder`` (``sync.max_concurrency`` at a time),
        then delete it locally; returns only once every one is in place."""
        if not folder.is_dir():
            return 0
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
        with ThreadPoolExecutor(max_workers=self.config.sync.max_concurrency) as pool:
            list(pool.map(lambda path: self._publish_file(path, prefix + path.relative_to(folder).as_posix()), files))
        return len(files)

    def _publish_file(self, path: Path, key: str) -> None:
        publish(self.output, path, key)
        path.unlink()

    def _publish_state(self) -> None:
        """The checkpoint, if this segment changed it: its npz, then the JSON naming it."""
        state = self.job.state_dir / f"{self.source}.json"
        if not state.exists():
            return
        if state.read_bytes() != self._published_state:
            self._published_state = push_checkpoint(self.output, self.source, self.job.state_dir)
