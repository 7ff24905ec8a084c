"""A WebSocket replay feeder for the capture benchmark: faster than any client under test.

``daedalus sim --replay`` encodes and sends frame by frame from asyncio and tops out near
200,000 frames/s on this machine's other core, below what ingest can take. This feeder
pre-encodes every frame of a recording once (server frames are unmasked: a 2-10 byte header
and the payload), accepts one connection on 127.0.0.1, does the HTTP upgrade itself, waits
until the client subscribed to the stream's channels (level2 and market_trades, as the
simulator's replay does), and then writes the encoded stream straight to the socket:
in 1 MB ``sendall`` calls at full speed, or ``--rate`` frames/s in paced writes of
``--frames-per-write`` frames each (default: the frames of one millisecond; 1 sends frame by
frame, as a real feed at a few thousand frames/s arrives: a read per frame, the client's
dearest case). The socket has TCP_NODELAY, so a write is not held back to coalesce with the
next. What the client sends afterwards is read and discarded by a second thread.

    .venv/bin/python bench/ws_feeder.py RECORDING [--rate 100000] [--frames-per-write N] [--port 0]

Prints ``ws=ws://127.0.0.1:PORT/ws`` once listening (as ``daedalus sim`` does), serves one
connection, prints ``ws_feeder sent frames=N writes=W seconds=S`` once the stream is out,
and exits when the client closes it.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import os
import socket
import sys
import threading
import time
from pathlib import Path

from daedalus.capture.records import iter_lines, split_frame_record

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CHUNK = 1 << 20  # bytes per sendall at full speed
TICK_S = 0.001  # paced, by default: one write per millisecond
WANTED_CHANNELS = {b"level2", b"market_trades"}
SUBSCRIBE_WAIT_S = 3.0


def encode_frame(payload: bytes) -> bytes:
    """One unmasked FIN text frame (server to client, RFC 6455 5.2)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x81, n))
    elif n < 65536:
        head = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return head + payload


def encode_stream(recording: Path) -> tuple[bytes, list[int]]:
    """The recording's frames encoded back to back, and the end offset of each frame."""
    parts: list[bytes] = []
    ends: list[int] = []
    size = 0
    for line in iter_lines(recording):
        record = split_frame_record(line)
        if record is None:
            continue
        encoded = encode_frame(record[2])
        parts.append(encoded)
        size += len(encoded)
        ends.append(size)
    return b"".join(parts), ends


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("client went away")
        data += chunk
    return data


def handshake(sock: socket.socket) -> None:
    """Read the upgrade request and answer 101 with the accept key (RFC 6455 4.2.2)."""
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("client went away during the handshake")
        request += chunk
    key = b""
    for line in request.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    sock.sendall(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


def read_client_frame(sock: socket.socket) -> tuple[int, bytes]:
    """(opcode, unmasked payload) of one client frame."""
    first, second = read_exactly(sock, 2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(read_exactly(sock, 2), "big")
    elif length == 127:
        length = int.from_bytes(read_exactly(sock, 8), "big")
    mask = read_exactly(sock, 4) if second & 0x80 else b"\0\0\0\0"
    payload = read_exactly(sock, length)
    unmasked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return first & 0x0F, unmasked


def wait_for_subscriptions(sock: socket.socket) -> None:
    """Read subscribe messages until the stream's channels are all asked for (or a deadline)."""
    seen: set[bytes] = set()
    sock.settimeout(SUBSCRIBE_WAIT_S)
    try:
        while not seen >= WANTED_CHANNELS:
            opcode, payload = read_client_frame(sock)
            if opcode == 0x8:
                raise ConnectionError("client closed before subscribing")
            seen |= {c for c in WANTED_CHANNELS if b'"channel":"' + c + b'"' in payload}
    except TimeoutError:
        print(f"ws_feeder: subscribed to {sorted(seen)} only; starting anyway", file=sys.stderr)
    sock.settimeout(None)


def drain(sock: socket.socket, closed: threading.Event) -> None:
    """Discard whatever the client sends until it closes."""
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    closed.set()


def frames_per_write(rate: float, asked: int = 0) -> int:
    """Frames in one paced write: ``asked``, or by default those due in one millisecond."""
    return asked if asked > 0 else max(1, round(rate * TICK_S))


def send_stream(sock: socket.socket, stream: bytes, ends: list[int], rate: float, per_write: int = 0) -> int:
    """Send the stream (paced when ``rate`` > 0, each write when its first frame is due);
    returns the number of writes."""
    view = memoryview(stream)
    if rate <= 0:
        for start in range(0, len(stream), CHUNK):
            sock.sendall(view[start : start + CHUNK])
        return -(-len(stream) // CHUNK)
    per_write = frames_per_write(rate, per_write)
    started = time.perf_counter()
    sent_frames, sent_bytes, writes = 0, 0, 0
    while sent_frames < len(ends):
        due = started + sent_frames / rate
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        upto = min(len(ends), sent_frames + per_write)
        sock.sendall(view[sent_bytes : ends[upto - 1]])
        sent_frames, sent_bytes, writes = upto, ends[upto - 1], writes + 1
    return writes


def serve(recording: Path, rate: float, port: int, per_write: int = 0) -> None:
    stream, ends = encode_stream(recording)
    with socket.create_server(("127.0.0.1", port)) as server:
        print(f"ws_feeder ready ws=ws://127.0.0.1:{server.getsockname()[1]}/ws frames={len(ends)}", flush=True)
        sock, _ = server.accept()
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handshake(sock)
        wait_for_subscriptions(sock)
        closed = threading.Event()
        threading.Thread(target=drain, args=(sock, closed), daemon=True).start()
        started = time.perf_counter()
        try:
            writes = send_stream(sock, stream, ends, rate, per_write)
        except OSError:
            return  # the client went away: nothing more to do
        print(f"ws_feeder sent frames={len(ends)} writes={writes} seconds={time.perf_counter() - started:.3f}",
              flush=True)  # fmt: skip
        closed.wait()  # keep the connection open until the client ends it (the benchmark stops it)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recording", type=Path, help="a raw NDJSON segment (bench/capture.py writes one)")
    parser.add_argument("--rate", type=float, default=0.0, help="frames/s (0: as fast as the client reads)")
    parser.add_argument("--frames-per-write", type=int, default=0,
                        help="paced: frames per write (0: those due in 1 ms; 1: frame by frame)")  # fmt: skip
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(ConnectionError, KeyboardInterrupt):
        serve(args.recording, args.rate, args.port, args.frames_per_write)
    os._exit(0)
