"""The terminal's view of a sync pass: a rich progress bar over the backlog's bytes, with the
rate and the time left. ``daedalus sync`` shows it only when stdout is a terminal (never under
the supervisor, whose child output goes to a log file)."""

from __future__ import annotations

from typing import Any

from daedalus.sync.engine import Progress


class TerminalProgress(Progress):
    """A rich progress bar over the pass's backlog bytes, with the rate (a terminal only)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("sync"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
                       TextColumn("{task.description}"), transient=False)  # fmt: skip
        self.task: Any = None

    def start(self, files: int, total_bytes: int) -> None:
        self.task = self.bar.add_task(f"{files:,} files", total=total_bytes)
        self.bar.start()

    def sent(self, nbytes: int) -> None:
        if self.task is not None:
            self.bar.update(self.task, advance=nbytes)

    def close(self) -> None:
        if self.task is not None:
            self.bar.stop()
