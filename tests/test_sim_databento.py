"""The Databento gateway simulator against the official ``databento.Live`` client, on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

db = pytest.importorskip("databento")
dbn = pytest.importorskip("databento_dbn")

from daedalus.sim.databento import TEST_API_KEY, DatabentoGateway, GatewayConfig, ThreadedGateway, cram_reply  # noqa: E402
from daedalus.sim.databento.model import UNDEF_PRICE, MarketModel  # noqa: E402

pytestmark = pytest.mark.timeout(30)
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "data" / "databento"
if not FIXTURES.exists():
    FIXTURES = Path("/work/shared/data/databento")


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Collector:
    """Records delivered to the client's callback, thread-safe."""

    def __init__(self, client: Any) -> None:
        self.records: list[Any] = []
        self._lock = threading.Lock()
        client.add_callback(self._add)

    def _add(self, record: Any) -> None:
        with self._lock:
            self.records.append(record)

    def snapshot(self) -> list[Any]:
        with self._lock:
            return list(self.records)

    def of(self, cls: type) -> list[Any]:
        return [r for r in self.snapshot() if isinstance(r, cls)]


def live(tg: ThreadedGateway, **kwargs: Any) -> Any:
    return db.Live(key=kwargs.pop("key", TEST_API_KEY), gateway="127.0.0.1", port=tg.port, **kwargs)


def only_session(tg: ThreadedGateway) -> Any:
    return wait_for(lambda: tg.call(lambda: next(iter(tg.gateway.sessions), None)), what="a session")


def pause_and_drain(tg: ThreadedGateway, session: Any, got: Collector) -> list[bytes]:
    """Stop the market, then wait until the client has every record the session sent."""
    tg.call(tg.gateway.running.clear)
    sent = tg.call(lambda: list(session.sent))
    wait_for(lambda: len(got.snapshot()) >= len(sent), what=f"{len(sent)} records at the client")
    return sent


class RefBook:
    """A tiny MBO book, Databento's convention: A adds, C takes size off, M replaces, R clears, T/F/N nothing."""

    def __init__(self) -> None:
        self.orders: dict[tuple[int, int], tuple[str, int, int]] = {}

    def apply(self, r: Any) -> None:
        key = (r.instrument_id, r.order_id)
        action, side = str(r.action), str(r.side)
        if action == "R":
            self.orders = {k: v for k, v in self.orders.items() if k[0] != r.instrument_id}
        elif action == "A":
            self.orders[key] = (side, r.price, r.size)
        elif action == "C":
            s, p, size = self.orders[key]
            if size - r.size > 0:
                self.orders[key] = (s, p, size - r.size)
            else:
                del self.orders[key]
        elif action == "M":
            self.orders[key] = (self.orders[key][0], r.price, r.size)

    def top(self, iid: int) -> tuple[int, int, int, int]:
        levels: dict[tuple[str, int], int] = {}
        for (i, _), (side, px, size) in self.orders.items():
            if i == iid:
                levels[(side, px)] = levels.get((side, px), 0) + size
        bids = [p for s, p in levels if s == "B"]
        asks = [p for s, p in levels if s == "A"]
        bid, ask = (max(bids) if bids else None), (min(asks) if asks else None)
        return (
            UNDEF_PRICE if bid is None else bid,
            levels.get(("B", bid), 0),
            UNDEF_PRICE if ask is None else ask,
            levels.get(("A", ask), 0),
        )


def test_live_client_gets_exactly_what_was_sent_for_two_schemas_and_two_instruments():
    with ThreadedGateway(GatewayConfig(keep_sent=True, rate=2000, seed=3)) as tg:
        client = live(tg)
        client.subscribe("GLBX.MDP3", "mbo", ["ESM6", "NQM6"])
        client.subscribe("GLBX.MDP3", "trades", ["ESM6", "NQM6"])
        got = Collector(client)
        client.start()
        session = only_session(tg)
        wait_for(lambda: len(got.of(dbn.TradeMsg)) >= 20, what="trades")
        sent = pause_and_drain(tg, session, got)
        client.stop()
        client.block_for_close(10)
    records = got.snapshot()
    assert [bytes(r) for r in records] == sent
    ids = {tg.gateway.instrument_id("ESM6"), tg.gateway.instrument_id("NQM6")}
    assert client.symbology_map == {i: tg.gateway.symbol_of(i) for i in ids}
    assert set(client.symbology_map.values()) == {"ESM6", "NQM6"}
    assert {r.instrument_id for r in got.of(dbn.MBOMsg)} == ids
    assert {r.instrument_id for r in got.of(dbn.TradeMsg)} == ids
    acks = [r.msg for r in got.of(dbn.SystemMsg) if r.code == dbn.SystemCode.SUBSCRIPTION_ACK]
    assert len(acks) == 2
    # MBO sequence per instrument is contiguous and every event ends with F_LAST
    for iid in ids:
        seqs = [r.sequence for r in got.of(dbn.MBOMsg) if r.instrument_id == iid]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert got.of(dbn.MBOMsg)[-1].flags & dbn.F_LAST


def test_model_is_deterministic_per_seed():
    def run(seed: int) -> list[tuple]:
        model = MarketModel(["ESM6", "NQM6"], seed=seed)
        events = model.initial_events() + [model.step() for _ in range(500)]
        return [
            (e.instrument_id, e.ts_event, e.ts_recv, [(u.order_id, u.price, u.size, u.action) for u in e.updates])
            for e in events
        ]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_bad_key_gets_the_gateways_error():
    with ThreadedGateway(GatewayConfig(rate=100)) as tg:
        client = live(tg, key="db-wrongkey000000000000000WRONG")
        with pytest.raises(db.BentoError, match=r"Authentication failed\."):
            client.subscribe("GLBX.MDP3", "mbo", ["ESM6"])


def test_disconnect_fault_and_client_reconnect():
    config = GatewayConfig(rate=2000, disconnect_after_records=300)
    with ThreadedGateway(config) as tg:
        client = live(tg, reconnect_policy="reconnect")
        gaps: list[tuple] = []
        client.add_reconnect_callback(lambda start, end: gaps.append((start, end)))
        client.subscribe("GLBX.MDP3", "mbo", ["ESM6", "NQM6"])
        got = Collector(client)
        client.start()
        wait_for(lambda: tg.gateway.started_sessions >= 3, what="two reconnects")
        wait_for(lambda: len(gaps) >= 2, what="reconnect callbacks")
        n = len(got.of(dbn.MBOMsg))
        wait_for(lambda: len(got.of(dbn.MBOMsg)) > n, what="records after reconnect")
        client.stop()
        client.block_for_close(10)
    assert len(got.of(dbn.MBOMsg)) > 300


def test_start_replays_history_then_goes_live_without_gap():
    with ThreadedGateway(GatewayConfig(rate=2000, seed=4)) as tg:
        wait_for(lambda: tg.call(lambda: tg.gateway.events_published) > 300, what="history")
        client = live(tg)
        client.subscribe("GLBX.MDP3", "mbo", ["ESM6"], start=0)
        got = Collector(client)
        client.start()
        done = lambda: [r for r in got.of(dbn.SystemMsg) if r.code == dbn.SystemCode.REPLAY_COMPLETED]  # noqa: E731
        wait_for(done, what="replay completed")
        cut = got.snapshot().index(done()[0])
        wait_for(lambda: len(got.of(dbn.MBOMsg)) > cut + 50, what="live records")
        client.stop()
        client.block_for_close(10)
    mbo = got.of(dbn.MBOMsg)
    assert [r.sequence for r in mbo] == list(range(1, len(mbo) + 1))  # from the first record of history on
    before = [r for r in got.snapshot()[:cut] if isinstance(r, dbn.MBOMsg)]
    assert len(before) > 100 and len(mbo) > len(before)


def test_ts_out_and_zstd_compression():
    with ThreadedGateway(GatewayConfig(rate=2000, keep_sent=True)) as tg:
        client = live(tg, ts_out=True, compression=dbn.Compression.ZSTD)
        client.subscribe("GLBX.MDP3", "mbp-1", ["ESM6"])
        got = Collector(client)
        before = time.time_ns()
        client.start()
        session = only_session(tg)
        wait_for(lambda: len(got.of(dbn.MBP1Msg)) > 50, what="mbp-1 records")
        sent = pause_and_drain(tg, session, got)
        client.stop()
        client.block_for_close(10)
        assert session.compression == "zstd"
        assert session.stats.bytes < sum(len(s) for s in sent)  # compressed on the wire
    recs = got.of(dbn.MBP1Msg)
    assert all(before <= r.ts_out <= time.time_ns() for r in recs)
    assert [bytes(r) for r in got.snapshot()] == sent


def test_snapshot_rebuilds_the_true_book():
    with ThreadedGateway(GatewayConfig(rate=3000, seed=9, keep_sent=True)) as tg:
        wait_for(lambda: tg.call(lambda: tg.gateway.events_published) > 500, what="a market")
        client = live(tg)
        client.subscribe("GLBX.MDP3", "mbo", ["ESM6", "NQM6"], snapshot=True)
        got = Collector(client)
        client.start()
        session = only_session(tg)
        wait_for(lambda: len(got.of(dbn.MBOMsg)) > 400, what="records")
        pause_and_drain(tg, session, got)
        ids = [tg.gateway.instrument_id(s) for s in ("ESM6", "NQM6")]
        truth = {i: tg.call(tg.gateway.true_top, i) for i in ids}
        client.stop()
        client.block_for_close(10)
    mbo = got.of(dbn.MBOMsg)
    snap = [r for r in mbo if r.flags & dbn.F_SNAPSHOT]
    assert str(snap[0].action) == "R" and sum(1 for r in snap if str(r.action) == "R") == 2
    assert sum(1 for r in snap if r.flags & dbn.F_LAST) == 2
    book = RefBook()
    for r in mbo:
        book.apply(r)
    for iid in ids:
        assert book.top(iid) == truth[iid]
        assert truth[iid][0] != UNDEF_PRICE and truth[iid][0] < truth[iid][2]


def test_truth_file_matches_the_book_after_every_mbo_record(tmp_path: Path):
    path = tmp_path / "truth.ndjson"
    with ThreadedGateway(GatewayConfig(market=False, truth=path, seed=2)) as tg:
        tg.call(tg.gateway.step, 3000)
        history = tg.call(lambda: list(tg.gateway.history))
        lines = wait_for(
            lambda: path.read_bytes().count(b"\n") >= sum(len(e.updates) for e in history) and path.read_bytes()
        )
    truth = [orjson.loads(line) for line in lines.splitlines()]
    decoder = dbn.DBNDecoder(has_metadata=False)
    from daedalus.sim.databento import records as rec

    decoder.write(b"".join(b for e in history for b in rec.event_records(e, "mbo")))
    mbo = decoder.decode()
    assert len(mbo) == len(truth) > 3000
    book = RefBook()
    for r, t in zip(mbo, truth, strict=True):
        book.apply(r)
        assert (t["instrument_id"], t["sequence"], t["ts_event"]) == (r.instrument_id, r.sequence, r.ts_event)
        assert book.top(r.instrument_id) == (t["bid_px"], t["bid_sz"], t["ask_px"], t["ask_sz"])
    assert {str(r.action) for r in mbo} == {"A", "C", "M", "T", "F"}


def test_mbp10_ohlcv_and_definitions_follow_the_model():
    with ThreadedGateway(GatewayConfig(market=False, seed=6, keep_sent=True)) as tg:
        client = live(tg)
        client.subscribe("GLBX.MDP3", "mbp-10", ["ESM6"])
        client.subscribe("GLBX.MDP3", "ohlcv-1m", ["ESM6"])
        client.subscribe("GLBX.MDP3", "trades", ["ESM6"])
        client.subscribe("GLBX.MDP3", "definition", ["ESM6", "NQM6"])
        got = Collector(client)
        client.start()
        session = only_session(tg)
        wait_for(lambda: len(got.of(dbn.InstrumentDefMsg)) == 2, what="definitions")
        tg.call(tg.gateway.step, 6000)
        sent = pause_and_drain(tg, session, got)
        iid = tg.gateway.instrument_id("ESM6")
        levels = tg.call(tg.gateway.model.levels, iid, 10)
        client.stop()
        client.block_for_close(10)
    assert len(got.snapshot()) == len(sent)
    last = got.of(dbn.MBP10Msg)[-1]
    assert [(lv.bid_px, lv.ask_px, lv.bid_sz, lv.ask_sz, lv.bid_ct, lv.ask_ct) for lv in last.levels] == list(levels)
    assert {d.raw_symbol for d in got.of(dbn.InstrumentDefMsg)} == {"ESM6", "NQM6"}
    bars = got.of(dbn.OHLCVMsg)
    assert len(bars) >= 2
    trades = got.of(dbn.TradeMsg)
    for bar in bars:
        inside = [t for t in trades if bar.ts_event <= t.ts_event < bar.ts_event + 60_000_000_000]
        assert bar.volume == sum(t.size for t in inside)
        assert (bar.open, bar.close) == (inside[0].price, inside[-1].price)
        assert bar.high == max(t.price for t in inside) and bar.low == min(t.price for t in inside)


def test_unknown_symbol_gets_an_error_and_the_session_continues():
    with ThreadedGateway(GatewayConfig(rate=2000)) as tg:
        client = live(tg)
        client.subscribe("GLBX.MDP3", "trades", ["ESM6", "NOPE"])
        client.subscribe("GLBX.MDP3", "trades", ["X"], stype_in="parent")
        got = Collector(client)
        client.start()
        wait_for(lambda: len(got.of(dbn.TradeMsg)) > 5, what="trades after the error")
        client.stop()
        with pytest.raises(db.BentoError, match="NOPE"):
            client.block_for_close(10)
    errors = got.of(dbn.ErrorMsg)
    assert [e.code for e in errors] == [dbn.ErrorCode.SYMBOL_RESOLUTION_FAILED] * 2
    assert client.symbology_map == {tg.gateway.instrument_id("ESM6"): "ESM6"}


def test_heartbeat_when_idle():
    with ThreadedGateway(GatewayConfig(market=False)) as tg:
        client = live(tg, heartbeat_interval_s=1)
        client.subscribe("GLBX.MDP3", "trades", ["ESM6"])
        got = Collector(client)
        client.start()
        wait_for(lambda: any(r.is_heartbeat() for r in got.of(dbn.SystemMsg)), what="a heartbeat")
        client.stop()
        client.block_for_close(10)


@pytest.mark.parametrize(
    ("fixture", "schema", "symbol"),
    [
        ("GLBX.MDP3/test_data.mbo.dbn.zst", "mbo", "ESH1"),
        ("XNAS.ITCH/test_data.trades.dbn.zst", "trades", "NVDA"),
        ("LIVE/test_data.live.dbn.zst", "mbo", "ESZ4"),
    ],
)
def test_replay_file_gives_the_files_records(fixture: str, schema: str, symbol: str):
    path = FIXTURES / fixture
    store = db.DBNStore.from_file(path)
    wanted = [bytes(r) for r in store if int(r.rtype) == {"mbo": 160, "trades": 0}[schema]]
    with ThreadedGateway(GatewayConfig(replay=path)) as tg:
        client = db.Live(key=TEST_API_KEY, gateway="127.0.0.1", port=tg.port)
        client.subscribe(store.dataset, schema, [symbol])
        got = Collector(client)
        client.start()
        wait_for(lambda: any(r.code == dbn.SystemCode.REPLAY_COMPLETED for r in got.of(dbn.SystemMsg)), what="replay")
        client.stop()
        client.block_for_close(10)
    data = [bytes(r) for r in got.snapshot() if not isinstance(r, dbn.SystemMsg | dbn.SymbolMappingMsg)]
    assert data == wanted and len(wanted) >= 4
    assert set(client.symbology_map.values()) == {symbol}


def _raw_session(port: int, key: str = TEST_API_KEY, rcvbuf: int | None = None) -> tuple[socket.socket, bytes]:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    buf = b""
    while buf.count(b"\n") < 2:
        buf += sock.recv(4096)
    challenge = buf.split(b"cram=")[1].split(b"\n")[0].decode()
    auth = f"auth={cram_reply(challenge, key)}|dataset=GLBX.MDP3|encoding=dbn|ts_out=0|compression=none"
    sock.sendall(f"{auth}|heartbeat_interval_s=30|client=test raw/1\n".encode())
    reply = b""
    while not reply.endswith(b"\n"):
        reply += sock.recv(1)
    return sock, reply


def test_slow_reader_warns_skips_and_reports_the_count():
    config = GatewayConfig(rate=20000, slow_reader_bytes=64 * 1024)
    with ThreadedGateway(config) as tg:
        sock, reply = _raw_session(tg.port, rcvbuf=4096)
        assert reply.startswith(b"success=1")
        sock.sendall(
            b"schema=mbp-10|stype_in=raw_symbol|symbols=ESM6,NQM6|snapshot=0|id=0|is_last=1\nstart_session=0\n"
        )
        session = only_session(tg)
        wait_for(lambda: tg.call(lambda: session.stats.skipped) > 100, what="skipped records")
        decoder = dbn.DBNDecoder()
        found: list[Any] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any(isinstance(r, dbn.ErrorMsg) for r in found):
            decoder.write(sock.recv(1 << 20))
            found += decoder.decode()
        sock.close()
        skipped_total = tg.call(lambda: session.stats.skipped)
    warnings = [r for r in found if isinstance(r, dbn.SystemMsg) and r.code == dbn.SystemCode.SLOW_READER_WARNING]
    errors = [r for r in found if isinstance(r, dbn.ErrorMsg)]
    assert len(warnings) == 1
    assert errors[0].code == dbn.ErrorCode.SKIPPED_RECORDS_AFTER_SLOW_READING
    count = int(errors[0].err.split()[1])
    assert 0 < count <= skipped_total


def test_bad_lines_get_an_error_and_the_server_keeps_serving():
    with ThreadedGateway(GatewayConfig(rate=100)) as tg:
        for line in (b"hello\n", b"auth=x|bogus=1\n", b"x" * (1 << 21)):
            sock = socket.create_connection(("127.0.0.1", tg.port), timeout=10)
            sock.sendall(line)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            assert b"success=0|error=" in data
            sock.close()
        sock, reply = _raw_session(tg.port)  # after auth: an unknown line gets an ErrorMsg in the DBN stream
        assert reply.startswith(b"success=1")
        sock.sendall(b"frobnicate=1\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        decoder = dbn.DBNDecoder()
        decoder.write(data)
        out = decoder.decode()
        assert isinstance(out[-1], dbn.ErrorMsg) and "Unknown control message" in out[-1].err
        client = live(tg)
        client.subscribe("GLBX.MDP3", "mbo", ["ESM6"])
        got = Collector(client)
        client.start()
        wait_for(lambda: got.of(dbn.MBOMsg), what="records for a good client")
        client.stop()
        client.block_for_close(10)


async def test_async_api_and_cli_ready_line(tmp_path: Path):
    async with DatabentoGateway(GatewayConfig(market=False, symbols=("AAPL",))) as gw:
        assert gw.port > 0 and gw.true_top(gw.instrument_id("AAPL"))[0] != UNDEF_PRICE
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "daedalus", "sim", "--protocol", "databento", "--port", "0", "--symbols", "ESM6,CLN6"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("daedalus sim ready protocol=databento gateway=127.0.0.1 port=")
        assert "symbols=ESM6,CLN6" in line and TEST_API_KEY not in line
        port = int(line.split("port=")[1].split()[0])
        sock, reply = _raw_session(port)
        assert reply.startswith(b"success=1|session_id=")
        sock.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


def test_cli_rejects_bad_databento_flags(tmp_path: Path):
    from typer.testing import CliRunner

    from daedalus.cli import app

    runner = CliRunner()
    cases = [
        (["--protocol", "ftp"], "--protocol: expected coinbase or databento"),
        (["--protocol", "databento", "--rate", "0"], "--rate"),
        (["--protocol", "databento", "--replay", str(tmp_path / "missing.dbn")], "cannot read"),
        (["--symbols", "ESM6"], "need --protocol databento"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["sim", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output


def test_instrument_ids_are_stable_per_symbol():
    from daedalus.sim.databento import instrument_id_for

    assert instrument_id_for("ESM6") == 263275  # the same in every run, process and machine
    model = MarketModel(["NQM6", "ESM6"])
    assert model.by_symbol["ESM6"].instrument_id == 263275


def test_a_rate_beyond_one_core_still_serves_clients():
    with ThreadedGateway(GatewayConfig(rate=1e8)) as tg:
        client = live(tg)
        client.subscribe("GLBX.MDP3", "mbo", ["ESM6"])
        got = Collector(client)
        client.start()
        wait_for(lambda: len(got.of(dbn.MBOMsg)) > 1000, what="records at an impossible rate")
        client.stop()
        client.block_for_close(10)
