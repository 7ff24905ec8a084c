"""`daedalus demo` as a user runs it: one real run (simulator, supervisor, ETL, query, plot) shared
by the assertions, since it is the slowest test of the suite."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.conftest import REPO

DAEDALUS = [sys.executable, "-m", "daedalus"]
SECONDS = 12  # enough for several segments, a few gaps and the one disconnect (at 60%)
BROWSER = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


@dataclass
class DemoRun:
    keep: Path
    returncode: int
    out: str
    err: str
    descendants: dict[psutil.Process, str]  # every process seen under the demo while it ran: its command

    def line(self, label: str) -> str:
        found = re.search(rf"^  {re.escape(label)}: (.*)$", self.out, re.M)
        assert found, f"no '{label}:' line in the output:\n{self.out}"
        return found.group(1)

    def path(self, label: str) -> Path:
        found = re.search(rf"^{label}:\s+(\S+)$", self.out, re.M)
        assert found, f"no '{label}:' path in the output:\n{self.out}"
        return Path(found.group(1))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    keep = tmp_path_factory.mktemp("demo") / "kept"
    proc = subprocess.Popen([*DAEDALUS, "demo", "--seconds", str(SECONDS), "--keep", str(keep)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    seen: dict[int, tuple[psutil.Process, str]] = {}
    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + SECONDS + 240  # a generous bound on a loaded machine; normally ~20 s
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            for child in parent.children(recursive=True):
                if child.pid not in seen:
                    seen[child.pid] = (child, " ".join(child.cmdline()[2:5]))
        except psutil.Error:  # a process gone between the listing and the look
            pass
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate(timeout=30)
    return DemoRun(keep, proc.returncode, out, err, dict(seen.values()))


def test_the_demo_prints_a_summary_of_a_real_capture(demo: DemoRun) -> None:
    assert demo.returncode == 0, demo.out + demo.err
    assert "Traceback" not in demo.err
    assert re.search(r"^status page: http://127\.0\.0\.1:\d+/", demo.out, re.M), demo.out
    assert re.search(r"^  \[\s*\d+s/12s\] frames [\d,]+ ", demo.out, re.M), "no progress line"

    frames = re.match(r"([\d,]+) in ([\d.]+) s", demo.line("frames captured"))
    assert frames and int(frames[1].replace(",", "")) > 0 and float(frames[2]) >= SECONDS
    segments = int(demo.line("segments").split()[0])
    assert segments >= 2  # rotation by size
    rows = dict(re.findall(r"(\w+)=([\d,]+)", demo.line("rows")))
    for dataset in ("level2", "market_trades", "ticker", "book_snapshot_10"):
        assert int(rows.get(dataset, "0").replace(",", "")) > 0, rows
    gaps = re.match(r"(\d+) sequence gaps .*?, (\d+) book gaps", demo.line("gaps detected"))
    assert gaps and int(gaps[1]) >= 1 and int(gaps[2]) >= int(gaps[1])
    assert int(demo.line("gaps resynced").split()[0]) >= 1
    assert re.match(r"1 \(.*reconnected after [\d.]+ s\)", demo.line("disconnects")), demo.line("disconnects")
    valid = re.match(r"([\d.]+)% of the time", demo.line("books valid"))
    assert valid and 0 < float(valid[1]) <= 100
    assert re.match(r"[\d,.]+ frames/s, [\d.]+ MB/s", demo.line("throughput"))
    # the sample query ran over the capture and printed rows
    assert "--preset ohlcv" in demo.out and re.search(r"^BTC-USD\s+\d{4}-\d\d-\d\d ", demo.out, re.M), demo.out


def test_the_final_etl_left_nothing_behind(demo: DemoRun) -> None:
    raw = demo.keep / "data" / "raw"
    for state in ("active", "ready", "processing"):
        left = [p.name for p in (raw / state / "coinbase").glob("segment_*")]
        assert not left, f"{state}: {left}"
    assert len(list((raw / "archive" / "coinbase").glob("segment_*"))) >= 2
    assert (demo.keep / "config.yaml").is_file() and (demo.keep / "logs" / "supervisor.log").is_file()


def test_the_plot_is_a_real_picture(demo: DemoRun) -> None:
    import matplotlib.image

    png = demo.path("plot")
    assert png.parent == demo.keep and png.is_file()
    image = matplotlib.image.imread(png)
    height, width = image.shape[:2]
    assert width >= 800 and height >= 500, image.shape
    pixels = image[..., :3].reshape(-1, 3)
    colours = np.unique((pixels * 255).astype(np.uint8), axis=0)
    assert len(colours) > 20, "blank or nearly single-coloured"
    assert pixels.std() > 0.05


def test_the_html_report_is_self_contained(demo: DemoRun) -> None:
    page = demo.path("report")
    assert page.parent == demo.keep and page.is_file()
    text = page.read_text()
    assert "Demo run" in text and "frames captured" in text
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), "an external URL"
    assert all(src.startswith("data:") for src in re.findall(r'src="([^"]*)"', text))


@pytest.mark.skipif(BROWSER is None, reason="no chromium to open the report in: apt install chromium")
def test_the_html_report_opens_in_a_headless_browser(demo: DemoRun, tmp_path: Path) -> None:
    assert BROWSER is not None
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
           "XDG_CACHE_HOME": str(tmp_path / "xdg-cache")}  # fmt: skip
    result = subprocess.run(
        [BROWSER, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--dump-dom",
         f"--user-data-dir={tmp_path / 'profile'}", demo.path("report").as_uri()],
        capture_output=True, text=True, timeout=90, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Demo run" in result.stdout and "<img" in result.stdout


def test_no_process_of_the_demo_outlives_it(demo: DemoRun) -> None:
    commands = " | ".join(demo.descendants.values())
    for expected in ("daedalus sim", "daedalus run", "daedalus ingest", "daedalus etl"):
        assert expected in commands, commands
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(p.is_running() for p in demo.descendants):
        time.sleep(0.1)
    alive = [f"{p.pid} {command}" for p, command in demo.descendants.items() if p.is_running()]
    assert not alive, alive


def test_bad_options_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for args, message in (
        (["--seconds", "0"], "--seconds: must be between"),
        (["--product", "DOGE-USD"], "--product: the demo simulates"),
        (["--keep", str(tmp_path / "full")], "must be a new or empty directory"),
    ):
        result = subprocess.run([*DAEDALUS, "demo", *args], capture_output=True, text=True, timeout=60, cwd=REPO)
        assert result.returncode == 2, result
        assert message in result.stderr and "Traceback" not in result.stderr


def test_a_killed_demos_temporary_directory_is_removed_by_the_next_demo(tmp_path, monkeypatch):
    """SIGKILL skips the demo's own clean-up; the next demo removes what it left, and only that."""
    import tempfile

    from daedalus.demo.runner import OWNER_FILE, WORK_PREFIX, sweep_stale_work_dirs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live, foreign = (tmp_path / f"{WORK_PREFIX}{n}" for n in ("stale", "live", "foreign"))
    for work, owner in ((stale, dead.pid), (live, os.getpid())):
        (work / "data").mkdir(parents=True)
        (work / OWNER_FILE).write_text(str(owner))
    foreign.mkdir()
    assert sweep_stale_work_dirs() == [stale]
    assert not stale.exists() and live.exists() and foreign.exists()
