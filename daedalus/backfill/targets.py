"""Where a backfill reads its segments and commits its result: the data directory
(:class:`LocalTarget`: segments claimed from ``raw/``, files renamed into ``processed/``,
segments deleted or archived) or stores (:class:`StoreTarget`: segments read from a raw root,
a directory or ``s3://``, never changed; the result published to an output store the way
:mod:`daedalus.etl.remote` publishes one segment). The phases in between are the same.
"""

from __future__ import annotations

import filecmp
import hashlib
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path
from typing import Any, Protocol

from daedalus.capture.segments import fsync_path
from daedalus.config import DaedalusConfig
from daedalus.etl.job import EtlJob, segment_order
from daedalus.etl.output import OutputConflict
from daedalus.etl.remote import LEASE_TTL_SECONDS, marker_prefix, pending_segments, pull_checkpoint, push_checkpoint
from daedalus.etl.state import EtlState, load_state, save_state
from daedalus.layout import segment_stem
from daedalus.logs import get_logger
from daedalus.storage import Lease, LeaseLost, open_store, publish

log = get_logger("daedalus.backfill")


class Target(Protocol):
    def prepare(self) -> None: ...
    def start_state(self) -> EtlState: ...
    def pending(self, start: date | None, end: date | None) -> list[dict[str, Any]]: ...
    def place(self, folder: Path, files: list[str]) -> None: ...
    def save_checkpoint(self, state: EtlState, keys: list[str]) -> None: ...
    def finish(self, parsed: list[dict[str, Any]]) -> None: ...
    def close(self) -> None: ...


def segment_id(key: str) -> str:
    """A segment's folder name in the scratch area: its stem and a hash of the whole key."""
    return f"{segment_stem(key)}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def segment_item(key: str, size: int, **where: str) -> dict[str, Any]:
    """A segment as the plan carries it: its key, folder id and size, and where to read it
    (``path``, or ``raw`` + ``location`` in a store)."""
    return {"key": key, "id": segment_id(key), "bytes": size, **where}


def older_than(key: str, last: str | None) -> bool:
    if last is not None and segment_order(key) < segment_order(last):
        log.warning("backfill_segment_older_than_checkpoint", segment=key, checkpoint=last,
                    effect="left for the sequential ETL")  # fmt: skip
        return True
    return False


class LocalTarget:
    """The data directory, with the sequential job's lock, committed list and cleanup."""

    def __init__(self, config: DaedalusConfig, job: EtlJob) -> None:
        self.config = config
        self.job = job
        self.saved: EtlState | None = None

    def prepare(self) -> None:
        self.job.prepare()  # the source's lock: no other ETL while this runs

    def start_state(self) -> EtlState:
        return self.job._load()

    def pending(self, start: date | None, end: date | None) -> list[dict[str, Any]]:
        state = self.job._load()
        items = []
        for path in self.job.pending(start, end):
            key = self.job.key(path)
            if key in self.job.committed or key == state.last_segment:
                self.job._finish(path)  # committed before a crash: only cleanup was left
                continue
            if not older_than(key, state.last_segment):
                items.append(segment_item(key, path.stat().st_size, path=str(path)))
        return items

    def place(self, folder: Path, files: list[str]) -> None:
        """Move a task's files (``processed/...``, ``raw/quarantine/...``) into the data directory."""
        moved = set()
        for rel in files:
            source = folder / "data" / rel
            if rel.startswith("processed/"):
                target = self.config.processed_dir / rel.removeprefix("processed/")
            else:
                target = self.config.layout.root / rel
            if not source.exists():
                if target.exists():  # moved by an earlier, interrupted commit
                    continue
                raise FileNotFoundError(f"{source}: a finished task's file is missing (the scratch folder was changed "
                                        "by hand?); nothing of this backfill is recorded as committed")
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                if not filecmp.cmp(target, source, shallow=False):  # as check_conflicts compares
                    raise OutputConflict(f"{target} is already committed with other content")
                source.unlink()
                continue
            os.replace(source, target)
            moved.add(target.parent)
        for directory in moved:
            fsync_path(directory)

    def save_checkpoint(self, state: EtlState, keys: list[str]) -> None:
        """The checkpoint names every segment it commits: from this write on they are
        committed for the sequential job too, before the committed list has them."""
        state.committed_segments = keys
        save_state(self.job.state_dir, self.job.source, state)
        self.saved = state

    def finish(self, parsed: list[dict[str, Any]]) -> None:
        """The committed list, the segments deleted or archived, then the checkpoint again
        without its list of segments (as the sequential run leaves it)."""
        for result in parsed:
            path = self._input(result["key"])
            if "quarantined_segment" in result:
                if path.exists():
                    self.job._quarantine_segment(path, result["quarantined_segment"])
                continue
            if result["key"] not in self.job.committed:
                self.job.committed.add(result["key"])
            if path.exists():
                self.job._finish(path)
        if self.saved is not None:
            self.saved.committed_segments = []
            save_state(self.job.state_dir, self.job.source, self.saved)

    def _input(self, key: str) -> Path:
        for state in ("processing", "ready"):
            path = self.job.layout.raw_dir(state, self.job.source) / key
            if path.exists():
                return path
        return self.job.layout.ready(self.job.source) / key

    def close(self) -> None:
        pass


class StoreTarget:
    """A raw root read as it is, and an output store (directory or ``s3://``) written like
    :class:`daedalus.etl.remote.StoreEtl` does: the files, the quarantine, the checkpoint
    (naming every segment it holds), then a marker per segment; under the output's lease,
    renewed from a thread while the backfill runs."""

    def __init__(self, config: DaedalusConfig, job: EtlJob, scratch: Path, *, raw: str, processed: str) -> None:
        self.config = config
        self.job = job
        self.source = job.source
        self.raw = raw
        self.input = open_store(raw, config.sync)
        self.output = open_store(processed, config.sync)
        self.markers = marker_prefix(self.source)
        self.state_dir = scratch / "start-state"
        self.lease: Lease | None = None
        self._lost: BaseException | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.in_checkpoint: set[str] = set()

    # ---- the lease ------------------------------------------------------------------------
    def prepare(self) -> None:
        if self.lease is not None:
            return
        self.lease = self.output.lease(f"_state/{self.source}", LEASE_TTL_SECONDS, "daedalus etl is already writing to")
        self._renewer = threading.Thread(target=self._renew, name="lease", daemon=True)
        self._renewer.start()
        self._pull_state()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_TTL_SECONDS / 3):
            try:
                assert self.lease is not None
                self.lease.renew()
            except BaseException as exc:
                self._lost = exc
                return

    def _check_lease(self) -> None:
        if self._lost is not None:
            raise LeaseLost(f"{self.output.url}: the output's lease was lost ({self._lost}); nothing more is published")

    def close(self) -> None:
        self._stop.set()
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    # ---- the checkpoint before ----------------------------------------------------------
    def _pull_state(self) -> None:
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.state_dir.mkdir(parents=True)
        _, self.in_checkpoint = pull_checkpoint(self.output, self.source, self.state_dir)

    def start_state(self) -> EtlState:
        return load_state(self.state_dir, self.source, self.job.sample_ns, self.job.depth, self.job.bar_ns)

    def pending(self, start: date | None, end: date | None) -> list[dict[str, Any]]:
        last = self.start_state().last_segment
        return [segment_item(item.key, item.size, raw=self.raw, location=item.location)
                for item in pending_segments(self.input, self.output, self.source, self.in_checkpoint, start, end)
                if not older_than(item.key, last)]  # fmt: skip

    # ---- the commit -----------------------------------------------------------------------
    def place(self, folder: Path, files: list[str]) -> None:
        """Publish a task's files: ``processed/<rest>`` as ``<rest>``, the quarantine under
        ``_quarantine/``, ``sync.max_concurrency`` at a time."""
        self._check_lease()

        def one(rel: str) -> None:
            path = folder / "data" / rel
            if rel.startswith("processed/"):
                key = rel.removeprefix("processed/")
            else:
                key = "_quarantine/" + rel.removeprefix("raw/quarantine/")
            publish(self.output, path, key)

        with ThreadPoolExecutor(max_workers=self.config.sync.max_concurrency) as pool:
            list(pool.map(one, files))

    def save_checkpoint(self, state: EtlState, keys: list[str]) -> None:
        """The npz, then the JSON naming it and every segment this commit holds, then the old npz go."""
        self._check_lease()
        folder = self.state_dir.parent / "out-state"
        state.committed_segments = keys
        save_state(folder, self.source, state)
        push_checkpoint(self.output, self.source, folder)

    def finish(self, parsed: list[dict[str, Any]]) -> None:
        """A marker per segment (a segment quarantined whole gets its reason beside the quarantine)."""
        for result in parsed:
            if "quarantined_segment" in result:  # the segment itself beside its reason, as StoreEtl leaves it
                quarantined = f"_quarantine/{self.source}/{result['key']}"
                copy = self.state_dir.parent / "quarantined-copy"
                self.input.download(result["location"], copy)
                publish(self.output, copy, quarantined)
                copy.unlink()
                self.output.write(quarantined + ".reason.txt", (result["quarantined_segment"] + "\n").encode())
            self.output.write(self.markers + result["key"], b"")


