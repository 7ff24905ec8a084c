"""The Databento ETL (daedalus.sources.databento_etl, daedalus.etl.mbo_book) against Databento's
own decoder and an independent order book.

Databento's test fixtures go through the real ``daedalus etl`` and every processed table is read
back with DuckDB and compared, row for row, with ``DBNStore.from_file(...).to_df()``. The MBO
level2 is checked against a plain-Python book (dict of orders -> levels) after every record, on
the fixtures and on a generated stream spanning two segments (two ETL processes: the order map
must come through the checkpoint).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import orjson
import pytest
import zstandard

databento = pytest.importorskip("databento")
dbn = pytest.importorskip("databento_dbn")

from daedalus.config import parse_config  # noqa: E402
from daedalus.etl.job import EtlJob, Summary  # noqa: E402
from daedalus.sources.databento_raw import event_frame, stamps_frame  # noqa: E402
from tests.etl_helpers import DATABENTO_FIXTURES as FIXTURES  # noqa: E402
from tests.etl_helpers import databento_fixtures as fixtures  # noqa: E402
from tests.etl_helpers import place_databento_fixtures as place_fixtures  # noqa: E402
from tests.etl_helpers import place_databento_segment as place  # noqa: E402

UNDEF_PRICE = 2**63 - 1
REPO = Path(__file__).resolve().parents[1]
# schema -> processed table
TABLES = {"trades": "market_trades", "mbp-1": "book_snapshot_1", "mbp-10": "book_snapshot_10",
          "ohlcv-1m": "candles", "definition": "instruments"}  # fmt: skip
LIVE_SCHEMAS = ["mbo", "mbp-1", "mbp-10", "trades", "ohlcv-1m", "definition"]

pytestmark = pytest.mark.skipif(not FIXTURES.exists(), reason="Databento fixtures not present")


def etl_config(data_dir: Path, strategy: str = "float") -> Any:
    return parse_config({"data_dir": str(data_dir), "etl": {"decimal_strategy": strategy}})


def run_job(data_dir: Path, strategy: str = "float") -> Summary:
    return EtlJob(etl_config(data_dir, strategy), "databento").run()


def run_cli(data_dir: Path, strategy: str) -> subprocess.CompletedProcess:
    """``daedalus etl --source databento`` in a child process."""
    config = data_dir / "config.yaml"
    config.write_text(f"data_dir: {data_dir}\netl:\n  decimal_strategy: {strategy}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "daedalus", "etl", "--config", str(config), "--source", "databento"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=REPO)  # fmt: skip


def read_table(
    data_dir: Path, dataset: str, table: str, stem: str, columns: list[str], where: str = "true"
) -> list[tuple]:
    """Rows of one segment's output files, in file order (partition date, then row), read with
    DuckDB; timestamps as int64 ns."""
    pattern = data_dir / "processed" / "databento" / table / f"dataset={dataset}" / "*" / "*" / f"part-{stem}.parquet"
    con = duckdb.connect()
    kinds = {
        r[0]: r[1]
        for r in con.execute(f"describe select * from read_parquet('{pattern}', hive_partitioning=true)").fetchall()
    }
    select = ", ".join(f"epoch_ns({c})" if kinds[c].startswith("TIMESTAMP") else f'"{c}"' for c in columns)
    query = (f"select {select} from read_parquet('{pattern}', hive_partitioning=true, file_row_number=true, "
             f"filename=true) where {where} order by date, filename, file_row_number")  # fmt: skip
    return con.execute(query).fetchall()


def reference(path: Path, schema: str | None, strategy: str) -> Any:
    """Databento's own DataFrame of a fixture, index as a column, rows in our file order
    (the partition date of ts_event, stable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = databento.DBNStore.from_file(path)
        df = store.to_df(price_type="fixed" if strategy == "pips" else "float", schema=schema).reset_index()
    day = df["ts_event"].dt.strftime("%Y-%m-%d")
    return df.iloc[np.argsort(day.to_numpy(), kind="stable")].reset_index(drop=True)


def reference_rows(df: Any, columns: list[str], strategy: str) -> list[tuple]:
    """The reference rows as plain values: timestamps int64 ns (NaT -> None), undefined prices -> None."""
    out = []
    for name in columns:
        col = df[name]
        if str(col.dtype).startswith("datetime64"):
            ns = col.dt.tz_convert("UTC").astype("int64") if col.dt.tz is not None else col.astype("int64")
            values = [None if nat else int(v) for v, nat in zip(ns.tolist(), col.isna().tolist(), strict=True)]
        else:
            values = col.tolist()
            if strategy == "pips":
                values = [None if v == UNDEF_PRICE and isinstance(v, int) else v for v in values]
            values = [None if isinstance(v, float) and v != v else v for v in values]
        out.append(values)
    return list(zip(*out, strict=True))


def compared_columns(df: Any) -> list[str]:
    return [c for c in df.columns if c not in ("rtype", "symbol")]


# ---- every fixture against DBNStore.to_df ---------------------------------------------------------


@pytest.mark.parametrize("strategy", ["pips", "float"])
def test_every_fixture_table_equals_databentos_decoder(tmp_path: Path, strategy: str) -> None:
    placed = place_fixtures(tmp_path)
    result = run_cli(tmp_path, strategy)
    assert result.returncode == 0, result.stderr[-3000:]
    checked = 0
    for path, (dataset, stem) in placed.items():
        schema = path.name.split(".")[1]
        schemas = LIVE_SCHEMAS if schema == "live" else [schema]
        for one in schemas:
            if one not in TABLES:
                continue
            df = reference(path, one if schema == "live" else None, strategy)
            columns = compared_columns(df)
            where = "interval = '1m'" if one == "ohlcv-1m" else "true"  # the live file also has 1s bars
            ours = read_table(tmp_path, dataset, TABLES[one], stem, [*columns, "symbol"], where)
            expected = [(*row, symbol) for row, symbol in
                        zip(reference_rows(df, columns, strategy), df["symbol"].tolist(), strict=True)]  # fmt: skip
            assert len(ours) == len(expected) > 0, (path.name, one)
            assert ours == expected, (path.name, one)
            checked += 1
    assert checked == 14  # 5 GLBX + 4 XNAS per-schema tables + 5 of the live file
    summary = (tmp_path / "processed" / "_state" / "databento.json").read_bytes()
    for skipped in (b"skipped_statistics", b"skipped_status", b"skipped_imbalance"):
        assert skipped in summary  # counted, not quarantined
    assert not (tmp_path / "raw" / "quarantine").exists()


def test_flag_columns_and_decimal_prices(tmp_path: Path) -> None:
    path = FIXTURES / "GLBX.MDP3" / "test_data.mbp-1.dbn.zst"
    stem = place(tmp_path, "GLBX.MDP3", 1, path.read_bytes())
    run_job(tmp_path, "decimal")
    df = reference(path, None, "pips")
    names = ["price", "flags", "is_last", "is_snapshot", "bad_ts_recv", "maybe_bad_book", "ts_local"]
    rows = read_table(tmp_path, "GLBX.MDP3", "book_snapshot_1", stem, names)
    for row, (price, flags) in zip(rows, zip(df["price"].tolist(), df["flags"].tolist(), strict=True), strict=True):
        assert row[0] * 10**9 == price  # decimal(38, 9): exact
        assert row[1:6] == (flags, bool(flags & 128), bool(flags & 32), bool(flags & 8), bool(flags & 4))
        assert row[6] is None  # no receive stamps in Databento's files
    assert any(r[2] for r in rows)


# ---- MBO: the order map + engine against a plain-Python book --------------------------------------


class ReferenceBook:
    """Databento's book rules, the obvious way: orders in dicts, levels summed on demand."""

    def __init__(self) -> None:
        self.orders: dict[tuple[int, int], dict[int, tuple[str, int, int]]] = {}

    def apply(self, book: tuple[int, int], action: str, side: str, order_id: int, price: int, size: int) -> bool:
        """Apply one record; True when it changed a level."""
        orders = self.orders.setdefault(book, {})
        if action == "R":
            orders.clear()
            return True
        if action == "A" or (action == "M" and order_id not in orders):
            if order_id in orders:
                del orders[order_id]
            if side in "BA" and size > 0:
                orders[order_id] = (side, price, size)
            return True
        if action == "C" and order_id in orders:
            s, p, z = orders[order_id]
            if z - size > 0:
                orders[order_id] = (s, p, z - size)
            else:
                del orders[order_id]
            return True
        if action == "M":
            s, p, z = orders[order_id]
            changed = (s, p, z) != (side, price, size)
            if side in "BA" and size > 0:
                orders[order_id] = (side, price, size)
            else:
                del orders[order_id]
            return changed
        return False

    def best(self, book: tuple[int, int]) -> tuple[int | None, int | None]:
        orders = self.orders.get(book, {}).values()
        bids = [p for s, p, _ in orders if s == "B"]
        asks = [p for s, p, _ in orders if s == "A"]
        return (max(bids) if bids else None), (min(asks) if asks else None)

    def level(self, book: tuple[int, int], side: str, price: int) -> int:
        return sum(z for s, p, z in self.orders.get(book, {}).values() if s == side and p == price)


def expected_level2(records: list[Any]) -> list[tuple]:
    """Per record that changes a level: (order_id, action, best_bid, best_ask) after it, and the
    new total of each level it touched (a plain recomputation, not the engine's)."""
    ref = ReferenceBook()
    out = []
    for r in records:
        book = (r.publisher_id, r.instrument_id)
        action, side = str(r.action), str(r.side)
        before = {(s, p) for s, p, _ in ref.orders.get(book, {}).values()}
        old = ref.orders.get(book, {}).get(r.order_id)
        if ref.apply(book, action, side, r.order_id, r.price, r.size):
            bb, ba = ref.best(book)
            if action == "R":
                out.append((r.order_id, action, None, None, 0, bb, ba))
                continue
            touched = [] if old is None else [(old[0], old[1])]
            if (side, r.price) not in touched and action in "AM":
                touched.append((side, r.price))
            for s, p in touched:
                if (s, p) in before or ref.level(book, s, p):
                    out.append((r.order_id, action, {"B": "bid", "A": "ask"}[s], p, ref.level(book, s, p), bb, ba))
    return out


L2_COLUMNS = ["order_id", "action", "side", "price", "size", "best_bid", "best_ask"]


def test_fixture_mbo_level2_equals_the_reference_book(tmp_path: Path) -> None:
    stems = {}
    for n, dataset in enumerate(["GLBX.MDP3", "XNAS.ITCH"], 1):
        stems[dataset] = place(tmp_path, dataset, n, (FIXTURES / dataset / "test_data.mbo.dbn.zst").read_bytes())
    run_job(tmp_path, "pips")
    for dataset, stem in stems.items():
        records = list(databento.DBNStore.from_file(FIXTURES / dataset / "test_data.mbo.dbn.zst"))
        ours = read_table(tmp_path, dataset, "level2", stem, [*L2_COLUMNS, "book_valid"])
        # a plain file is its own session: closed by a clear row; its MBO (four adds, GLBX's flagged
        # F_SNAPSHOT without an F_LAST) holds no Clear and no complete snapshot: never a known book
        closing = (0, "R", None, None, 0, None, None)
        assert [row[:-1] for row in ours] == [*expected_level2(records), closing] and len(ours) == 5
        assert not any(row[-1] for row in ours)


SYMBOLS = {101: "ESM6", 202: "NQM6"}


def mbo_stream(seed: int, n: int) -> list[Any]:
    """Random MBO records over two instruments: adds, partial and full cancels, modifies (size,
    price and side), clears, trades, fills, and a few records about unknown orders."""
    rng = random.Random(seed)
    live: dict[int, dict[int, tuple[str, int, int]]] = {101: {}, 202: {}}
    out, next_id, ts = [], 1, 1_767_225_600_000_000_000  # 2026-01-01

    def msg(iid: int, action: str, side: str, oid: int, price: int, size: int, flags: int = 0) -> Any:
        nonlocal ts
        ts += rng.randrange(1, 50_000)
        return dbn.MBOMsg(1, iid, ts, oid, price, size, dbn.Action(action), dbn.Side(side), ts + 1000, flags=flags,
                          sequence=len(out) + 1)  # fmt: skip

    for _ in range(n):
        iid = rng.choice([101, 202])
        orders = live[iid]
        mid = 5000 if iid == 101 else 20000
        roll = rng.random()
        if roll < 0.004:
            out.append(msg(iid, "R", "N", 0, UNDEF_PRICE, 0, 8))
            orders.clear()
        elif roll < 0.45 or not orders:
            side = rng.choice("BA")
            price = (mid - rng.randrange(1, 30) if side == "B" else mid + rng.randrange(0, 30)) * 250_000_000
            out.append(msg(iid, "A", side, next_id, price, rng.randrange(1, 20)))
            orders[next_id] = (side, price, out[-1].size)
            next_id += 1
        elif roll < 0.7:
            oid = rng.choice(list(orders))
            side, price, size = orders[oid]
            take = rng.randrange(1, size + 1)
            out.append(msg(iid, "C", side, oid, price, take))
            if take == size:
                del orders[oid]
            else:
                orders[oid] = (side, price, size - take)
        elif roll < 0.9:
            oid = rng.choice(list(orders))
            side, price, size = orders[oid]
            if rng.random() < 0.5:
                price += rng.choice([-1, 1]) * 250_000_000
            if rng.random() < 0.05:
                side = "A" if side == "B" else "B"
            size = rng.randrange(1, 25)
            out.append(msg(iid, "M", side, oid, price, size))
            orders[oid] = (side, price, size)
        elif roll < 0.97:
            oid = rng.choice(list(orders))
            side, price, _ = orders[oid]
            out.append(msg(iid, rng.choice("TF"), side, oid, price, 1))
        else:  # about orders nobody added: a cancel (ignored) and a modify (an add)
            out.append(msg(iid, "C", "B", 10**9 + next_id, mid * 250_000_000, 1))
            out.append(msg(iid, "M", "A", 10**9 + next_id, (mid + 40) * 250_000_000, 3))
            orders[10**9 + next_id] = ("A", (mid + 40) * 250_000_000, 3)
            next_id += 1
    return out


def live_header() -> bytes:
    return dbn.Metadata("GLBX.MDP3", 0, None, dbn.SType.INSTRUMENT_ID, None).encode()


def mappings() -> list[Any]:
    raw, iid_type, undef = dbn.SType.RAW_SYMBOL, dbn.SType.INSTRUMENT_ID, 2**64 - 1
    return [dbn.SymbolMappingMsg(0, iid, 0, raw, sym, iid_type, sym, undef, undef) for iid, sym in SYMBOLS.items()]


def stamped_segment(records: list[Any], first_local: int, events: list[bytes] | None = None) -> bytes:
    """A segment in the capture's format: header frame, then (events), stamps + data."""
    cctx = zstandard.ZstdCompressor()
    body = b"".join(bytes(r) for r in records)
    stamps = stamps_frame([(first_local + i, 1, 1) for i in range(len(records))])
    return cctx.compress(live_header()) + b"".join(events or []) + stamps + cctx.compress(body)


def test_generated_mbo_across_two_segments_and_two_processes(tmp_path: Path) -> None:
    records = mbo_stream(7, 6000)
    half = len(records) // 2
    first = [*mappings(), *records[:half]]
    second = [*mappings(), *records[half:]]
    place(tmp_path, "GLBX.MDP3", 1, stamped_segment(first, 1_000))
    run_job(tmp_path, "pips")  # the first segment alone: the checkpoint holds its resting orders
    place(tmp_path, "GLBX.MDP3", 2, stamped_segment(second, 2_000_000))
    result = run_cli(tmp_path, "pips")  # another process: books and order map from the checkpoint only
    assert result.returncode == 0, result.stderr[-3000:]
    expected = expected_level2(records)
    ours = []
    for stem in ("segment_20201228T00_00001", "segment_20201228T00_00002"):
        rows = {}
        for symbol in SYMBOLS.values():  # one symbol's rows keep record order; merge by sequence
            pattern = (
                tmp_path
                / "processed/databento/level2/dataset=GLBX.MDP3"
                / f"symbol={symbol}"
                / "*"
                / f"part-{stem}.parquet"
            )
            query = (f"select sequence, {', '.join(L2_COLUMNS)}, instrument_id from read_parquet('{pattern}', "
                     "file_row_number=true) order by file_row_number")  # fmt: skip
            found = duckdb.execute(query).fetchall()
            for row in found:
                rows.setdefault(row[0], []).append(row)
        ours += [row[1:-1] for seq in sorted(rows) for row in rows[seq]]
    assert len(ours) == len(expected) > 5000
    for i, (got, want) in enumerate(zip(ours, expected, strict=True)):
        assert got == want, (i, got, want)


def test_level2_validity_local_time_and_gap_events(tmp_path: Path) -> None:
    """A Clear makes a book known; a refilled gap leaves it so; a gap without refill leaves it
    invalid until a Clear; a crossed book is never valid; ts_local comes from the receive stamps."""
    ts = 1_767_225_600_000_000_000

    def mbo(action: str, side: str, oid: int, price: int, size: int, flags: int = 0) -> Any:
        return dbn.MBOMsg(1, 101, ts + oid, oid, price * 10**9, size, dbn.Action(action), dbn.Side(side), ts + oid,
                          flags=flags)  # fmt: skip

    before = [*mappings(), mbo("R", "N", 0, 0, 0), mbo("A", "B", 1, 100, 5), mbo("A", "A", 2, 101, 5)]
    after = [mbo("A", "B", 3, 99, 1), mbo("R", "N", 4, 0, 0), mbo("A", "B", 5, 100, 2), mbo("A", "A", 6, 100, 1)]
    # a second gap, then a snapshot's records: invalid until its last one (F_SNAPSHOT | F_LAST)
    last = [mbo("C", "A", 6, 100, 1, 32), mbo("A", "A", 7, 102, 1, 32), mbo("A", "A", 8, 103, 1, 32 | 128)]
    refilled = event_frame(60, 1, "gap", {"last_ts_event": ts, "refill_start": ts + 1})  # refilled: no effect
    gap = event_frame(50, 1, "gap", {"last_ts_event": ts, "refill_start": None})
    cctx = zstandard.ZstdCompressor()

    def flush(local: int, records: list[Any]) -> bytes:
        return stamps_frame([(local, len(records), 1)]) + cctx.compress(b"".join(map(bytes, records)))

    data = (cctx.compress(live_header()) + b"".join(session_head()) + flush(1_000, before) + refilled
            + flush(1_500, [mbo("A", "B", 9, 98, 1)]) + gap + flush(2_000, after)
            + gap + flush(3_000, last))  # fmt: skip
    stem = place(tmp_path, "GLBX.MDP3", 1, data)
    summary = run_job(tmp_path, "pips")
    rows = read_table(tmp_path, "GLBX.MDP3", "level2", stem, ["order_id", "book_valid", "ts_local", "best_bid"])
    bid = 100 * 10**9
    assert rows == [(0, True, 1_000, None), (1, True, 1_000, bid), (2, True, 1_000, bid), (9, True, 1_500, bid),
                    (3, False, 2_000, bid),
                    (4, True, 2_000, None), (5, True, 2_000, bid), (6, False, 2_000, bid), (6, False, 3_000, bid),
                    (7, False, 3_000, bid), (8, True, 3_000, bid)]  # fmt: skip
    assert summary.counts["gaps"] == 4 and summary.counts["crossed"] == 1  # the session's own start-up gap too


# ---- symbols, bad input, idempotence -----------------------------------------------------------


def test_records_without_a_mapping_land_under_their_instrument_id(tmp_path: Path) -> None:
    ts = 1_767_225_600_000_000_000
    trades = [dbn.TradeMsg(1, iid, ts + i, 10**12, 1, dbn.Action.TRADE, dbn.Side.BID, 0, ts + i, sequence=i)
              for i, iid in enumerate([101, 999, 999])]  # fmt: skip
    stem = place(tmp_path, "GLBX.MDP3", 1, stamped_segment([*mappings(), *trades], 10))
    summary = run_job(tmp_path)
    rows = read_table(tmp_path, "GLBX.MDP3", "market_trades", stem, ["symbol", "instrument_id"])
    assert sorted(rows) == [("999", 999), ("999", 999), ("ESM6", 101)]
    assert summary.counts["unmapped_records"] == 2


def corrupt_segments() -> dict[str, bytes]:
    good = (FIXTURES / "GLBX.MDP3" / "test_data.trades.dbn.zst").read_bytes()
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(good)
    return {
        "garbage": os.urandom(3000),
        "record_past_the_end": plain[:-10],
        "bad_header": b"XYZ" + plain[3:],
        "newer_dbn_version": plain[:3] + b"\x09" + plain[4:],
        "zero_length_record": plain + b"\x00" * 16,
        "torn_zstd": good[:-7],
    }


def test_corrupt_segments_are_quarantined_and_the_others_land(tmp_path: Path) -> None:
    bad = corrupt_segments()
    for n, (_, data) in enumerate(bad.items(), 1):
        place(tmp_path, "GLBX.MDP3", n, data, ".dbn.zst" if data[:4] == b"\x28\xb5\x2f\xfd" else ".dbn")
    good = place(tmp_path, "GLBX.MDP3", 9, (FIXTURES / "GLBX.MDP3" / "test_data.trades.dbn.zst").read_bytes())
    summary = run_job(tmp_path)
    assert summary.quarantined_segments == len(bad)
    assert len(read_table(tmp_path, "GLBX.MDP3", "market_trades", good, ["price"])) == 4
    quarantine = tmp_path / "raw" / "quarantine" / "databento" / "GLBX.MDP3"
    reasons = sorted(quarantine.glob("*.reason.txt"))
    assert len(reasons) == len(bad)
    assert all(r.read_text().strip() for r in reasons)
    assert not list((tmp_path / "raw" / "processing").rglob("segment_*"))


def digests(data_dir: Path) -> dict[str, str]:
    root = data_dir / "processed" / "databento"
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*.parquet")}


def test_rerun_is_idempotent(tmp_path: Path) -> None:
    """The same segments give the same files, byte for byte, whether processed from ready/ or
    found again in processing/ by a run after a crash."""
    place_fixtures(tmp_path / "a")
    run_job(tmp_path / "a")
    for n, (dataset, path) in enumerate(fixtures(), 1):
        place(tmp_path / "b", dataset, n, path.read_bytes(), state="processing" if n % 2 else "ready")
    run_job(tmp_path / "b")
    first = digests(tmp_path / "a")
    assert first and first == digests(tmp_path / "b")
    place_fixtures(tmp_path / "a")  # the same names again: committed, so never overwritten
    summary = run_job(tmp_path / "a")
    assert digests(tmp_path / "a") == first and summary.segments == 0
    shutil.rmtree(tmp_path / "a" / "raw" / "quarantine")


def test_a_checkpoint_without_the_order_map_leaves_the_books_empty_and_invalid(tmp_path: Path) -> None:
    """Levels whose orders are gone could never be taken down again: rather than publish them,
    the books start empty and invalid until their next Clear."""
    ts = 1_767_225_600_000_000_000

    def mbo(action: str, side: str, oid: int, price: int, size: int) -> Any:
        return dbn.MBOMsg(1, 101, ts + oid, oid, price * 10**9, size, dbn.Action(action), dbn.Side(side), ts + oid)

    place(tmp_path, "GLBX.MDP3", 1, stamped_segment([*mappings(), mbo("A", "B", 1, 100, 5)], 10))
    run_job(tmp_path, "pips")
    state = tmp_path / "processed" / "_state"
    books = state / orjson.loads((state / "databento.json").read_bytes())["books_file"]
    with np.load(books) as arrays:
        kept = {k: arrays[k] for k in arrays.files if not k.startswith("mbo_")}
    with books.open("wb") as handle:
        np.savez(handle, **kept)
    later = [mbo("A", "A", 2, 101, 1), mbo("C", "B", 1, 100, 5), mbo("R", "N", 3, 0, 0), mbo("A", "B", 4, 99, 1)]
    stem = place(tmp_path, "GLBX.MDP3", 2, stamped_segment([*mappings(), *later], 20))
    summary = run_job(tmp_path, "pips")
    rows = read_table(tmp_path, "GLBX.MDP3", "level2", stem, ["order_id", "best_bid", "book_valid"])
    assert rows == [(2, None, False), (3, None, True), (4, 99 * 10**9, True)]  # the cancel of order 1: unknown
    assert summary.counts["mbo_order_map_lost"] == 1 and summary.counts["mbo_unknown_order"] == 1


def test_ts_out_sessions_get_a_ts_out_column(tmp_path: Path) -> None:
    """With ts_out every record is 8 bytes longer; the column is kept in every table."""
    ts = 1_767_225_600_000_000_000
    header = dbn.Metadata("GLBX.MDP3", 0, None, dbn.SType.INSTRUMENT_ID, None, ts_out=True).encode()
    maps = [dbn.SymbolMappingMsg(0, 101, 0, dbn.SType.RAW_SYMBOL, "ESM6", dbn.SType.INSTRUMENT_ID, "ESM6",
                                 2**64 - 1, 2**64 - 1, ts_out=ts)]  # fmt: skip
    trade = dbn.TradeMsg(1, 101, ts, 10**12, 2, dbn.Action.TRADE, dbn.Side.ASK, 0, ts + 1, ts_out=ts + 7)
    add = dbn.MBOMsg(1, 101, ts, 5, 10**12, 3, dbn.Action.ADD, dbn.Side.BID, ts + 2, ts_out=ts + 9)
    assert len(bytes(add)) == 64
    cctx = zstandard.ZstdCompressor()
    body = b"".join(bytes(r) for r in [*maps, trade, add])
    stem = place(tmp_path, "GLBX.MDP3", 1, cctx.compress(header) + stamps_frame([(5, 3, 1)]) + cctx.compress(body))
    run_job(tmp_path, "pips")
    assert read_table(tmp_path, "GLBX.MDP3", "market_trades", stem, ["ts_out", "size", "symbol"]) == [
        (ts + 7, 2, "ESM6")
    ]
    assert read_table(tmp_path, "GLBX.MDP3", "level2", stem, ["ts_out", "size", "ts_local"]) == [(ts + 9, 3, 5)]


# ---- review 14: book validity, datasets, the order map in every checkpoint, bad bytes ---------------

TS = 1_767_225_600_000_000_000


def session_head(
    start: int | None = None, snapshot: bool = False, refill_start: int | None = None, recv: int = 1
) -> list[bytes]:
    """The events the collector writes at a session's head (received at ``recv``): subscribe,
    session, then its gap (``start``: the mbo subscription's; 0 = the gateway's full replay history)."""
    sub = {"schema": "mbo", "symbols": list(SYMBOLS.values()), "stype_in": "raw_symbol", "start": start,
           "snapshot": snapshot, "id": 0}  # fmt: skip
    return [
        event_frame(recv, 1, "subscribe", sub),
        event_frame(recv, 1, "session", {"session_id": "s"}),
        event_frame(recv, 1, "gap", {"last_ts_event": None, "refill_start": refill_start, "reason": "start"}),
    ]


def add(iid: int, oid: int, side: str, price: int, size: int = 5, action: str = "A", flags: int = 0) -> Any:
    return dbn.MBOMsg(1, iid, TS + oid, oid, price * 10**9, size, dbn.Action(action), dbn.Side(side), TS + oid,
                      flags=flags)  # fmt: skip


def flushes(dataset: str, parts: list[list[bytes] | list[Any]]) -> bytes:
    """A segment of ``dataset``: its header, then each part in order: a list of event frames
    (bytes) or a list of records (one stamped flush)."""
    cctx = zstandard.ZstdCompressor()
    out = [cctx.compress(dbn.Metadata(dataset, 0, None, dbn.SType.INSTRUMENT_ID, None).encode())]
    for local, part in enumerate(parts, 1):
        if part and isinstance(part[0], bytes):
            out += part
        else:
            out += [stamps_frame([(local * 1000, len(part), 1)]), cctx.compress(b"".join(map(bytes, part)))]
    return b"".join(out)


def clear(iid: int) -> Any:
    """A Clear ('R', not a snapshot's): the book is known from here."""
    return add(iid, 0, "N", 0, 0, "R")


def known_book() -> list[Any]:
    """Book 101 made known by a Clear, then a bid at 100 (order 1) and an ask at 101 (order 2)."""
    return [*mappings(), clear(101), add(101, 1, "B", 100), add(101, 2, "A", 101)]


L2_VALID = ["instrument_id", "order_id", "book_valid", "best_bid", "best_ask"]
BID, ASK = 100 * 10**9, 101 * 10**9


def test_the_order_map_survives_a_segment_without_mbo(tmp_path: Path) -> None:
    """A quiet hour (trades only; a bare header) between two MBO segments: its checkpoint keeps the order map,
    so the next process continues the books (review 14, item 1)."""
    place(tmp_path, "GLBX.MDP3", 1, flushes("GLBX.MDP3", [session_head(), known_book()]))
    run_job(tmp_path, "pips")
    trade = dbn.TradeMsg(1, 101, TS + 3, 10**11, 1, dbn.Action.TRADE, dbn.Side.BID, 0, TS + 3)
    place(tmp_path, "GLBX.MDP3", 2, flushes("GLBX.MDP3", [[*mappings(), trade]]))
    run_job(tmp_path, "pips")
    place(tmp_path, "GLBX.MDP3", 3, flushes("GLBX.MDP3", []))  # a header and nothing else
    run_job(tmp_path, "pips")
    stem = place(tmp_path, "GLBX.MDP3", 4, flushes("GLBX.MDP3", [[*mappings(), add(101, 4, "B", 99)]]))
    result = run_cli(tmp_path, "pips")  # another process: the order map from the trades-only checkpoint
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_table(tmp_path, "GLBX.MDP3", "level2", stem, L2_VALID) == [(101, 4, True, BID, ASK)]
    totals = orjson.loads((tmp_path / "processed" / "_state" / "databento.json").read_bytes())["totals"]
    assert "mbo_order_map_lost" not in totals


def test_a_gap_in_one_dataset_leaves_the_others_books_alone(tmp_path: Path) -> None:
    """Books are per (dataset, publisher, instrument): the same ids in another dataset are
    another book, and that dataset's gap does not touch this one's (review 14, item 5)."""
    place(tmp_path, "GLBX.MDP3", 1, flushes("GLBX.MDP3", [session_head(), known_book()]))
    gap = event_frame(5, 1, "gap", {"last_ts_event": None, "refill_start": None, "reason": "reconnect"})
    other = place(tmp_path, "XNAS.ITCH", 2, flushes("XNAS.ITCH", [session_head(), [*mappings(), clear(101),
                                                                                   add(101, 1, "B", 50)],
                                                                  [gap], [add(101, 7, "A", 60)]]))  # fmt: skip
    stem = place(tmp_path, "GLBX.MDP3", 3, flushes("GLBX.MDP3", [[*mappings(), add(101, 3, "B", 99)]]))
    run_job(tmp_path, "pips")
    assert read_table(tmp_path, "XNAS.ITCH", "level2", other, L2_VALID) == [
        (101, 0, True, None, None),
        (101, 1, True, 50 * 10**9, None),  # its own book: GLBX's orders are not in it
        (101, 7, False, 50 * 10**9, 60 * 10**9),
    ]
    assert read_table(tmp_path, "GLBX.MDP3", "level2", stem, L2_VALID) == [(101, 3, True, BID, ASK)]


def instrument_maps() -> list[Any]:
    raw, iidt, undef = dbn.SType.RAW_SYMBOL, dbn.SType.INSTRUMENT_ID, 2**64 - 1
    return [dbn.SymbolMappingMsg(0, 100 + i, 0, raw, f"S{i}", iidt, f"S{i}", undef, undef) for i in range(8)]


def test_a_book_first_seen_mid_stream_is_unknown_whatever_its_slot(tmp_path: Path) -> None:
    """A live session without snapshot or start: books first seen in it are unknown (not only the
    first four slots) until their Clear or a snapshot's F_LAST (review 14, item 6)."""
    first = [add(100 + i, i + 1, "B", 100) for i in range(6)]
    snapshot = [add(104, 20, "N", 0, 0, "R", 32), add(104, 21, "B", 98, 1, flags=32),
                add(104, 22, "A", 102, 1, flags=32 | 128)]  # fmt: skip
    live = flushes("GLBX.MDP3", [session_head(start=None), [*instrument_maps(), *first],
                                 [add(105, 10, "N", 0, 0, "R"), add(105, 11, "B", 97), *snapshot]])  # fmt: skip
    stem = place(tmp_path, "GLBX.MDP3", 1, live)
    run_job(tmp_path, "pips")
    rows = sorted(read_table(tmp_path, "GLBX.MDP3", "level2", stem, ["instrument_id", "order_id", "book_valid"]))
    assert rows == [(100, 1, False), (101, 2, False), (102, 3, False), (103, 4, False), (104, 5, False),
                    (104, 20, False), (104, 21, False), (104, 22, True),  # a snapshot: known at its F_LAST
                    (105, 6, False), (105, 10, True), (105, 11, True)]  # a Clear: known  # fmt: skip
    # the session's next segment (no events): a new book is still unknown; the known ones stay known
    later = place(tmp_path, "GLBX.MDP3", 2, flushes("GLBX.MDP3", [[*instrument_maps(), add(106, 30, "B", 96),
                                                                   add(105, 31, "B", 95)]]))  # fmt: skip
    run_job(tmp_path, "pips")
    assert sorted(read_table(tmp_path, "GLBX.MDP3", "level2", later, ["instrument_id", "book_valid"])) == [
        (105, True),
        (106, False),
    ]


def test_an_overflow_makes_the_books_unknown(tmp_path: Path) -> None:
    """Records dropped on a full queue (``overflow``) are a gap that was never refilled (review 14, item 7)."""
    overflow = event_frame(5, 0, "overflow", {"dropped": 1})  # the dropped record: the cancel of order 1
    stem = place(tmp_path, "GLBX.MDP3", 1, flushes("GLBX.MDP3", [session_head(), [*mappings(), clear(101),
                                                                 add(101, 1, "B", 100)], [overflow],
                                                                 [add(101, 3, "B", 99, 1)]]))  # fmt: skip
    summary = run_job(tmp_path, "pips")
    assert read_table(tmp_path, "GLBX.MDP3", "level2", stem, ["order_id", "book_valid"]) == [(0, True), (1, True),
                                                                                            (3, False)]  # fmt: skip
    assert summary.counts["overflows"] == 1


def test_bytes_that_are_not_utf8_are_replaced_and_counted(tmp_path: Path) -> None:
    """One bad byte in a side, an action or a definition's text must not stall the ETL (review 14, item 8)."""
    trade = bytearray(bytes(dbn.TradeMsg(1, 101, TS, 10**11, 1, dbn.Action.TRADE, dbn.Side.BID, 0, TS)))
    trade[29] = 0xFF  # side
    store = databento.DBNStore.from_file(FIXTURES / "GLBX.MDP3" / "test_data.definition.dbn.zst")
    record = bytearray(bytes(next(iter(store))))
    at = record.find(b"ESH1")
    record[at + 1] = 0xC3  # a lead byte with no continuation
    cctx = zstandard.ZstdCompressor()
    body = b"".join(map(bytes, mappings())) + bytes(trade) + bytes(record)
    header = dbn.Metadata("GLBX.MDP3", 0, None, dbn.SType.INSTRUMENT_ID, None).encode()
    stem = place(tmp_path, "GLBX.MDP3", 1, cctx.compress(header) + stamps_frame([(10, 4, 1)]) + cctx.compress(body))
    summary = run_job(tmp_path, "pips")
    assert summary.segments == 1 and summary.quarantined_segments == 0
    assert read_table(tmp_path, "GLBX.MDP3", "market_trades", stem, ["side", "size"]) == [("\ufffd", 1)]
    raw = read_table(tmp_path, "GLBX.MDP3", "instruments", stem, ["raw_symbol"])
    assert raw == [("E\ufffdH1",)]
    assert summary.counts["invalid_utf8_values"] == 2
    assert not list((tmp_path / "raw" / "processing").rglob("segment_*"))


def test_records_of_another_length_are_counted_as_bad_input(tmp_path: Path) -> None:
    """A record type whose length is not this DBN version's (an older file's definitions) is skipped
    and counted, so the operator sees why a table stayed empty (review 14, item 15)."""
    trade = bytes(dbn.TradeMsg(1, 101, TS, 10**11, 1, dbn.Action.TRADE, dbn.Side.BID, 0, TS))
    longer = bytes([len(trade) // 4 + 4]) + trade[1:] + bytes(16)
    cctx = zstandard.ZstdCompressor()
    body = b"".join(map(bytes, mappings())) + trade + longer
    header = dbn.Metadata("GLBX.MDP3", 0, None, dbn.SType.INSTRUMENT_ID, None).encode()
    place(tmp_path, "GLBX.MDP3", 1, cctx.compress(header) + stamps_frame([(10, 4, 1)]) + cctx.compress(body))
    summary = run_job(tmp_path, "pips")
    assert summary.counts["unexpected_length_records"] == 1
    assert summary.counts["skipped_unexpected_length_rtype_0"] == 1


def test_a_mapping_mid_chunk_names_only_the_records_after_it(tmp_path: Path) -> None:
    """A roll mid-chunk (an id re-mapped to another symbol) names the records after it only; a
    mapping for some days leaves the id's other days as they were (review 14, item 14)."""
    raw, iidt, undef = dbn.SType.RAW_SYMBOL, dbn.SType.INSTRUMENT_ID, 2**64 - 1
    day = 86_400 * 10**9

    def mapping(symbol: str, start: int = undef, end: int = undef) -> Any:
        return dbn.SymbolMappingMsg(0, 101, 0, raw, symbol, iidt, symbol, start, end)

    def trade(ts: int, size: int) -> Any:
        return dbn.TradeMsg(1, 101, ts, 10**11, size, dbn.Action.TRADE, dbn.Side.BID, 0, ts)

    rolled = [mapping("ESM6"), trade(TS, 1), trade(TS + 1, 2), mapping("ESU6"), trade(TS + 2, 3)]
    daily = [mapping("DAY1", TS, TS + day), trade(TS + 10, 4), mapping("DAY2", TS + day, TS + 2 * day),
             trade(TS + day + 10, 5), trade(TS + 11, 6)]  # fmt: skip
    stem = place(tmp_path, "GLBX.MDP3", 1, flushes("GLBX.MDP3", [rolled, daily]))
    run_job(tmp_path, "pips")
    rows = read_table(tmp_path, "GLBX.MDP3", "market_trades", stem, ["size", "symbol"])
    assert sorted(rows) == [(1, "ESM6"), (2, "ESM6"), (3, "ESU6"), (4, "DAY1"), (5, "DAY2"), (6, "DAY1")]


# ---- review 14b: sessions that do not continue the books ---------------------------------------------

L2_ROWS = ["instrument_id", "order_id", "action", "size", "book_valid", "best_bid", "best_ask", "ts_event", "ts_local"]


def test_a_replay_from_start_empties_the_books_with_clear_rows_and_leaves_them_unknown(tmp_path: Path) -> None:
    """``start: 0`` asks for the gateway's whole replay history (GLBX: the weekly session, elsewhere a
    day or less): it may begin mid-stream and it repeats orders the books hold. The dataset's books
    are emptied with a clear row each and stay unknown until a Clear; other datasets' books are
    untouched (review 14b, item 6)."""
    place(tmp_path, "GLBX.MDP3", 1, flushes("GLBX.MDP3", [session_head(), known_book()]))
    place(tmp_path, "XNAS.ITCH", 2, flushes("XNAS.ITCH", [session_head(), known_book()]))
    recv = TS + 10**9
    replay = [*mappings(), add(101, 1, "B", 100), add(202, 5, "A", 200), add(101, 2, "A", 101), clear(202),
              add(202, 6, "B", 199)]  # fmt: skip
    stem = place(tmp_path, "GLBX.MDP3", 3, flushes("GLBX.MDP3", [session_head(start=0, recv=recv), replay]))
    other = place(tmp_path, "XNAS.ITCH", 4, flushes("XNAS.ITCH", [[*mappings(), add(101, 3, "B", 99)]]))
    summary = run_job(tmp_path, "pips")
    assert read_table(tmp_path, "GLBX.MDP3", "level2", stem, L2_ROWS) == [
        (101, 0, "R", 0, False, None, None, recv, recv),  # the clear row: book 101 held levels
        (101, 1, "A", 5, False, BID, None, TS + 1, 2000),  # 5, not 10: the replay is not added onto the old orders
        (101, 2, "A", 5, False, BID, ASK, TS + 2, 2000),
        (202, 5, "A", 5, False, None, 200 * 10**9, TS + 5, 2000),  # first seen in the replay: unknown
        (202, 0, "R", 0, True, None, None, TS, 2000),  # its own Clear: known
        (202, 6, "A", 5, True, 199 * 10**9, None, TS + 6, 2000),
    ]
    assert read_table(tmp_path, "XNAS.ITCH", "level2", other, L2_VALID) == [(101, 3, True, BID, ASK)]
    assert summary.counts["replays_from_start"] == 1 and summary.counts["books_reset"] == 1


def test_a_plain_dbn_file_is_its_own_session(tmp_path: Path) -> None:
    """A plain DBN file (a historical day dropped into ready/) starts from empty books, known only
    after a Clear inside it; after it the live books are empty and unknown, as after a gap: the two
    never share order-map state (review 14b, item 7)."""
    place(tmp_path, "GLBX.MDP3", 1, flushes("GLBX.MDP3", [session_head(), known_book()]))
    day = [*mappings(), add(101, 50, "B", 90), add(101, 1, "B", 100, action="C"), clear(101), add(101, 51, "A", 95)]
    header = dbn.Metadata("GLBX.MDP3", 0, None, dbn.SType.INSTRUMENT_ID, None).encode()
    plain = place(tmp_path, "GLBX.MDP3", 2, zstandard.ZstdCompressor().compress(header + b"".join(map(bytes, day))))
    live = place(tmp_path, "GLBX.MDP3", 3, flushes("GLBX.MDP3", [[*mappings(), add(101, 3, "B", 99)]]))
    summary = run_job(tmp_path, "pips")
    assert read_table(tmp_path, "GLBX.MDP3", "level2", plain, L2_ROWS) == [
        (101, 0, "R", 0, False, None, None, TS, None),  # the live book (bid 100, ask 101) emptied
        (101, 50, "A", 5, False, 90 * 10**9, None, TS + 50, None),  # the live orders are not in the file's book
        (101, 0, "R", 0, True, None, None, TS, None),  # (the cancel of live order 1: an unknown order, no row)
        (101, 51, "A", 5, True, None, 95 * 10**9, TS + 51, None),
        (101, 0, "R", 0, False, None, None, TS + 51, None),  # the file's book closed
    ]
    assert read_table(tmp_path, "GLBX.MDP3", "level2", live, L2_VALID) == [(101, 3, False, 99 * 10**9, None)]
    assert summary.counts["plain_mbo_files"] == 1 and summary.counts["mbo_unknown_order"] == 1


def test_the_dask_backfill_refuses_databento_segments_and_leaves_them_ready(tmp_path: Path) -> None:
    stem = place(tmp_path, "GLBX.MDP3", 1, (FIXTURES / "GLBX.MDP3" / "test_data.trades.dbn.zst").read_bytes())
    config = tmp_path / "config.yaml"
    config.write_text(f"data_dir: {tmp_path}\ncoinbase: {{enabled: false}}\n")
    result = subprocess.run([sys.executable, "-m", "daedalus", "etl", "--config", str(config), "--source", "databento",
                             "--dask", "local:1"], capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "run `daedalus etl` without --dask for databento" in result.stderr
    assert (tmp_path / "raw" / "ready" / "databento" / "GLBX.MDP3" / f"{stem}.dbn.zst").exists()


@pytest.mark.parametrize("home_slot", [0, 1, 2, 7])
def test_an_add_lands_whatever_free_slot_of_the_order_map_it_gets(home_slot: int) -> None:
    """The order map reports a missing key as ``-(free slot) - 1``: for slot 1 that is -2, which the
    add branch once also used as its "done" mark, so an add (or a modify of an unknown order) whose
    probe ended on slot 1 vanished without a row or a counter, and the book lost that order (found
    under load, where the resting orders decide the slot)."""
    from daedalus.etl.book import BookSet
    from daedalus.etl.mbo_book import _home, attach

    mbo = attach(BookSet(), None)
    book = int(mbo.slot_codes("GLBX.MDP3", np.array([1], np.uint16), np.array([42], np.uint32))[0])
    # after a clear the book's generation is 1 and the fresh table has 1,024 slots
    oid = next(o for o in range(1, 10**6) if _home(book, 1, o, 1023) == home_slot)
    clear, add, modify, cancel = (ord(c) for c in "RAMC")
    price, bigger = 100 * 10**9, 101 * 10**9
    records, _known, _frames, result = mbo.apply(
        np.full(4, book, np.int64),
        np.array([0, oid, oid, oid], np.uint64),
        np.array([2**63 - 1, price, bigger, bigger], np.int64),
        np.array([0, 5, 7, 7], np.uint32),
        np.array([clear, add, modify, cancel], np.uint8),
        np.array([ord("N"), ord("B"), ord("B"), ord("B")], np.uint8),
        np.array([0, 128, 128, 128], np.uint8),
    )
    assert records.tolist() == [0, 1, 2, 3]  # each record changed the book and gave its row
    assert result.best_bid.tolist()[1:3] == [price, bigger]
    assert mbo.take_counters() == {"mbo_clears": 1}  # no unknown order, no modify taken as an add
