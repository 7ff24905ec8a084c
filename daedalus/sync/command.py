"""``daedalus sync``: one pass (``--once``) or one every ``interval`` seconds until SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from daedalus.exitcodes import FAILED, NEEDS_OPERATOR
from daedalus.logs import get_logger

if TYPE_CHECKING:
    from daedalus.config import DaedalusConfig
    from daedalus.sync.engine import SyncSummary

log = get_logger("daedalus.sync")


def summary_text(summary: SyncSummary, *, dry_run: bool) -> str:
    """The end-of-pass line an operator reads (numbers, not guesses)."""
    if dry_run:
        return (f"dry run: {summary.pending_files:,} files, {summary.pending_bytes / 1e6:,.1f} MB would be uploaded "
                f"({summary.skipped:,} already synced)")  # fmt: skip
    resumed = f", {summary.parts_resumed:,} parts resumed" if summary.parts_resumed else ""
    stale = f", {summary.stale_aborted:,} stale uploads aborted" if summary.stale_aborted else ""
    down = ", stopped early: the server did not answer" if summary.unavailable else ""
    return (f"uploaded {summary.files_uploaded:,} files ({summary.bytes_uploaded / 1e6:,.1f} MB sent{resumed}), "
            f"verified {summary.verified:,}, already synced {summary.skipped:,}, failed {summary.failed:,}, "
            f"deleted {summary.deleted:,}, retried {summary.files_retried:,} files "
            f"({summary.bytes_retried / 1e6:,.1f} MB sent again, {summary.requests_retried:,} requests retried), "
            f"backlog {summary.backlog_files:,} files ({summary.backlog_bytes / 1e6:,.1f} MB)"
            f"{stale}{down}")  # fmt: skip


#: cumulative counters of the sync heartbeat (``SyncSummary`` field -> heartbeat key)
COUNTERS = {"files_uploaded": "files_uploaded", "bytes_uploaded": "bytes_uploaded", "verified": "files_verified",
            "failed": "files_failed", "deleted": "files_deleted", "files_retried": "files_retried",
            "bytes_retried": "bytes_retried", "requests_retried": "requests_retried"}  # fmt: skip
#: gauges of the sync heartbeat: the running pass's once it has discovered its files, else the
#: last finished pass's (None before any)
GAUGES = {"backlog_files": "backlog_files", "backlog_bytes": "backlog_bytes"}


class SyncHeartbeat:
    """``run/sync.json`` for the supervisor, from a thread: a pass uploading one big file for
    minutes is busy, not hung (botocore's connect/read timeouts bound every request). Counters
    add up every pass of this process, so the ``_total`` metrics never go back."""

    def __init__(self, settings: DaedalusConfig) -> None:
        from daedalus.ops.heartbeat import HeartbeatPublisher

        self.publisher = HeartbeatPublisher(settings.layout, child="sync", kind="sync", source=None,
                                            every_seconds=settings.supervisor.heartbeat_seconds)  # fmt: skip
        self.done = dict.fromkeys(COUNTERS.values(), 0)
        self.current: SyncSummary | None = None
        self.last: SyncSummary | None = None
        self.last_success: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sync-heartbeat", daemon=True)

    def __enter__(self) -> SyncHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.publisher.remove()

    def finished(self, summary: SyncSummary) -> None:
        for field, key in COUNTERS.items():
            self.done[key] += getattr(summary, field)
        self.current = None
        self.last = summary
        if summary.failed == 0:
            self.last_success = time.time()

    def stats(self) -> dict[str, dict[str, object]]:
        counters = dict(self.done)
        if (live := self.current) is not None:
            for field, key in COUNTERS.items():
                counters[key] += getattr(live, field)
        gauges: dict[str, object] = {"busy": int(live is not None), "last_success_time": self.last_success}
        shown = live if live is not None and live.discovered else self.last  # no dip to 0 as a pass starts
        for field, key in GAUGES.items():
            gauges[key] = getattr(shown, field) if shown is not None else None
        return {"counters": counters, "gauges": gauges}

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.publisher.publish(**self.stats())
            self._stop.wait(self.publisher.every)


def run_passes(settings: DaedalusConfig, client: Any, heartbeat: SyncHeartbeat, stop: threading.Event, *,
               once: bool, dry_run: bool, include_ready: bool, wait: float, progress: bool) -> bool:  # fmt: skip
    """Pass after pass (one with ``once`` or ``dry_run``) until ``stop``; True when the last pass
    failed some files. A pass that fails (server down beyond the retry budget) is counted and
    logged, and the next pass takes its files again; only a permanent error (:class:`SyncError`:
    bad credentials, no such bucket) ends the loop, raised to the caller."""
    from daedalus.sync.engine import SyncPass
    from daedalus.sync.progress import TerminalProgress

    while True:
        bar = TerminalProgress() if progress and not dry_run else None
        sync_pass = SyncPass(settings, client, include_ready=include_ready, dry_run=dry_run, progress=bar)
        heartbeat.current = sync_pass.summary
        summary = sync_pass.run()
        heartbeat.finished(summary)
        typer.echo(summary_text(summary, dry_run=dry_run))
        log.info("sync_pass_done", uploaded=summary.files_uploaded, bytes=summary.bytes_uploaded,
                 verified=summary.verified, skipped=summary.skipped, failed=summary.failed, deleted=summary.deleted,
                 files_retried=summary.files_retried, bytes_retried=summary.bytes_retried,
                 requests_retried=summary.requests_retried, backlog_files=summary.backlog_files,
                 backlog_bytes=summary.backlog_bytes)  # fmt: skip
        if summary.failed:
            log.error("sync_pass_failed", failed=summary.failed, backlog_files=summary.backlog_files,
                      first_error=summary.errors[0] if summary.errors else "",
                      effect="the next pass tries again")  # fmt: skip
        if once or dry_run or stop.wait(wait):
            return summary.failed > 0


def register(app: typer.Typer) -> None:
    @app.command()
    def sync(
        config: Annotated[Path, typer.Option("--config", "-c", help="YAML configuration file.")],
        once: Annotated[bool, typer.Option("--once", help="One pass, then exit (default: every sync.interval).")] = (
            False
        ),
        interval: Annotated[float | None, typer.Option(help="Seconds between passes (default: sync.interval).")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would move, and how many bytes.")] = False,
        include_ready: Annotated[
            bool, typer.Option(help="Also raw/ready/ (when no ETL runs on this machine to archive segments).")
        ] = False,
    ) -> None:
        """Upload closed raw segments and processed files to S3, verified (size and SHA-256)."""
        from daedalus.cli import _configured, _fail
        from daedalus.locks import AlreadyRunning, hold_lock
        from daedalus.ops.child import follow_supervisor
        from daedalus.sync.s3 import SyncError, make_client

        follow_supervisor()
        settings = _configured(config)
        if settings.sync.destination is None:
            raise _fail("sync.destination is not set (s3://bucket/prefix)")
        if interval is not None and not 0 < interval <= 86_400:
            raise _fail(f"--interval: must be more than 0 and at most 86400 seconds (got {interval})")
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        wait = settings.sync.interval if interval is None else interval
        if not dry_run:  # one sync per data dir: two would compact the ledger under each other's appends
            state = settings.layout.state_dir
            state.mkdir(parents=True, exist_ok=True)
            try:
                lock = hold_lock(state / "sync.lock", "daedalus sync is already running on")  # noqa: F841 - held
            except AlreadyRunning as exc:  # transient: the supervisor retries with backoff
                raise _fail(f"cannot start: {exc}", FAILED) from None
        client = make_client(settings.sync)
        with SyncHeartbeat(settings) as heartbeat:
            try:
                failed = run_passes(settings, client, heartbeat, stop, once=once, dry_run=dry_run,
                                    include_ready=include_ready, wait=wait, progress=sys.stdout.isatty())  # fmt: skip
            except SyncError as exc:  # bad credentials, no such bucket: waiting cannot cure it
                raise _fail(str(exc), NEEDS_OPERATOR) from None
        if failed:
            raise typer.Exit(FAILED)
