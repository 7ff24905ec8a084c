"""`daedalus demo` as a user runs it: one real run (simulator, supervisor, ETL, query, plot) shared
by the assertions, since it is the slowest test of the suite."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import pytest

from tests.browser import dump_dom, needs_browser
from tests.conftest import REPO

DAEDALUS = [sys.executable, "-m", "daedalus"]
SECONDS = 10  # enough for several segments, a few gaps and the one disconnect (at 60%)


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
                # looked at again each round: a child seen between its fork and its exec still
                # shows its parent's command line; one that has just exited (a zombie) shows
                # none, which must not replace what it ran
                command = " ".join(child.cmdline()[2:5])
                if command or child.pid not in seen:
                    seen[child.pid] = (seen.get(child.pid, (child,))[0], command)
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
    assert re.search(rf"^  \[\s*\d+s/{SECONDS}s\] frames [\d,]+ ", demo.out, re.M), "no progress line"

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


def test_the_summary_numbers_agree_with_the_files(demo: DemoRun) -> None:
    """Frames and throughput from the raw segments, books valid from the level2 files: computed
    here independently of the demo's code."""
    lines = [line for path in (demo.keep / "data" / "raw" / "archive" / "coinbase").glob("segment_*")
             for line in path.read_bytes().splitlines()]  # fmt: skip
    frames = [int(line[len(b'{"recv_ns":') : line.index(b",")]) for line in lines if b',"event":' not in line[:64]]
    seconds = (max(frames) - min(frames)) / 1e9
    assert demo.line("frames captured").startswith(f"{len(frames):,} in {seconds:.1f} s")
    assert demo.line("throughput").startswith(f"{len(frames) / seconds:,.1f} frames/s")

    level2 = pl.read_parquet(demo.keep / "data" / "processed" / "coinbase" / "level2" / "**" / "*.parquet",
                             hive_partitioning=True)  # fmt: skip
    books = (
        level2.with_columns(pl.col("ts_recv").dt.epoch("ns").alias("t"))
        .group_by("product_id", "t", "seq").agg(pl.col("book_valid").all())
        .sort("product_id", "t", "seq")
        .with_columns((pl.col("t").shift(-1).over("product_id") - pl.col("t")).alias("lasts"))
        .group_by("product_id").agg(share=pl.col("lasts").filter(pl.col("book_valid")).sum() / pl.col("lasts").sum())
        .sort("product_id")
    )  # fmt: skip
    per_product = ", ".join(f"{p} {100 * s:.2f}%" for p, s in books.iter_rows())
    mean = 100 * books["share"].mean()
    assert demo.line("books valid") == f"{mean:.2f}% of the time ({per_product})"
    assert 0 < mean <= 100


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


@needs_browser
def test_the_html_report_opens_in_a_headless_browser(demo: DemoRun, tmp_path: Path) -> None:
    dom = dump_dom(demo.path("report").as_uri(), tmp_path)
    assert "Demo run" in dom and "<img" in dom


EVERY_PROCESS = {"daedalus sim", "daedalus run", "daedalus ingest", "daedalus etl"}


def test_no_process_of_the_demo_outlives_it(demo: DemoRun) -> None:
    commands = " | ".join(demo.descendants.values())
    for expected in EVERY_PROCESS:
        assert expected in commands, commands
    assert not survivors(demo.descendants), survivors(demo.descendants)


def alive(process: psutil.Process) -> bool:
    """Running, and not a zombie (an orphan's zombie waits for init, which may be slow to reap)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def survivors(processes: dict[psutil.Process, str], deadline: float = 30.0) -> list[str]:
    """The processes still alive once none is, or once ``deadline`` seconds have passed."""
    end = time.monotonic() + deadline
    while time.monotonic() < end and any(alive(p) for p in processes):
        time.sleep(0.1)
    return [f"{p.pid} {command}" for p, command in processes.items() if alive(p)]


def test_a_demo_killed_outright_leaves_no_process_behind(tmp_path: Path) -> None:
    """SIGKILL gives the demo no chance to clean up: the kernel (PR_SET_PDEATHSIG) tells the
    simulator and the supervisor, and the supervisor stops ingest and the ETL watcher."""
    output = tmp_path / "demo.out"
    with output.open("wb") as out:
        proc = subprocess.Popen([*DAEDALUS, "demo", "--seconds", "600", "--keep", str(tmp_path / "kept")], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        parent, tree = psutil.Process(proc.pid), {}
        deadline = time.monotonic() + 120
        while "capturing for" not in output.read_text() or not set(tree.values()) >= EVERY_PROCESS:
            assert proc.poll() is None and time.monotonic() < deadline, output.read_text()
            time.sleep(0.1)
            try:
                tree = {p: " ".join(p.cmdline()[2:4]) for p in parent.children(recursive=True)}
            except psutil.Error:
                continue
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    left = survivors(tree)
    for process in tree:  # a failure must not leave them running for the rest of the suite
        if alive(process):
            process.kill()
    assert not left, left


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
