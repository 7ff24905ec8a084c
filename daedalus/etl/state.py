"""The ETL checkpoint in ``processed/_state/``: books, sequence positions, trade ids, open
bars and the last segment committed. Two files: ``<source>.books-<segment>.npz`` (the
levels, as arrays) and ``<source>.json`` (everything else, naming that npz). The JSON is
replaced atomically after the npz is durable, so a crash at any point leaves the previous
checkpoint or the new one, never a mix.

Beside it, ``<source>.committed`` lists every segment whose outputs are committed, one name
a line, appended and fsynced after the commit. Whether a segment was committed is looked up
there (or is the checkpoint's own ``last_segment``), never inferred from name order: a
segment processed out of order (``--mode date``, recovered late) is just as committed.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from daedalus.capture.segments import fsync_dir
from daedalus.etl.book import BookSet
from daedalus.etl.processors import BarBuilder, TradeDeduper

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
            books = BookSet.from_arrays(data["products"], dict(arrays), sample_interval_ns, depth)
        return EtlState(
            books,
            TradeDeduper.from_json(data["trades"]),
            BarBuilder.from_json(bar_interval_ns, data["bars"]),
            data["last_segment"],
            data.get("totals", {}),
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
    files = [directory / f"{source}.json", *directory.glob(f"{source}.books-*.npz")]
    files = [f for f in files if f.exists()]
    if not files:
        return None
    target = directory / f"broken-{source}-{time.strftime('%Y%m%dT%H%M%S')}"
    target.mkdir(parents=True, exist_ok=True)
    for path in files:
        shutil.move(str(path), target / path.name)
    fsync_dir(directory)
    return target


class CommittedSegments:
    """``<source>.committed``: the names of every segment whose outputs are committed."""

    def __init__(self, directory: Path, source: str) -> None:
        self.path = directory / f"{source}.committed"
        self.names: set[str] = set()
        self._torn = False
        if self.path.exists():
            data = self.path.read_bytes()
            end = data.rfind(b"\n") + 1  # a crash mid-append leaves a partial last line: not a name
            self._torn = end != len(data)
            self.names = set(data[:end].decode("utf-8", "replace").split())

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def add(self, name: str) -> None:
        """Record ``name`` durably (after its outputs are in place)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as handle:
            handle.write((b"\n" if self._torn else b"") + name.encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.names.add(name)
        self._torn = False


def save_state(directory: Path, source: str, state: EtlState) -> None:
    """Commit ``state`` (after the segment's outputs are in place)."""
    directory.mkdir(parents=True, exist_ok=True)
    books_file = f"{source}.books-{state.last_segment}.npz"
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
    }
    tmp = directory / f"{source}.json.tmp"
    with tmp.open("wb") as handle:
        handle.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, directory / f"{source}.json")
    fsync_dir(directory)
    for old in directory.glob(f"{source}.books-*.npz"):
        if old.name != books_file:
            old.unlink(missing_ok=True)
