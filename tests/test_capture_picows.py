"""The Coinbase collector on picows: what a WebSocket server can send, byte by byte.

A small raw server on 127.0.0.1 writes hand-made frames (fragments, pings, large frames,
close codes, binary and invalid text) so each case reaches the collector exactly as a
real server would send it; the pipeline runs in process and its segments are read back.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import ipaddress
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from daedalus.capture import coinbase, segments
from daedalus.capture.coinbase import consecutive, products_in
from daedalus.capture.pipeline import IngestPipeline, loop_factory
from daedalus.capture.records import frame_line, frame_lines, stamped_lines
from daedalus.config import parse_config
from tests.capture_helpers import async_wait_until, frame_bytes, ingest_config, read_records
from tests.conftest import REPO

T21 = 1_786_309_200_000_000_000  # 2026-08-09T21:00Z
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def ws_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A server frame (unmasked)."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((first, n))
    elif n < 65536:
        head = bytes((first, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, 127)) + n.to_bytes(8, "big")
    return head + payload


def envelope(seq: int, channel: str = "l2_data", product: str = "BTC-USD") -> bytes:
    return (
        b'{"channel":"%b","timestamp":"2026-08-09T21:00:00Z","sequence_num":%d,'
        b'"events":[{"type":"update","product_id":"%b","updates":[]}]}' % (channel.encode(), seq, product.encode())
    )


class RawServer:
    """Accepts one WebSocket connection at a time and runs ``script(conn)`` on it."""

    def __init__(self, script: Callable[[RawConn], Awaitable[None]], tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.tls = tls
        self.conns: list[RawConn] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for conn in self.conns:
            conn.writer.close()

    @property
    def url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}/ws"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))  # fmt: skip
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")  # fmt: skip
        conn = RawConn(reader, writer)
        self.conns.append(conn)
        await self.script(conn)


class RawConn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self) -> tuple[int, bytes]:
        """(opcode, unmasked payload) of the client's next frame."""
        first, second = await self.reader.readexactly(2)
        n = second & 0x7F
        if n == 126:
            n = int.from_bytes(await self.reader.readexactly(2), "big")
        elif n == 127:
            n = int.from_bytes(await self.reader.readexactly(8), "big")
        mask = await self.reader.readexactly(4)
        payload = await self.reader.readexactly(n)
        return first & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

    async def subscribes(self, count: int = 4) -> list[dict]:
        return [orjson.loads((await self.read_frame())[1]) for _ in range(count)]

    async def hold(self) -> None:
        """Keep the connection open until the client closes it."""
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            while True:
                await self.read_frame()


class Pipeline:
    def __init__(self, config: dict) -> None:
        self.pipeline = IngestPipeline(parse_config(config))
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.pipeline.run(self.stop))

    @property
    def collector(self):
        return self.pipeline.collectors[0]

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 15)


def config(tmp_path: Path, url: str, **ingestion: object) -> dict:
    settings = ingest_config(tmp_path, url, **ingestion)
    settings["coinbase"]["rest_url"] = "http://127.0.0.1:9"  # never asked: the collector needs no REST
    return settings


async def test_a_fragmented_message_is_reassembled_around_a_ping_that_is_answered(tmp_path):
    whole = envelope(0)
    pongs: list[bytes] = []

    async def script(conn: RawConn) -> None:
        await conn.subscribes()
        await conn.send(ws_frame(TEXT, whole[:10], fin=False) + ws_frame(PING, b"are you there")
                        + ws_frame(CONTINUATION, whole[10:30], fin=False))  # fmt: skip
        opcode, payload = await conn.read_frame()
        if opcode == PONG:
            pongs.append(payload)
        await conn.send(ws_frame(CONTINUATION, whole[30:]) + ws_frame(TEXT, envelope(1)))
        await conn.hold()

    async with RawServer(script) as server:
        run = Pipeline(config(tmp_path, server.url))
        await async_wait_until(lambda: run.pipeline.writer.stats.written >= 2, 10, "two messages written")
        await run.close()
    assert frame_bytes(tmp_path) == [whole, envelope(1)]
    assert pongs == [b"are you there"]


async def test_a_message_bigger_than_the_client_libraries_defaults_is_kept_whole(tmp_path):
    """picows refuses frames over 10 MB unless told otherwise (aiohttp over 4 MB): real
    level2 snapshots are 5 MB, and the collector takes up to 64 MB."""
    big = envelope(0)[:-3] + b',"pad":"' + b"x" * (12 << 20) + b'"}]}'

    async def script(conn: RawConn) -> None:
        await conn.subscribes()
        await conn.send(ws_frame(TEXT, big) + ws_frame(TEXT, envelope(1)))
        await conn.hold()

    async with RawServer(script) as server:
        run = Pipeline(config(tmp_path, server.url))
        await async_wait_until(lambda: run.pipeline.writer.stats.written >= 2, 15, "the big frame written")
        await run.close()
    assert frame_bytes(tmp_path) == [big, envelope(1)]
    assert run.collector.stats.errors == 0


async def test_the_servers_close_code_and_reason_are_the_disconnect_reason(tmp_path):
    replies: list[tuple[int, bytes]] = []

    async def script(conn: RawConn) -> None:
        await conn.subscribes()
        await conn.send(ws_frame(TEXT, envelope(0)) + ws_frame(CLOSE, (4001).to_bytes(2, "big") + b"maintenance"))
        replies.append(await conn.read_frame())
        await conn.hold()

    async with RawServer(script) as server:
        run = Pipeline(config(tmp_path, server.url, reconnect_delay=5, max_reconnect_delay=5))
        await async_wait_until(lambda: run.collector.stats.state == "backoff", 10, "the disconnect")
        await run.close()
    disconnects = [r for r in read_records(tmp_path) if r.get("event") == "disconnect"]
    assert disconnects[0]["reason"] == "closed by server (code 4001): maintenance"
    assert replies[0][0] == CLOSE and replies[0][1][:2] == (1000).to_bytes(2, "big")  # the close is answered


async def test_binary_frames_are_kept_as_text_and_invalid_utf8_as_raw_without_dropping_the_connection(tmp_path):
    bad = envelope(1)[:-4] + b',"x":"\xff\xfe"}]}'

    async def script(conn: RawConn) -> None:
        await conn.subscribes()
        await conn.send(ws_frame(BINARY, envelope(0)) + ws_frame(TEXT, bad) + ws_frame(TEXT, envelope(2)))
        await conn.hold()

    async with RawServer(script) as server:
        run = Pipeline(config(tmp_path, server.url))
        await async_wait_until(lambda: run.pipeline.writer.stats.written >= 3, 10, "three frames written")
        await run.close()
    records = [r for r in read_records(tmp_path) if "msg" in r or "raw" in r]
    assert records[0]["msg"]["sequence_num"] == 0
    assert records[1]["raw"] == bad.decode("utf-8", "replace")
    assert records[2]["msg"]["sequence_num"] == 2
    assert run.collector.stats.reconnects == 0


async def test_frames_of_one_read_share_a_stamp_and_a_gap_line_follows_the_frame_that_showed_it(tmp_path):
    async def script(conn: RawConn) -> None:
        await conn.subscribes()
        await conn.send(b"".join(ws_frame(TEXT, envelope(seq)) for seq in (0, 1, 2, 5, 6)))
        await conn.hold()

    async with RawServer(script) as server:
        run = Pipeline(config(tmp_path, server.url))
        await async_wait_until(lambda: run.pipeline.writer.stats.written >= 5, 10, "five frames written")
        sock = run.collector._transport.underlying_transport.get_extra_info("socket")
        receive_buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        await run.close()
    # fixed, not autotuned up to tcp_rmem's maximum: it bounds what one read brings (Linux doubles it)
    assert coinbase.RECEIVE_BUFFER_BYTES <= receive_buffer <= 2 * coinbase.RECEIVE_BUFFER_BYTES
    records = read_records(tmp_path)
    start = next(i for i, r in enumerate(records) if "msg" in r)
    shown = [r["msg"]["sequence_num"] if "msg" in r else r["event"] for r in records[start : start + 8]]
    assert shown == [0, 1, 2, 5, "gap", "subscribe", 6, "disconnect"]
    gap = records[start + 4]
    assert (gap["expected"], gap["received"]) == (3, 5)
    stamps = {r["recv_ns"] for r in records[start : start + 7] if r.get("event") != "subscribe"}
    assert len(stamps) == 1  # one read, one stamp (the frames and the gap they showed)
    assert records[start + 5]["message"]["channel"] == "level2"
    assert run.collector.stats.product_seen == {"BTC-USD": records[start]["recv_ns"]}


async def test_block_mode_stops_reading_instead_of_dropping(tmp_path):
    total = 3000

    async def script(conn: RawConn) -> None:
        await conn.subscribes()
        await conn.send(b"".join(ws_frame(TEXT, envelope(seq)) for seq in range(total)))
        await conn.hold()

    async with RawServer(script) as server:
        run = Pipeline(config(tmp_path, server.url, on_queue_full="block", queue_maxsize=20, batch_size=10))
        await async_wait_until(lambda: run.pipeline.writer.stats.written >= total, 20, "every frame written")
        await run.close()
    assert run.pipeline.writer.dropped == 0
    assert [orjson.loads(f)["sequence_num"] for f in frame_bytes(tmp_path)] == list(range(total))


def stall_fsyncs(monkeypatch: pytest.MonkeyPatch, stalls: list[float]) -> None:
    """The segment writer's next fsyncs each sleep one of ``stalls`` (popped) first: a slow disk."""
    real_fsync = segments.fsync

    def slow_fsync(fd: int) -> None:
        if stalls:
            time.sleep(stalls.pop())
        real_fsync(fd)

    monkeypatch.setattr(segments, "fsync", slow_fsync)


async def test_a_short_disk_stall_is_held_in_tcp_instead_of_dropping(tmp_path, monkeypatch):
    """on_queue_full: drop drops only after the socket was left unread for HOLD_LIMIT_S: a
    burst of ten queues' worth while the disk stalls for a moment loses nothing."""
    total, stalls = 2000, [0.3, 0.3]
    stall_fsyncs(monkeypatch, stalls)

    async def script(conn: RawConn) -> None:
        await conn.subscribes()
        await conn.send(b"".join(ws_frame(TEXT, envelope(seq)) for seq in range(100)))
        for start in range(100, total, 100):
            await asyncio.sleep(0.005)
            await conn.send(b"".join(ws_frame(TEXT, envelope(seq)) for seq in range(start, start + 100)))
        await conn.hold()

    depths: list[int] = []

    async def watch(writer: segments.SegmentWriter) -> None:
        while True:
            depths.append(writer.queue_depth)
            await asyncio.sleep(0.001)

    async with RawServer(script) as server:
        run = Pipeline(config(tmp_path, server.url, queue_maxsize=200, batch_size=10))
        watcher = asyncio.create_task(watch(run.pipeline.writer))
        await async_wait_until(lambda: run.pipeline.writer.stats.written >= total, 20, "every frame written")
        watcher.cancel()
        await run.close()
    assert run.pipeline.writer.dropped == 0 and not stalls
    assert run.collector.stats.read_pauses >= 1  # the frames waited in TCP, not in the queue
    assert max(depths) < total  # the queue: half its size, and one read taken whole after a pause
    assert [orjson.loads(f)["sequence_num"] for f in frame_bytes(tmp_path)] == list(range(total))


async def test_a_long_disk_stall_drops_and_counts_what_does_not_fit_and_capture_goes_on(tmp_path, monkeypatch):
    total, stalls = 2000, [0.8]
    stall_fsyncs(monkeypatch, stalls)
    monkeypatch.setattr(coinbase, "HOLD_LIMIT_S", 0.2)

    async def script(conn: RawConn) -> None:
        await conn.subscribes()
        for start in range(0, total, 100):  # small reads: the queue cannot take them all
            await conn.send(b"".join(ws_frame(TEXT, envelope(seq)) for seq in range(start, start + 100)))
            await asyncio.sleep(0.01)
        await conn.hold()

    async with RawServer(script) as server:
        run = Pipeline(config(tmp_path, server.url, queue_maxsize=200, batch_size=10))
        writer = run.pipeline.writer
        await async_wait_until(lambda: writer.stats.written + writer.dropped >= total, 20, "every frame accounted for")
        await run.close()
    assert writer.dropped > 0 and writer.stats.overflow == writer.dropped
    overflow = [r for r in read_records(tmp_path) if r.get("event") == "overflow"]
    assert sum(r["dropped"] for r in overflow) == writer.dropped
    assert run.collector.stats.reconnects == 0


def test_a_read_that_overflows_the_segment_is_split_between_two_segments_in_order(tmp_path):
    settings = parse_config({"data_dir": str(tmp_path), "ingestion": {"segment_max_mb": 0.01, "batch_size": 1000}})
    writer = segments.SegmentWriter(settings.layout, "coinbase", settings.ingestion)
    frames = [envelope(seq) for seq in range(300)]  # ~55 KB of lines: one read, six segments
    frames[150] = b'{"x":"a\rb"}'  # a carriage return is no line end
    assert writer.put_frames(T21, 1, frames) == 300 and writer.queue_depth == 300
    writer.start()
    assert writer.close(10)
    files = sorted((tmp_path / "raw/ready/coinbase").iterdir())
    assert len(files) >= 5 and all(f.stat().st_size <= 0.01 * 1024 * 1024 for f in files)
    assert frame_bytes(tmp_path) == frames and writer.queue_depth == 0 and writer.stats.written == 300


def test_latency_samples_weigh_a_read_by_its_frames(tmp_path):
    """One sample per 16 frames, as for frames queued one by one: a big read is not one sample."""
    settings = parse_config({"data_dir": str(tmp_path), "ingestion": {"batch_size": 1000}})
    writer = segments.SegmentWriter(settings.layout, "coinbase", settings.ingestion)
    writer.put_frames(T21, 1, [envelope(seq) for seq in range(160)])
    writer.put_frames(T21, 1, [envelope(160), envelope(161)])
    writer.start()
    assert writer.close(10)
    assert writer.stats.latency.count == 10 + 1 and len(writer.stats.latencies_ns) == 11


def self_signed(tmp_path: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


async def test_wss_refuses_a_certificate_it_cannot_verify(tmp_path):
    async def script(conn: RawConn) -> None:
        await conn.send(ws_frame(TEXT, envelope(0)))
        await conn.hold()

    async with RawServer(script, tls=self_signed(tmp_path)) as server:
        run = Pipeline(config(tmp_path / "data", server.url))
        await async_wait_until(lambda: run.collector.stats.errors >= 1, 10, "the refused handshake")
        await run.close()
    assert "CERTIFICATE_VERIFY_FAILED" in run.collector.stats.last_error
    assert run.collector.stats.messages == 0


ODD_FRAMES = [
    b'{"a":\n1}',  # a newline inside
    b' {"a":1} ',  # padded with JSON whitespace
    b"not json {",
    b"",
    b'{"a":"\xc3\xa9"}',  # valid UTF-8, not ASCII
    b'{"a":"\xff"}',  # invalid UTF-8
    b"[1,2]",
]


@pytest.mark.parametrize("odd", ODD_FRAMES)
def test_the_lines_of_a_read_are_those_of_its_frames_one_by_one(odd):
    frames = [envelope(0), odd, envelope(1)]
    assert frame_lines(7, 2, frames) == b"".join(frame_line(7, 2, f) for f in frames)
    plain = [envelope(0), envelope(1), envelope(2)]
    assert frame_lines(7, 2, plain) == b"".join(frame_line(7, 2, f) for f in plain)
    assert frame_line(7, 2, odd.decode("utf-8", "replace")) == frame_line(7, 2, odd) or b"\xff" in odd


@pytest.mark.parametrize("odd", ODD_FRAMES)
def test_the_lines_of_held_reads_are_those_of_their_frames_each_with_its_own_stamp(odd):
    frames, stamps = [envelope(0), odd, envelope(1)], [7, 8, 9]
    assert stamped_lines(stamps, 2, frames) == b"".join(map(frame_line, stamps, [2] * 3, frames))
    plain = [envelope(0), envelope(1), envelope(2)]
    assert stamped_lines(stamps, 2, plain) == b"".join(map(frame_line, stamps, [2] * 3, plain))


class HandOvers:
    """Stands in for the collector behind a :class:`coinbase._Reader`: records each hand-over."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int], list[bytes]]] = []
        self.clock = time.time_ns

    def _deliver(self, reader: object, stamp: int, frames: list[bytes]) -> None:
        self.calls.append(("read", [stamp] * len(frames), frames))

    def _deliver_held(self, reader: object, stamps: list[int], frames: list[bytes]) -> None:
        self.calls.append(("held", stamps, frames))


async def test_small_reads_close_together_are_held_and_handed_over_together_with_their_own_stamps():
    """The rules of the hold (coinbase.HOLD_S): what is held, what goes at once, what releases it."""
    ms = 1_000_000
    start = T21 - 3 * ms  # three milliseconds before a UTC hour
    handed = HandOvers()
    reader = coinbase._Reader(handed)  # type: ignore[arg-type]
    reader.loop = asyncio.get_running_loop()
    reader._read_done(start, [envelope(0)])  # the first read: at once (nothing to hold it with)
    reader._read_done(start + ms, [envelope(1)])  # close behind it: held
    reader._read_done(start + ms + 10, [envelope(2), envelope(3)])  # held too
    assert [kind for kind, _, _ in handed.calls] == ["read"]
    reader._read_done(T21, [envelope(4)])  # a new UTC hour: the held reads first, then this one at once
    held = ("held", [start + ms, start + ms + 10, start + ms + 10], [envelope(s) for s in (1, 2, 3)])
    assert handed.calls[1:] == [held, ("read", [T21], [envelope(4)])]
    n = coinbase.HOLD_FRAMES
    reader._read_done(T21 + ms, [envelope(s) for s in range(5, 5 + n)])  # a big read: at once
    reader._read_done(T21 + ms + coinbase.HOLD_NS, [envelope(21)])  # HOLD_S after the previous one: at once
    assert [(kind, len(frames)) for kind, _, frames in handed.calls[3:]] == [("read", n), ("read", 1)]
    now, upto = T21 + 2 * ms + coinbase.HOLD_NS, 22 + n
    for seq in range(22, upto):  # held until they are HOLD_FRAMES frames
        reader._read_done(now + seq, [envelope(seq)])
    assert handed.calls[-1] == ("held", [now + seq for seq in range(22, upto)], [envelope(s) for s in range(22, upto)])
    assert reader.timer is None
    reader._read_done(now + 100, [envelope(upto)])  # held, then handed over by the timer
    await async_wait_until(lambda: handed.calls[-1][0] == "held" and handed.calls[-1][1] == [now + 100], 5, "timer")
    reader._read_done(now + 200, [envelope(39)])
    reader.frames.append(envelope(40))
    reader.stamp = now + 300
    reader.flush()  # a control frame or the end of the connection: held reads first, then the read so far
    assert handed.calls[-2:] == [("held", [now + 200], [envelope(39)]), ("read", [now + 300], [envelope(40)])]
    assert reader.timer is None and not reader.held


async def test_held_reads_keep_their_stamps_and_a_gap_among_them_is_written_after_its_frame(tmp_path):
    """Frames sent one per write, a millisecond apart: held and handed over several reads at
    a time, each line with its own read's stamp; the gap check still runs frame by frame."""
    sequence = [*range(0, 20), *range(23, 40)]

    async def script(conn: RawConn) -> None:
        await conn.subscribes()
        for seq in sequence:
            await conn.send(ws_frame(TEXT, envelope(seq)))
            await asyncio.sleep(0.001)
        await conn.hold()

    async with RawServer(script) as server:
        run = Pipeline(config(tmp_path, server.url))
        writer = run.pipeline.writer
        handed: list[list[int]] = []
        put_frames = writer.put_frames

        def spy(recv_ns: int, conn: int, frames: list[bytes], **kwargs: object) -> int:
            stamps = kwargs.get("stamps")
            handed.append(list(stamps) if stamps is not None else [recv_ns] * len(frames))  # type: ignore[call-overload]
            return put_frames(recv_ns, conn, frames, **kwargs)  # type: ignore[arg-type]

        writer.put_frames = spy  # type: ignore[method-assign]
        await async_wait_until(lambda: writer.stats.written >= len(sequence), 10, "every frame written")
        await run.close()
    records = read_records(tmp_path)
    start = next(i for i, r in enumerate(records) if "msg" in r)
    shown = [r["msg"]["sequence_num"] if "msg" in r else r["event"] for r in records[start:]]
    assert shown == [*range(0, 20), 23, "gap", "subscribe", *range(24, 40), "disconnect"]
    gap = records[start + 21]
    assert (gap["expected"], gap["received"], gap["recv_ns"]) == (20, 23, records[start + 20]["recv_ns"])
    frames = [r for r in records if "msg" in r]
    assert [r["recv_ns"] for r in frames] == [stamp for stamps in handed for stamp in stamps]  # each its own
    assert any(len(set(stamps)) > 1 for stamps in handed)  # several reads in one hand-over
    assert len(handed) < len(sequence)


def test_the_bulk_checks_agree_with_the_frame_by_frame_ones():
    frames = [envelope(seq) for seq in range(5, 10)]
    assert consecutive(frames, 5)
    assert not consecutive(frames, 4)
    assert not consecutive([*frames[:2], envelope(8), *frames[3:]], 5)  # a gap then a repeat
    assert not consecutive([*frames, b'{"channel":"heartbeats"}'], 5)  # a frame without a number
    assert products_in([envelope(1, product="ETH-USD"), envelope(2), b"{}"]) == {b"ETH-USD", b"BTC-USD"}


def test_coinbase_ingest_runs_on_uvloop_and_leaves_pyarrow_unloaded():
    import uvloop

    assert loop_factory("coinbase") is uvloop.new_event_loop
    assert loop_factory("ccxt") is None and loop_factory("databento") is None
    code = (
        "import sys\nfrom daedalus.capture.coinbase_capture import CoinbaseCapture\n"
        "import daedalus.capture.pipeline, daedalus.cli\nprint('pyarrow' in sys.modules, 'numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
