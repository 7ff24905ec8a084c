"""Issue 8, items 6 and 15 (sim): replay finds products whatever the JSON spacing,
``--products`` adds to them, and every bad ``daedalus sim`` value is one line, exit 2."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from daedalus.sim import SimConfig, SimServer
from daedalus.sim.replay import load_recording
from tests.conftest import REPO

DAEDALUS = [sys.executable, "-m", "daedalus"]

SNAPSHOT = {
    "channel": "l2_data",
    "client_id": "",
    "timestamp": "2026-08-09T12:00:00.000000Z",
    "sequence_num": 7,
    "events": [
        {
            "type": "snapshot",
            "product_id": "SOL-USD",
            "updates": [
                {"side": "bid", "event_time": "2026-08-09T12:00:00Z", "price_level": "150.1", "new_quantity": "2"},
                {"side": "offer", "event_time": "2026-08-09T12:00:00Z", "price_level": "150.2", "new_quantity": "3"},
            ],
        }
    ],
}
TRADES = {
    "channel": "market_trades",
    "client_id": "",
    "timestamp": "2026-08-09T12:00:00.100000Z",
    "sequence_num": 8,
    "events": [
        {
            "type": "update",
            "trades": [
                {
                    "trade_id": "1",
                    "product_id": "DOGE-USD",
                    "price": "0.12",
                    "size": "100",
                    "side": "BUY",
                    "time": "2026-08-09T12:00:00.1Z",
                }
            ],
        }
    ],
}
RECORDED_PRODUCTS = ["DOGE-USD", "SOL-USD"]  # neither is a default product: detection cannot be faked


def spaced(frame: dict, style: str) -> str:
    """The frame as a publisher other than Coinbase might have spaced it."""
    return json.dumps(frame, indent=2) if style == "pretty" else json.dumps(frame)  # ", " and ": "


def write_reference(path: Path, style: str) -> None:
    """The ``shared/data`` format: the frame is a JSON string under ``data``."""
    lines = [{"t": "header", "format": "jsonl", "exchange": "coinbase"}]
    lines += [
        {"t": "recv", "conn": 1, "ts": 1786276800.0 + i / 10, "data": spaced(f, style)}
        for i, f in enumerate((SNAPSHOT, TRADES))
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def write_segment(path: Path, style: str) -> None:
    """A Daedalus raw segment: the frame spliced in verbatim, newlines made spaces (architecture 3.2)."""
    lines = [b'{"recv_ns":1786276800000000000,"conn":1,"event":"connect","url":"ws://x"}']
    for i, frame in enumerate((SNAPSHOT, TRADES)):
        text = spaced(frame, style).replace("\n", " ").encode()
        lines.append(b'{"recv_ns":%d,"conn":1,"msg":%s}' % (1786276800000000000 + i * 10**8, text))
    path.write_bytes(b"\n".join(lines) + b"\n")


def recording(tmp_path: Path, fmt: str, style: str) -> Path:
    if fmt == "reference":
        path = tmp_path / "recording.jsonl"
        write_reference(path, style)
        return path
    folder = tmp_path / "ready" / "coinbase"
    folder.mkdir(parents=True)
    write_segment(folder / "segment_20260809T12_00001.ndjson", style)
    return folder


@pytest.mark.parametrize("style", ["pretty", "dumps"])
@pytest.mark.parametrize("fmt", ["reference", "segments"])
async def test_replay_serves_products_of_a_spaced_recording(make_sim, connect, tmp_path, fmt, style):
    sim = await make_sim(replay=recording(tmp_path, fmt, style), speed=0)
    assert sim.products == RECORDED_PRODUCTS
    client = await connect(sim.ws_url)
    await client.subscribe("level2", ["SOL-USD"])  # rejected as an unknown product before the fix
    await client.subscribe("market_trades", ["DOGE-USD"])
    snapshot, trades = await client.recv_n(2)
    assert snapshot["events"][0]["product_id"] == "SOL-USD" and snapshot["sequence_num"] == 0
    assert trades["events"][0]["trades"][0]["product_id"] == "DOGE-USD" and trades["sequence_num"] == 1


async def test_products_given_in_process_add_to_the_recording(make_sim, connect, tmp_path):
    sim = await make_sim(replay=recording(tmp_path, "reference", "pretty"), speed=0, products=("XRP-USD",))
    assert sim.products == ["DOGE-USD", "SOL-USD", "XRP-USD"]


async def test_products_flag_adds_to_the_detected_products(tmp_path):
    path = recording(tmp_path, "reference", "dumps")
    proc = await asyncio.create_subprocess_exec(
        *DAEDALUS, "sim", "--port", "0", "--replay", str(path), "--products", "XRP-USD,SOL-USD",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert re.search(r" products=DOGE-USD,SOL-USD,XRP-USD ", line), line
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def bad_replay_paths(tmp_path: Path) -> dict[str, Path]:
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('5\n[1, 2]\n"text"\n{"t": "recv"}\n')  # JSON, but no recording line
    not_zstd = tmp_path / "recording.jsonl.zst"
    not_zstd.write_bytes(b"this is not zstd at all\n" * 10)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    return {"passwd": passwd, "numbers": numbers, "not_zstd": not_zstd, "empty_dir": empty_dir}


BAD_FLAGS = [
    (["--port", "99999"], "--port"),
    (["--port", "-1"], "--port"),
    (["--levels", "-5"], "--levels"),
    (["--levels", "0"], "--levels"),
    (["--products", "../../x"], "--products"),
    (["--products", "BTC-USD,ETH/USD"], "--products"),
    (["--products", ","], "--products"),
    (["--speed", "-1"], "--speed"),
    (["--speed", "nan"], "--speed"),
    (["--rate", "inf"], "--rate"),
    (["--rate", "fast"], "--rate"),
    (["--drop-rate", "2"], "--drop-rate"),
    (["--stall-seconds", "inf"], "--stall-seconds"),
    (["--disconnect-every", "nan"], "--disconnect-every"),
    (["--replay", "{passwd}"], "no Coinbase frames found"),
    (["--replay", "{numbers}"], "no Coinbase frames found"),
    (["--replay", "{not_zstd}"], "no Coinbase frames found"),
    (["--replay", "{empty_dir}"], "no segment_"),
    (["--replay", "{tmp}/missing.jsonl"], "does not exist"),
]


@pytest.mark.parametrize(("args", "expected"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_sim_rejects_a_bad_value_in_one_line(tmp_path, args, expected):
    paths = {name: str(p) for name, p in bad_replay_paths(tmp_path).items()}
    argv = [a.format(tmp=tmp_path, **paths) for a in args]
    result = subprocess.run([*DAEDALUS, "sim", *argv], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{args[0]} ") or lines[0].startswith(f"{args[0]}:"), lines[0]
    assert expected in lines[0]


def test_in_process_config_is_checked_too():
    from daedalus.sim import SimConfigError

    for config in (
        SimConfig(levels=-5),
        SimConfig(port=70000),
        SimConfig(speed=float("inf")),
        SimConfig(products=("a/b",)),
    ):
        with pytest.raises(SimConfigError):
            SimServer(config)


def test_a_damaged_segment_keeps_the_frames_of_the_others(tmp_path):
    from daedalus.sim.replay import RecordingError

    folder = recording(tmp_path, "segments", "dumps")
    (folder / "segment_20260809T12_00002.ndjson.zst").write_bytes(b"not a zstd frame\n" * 10)
    rec = load_recording(folder)
    assert len(rec.frames) == 2 and sorted(rec.products) == RECORDED_PRODUCTS
    assert rec.damaged and rec.damaged[0].startswith("segment_20260809T12_00002.ndjson.zst: ")
    with pytest.raises(RecordingError, match="no Coinbase frames found"):
        load_recording(bad_replay_paths(tmp_path)["not_zstd"])


def test_products_of_a_huge_pretty_frame_are_found(tmp_path):
    """A multi-MB pretty snapshot: its product id is found near its start, the rest is not scanned."""
    frame = dict(SNAPSHOT, events=[dict(SNAPSHOT["events"][0], updates=SNAPSHOT["events"][0]["updates"] * 40_000)])
    path = tmp_path / "big.jsonl"
    path.write_bytes(orjson.dumps({"t": "recv", "ts": 1.0, "data": json.dumps(frame, indent=2)}) + b"\n")
    assert load_recording(path).products == {"SOL-USD"}


@pytest.mark.parametrize(
    ("setting", "value"),
    [("port", 80.5), ("levels", 2.5), ("levels", 3.0), ("seed", 1.5), ("port", True), ("max_frame_bytes", 0)],
)
def test_integer_settings_take_integers_only(setting, value):
    """In process a float passed the range check (``SimConfig(port=80.5)``) and failed far away."""
    from daedalus.sim import SimConfigError

    with pytest.raises(SimConfigError, match=f"^{setting} must be an integer") as caught:
        SimServer(SimConfig(**{setting: value}))
    assert caught.value.name == setting
