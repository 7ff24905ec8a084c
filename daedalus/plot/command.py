"""The ``daedalus plot`` command (registered on the CLI by :func:`register`)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add ``plot`` to the ``daedalus`` command line (in progress)."""
