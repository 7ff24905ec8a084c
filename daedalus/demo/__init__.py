"""``daedalus demo``: the whole pipeline against the built-in simulator, offline.

The simulator and the supervisor run as real processes (the same commands a user runs), on
a data directory of their own; afterwards the demo reads what they left on disk. Modules:
``plan`` (simulator flags and the generated config), ``procs`` (starting and stopping the
processes), ``figures`` (the summary, from the files), ``runner`` (the timeline and output).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DEFAULT_SECONDS = 60.0


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the ``daedalus`` command line (heavy imports stay inside the command)."""

    @app.command()
    def demo(
        seconds: Annotated[float, typer.Option(help="How long to capture, in seconds.")] = DEFAULT_SECONDS,
        keep: Annotated[
            Path | None,
            typer.Option(
                help="Keep everything (config, data, logs, plot, report) in this new directory. Without it the "
                "data goes to a temporary directory, removed at the end, and the plot and report to the current one."
            ),
        ] = None,
        product: Annotated[str, typer.Option(help="Product the sample query and the plot are about.")] = "BTC-USD",
    ) -> None:
        """The whole pipeline against the built-in simulator, offline: simulator and supervisor (ingest +
        ETL watcher) for --seconds, with injected gaps and one disconnect; then a summary, a sample query,
        a plot PNG and an HTML report. Ctrl-C stops the capture early; twice skips to the summary."""
        import math

        from daedalus.cli import _fail
        from daedalus.demo.plan import MAX_SECONDS, MIN_SECONDS, PRODUCTS
        from daedalus.demo.runner import run_demo

        if not (math.isfinite(seconds) and MIN_SECONDS <= seconds <= MAX_SECONDS):
            raise _fail(f"--seconds: must be between {MIN_SECONDS:g} and {MAX_SECONDS:g} (got {seconds})")
        if product not in PRODUCTS:
            raise _fail(f"--product: the demo simulates {', '.join(PRODUCTS)} (got {product!r})")
        if keep is not None and keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
            raise _fail(f"--keep {keep}: must be a new or empty directory (the demo starts from nothing)")
        raise typer.Exit(run_demo(seconds, keep, product))
