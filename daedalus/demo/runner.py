"""The demo's timeline: simulator, supervisor, capture with progress, stop, final ETL, summary,
sample query, plot and report; and its clean-up, whatever happens.

Ctrl-C (or SIGTERM) during the capture ends it early and the demo finishes as usual with what
was captured; a second one (or the first after the capture) skips what is left, prints the
summary of what is on disk and cleans up. The simulator and the supervisor run in sessions of
their own, so the terminal's Ctrl-C reaches only the demo, which stops them in order.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import psutil

from daedalus.demo import procs
from daedalus.demo.plan import DemoPlan
from daedalus.logs import get_logger
from daedalus.ops.records import read_heartbeat, read_supervisor_status

if TYPE_CHECKING:
    from daedalus.config import DaedalusConfig

log = get_logger(__name__)

SIM_READY = "daedalus sim ready "
START_DEADLINE = 60.0  # seconds for the simulator, the supervisor, the first frames (a cold Pi is slow)
SUPERVISOR_STOP_SECONDS = 60.0  # its children get 30 s each to close their files
ETL_SECONDS = 300.0
SLACK_SECONDS = 2.0  # the first frames come up to a heartbeat before the capture is seen to start
REPORT_NAME = "daedalus-demo"  # <name>.png / <name>.html


def say(text: str = "") -> None:
    print(text, flush=True)


class Interrupts:
    """SIGINT/SIGTERM: the first during the capture only asks it to end; any other raises
    KeyboardInterrupt where the demo is; during clean-up they only hurry it."""

    def __init__(self) -> None:
        self.capturing = False
        self.stop_requested = False
        self.cleaning = False
        self.hurry = False
        self.hits = 0
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.hits += 1
        if self.cleaning:
            self.hurry = True
            return
        if self.capturing and not self.stop_requested:
            self.stop_requested = True
            say("\nstopping the capture (Ctrl-C again to skip the rest and just print the summary)")
            return
        raise KeyboardInterrupt

    @staticmethod
    def restore() -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)


@dataclass
class DemoRun:
    plan: DemoPlan
    product: str
    report_dir: Path
    interrupts: Interrupts
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    capture_started: float | None = None  # monotonic
    capture_wall: float | None = None  # epoch seconds, for the query's range
    capture_seconds: float = 0.0
    skipped: bool = False  # a step was cut short by Ctrl-C

    # ---- start ----------------------------------------------------------------------------
    def start_sim(self) -> tuple[str, str]:
        sim_log = self.plan.log_dir / "sim.log"
        proc = self.running["sim"] = procs.spawn(self.plan.sim_command(), sim_log)

        def ready() -> str | None:
            return next((ln for ln in procs.read_text(sim_log).splitlines() if ln.startswith(SIM_READY)), None)

        line = procs.wait_until(ready, START_DEADLINE, alive=proc)
        if not isinstance(line, str):
            raise DemoFailed("the simulator did not start", sim_log)
        fields = dict(part.split("=", 1) for part in line[len(SIM_READY) :].split() if "=" in part)
        plan = self.plan
        say(f"simulator: {fields['ws']} products={fields['products']} rate={fields.get('rate', '?')} frames/s, "
            f"faults: drop {plan.drop_rate:g} of updates, disconnect every {plan.disconnect_every:g} s")  # fmt: skip
        return fields["ws"], fields["rest"]

    def start_supervisor(self, ws_url: str, rest_url: str) -> None:
        config_file = self.plan.write_config(ws_url, rest_url)
        supervisor_log = self.plan.log_dir / "supervisor.log"
        proc = self.running["supervisor"] = procs.spawn(self.plan.supervisor_command(), supervisor_log)
        layout = self._config().layout

        def url() -> str | None:
            status = read_supervisor_status(layout.supervisor_status_file)
            return status.status_url if status else None

        status_url = procs.wait_until(url, START_DEADLINE, alive=proc)
        if not status_url:
            raise DemoFailed("the supervisor did not start", supervisor_log)
        say(f"supervisor: daedalus run --config {config_file}")
        say(f"status page: {status_url}   (open it while the demo runs)")
        say(f"data: {self.plan.data_dir}")

    def _config(self) -> DaedalusConfig:
        from daedalus.config import load_config

        return load_config(self.plan.config_file)

    # ---- capture --------------------------------------------------------------------------
    def capture(self) -> None:
        layout = self._config().layout
        ingest_file = layout.heartbeat_file("ingest-coinbase")
        etl_file = layout.heartbeat_file("etl")
        supervisor = self.running["supervisor"]

        def frames() -> int:
            beat = read_heartbeat(ingest_file)
            return _total(beat.counters.get("frames_received")) if beat else 0

        self.interrupts.capturing = True
        try:
            if not procs.wait_until(lambda: frames() > 0 or self.interrupts.stop_requested, START_DEADLINE,
                                    alive=supervisor):  # fmt: skip
                raise DemoFailed("no frames arrived from the simulator", self.plan.log_dir / "ingest-coinbase.log")
            self.capture_started = time.monotonic()
            self.capture_wall = time.time()
            say(f"capturing for {self.plan.seconds:g} s (Ctrl-C to stop early) ...")
            every = min(5.0, max(2.0, self.plan.seconds / 6))
            next_line = self.capture_started + every
            while not self.interrupts.stop_requested:
                now = time.monotonic()
                if now - self.capture_started >= self.plan.seconds:
                    break
                if supervisor.poll() is not None:
                    say(f"the supervisor exited ({supervisor.returncode}): see {self.plan.log_dir / 'supervisor.log'}")
                    break
                if now >= next_line:
                    say(_progress(now - self.capture_started, self.plan.seconds, ingest_file, etl_file))
                    next_line += every
                time.sleep(0.1)
        finally:
            self.interrupts.capturing = False
            if self.capture_started is not None:
                self.capture_seconds = time.monotonic() - self.capture_started

    # ---- stop, final ETL ------------------------------------------------------------------
    def stop_all(self) -> None:
        """The supervisor first (ingest closes its segment into ready/), then the simulator."""
        for name, timeout in (("supervisor", SUPERVISOR_STOP_SECONDS), ("etl", 30.0), ("sim", 10.0)):
            proc = self.running.get(name)
            if proc is not None:
                code = procs.stop(proc, timeout, lambda: self.interrupts.hurry)
                del self.running[name]  # only once stopped: an interrupted stop is finished by the clean-up
                if code not in (0, -signal.SIGTERM) and name == "supervisor":
                    say(f"the supervisor exited with {code}: see {self.plan.log_dir / 'supervisor.log'}")

    def final_etl(self) -> None:
        """Run ``daedalus etl`` once: the segment closed at the stop and any the watcher had not reached."""
        etl_log = self.plan.log_dir / "etl-final.log"
        say("stopped; processing the last segments (daedalus etl) ...")
        proc = self.running["etl"] = procs.spawn(self.plan.etl_command(), etl_log)
        procs.wait_until(lambda: proc.poll() is not None, ETL_SECONDS)
        code = procs.stop(proc, 30.0)
        del self.running["etl"]
        if code != 0:
            say(f"the final ETL exited with {code}: see {etl_log}")

    # ---- results --------------------------------------------------------------------------
    def results(self) -> int:
        """Summary, then (unless cut short) the sample query and the report. Exit code 0 or 1."""
        if not self.plan.config_file.exists():
            say("nothing was captured")
            return 0
        try:
            rows = self.summary()
            if not self.skipped:
                self.sample_query()
                self.report(rows)
        except KeyboardInterrupt:
            self.skipped = True
            say("\ninterrupted")
        except Exception as exc:  # the processes' data is still on disk: say so, do not hide it
            log.error("demo_results_failed", error=repr(exc), exc_info=True)
            say(f"could not finish the results: {type(exc).__name__}: {exc}")
            return 1
        return 0

    def summary(self) -> list[dict[str, object]]:
        from daedalus.demo.figures import collect

        figures = collect(self._config())
        lines = figures.lines()
        say()
        say("summary")
        for line in lines:
            say(f"  {line}")
        return [{"figure": k, "value": v} for k, v in (line.split(": ", 1) for line in lines)]

    def sample_query(self) -> None:
        """The ``ohlcv`` preset over the capture, from the first whole bucket (the subscription's
        trade snapshot reaches further back, and a bucket cut by --start would be partial)."""
        import pyarrow as pa

        from daedalus.query.api import QueryError, run_preset
        from daedalus.query.output import write_table
        from daedalus.query.times import utc_text

        seconds = 10 if self.capture_seconds < 180 else 60
        interval = f"{seconds}s" if seconds < 60 else "1m"
        first = (self.capture_wall or time.time()) - SLACK_SECONDS
        since = utc_text(datetime.fromtimestamp(math.ceil(first / seconds) * seconds, UTC))
        say()
        say(f"sample query: daedalus query --config {self.plan.config_file} --preset ohlcv "
            f"--interval {interval} --product {self.product} --start {since}")  # fmt: skip
        try:
            table = run_preset(self._config(), "ohlcv", product=self.product, interval=interval, start=since)
        except QueryError as exc:
            say(f"  (no result: {exc})")
            return
        write_table(pa.RecordBatchReader.from_batches(table.schema, table.to_batches()), sys.stdout, 12)
        sys.stdout.flush()

    def report(self, summary_rows: list[dict[str, object]]) -> None:
        from daedalus.plot.data import PlotError, load_for
        from daedalus.plot.html import write_html
        from daedalus.plot.png import write_png

        try:
            data = load_for(self._config(), self.product, None, None)
        except PlotError as exc:
            say(f"\nno plot: {exc}")
            return
        png = write_png(data, self.report_dir / f"{REPORT_NAME}.png").resolve()
        page = write_html(data, self.report_dir / f"{REPORT_NAME}.html", {"Demo run": summary_rows}).resolve()
        say()
        say(f"plot:   {png}")
        say(f"report: {page}")


class DemoFailed(Exception):
    def __init__(self, what: str, log_file: Path) -> None:
        super().__init__(what)
        self.log_file = log_file


def _total(value: object) -> int:
    """A heartbeat counter: a number, or a mapping per connection."""
    if isinstance(value, dict):
        return sum(int(v) for v in value.values() if isinstance(v, int | float))
    return int(value) if isinstance(value, int | float) else 0


def _progress(elapsed: float, seconds: float, ingest_file: Path, etl_file: Path) -> str:
    beat, etl = read_heartbeat(ingest_file), read_heartbeat(etl_file)
    if beat is None:
        return f"  [{elapsed:4.0f}s/{seconds:g}s] waiting for ingest"
    c = beat.counters
    frames = _total(c.get("frames_received"))
    processed = _total(etl.counters.get("segments_processed")) if etl else 0
    closed, written = _total(c.get("segment_rotations")), _total(c.get("bytes_written"))
    return (f"  [{elapsed:4.0f}s/{seconds:g}s] frames {frames:,} ({frames / max(elapsed, 1e-9):,.0f}/s)  "
            f"{written / 1e6:.1f} MB  segments closed {closed}, processed {processed}  "
            f"gaps {_total(c.get('gaps'))}  reconnects {_total(c.get('reconnects'))}")  # fmt: skip


def _tail(path: Path, lines: int = 5) -> str:
    return "\n".join("    " + ln for ln in procs.read_text(path).splitlines()[-lines:])


WORK_PREFIX = "daedalus-demo-"
OWNER_FILE = "demo.pid"


def sweep_stale_work_dirs() -> list[Path]:
    """Remove the temporary directories of earlier demos that were killed before their own
    clean-up ran (their ``demo.pid`` names a process that is gone), so a rerun cleans up."""
    removed = []
    for work in Path(tempfile.gettempdir()).glob(f"{WORK_PREFIX}*"):
        try:
            owner = int((work / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not ours, or just being created: leave it
        if not psutil.pid_exists(owner):
            shutil.rmtree(work, ignore_errors=True)
            removed.append(work)
    return removed


def run_demo(seconds: float, keep: Path | None, product: str) -> int:
    """The whole demo; returns the exit code (0, 1 when something failed, 130 when cut short)."""
    for stale in sweep_stale_work_dirs():
        say(f"removed {stale}, left behind by a demo that was killed")
    work = keep.resolve() if keep is not None else Path(tempfile.mkdtemp(prefix=WORK_PREFIX))
    work.mkdir(parents=True, exist_ok=True)
    if keep is None:
        (work / OWNER_FILE).write_text(str(os.getpid()))
    # kept: everything in one directory; not kept: the report in the current directory (the rest goes)
    run = DemoRun(DemoPlan(seconds, work), product, work if keep is not None else Path.cwd(), Interrupts())
    code = 0
    say(f"daedalus demo: the whole pipeline for {seconds:g} s against the built-in simulator (offline)")
    try:
        try:
            run.start_supervisor(*run.start_sim())
            run.capture()
            run.stop_all()
            run.final_etl()
        except KeyboardInterrupt:
            run.skipped = True
            say("\ninterrupted: stopping everything; the summary shows what is on disk")
        except DemoFailed as exc:
            code = 1
            say(f"demo failed: {exc}; the end of {exc.log_file}:")
            say(_tail(exc.log_file))
        run.interrupts.cleaning = True
        run.stop_all()
        run.interrupts.cleaning = False
        code = max(code, run.results())
    finally:
        run.interrupts.cleaning = True
        run.stop_all()
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
            say(f"removed {work} (data, config, logs): run with --keep DIR to keep them and query them afterwards")
        else:
            say(f"kept: {work} (config.yaml, data/, logs/)")
        Interrupts.restore()
    return 130 if run.skipped else code
