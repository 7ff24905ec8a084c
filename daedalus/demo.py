"""``daedalus demo``: the whole pipeline against the simulator, offline (in progress)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the ``daedalus`` command line (in progress)."""
