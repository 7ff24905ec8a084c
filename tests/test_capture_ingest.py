"""`daedalus ingest` against the simulator: nothing lost, nothing twice, clear when things fail."""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import yaml

from daedalus.capture.pipeline import IngestPipeline
from daedalus.capture.records import iter_lines
from daedalus.config import parse_config
from tests.capture_helpers import frame_bytes, ingest_config, read_records, segment_files
from tests.conftest import REPO

PRODUCTS = ["BTC-USD", "ETH-USD"]


class Running:
    """An in-process pipeline task, stopped like SIGTERM would."""

    def __init__(self, config: dict) -> None:
        self.pipeline = IngestPipeline(parse_config(config))
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(self.pipeline.run(self.stop))

    async def close(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 15)


async def subscribed(sim, channels: int = 4, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not sim.connections or len(sim.connections[0].subs) < channels:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # the last acknowledgement is on its way


@pytest.mark.parametrize("compression", ["none", "zstd"])
async def test_every_frame_is_captured_once_in_order_byte_equal(make_sim, tmp_path, compression):
    sim = await make_sim(rate=0, keep_sent=True)
    run = Running(ingest_config(tmp_path, sim.ws_url, raw_compression=compression, segment_max_mb=0.1))
    await subscribed(sim)
    await sim.advance(4000)
    conn = sim.connections[0]
    async with asyncio.timeout(10):
        while run.pipeline.writer.stats.written < len(conn.sent_frames):
            await asyncio.sleep(0.05)
    await run.close()
    assert frame_bytes(tmp_path) == conn.sent_frames
    assert len(conn.sent_frames) > 4000
    files = segment_files(tmp_path)
    assert len(files) >= 2 and all(
        f.name.endswith(".ndjson.zst" if compression == "zstd" else ".ndjson") for f in files
    )
    records = read_records(tmp_path)
    assert records[0]["event"] == "connect"
    subscribes = [r["message"]["channel"] for r in records if r.get("event") == "subscribe"]
    assert subscribes == ["ticker", "level2", "market_trades", "heartbeats"]
    assert records[-1] == {**records[-1], "event": "disconnect", "reason": "shutdown"}
    recv = [r["recv_ns"] for r in records]
    assert recv == sorted(recv)


async def test_dropped_frames_write_gaps_and_resubscribe_level2(make_sim, tmp_path):
    sim = await make_sim(rate=0)
    run = Running(ingest_config(tmp_path, sim.ws_url))
    await subscribed(sim)
    sim.faults.drop_rate = 0.02
    for _ in range(20):
        await sim.advance(100)
        await asyncio.sleep(0.05)
    sim.faults.drop_rate = 0.0
    await sim.advance(200)
    await asyncio.sleep(0.5)
    await run.close()
    records = read_records(tmp_path)
    gaps = [r for r in records if r.get("event") == "gap"]
    assert gaps and len(gaps) == run.pipeline.collectors[0].stats.gaps
    for gap in gaps:
        assert gap["received"] > gap["expected"]
    first_gap = records.index(gaps[0])
    after = records[first_gap:]
    resubscribe = next(i for i, r in enumerate(after) if r.get("event") == "subscribe")
    assert after[resubscribe]["message"] == {"type": "subscribe", "product_ids": PRODUCTS, "channel": "level2"}
    snapshots = [
        r
        for r in after[resubscribe:]
        if "msg" in r and r["msg"]["channel"] == "l2_data" and r["msg"]["events"][0]["type"] == "snapshot"
    ]
    assert {s["msg"]["events"][0]["product_id"] for s in snapshots} == set(PRODUCTS)
    seqs = [r["msg"]["sequence_num"] for r in records if "msg" in r]
    missing = sum(b - a - 1 for a, b in itertools.pairwise(seqs) if b > a + 1)
    assert missing == sim.closed_connections[0].dropped


async def test_server_disconnects_reconnect_with_capped_backoff(make_sim, tmp_path, monkeypatch):
    from daedalus.capture import coinbase

    pauses: list[float] = []  # the collector's own choices, unchanged (no wall clock: machines are shared)

    def recorded(*args, **kwargs):
        pause = reconnect_pause(*args, **kwargs)
        pauses.append(pause)
        return pause

    reconnect_pause = coinbase.reconnect_pause
    monkeypatch.setattr(coinbase, "reconnect_pause", recorded)
    sim = await make_sim(rate=200)
    sim.faults.disconnect_every = 0.4
    run = Running(ingest_config(tmp_path, sim.ws_url, reconnect_delay=0.05, max_reconnect_delay=0.15))
    async with asyncio.timeout(60):
        while run.pipeline.collectors[0].stats.reconnects < 3:
            await asyncio.sleep(0.05)
    await run.close()
    records = read_records(tmp_path)
    events = [r for r in records if r.get("event") in ("connect", "disconnect")]
    connects = [r for r in events if r["event"] == "connect"]
    assert len(connects) >= 4
    assert run.pipeline.collectors[0].stats.reconnects == len(connects) - 1
    for down, up in zip(events[1::2], events[2::2], strict=False):
        assert down["event"] == "disconnect" and "closed by server (code 1001)" in down["reason"]
        assert up["event"] == "connect"
    assert len(pauses) >= 3 and max(pauses) <= 0.15 + 1e-9  # capped at max_reconnect_delay
    assert len(frame_bytes(tmp_path)) > 200


async def test_watchdog_reconnects_a_silent_connection(make_sim, tmp_path):
    sim = await make_sim(rate=100, heartbeat_interval=0.1)
    run = Running(ingest_config(tmp_path, sim.ws_url, watchdog_timeout_seconds=0.5))
    await subscribed(sim)
    sim.stall(5.0)  # nothing reaches the client, heartbeats included
    async with asyncio.timeout(60):
        while run.pipeline.collectors[0].stats.reconnects < 1:
            await asyncio.sleep(0.05)
    await run.close()
    reasons = [r["reason"] for r in read_records(tmp_path) if r.get("event") == "disconnect"]
    assert reasons[0].startswith("watchdog")


async def test_malformed_frames_are_kept_as_raw_strings(make_sim, tmp_path):
    sim = await make_sim(rate=0)
    run = Running(ingest_config(tmp_path, sim.ws_url))
    await subscribed(sim)
    sim.faults.malformed_rate = 0.05
    await sim.advance(1000)
    await asyncio.sleep(0.5)
    await run.close()
    raw = [r["raw"] for r in read_records(tmp_path) if "raw" in r]
    assert len(raw) == sim.closed_connections[0].malformed > 10
    assert all(text.startswith('{"channel"') for text in raw)


async def test_products_are_spread_over_connections(make_sim, tmp_path):
    sim = await make_sim(rate=50, products=("BTC-USD", "ETH-USD", "SOL-USD"))
    config = ingest_config(tmp_path, sim.ws_url)
    config["coinbase"].update(product_ids=["BTC-USD", "ETH-USD", "SOL-USD"], max_products_per_connection=2)
    run = Running(config)
    async with asyncio.timeout(10):
        while len(sim.connections) < 2 or any(len(c.subs) < 4 for c in sim.connections):
            await asyncio.sleep(0.05)
    assert sorted(tuple(c.subs["level2"]) for c in sim.connections) == [("BTC-USD", "ETH-USD"), ("SOL-USD",)]
    await run.close()
    assert {r["conn"] for r in read_records(tmp_path)} == {1, 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "ingest.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_unreachable_server_is_retried_with_clear_logs(tmp_path):
    config = ingest_config(tmp_path / "data", f"ws://127.0.0.1:{free_port()}/ws")
    log = tmp_path / "stderr.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daedalus", "ingest", "--config", str(write_config(tmp_path, config))],
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + 60  # a loaded machine may take seconds just to start the child
        while log.read_text().count("collector_reconnecting") < 3 and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    err = log.read_text()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    retries = [line for line in err.splitlines() if "collector_reconnecting" in line]
    assert len(retries) >= 3
    assert "Cannot connect to host 127.0.0.1" in retries[0] and "attempt=1" in retries[0]
    assert "[coinbase#1]" in out and "[writer]" in out  # the final statistics block


def test_sigkill_at_random_moments_loses_at_most_a_flush_and_never_duplicates(tmp_path):
    asyncio.run(_kill_and_restart(tmp_path, kills=5))


async def _kill_and_restart(tmp_path: Path, kills: int) -> None:
    from daedalus.sim import SimConfig, SimServer

    rate = 1000.0
    flush = 0.2
    async with SimServer(SimConfig(rate=rate, keep_sent=True, heartbeat_interval=0.2)) as sim:
        data = tmp_path / "data"
        config = ingest_config(data, sim.ws_url, flush_interval_seconds=flush, batch_size=10_000)
        path = write_config(tmp_path, config)
        rng = random.Random(7)
        for round_ in range(kills + 1):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "daedalus",
                "ingest",
                "--config",
                str(path),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                cwd=REPO,
            )
            async with asyncio.timeout(20):
                while not sim.connections or len(sim.connections[0].subs) < 4:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            if round_ < kills:
                proc.send_signal(signal.SIGKILL)
            else:
                await sim.pause()  # nothing in flight but heartbeats when the clean stop begins
                await asyncio.sleep(0.3)
                proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) in (-signal.SIGKILL, 0)
            async with asyncio.timeout(5):
                while sim.connections:
                    await asyncio.sleep(0.01)
        sessions = list(sim.closed_connections)
    assert len(sessions) == kills + 1
    assert not segment_files(data, "active")  # every leftover was recovered at the next start
    for path in segment_files(data):
        for line in iter_lines(path):  # every ready file reads to its last byte
            orjson.loads(line)
    captured = frame_bytes(data)
    assert len(captured) == len(set(captured))  # no record twice
    position = {frame: (i, n) for i, s in enumerate(sessions) for n, frame in enumerate(s.sent_frames)}
    per_session: dict[int, list[int]] = {}
    for frame in captured:
        i, n = position[frame]  # nothing that was not sent
        per_session.setdefault(i, []).append(n)
    for i, session in enumerate(sessions):
        got = per_session.get(i, [])
        assert got == list(range(len(got)))  # a prefix, in order
        missing = len(session.sent_frames) - len(got)
        if i < kills:  # a kill loses at most what arrived since the last flush (+ what was in flight)
            assert missing <= rate * (flush + 0.15) + 50, (i, missing)
        else:  # a clean stop loses only what was on the wire during the close handshake
            assert missing <= 1, missing
    for torn in (data / "raw" / "quarantine" / "coinbase").iterdir():
        assert not torn.read_bytes().endswith(b"}\n")  # only cut-off records end up there


async def test_api_keys_sign_each_subscribe_with_an_es256_jwt(make_sim, tmp_path):
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    sim = await make_sim(rate=10)
    config = ingest_config(tmp_path, sim.ws_url)
    config["coinbase"].update(api_key="organizations/o/apiKeys/k", api_secret=pem.replace("\n", "\\n"))
    run = Running(config)
    await subscribed(sim)
    await run.close()
    requests = list(sim.closed_connections[0].requests)
    assert len(requests) == 4
    for request in requests:
        claims = jwt.decode(request["jwt"], private.public_key(), algorithms=["ES256"])
        assert claims["sub"] == "organizations/o/apiKeys/k" and claims["iss"] == "cdp"
        assert claims["exp"] - claims["nbf"] == 120
        assert jwt.get_unverified_header(request["jwt"])["kid"] == "organizations/o/apiKeys/k"
    segments = b"".join(p.read_bytes() for p in segment_files(tmp_path))
    assert b"jwt" not in segments and b"PRIVATE" not in segments


def test_unusable_api_secret_is_a_clear_error(tmp_path):
    config = ingest_config(tmp_path / "data", "ws://127.0.0.1:9/ws")
    config["coinbase"].update(api_key="k", api_secret="not a key")
    result = subprocess.run(
        [sys.executable, "-m", "daedalus", "ingest", "--config", str(write_config(tmp_path, config))],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot authenticate: coinbase.api_secret is not a usable EC private key" in result.stderr
    assert "not a key" not in result.stderr


async def test_a_second_ingest_on_the_same_data_dir_is_refused(make_sim, tmp_path):
    sim = await make_sim(rate=10)
    config = ingest_config(tmp_path / "data", sim.ws_url)
    run = Running(config)
    await subscribed(sim)
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "daedalus", "ingest", "--config", str(write_config(tmp_path, config))],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    await run.close()
    assert result.returncode == 1  # transient: a supervisor retries it with backoff
    assert "another daedalus ingest is already writing to" in result.stderr
    assert len(sim.closed_connections) == 1  # the second one never connected
