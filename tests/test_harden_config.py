"""Issue 8, item 15 (and the config side of item 3): hostile or nonsensical configs and
flags get one line naming the key or flag, exit code 2, no traceback; YAML loading is
bounded in depth, size and alias expansion."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daedalus.config import MAX_CONFIG_BYTES, ConfigError, load_config, parse_config
from tests.conftest import REPO

DAEDALUS = [sys.executable, "-m", "daedalus"]

# 9 levels of 9 aliases: 9**9 (387 million) strings once expanded, from 342 bytes.
ALIAS_BOMB = "".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n',
        *(
            f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]\n"
            for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DAEDALUS, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), env={})
    return err.value.problems


def assert_refused(result: subprocess.CompletedProcess[str], expected: str) -> None:
    """Exit 2, no traceback, and one stderr line that says ``expected``."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if expected in line], result.stderr


def config_file(tmp_path: Path, data_dir: Path | None = None) -> Path:
    data = {"data_dir": str(data_dir or tmp_path / "data"), "coinbase": {"ws_url": "ws://127.0.0.1:9/ws"}}
    return write(tmp_path, yaml.safe_dump(data), "run.yaml")


# --- YAML loading is bounded -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "coinbase:\n  x: " + "[" * 20_000 + "]" * 20_000 + "\n",  # flow style
        "".join("  " * i + f"k{i}:\n" for i in range(300)) + "  " * 300 + "v\n",  # block style
    ],
    ids=["flow", "block"],
)
def test_deeply_nested_yaml_is_refused_by_depth(tmp_path, text):
    [problem] = problems_of(tmp_path, text)
    assert "nested deeper than 64 levels" in problem


def test_alias_bomb_is_refused_quickly_in_bounded_memory(tmp_path):
    """Through the real CLI, in a fresh driver process whose only child is the CLI, so that
    RUSAGE_CHILDREN's peak RSS is the CLI's. The address-space limit makes an unbounded
    loader fail with MemoryError instead of taking the machine's memory."""
    bomb = write(tmp_path, ALIAS_BOMB, "bomb.yaml")
    assert len(ALIAS_BOMB) < 400
    driver = (
        "import resource, subprocess, sys\n"
        "def limit():\n"
        "    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True, preexec_fn=limit)\n"
        "sys.stderr.write(r.stderr)\n"
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", driver, *DAEDALUS, "config", "check", str(bomb)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    code, peak_kib = map(int, result.stdout.split())
    assert_refused(subprocess.CompletedProcess([], code, "", result.stderr), "expands to more than 100,000 values")
    assert peak_kib < 200 * 1024, f"peak RSS {peak_kib // 1024} MB"


def test_recursive_alias_is_refused(tmp_path):
    [problem] = problems_of(tmp_path, "coinbase:\n  product_ids: &p [BTC-USD, *p]\n")
    assert problem.startswith("coinbase.product_ids.1: alias *p refers to a node that contains it")


def test_ordinary_anchors_and_merge_keys_still_work(tmp_path):
    text = (
        "coinbase:\n  product_ids: &products [BTC-USD, ETH-USD]\n"
        "ccxt:\n  exchanges:\n"
        "    kraken: &kraken {channels: {watchTicker: *products}, max_orderbook_depth: 10}\n"
        "    bitstamp: {<<: *kraken, max_orderbook_depth: 5}\n"
    )
    config = load_config(write(tmp_path, text), env={})
    assert [(k, e.channels, e.max_orderbook_depth) for k, e in config.ccxt.exchanges.items()] == [
        ("kraken", {"watchTicker": ["BTC-USD", "ETH-USD"]}, 10),
        ("bitstamp", {"watchTicker": ["BTC-USD", "ETH-USD"]}, 5),
    ]


def test_oversized_file_is_refused_without_parsing(tmp_path):
    [problem] = problems_of(tmp_path, "# " + "x" * MAX_CONFIG_BYTES + "\n")
    assert problem == "file is larger than 1024 KiB: not a configuration"


def test_duplicate_keys_are_errors_naming_the_key_path(tmp_path):
    text = (
        "ingestion:\n  batch_size: 10\n  fsync: true\n  batch_size: 20\n"
        "coinbase: {enabled: true, enabled: false}\n"
        "etl:\n  channels:\n    bars: {interval: 1m}\n    bars: {interval: 5m}\n"
    )
    assert problems_of(tmp_path, text) == [
        "ingestion.batch_size: duplicate key (lines 2 and 4; give it once)",
        "coinbase.enabled: duplicate key (lines 5 and 5; give it once)",
        "etl.channels.bars: duplicate key (lines 8 and 9; give it once)",
    ]


def test_yaml_problems_through_the_cli(tmp_path):
    deep = write(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n", "deep.yaml")
    assert_refused(run("config", "check", str(deep)), "nested deeper than 64 levels")
    dup = write(tmp_path, "data_dir: /a\ndata_dir: /b\n", "dup.yaml")
    assert_refused(run("config", "check", str(dup)), "data_dir: duplicate key (lines 1 and 2; give it once)")


# --- Numbers are finite and bounded ----------------------------------------------------------


@pytest.mark.parametrize("key", ["flush_interval_seconds", "segment_max_mb", "reconnect_delay"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_floats_are_refused(tmp_path, key, value):
    [problem] = problems_of(tmp_path, f"ingestion:\n  {key}: {value}\n")
    assert problem.startswith(f"ingestion.{key}: Input should be a finite number (got ")


@pytest.mark.parametrize(
    ("section", "key", "value", "reason"),
    [
        ("ingestion", "segment_max_mb", 1e-300, "greater than or equal to 0.01"),
        ("ingestion", "segment_max_mb", 0.001, "greater than or equal to 0.01"),
        ("ingestion", "segment_max_mb", 16_385, "less than or equal to 16384"),
        ("ingestion", "flush_interval_seconds", 0, "greater than 0"),
        ("ingestion", "flush_interval_seconds", 3601, "less than or equal to 3600"),
        ("ingestion", "queue_maxsize", -1, "greater than 0"),
        ("ingestion", "batch_size", 10**9, "less than or equal to 1000000"),
        ("ingestion", "reconnect_delay", 1e300, "less than or equal to 86400"),
        ("ingestion", "watchdog_timeout_seconds", -1, "greater than 0"),
        ("ingestion", "max_reconnect_attempts", -2, "greater than or equal to -1"),
        ("coinbase", "max_products_per_connection", 0, "greater than 0"),
        ("etl", "poll_interval_seconds", 0, "greater than 0"),
        ("sync", "interval", -5, "greater than 0"),
        ("supervisor", "status_port", 70_000, "less than or equal to 65535"),
        ("supervisor", "memory_critical_mb", -1, "greater than 0"),
    ],
)
def test_numbers_out_of_bounds_name_the_key(section, key, value, reason):
    with pytest.raises(ConfigError) as err:
        parse_config({section: {key: value}})
    [problem] = err.value.problems
    assert problem.startswith(f"{section}.{key}: Input should be {reason} (got ")


def test_bounds_accept_their_limits():
    config = parse_config(
        {
            "ingestion": {"segment_max_mb": 0.01, "flush_interval_seconds": 3600},
            "etl": {"channels": {"book_snapshot": {"snapshot_interval_ms": 86_400_000}}},
        }
    )
    assert config.ingestion.segment_max_mb == 0.01 and config.ingestion.flush_interval_seconds == 3600
    assert parse_config({"ingestion": {"segment_max_mb": 16_384}}).ingestion.segment_max_mb == 16_384


@pytest.mark.parametrize(
    ("interval", "reason"),
    [
        ("0m", "must be at least 1s and at most 1d"),
        ("0s", "must be at least 1s and at most 1d"),
        ("25h", "must be at least 1s and at most 1d"),
        ("99999999999999999999d", "must be a whole number and a unit"),
        ("1w", "must be a whole number and a unit"),
        ("\u0663m", "must be a whole number and a unit"),  # Arabic-Indic 3
        ("-1m", "must be a whole number and a unit"),
        ("1m\n", "must be a whole number and a unit"),  # `$` would accept the newline, then crash
    ],
)
def test_bar_interval_must_be_positive_and_sensible(interval, reason):
    with pytest.raises(ConfigError) as err:
        parse_config({"etl": {"channels": {"bars": {"interval": interval}}}})
    [problem] = err.value.problems
    assert problem.startswith(f"etl.channels.bars.interval: {reason}")


@pytest.mark.parametrize("interval", ["1s", "15m", "1h", "1d", "86400s"])
def test_sensible_bar_intervals_are_accepted(interval):
    assert parse_config({"etl": {"channels": {"bars": {"interval": interval}}}}).etl.channels.bars.interval == interval


# --- The data directory ----------------------------------------------------------------------


def test_data_dir_that_is_a_file_or_under_a_file_is_refused(tmp_path):
    file = tmp_path / "plain-file"
    file.write_text("x")
    with pytest.raises(ConfigError) as err:
        parse_config({"data_dir": str(file), "etl": {"output_dir": str(file / "out")}})
    data_dir, output_dir = err.value.problems
    assert data_dir.startswith(f"data_dir: {file} is a file, not a directory (got ")
    assert output_dir.startswith(f"etl.output_dir: {file} is a file, so no directory can be created under it")
    under = str(config_file(tmp_path, file / "data"))
    assert_refused(run("config", "check", under), f"data_dir: {file} is a file, so no directory can be created")


@pytest.mark.parametrize("command", ["ingest", "etl"])
def test_unwritable_data_dir_is_one_line_at_start(tmp_path, command):
    """Root passes permission checks, so the blocked write is a file where ``raw/`` must be."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "raw").write_text("not a directory")
    result = run(command, "--config", str(config_file(tmp_path, data)), timeout=30)
    assert_refused(result, f"data_dir: cannot write to {data / 'raw'}: it is a file, not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only directory")
def test_read_only_data_dir_is_one_line_at_start(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o500)
    try:
        result = run("etl", "--config", str(config_file(tmp_path, data)), timeout=30)
    finally:
        data.chmod(0o700)
    assert_refused(result, f"data_dir: cannot write to {data / 'raw'}: Permission denied")


# --- Flags -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf", "1e9"])
def test_etl_poll_interval_must_be_positive_and_finite(tmp_path, value):
    """Before: -5 spun a core, 0 silently became 10 s (the watcher then ran forever)."""
    result = run("etl", "--config", str(config_file(tmp_path)), "--watch", "--poll-interval", value, timeout=30)
    assert_refused(result, "--poll-interval: must be more than 0 and at most 86400 seconds (got ")


@pytest.mark.parametrize("value", ["-1", "nan", "-inf", "1e9"])
def test_ingest_stats_interval_must_be_off_or_positive(tmp_path, value):
    """Before: -1 printed the statistics block in a busy loop (300k lines)."""
    result = run("ingest", "--config", str(config_file(tmp_path)), "--stats-interval", value, timeout=30)
    assert_refused(result, "--stats-interval: must be 0 (off) or at most 86400 seconds (got ")
