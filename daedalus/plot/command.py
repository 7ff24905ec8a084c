"""The ``daedalus plot`` command (registered on the CLI by :func:`register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from daedalus.query.command import ConfigOption, DataDirOption, ProcessedOption

SUFFIXES = (".png", ".html")


def register(app: typer.Typer) -> None:
    """Add ``plot`` to the ``daedalus`` command line (matplotlib and DuckDB load only when it runs)."""

    @app.command()
    def plot(
        product: Annotated[str, typer.Option("--product", "-p", help="Product id, e.g. BTC-USD.")],
        config: ConfigOption = None,
        data_dir: DataDirOption = None,
        processed: ProcessedOption = None,
        start: Annotated[
            str | None, typer.Option(help="UTC time (2026-08-09T21:00:00Z, 2026-08-09); default: the first book row.")
        ] = None,
        end: Annotated[str | None, typer.Option(help="UTC time; default: the last book row.")] = None,
        out: Annotated[
            Path | None, typer.Option(help="FILE.png or FILE.html (default: plot-<product>-<start>.png here).")
        ] = None,
    ) -> None:
        """Plot one product: mid with bid/ask band, trades, VWAP bars, spread, invalid-book gaps."""
        from daedalus.cli import _fail
        from daedalus.query.command import dataset_for

        if out is not None and out.suffix.lower() not in SUFFIXES:
            raise _fail(f"--out {out}: must end in .png or .html")
        settings, root = dataset_for(config, data_dir, processed)
        from daedalus.plot.data import PlotError, load_for
        from daedalus.plot.html import write_html
        from daedalus.plot.png import write_png
        from daedalus.query.remote import RemoteError

        try:
            data = load_for(settings, product, start, end, processed=root)
        except (PlotError, RemoteError) as exc:
            raise _fail(str(exc)) from None
        try:
            if out is not None and out.suffix.lower() == ".html":
                written = write_html(data, out)
            else:
                written = write_png(data, out)
        except OSError as exc:
            raise _fail(f"cannot write {out}: {exc.strerror or exc}", 1) from None
        typer.echo(str(written))
