"""``daedalus query`` over a small processed dataset made from the simulator (with gaps):
every view, timestamps usable by DuckDB's date functions, --schema, every format, each
preset against a reference computed here with Polars from the Parquet files, errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import datetime, timedelta

import polars as pl
import pytest

from daedalus.config import parse_config
from daedalus.query.api import QueryError, run_preset, run_sql
from daedalus.query.presets import PresetError, preset_sql
from daedalus.query.views import dataset_views, open_dataset, sql_identifier, sql_string
from tests.conftest import REPO
from tests.query_helpers import SimDataset, build_dataset

VIEWS = {"level2", "book_snapshot_5", "market_trades", "ticker", "candles", "bars_1s"}


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> SimDataset:
    return build_dataset(tmp_path_factory.mktemp("query"))


def files(ds: SimDataset, channel: str) -> pl.DataFrame:
    """A dataset read straight from its Parquet files with Polars, partition columns added."""
    return pl.read_parquet(ds.processed / channel / "**" / "*.parquet", hive_partitioning=True)


def ns(column: str) -> pl.Expr:
    """A ``Datetime("ns", "UTC")`` column as integer nanoseconds."""
    return pl.col(column).dt.epoch("ns")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daedalus", "query", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)  # fmt: skip


# --- views ---------------------------------------------------------------------------


def test_every_view_is_there_with_partition_columns_and_plain_timestamps(ds):
    con = open_dataset(ds.config)
    views = dataset_views(con)
    assert set(views) == VIEWS  # names follow the config: book_snapshot.levels=5, bars.interval=1s
    for name, columns in views.items():
        types = dict(columns)
        assert types["product_id"] == "VARCHAR" and types["date"] == "DATE", name
        assert types["ts_recv"] == "TIMESTAMP" and types["ts_recv_ns"] == "BIGINT", name
        assert "TIME ZONE" not in str(types) and "TIMESTAMP_NS" not in str(types), name
        expected = files(ds, name)
        assert con.execute(f"SELECT count(*) FROM {name}").fetchone()[0] == expected.height > 0, name
        assert set(expected.columns) <= set(types), name
    assert dict(views["bars_1s"])["start"] == "TIMESTAMP" and "start_ns" in dict(views["bars_1s"])
    assert "bid_px_04" in dict(views["book_snapshot_5"]) and "bid_px_05" not in dict(views["book_snapshot_5"])


def test_timestamps_keep_their_exact_nanoseconds_and_utc_microseconds(ds):
    got = pl.from_arrow(run_sql(ds.config, "SELECT ts_recv, ts_recv_ns, ts_event_ns FROM level2"))
    ref = files(ds, "level2")
    assert sorted(got["ts_recv_ns"]) == sorted(ref.select(ns("ts_recv"))["ts_recv"])
    assert sorted(got["ts_event_ns"]) == sorted(ref.select(ns("ts_event"))["ts_event"])
    micro = got.select(pl.col("ts_recv").dt.epoch("us"), pl.col("ts_recv_ns") // 1000)
    assert (micro["ts_recv"] == micro["ts_recv_ns"]).all()  # the UTC instant, truncated to µs


def test_date_trunc_time_bucket_and_timestamp_literals_work(ds):
    ref = files(ds, "level2").select(ns("ts_recv").alias("t"))
    middle_ns = int(ref["t"].median())
    middle = datetime(1970, 1, 1) + timedelta(microseconds=middle_ns // 1000)
    literal = middle.isoformat(sep=" ")
    expected = ref.filter(pl.col("t") // 1000 >= middle_ns // 1000).height
    table = run_sql(
        ds.config,
        f"""
        SELECT (SELECT count(*) FROM level2 WHERE ts_recv >= TIMESTAMP '{literal}') AS plain,
               (SELECT count(*) FROM level2 WHERE ts_recv >= TIMESTAMPTZ '{literal}+00') AS tz,
               (SELECT count(*) FROM level2 WHERE ts_recv >= '{literal}') AS text,
               (SELECT count(DISTINCT date_trunc('minute', ts_recv)) FROM level2) AS minutes,
               (SELECT count(DISTINCT time_bucket(INTERVAL '1 second', ts_recv)) FROM level2) AS seconds""",
    )
    row = table.to_pylist()[0]
    assert row["plain"] == row["tz"] == row["text"] == expected
    assert row["minutes"] == ref.select((pl.col("t") // 60_000_000_000).n_unique()).item()
    assert row["seconds"] == ref.select((pl.col("t") // 1_000_000_000).n_unique()).item()


def test_a_missing_or_empty_processed_directory_has_no_views_and_says_so(tmp_path):
    config = parse_config({"data_dir": str(tmp_path / "nothing")})
    assert dataset_views(open_dataset(config)) == {}
    (tmp_path / "empty" / "processed" / "coinbase" / "level2" / "product_id=X").mkdir(parents=True)
    assert dataset_views(open_dataset(parse_config({"data_dir": str(tmp_path / "empty")}))) == {}
    result = cli("--data-dir", str(tmp_path / "empty"), "SELECT * FROM level2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no processed data under" in result.stderr and "daedalus etl" in result.stderr
    result = cli("--data-dir", str(tmp_path / "empty"), "--schema")
    assert result.returncode == 0 and result.stdout == "" and "no processed data under" in result.stderr
    with pytest.raises(QueryError, match="no processed data under"):
        run_preset(config, "ohlcv")


def test_a_second_source_gets_prefixed_views_and_plain_names_only_when_unclaimed(ds, tmp_path):
    from daedalus.query.views import Dataset, view_names

    def d(source: str, channel: str) -> Dataset:
        return Dataset(source, channel, tmp_path, ())

    names = view_names([d("ccxt", "ticker"), d("ccxt", "trades"), d("coinbase", "ticker"), d("other", "trades")])
    assert names["ticker"].source == "coinbase"
    assert {"ccxt_ticker", "ccxt_trades", "other_trades"} <= set(names) and "trades" not in names
    assert view_names([d("ccxt", "trades")]).keys() == {"ccxt_trades", "trades"}
    # DuckDB names are case-insensitive: the coinbase dataset keeps its name, the other is left out
    clash = view_names([d("ccxt", "LEVEL2"), d("coinbase", "level2")])
    assert {name: ds.source for name, ds in clash.items()} == {"ccxt_LEVEL2": "ccxt", "level2": "coinbase"}


def test_hostile_directory_names_neither_break_the_views_nor_reach_other_data(tmp_path):
    """Glob characters, quotes and SQL in directory names (the data directory's own too) are
    plain names: each view reads exactly its own files, and one odd directory spoils nothing."""
    from tests.etl_helpers import recording_lines, run_etl, write_segments

    data = tmp_path / "data [1] *?{a,b} 'q\"d"
    write_segments(data, [recording_lines()])
    run_etl(data)
    coinbase = data / "processed" / "coinbase"
    ticker_file = next((coinbase / "ticker").rglob("*.parquet"))
    hostile = ["ticker[1]", "evil'; DROP VIEW level2; --", 'quote"d', "back\\slash"]
    for name in hostile:
        target = coinbase / name / ticker_file.relative_to(coinbase / "ticker")
        target.parent.mkdir(parents=True)
        target.write_bytes(ticker_file.read_bytes())
    (coinbase / "ticker1" / "x").mkdir(parents=True)  # what "ticker[1]" would match as a glob
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"product_id": ["NOT-MINE"]}), coinbase / "ticker1" / "x" / "a.parquet")

    config = parse_config({"data_dir": str(data)})
    con = open_dataset(config)
    views = dataset_views(con)
    assert {"level2", "market_trades", "ticker", "ticker[1]", "evil'; DROP VIEW level2; --", 'quote"d'} <= set(views)
    assert "back\\slash" not in views  # DuckDB's globs cannot match a backslash: left out, with a warning
    ticker_rows = sum(pq.read_metadata(f).num_rows for f in (coinbase / "ticker").rglob("*.parquet"))
    for name in ("ticker", "ticker[1]", "evil'; DROP VIEW level2; --", 'quote"d'):
        rows = ticker_rows if name == "ticker" else pq.read_metadata(ticker_file).num_rows
        got = con.execute(f"SELECT count(*), count(*) FILTER (product_id = 'NOT-MINE') FROM {sql_identifier(name)}")
        assert got.fetchone() == (rows, 0), name
    assert con.execute("SELECT count(*) FROM level2").fetchone()[0] > 0
    result = cli("--data-dir", str(data), "--preset", "gaps", "--format", "json")
    assert result.returncode == 0, result.stderr
    assert [r["product_id"] for r in json.loads(result.stdout)] == ["BTC-USD", "ETH-USD"]


# --- command line ---------------------------------------------------------------------


def test_schema_lists_every_view_and_its_columns(ds):
    result = cli("--config", str(ds.config_path), "--schema")
    assert result.returncode == 0, result.stderr
    views = [line for line in result.stdout.splitlines() if line and not line.startswith(" ")]
    assert set(views) == VIEWS
    assert any(line.split() == ["ts_recv_ns", "BIGINT"] for line in result.stdout.splitlines())
    assert any(line.split() == ["product_id", "VARCHAR"] for line in result.stdout.splitlines())


SQL = (
    "SELECT product_id, ts_recv, trade_id, price, size, side FROM market_trades"
    " ORDER BY ts_recv_ns, product_id, trade_id"
)


def test_each_format_reads_back_as_the_same_rows(ds, tmp_path):
    expected = pl.from_arrow(run_sql(ds.config, SQL))
    assert expected.height > 10

    csv = cli("--config", str(ds.config_path), "--format", "csv", SQL)
    assert csv.returncode == 0, csv.stderr
    got = pl.read_csv(io.StringIO(csv.stdout), try_parse_dates=True, schema_overrides={"trade_id": pl.String})
    assert got.columns == expected.columns and got.height == expected.height
    assert got["price"].to_list() == expected["price"].to_list()
    assert got["ts_recv"].to_list() == expected["ts_recv"].to_list()

    out = cli("--config", str(ds.config_path), "--format", "json", SQL)
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)
    assert [r["trade_id"] for r in records] == expected["trade_id"].to_list()
    assert records[0]["ts_recv"] == expected["ts_recv"][0].isoformat() + "Z"
    assert [r["size"] for r in records] == expected["size"].to_list()

    path = tmp_path / "trades.parquet"
    result = cli("--config", str(ds.config_path), "--format", "parquet", "--out", str(path), SQL)
    assert result.returncode == 0, result.stderr
    assert f"{expected.height:,} rows -> {path}" in result.stderr
    assert pl.read_parquet(path).equals(expected)
    assert not list(tmp_path.glob(".*.tmp"))

    table = cli("--config", str(ds.config_path), "--max-rows", "5", SQL)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == expected.columns and len(lines) == 2 + 5 + 2
    assert lines[-2] == f"… {expected.height - 5:,} more rows" and lines[-1] == f"({expected.height:,} rows)"


def test_nanosecond_timestamps_are_iso_utc_in_json_and_exact_in_csv(ds):
    sql = "SELECT make_timestamp_ns(ts_recv_ns) AS t, ts_recv_ns FROM level2 ORDER BY ts_recv_ns DESC LIMIT 3"
    records = json.loads(cli("--config", str(ds.config_path), "-f", "json", sql).stdout)
    for r in records:
        seconds, fraction = divmod(r["ts_recv_ns"], 1_000_000_000)
        moment = datetime(1970, 1, 1) + timedelta(seconds=seconds)
        assert r["t"] == f"{moment:%Y-%m-%dT%H:%M:%S}.{fraction:09d}Z"
    lines = cli("--config", str(ds.config_path), "-f", "csv", sql).stdout.splitlines()[1:]
    assert [line.split(",")[0].strip('"') for line in lines] == [r["t"][:-1].replace("T", " ") for r in records]


def test_a_query_failing_midway_leaves_no_file_and_keeps_an_earlier_one(ds, tmp_path):
    """--out is written under a temporary name and renamed: all of the result or nothing."""
    failing = "SELECT CASE WHEN ts_recv_ns > (SELECT median(ts_recv_ns) FROM level2) THEN error('boom') END FROM level2"
    for fmt in ("csv", "parquet"):  # a file handle and a path: every format takes one of the two
        out = tmp_path / f"result.{fmt}"
        out.write_text("earlier result")
        result = cli("--config", str(ds.config_path), "--format", fmt, "--out", str(out), failing)
        assert result.returncode == 2 and "boom" in result.stderr and "Traceback" not in result.stderr, fmt
        assert out.read_text() == "earlier result", fmt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.csv", "result.parquet"]
    result = cli("--config", str(ds.config_path), "--out", str(tmp_path / "no" / "dir.csv"), "-f", "csv", "SELECT 1")
    assert result.returncode == 2 and "--out: cannot write" in result.stderr


def test_parquet_needs_out_and_bad_sql_is_one_line_exit_2(ds):
    result = cli("--config", str(ds.config_path), "--format", "parquet", "SELECT 1")
    assert result.returncode == 2 and "--out" in result.stderr
    for sql, message in [("SELEC 1", 'Parser Error: syntax error at or near "SELEC"'),
                         ("SELECT nope FROM level2", 'Binder Error: Referenced column "nope" not found'),
                         ("SELECT * FROM level3", "Catalog Error: Table with name level3 does not exist")]:  # fmt: skip
        result = cli("--config", str(ds.config_path), sql)
        assert result.returncode == 2, (sql, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert cli("--config", str(ds.config_path)).returncode == 2  # neither SQL, --preset nor --schema
    assert cli("--config", str(ds.config_path), "--preset", "nope").returncode == 2


# --- presets -----------------------------------------------------------------------------


def ohlcv_reference(ds: SimDataset, seconds: int) -> pl.DataFrame:
    """OHLCV per product and bucket straight from market_trades' Parquet files."""
    step = seconds * 1_000_000_000
    trades = files(ds, "market_trades").with_columns(
        ns("ts_event").alias("e"), ns("ts_recv").alias("r"), pl.col("trade_id").cast(pl.Int64).alias("t")
    )
    return (
        trades.sort("e", "r", "seq", "t")
        .with_columns(((pl.col("e") // step) * step).alias("bucket_ns"))
        .group_by("product_id", "bucket_ns", maintain_order=True)
        .agg(open=pl.col("price").first(), high=pl.col("price").max(), low=pl.col("price").min(),
             close=pl.col("price").last(), volume=pl.col("size").sum(),
             vwap=(pl.col("price") * pl.col("size")).sum() / pl.col("size").sum(), trades=pl.len())
        .sort("product_id", "bucket_ns")
    )  # fmt: skip


def assert_ohlcv(got: pl.DataFrame, ref: pl.DataFrame) -> None:
    got = got.with_columns(pl.col("bucket").dt.epoch("ns").alias("bucket_ns"))
    assert got["product_id"].to_list() == ref["product_id"].to_list()
    assert got["bucket_ns"].to_list() == ref["bucket_ns"].to_list()
    for column in ("open", "high", "low", "close", "trades"):
        assert got[column].to_list() == ref[column].to_list(), column
    for column in ("volume", "vwap"):
        assert got[column].to_list() == pytest.approx(ref[column].to_list(), rel=1e-12), column


def test_ohlcv_equals_a_reference_from_the_trades_files(ds):
    ref = ohlcv_reference(ds, 1)
    assert ref.height > 5 and ref["trades"].max() > 1
    assert_ohlcv(pl.from_arrow(run_preset(ds.config, "ohlcv", interval="1s")), ref)
    # and agrees with the ETL's own 1s bars where both have a bar (the ETL's bars are complete only)
    bars = pl.from_arrow(run_sql(ds.config, "SELECT product_id, start_ns AS bucket_ns, high, low, volume, "
                                            "trade_count AS trades FROM bars_1s"))  # fmt: skip
    both = bars.join(ref, on=["product_id", "bucket_ns"], suffix="_ref")
    assert both.height == bars.height > 0
    for column in ("high", "low", "trades"):
        assert both[column].to_list() == both[f"{column}_ref"].to_list(), column
    assert both["volume"].to_list() == pytest.approx(both["volume_ref"].to_list(), rel=1e-12)


def test_ohlcv_from_the_command_line_with_product_interval_and_range(ds, tmp_path):
    ref = ohlcv_reference(ds, 2).filter(pl.col("product_id") == "BTC-USD")
    start_ns, end_ns = ref["bucket_ns"][1], ref["bucket_ns"][-1]
    iso = {k: (datetime(1970, 1, 1) + timedelta(microseconds=v // 1000)).isoformat() + "Z"
           for k, v in (("start", start_ns), ("end", end_ns))}  # fmt: skip
    out = tmp_path / "ohlcv.parquet"
    result = cli("--config", str(ds.config_path), "--preset", "ohlcv", "--interval", "2s", "--product", "BTC-USD",
                 "--start", iso["start"], "--end", iso["end"], "--format", "parquet", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = pl.read_parquet(out)
    assert_ohlcv(got, ref.filter((pl.col("bucket_ns") >= start_ns) & (pl.col("bucket_ns") < end_ns)))


def level2_frames(ds: SimDataset) -> pl.DataFrame:
    """One row per level2 frame and product (the book after the whole frame), in time order."""
    return (
        files(ds, "level2").with_columns(ns("ts_recv").alias("r"))
        .group_by("product_id", "r", "seq")
        .agg(pl.col("best_bid", "best_ask", "spread", "mid_price").first(), pl.col("book_valid").all(),
             pl.col("is_snapshot").any())
        .sort("product_id", "r", "seq")
    )  # fmt: skip


def test_spread_equals_a_reference_from_the_level2_files(ds):
    frames = level2_frames(ds).filter(pl.col("book_valid") & pl.col("spread").is_not_null())
    bps = pl.col("spread") / pl.col("mid_price") * 1e4
    ref = frames.group_by("product_id").agg(
        frames=pl.len(), mean_spread=pl.col("spread").mean(), median_spread=pl.col("spread").median(),
        p95_spread=pl.col("spread").quantile(0.95, "linear"), mean_bps=bps.mean(), median_bps=bps.median(),
        p95_bps=bps.quantile(0.95, "linear")).sort("product_id")  # fmt: skip
    got = pl.from_arrow(run_preset(ds.config, "spread"))
    assert got["product_id"].to_list() == ["BTC-USD", "ETH-USD"] == ref["product_id"].to_list()
    assert got["frames"].to_list() == ref["frames"].to_list()
    for column in ref.columns[2:]:
        assert got[column].to_list() == pytest.approx(ref[column].to_list(), rel=1e-9), column
    assert (got["p95_bps"] > 0).all()


def test_gaps_equal_a_reference_from_the_level2_files(ds):
    frames = level2_frames(ds).with_columns(
        (pl.col("r").shift(-1).over("product_id") - pl.col("r")).alias("until_next"),
        pl.col("book_valid").shift(1).over("product_id").fill_null(True).alias("was_valid"),
    )
    ref = frames.group_by("product_id").agg(
        frames=pl.len(),
        gaps=(~pl.col("book_valid") & pl.col("was_valid")).sum(),
        invalid_s=pl.col("until_next").filter(~pl.col("book_valid")).sum() / 1e9,
        crossed=(pl.col("best_bid") >= pl.col("best_ask")).sum(),
        snapshots=pl.col("is_snapshot").sum(), valid_at_end=pl.col("book_valid").last()).sort("product_id")  # fmt: skip
    got = pl.from_arrow(run_preset(ds.config, "gaps"))
    for column in ("product_id", "frames", "gaps", "crossed", "snapshots", "valid_at_end"):
        assert got[column].to_list() == ref[column].to_list(), column
    assert got["invalid_s"].to_list() == pytest.approx(ref["invalid_s"].to_list(), abs=1e-9)
    # the simulator dropped frames: the books went invalid and were resynced by fresh snapshots
    # (a gap leaves no invalid frame when the fresh snapshot comes before the next update: ~half of them)
    assert sum(got["gaps"]) > 0 and sum(got["invalid_s"]) > 0 and all(s > 1 for s in got["snapshots"])
    assert sum(got["gaps"]) <= ds.summary.counts["gaps"]


def test_a_product_with_a_quote_is_only_a_value(ds):
    hostile = "BTC-USD' OR '1'='1"
    assert sql_string(hostile) == "'BTC-USD'' OR ''1''=''1'"
    assert "product_id = 'BTC-USD'' OR ''1''=''1'" in preset_sql("spread", product=hostile)
    result = cli("--config", str(ds.config_path), "--preset", "spread", "--product", hostile, "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []
    result = cli("--config", str(ds.config_path), "--preset", "gaps", "--product", "BTC-USD", "--format", "json")
    assert [r["product_id"] for r in json.loads(result.stdout)] == ["BTC-USD"]
    with pytest.raises(PresetError, match="--interval"):
        preset_sql("ohlcv", interval="1m; DROP VIEW level2")
    with pytest.raises(PresetError, match="--start"):
        preset_sql("ohlcv", start="yesterday'")
    result = cli("--config", str(ds.config_path), "--preset", "ohlcv", "--start", "2026-08-10", "--end", "2026-08-09")
    assert result.returncode == 2 and "must be before --end" in result.stderr


def test_presets_give_prices_in_units_whatever_the_decimal_strategy(tmp_path):
    from tests.etl_helpers import recording_lines, run_etl, write_segments

    results = {}
    for strategy in ("float", "pips", "decimal"):
        data = tmp_path / strategy
        write_segments(data, [recording_lines()])
        run_etl(data, decimal_strategy=strategy)
        config = parse_config({"data_dir": str(data), "etl": {"decimal_strategy": strategy}})
        results[strategy] = {name: run_preset(config, name).to_pylist() for name in ("ohlcv", "spread")}
    for strategy in ("pips", "decimal"):
        for name, rows in results[strategy].items():
            assert len(rows) == len(results["float"][name]) > 0
            for got, ref in zip(rows, results["float"][name], strict=True):
                numbers = {k for k, v in ref.items() if isinstance(v, float)}
                assert {k: v for k, v in got.items() if k not in numbers} == {
                    k: v for k, v in ref.items() if k not in numbers
                }
                assert [got[k] for k in numbers] == pytest.approx([ref[k] for k in numbers], rel=1e-9), (strategy, name)


def test_etl_bars_open_and_close_follow_trade_ids_when_trades_share_a_time(tmp_path):
    """Coinbase lists a frame's trades newest first; trades sharing an exchange time must
    still open and close a bar in trade-id order, as the ohlcv preset (and the exchange) do.
    The reference recording has such ties (ETH-USD at 21:04 opened at 1919.36 before)."""
    from tests.etl_helpers import recording_lines, run_etl, write_segments

    write_segments(tmp_path, [recording_lines()])
    run_etl(tmp_path)
    config = parse_config({"data_dir": str(tmp_path)})
    cols = "product_id, start_ns AS bucket_ns, open, high, low, close, trade_count AS trades"
    bars = pl.from_arrow(run_sql(config, f"SELECT {cols} FROM bars_1m"))
    preset = pl.from_arrow(run_preset(config, "ohlcv", interval="1m"))
    preset = preset.with_columns(pl.col("bucket").dt.epoch("ns").alias("bucket_ns"))
    both = bars.join(preset, on=["product_id", "bucket_ns"], suffix="_preset")
    assert both.height == bars.height >= 4
    for column in ("open", "high", "low", "close", "trades"):
        assert both[column].to_list() == both[f"{column}_preset"].to_list(), column
