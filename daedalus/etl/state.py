"""The ETL checkpoint in ``processed/_state/``: books, sequence positions, trade ids, open
bars and the last segment committed. Two files: ``<source>.books-<segment>.npz`` (the
levels, as arrays) and ``<source>.json`` (everything else, naming that npz). The JSON is
replaced atomically after the npz is durable, so a crash at any point leaves the previous
checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from daedalus.capture.segments import fsync_dir
from daedalus.etl.book import BookSet
from daedalus.etl.processors import BarBuilder, TradeDeduper

STATE_VERSION = 1


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
    """The last committed checkpoint of ``source``, or a fresh state."""
    path = directory / f"{source}.json"
    if not path.exists():
        return EtlState.fresh(sample_interval_ns, depth, bar_interval_ns)
    data = orjson.loads(path.read_bytes())
    if data.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: checkpoint version {data.get('version')} is not {STATE_VERSION}")
    with np.load(directory / data["books_file"], allow_pickle=False) as arrays:
        books = BookSet.from_arrays(data["products"], dict(arrays), sample_interval_ns, depth)
    return EtlState(
        books,
        TradeDeduper.from_json(data["trades"]),
        BarBuilder.from_json(bar_interval_ns, data["bars"]),
        data["last_segment"],
        data.get("totals", {}),
    )


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
