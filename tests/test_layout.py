"""Data-directory paths and the partition-value sanitiser."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from daedalus.layout import DataLayout, UnsafeNameError, parse_segment_name, sanitize_partition_value, segment_name


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("BTC/USD", "BTC-USD"),
        ("BTC-USD", "BTC-USD"),
        ("../../etc", "_-_-etc"),
        ("a\\b", "a-b"),
        ("x\x00y\x1fz\x7f", "xyz"),
        ("k=v", "k-v"),
        ("2026-08-09", "2026-08-09"),
    ],
)
def test_sanitize_partition_value(value, expected):
    assert sanitize_partition_value(value) == expected


@pytest.mark.parametrize("value", ["", ".", "\x00", "x" * 200])
def test_unusable_values_raise(value):
    with pytest.raises(UnsafeNameError):
        sanitize_partition_value(value)


def test_hostile_values_never_escape_the_data_dir(tmp_path):
    layout = DataLayout(tmp_path)
    for hostile in ["../../x", "/etc/passwd", "..", "a/../../b", "\\..\\.."]:
        path = layout.part_file(hostile, hostile, {"product_id": hostile, "date": "2026-01-01"}, hostile)
        assert path.resolve().is_relative_to(tmp_path.resolve())
        assert len(path.relative_to(tmp_path).parts) == 6  # processed/src/channel/col=v/date=v/file


def test_paths(tmp_path):
    layout = DataLayout(tmp_path)
    assert layout.ready("coinbase") == tmp_path / "raw" / "ready" / "coinbase"
    assert layout.state_file("coinbase") == tmp_path / "processed" / "_state" / "coinbase.json"
    part = layout.part_file(
        "coinbase", "level2", {"product_id": "BTC-USD", "date": "2026-08-09"}, "segment_20260809T21_00001"
    )
    assert part == Path(
        tmp_path, "processed/coinbase/level2/product_id=BTC-USD/date=2026-08-09/part-segment_20260809T21_00001.parquet"
    )
    layout.ensure("coinbase")
    assert all(
        (tmp_path / "raw" / s / "coinbase").is_dir() for s in ("active", "ready", "processing", "archive", "quarantine")
    )


def test_segment_names_sort_in_time():
    name = segment_name(datetime(2026, 8, 9, 21, 5, tzinfo=UTC), 7, ".ndjson.zst")
    assert name == "segment_20260809T21_00007.ndjson.zst"
    parsed = parse_segment_name(name)
    assert parsed is not None and parsed.counter == 7 and parsed.stem == "segment_20260809T21_00007"
    names = [segment_name(datetime(2026, 8, 9, h, tzinfo=UTC), c) for h in (9, 10) for c in (1, 2, 10)]
    assert sorted(names) == names
    assert parse_segment_name("segment_x.ndjson") is None


def test_ccxt_symbols_become_readable_one_to_one_partition_paths(tmp_path):
    from daedalus.layout import DataLayout, symbol_component

    assert symbol_component("BTC/USD") == "BTC-USD"
    assert symbol_component("BTC/USDT:USDT") == "BTC-USDT_USDT"
    symbols = ["BTC/USD", "BTC-USD", "BTC_USD", "A/B-C", "A-B/C", "ETH/USDT:USDT", "../x", "a\x00b"]
    components = [symbol_component(s) for s in symbols]
    assert len(set(components)) == len(symbols)  # never two symbols in one directory
    assert all("/" not in c and c not in (".", "..") for c in components)
    path = DataLayout(tmp_path).raw_partition_dir("active", "ccxt", "trades", exchange="coinbase",
                                                  symbol="BTC/USD", hour="20260809T21")  # fmt: skip
    assert path.relative_to(tmp_path).as_posix() == (
        "raw/active/ccxt/trades/exchange=coinbase/symbol=BTC-USD/year=2026/month=08/day=09/hour=21"
    )
