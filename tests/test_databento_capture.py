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


# -- a tiny gateway (the live raw API's handshake, an MBO tape, replay by ``start``) ----------


def _fields(line: bytes) -> dict[str, str]:
    return dict(token.split("=", 1) for token in line.decode().rstrip("\n").split("|"))


class TinyGateway:
    """Speaks the gateway side of the handshake (greeting, CRAM, auth, subscriptions, start_session),
    then streams a growing MBO tape: each session gets the tape from its subscription's ``start``
    (or from now), so a refill after a disconnect replays exactly what was missed. Kept beside the
    simulator (``daedalus.sim.databento``) for that: one numbered tape makes "no gap, no duplicate"
    an exact assertion."""

    def __init__(self, rate: float = 2000.0, key: str = KEY) -> None:
        self.rate = rate
        self.key = key
        self.tape: list[tuple[int, bytes]] = []  # (ts_event, record bytes)
        self.sessions: list[list[dict[str, str]]] = []  # the subscriptions of each authenticated session
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

    def _record(self, seq: int) -> tuple[int, bytes]:
        instrument = 101 + seq % 2
        ts = T0 + seq * 1000
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
            sequence=seq,
        )
        return ts, bytes(msg)

    async def _produce(self) -> None:
        started = time.monotonic()
        while True:
            due = int((time.monotonic() - started) * self.rate)
            while len(self.tape) < due:
                self.tape.append(self._record(len(self.tape)))
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
        except (ConnectionError, KeyError, asyncio.IncompleteReadError):
            pass

    async def _stream(self, writer: asyncio.StreamWriter, subs: list[dict[str, str]]) -> None:
        metadata = dbn.Metadata(
            dataset=DATASET, start=T0, stype_in=None, stype_out=dbn.SType.INSTRUMENT_ID, schema=None
        )
        head = [metadata.encode()]
        for symbol, instrument in SYMBOLS.items():
            head.append(
                bytes(
                    dbn.SymbolMappingMsg(
                        publisher_id=0,
                        instrument_id=instrument,
                        ts_event=T0,
                        stype_in=dbn.SType.RAW_SYMBOL,
                        stype_in_symbol=symbol,
                        stype_out=dbn.SType.RAW_SYMBOL,
                        stype_out_symbol=symbol,
                        start_ts=T0,
                        end_ts=T0,
                    )
                )
            )
        writer.write(b"".join(head))
        starts = [int(sub["start"]) for sub in subs if "start" in sub]
        cursor = (
            len(self.tape)
            if not starts
            else next((i for i, (ts, _) in enumerate(self.tape) if ts >= min(starts)), len(self.tape))
        )
        quiet_since = time.monotonic()
        while not writer.is_closing():
            end = len(self.tape)
            if cursor < end:
                writer.write(b"".join(record for _, record in self.tape[cursor:end]))
                cursor = end
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
    assert [e["reason"] for e in events if e["event"] == "gap"] == ["start", "start"]  # each run: not continuous


# -- recovery ------------------------------------------------------------------------------------


def mbo(seq: int) -> bytes:
    return bytes(
        dbn.MBOMsg(
            publisher_id=1,
            instrument_id=101,
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


def mapping(symbol: str, instrument: int) -> bytes:
    return bytes(
        dbn.SymbolMappingMsg(
            publisher_id=0,
            instrument_id=instrument,
            ts_event=T0,
            stype_in=dbn.SType.RAW_SYMBOL,
            stype_in_symbol=symbol,
            stype_out=dbn.SType.RAW_SYMBOL,
            stype_out_symbol=symbol,
            start_ts=T0,
            end_ts=T0,
        )
    )


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
    for seq in range(101, 2000):
        while not writer.has_room():
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


@pytest.mark.parametrize("refill", [True, False])
async def test_reconnect_writes_a_gap_and_refills_from_the_last_record(tmp_path, refill):
    async with TinyGateway(rate=1000) as gateway:
        capture, task = await run_collector(tmp_path, gateway.port, reconnect_refill=refill)
        collector: DatabentoCollector = capture.collectors[0]
        await wait_until(lambda: collector.stats.records > 200, what="records")
        gateway.disconnect()
        await wait_until(lambda: len(gateway.sessions) == 2, what="the reconnect")
        seen = len(gateway.tape)
        await wait_until(
            lambda: collector.stats.last_ts_event and collector.stats.last_ts_event > T0 + seen * 1000,
            what="live records after the reconnect",
        )
        await stop_collector(capture, task)
    records, _local, conn, events = read_all(segments(tmp_path))
    start, gap = [e for e in events if e["event"] == "gap"]
    assert start == {**start, "reason": "start", "last_ts_event": None, "refill_start": None}  # a new process
    assert gap["reason"] == "reconnect"
    second = gateway.sessions[1][0]
    if refill:
        assert gap["refill_start"] == gap["last_ts_event"] + 1 == int(second["start"])
    else:
        assert gap["refill_start"] is None and "start" not in second
    seqs = mbo_sequences(records, conn)
    assert len(seqs) == len(set(seqs))
    if refill:  # the replay filled the gap exactly: one unbroken run of the tape
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    else:
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
        every = {*wanted, f"{DATASET}:NQM6"}  # NQM6: only under ALL_SYMBOLS, named by its own symbol
        await wait_until(lambda: every <= set(capture.heartbeat()[2]), what="every product in the heartbeat")
        products = capture.heartbeat()[2]
        await stop_collector(capture, task)
    newest = max(products[f"{DATASET}:{symbol}"]["last_time"] for symbol in ("ESM6", "NQM6"))
    assert products[f"{DATASET}:ALL_SYMBOLS"]["last_time"] == newest
