"""The child side of liveness: publish a :class:`~daedalus.ops.records.Heartbeat` every
few seconds from the child's own working loop, so that a loop that hangs stops it (the ETL
also publishes from a thread while numba compiles: :mod:`daedalus.etl.compiling`).

Publishing never raises: a full or failing disk must not stop capture because its
heartbeat could not be written (the supervisor then sees a stale record and says so).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

from daedalus.layout import DataLayout
from daedalus.logs import get_logger
from daedalus.ops.records import Heartbeat, remove_stale_temporaries, write_record

log = get_logger(__name__)


class HeartbeatPublisher:
    def __init__(self, layout: DataLayout, *, child: str, kind: str, source: str | None, every_seconds: float) -> None:
        self.path = layout.heartbeat_file(child)
        self.child, self.kind, self.source = child, kind, source
        self.every = every_seconds
        self.started_at = time.time()
        self._last = 0.0
        self.failures = 0
        self._lock = threading.Lock()  # the ETL also publishes from a thread while numba compiles
        with contextlib.suppress(OSError):  # what a killed predecessor may have left
            remove_stale_temporaries(self.path.parent)

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every

    def publish(
        self,
        *,
        counters: dict[str, Any],
        gauges: dict[str, Any],
        products: dict[str, dict[str, float | None]] | None = None,
    ) -> None:
        record = Heartbeat(
            child=self.child, kind=self.kind, source=self.source, pid=os.getpid(), started_at=self.started_at,
            time=time.time(), counters=counters, gauges=gauges, products=products or {},
        )  # fmt: skip
        with self._lock:  # one writer of the record's temporary file at a time
            self._last = time.monotonic()
            try:
                write_record(self.path, record.to_dict())
            except OSError as exc:
                self.failures += 1
                if self.failures == 1 or self.failures % 100 == 0:
                    log.warning("heartbeat_write_failed", path=str(self.path), error=exc.strerror or repr(exc),
                                failures=self.failures)  # fmt: skip

    def remove(self) -> None:
        """At a clean stop: no record of a process that is gone."""
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
