"""`daedalus plot`: a real dataset from the simulator (with dropped frames, so the books have
gaps), captured and processed in-process, plotted by the command as a process."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib import image as mpimg

from daedalus.capture.pipeline import IngestPipeline
from daedalus.config import parse_config
from daedalus.etl.job import EtlJob
from daedalus.plot.data import load_for
from daedalus.plot.html import render_html
from daedalus.plot.png import DPI, FIGSIZE, INVALID, SIDE_COLOURS, render_png
from daedalus.query.views import open_dataset
from daedalus.sim import SimConfig, SimServer
from tests.browser import dump_dom, needs_browser
from tests.capture_helpers import ingest_config
from tests.conftest import REPO
from tests.etl_helpers import recording_lines, run_etl, write_segments


async def _capture(data_dir: Path) -> None:
    """Two products, a few bursts with 3 % of frames dropped (gaps -> resubscribe -> snapshot)."""
    sim = SimServer(SimConfig(rate=0, keep_sent=True))
    await sim.start()
    pipeline = IngestPipeline(parse_config(ingest_config(data_dir, sim.ws_url)))
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop))
    try:
        async with asyncio.timeout(15):
            while not sim.connections or len(sim.connections[0].subs) < 4:
                await asyncio.sleep(0.02)
        for burst in range(24):
            sim.faults.drop_rate = 0.03 if burst in (6, 7, 16) else 0.0
            await sim.advance(150)
            await asyncio.sleep(0.05)  # the collector resubscribes; the next burst follows the snapshot
        sent = sum(len(c.sent_frames) for c in sim.connections)
        async with asyncio.timeout(15):  # everything the simulator sent has been written
            while pipeline.writer.stats.written < sent:
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await sim.stop()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A processed data directory and its config file (shared: building it takes ~3 s)."""
    root = tmp_path_factory.mktemp("plot")
    data_dir = root / "data"
    asyncio.run(_capture(data_dir))
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(data_dir)}))
    settings = parse_config({"data_dir": str(data_dir)})
    EtlJob(settings).run()
    invalid = open_dataset(settings).execute("SELECT count(*) FROM level2 WHERE NOT book_valid").fetchone()[0]
    assert invalid > 0, "the dropped frames should have left invalid books"
    return config


def plot_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daedalus", "plot", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def plot(config: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return plot_cli("--config", str(config), *args, cwd=cwd)


def colours(pixels: np.ndarray) -> np.ndarray:
    """Distinct RGB colours (0-255) of a decoded image."""
    rgb = np.round(pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    return np.unique(rgb, axis=0)


def pixels_like(pixels: np.ndarray, hex_colour: str, alpha: float, tolerance: int = 6) -> int:
    """How many pixels show ``hex_colour`` drawn at ``alpha`` over white."""
    rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)], float)
    blended = alpha * rgb + (1 - alpha) * 255
    return int((np.abs(pixels[..., :3] * 255 - blended).max(axis=-1) <= tolerance).sum())


def assert_real_plot(pixels: np.ndarray) -> None:
    assert pixels.shape[:2] == (round(FIGSIZE[1] * DPI), round(FIGSIZE[0] * DPI))
    palette = colours(pixels)
    assert len(palette) > 200, f"only {len(palette)} colours: blank or nearly"
    for side, colour in SIDE_COLOURS.items():
        assert pixels_like(pixels, colour, 0.7) > 50, f"no {side} trade points"
    assert pixels_like(pixels, INVALID, 0.45) > 200, "no shaded invalid-book interval"


def test_png_default_name_is_a_real_plot(dataset, tmp_path):
    """--data-dir instead of a config, as in ``daedalus query``; the file lands in the current directory."""
    data_dir = yaml.safe_load(dataset.read_text())["data_dir"]
    done = plot_cli("--data-dir", data_dir, "--product", "BTC-USD", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    written = done.stdout.strip()
    assert re.fullmatch(r"plot-BTC-USD-\d{8}T\d{6}Z\.png", written), done.stdout
    assert_real_plot(mpimg.imread(tmp_path / written))


def test_html_is_self_contained_with_plot_and_tables(dataset, tmp_path):
    out = tmp_path / "report.html"
    done = plot(dataset, "--product", "ETH-USD", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    text = out.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert embedded
    assert_real_plot(mpimg.imread(io.BytesIO(base64.b64decode(embedded.group(1))), format="png"))
    for heading in ("Summary", "Rows per dataset", "Spread (level2)", "Invalid-book intervals"):
        assert f"<h2>{heading}</h2>" in text
    assert re.search(r"<td>level2</td><td class=\"n\">[1-9][\d,]*</td>", text)
    assert re.search(r"<td>market_trades</td><td class=\"n\">[1-9][\d,]*</td>", text)


@needs_browser
def test_html_opens_in_headless_chromium(dataset, tmp_path):
    out = tmp_path / "report.html"
    assert plot(dataset, "--product", "BTC-USD", "--out", str(out), cwd=tmp_path).returncode == 0
    dom = dump_dom(out.as_uri(), tmp_path)
    assert 'id="plot"' in dom and "<h2>Rows per dataset</h2>" in dom


def test_bad_input_is_one_line_and_exit_2(dataset, tmp_path):
    cases = {
        ("--product", "XRP-USD"): "unknown product 'XRP-USD': available: BTC-USD, ETH-USD",
        ("--product", "BTC-USD", "--start", "2020-01-01", "--end", "2020-01-01"): "no data for BTC-USD between",
        ("--product", "BTC-USD", "--start", "yesterday"): "--start: 'yesterday' is not an ISO 8601 date or time",
        ("--product", "BTC-USD", "--start", "2026-08-10", "--end", "2026-08-09T12:00"): "is before --start",
        ("--product", "BTC-USD", "--out", "x.jpg"): "--out x.jpg: must end in .png or .html",
    }
    for args, message in cases.items():
        done = plot(dataset, *args, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().count("\n") == 0, done.stderr
    nothing = plot_cli("--product", "BTC-USD", cwd=tmp_path)  # no config: the built-in one, ./data, is empty
    assert nothing.returncode == 2 and "available: none (no processed data" in nothing.stderr, nothing.stderr
    assert not list(tmp_path.iterdir())


def test_api_range_with_snapshot_trades_and_vwap_bars(dataset, tmp_path):
    """Trades replayed by the subscription start ~100 s before the first book: an explicit
    range shows them and the 1-minute bars built from them; extra tables land in the report."""
    config = parse_config(yaml.safe_load(dataset.read_text()))
    whole = load_for(config, "BTC-USD")
    data = load_for(config, "BTC-USD", whole.start - timedelta(minutes=3))
    assert len(data.bars["start"]) >= 1 and np.isfinite(data.bars["vwap"]).all()
    assert len(data.trades["t"]) > len(whole.trades["t"])
    assert data.rows["bars_1m"] >= 1 and data.invalid
    png = render_png(config, "BTC-USD", data.start, data.end, tmp_path / "a" / "b.png")
    assert_real_plot(mpimg.imread(png))
    page = render_html(config, "BTC-USD", data.start, None, tmp_path / "r.html", extra_tables={"Run": [{"k": "v"}]})
    assert "<h2>Run</h2>" in page.read_text()


def test_help_does_not_import_matplotlib():
    code = "import sys; from daedalus.cli import app; print('matplotlib' in sys.modules, 'duckdb' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.split()[0] == "False", done.stdout


@pytest.mark.parametrize("strategy", ["pips", "decimal"])
def test_every_decimal_strategy_plots_the_same_prices(tmp_path, strategy):
    """The reference recording processed as float and as ``strategy``: same quotes, trades, spread."""
    loaded = []
    for name in ("float", strategy):
        data_dir = tmp_path / name
        write_segments(data_dir, [recording_lines()])
        run_etl(data_dir, decimal_strategy=name)
        loaded.append(load_for(parse_config({"data_dir": str(data_dir), "etl": {"decimal_strategy": name}}), "BTC-USD"))
    floats, other = loaded
    for part in ("quotes", "trades", "bars"):
        for key, values in getattr(floats, part).items():
            if values.dtype.kind == "f":
                np.testing.assert_allclose(getattr(other, part)[key], values, rtol=1e-9, err_msg=f"{part}.{key}")
            else:
                assert (getattr(other, part)[key] == values).all(), f"{part}.{key}"
    assert other.spread == pytest.approx(floats.spread, rel=1e-6)


@pytest.mark.parametrize("buckets", [3, 100_000])
def test_invalid_intervals_equal_a_row_by_row_scan(dataset, monkeypatch, buckets):
    """Coarse buckets force the row-by-row path for mixed buckets; fine ones the bucket path."""
    from daedalus.plot import data as plot_data

    monkeypatch.setattr(plot_data, "VALIDITY_BUCKETS", buckets)
    config = parse_config(yaml.safe_load(dataset.read_text()))
    con = open_dataset(config)
    loader = plot_data.Loader(con, plot_data.Datasets.of(config))
    lo, hi = loader.span("level2", "ETH-USD")
    found = loader.invalid({"product": "ETH-USD", "lo": lo, "hi": hi})
    rows = con.execute(
        "SELECT epoch_us(ts_recv) AS t, book_valid AS v FROM level2 WHERE product_id = 'ETH-USD' ORDER BY ts_recv, seq"
    ).fetchall()
    expected, opened = [], None
    for t, v in rows:
        if not v and opened is None:
            opened = t
        elif v and opened is not None:
            expected.append((opened, t))
            opened = None
    if opened is not None:
        expected.append((opened, hi))
    assert expected and [(int(a.astype("int64")), int(b.astype("int64"))) for a, b in found] == expected


def test_bars_beyond_the_limit_are_merged_volume_weighted(tmp_path, monkeypatch):
    """A year of 1-minute bars is half a million segments: above BAR_POINTS, runs of bars are
    drawn as one, epoch-aligned, with the VWAP of all their trades."""
    from daedalus.plot import data as plot_data
    from daedalus.query.api import run_sql

    write_segments(tmp_path, [recording_lines()])
    run_etl(tmp_path)
    config = parse_config({"data_dir": str(tmp_path)})
    bars = run_sql(config, "SELECT vwap, volume FROM bars_1m WHERE product_id = 'ETH-USD' ORDER BY start").to_pylist()
    assert len(bars) == 2  # 21:04 and 21:05: one 2-minute bucket (21:04 is an even minute)
    monkeypatch.setattr(plot_data, "BAR_POINTS", 1)
    data = load_for(config, "ETH-USD", "2026-08-09T21:00Z", "2026-08-09T22:00Z")
    assert data.bar_seconds == 120 and len(data.bars["vwap"]) == 1
    assert str(data.bars["start"][0]) == "2026-08-09T21:04:00.000000"
    expected = sum(b["vwap"] * b["volume"] for b in bars) / sum(b["volume"] for b in bars)
    assert data.bars["vwap"][0] == pytest.approx(expected, rel=1e-12)


def test_invalid_intervals_are_drawn_at_least_visible_and_merged_when_they_touch():
    from daedalus.plot.png import shaded_spans

    t = np.datetime64("2026-08-09T21:00:00", "us")
    second = np.timedelta64(1, "s")
    spans = shaded_spans([(t, t + second), (t + 3 * second, t + 4 * second), (t + 20 * second, t + 21 * second)],
                         5 * second)  # fmt: skip
    assert spans == [(t, t + 8 * second), (t + 20 * second, t + 25 * second)]
