"""The Databento client and codec are an optional extra (``pip install 'daedalus[databento]'``):
without them every command that needs them says what to install, exit 2, before touching data."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

FIXTURE = REPO.parent / "shared" / "data" / "databento" / "GLBX.MDP3" / "test_data.trades.dbn.zst"
HINT = "pip install 'daedalus[databento]'"


def daedalus_without(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``daedalus ARGS`` in a child where ``import <module>`` fails, as it does without the extra."""
    block = f"import sys; sys.modules[{module!r}] = None; from daedalus.cli import app; app()"
    return subprocess.run([sys.executable, "-c", block, *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    subscriptions = [{"dataset": "GLBX.MDP3", "schema": "trades", "symbols": ["ESH1"]}]
    path.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"), "coinbase": {"enabled": False},
        "databento": {"enabled": True, "api_key": "db-" + "A" * 29, "gateway": "127.0.0.1", "port": 1,
                      "subscriptions": subscriptions}}))  # fmt: skip
    return path


def test_ingest_without_the_client_says_what_to_install(tmp_path):
    result = daedalus_without("databento", "ingest", "--source", "databento", "--config", str(write_config(tmp_path)))
    assert result.returncode == 2, result.stderr
    assert HINT in result.stderr and "Traceback" not in result.stderr


def test_etl_without_the_codec_claims_no_segment(tmp_path):
    config = write_config(tmp_path)
    ready = tmp_path / "data" / "raw" / "ready" / "databento" / "GLBX.MDP3"
    ready.mkdir(parents=True)
    shutil.copy(FIXTURE, ready / "segment_20201228T00_00001.dbn.zst")
    result = daedalus_without("databento_dbn", "etl", "--source", "databento", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert HINT in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in ready.iterdir()] == ["segment_20201228T00_00001.dbn.zst"]  # not claimed
    assert not (tmp_path / "data" / "raw" / "processing").exists()


def test_the_gateway_simulator_without_the_codec_says_what_to_install():
    result = daedalus_without("databento_dbn", "sim", "--protocol", "databento", "--port", "0")
    assert result.returncode == 2, result.stderr
    assert HINT in result.stderr and "Traceback" not in result.stderr
