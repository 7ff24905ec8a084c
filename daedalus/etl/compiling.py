"""Heartbeats while numba compiles.

The ETL watcher publishes its heartbeat between batches, so a job stuck in a batch stops it and
the supervisor restarts the job as hung after ``hang_timeout_seconds`` (60). But numba compiles
a kernel inside the first batch that calls it with a cache that does not have it yet: ~20 s on
the dev machine for the Coinbase path (scanner and book engine), minutes on a Raspberry Pi 4,
the first time after an install or an upgrade. Restarted as hung in the middle of it, the job
would start compiling again, and again. So while, and only while, a compile is under way, a
thread keeps the heartbeat going: a compile is not taken for a hang, and a real hang still is.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from numba.core import event

from daedalus.logs import get_logger

log = get_logger(__name__)


class CompileWatch(event.Listener):
    """Counts numba's compiles under way (a kernel's callees compile inside it: nested events)
    and logs each outermost one with its duration."""

    def __init__(self) -> None:
        self.depth = 0
        self.compiles = 0  # outermost compiles finished
        self.ticks = 0  # wake-ups of the keep-alive thread
        self._started = 0.0
        self._lock = threading.Lock()

    def on_start(self, ev: event.Event) -> None:
        with self._lock:
            self.depth += 1
            if self.depth == 1:
                self._started = time.monotonic()
                log.info("numba_compiling", kernel=_name(ev))

    def on_end(self, ev: event.Event) -> None:
        with self._lock:
            self.depth -= 1
            if self.depth == 0:
                self.compiles += 1
                log.info("numba_compiled", kernel=_name(ev), seconds=round(time.monotonic() - self._started, 2))

    @property
    def compiling(self) -> bool:
        return self.depth > 0


def _name(ev: event.Event) -> str:
    dispatcher = (ev.data or {}).get("dispatcher")
    func = getattr(dispatcher, "py_func", None)
    return f"{func.__module__}.{func.__qualname__}" if func is not None else "?"


@contextmanager
def heartbeat_while_compiling(beat: Callable[[], None], every_seconds: float) -> Iterator[CompileWatch]:
    """Call ``beat()`` every ``every_seconds`` from a thread while numba compiles, within the block."""
    watch = CompileWatch()
    stop = threading.Event()

    def keep_alive() -> None:
        while not stop.wait(every_seconds):
            watch.ticks += 1
            if watch.compiling:
                beat()

    thread = threading.Thread(target=keep_alive, name="compile-heartbeat", daemon=True)
    with event.install_listener("numba:compile", watch):
        thread.start()
        try:
            yield watch
        finally:
            stop.set()
            thread.join()
