"""The ETL checkpoint in ``processed/_state/``: books, sequence positions, trade ids, open
bars and the last segment committed. Two files: ``<source>.books-<segment>.npz`` (the
levels, as arrays) and ``<source>.json`` (everything else, naming that npz). The JSON is
replaced atomically after the npz is durable, so a crash at any point leaves the previous
checkpoint or the new one, never a mix.

Beside it, ``<source>.committed`` lists every segment whose outputs are committed, one name
a line, appended and fsynced after the commit. Whether a segment was committed is looked up
there (or is the checkpoint's own ``last_segment``), never inferred from name order: a
segment processed out of order (``--mode date``, recovered late) is just as committed.

While a segment's outputs are being renamed into place, ``<source>.committing`` names the
segment and its files, so a commit cut short by a crash is rolled back (or, if the segment
did get recorded, finished) before anything else runs: see :func:`interrupted_commit`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from daedalus.capture.segments import fsync_path, write_atomically
from daedalus.etl.book import BookSet
from daedalus.etl.processors import BarBuilder, TradeDeduper
from daedalus.layout import segment_stem

STATE_VERSION = 1


class EtlStateError(Exception):
    """The checkpoint cannot be read (damaged, or written by an incompatible version)."""


@dataclass
class EtlState:
    books: BookSet
    trades: TradeDeduper
    bars: BarBuilder
    last_segment: str | None = None
    totals: dict[str, int] = field(default_factory=dict)
    # segments a backfill committed together with this checkpoint (one atomic write names
    # them all; the committed list and markers follow): committed as much as last_segment
    committed_segments: list[str] = field(default_factory=list)

    @classmethod
    def fresh(cls, sample_interval_ns: int, depth: int, bar_interval_ns: int) -> EtlState:
        return cls(BookSet(sample_interval_ns, depth), TradeDeduper(), BarBuilder(bar_interval_ns))


def load_state(directory: Path, source: str, sample_interval_ns: int, depth: int, bar_interval_ns: int) -> EtlState:
    """The last committed checkpoint of ``source``, or a fresh state.

    Raises :class:`EtlStateError` naming the file and the way out when it cannot be used."""
    path = directory / f"{source}.json"
    if not path.exists():
        return EtlState.fresh(sample_interval_ns, depth, bar_interval_ns)
    try:
        data = orjson.loads(path.read_bytes())
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            version = data.get("version") if isinstance(data, dict) else None
            raise ValueError(f"checkpoint version {version!r} is not {STATE_VERSION}")
        with np.load(directory / data["books_file"], allow_pickle=False) as arrays:
            raw = dict(arrays)
            books = BookSet.from_arrays(data["products"], raw, sample_interval_ns, depth)
        # a source's own book arrays (the Databento order map, ``mbo_*``) ride in the same npz
        books.extra_arrays = {k: v for k, v in raw.items() if k.startswith("mbo_")}  # type: ignore[attr-defined]
        return EtlState(
            books,
            TradeDeduper.from_json(data["trades"]),
            BarBuilder.from_json(bar_interval_ns, data["bars"]),
            data["last_segment"],
            data.get("totals", {}),
            list(data.get("committed_segments", [])),
        )
    except Exception as exc:  # any damage (truncated JSON, missing npz, wrong shapes) means the same thing
        raise EtlStateError(
            f"the ETL checkpoint {path} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); "
            f"run 'daedalus etl --rebuild-state' to move it aside and start from empty books "
            f"(they are valid again at the next snapshot; open bars are lost)"
        ) from None


def set_state_aside(directory: Path, source: str) -> Path | None:
    """Move ``source``'s checkpoint files into ``_state/broken-<source>-<time>/`` (kept for a
    post-mortem); the committed list stays, since what it names is in the dataset."""
    files = [directory / f"{source}.json", directory / f"{source}.committing", *directory.glob(f"{source}.books-*.npz")]
    files = [f for f in files if f.exists()]
    if not files:
        return None
    target = directory / f"broken-{source}-{time.strftime('%Y%m%dT%H%M%S')}"
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.move(str(path), target / path.name)
    fsync_path(directory)
    return target


class CommittedSegments:
    """``<source>.committed``: the names of every segment whose outputs are committed."""

    def __init__(self, directory: Path, source: str) -> None:
        self.path = directory / f"{source}.committed"
        self.names: set[str] = set()
        self._whole = 0  # bytes up to the last complete line: a crash mid-append leaves a partial one
        if self.path.exists():
            data = self.path.read_bytes()
            self._whole = data.rfind(b"\n") + 1
            self.names = set(data[: self._whole].decode("utf-8", "replace").split())

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def add(self, name: str) -> None:
        """Record ``name`` durably (after its outputs are in place); a partial line left by a
        crash or a failed append is cut first, so a fragment never reads as a name."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = name.encode() + b"\n"
        with self.path.open("ab") as handle:
            handle.truncate(self._whole)
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self._whole += len(line)
        self.names.add(name)


def begin_commit(directory: Path, source: str, segment: str, files: list[Path]) -> None:
    """Record, durably, that ``segment``'s ``files`` are about to be renamed into place."""
    record = {"segment": segment, "files": [str(f) for f in files]}
    write_atomically(directory / f"{source}.committing", orjson.dumps(record))


def end_commit(directory: Path, source: str) -> None:
    """The commit begun by :func:`begin_commit` is recorded in the committed list."""
    (directory / f"{source}.committing").unlink(missing_ok=True)
    fsync_path(directory)


def interrupted_commit(directory: Path, source: str) -> tuple[str, list[Path]] | None:
    """``(segment, files)`` of a commit a crash cut short, if any."""
    path = directory / f"{source}.committing"
    if not path.exists():
        return None
    try:
        record = orjson.loads(path.read_bytes())  # written atomically: whole or absent, unless the disk lies
        return record["segment"], [Path(f) for f in record["files"]]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise EtlStateError(
            f"the ETL's commit note {path} cannot be read ({type(exc).__name__}); run 'daedalus etl --rebuild-state' "
            "to set it aside (a segment it names is processed again; files it left are then reported as conflicts)"
        ) from None


def _file_part(segment: str | None) -> str:
    """A segment key as part of a file name: a bare name as it is; a partitioned key
    (``trades/exchange=.../segment_....parquet``) as its stem plus a hash of the whole key."""
    if segment is None or "/" not in segment:
        return str(segment)
    return f"{segment_stem(segment)}-{hashlib.sha256(segment.encode()).hexdigest()[:12]}"


def save_state(directory: Path, source: str, state: EtlState) -> None:
    """Commit ``state`` (after the segment's outputs are in place)."""
    directory.mkdir(parents=True, exist_ok=True)
    books_file = f"{source}.books-{_file_part(state.last_segment)}.npz"
    tmp = directory / (books_file + ".tmp")
    with tmp.open("wb") as handle:
        np.savez(handle, **state.books.to_arrays())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, directory / books_file)
    data = {
        "version": STATE_VERSION,
        "source": source,
        "last_segment": state.last_segment,
        "books_file": books_file,
        "products": state.books.products,
        "trades": state.trades.to_json(),
        "bars": state.bars.to_json(),
        "totals": state.totals,
        **({"committed_segments": state.committed_segments} if state.committed_segments else {}),
    }
    # keys sorted: the same checkpoint is the same bytes, whatever order its maps were filled in
    text = orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    write_atomically(directory / f"{source}.json", text)
    for old in directory.glob(f"{source}.books-*.npz"):
        if old.name != books_file:
            old.unlink(missing_ok=True)
