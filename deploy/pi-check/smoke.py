"""The product on a Raspberry Pi 4's CPU: the smoke of ``make pi-check``, driven natively.

Every daedalus step runs under ``qemu-aarch64 -cpu cortex-a72`` with the arm64 Python and
aarch64 wheels that ``deploy/pi-check.sh`` prepared: the simulator replays a cut of the
reference recording (or, on a clone without it, serves its seeded synthetic market),
``daedalus ingest`` captures it, ``daedalus etl`` processes it (numba, pyarrow, DuckDB on
the cortex-a72), ``readback.py`` reads it with DuckDB and Polars. The same ETL and read-back
run natively on a copy of the same raw segments; both must give the same final best bid/ask
per product and the same row counts. Wall time and peak RSS (``wait4``'s ``ru_maxrss`` of
the qemu process, i.e. the emulated program plus qemu's own few MB) per step.

Run by the script; standalone: ``.venv/bin/python deploy/pi-check/smoke.py --help``.
``--native`` runs every step natively (no qemu, no sysroot): a fast check of this harness.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEADLINE = 900.0  # seconds for any one wait: emulation is 10-20x slower than native
SYNTHETIC_FRAMES = 600  # frames captured from the synthetic market when there is no recording


class StepFailed(RuntimeError):
    """A smoke step failed; the message names it."""


@dataclass
class Proc:
    """A started process whose output lines are collected by threads (nothing blocks on a pipe)."""

    name: str
    popen: subprocess.Popen[bytes]
    started: float
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)

    def wait(self, timeout: float = DEADLINE) -> tuple[int, float, int]:
        """(exit code, wall seconds, peak RSS in KiB) via wait4, which Popen.wait would not give."""
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.popen.pid, os.WNOHANG)
            if pid:
                self.popen.returncode = os.waitstatus_to_exitcode(status)
                return self.popen.returncode, time.monotonic() - self.started, usage.ru_maxrss
            if time.monotonic() > deadline:
                self.popen.kill()
                raise StepFailed(f"{self.name}: still running after {timeout:.0f}s")
            time.sleep(0.05)

    def tail(self) -> str:
        return "\n".join((self.out + self.err)[-15:])


def _pump(stream: io.BufferedReader, sink: list[str], echo: bool) -> None:
    for raw in stream:
        line = raw.decode(errors="replace").rstrip()
        sink.append(line)
        if echo:
            print(f"    | {line}", flush=True)


class Runner:
    """Starts commands natively or under qemu, and keeps the table of figures."""

    def __init__(self, sysroot: Path | None, site: Path | None, cache: Path) -> None:
        """``sysroot`` None: the "emulated" steps run natively too (``--native``), with the
        checkout's own numba cache (a check of this harness, not of compile times)."""
        own_cache = {} if sysroot is None else {"NUMBA_CACHE_DIR": str(cache / "numba-native")}
        self.native_env = {**os.environ, **own_cache}
        self.figures: list[dict[str, object]] = []
        self.tag = "(emulated)"  # in the step names
        if sysroot is None or site is None:
            self.emulated_prefix, self.emulated_env, self.tag = [sys.executable], self.native_env, "(native stand-in)"
            return
        self.emulated_prefix = [
            "nice", "-n", "10", "qemu-aarch64", "-cpu", "cortex-a72", "-L", str(sysroot),
            str(sysroot / "usr" / "bin" / "python3.11"),
        ]  # fmt: skip
        self.emulated_env = {
            **os.environ,
            "PYTHONPATH": f"{site}:{REPO}",
            "PYTHONNOUSERSITE": "1",
            "PYTHONPYCACHEPREFIX": str(cache / "pycache"),  # keep the checkout free of emulated .pyc
            "NUMBA_CACHE_DIR": str(cache / "numba"),  # and of aarch64 machine code
            "NUMBA_CPU_NAME": "cortex-a72",  # what LLVM detects on a Pi 4 (qemu-user shows the host's cpuinfo)
        }

    def start(self, name: str, args: list[str], *, emulated: bool, echo: bool = False) -> Proc:
        cmd = (self.emulated_prefix if emulated else [sys.executable]) + args
        print(f"==> {name}", flush=True)
        popen = subprocess.Popen(
            cmd, cwd=REPO, env=self.emulated_env if emulated else self.native_env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        proc = Proc(name, popen, time.monotonic())
        for stream, sink in ((popen.stdout, proc.out), (popen.stderr, proc.err)):
            threading.Thread(target=_pump, args=(stream, sink, echo), daemon=True).start()
        return proc

    def finish(self, proc: Proc, *, emulated: bool, wall: float | None = None, timeout: float = DEADLINE) -> None:
        """Wait for ``proc``; exit code 0 or a SIGINT-stopped service counts as success."""
        code, total, rss_kib = proc.wait(timeout)
        if code not in (0, -signal.SIGINT, 128 + signal.SIGINT):
            why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            raise StepFailed(f"{proc.name}: {why}\n{proc.tail()}")
        seconds = total if wall is None else wall
        self.figures.append({"step": proc.name, "emulated": emulated, "wall_s": round(seconds, 2),
                             "peak_rss_mb": round(rss_kib / 1024, 1)})  # fmt: skip
        print(f"    {proc.name}: {seconds:.1f} s, peak RSS {rss_kib / 1024:.0f} MB", flush=True)

    def run(self, name: str, args: list[str], *, emulated: bool) -> Proc:
        proc = self.start(name, args, emulated=emulated)
        self.finish(proc, emulated=emulated)
        return proc


def wait_for(condition: object, what: str, proc: Proc, timeout: float = DEADLINE) -> None:
    """Poll ``condition()`` until true; fail with ``what`` if ``proc`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if proc.popen.poll() is not None:
            raise StepFailed(f"{proc.name}: exited ({proc.popen.returncode}) before {what}\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise StepFailed(f"{proc.name}: no {what} after {timeout:.0f}s\n{proc.tail()}")
        time.sleep(0.1)


def cut_recording(source: Path, target: Path, lines: int) -> int:
    """The first ``lines`` lines of the zstd recording (both level2 snapshots are in the first 30)."""
    kept = []
    with source.open("rb") as handle:
        for i, line in enumerate(io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(handle))):
            if i >= lines:
                break
            kept.append(line)
    target.write_bytes(b"".join(kept))
    return sum(1 for line in kept if line.startswith(b'{"t":"recv"'))


def frames_written(data_dir: Path) -> int:
    """``frames_written`` of ingest's heartbeat (``<data_dir>/run/ingest*.json``), 0 before the first."""
    total = 0
    for path in (data_dir / "run").glob("ingest*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # being replaced: next poll
            total += int(json.loads(path.read_text())["counters"]["frames_written"])
    return total


def write_config(data_dir: Path, ws_url: str | None) -> Path:
    config = {"data_dir": str(data_dir)}
    if ws_url:
        rest = ws_url.replace("ws://", "http://").removesuffix("/ws")
        config["coinbase"] = {"ws_url": ws_url, "rest_url": rest}  # type: ignore[assignment]
        config["ingestion"] = {"raw_compression": "zstd"}  # type: ignore[assignment]  # as on a Pi
    path = data_dir.with_suffix(".json")  # JSON is YAML
    path.write_text(json.dumps(config))
    return path


def sim_args(work: Path, recording: Path | None, lines: int) -> list[str]:
    """The simulator's arguments: a cut of the recording, or (on a clone without it) the
    seeded synthetic market, which is as deterministic for the native comparison: both
    ETLs read the same captured segments."""
    args = ["-m", "daedalus", "sim", "--port", "0", "--log-format", "json"]
    if recording is None:
        print(f"==> no recording: the simulator's synthetic market (seed 7, {SYNTHETIC_FRAMES} frames)")
        return [*args, "--seed", "7", "--rate", "200", "--levels", "200"]
    cut = work / "recording.jsonl"
    frames = cut_recording(recording, cut, lines)
    print(f"==> recording: first {lines} lines of {recording.name} ({frames} frames, {cut.stat().st_size >> 20} MB)")
    return [*args, "--replay", str(cut), "--speed", "0"]


def smoke(runner: Runner, work: Path, recording: Path | None, lines: int) -> dict[str, object]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sim = runner.start(f"sim {runner.tag}", sim_args(work, recording, lines), emulated=True)
    ready = re.compile(r"ready ws=(\S+)")
    wait_for(lambda: any(ready.search(line) for line in sim.out), "ready line", sim)
    ws_url = next(m.group(1) for line in sim.out if (m := ready.search(line)))
    print(f"    sim ready after {time.monotonic() - sim.started:.1f} s: {ws_url}")

    emu, native = work / "emulated", work / "native"
    ingest = runner.start(f"ingest {runner.tag}", ["-m", "daedalus", "ingest", "--config",
                                                str(write_config(emu, ws_url))], emulated=True)  # fmt: skip
    done = re.compile(r'"sim_replay_done".*"frames": ?(\d+)|sim_replay_done.*frames=(\d+)')

    def sent() -> int | None:
        if recording is None:  # the synthetic market never ends: enough once that many are on disk
            return SYNTHETIC_FRAMES
        for line in sim.err:
            if m := done.search(line):
                return int(m.group(1) or m.group(2))
        return None

    wait_for(lambda: sent() is not None, "sim_replay_done (every frame sent)", sim)
    wait_for(lambda: frames_written(emu) >= (sent() or 0), f"{sent()} frames written", ingest)
    capture_wall = time.monotonic() - ingest.started
    captured = frames_written(emu)  # from the heartbeat, which a clean exit removes
    ingest.popen.send_signal(signal.SIGINT)
    runner.finish(ingest, emulated=True, wall=capture_wall)
    sim.popen.send_signal(signal.SIGINT)
    runner.finish(sim, emulated=True)
    segments = sorted((emu / "raw" / "ready").rglob("segment_*"))
    if not segments:
        raise StepFailed(f"ingest {runner.tag}: no segment in {emu / 'raw' / 'ready'}")
    print(f"    captured {captured} frames into {len(segments)} segments")
    shutil.copytree(emu / "raw" / "ready", native / "raw" / "ready")

    runner.run(f"etl {runner.tag}", ["-m", "daedalus", "etl", "--config", str(write_config(emu, None))], emulated=True)
    runner.run("etl (native)", ["-m", "daedalus", "etl", "--config", str(write_config(native, None))], emulated=False)
    readback = str(HERE / "readback.py")
    got = runner.run(f"read-back DuckDB+Polars {runner.tag}", [readback, str(emu / "processed")], emulated=True)
    ref = runner.run("read-back DuckDB+Polars (native)", [readback, str(native / "processed")], emulated=False)
    got_facts, ref_facts = facts_of(got), facts_of(ref)
    for key in ("rows", "final_bbo"):
        if got_facts[key] != ref_facts[key]:
            raise StepFailed(f"compare: emulated {key} {got_facts[key]} != native {ref_facts[key]}")
    print(f"==> compare: final best bid/ask equal to native: {got_facts['final_bbo']}")
    print(f"    rows: {got_facts['rows']}")
    return {"frames": captured, "segments": len(segments), **got_facts}


def facts_of(proc: Proc) -> dict[str, object]:
    """readback.py's one JSON line (its last line of output)."""
    try:
        return json.loads(proc.out[-1])
    except (IndexError, ValueError):
        raise StepFailed(f"{proc.name}: no JSON line of facts\n{proc.tail()}") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sysroot", type=Path, help="arm64 Debian sysroot with python3.11")
    parser.add_argument("--site", type=Path, help="aarch64 wheels installed with --target")
    parser.add_argument("--native", action="store_true", help="no emulation: check this harness quickly")
    parser.add_argument("--cache", type=Path, required=True, help="pi-check cache directory (the run's files)")
    parser.add_argument("--recording", type=Path, help="the reference recording (.jsonl.zst); default: synthetic")
    parser.add_argument("--lines", type=int, default=400, help="lines of the recording to replay")
    parser.add_argument("--summary", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    if not args.native and (args.sysroot is None or args.site is None):
        parser.error("--sysroot and --site are needed (or --native)")
    if args.native:
        runner = Runner(None, None, args.cache.resolve())
    else:
        runner = Runner(args.sysroot.resolve(), args.site.resolve(), args.cache.resolve())
    try:
        facts = smoke(runner, args.cache.resolve() / "run", args.recording, args.lines)
    except StepFailed as exc:
        print(f"pi-check: FAILED at {exc}", file=sys.stderr)
        return 1
    print(f"\n{'step':<42} {'wall s':>8}   {'peak RSS MB':>11}")
    for f in runner.figures:
        print(f"{f['step']:<42} {f['wall_s']:>8.1f}   {f['peak_rss_mb']:>11.0f}")
    if args.summary:
        args.summary.write_text(json.dumps({"figures": runner.figures, **facts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
