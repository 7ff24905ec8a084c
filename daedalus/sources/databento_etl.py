"""The Databento ETL parser: one DBN segment -> ``processed/databento/<DATASET>/<table>`` tables.

Called by the ETL job like the other sources' parsers (claim, commit, checkpoint and
idempotence are the job's)::

    run = DbnSegmentRun(job, key, state).run(path, max_object)

Tables (``<table>/symbol=<SYMBOL>/date=<YYYY-MM-DD of ts_event>/part-<segment>.parquet``):
``market_trades`` (trades), ``book_snapshot_1`` (mbp-1, tbbo), ``book_snapshot_10`` (mbp-10),
``level2`` (mbo, through the order-id map and the book engine: :mod:`daedalus.etl.mbo_book`),
``candles`` (ohlcv-*, with ``interval``), ``instruments`` (definition). Columns carry Databento's
names (as ``DBNStore.to_df`` gives them) plus ``ts_local`` (our receive time, null without stamps),
``ts_out`` (when the session asked for it) and the flag booleans ``is_last``, ``is_snapshot``,
``bad_ts_recv``, ``maybe_bad_book``. Prices follow ``etl.decimal_strategy`` at the DBN scale 1e-9;
undefined prices and timestamps are null. Other record types (statistics, status, imbalance,
system, error) are counted per rtype and skipped: valid data not modelled yet.

Decoding is bulk: the record lengths are walked in numba, then each record type is one numpy
gather and one ``view`` with the official structured dtype (``databento_dbn.<Msg>._dtypes``);
no per-record Python. A segment that is not DBN (bad header, garbage, a record running past the
end, a torn zstd frame) raises :class:`SegmentDataError`: quarantined whole, the run goes on.
Text fields that are not UTF-8 are decoded with replacement characters and counted
(``invalid_utf8_values``); records of a type whose length is not this DBN version's are
skipped and counted (``unexpected_length_records``, and per rtype).

Level2 validity (``book_valid``): books are per ``(dataset, publisher_id, instrument_id)``. A
book is known only after its own Clear (``R`` without ``F_SNAPSHOT``) or the last record of a
complete snapshot (``F_SNAPSHOT`` ... ``F_LAST``); a book first seen is unknown. A crossed book is
never valid. The segment's control events (written by the collector,
:mod:`daedalus.sources.databento_raw`) say when the stream stops continuing the books:

- ``gap`` without ``refill_start`` (the collector's start, a reconnect without refill, a
  slow-reader skip) and ``overflow`` (records dropped on a full queue) make every book of the
  segment's dataset unknown. A refilled ``gap`` changes nothing: the stream continues.
- a ``session`` whose ``subscribe`` events ask an ``mbo`` subscription for ``start: 0`` (the
  gateway's whole replay history: for GLBX.MDP3 the weekly session, elsewhere a day or less, so
  it may well start mid-stream) replays orders the books already hold: the dataset's books are
  emptied, each one that held a level or was known gets a clear row (``action`` R, null side
  and price, at the session's receive time), and they stay unknown until a Clear or snapshot.
  Counted as ``replays_from_start`` and logged as a warning.
- a plain DBN file with MBO records (no stamps, no events: Databento's own files, or any file
  dropped into ``ready/<DATASET>/``) is its own session: the dataset's books are emptied (clear
  rows as above, at the oldest times of its first MBO chunk) before it, so it starts from
  empty books that become known only by a Clear or complete snapshot inside it, and emptied
  again after it (clear rows at its newest MBO ts_event and ts_recv), so the live books that
  follow are empty and unknown, as after a gap. Historical files and live segments never
  share order-map state.
  Counted as ``plain_mbo_files``. (Databento's MBO test files hold neither a Clear nor a
  snapshot's ``F_LAST``: every level2 row of them is ``book_valid`` false.)
"""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from daedalus.etl.book import NO_PRICE
from daedalus.etl.errors import SegmentDataError
from daedalus.etl.mbo_book import MboBooks, attach
from daedalus.etl.output import PartitionedWriter, discard
from daedalus.etl.state import EtlState
from daedalus.layout import segment_stem
from daedalus.logs import get_logger
from daedalus.sources.databento_raw import walk_records

log = get_logger(__name__)

SCALE = 1_000_000_000  # DBN fixed-point prices: units of 1e-9
UNDEF_PRICE = 2**63 - 1
UNDEF_TS = 2**64 - 1
NS_PER_DAY = 86_400 * 1_000_000_000
TS_TYPE = pa.timestamp("ns", tz="UTC")
PARTITION_COLS = ["dataset", "symbol", "date"]

# rtypes
R_TRADES, R_MBP1, R_MBP10, R_DEF, R_MAPPING, R_MBO = 0, 1, 10, 19, 22, 160
R_OHLCV = {32: "1s", 33: "1m", 34: "1h", 35: "1d", 36: "eod"}
RTYPE_NAMES = {18: "status", 20: "imbalance", 21: "error", 23: "system", 24: "statistics", 22: "symbol_mapping"}
# counters logged as anomalies at the end of a segment (prefixes)
ANOMALIES = ("mbo_", "unmapped", "skipped_unexpected", "unexpected_length", "invalid_utf8", "overflows")
FLAG_COLUMNS = (("is_last", 128), ("is_snapshot", 32), ("bad_ts_recv", 8), ("maybe_bad_book", 4))


def _dbn() -> Any:
    """The DBN codec (only it: the official client would pull pandas into the ETL for nothing).
    Its absence was reported before any segment was claimed (``databento.require_extra``)."""
    import databento_dbn

    return databento_dbn


# ---- reading segments ---------------------------------------------------------------------


def open_segment(path: Path) -> Any:
    """The raw format's reader (stamps, control events; also plain ``.dbn``/``.dbn.zst`` files)."""
    from daedalus.sources.databento_raw import open_dbn_segment

    return open_dbn_segment(path)


# ---- symbols ------------------------------------------------------------------------------


class SymbolMap:
    """instrument_id -> symbol by date, from the metadata's mappings (historical files) and
    SymbolMappingMsg records (live): ``stype_out_symbol`` unless it is all digits, as DBNStore."""

    def __init__(self) -> None:
        self.intervals: dict[int, list[tuple[int, int, str]]] = {}  # id -> [(first day, end day, symbol)]

    def add_metadata(self, meta: Any) -> None:
        stype_in, stype_out = str(meta.stype_in), str(meta.stype_out)
        for symbol_in, entries in (meta.mappings or {}).items():
            for entry in entries:
                out = entry["symbol"]
                if not out:
                    continue
                if stype_out == "instrument_id":
                    symbol, iid = symbol_in, out
                elif stype_in == "instrument_id":
                    symbol, iid = out, symbol_in
                else:
                    continue
                with contextlib.suppress(ValueError):
                    first = entry["start_date"].toordinal() - 719163  # days since 1970-01-01
                    end = entry["end_date"].toordinal() - 719163
                    self.intervals.setdefault(int(iid), []).append((first, end, symbol))

    @staticmethod
    def _entries(msgs: np.ndarray) -> list[tuple[int, int, int, str]]:
        """(instrument_id, first day, end day, symbol) per SymbolMappingMsg record."""
        out = []
        for iid, s_in, s_out, start, end in zip(msgs["instrument_id"].tolist(), msgs["stype_in_symbol"].tolist(),
                                                msgs["stype_out_symbol"].tolist(), msgs["start_ts"].tolist(),
                                                msgs["end_ts"].tolist(), strict=True):  # fmt: skip
            out_symbol = s_out.decode("utf-8", "replace")
            symbol = s_in.decode("utf-8", "replace") if out_symbol.isdigit() else out_symbol
            first = -(10**9) if start == UNDEF_TS else start // NS_PER_DAY
            last = 10**9 if end == UNDEF_TS else end // NS_PER_DAY + 1
            out.append((int(iid), first, last, symbol))
        return out

    def add_messages(self, msgs: np.ndarray) -> None:
        """SymbolMappingMsg records (structured array), in order: each one's days take the id's
        symbol over, the id's other days keep theirs (an ordered upsert)."""
        for iid, first, last, symbol in self._entries(msgs):
            self.intervals[iid] = _upsert(self.intervals.get(iid, []), first, last, symbol)

    def remaps(self, msgs: np.ndarray) -> np.ndarray:
        """Per mapping (in order): whether it gives an id another symbol than the one it has on
        some of those days (including what the mappings before it in ``msgs`` gave)."""
        out = np.zeros(msgs.shape[0], np.bool_)
        seen: dict[int, list[tuple[int, int, str]]] = {}
        for n, (iid, first, last, symbol) in enumerate(self._entries(msgs)):
            current = seen.get(iid, self.intervals.get(iid, []))
            out[n] = any(f < last and first < e and s != symbol for f, e, s in current)
            seen[iid] = _upsert(current, first, last, symbol)
        return out

    def resolve(self, iid: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, list[str], int]:
        """(symbol code per record, names, records without a mapping: their id as text)."""
        uniq, inverse = np.unique(iid, return_inverse=True)
        inverse = inverse.reshape(-1)
        codes = np.empty(iid.shape[0], np.int64)
        names: list[str] = []
        index: dict[str, int] = {}
        unmapped = 0
        days = None
        for u, value in enumerate(uniq.tolist()):
            rows = np.flatnonzero(inverse == u) if uniq.shape[0] > 1 else np.arange(iid.shape[0])
            found = np.full(rows.shape[0], -1, np.int64)
            for first, end, symbol in self.intervals.get(value, []):
                if days is None:
                    days = np.where(ts == UNDEF_TS, 0, ts) // NS_PER_DAY
                hit = (days[rows] >= first) & (days[rows] < end)
                found[hit] = index.setdefault(symbol, len(index))
            missing = found < 0
            if missing.any():
                unmapped += int(missing.sum())
                found[missing] = index.setdefault(str(value), len(index))
            codes[rows] = found
        names = list(index)
        return codes, names, unmapped


def _upsert(intervals: list[tuple[int, int, str]], first: int, last: int, symbol: str) -> list[tuple[int, int, str]]:
    """``intervals`` with ``[first, last)`` given to ``symbol`` (overlapped ones trimmed)."""
    kept = []
    for f, e, s in intervals:
        if e <= first or f >= last:
            kept.append((f, e, s))
            continue
        if f < first:
            kept.append((f, first, s))
        if e > last:
            kept.append((last, e, s))
    return sorted([*kept, (first, last, symbol)])


# ---- columns ------------------------------------------------------------------------------


def ts_column(values: np.ndarray) -> pa.Array:
    """uint64 ns -> timestamp[ns, UTC], UNDEF_TIMESTAMP -> null."""
    undef = values == UNDEF_TS
    return pa.array(values.view(np.int64), TS_TYPE, mask=undef if undef.any() else None)


def price_column(units: np.ndarray, strategy: str) -> pa.Array:
    """int64 fixed-point (1e-9) -> the strategy's type; UNDEF_PRICE -> null."""
    units = np.ascontiguousarray(units, np.int64)
    undef = units == UNDEF_PRICE
    mask = undef if undef.any() else None
    if strategy == "pips":
        return pa.array(units, pa.int64(), mask=mask)
    if strategy == "decimal":
        words = np.empty((units.shape[0], 2), np.int64)
        words[:, 0] = units
        words[:, 1] = units >> 63
        validity = None if mask is None else pa.array(~mask).buffers()[1]
        nulls = 0 if mask is None else int(mask.sum())
        return pa.Array.from_buffers(pa.decimal128(38, 9), units.shape[0], [validity, pa.py_buffer(words)], nulls)
    return pa.array(units / SCALE, pa.float64(), mask=mask)


def _string_column(values: np.ndarray, counts: Counter[str] | None = None) -> pa.Array:
    """Fixed-width C strings -> string; bytes that are not UTF-8 become U+FFFD (counted as
    ``invalid_utf8_values``) rather than stopping the ETL on one bad byte."""
    data = pa.array(np.ascontiguousarray(values))
    try:
        return data.cast(pa.string())
    except pa.ArrowInvalid:
        decoded = [v.decode("utf-8", "replace") for v in values.tolist()]
        if counts is not None:
            counts["invalid_utf8_values"] += sum("\ufffd" in v for v in decoded)
        return pa.array(decoded, pa.string())


def record_columns(
    arr: np.ndarray, cls: Any, strategy: str, local: np.ndarray | None, counts: Counter[str] | None = None
) -> dict[str, pa.Array]:
    """Every field of a record type, named and ordered as ``to_df`` does (rtype left out), led
    by ts_event, ts_recv (when the type has it), ts_local and ts_out (when present)."""
    names = arr.dtype.names or ()
    out: dict[str, pa.Array] = {"ts_event": ts_column(arr["ts_event"])}
    if "ts_recv" in names:
        out["ts_recv"] = ts_column(arr["ts_recv"])
    out["ts_local"] = pa.array(local, TS_TYPE) if local is not None else pa.nulls(arr.shape[0], TS_TYPE)
    if "ts_out" in names:
        out["ts_out"] = ts_column(arr["ts_out"])
    prices, stamps = set(cls._price_fields), set(cls._timestamp_fields)
    for name in cls._ordered_fields:
        if name in out or name in ("rtype", "ts_recv", "ts_event"):
            continue
        column = arr[name]
        if name in stamps:
            out[name] = ts_column(np.ascontiguousarray(column))
        elif name in prices:
            out[name] = price_column(column, strategy)
        elif column.dtype.kind == "S":
            out[name] = _string_column(column, counts)
        else:
            out[name] = pa.array(np.ascontiguousarray(column))
        if name == "flags":
            for flag, bit in FLAG_COLUMNS:
                out[flag] = pa.array((column & bit) != 0)
    return out


# ---- the segment run ----------------------------------------------------------------------


class DbnSegmentRun:
    """One pass over one DBN segment: chunks -> records by type -> tables -> partitioned writers."""

    def __init__(self, job: Any, key: str, state: EtlState) -> None:
        etl = job.config.etl
        self.job, self.key, self.state = job, key, state
        self.strategy: str = etl.decimal_strategy
        self.compression: str = etl.compression
        self.stem = segment_stem(key)
        self.metadata = {
            "daedalus.source": job.source,
            "daedalus.segment": key,
            "daedalus.decimal_strategy": self.strategy,
            "daedalus.decimal_scale": "" if self.strategy == "float" else str(SCALE),
        }
        self.writers: dict[str, PartitionedWriter] = {}
        self.rows: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.files: list[Path] = []
        self.symbols = SymbolMap()
        self.dataset = ""
        self.ts_out = False
        self._mbo: MboBooks | None = None
        self._plain = False  # a plain DBN file (no stamps) holding MBO: its own session
        self._plain_last = (0, 0)  # a plain file's newest MBO (ts_event, ts_recv): its closing clear rows
        self._subscriptions: list[dict] = []  # subscribe events of the session being opened
        self._dtypes: dict[int, tuple[np.dtype, Any]] = {}

    # ---- SegmentParser -------------------------------------------------------------------
    def run(self, source: Path, max_object: int) -> DbnSegmentRun:
        """Process the segment. ``source`` may be the job's ndjson clean copy of a torn zstd
        file: the DBN segment itself is then read (and found torn)."""
        self._books()  # the order map rides in every checkpoint, with MBO in this segment or not
        path = source
        if not (source.name.endswith(".dbn") or source.name.endswith(".dbn.zst")):
            path = self.job.layout.processing(self.job.source) / self.key
        try:
            self._run(path)
        except BaseException:
            self._abandon()
            raise
        for table, writer in self.writers.items():
            self.files += writer.close()
            if writer.rows:
                self.rows[table] += writer.rows
        if self._mbo is not None:
            self.counts.update(self._mbo.take_counters())
        odd = {k: v for k, v in self.counts.items() if k.startswith(ANOMALIES) and v}
        if odd:
            log.warning("databento_etl_anomalies", segment=self.key, **odd)
        return self

    def quarantine_lines(self, source: Path) -> list[tuple[str, bytes]]:
        """Nothing line by line: a DBN segment is whole or quarantined whole."""
        return []

    def _run(self, path: Path) -> None:
        dbn = _dbn()
        import zstandard

        bad = (ValueError, EOFError, struct.error, zstandard.ZstdError, UnicodeDecodeError, dbn.DBNError)
        try:
            reader = open_segment(path)
            meta = dbn.Metadata.decode(bytes(reader.metadata))
        except bad as exc:
            raise SegmentDataError(f"not a readable DBN segment: {exc}") from exc
        self.dataset = meta.dataset or self.key.rsplit("/", 1)[0]  # a partition value: made safe by the writer
        self.ts_out = bool(meta.ts_out)
        self.symbols.add_metadata(meta)
        chunks = iter(reader)
        try:
            while True:
                try:
                    chunk = next(chunks, None)
                except bad as exc:
                    raise SegmentDataError(f"a damaged part of the DBN segment: {exc}") from exc
                if chunk is None:
                    break
                self._chunk(chunk)
                self.job.beat()
            if self._plain:  # the live books after it start empty and unknown (as after a gap)
                self._reset_books(*self._plain_last, None)
        finally:
            with contextlib.suppress(Exception):
                reader.close()  # also when the run stops midway (the file would stay open until collected)

    # ---- one chunk ---------------------------------------------------------------------------
    def _chunk(self, chunk: Any) -> None:
        for event in chunk.events:
            self._event(event)
        buf = np.frombuffer(chunk.records, np.uint8)
        if buf.shape[0] == 0:
            return
        offsets, end, problem = walk_records(buf)
        if problem:
            what = "a record length below the 16-byte header" if problem == 1 else "a record running past the end"
            raise SegmentDataError(f"malformed DBN records: {what} at byte {end} of a {buf.shape[0]}-byte chunk")
        if chunk.local_ns is None:
            self._plain_session(buf, offsets)
        rtypes = buf[offsets + 1]
        self.counts["records"] += offsets.shape[0]
        local = None if chunk.local_ns is None else np.asarray(chunk.local_ns, np.int64)
        if not (rtypes == R_MAPPING).any():
            self._piece(buf, offsets, rtypes, local)
            return
        # mappings name the records after them: applied up front, except where one re-maps an
        # id to another symbol (a roll mid-chunk): the chunk is cut there, so earlier records
        # keep the old name
        select = rtypes == R_MAPPING
        mappings = self._decode(buf, offsets, select, R_MAPPING)
        if mappings is None:
            self._piece(buf, offsets, rtypes, local)
            return
        at = np.flatnonzero(select)  # record index of each decoded mapping
        cuts = [0, *at[self.symbols.remaps(mappings)].tolist(), offsets.shape[0]]
        for lo, hi in itertools.pairwise(cuts):
            inside = (at >= lo) & (at < hi)
            if inside.any():
                self.symbols.add_messages(mappings[inside])
            if hi > lo:
                self._piece(buf, offsets[lo:hi], rtypes[lo:hi], None if local is None else local[lo:hi])

    def _piece(self, buf: np.ndarray, offsets: np.ndarray, rtypes: np.ndarray, local: np.ndarray | None) -> None:
        """Records of one stretch of a chunk (its mappings applied), one table per type."""
        for rtype in np.unique(rtypes).tolist():
            if rtype == R_MAPPING:
                continue
            select = rtypes == rtype
            table = self._table_of(rtype)
            if table is None:
                self.counts[f"skipped_{RTYPE_NAMES.get(rtype, f'rtype_{rtype}')}"] += int(select.sum())
                continue
            arr = self._decode(buf, offsets, select, rtype)
            if arr is None:
                continue
            rows_local = None if local is None else local[select]
            if rtype == R_MBO:
                self._level2(arr, rows_local)
            else:
                self._records(table, rtype, arr, rows_local)

    def _plain_session(self, buf: np.ndarray, offsets: np.ndarray) -> None:
        """A plain DBN file's records: before its first MBO record, the dataset's books are
        emptied (the file is its own session); its newest MBO ts_event and ts_recv date the clear
        rows after its last record (ts_recv names the symbol). Files without MBO leave the books alone."""
        mbo = offsets[buf[offsets + 1] == R_MBO]
        if mbo.shape[0] == 0:
            return
        at = self._dtype(R_MBO)[0].fields["ts_recv"][1]
        ts_event = buf[mbo[:, None] + np.arange(8, 16)].reshape(-1).view("<u8")
        ts_recv = buf[mbo[:, None] + np.arange(at, at + 8)].reshape(-1).view("<u8")
        if not self._plain:
            self._plain = True
            self.counts["plain_mbo_files"] += 1
            self._reset_books(int(ts_event.min()), int(ts_recv.min()), None)
        last_event, last_recv = self._plain_last
        self._plain_last = (max(last_event, int(ts_event.max())), max(last_recv, int(ts_recv.max())))

    def _event(self, event: dict) -> None:
        """Control events -> the dataset's book validity (the module docstring's rules)."""
        kind = event.get("event")
        if kind == "subscribe":
            self._subscriptions.append(event)
        elif kind == "session":
            mbo = [sub for sub in self._subscriptions if sub.get("schema") == "mbo"]
            self._subscriptions = []
            if any(sub.get("start") == 0 for sub in mbo):
                recv = int(event.get("recv_ns") or 0)
                books = self._reset_books(recv, recv, recv)
                self.counts["replays_from_start"] += 1
                log.warning("databento_etl_replay_from_start", segment=self.key, dataset=self.dataset,
                            books_emptied=books)  # fmt: skip
        elif kind == "gap":
            self.counts["gaps"] += 1
            if event.get("refill_start") is None:
                self._books().invalidate(self.dataset)
        elif kind == "overflow":
            self.counts["overflows"] += 1
            self._books().invalidate(self.dataset)  # records were dropped: a gap that was never refilled

    @staticmethod
    def _table_of(rtype: int) -> str | None:
        if rtype == R_TRADES:
            return "market_trades"
        if rtype == R_MBP1:
            return "book_snapshot_1"
        if rtype == R_MBP10:
            return "book_snapshot_10"
        if rtype == R_MBO:
            return "level2"
        if rtype in R_OHLCV:
            return "candles"
        if rtype == R_DEF:
            return "instruments"
        return None

    def _dtype(self, rtype: int) -> tuple[np.dtype, Any]:
        found = self._dtypes.get(rtype)
        if found is None:
            dbn = _dbn()
            cls = {R_TRADES: dbn.TradeMsg, R_MBP1: dbn.MBP1Msg, R_MBP10: dbn.MBP10Msg, R_DEF: dbn.InstrumentDefMsg,
                   R_MAPPING: dbn.SymbolMappingMsg, R_MBO: dbn.MBOMsg}.get(rtype, dbn.OHLCVMsg)  # fmt: skip
            fields = list(cls._dtypes) + ([("ts_out", "u8")] if self.ts_out else [])
            found = self._dtypes[rtype] = (np.dtype(fields), cls)
        return found

    def _decode(self, buf: np.ndarray, offsets: np.ndarray, select: np.ndarray, rtype: int) -> np.ndarray | None:
        """The selected records as one structured array (a gather, then a view). Records of
        another length (another DBN version's layout of the type) are taken out of ``select``
        (in place: the caller's per-record columns follow it) and counted as bad input."""
        dtype, _ = self._dtype(rtype)
        starts = offsets[select]
        lengths = buf[starts].astype(np.int64) * 4
        wrong = lengths != dtype.itemsize
        if wrong.any():  # not decoded, and visible: a bad-input counter
            self.counts[f"skipped_unexpected_length_rtype_{rtype}"] += int(wrong.sum())
            self.counts["unexpected_length_records"] += int(wrong.sum())
            select[np.flatnonzero(select)[wrong]] = False
            starts = starts[~wrong]
            if starts.shape[0] == 0:
                return None
        if starts.shape[0] * dtype.itemsize == buf.shape[0] and starts[0] == 0:
            return buf.view(dtype)  # the whole chunk is this one type: no copy
        block = buf[starts[:, None] + np.arange(dtype.itemsize)]
        return block.reshape(-1).view(dtype)

    # ---- tables --------------------------------------------------------------------------
    def _records(self, table: str, rtype: int, arr: np.ndarray, local: np.ndarray | None) -> None:
        _, cls = self._dtype(rtype)
        columns = record_columns(arr, cls, self.strategy, local, self.counts)
        if table == "candles":
            columns = {"interval": pa.repeat(pa.scalar(R_OHLCV[rtype]), arr.shape[0]), **columns}
        ts_event = arr["ts_event"]
        self._write(table, pa.table(columns), arr["instrument_id"], arr["ts_recv"] if "ts_recv" in
                    (arr.dtype.names or ()) else ts_event, ts_event)  # fmt: skip

    def _books(self) -> MboBooks:
        if self._mbo is None:
            # the checkpoint's order map, kept by the loader (None: a fresh state)
            self._mbo = attach(self.state.books, getattr(self.state.books, "extra_arrays", None))
        return self._mbo

    def _level2(self, arr: np.ndarray, local: np.ndarray | None) -> None:
        """MBO records through the order map and the engine: one row per changed level."""
        books = self._books()
        slots = books.slot_codes(self.dataset, arr["publisher_id"], arr["instrument_id"])
        action = np.ascontiguousarray(arr["action"]).view(np.uint8)
        side = np.ascontiguousarray(arr["side"]).view(np.uint8)
        f_rec, f_known, frames, result = books.apply(slots, np.ascontiguousarray(arr["order_id"]),
                                                     np.ascontiguousarray(arr["price"]), arr["size"], action, side,
                                                     np.ascontiguousarray(arr["flags"]))  # fmt: skip
        per_frame = frames.f_re - frames.f_rs
        rec = np.repeat(f_rec, per_frame)
        known = np.repeat(f_known, per_frame)
        if rec.shape[0] == 0:
            return
        self.counts["snapshots"] += int(np.count_nonzero(frames.r_snap))
        self._level2_rows(arr[rec], None if local is None else local[rec], frames.r_side, frames.r_px, frames.r_sz,
                          frames.r_snap, result.best_bid, result.best_ask, known)  # fmt: skip

    def _reset_books(self, ts_event: int, ts_recv: int, local: int | None) -> int:
        """Empty the dataset's books (:meth:`MboBooks.reset`); a clear row at those times for
        each one that held a level or was known. Returns how many got one."""
        slots, publisher, instrument = self._books().reset(self.dataset)
        n = slots.shape[0]
        if n == 0:
            return 0
        self.counts["books_reset"] += n
        rows = np.zeros(n, self._dtype(R_MBO)[0])
        rows["ts_event"], rows["ts_recv"] = ts_event, ts_recv
        if self.ts_out:
            rows["ts_out"] = ts_recv
        rows["length"], rows["rtype"] = rows.dtype.itemsize // 4, R_MBO
        rows["publisher_id"], rows["instrument_id"] = publisher, instrument
        rows["action"], rows["side"], rows["price"] = b"R", b"N", UNDEF_PRICE
        none = np.full(n, NO_PRICE, np.int64)
        self._level2_rows(rows, None if local is None else np.full(n, local, np.int64), np.zeros(n, np.int8),
                          np.zeros(n, np.int64), np.zeros(n, np.int64), np.ones(n, np.bool_), none, none,
                          np.zeros(n, np.bool_))  # fmt: skip
        return n

    def _level2_rows(
        self,
        rows: np.ndarray,
        local: np.ndarray | None,
        r_side: np.ndarray,
        r_px: np.ndarray,
        r_sz: np.ndarray,
        clear: np.ndarray,
        bb: np.ndarray,
        ba: np.ndarray,
        known: np.ndarray,
    ) -> None:
        """The level2 rows: per changed level, its MBO record's fields, the level (side, price,
        new total; a clear has none), the book's best bid/ask after it and its validity."""
        has_bb, has_ba = bb != NO_PRICE, ba != NO_PRICE
        both = has_bb & has_ba
        crossed = both & (bb >= ba)
        self.counts["crossed"] += int(np.count_nonzero(crossed & known))
        flags = rows["flags"]
        columns: dict[str, pa.Array] = {"ts_event": ts_column(rows["ts_event"]), "ts_recv": ts_column(rows["ts_recv"])}
        columns["ts_local"] = pa.array(local, TS_TYPE) if local is not None else pa.nulls(rows.shape[0], TS_TYPE)
        if self.ts_out:
            columns["ts_out"] = ts_column(rows["ts_out"])
        columns |= {
            "publisher_id": pa.array(rows["publisher_id"]),
            "instrument_id": pa.array(rows["instrument_id"]),
            "sequence": pa.array(rows["sequence"]),
            "order_id": pa.array(rows["order_id"]),
            "action": _string_column(rows["action"], self.counts),
            "side": pc.take(pa.array(["bid", "ask"]), pa.array(r_side.astype(np.int64), mask=clear)),
            "price": price_column(np.where(clear, UNDEF_PRICE, r_px), self.strategy),
            "size": pa.array(r_sz),
            "flags": pa.array(flags),
        }
        for flag, bit in FLAG_COLUMNS:
            columns[flag] = pa.array((flags & bit) != 0)
        columns["best_bid"] = price_column(np.where(has_bb, bb, UNDEF_PRICE), self.strategy)
        columns["best_ask"] = price_column(np.where(has_ba, ba, UNDEF_PRICE), self.strategy)
        bb0, ba0 = np.where(both, bb, 0), np.where(both, ba, 0)
        if self.strategy == "float":
            columns["mid_price"] = pa.array((bb0 + ba0) / (2 * SCALE), pa.float64(), mask=~both)
        else:  # the half unit rounded down, as Coinbase's level2 (no overflow near the int64 limit)
            columns["mid_price"] = price_column(np.where(both, bb0 + ((ba0 - bb0) >> 1), UNDEF_PRICE), self.strategy)
        columns["spread"] = price_column(np.where(both, ba0 - bb0, UNDEF_PRICE), self.strategy)
        columns["book_valid"] = pa.array(known & ~crossed)
        self._write("level2", pa.table(columns), rows["instrument_id"], rows["ts_recv"], rows["ts_event"])

    # ---- output --------------------------------------------------------------------------
    def _write(self, table: str, data: pa.Table, iid: np.ndarray, ts_symbol: np.ndarray, ts_event: np.ndarray) -> None:
        """Into ``<table>/dataset=/symbol=/date=`` (symbol by the date of ``ts_symbol``, as
        DBNStore; the date partition of ts_event): the ``<source>/<channel>/<col>=`` layout every
        source shares, so ``daedalus query`` has one view per table with ``dataset`` a column."""
        codes, names, unmapped = self.symbols.resolve(np.ascontiguousarray(iid), np.ascontiguousarray(ts_symbol))
        if unmapped:
            self.counts["unmapped_records"] += unmapped
        writer = self.writers.get(table)
        if writer is None:
            writer = self.writers[table] = PartitionedWriter(self.job.out_root / table, list(PARTITION_COLS),
                                                             self.stem, self.compression, self.metadata,
                                                             fixed={"dataset": self.dataset})  # fmt: skip
        day_ts = np.where(ts_event == UNDEF_TS, 0, ts_event).astype(np.int64)
        writer.write(data, (codes, names), day_ts)

    def _abandon(self) -> None:
        for writer in self.writers.values():
            with contextlib.suppress(Exception):
                writer.close()
            discard(writer.files)
