"""``daedalus run`` flags that answer without supervising: --dry-run and bad --sources."""

from __future__ import annotations

import shlex
import subprocess
import sys

from tests.conftest import REPO
from tests.supervisor_helpers import DAEDALUS, write_yaml


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DAEDALUS, *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def test_dry_run_prints_the_exact_command_lines(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", {"data_dir": str(tmp_path / "data")})
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([*DAEDALUS, "run", "--config", "c.yaml", "--dry-run"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    absolute = str(config.resolve())
    assert result.stdout.splitlines() == [
        "ingest-coinbase: " + shlex.join([sys.executable, "-m", "daedalus", "ingest", "--config", absolute,
                                          "--source", "coinbase"]),
        "etl: " + shlex.join([sys.executable, "-m", "daedalus", "etl", "--config", absolute, "--watch",
                              "--source", "coinbase"]),
    ]
    assert not (tmp_path / "data" / "run" / "supervisor.lock").exists()  # nothing started, nothing locked


def test_sources_are_checked(tmp_path):
    config = str(write_yaml(tmp_path / "c.yaml", {"data_dir": str(tmp_path / "data")}))
    unknown = run("run", "--config", config, "--sources", "coinbase,kraken", "--dry-run")
    assert unknown.returncode == 2
    assert "--sources: unknown source 'kraken' (available: ccxt, coinbase, databento)" in unknown.stderr
    later = run("run", "--config", config, "--sources", "ccxt", "--dry-run")
    assert later.returncode == 2 and "--sources: ccxt is disabled in the config (ccxt.enabled: false)" in later.stderr
    assert "Traceback" not in unknown.stderr + later.stderr


def test_a_log_dir_that_cannot_be_written_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "not-a-dir").write_text("a file where the logs should go")
    supervisor = {"log_dir": str(tmp_path / "not-a-dir" / "logs")}
    config = write_yaml(tmp_path / "c.yaml", {"data_dir": str(tmp_path / "data"), "supervisor": supervisor})
    result = run("run", "--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "supervisor.log_dir" in result.stderr
    assert not (tmp_path / "data" / "run" / "supervisor.lock").exists()  # refused before anything started
