"""The `daedalus` command as a user runs it: real child processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys

import aiohttp
import orjson

from tests.conftest import REPO

DAEDALUS = [sys.executable, "-m", "daedalus"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DAEDALUS, *args], capture_output=True, text=True, timeout=60, env=env, cwd=REPO)


def test_help_lists_every_sub_command():
    out = run("--help").stdout
    for command in ("sim", "config", "version"):
        assert re.search(rf"│ {command}\s", out), out


def test_config_check_prints_the_effective_config_with_secrets_masked():
    env = {**os.environ, "COINBASE_API_KEY": "very-secret-key"}
    result = run("config", "check", "config/example.yaml", env=env)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stderr
    assert "very-secret-key" not in result.stdout
    assert "api_key: '**********'" in result.stdout
    assert "batch_size: 100" in result.stdout


def test_config_check_reports_problems_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("coinbase:\n  product_ids: ['../etc']\ningestion:\n  fsync: maybe\n")
    result = run("config", "check", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "coinbase.product_ids.0: product id '../etc' contains a path separator" in result.stderr
    assert "ingestion.fsync: Input should be a valid boolean" in result.stderr


async def test_sim_command_prints_ready_and_serves():
    proc = await asyncio.create_subprocess_exec(
        *DAEDALUS,
        "sim",
        "--port",
        "0",
        "--products",
        "BTC-USD,SOL-USD",
        "--rate",
        "200",
        "--seed",
        "5",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        match = re.match(
            r"daedalus sim ready ws=(ws://127\.0\.0\.1:(\d+)/ws) rest=(\S+) products=BTC-USD,SOL-USD", line
        )
        assert match, line
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{match.group(3)}/api/v3/brokerage/market/products") as r:
                assert [p["product_id"] for p in (await r.json())["products"]] == ["BTC-USD", "SOL-USD"]
            async with http.ws_connect(match.group(1)) as ws:
                await ws.send_str('{"type":"subscribe","channel":"level2","product_ids":["SOL-USD"]}')
                snapshot = orjson.loads((await ws.receive(timeout=10)).data)
                assert snapshot["channel"] == "l2_data" and snapshot["events"][0]["product_id"] == "SOL-USD"
        proc.send_signal(signal.SIGTERM)  # systemd's stop: a clean exit
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_sim_rejects_bad_flags():
    result = run("sim", "--drop-rate", "2")
    assert result.returncode == 2 and "drop_rate must be between 0 and 1" in result.stderr
    result = run("sim", "--rate", "fast")
    assert result.returncode == 2 and "'max'" in result.stderr
