"""What a child of ``daedalus run`` does first: die with its supervisor.

The supervisor starts each child with ``DAEDALUS_SUPERVISOR_PID`` in its environment. The
child asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), then checks
that the parent is still the supervisor: if the supervisor died between the fork and the
request, the child stops at once. So a supervisor killed with SIGKILL never leaves a
writer behind for its successor to collide with; SIGTERM (not SIGKILL) lets ingest close
its open segment into ``ready/`` on the way out.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

SUPERVISOR_PID_ENV = "DAEDALUS_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> bool:
    """Ask the kernel for SIGTERM when this process's parent dies; False when the parent is
    no longer ``parent`` (it died before the request could take effect). Linux only: elsewhere
    (or if the kernel refuses) True, and the parent's process-group kill still applies."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    return os.getppid() == parent


def follow_supervisor() -> None:
    """Tie this process's life to the supervisor's when started by one (no-op otherwise)."""
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    if not expected or not expected.isdigit():
        return
    if not die_with_parent(int(expected)):
        sys.stderr.write("daedalus: the supervisor that started this process is gone; stopping\n")
        sys.exit(1)
