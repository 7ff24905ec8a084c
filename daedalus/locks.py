"""Process locks: one ingest per ``active/`` folder, one ETL per source."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import TextIO


class AlreadyRunning(Exception):
    """Another process holds the lock."""


def hold_lock(path: Path, holder: str = "daedalus ingest is already writing to") -> TextIO:
    """Take an exclusive lock for the life of the process (released by the OS at exit).

    Two writers on one ``active/`` would recover (move) each other's open segment; two ETL
    runs on one source would process the same segments twice.
    """
    handle = open(path, "a+")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise AlreadyRunning(f"another {holder} {path.parent} (lock {path.name} is held)") from None
    return handle
