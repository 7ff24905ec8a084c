"""Databento capture: the official client's protocol against a gateway on 127.0.0.1, DBN segments
with receive stamps, crash recovery, reconnect with refill, a bad key."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import databento
import databento_dbn as dbn
import numpy as np
import orjson
import pytest
import yaml
import zstandard

from daedalus.capture.databento_capture import DatabentoCapture
from daedalus.capture.databento_collector import DatabentoCollector
from daedalus.config import IngestionConfig, parse_config
from daedalus.layout import DataLayout
from daedalus.sim.databento.gateway import TEST_API_KEY, DatabentoGateway, GatewayConfig
from daedalus.sources import databento_raw
from daedalus.sources.databento_raw import (
    DbnSegmentWriter,
    event_frame,
    open_dbn_segment,
    recover_dbn_active,
    split_dbn_segment,
    stamps_frame,
)
from tests.capture_helpers import FullDisk
from tests.capture_helpers import events as log_events
from tests.conftest import REPO

KEY = "db-" + "A" * 24 + "R2v7T"
DATASET = "GLBX.MDP3"
SYMBOLS = {"ESM6": 101, "NQM6": 102}
FIXTURES = REPO.parent / "shared" / "data" / "databento"
T0 = 1_780_000_000_000_000_000
BAR_EVERY = 40  # TinyGateway: events per ohlcv-1s bar
F_LAST = 128


# -- a tiny gateway (the live raw API's handshake, an MBO tape, replay by ``start``) ----------


def _fields(line: bytes) -> dict[str, str]:
    return dict(token.split("=", 1) for token in line.decode().rstrip("\n").split("|"))


def mapping(symbol: str, instrument: int, out: str | None = None) -> bytes:
    """A SymbolMappingMsg: ``symbol`` as subscribed resolved to ``instrument`` (named ``out``)."""
    return bytes(
        dbn.SymbolMappingMsg(
            publisher_id=0,
            instrument_id=instrument,
            ts_event=T0,
            stype_in=dbn.SType.RAW_SYMBOL,
            stype_in_symbol=symbol,
            stype_out=dbn.SType.RAW_SYMBOL,
            stype_out_symbol=out or symbol,
            start_ts=2**64 - 1,  # as the live gateway sends them (UNDEF)
            end_ts=2**64 - 1,
        )
    )


class TinyGateway:
    """Speaks the gateway side of the handshake (greeting, CRAM, auth, subscriptions, start_session),
    then streams a growing tape of events: each event's records share its ``ts_event`` (a trade on
    every 4th, then 1-3 MBO records with ``F_LAST`` on the last) and every :data:`BAR_EVERY` events an
    ``ohlcv-1s`` bar whose ``ts_event`` is its open, earlier than the records around it. A session gets
    its subscribed schemas, from now, or for a subscription with ``start`` the tape's records of that
    schema with ``ts_event >= start`` (Databento's replay filter), in tape order. Kept beside the
    simulator (``daedalus.sim.databento``) for that: one numbered tape makes "no gap, no duplicate" an
    exact assertion. ``cut(kind)`` ends the session gracefully right after a chosen record;
    ``refuse`` makes it turn down every replay (``"error"``: REPLAY_DATA_AGED_OUT; ``"silent"``:
    hang up with no record); ``snapshots=False`` answers a snapshot with INVALID_SUBSCRIPTION (as
    datasets without live snapshots, and the simulator); ``skew`` stamps instrument 102's events that
    many ns earlier, so ``ts_event`` goes backwards between the two instruments in tape order."""

    def __init__(self, rate: float = 2000.0, key: str = KEY, skew: int = 0) -> None:
        self.rate = rate  # events per second
        self.paused = False  # a quiet market: no new event
        self.key = key
        self.skew = skew
        self.snapshots = True
        self.tape: list[tuple[int, str, bytes]] = []  # (ts_event, schema, record bytes)
        self.sessions: list[list[dict[str, str]]] = []  # the subscriptions of each authenticated session
        self.cut_at: int | None = None  # tape index of the last record sent before a cut
        self.refuse: str | None = None
        self._cut: Any = None  # a predicate on (schema, record): end the session right after it
        self._events = 0
        self._mbo = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> TinyGateway:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self._tasks.append(asyncio.create_task(self._produce()))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        self.disconnect()
        self.server.close()

    def inject(self, data: bytes) -> None:
        """Send ``data`` (whole DBN records) to every streaming session now."""
        for writer in self._writers:
            writer.write(data)

    def disconnect(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    def cut(self, kind: str) -> None:
        """End the streaming session right after the next record matching ``kind``:
        ``mid_event`` (an MBO record without F_LAST) or ``after_bar`` (an ohlcv bar)."""
        self._cut = {
            "mid_event": lambda schema, record: schema == "mbo" and not record[36] & F_LAST,
            "after_bar": lambda schema, record: schema == "ohlcv-1s",
        }[kind]

    def _add_event(self) -> None:
        i = self._events
        self._events += 1
        instrument = 101 + i % 2
        ts = T0 + i * 1000 - (self.skew if instrument == 102 else 0)
        if i % 4 == 0:
            trade = dbn.TradeMsg(
                publisher_id=1,
                instrument_id=instrument,
                ts_event=ts,
                price=5000 * 10**9,
                size=1,
                action=dbn.Action.TRADE,
                side=dbn.Side.ASK,
                depth=0,
                ts_recv=ts + 10,
                sequence=i,
            )
            self.tape.append((ts, "trades", bytes(trade)))
        count = 1 + i % 3
        for k in range(count):
            seq = self._mbo
            self._mbo += 1
            msg = dbn.MBOMsg(
                publisher_id=1,
                instrument_id=instrument,
                ts_event=ts,
                order_id=seq,
                price=(5000 + seq % 7) * 10**9,
                size=1 + seq % 3,
                action=dbn.Action.ADD,
                side=dbn.Side.BID,
                ts_recv=ts + 10,
                flags=F_LAST if k == count - 1 else 0,
                sequence=seq,
            )
            self.tape.append((ts, "mbo", bytes(msg)))
        if i % BAR_EVERY == BAR_EVERY - 1:  # the bar of the last BAR_EVERY events, stamped with its open
            opened = ts - (BAR_EVERY - 1) * 1000
            bar = dbn.OHLCVMsg(
                rtype=dbn.RType.OHLCV_1S,
                publisher_id=1,
                instrument_id=101,
                ts_event=opened,
                open=5000 * 10**9,
                high=5006 * 10**9,
                low=5000 * 10**9,
                close=5003 * 10**9,
                volume=i,
            )
            self.tape.append((opened, "ohlcv-1s", bytes(bar)))

    async def _produce(self) -> None:
        started = time.monotonic()
        while True:
            due = int((time.monotonic() - started) * self.rate)
            while self._events < due and not self.paused:
                self._add_event()
            if self.paused:
                started = time.monotonic() - self._events / self.rate
            await asyncio.sleep(0.005)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            challenge = "t7kNhwj4xqR0QYjzFKtBEG2ec2pXJ4FK"
            writer.write(f"lsg_version=0.4.2\ncram={challenge}\n".encode())
            auth = _fields(await reader.readline())["auth"]
            expected = hashlib.sha256(f"{challenge}|{self.key}".encode()).hexdigest() + "-" + self.key[-5:]
            if auth != expected:
                writer.write(b"success=0|error=Authentication failed.\n")
                await writer.drain()
                writer.close()
                return
            writer.write(f"success=1|session_id={len(self.sessions) + 1}\n".encode())
            subs = []
            while not (line := await reader.readline()).startswith(b"start_session"):
                subs.append(_fields(line))
            self.sessions.append(subs)
            self._writers.append(writer)
            await self._stream(writer, subs)
        except (ConnectionError, KeyError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client left, or the test ended

    def _head(self, subs: list[dict[str, str]]) -> bytes:
        """Metadata, then a mapping per subscribed symbol and instrument (as the gateway sends them:
        ALL_SYMBOLS names every instrument; the parent ES.FUT resolves to ESM6)."""
        metadata = dbn.Metadata(
            dataset=DATASET, start=T0, stype_in=None, stype_out=dbn.SType.INSTRUMENT_ID, schema=None
        )
        mappings: dict[bytes, None] = {}
        for sub in subs:
            for symbol in sub["symbols"].split(","):
                if symbol == "ALL_SYMBOLS":
                    mappings.update(dict.fromkeys(mapping(symbol, iid, name) for name, iid in SYMBOLS.items()))
                elif symbol == "ES.FUT":
                    mappings[mapping(symbol, SYMBOLS["ESM6"], "ESM6")] = None
                elif symbol in SYMBOLS:
                    mappings[mapping(symbol, SYMBOLS[symbol])] = None
        return metadata.encode() + b"".join(mappings)

    async def _stream(self, writer: asyncio.StreamWriter, subs: list[dict[str, str]]) -> None:
        writer.write(self._head(subs))
        starts = {sub["schema"]: int(sub["start"]) if "start" in sub else None for sub in subs}
        if not self.snapshots and any(sub.get("snapshot") == "1" for sub in subs):
            error = dbn.ErrorMsg(ts_event=T0, err="No live snapshot here", code=dbn.ErrorCode.INVALID_SUBSCRIPTION)
            writer.write(bytes(error))
            await writer.drain()
            writer.close()
            return
        if self.refuse and any(start is not None for start in starts.values()):
            if self.refuse == "error":
                aged = dbn.ErrorMsg(ts_event=T0, err="Replay data aged out", code=dbn.ErrorCode.REPLAY_DATA_AGED_OUT)
                writer.write(bytes(aged))
            await writer.drain()
            writer.close()
            return
        live_from = len(self.tape)
        cursor = 0 if any(start is not None for start in starts.values()) else live_from
        quiet_since = time.monotonic()
        while not writer.is_closing():
            end = len(self.tape)
            out = []
            for index in range(cursor, end):
                ts, schema, record = self.tape[index]
                if schema not in starts:
                    continue
                start = starts[schema]
                if index >= live_from or (start is not None and ts >= start):
                    out.append(record)
                    if self._cut is not None and self._cut(schema, record):
                        self._cut, self.cut_at = None, index
                        writer.write(b"".join(out))
                        await writer.drain()
                        self._writers.remove(writer)
                        writer.close()  # graceful: everything written so far reaches the client
                        return
            if cursor < live_from <= end:  # the replay is sent: say so per schema, as the gateway does
                out += [
                    bytes(
                        dbn.SystemMsg(
                            ts_event=T0, msg=f"Finished {schema} replay", code=dbn.SystemCode.REPLAY_COMPLETED
                        )
                    )
                    for schema, start in starts.items()
                    if start is not None
                ]
            cursor = end
            if out:
                writer.write(b"".join(out))
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 1.0:
                writer.write(bytes(dbn.SystemMsg(ts_event=T0, msg="Heartbeat", code=dbn.SystemCode.HEARTBEAT)))
                quiet_since = time.monotonic()
            await writer.drain()
            await asyncio.sleep(0.005)


# -- helpers -------------------------------------------------------------------------------------


def config(data: Path, port: int, key: str = KEY, **overrides: Any) -> dict[str, Any]:
    databento_section = {
        "enabled": True,
        "api_key": key,
        "gateway": "127.0.0.1",
        "port": port,
        "heartbeat_interval_s": 5,
        "subscriptions": [{"dataset": DATASET, "schema": "mbo", "symbols": list(SYMBOLS)}],
    }
    databento_section.update(overrides.pop("databento", {}))
    return {
        "data_dir": str(data),
        "coinbase": {"enabled": False},
        "databento": databento_section,
        "ingestion": {"flush_interval_seconds": 0.1, "reconnect_delay": 0.05, "max_reconnect_delay": 0.2, **overrides},
    }


def segments(data: Path, state: str = "ready") -> list[Path]:
    folder = data / "raw" / state / "databento" / DATASET
    return sorted(p for p in folder.iterdir() if p.name.startswith("segment_")) if folder.is_dir() else []


def read_all(paths: list[Path]) -> tuple[list[bytes], np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """(records, local_ns, conn, events) of segments in name order, records split one by one."""
    records: list[bytes] = []
    local, conn, events = [], [], []
    for path in paths:
        for chunk in open_dbn_segment(path):
            view, pos = chunk.records, 0
            while pos < len(view):
                records.append(view[pos : pos + view[pos] * 4])
                pos += view[pos] * 4
            local.append(chunk.local_ns)
            conn.append(chunk.conn)
            events += chunk.events
    return records, np.concatenate(local), np.concatenate(conn), events


def mbo_sequences(records: list[bytes], conn: np.ndarray) -> list[int]:
    """Sequence numbers of the MBO records that came off the wire (context records excluded)."""
    return [int.from_bytes(r[52:56], "little") for r, c in zip(records, conn, strict=True) if r[1] == 160 and c]


async def wait_until(condition: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def start_ingest(config_path: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daedalus",
        "ingest",
        "--source",
        "databento",
        "--config",
        str(config_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )


# -- the real ingest process: SIGKILL, restart, clean stop -----------------------------------


async def test_ingest_survives_sigkill_and_every_ready_segment_opens_with_dbnstore(tmp_path):
    """The real ``daedalus ingest`` against the simulator (mbo + trades, two instruments)."""
    data = tmp_path / "data"
    subscriptions = [{"dataset": DATASET, "schema": schema, "symbols": list(SYMBOLS)} for schema in ("mbo", "trades")]
    async with DatabentoGateway(GatewayConfig(rate=2000)) as gateway:
        path = tmp_path / "ingest.yaml"
        settings = config(data, gateway.port, TEST_API_KEY, segment_max_mb=0.02, batch_size=50,
                          databento={"subscriptions": subscriptions})  # fmt: skip
        settings["supervisor"] = {"heartbeat_seconds": 0.2}
        path.write_text(yaml.safe_dump(settings))
        proc = await start_ingest(path)
        await wait_until(lambda: len(segments(data)) >= 2 and segments(data, "active"), what="segments")
        proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), 15) == -signal.SIGKILL
        assert segments(data, "active")  # the killed run left its open segment
        before = gateway.started_sessions
        proc = await start_ingest(path)
        await wait_until(lambda: gateway.started_sessions > before, what="the restarted session")
        ready = len(segments(data))
        await wait_until(lambda: len(segments(data)) > ready + 1, what="segments of the second run")
        heartbeat = data / "run" / "ingest-databento.json"
        await wait_until(lambda: heartbeat.exists() and orjson.loads(heartbeat.read_bytes())["products"], what="beat")
        beat = orjson.loads(heartbeat.read_bytes())
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err.decode()[-3000:]
    assert set(beat["products"]) == {f"{DATASET}:{symbol}" for symbol in SYMBOLS}  # last record time per symbol
    assert beat["counters"]["records_by_schema"][DATASET]["mbo"] > 0
    assert not segments(data, "active")
    paths = segments(data)
    records, local_ns, conn, events = read_all(paths)
    total = 0
    for path in paths:  # Databento's own reader opens every ready segment to its last record
        store = databento.DBNStore.from_file(path)
        total += sum(1 for _ in store)
        assert store.metadata.dataset == DATASET
    assert total == len(records) == len(local_ns) == len(conn)  # one stamp per record
    market = [r for r in records if r[1] not in (21, 22, 23)]  # not the mapping/system/error messages
    assert len(market) > 1000 and len(market) == len(set(market))  # no record twice
    assert {r[1] for r in market} == {160, 0}  # mbo and trades
    live = local_ns[conn > 0]
    assert (np.diff(live) >= 0).all()  # receive times never go back
    assert {e["event"] for e in events} >= {"connect", "subscribe", "session", "disconnect"}
    first, restart = [e for e in events if e["event"] == "gap"]
    assert (first["reason"], first["refill_start"], restart["reason"]) == ("start", None, "start")
    assert restart["refill_start"] is not None  # the second run refilled from the first run's newest segment


# -- recovery ------------------------------------------------------------------------------------


def mbo(seq: int, instrument: int = 101) -> bytes:
    return bytes(
        dbn.MBOMsg(
            publisher_id=1,
            instrument_id=instrument,
            ts_event=T0 + seq,
            order_id=seq,
            price=10**9,
            size=1,
            action=dbn.Action.ADD,
            side=dbn.Side.BID,
            ts_recv=T0 + seq,
            sequence=seq,
        )
    )


def live_metadata() -> bytes:
    return dbn.Metadata(
        dataset=DATASET, start=T0, stype_in=None, stype_out=dbn.SType.INSTRUMENT_ID, schema=None
    ).encode()


def write_segment(layout: DataLayout, count: int, **ingestion: Any) -> DbnSegmentWriter:
    writer = DbnSegmentWriter(layout, DATASET, IngestionConfig(flush_interval_seconds=0.02, **ingestion))
    writer.start()
    writer.put_metadata(time.time_ns(), 1, live_metadata())
    writer.put_control(time.time_ns(), 1, "connect", gateway="127.0.0.1:1")
    for seq in range(count):
        writer.put_records(time.time_ns(), 1, [mbo(seq)])
    assert writer.close()
    return writer


def test_recovery_keeps_whole_pairs_and_quarantines_a_torn_tail(tmp_path):
    layout = DataLayout(tmp_path)
    write_segment(layout, 300)
    [ready] = segments(tmp_path)
    good = ready.read_bytes()
    active = tmp_path / "raw" / "active" / "databento" / DATASET
    torn_pair = stamps_frame([(time.time_ns(), 2, 1)]) + zstandard.ZstdCompressor().compress(mbo(1000) + mbo(1001))
    cut = torn_pair[:-7]  # a flush cut short by the kill
    disconnect = event_frame(time.time_ns(), 1, "disconnect", {})
    (active / ready.name).write_bytes(good + disconnect + cut)
    (active / "segment_20200101T00_00001.dbn.zst").write_bytes(zstandard.ZstdCompressor().compress(b"DBN\x03"))
    ready.unlink()
    report = recover_dbn_active(layout)
    assert report.segments == 1 and report.records_kept == 300
    recovered = segments(tmp_path)
    assert [p.name for p in recovered] == [ready.name]
    assert recovered[0].read_bytes() == good + disconnect  # whole pairs and whole events, no more
    records, _local_ns, _conn, events = read_all(recovered)
    assert len(records) == 300 and events[-1]["event"] == "disconnect"  # the whole event frame is kept
    quarantine = sorted((tmp_path / "raw" / "quarantine" / "databento" / DATASET).iterdir())
    assert [q.read_bytes() for q in quarantine] == [zstandard.ZstdCompressor().compress(b"DBN\x03"), cut]
    assert report.bytes_quarantined == len(cut) + len(quarantine[0].read_bytes())
    assert not segments(tmp_path, "active")


def test_a_pair_whose_records_do_not_match_its_stamps_is_torn(tmp_path):
    data = zstandard.ZstdCompressor().compress(live_metadata())
    pair = stamps_frame([(1, 1, 1)]) + zstandard.ZstdCompressor().compress(mbo(1))
    wrong = stamps_frame([(2, 3, 1)]) + zstandard.ZstdCompressor().compress(mbo(2) + mbo(3))
    good, tail, records = split_dbn_segment(data + pair + wrong)
    assert (good, tail, records) == (data + pair, wrong, 1)


# -- the writer: stamps, context mappings, overflow, rotation ----------------------------------


def test_each_segment_repeats_metadata_and_mappings_and_counts_overflow(tmp_path):
    layout = DataLayout(tmp_path)
    writer = DbnSegmentWriter(
        layout,
        DATASET,
        IngestionConfig(flush_interval_seconds=0.02, segment_max_mb=0.01, batch_size=10, queue_maxsize=100),
    )
    writer.put_metadata(1, 1, live_metadata())
    assert writer.put_records(2, 1, [mapping("ESM6", 101)], [mapping("ESM6", 101)])
    assert writer.put_records(3, 1, [mbo(seq) for seq in range(99)])
    assert not writer.put_records(4, 1, [mbo(99), mbo(100)])  # the queue holds 100 records
    writer.start()
    deadline = time.monotonic() + 20
    for seq in range(101, 2000):
        while not writer.has_room():  # the writer drains the queue: fail, not hang, if it stops
            assert time.monotonic() < deadline, "the writer stopped draining its queue"
            time.sleep(0.001)
        writer.put_records(time.time_ns(), 1, [mbo(seq)])
    assert writer.close()
    paths = segments(tmp_path)
    assert len(paths) > 3
    for path in paths:
        records, _local, conn, _events = read_all([path])
        assert records[0] == mapping("ESM6", 101)  # every segment names its instruments
        assert (conn[0] == 0) == (path != paths[0])  # repeated ones are marked as context
        assert open_dbn_segment(path).metadata == live_metadata()
    records, _local_ns, conn, events = read_all(paths)
    assert mbo_sequences(records, conn) == [*range(99), *range(101, 2000)]
    assert next(e for e in events if e["event"] == "overflow")["dropped"] == 2


def test_a_mapping_arriving_again_does_not_hide_the_instruments_other_mappings(tmp_path):
    """ESM6 is subscribed under its raw symbol and its parent ES.FUT: when only the parent's mapping
    comes again in a later segment, that segment still repeats the raw symbol's (as context)."""
    writer = DbnSegmentWriter(DataLayout(tmp_path), DATASET, IngestionConfig(flush_interval_seconds=0.02))
    raw, parent = mapping("ESM6", 101), mapping("ES.FUT", 101, "ESM6")
    hour = 3600 * 10**9
    writer.put_metadata(T0, 1, live_metadata())
    writer.put_records(T0, 1, [raw, parent], [raw, parent])
    writer.put_records(T0, 1, [mbo(1)])
    writer.put_records(T0 + hour, 1, [parent], [parent])  # a new hour: a new segment
    writer.put_records(T0 + hour, 1, [mbo(2)])
    writer.start()
    assert writer.close()
    _first, second = segments(tmp_path)
    records, _local, conn, _events = read_all([second])
    pairs = list(zip(records, conn.tolist(), strict=True))
    assert (raw, 0) in pairs and (parent, 1) in pairs  # the raw symbol's, repeated; the parent's, as it came
    assert pairs.index((raw, 0)) < pairs.index((mbo(2), 1))


def test_the_overflow_event_stands_where_the_records_were_dropped(tmp_path):
    """Records dropped for a full queue are marked at their place in the stream: the records received
    after the drop come after the ``overflow`` event (the ETL must not take them as from a known book)."""
    ingestion = IngestionConfig(flush_interval_seconds=0.02, batch_size=100, queue_maxsize=100)
    writer = DbnSegmentWriter(DataLayout(tmp_path), DATASET, ingestion)
    writer.put_metadata(1, 1, live_metadata())
    assert writer.put_records(2, 1, [mbo(seq) for seq in range(50)])
    assert not writer.put_records(3, 1, [mbo(seq) for seq in range(50, 110)])  # 60 more do not fit
    assert not writer.put_records(3, 1, [mbo(seq) for seq in range(110, 161)])
    assert writer.put_records(4, 1, [mbo(seq) for seq in range(161, 201)])
    writer.start()
    assert writer.close()
    before: list[int] = []
    for chunk in open_dbn_segment(segments(tmp_path)[0]):
        if any(e["event"] == "overflow" for e in chunk.events):
            assert [e["dropped"] for e in chunk.events if e["event"] == "overflow"] == [111]
            break
        before += [int.from_bytes(chunk.records[i + 52 : i + 56], "little") for i in range(0, len(chunk.records), 56)]
    else:
        raise AssertionError("no overflow event")
    assert before == list(range(50))


def test_records_the_writer_did_not_take_are_not_dropped_from_a_refill():
    tracker = databento_raw.RefillTracker(floor_ns=10**9)
    records = [mbo(seq) for seq in range(5)]
    assert all(tracker.admit(160, r) for r in records)
    tracker.forget(records[3:])  # the writer's queue was full
    tracker.arm({160: 0})
    assert [tracker.admit(160, r) for r in records] == [False, False, False, True, True]


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # inside DBNStore.to_df (pandas 3.1)
def test_a_segment_names_only_its_own_instruments_just_before_their_first_record(tmp_path):
    """A whole dataset's mappings (OPRA: ~1.5M) are not repeated at the head of every segment: a
    later segment holds the mappings of the instruments it has records of, each just before the
    instrument's first record there."""
    ingestion = IngestionConfig(flush_interval_seconds=0.02, segment_max_mb=0.01, batch_size=10)
    writer = DbnSegmentWriter(DataLayout(tmp_path), DATASET, ingestion)
    names = {101 + n: f"SYM{n}" for n in range(50)}
    mappings = [mapping(symbol, instrument) for instrument, symbol in names.items()]
    writer.put_metadata(time.time_ns(), 1, live_metadata())
    writer.put_records(time.time_ns(), 1, mappings, mappings)
    writer.start()
    deadline = time.monotonic() + 20
    for seq in range(3000):  # instrument 101 throughout, 102 now and then
        writer.put_records(time.time_ns(), 1, [mbo(seq, 102 if seq % 100 == 99 else 101)])
        while seq % 100 == 99 and writer.queue_depth:  # flushed: segments fill and rotate
            assert time.monotonic() < deadline, "the writer stopped draining its queue"
            time.sleep(0.002)
    assert writer.close()
    paths = segments(tmp_path)
    assert len(paths) > 3
    for path in paths[1:]:
        records, _local, conn, _events = read_all([path])
        context = [r for r, c in zip(records, conn, strict=True) if not c]
        traded = {int.from_bytes(r[4:8], "little") for r in records if r[1] == 160}
        assert context == [mapping(names[i], i) for i in sorted(traded, key=lambda i: firsts(records)[i])]
        for instrument in traded:  # named before its first record
            assert records.index(mapping(names[instrument], instrument)) < firsts(records)[instrument]
        store = databento.DBNStore.from_file(path)
        assert set(store.to_df(schema="mbo")["symbol"]) == {names[i] for i in traded}  # Databento's reader names them
    assert writer.stats.written == 50 + 3000  # repeated context records are not counted as written


def firsts(records: list[bytes]) -> dict[int, int]:
    """instrument -> index of its first MBO record."""
    out: dict[int, int] = {}
    for index, record in enumerate(records):
        if record[1] == 160:
            out.setdefault(int.from_bytes(record[4:8], "little"), index)
    return out


def test_reader_reads_databento_files_without_stamps(tmp_path):
    for path in sorted(FIXTURES.glob("*/*.dbn.zst")):
        expected = b"".join(bytes(r) for r in databento.DBNStore.from_file(path))
        chunks = list(open_dbn_segment(path))
        assert b"".join(c.records for c in chunks) == expected, path
        assert all(c.local_ns is None and c.conn is None for c in chunks)
        plain = tmp_path / path.name.removesuffix(".zst")
        plain.write_bytes(zstandard.ZstdDecompressor().stream_reader(io.BytesIO(path.read_bytes())).read())
        assert b"".join(c.records for c in open_dbn_segment(plain)) == expected
        assert open_dbn_segment(plain).metadata == open_dbn_segment(path).metadata


# -- reconnect, refill, bad key (collector in process) -----------------------------------------


async def run_collector(tmp_path: Path, port: int, key: str = KEY, ingestion: dict[str, Any] | None = None,
                        start_writer: bool = True, **databento_overrides: Any):  # fmt: skip
    settings = parse_config(config(tmp_path, port, key, databento=databento_overrides, **(ingestion or {})))
    capture = DatabentoCapture(settings, time.time_ns)
    if start_writer:
        capture.raw.start()
    task = asyncio.create_task(capture.collectors[0].run())
    return capture, task


async def stop_collector(capture: DatabentoCapture, task: asyncio.Task[None]) -> None:
    await capture.stop()
    await asyncio.wait_for(task, 10)
    assert await asyncio.to_thread(capture.raw.close, 10)


THREE_SCHEMAS = [{"dataset": DATASET, "schema": s, "symbols": list(SYMBOLS)} for s in ("mbo", "trades", "ohlcv-1s")]


def market(records: list[bytes], conn: np.ndarray) -> list[bytes]:
    """The market records that came off the wire (not mappings, system or error messages)."""
    return [r for r, c in zip(records, conn, strict=True) if c and r[1] not in (21, 22, 23)]


def ts_event(record: bytes) -> int:
    return int.from_bytes(record[8:16], "little")


@pytest.mark.parametrize("cut", ["mid_event", "after_bar"])
async def test_a_refill_starts_each_schema_from_its_own_last_event_and_drops_what_was_written(tmp_path, cut):
    """The gateway hangs up inside an event (the rest of its records share its ts_event) or right
    after a bar (whose ts_event, its open, is older than the trades and orders before it): each
    subscription refills from its own schema's last ts_event and the capture is the tape, whole,
    each record once."""
    async with TinyGateway(rate=1000) as gateway:
        capture, task = await run_collector(tmp_path, gateway.port, subscriptions=THREE_SCHEMAS)
        collector: DatabentoCollector = capture.collectors[0]
        await wait_until(lambda: collector.stats.rtypes[32] >= 1, what="a bar")
        gateway.cut(cut)
        await wait_until(lambda: len(gateway.sessions) == 2, what="the reconnect")
        cut_at = gateway.cut_at
        await wait_until(lambda: collector.stats.rtypes[32] >= 3, what="bars after the reconnect")
        counters, _gauges, _products = capture.heartbeat()
        await stop_collector(capture, task)
    records, _local, conn, events = read_all(segments(tmp_path))
    captured = market(records, conn)
    index = {record: i for i, (_ts, _schema, record) in enumerate(gateway.tape)}
    positions = [index[r] for r in captured]
    assert positions == list(range(positions[0], positions[0] + len(positions)))  # the tape, no gap, no repeat
    before = [r for r in captured if index[r] <= cut_at]  # what the first session wrote
    newest = {rtype: max(ts_event(r) for r in before if r[1] == rtype) for rtype in (160, 0, 32)}
    starts = {sub["schema"]: int(sub["start"]) for sub in gateway.sessions[1]}
    floor = databento_raw.REFILL_FLOOR_NS  # the tape's ts_event never goes back: the floor
    assert starts == {"mbo": newest[160] - floor, "trades": newest[0] - floor, "ohlcv-1s": newest[32] - floor}
    assert len({starts["mbo"], starts["trades"], starts["ohlcv-1s"]}) > 1 or cut == "mid_event"
    [gap] = [e for e in events if e["event"] == "gap" and e["reason"] == "reconnect"]
    assert gap["refill_start"] == min(starts.values())
    assert gap["last_ts_events"] == {"trades": newest[0], "mbo": newest[160], "ohlcv-1s": newest[32]}
    assert (
        counters["duplicates_dropped"][DATASET] == collector.tracker.dropped > 0
    )  # the replayed records written before


async def test_a_restart_refills_from_the_newest_segment_an_earlier_run_left(tmp_path):
    """The last ts_event per schema is not only in memory: a new process reads it from the newest
    segment, refills each subscription from it, and the two runs together are the tape, whole."""
    async with TinyGateway(rate=1000) as gateway:
        for run in (1, 2):
            capture, task = await run_collector(tmp_path, gateway.port, subscriptions=THREE_SCHEMAS)
            collector: DatabentoCollector = capture.collectors[0]
            await wait_until(lambda c=collector: c.stats.rtypes[32] >= 2, what=f"bars of run {run}")
            await stop_collector(capture, task)
            if run == 1:
                records, _local, conn, _events = read_all(segments(tmp_path))
                first_run = market(records, conn)
    records, _local, conn, events = read_all(segments(tmp_path))
    index = {record: i for i, (_ts, _schema, record) in enumerate(gateway.tape)}
    positions = [index[r] for r in market(records, conn)]
    assert positions == list(range(positions[0], positions[0] + len(positions)))  # no gap, no repeat
    newest = {rtype: max(ts_event(r) for r in first_run if r[1] == rtype) for rtype in (160, 0, 32)}
    starts = {sub["schema"]: int(sub["start"]) for sub in gateway.sessions[1]}
    floor = databento_raw.REFILL_FLOOR_NS
    assert starts == {"mbo": newest[160] - floor, "trades": newest[0] - floor, "ohlcv-1s": newest[32] - floor}
    restart = [e for e in events if e["event"] == "gap"][1]
    assert restart["reason"] == "start" and restart["refill_start"] == min(starts.values())
    assert collector.stats.duplicates_dropped > 0


@pytest.mark.parametrize("after", ["reconnect", "restart"])
async def test_a_refill_reaching_back_before_capture_began_drops_what_was_never_captured(tmp_path, after):
    """The tape ran before the collector subscribed (a busy machine connects late): the refill's
    floor reaches back past the capture's first record, so the replay first sends records that were
    never captured. They are dropped (counted), not written after newer ones: the capture stays the
    tape from where it began, each record once, after a reconnect and after a restart (state file)."""
    async with TinyGateway(rate=1000) as gateway:
        await wait_until(lambda: len(gateway.tape) >= 100, what="a tape before the capture")
        for run in (1, 2) if after == "restart" else (1,):
            capture, task = await run_collector(tmp_path, gateway.port, subscriptions=THREE_SCHEMAS)
            collector: DatabentoCollector = capture.collectors[0]
            await wait_until(lambda c=collector: c.stats.rtypes[32] >= 1, what=f"a bar of run {run}")
            if after == "reconnect":
                gateway.cut("mid_event")
                await wait_until(lambda: len(gateway.sessions) == 2, what="the reconnect")
                await wait_until(lambda c=collector: c.stats.rtypes[32] >= 3, what="bars after the reconnect")
            elif run == 2:
                await wait_until(lambda c=collector: c.stats.rtypes[32] >= 2, what="bars of the restart")
            counters, _gauges, _products = capture.heartbeat()
            await stop_collector(capture, task)
    records, _local, conn, _events = read_all(segments(tmp_path))
    index = {record: i for i, (_ts, _schema, record) in enumerate(gateway.tape)}
    positions = [index[r] for r in market(records, conn)]
    assert positions[0] >= 100  # capture began after the tape did
    assert positions == list(range(positions[0], positions[0] + len(positions)))  # the tape, no gap, no repeat
    assert min(int(sub["start"]) for sub in gateway.sessions[1]) <= gateway.tape[0][0]  # the refill reached back
    assert counters["refill_before_capture"][DATASET] == collector.tracker.early == positions[0]  # all of them
    assert collector.stats.duplicates_dropped == collector.tracker.dropped > 0


def test_only_a_window_holding_capture_from_its_start_drops_replayed_records_before_it():
    """A replayed record not in the window is taken as from before capture began only while the window
    holds every record since then (``whole``, kept in the state file), only until the first one
    recognised, and never above the newest ts_event captured."""
    captured = [mbo(seq) for seq in range(10, 20)]
    earlier, later = [mbo(seq) for seq in range(10)], [mbo(seq) for seq in range(20, 25)]
    tracker = databento_raw.RefillTracker(floor_ns=10**9)
    assert all(tracker.admit(160, r) for r in captured)
    state = tracker.state()
    assert state["rtypes"]["160"]["whole"]
    for loaded in (tracker, databento_raw.RefillTracker(floor_ns=10**9)):
        loaded.load(state)
        loaded.arm({160: 0})
        admitted = [r for r in [*earlier, *captured, *later] if loaded.admit(160, r)]
        assert admitted == later and loaded.early == 10 and loaded.dropped == 10
    trimmed = databento_raw.RefillTracker(floor_ns=5)  # the window lost the capture's first records
    assert all(trimmed.admit(160, r) for r in captured)
    assert not trimmed.state()["rtypes"]["160"]["whole"]
    trimmed.arm({160: 0})
    admitted = [r for r in [*earlier, *captured, *later] if trimmed.admit(160, r)]
    assert admitted == [*earlier, *captured[:4], *later] and trimmed.early == 0  # as before: written
    older = databento_raw.RefillTracker(floor_ns=10**9)
    older.load({"rtypes": {k: {f: v for f, v in e.items() if f != "whole"} for k, e in state["rtypes"].items()}})
    older.arm({160: 0})
    assert [older.admit(160, r) for r in earlier[:2]] == [True, True]  # a state file without "whole": unknown


async def test_a_restart_that_cannot_refill_mbo_leaves_the_gap_open(tmp_path):
    """The earlier run's newest segment has trades but no mbo record: trades refill, mbo can only go
    live (no snapshot asked), so the gap stays open (refill_start null) and the ETL's books wait."""
    async with TinyGateway(rate=1000) as gateway:
        for run, subscriptions in ((1, THREE_SCHEMAS[1:2]), (2, THREE_SCHEMAS[:2])):
            capture, task = await run_collector(tmp_path, gateway.port, subscriptions=subscriptions)
            collector: DatabentoCollector = capture.collectors[0]
            await wait_until(lambda c=collector: c.stats.rtypes[0] >= 5, what=f"trades of run {run}")
            await stop_collector(capture, task)
    _records, _local, _conn, events = read_all(segments(tmp_path))
    restart = [e for e in events if e["event"] == "gap"][1]
    assert restart["refill_start"] is None
    assert [("start" in sub, sub["snapshot"]) for sub in gateway.sessions[1]] == [(False, "0"), (True, "0")]


@pytest.mark.parametrize("refusal", ["error", "silent"])
async def test_a_refused_refill_goes_live_with_a_snapshot_and_keeps_the_gap(tmp_path, refusal):
    """After an outage longer than the gateway keeps (REPLAY_DATA_AGED_OUT, or sessions that end
    with nothing), asking for the same start again would never end: capture goes live-only, the
    mbo subscription with a snapshot, and the gap stays (refill_start null)."""
    async with TinyGateway(rate=1000) as gateway:
        capture, task = await run_collector(tmp_path, gateway.port, subscriptions=THREE_SCHEMAS[:2])
        collector: DatabentoCollector = capture.collectors[0]
        await wait_until(lambda: collector.stats.records > 100, what="records")
        gateway.refuse = refusal
        gateway.disconnect()
        await wait_until(lambda: collector.stats.refills_refused == 1, what="the refill given up")
        records_then = collector.stats.records
        await wait_until(lambda: collector.stats.records > records_then + 100, what="live records again")
        counters, _gauges, _products = capture.heartbeat()
        await stop_collector(capture, task)
    live = next(i for i, session in enumerate(gateway.sessions) if i and not any("start" in s for s in session))
    refused = gateway.sessions[1:live]
    assert len(refused) == (1 if refusal == "error" else 2)
    assert all("start" in sub for session in refused for sub in session)  # each asked for a replay
    assert [(s["schema"], "start" in s, s["snapshot"]) for s in gateway.sessions[live]] == [
        ("mbo", False, "1"),
        ("trades", False, "0"),
    ]
    assert counters["refills_refused"][DATASET] == 1
    _records, _local, _conn, events = read_all(segments(tmp_path))
    gaps = [e for e in events if e["event"] == "gap"]
    assert gaps[-1]["refill_start"] is None and "refill refused" in gaps[-1]["reason"]
    assert all(g["refill_start"] is not None for g in gaps[1:-1])  # the refused tries


async def test_ts_event_going_backwards_is_refilled_from_the_largest_step_back(tmp_path, monkeypatch):
    """Two instruments whose ts_event interleave backwards (as CME channels or OPRA publishers): the
    records after the cut with a ts_event below the newest one come again only because the refill asks
    from newest - the largest step back seen (no floor here, to see the step); definitions stay live."""
    monkeypatch.setattr(databento_raw, "REFILL_FLOOR_NS", 0)
    subscriptions = [*THREE_SCHEMAS[:2], {"dataset": DATASET, "schema": "definition", "symbols": list(SYMBOLS)}]
    async with TinyGateway(rate=1000, skew=2500) as gateway:
        capture, task = await run_collector(tmp_path, gateway.port, subscriptions=subscriptions)
        collector: DatabentoCollector = capture.collectors[0]
        await wait_until(lambda: collector.stats.rtypes[160] >= 50, what="orders")
        gateway.cut("mid_event")
        await wait_until(lambda: len(gateway.sessions) == 2, what="the reconnect")
        cut_at = gateway.cut_at
        await wait_until(lambda: collector.stats.rtypes[160] >= 300, what="orders after the reconnect")
        await stop_collector(capture, task)
    records, _local, conn, events = read_all(segments(tmp_path))
    subscribed = [record for _ts, schema, record in gateway.tape if schema in ("mbo", "trades")]
    index = {record: i for i, record in enumerate(subscribed)}
    positions = [index[r] for r in market(records, conn)]
    assert positions == list(range(positions[0], positions[0] + len(positions)))  # the tape, no gap, no repeat
    before = [record for _ts, schema, record in gateway.tape[: cut_at + 1] if schema == "mbo"]
    starts = {sub["schema"]: int(sub["start"]) for sub in gateway.sessions[1] if "start" in sub}
    assert starts["mbo"] == max(map(ts_event, before)) - 1500  # 2500 back from 1000 ahead
    assert "start" not in gateway.sessions[1][2]  # definition: live, never refilled
    [gap] = [e for e in events if e["event"] == "gap" and e["reason"] == "reconnect"]
    assert gap["not_refilled"] == ["definition"] and gap["refill_start"] == min(starts.values())


def test_the_duplicate_window_is_bounded_and_a_replay_past_it_is_written_and_counted():
    """Every record from the refill start on is kept to drop its replay, up to a bound in bytes; a
    replayed record pushed out by the bound cannot be recognised: it is written (admitted) and counted."""
    tracker = databento_raw.RefillTracker(floor_ns=10_000, cap_bytes=56 * 50)
    written = [mbo(seq) for seq in range(300)]
    stamped = [r[:8] + (T0 + i * 100).to_bytes(8, "little") + r[16:] for i, r in enumerate(written)]
    assert all(tracker.admit(160, r) for r in stamped)
    start = tracker.start(160)
    assert start == T0 + 299 * 100 - 10_000
    tracker.arm({160: start})
    replay = [r for r in stamped if ts_event(r) >= start]
    admitted = [r for r in replay if tracker.admit(160, r)]
    assert len(replay) == 101 and admitted == replay[:51]  # the 50 kept are dropped; the older ones written
    assert tracker.unsure == 51 and tracker.dropped == 50


async def test_a_dataset_without_live_snapshots_goes_live_without_one_and_refills_again_later(tmp_path):
    """A refused refill asks for an mbo snapshot; a dataset that has none answers INVALID_SUBSCRIPTION:
    capture goes live without a snapshot (gap kept) instead of asking the same two things forever, and
    once live records came the next reconnect refills again."""
    async with TinyGateway(rate=1000) as gateway:
        gateway.snapshots = False
        capture, task = await run_collector(tmp_path, gateway.port, subscriptions=THREE_SCHEMAS[:2])
        collector: DatabentoCollector = capture.collectors[0]
        await wait_until(lambda: collector.stats.records > 100, what="records")
        gateway.refuse = "error"
        gateway.disconnect()
        await wait_until(lambda: collector.stats.refills_refused == 1, what="the refill given up")
        records_then = collector.stats.records
        await wait_until(lambda: collector.stats.records > records_then + 100, what="live records again")
        live = len(gateway.sessions)
        gateway.refuse = None
        gateway.disconnect()
        await wait_until(lambda: len(gateway.sessions) > live, what="the next reconnect")
        await stop_collector(capture, task)
    asked = [[(s["schema"], "start" in s, s["snapshot"]) for s in session] for session in gateway.sessions]
    assert asked[1:] == [
        [("mbo", True, "0"), ("trades", True, "0")],  # the refill, refused
        [("mbo", False, "1"), ("trades", False, "0")],  # a snapshot: refused too
        [("mbo", False, "0"), ("trades", False, "0")],  # live, the gap kept
        [("mbo", True, "0"), ("trades", True, "0")],  # after live records: a refill again
    ]
    assert collector.stats.refills_refused == 1


async def test_a_restart_refills_from_the_state_file_once_the_etl_deleted_the_segments(tmp_path):
    """The writer keeps a refill state file beside ``.last_segment``: a restart refills from it even when
    every raw segment is gone (etl.after_processing: delete), and a configured ``start: 0`` is not sent
    again (it would capture the whole replay history twice)."""
    subscriptions = [{**sub, "start": 0} for sub in THREE_SCHEMAS[:2]]
    async with TinyGateway(rate=1000) as gateway:
        captured: list[bytes] = []
        for run in (1, 2):
            capture, task = await run_collector(tmp_path, gateway.port, subscriptions=subscriptions)
            collector: DatabentoCollector = capture.collectors[0]
            await wait_until(lambda c=collector: c.stats.rtypes[160] >= 200, what=f"orders of run {run}")
            await stop_collector(capture, task)
            records, _local, conn, _events = read_all(segments(tmp_path))
            run_two = market(records, conn)
            captured += run_two
            for path in segments(tmp_path):  # what the ETL does once it processed them
                path.unlink()
    state = tmp_path / "raw" / "active" / "databento" / DATASET / ".refill_state"
    assert state.is_file() and not list(state.parent.glob("*.tmp"))
    assert [int(sub["start"]) for sub in gateway.sessions[0]] == [0, 0]
    newest = {
        rtype: max(ts_event(r) for r in captured[: len(captured) - len(run_two)] if r[1] == rtype) for rtype in (160, 0)
    }
    floor = databento_raw.REFILL_FLOOR_NS
    assert [int(sub["start"]) for sub in gateway.sessions[1]] == [newest[160] - floor, newest[0] - floor]  # not 0
    subscribed = [record for _ts, schema, record in gateway.tape if schema in ("mbo", "trades")]
    index = {record: i for i, record in enumerate(subscribed)}
    positions = [index[r] for r in captured]
    assert positions == list(range(len(positions)))  # both runs: the tape from its start, no repeat
    assert collector.stats.duplicates_dropped > 0


async def test_a_restart_after_a_crash_between_a_flush_and_its_state_reads_what_came_after(tmp_path):
    """The state file is written after the flush it describes: a crash in between leaves an older state.
    The restart reads the records written after the state's segment offset, so nothing comes twice."""
    state = tmp_path / "raw" / "active" / "databento" / DATASET / ".refill_state"
    async with TinyGateway(rate=1000) as gateway:
        for run in (1, 2):
            capture, task = await run_collector(tmp_path, gateway.port, subscriptions=THREE_SCHEMAS[:2])
            collector: DatabentoCollector = capture.collectors[0]
            await wait_until(lambda c=collector: c.stats.rtypes[160] >= 100 and state.exists(), what="a state")
            older = state.read_bytes()
            written = capture.raw.writer.stats.written
            writer = capture.raw.writer
            await wait_until(lambda w=writer, n=written: w.stats.written > n + 200, what="later flushes")
            await stop_collector(capture, task)
            if run == 1:
                state.write_bytes(older)  # as if the process died before the later state writes
    records, _local, conn, _events = read_all(segments(tmp_path))
    subscribed = [record for _ts, schema, record in gateway.tape if schema in ("mbo", "trades")]
    index = {record: i for i, record in enumerate(subscribed)}
    positions = [index[r] for r in market(records, conn)]
    assert positions == list(range(positions[0], positions[0] + len(positions)))  # no gap, no repeat


async def test_refills_in_a_quiet_market_are_not_taken_for_refusals(tmp_path):
    """Refill sessions that bring no new record (nothing traded) but end with REPLAY_COMPLETED were
    honoured: a flapping link in a quiet market does not make capture give up refills."""
    async with TinyGateway(rate=1000) as gateway:
        capture, task = await run_collector(tmp_path, gateway.port, subscriptions=THREE_SCHEMAS[:2])
        collector: DatabentoCollector = capture.collectors[0]
        await wait_until(lambda: collector.stats.records > 100, what="records")
        gateway.paused = True
        for done in (2, 4, 6):  # three refill sessions, each told its two replays are finished
            gateway.disconnect()
            await wait_until(lambda n=done: collector.stats.replays_completed == n, what="the replays finished")
        await stop_collector(capture, task)
    assert collector.stats.refills_refused == 0
    assert all("start" in sub for session in gateway.sessions[1:] for sub in session)
    assert collector.tracker.replayed == {}  # the duplicate drop is off once each replay is over


async def test_without_reconnect_refill_the_gap_stays(tmp_path):
    async with TinyGateway(rate=1000) as gateway:
        capture, task = await run_collector(tmp_path, gateway.port, reconnect_refill=False)
        collector: DatabentoCollector = capture.collectors[0]
        await wait_until(lambda: collector.stats.records > 200, what="records")
        gateway.disconnect()
        await wait_until(lambda: len(gateway.sessions) == 2, what="the reconnect")
        records_then = collector.stats.records
        await wait_until(lambda: collector.stats.records > records_then + 100, what="live records after the reconnect")
        await stop_collector(capture, task)
    records, _local, conn, events = read_all(segments(tmp_path))
    start, gap = [e for e in events if e["event"] == "gap"]
    assert start == {**start, "reason": "start", "last_ts_event": None, "refill_start": None}  # a new process
    assert gap["reason"] == "reconnect" and gap["refill_start"] is None
    assert "start" not in gateway.sessions[1][0]
    seqs = mbo_sequences(records, conn)
    assert len(seqs) == len(set(seqs))
    assert seqs != list(range(seqs[0], seqs[0] + len(seqs)))  # the gap stays (and is marked)
    assert len({p.name for p in segments(tmp_path)}) >= 2  # the new session began a new segment
    first, *_ = read_all([segments(tmp_path)[-1]])[3]
    assert first["event"] == "connect"


async def test_a_bad_key_is_reported_with_the_gateways_text_and_retried(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    wrong = "db-" + "B" * 24 + "Zz9Q1"
    async with DatabentoGateway(GatewayConfig()) as gateway:  # the simulator's real error text
        capture, task = await run_collector(tmp_path, gateway.port, key=wrong)
        await wait_until(lambda: len(log_events(caplog, "databento_auth_failed")) >= 3, what="retries")
        collector = capture.collectors[0]
        line = capture.status_lines(1.0)[0]
        _counters, gauges, _products = capture.heartbeat()
        await stop_collector(capture, task)
    [first, *_] = log_events(caplog, "databento_auth_failed")
    assert first["error"] == "Authentication failed." and first["key"] == "...Zz9Q1"
    assert "Authentication failed." in line and "auth_failed" in line
    assert gauges["failing"] == {DATASET: 1} and "Authentication failed." in gauges["last_error"][DATASET]
    assert collector.stats.records == 0
    assert wrong not in caplog.text and wrong[:-5] not in line and wrong[:-5] not in orjson.dumps(gauges).decode()
    assert not segments(tmp_path)  # nothing to write without a session


async def test_block_on_a_full_queue_pauses_reading_and_loses_nothing(tmp_path):
    async with TinyGateway(rate=2000) as gateway:
        ingestion = {"on_queue_full": "block", "queue_maxsize": 200, "batch_size": 10}
        capture, task = await run_collector(tmp_path, gateway.port, ingestion=ingestion, start_writer=False)
        collector = capture.collectors[0]
        await wait_until(lambda: collector.stats.read_pauses == 1, what="reading paused")
        assert capture.raw.writer.dropped == 0
        paused_at = collector.stats.records
        assert not collector._session.transport.is_reading()  # the writer is not running: the socket waits
        capture.raw.start()
        await wait_until(lambda: collector.stats.records > paused_at + 500, what="reading resumed")
        await stop_collector(capture, task)
    records, _local, conn, events = read_all(segments(tmp_path))
    seqs = mbo_sequences(records, conn)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # back-pressure, not loss
    assert not [e for e in events if e["event"] == "overflow"]


async def test_records_the_gateway_skipped_for_a_slow_reader_are_marked_as_a_gap(tmp_path):
    async with TinyGateway(rate=1000) as gateway:
        capture, task = await run_collector(tmp_path, gateway.port)
        collector = capture.collectors[0]
        await wait_until(lambda: collector.stats.records > 100, what="records")
        warning = dbn.SystemMsg(ts_event=T0, msg="Slow reader", code=dbn.SystemCode.SLOW_READER_WARNING)
        skipped = dbn.ErrorMsg(ts_event=T0, err="Skipped 42 records after slow reading",
                               code=dbn.ErrorCode.SKIPPED_RECORDS_AFTER_SLOW_READING)  # fmt: skip
        gateway.inject(bytes(warning) + bytes(skipped))
        await wait_until(lambda: collector.stats.slow_reader_warnings == 2, what="the skip reported")
        records_then = collector.stats.records
        await wait_until(lambda: collector.stats.records > records_then + 50, what="records after it")
        await stop_collector(capture, task)
    records, _local, _conn, events = read_all(segments(tmp_path))
    [gap] = [e for e in events if e["event"] == "gap" and e["reason"] != "start"]
    assert gap["refill_start"] is None and gap["reason"] == "Skipped 42 records after slow reading"
    assert gap["last_ts_event"] is not None
    assert [r[1] for r in records if r[1] in (21, 23)][-2:] == [23, 21]  # the gateway's messages are kept too


async def test_an_error_storm_is_one_gap_and_a_few_log_lines(tmp_path, caplog):
    """A gateway repeating its slow-reader skip: every skip is counted, one gap event stands for a
    run of skips with no record between them, and the logs say it once (the rest counted)."""
    caplog.set_level(logging.INFO)
    skipped = bytes(dbn.ErrorMsg(ts_event=T0, err="Skipped records after slow reading",
                                 code=dbn.ErrorCode.SKIPPED_RECORDS_AFTER_SLOW_READING))  # fmt: skip
    warning = bytes(dbn.SystemMsg(ts_event=T0, msg="Slow reader", code=dbn.SystemCode.SLOW_READER_WARNING))
    async with TinyGateway(rate=1000) as gateway:
        capture, task = await run_collector(tmp_path, gateway.port)
        collector = capture.collectors[0]
        await wait_until(lambda: collector.stats.records > 100, what="records")
        gateway.inject((warning + skipped) * 40)
        await wait_until(lambda: collector.stats.gateway_errors == 40, what="the storm")
        records_then = collector.stats.records
        await wait_until(lambda: collector.stats.records > records_then + 50, what="records after it")
        gateway.inject(skipped)
        await wait_until(lambda: collector.stats.gateway_errors == 41, what="one more skip")
        counters = capture.heartbeat()[0]
        await stop_collector(capture, task)
    _records, _local, _conn, events = read_all(segments(tmp_path))
    gaps = [e for e in events if e["event"] == "gap" and e["reason"] != "start"]
    assert len(gaps) == 2  # the storm, then the skip after records came again
    assert counters["skips_merged"][DATASET] == 39 and collector.stats.slow_reader_warnings == 81
    assert len(log_events(caplog, "databento_gateway_error")) == 1  # within LOG_EVERY_S
    assert len(log_events(caplog, "databento_system_msg")) == 1


def test_control_events_wait_in_a_bounded_queue(tmp_path):
    """While the disk stalls, events beyond ``max_events`` are counted, not queued, and written as
    one ``overflow`` event (a gap for the ETL) once the writer runs."""
    writer = DbnSegmentWriter(DataLayout(tmp_path), DATASET, IngestionConfig(flush_interval_seconds=0.02))
    writer.max_events = 20
    writer.put_metadata(time.time_ns(), 1, live_metadata())
    accepted = [writer.put_control(time.time_ns(), 1, "gap", n=n) for n in range(25)]
    assert accepted == [True] * 20 + [False] * 5
    writer.start()
    assert writer.close()
    _records, _local, _conn, events = read_all(segments(tmp_path))
    assert [e["n"] for e in events if e["event"] == "gap"] == list(range(20))
    [overflow] = [e for e in events if e["event"] == "overflow"]
    assert overflow["events_dropped"] == 5 and writer.events_dropped == 5


def test_the_utc_hour_starts_a_new_self_describing_segment(tmp_path):
    hour = 3_600_000_000_000
    now = [T0 // hour * hour + hour - 1]
    writer = DbnSegmentWriter(DataLayout(tmp_path), DATASET, IngestionConfig(flush_interval_seconds=0.02),
                              clock=lambda: now[0])  # fmt: skip
    writer.put_metadata(now[0], 1, live_metadata())
    writer.put_records(now[0], 1, [mapping("ESM6", 101), mbo(0)], [mapping("ESM6", 101)])
    writer.put_records(now[0] + 1, 1, [mbo(1)])  # received in the next hour
    writer.start()
    assert writer.close()
    first, second = segments(tmp_path)
    assert first.name.split("_")[1] < second.name.split("_")[1]  # named after their hours
    records, local_ns, conn, _events = read_all([second])
    assert records == [mapping("ESM6", 101), mbo(1)] and conn.tolist() == [0, 1]
    assert local_ns.tolist() == [now[0], now[0] + 1]  # the context record keeps its own receive time


def test_a_full_disk_is_waited_out_without_losing_or_tearing_records(tmp_path, monkeypatch):
    disk = FullDisk(monkeypatch)
    writer = DbnSegmentWriter(DataLayout(tmp_path), DATASET, IngestionConfig(flush_interval_seconds=0.02))
    writer.put_metadata(time.time_ns(), 1, live_metadata())
    writer.start()
    for seq in range(50):
        writer.put_records(time.time_ns(), 1, [mbo(seq)])
    deadline = time.monotonic() + 10
    while disk.failures < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    disk.full = False
    for seq in range(50, 100):
        writer.put_records(time.time_ns(), 1, [mbo(seq)])
    assert writer.close()
    assert writer.stats.write_errors >= 3 and writer.stats.unwritten == 0
    records, _local, conn, _events = read_all(segments(tmp_path))
    assert mbo_sequences(records, conn) == list(range(100))


async def test_health_sees_every_subscribed_product_in_the_heartbeat(tmp_path):
    """The heartbeat names each product ``products(config)`` asks about: symbols by their mapping,
    and a whole-dataset (ALL_SYMBOLS) subscription by the dataset's newest record."""
    from daedalus.sources import get

    whole, one = {"dataset": DATASET, "schema": "trades"}, {"dataset": DATASET, "schema": "mbo", "symbols": ["ESM6"]}
    subscriptions = [whole, one]
    async with DatabentoGateway(GatewayConfig(symbols=("ESM6", "NQM6"), rate=500)) as gateway:
        capture, task = await run_collector(tmp_path, gateway.port, TEST_API_KEY, subscriptions=subscriptions)
        wanted = get("databento").products(capture.config)
        assert wanted == [f"{DATASET}:ALL_SYMBOLS", f"{DATASET}:ESM6"]
        await wait_until(lambda: set(wanted) <= set(capture.heartbeat()[2]), what="every product in the heartbeat")
        collector: DatabentoCollector = capture.collectors[0]
        await wait_until(lambda: collector.stats.rtypes[0] >= 40, what="trades of both instruments (ALL_SYMBOLS)")
        products = capture.heartbeat()[2]
        await stop_collector(capture, task)
    assert set(products) == set(wanted)  # NQM6, only under ALL_SYMBOLS, is not a product of its own


async def test_an_instrument_under_two_subscribed_symbols_keeps_both_products(tmp_path):
    """ESM6 resolves from the parent ES.FUT and from ALL_SYMBOLS at once: both products stay in the
    heartbeat, and a whole dataset's instruments are not listed one by one (only the configured)."""
    from daedalus.sources import get

    parent = {"dataset": DATASET, "schema": "mbo", "symbols": ["ES.FUT"], "stype_in": "parent"}
    whole = {"dataset": DATASET, "schema": "trades"}
    async with TinyGateway(rate=1000) as gateway:
        capture, task = await run_collector(tmp_path, gateway.port, subscriptions=[parent, whole])
        collector: DatabentoCollector = capture.collectors[0]
        await wait_until(lambda: collector.stats.rtypes[0] > 5 and collector.stats.rtypes[160] > 5, what="records")
        products = capture.heartbeat()[2]
        await stop_collector(capture, task)
    wanted = get("databento").products(capture.config)
    assert sorted(products) == wanted == [f"{DATASET}:ALL_SYMBOLS", f"{DATASET}:ES.FUT"]
    assert collector.stats.instrument_keys == {SYMBOLS["ESM6"]: {"ES.FUT"}}  # no entry per ALL_SYMBOLS instrument
