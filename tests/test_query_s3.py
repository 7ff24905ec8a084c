"""``daedalus query`` and ``daedalus plot`` over an ``s3://`` dataset on moto's standalone S3
server (127.0.0.1): the simulator's processed dataset is uploaded as ``daedalus sync`` lays it
out (``<prefix>/processed/...``), then read back through DuckDB + pyarrow's S3 filesystem and
compared with the same queries over the local directory. The S3 runs use a config whose
data directory is empty, so nothing can come from the local copy by mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import pyarrow as pa
import pytest
import yaml
from matplotlib import image as mpimg

from daedalus.config import DaedalusConfig, parse_config
from daedalus.query.api import QueryError, run_sql
from daedalus.query.remote import RemoteError, S3Location
from daedalus.query.views import dataset_views, open_dataset
from tests.conftest import REPO
from tests.query_helpers import SimDataset, build_dataset
from tests.s3_server import BUCKET, KEY_ID, REGION, SECRET, S3Server, free_port, s3_auth_server

__all__ = ["s3_auth_server"]  # fixture (s3_server: conftest.py)

VIEWS = {"level2", "book_snapshot_5", "market_trades", "ticker", "candles", "bars_1s"}
PREFIX = "pi-1"  # the sync destination s3://BUCKET/pi-1: processed files under pi-1/processed/


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> SimDataset:
    return build_dataset(tmp_path_factory.mktemp("query_s3"))


def upload(server: S3Server, processed: Path, keys: tuple[str, str] = (KEY_ID, SECRET)) -> int:
    """Every file under ``processed`` (the ``_state`` checkpoint too) to ``<PREFIX>/processed/``."""
    client = boto3.client("s3", endpoint_url=server.endpoint, region_name=REGION, aws_access_key_id=keys[0],
                          aws_secret_access_key=keys[1])  # fmt: skip
    count = 0
    for path in sorted(processed.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), server.bucket, f"{PREFIX}/processed/{path.relative_to(processed).as_posix()}")
            count += 1
    return count


def s3_settings(ds: SimDataset, endpoint: str, root: Path, key_id: str = KEY_ID, secret: str = SECRET) -> dict:
    """``ds``'s settings with the S3 endpoint in ``sync:`` and an empty local data directory."""
    settings = yaml.safe_load(ds.config_path.read_text())
    settings["data_dir"] = str(root / "empty-data")
    settings["sync"] = {"endpoint_url": endpoint, "region": REGION, "access_key_id": key_id,
                        "secret_access_key": secret}  # fmt: skip
    return settings


def s3_config_file(settings: dict, root: Path) -> Path:
    path = root / "s3.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def daedalus(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """``python -m daedalus ARGS`` as a child; no AWS variables of the caller, no instance metadata lookups."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {"AWS_EC2_METADATA_DISABLED": "true"}
    return subprocess.run([sys.executable, "-m", "daedalus", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=env)  # fmt: skip


def ordered(config: DaedalusConfig, view: str, processed: S3Location | None = None) -> pa.Table:
    return run_sql(config, f"SELECT * FROM {view} ORDER BY ALL", processed)


@pytest.fixture
def remote(ds: SimDataset, s3_server: S3Server, tmp_path: Path) -> tuple[DaedalusConfig, Path]:
    """The dataset uploaded; the S3 config (parsed, and as a file)."""
    assert upload(s3_server, ds.config.processed_dir) > len(VIEWS)
    settings = s3_settings(ds, s3_server.endpoint, tmp_path)
    return parse_config(settings), s3_config_file(settings, tmp_path)


# --- views and rows ------------------------------------------------------------------------


def test_every_view_reads_the_same_rows_from_s3_as_from_the_directory(ds, remote):
    config, _ = remote
    location = S3Location(BUCKET, f"{PREFIX}/processed")
    con = open_dataset(config, location)
    views = dataset_views(con)
    con.close()
    assert set(views) == VIEWS == set(dataset_views(open_dataset(ds.config)))  # _state is not a dataset
    for name, columns in views.items():
        types = dict(columns)
        assert types["product_id"] == "VARCHAR" and types["date"] == "DATE", name
        assert types["ts_recv"] == "TIMESTAMP" and types["ts_recv_ns"] == "BIGINT", name
        local, over_s3 = ordered(ds.config, name), ordered(config, name, location)
        assert over_s3.num_rows == local.num_rows > 0, name
        assert over_s3.equals(local), name


def test_the_data_dir_sync_uploaded_is_read_from_the_command_line(ds, remote, tmp_path):
    """``--data-dir s3://bucket/prefix`` (a sync destination) and ``--processed s3://.../processed``
    give what the local directory gives: --schema, SQL with partition columns, --preset ohlcv."""
    _, config_file = remote
    url = f"s3://{BUCKET}/{PREFIX}"
    local = ("--config", str(ds.config_path))
    by_dir = ("--config", str(config_file), "--data-dir", url)
    by_processed = ("--config", str(config_file), "--processed", f"{url}/processed")

    schema = daedalus("query", *by_dir, "--schema")
    assert schema.returncode == 0, schema.stderr
    assert {line for line in schema.stdout.splitlines() if line and not line.startswith(" ")} == VIEWS
    assert schema.stdout == daedalus("query", *local, "--schema").stdout

    sql = "SELECT product_id, date, count(*) AS n, sum(size) AS volume FROM market_trades GROUP BY ALL ORDER BY ALL"
    partitions = daedalus("query", *by_processed, "-f", "csv", sql)
    assert partitions.returncode == 0, partitions.stderr
    assert partitions.stdout == daedalus("query", *local, "-f", "csv", sql).stdout
    assert {"BTC-USD", "ETH-USD"} <= {line.split(",")[0].strip('"') for line in partitions.stdout.splitlines()[1:]}

    preset = ("--preset", "ohlcv", "--interval", "1s", "-f", "parquet")
    s3_out, local_out = tmp_path / "s3.parquet", tmp_path / "local.parquet"
    done = daedalus("query", *by_dir, *preset, "-o", str(s3_out))
    assert done.returncode == 0, done.stderr
    assert daedalus("query", *local, *preset, "-o", str(local_out)).returncode == 0
    import pyarrow.parquet as pq

    s3_table, local_table = pq.read_table(s3_out), pq.read_table(local_out)
    assert s3_table.num_rows > 1 and s3_table.equals(local_table)


def test_plot_over_s3_draws_what_the_local_plot_draws(ds, remote, tmp_path):
    _, config_file = remote
    s3_png, local_png = tmp_path / "s3.png", tmp_path / "local.png"
    done = daedalus("plot", "--config", str(config_file), "--data-dir", f"s3://{BUCKET}/{PREFIX}",
                    "--product", "BTC-USD", "--out", str(s3_png))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(s3_png)
    local = daedalus("plot", "--config", str(ds.config_path), "--product", "BTC-USD", "--out", str(local_png))
    assert local.returncode == 0, local.stderr
    pixels = mpimg.imread(s3_png)
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::7]}) > 50  # a real plot, not a blank
    assert (pixels == mpimg.imread(local_png)).all()


def test_find_lists_a_dataset_in_one_recursive_listing_like_fsspec_walks_it(ds, remote):
    """DuckDB's ``**`` glob calls ``find``: the override gives fsspec's answer without a LIST per partition."""
    from fsspec.implementations.arrow import ArrowFSWrapper

    from daedalus.query.remote import _wrapper_class, arrow_filesystem

    config, _ = remote
    fs = arrow_filesystem(config.sync)
    path = f"{BUCKET}/{PREFIX}/processed/coinbase/level2"
    fast, plain = _wrapper_class()(fs), ArrowFSWrapper(fs)
    for withdirs in (False, True):
        assert fast.find(path, withdirs=withdirs) == plain.find(path, withdirs=withdirs)
        assert fast.find(path, withdirs=withdirs, detail=True) == plain.find(path, withdirs=withdirs, detail=True)
    assert fast.glob(f"s3://{path}/**/*.parquet") == plain.glob(f"s3://{path}/**/*.parquet")
    assert len(fast.glob(f"s3://{path}/**/*.parquet")) >= 2
    counted = CountingListings(fs)
    _wrapper_class()(counted).glob(f"s3://{path}/**/*.parquet")
    assert counted.listings == 1
    ArrowFSWrapper(counted).glob(f"s3://{path}/**/*.parquet")
    assert counted.listings > 1 + 2 * 2  # fsspec's walk: the root, each product, each date


class CountingListings:
    """A pyarrow filesystem that counts directory listings (each one LIST request, or more)."""

    def __init__(self, fs: object) -> None:
        self.fs, self.listings = fs, 0

    def get_file_info(self, what: object) -> object:
        from pyarrow.fs import FileSelector

        self.listings += isinstance(what, FileSelector)
        return self.fs.get_file_info(what)

    def __getattr__(self, name: str) -> object:
        return getattr(self.fs, name)


# --- errors ----------------------------------------------------------------------------------


def one_line_error(done: subprocess.CompletedProcess[str], *secrets: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    for secret in secrets:
        assert secret not in done.stderr and secret not in done.stdout
    return lines[0]


def test_a_wrong_secret_is_one_clear_line_without_the_secret(ds, s3_auth_server, tmp_path):
    server, key_id, secret = s3_auth_server
    upload(server, ds.config.processed_dir, (key_id, secret))
    wrong = "wrong-" + secret[::-1]
    config_file = s3_config_file(s3_settings(ds, server.endpoint, tmp_path, key_id, wrong), tmp_path)
    url = f"s3://{BUCKET}/{PREFIX}"
    for command in (("query", "--schema"), ("plot", "--product", "BTC-USD", "--out", str(tmp_path / "x.png"))):
        line = one_line_error(daedalus(*command, "--config", str(config_file), "--data-dir", url), wrong, secret)
        assert f"cannot read {url}/processed" in line and "bad credentials" in line, line
    assert not (tmp_path / "x.png").exists()
    right = s3_config_file(s3_settings(ds, server.endpoint, tmp_path, key_id, secret), tmp_path)
    done = daedalus("query", "--config", str(right), "--data-dir", url, "--schema")
    assert done.returncode == 0 and set(VIEWS) <= set(done.stdout.split()), done.stderr  # the right key reads


def test_a_missing_bucket_and_an_empty_prefix_are_one_clear_line(ds, s3_server, tmp_path):
    config_file = s3_config_file(s3_settings(ds, s3_server.endpoint, tmp_path), tmp_path)
    line = one_line_error(daedalus("query", "--config", str(config_file), "--data-dir", "s3://no-such-bucket/x",
                                   "SELECT 1 FROM level2"), SECRET)  # fmt: skip
    assert line.endswith(f"cannot read s3://no-such-bucket/x/processed: no such bucket (endpoint {s3_server.endpoint})")
    empty = f"s3://{BUCKET}/nothing-here"
    line = one_line_error(daedalus("query", "--config", str(config_file), "--data-dir", empty, "SELECT 1 FROM level2"))
    assert f"no processed data under {empty}/processed" in line, line
    line = one_line_error(daedalus("plot", "--config", str(config_file), "--processed", empty, "-p", "BTC-USD"))
    assert "no processed data" in line, line


def test_an_unreachable_endpoint_is_one_clear_line(ds, tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config_file = s3_config_file(s3_settings(ds, endpoint, tmp_path), tmp_path)
    line = one_line_error(daedalus("query", "--config", str(config_file), "--processed", f"s3://{BUCKET}/p",
                                   "--schema"), SECRET, KEY_ID)  # fmt: skip
    assert line.endswith(f"cannot read s3://{BUCKET}/p: cannot reach the endpoint (endpoint {endpoint})"), line


def test_the_api_raises_remote_error_and_bad_options_exit_2(ds, tmp_path):
    config = parse_config(s3_settings(ds, f"http://127.0.0.1:{free_port()}", tmp_path))
    with pytest.raises(RemoteError, match="cannot reach the endpoint") as caught:
        run_sql(config, "SELECT 1", S3Location(BUCKET, "p"))
    assert isinstance(caught.value, QueryError) and SECRET not in str(caught.value)
    both = daedalus("query", "--data-dir", "x", "--processed", "y", "--schema")
    assert "give --data-dir or --processed, not both" in one_line_error(both)
    bad = daedalus("query", "--processed", "s3://UPPER_case/x", "--schema")
    assert "not an s3://bucket[/prefix] URL" in one_line_error(bad)
