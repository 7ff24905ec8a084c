"""What the supervisor runs and when it restarts it: pure code over times, no processes,
so the policy is tested without starting anything.

States (supervisord's names, one difference: nothing but ``fatal`` is final):

- ``starting``: a process runs, not yet ``start_seconds`` long;
- ``running``: it has stayed up ``start_seconds``;
- ``backoff``: it died; started again at ``next_start_at`` (capped exponential backoff with
  jitter, back to the initial delay once a process has run ``reset_after_seconds``);
- ``crashloop``: more than ``max_restarts`` failures within ``restart_window_seconds``;
  tried again after ``crashloop_cooldown_seconds`` (a capture service never gives up). That
  retry is a probe: failing before ``reset_after_seconds`` is ``crashloop`` again at once
  (status and health stay critical rather than flapping through ``backoff``).
  Restarts the supervisor asks for itself (hang, memory) start again at once and do not
  count: they come at most every ``hang_timeout``/``memory_check`` seconds, and a leaking
  ingest restarted now and then still captures, which ten minutes of cool-down would not;
- ``stopping``: the supervisor sent SIGTERM (hang, memory, shutdown) and waits;
- ``exited``: stopped by the supervisor at its shutdown;
- ``fatal``: the child exited with :data:`~daedalus.exitcodes.NEEDS_OPERATOR` (bad config,
  a checkpoint needing ``--rebuild-state``): a restart cannot cure it, so it stays down.
"""

from __future__ import annotations

import random
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daedalus.backoff import backoff_delay
from daedalus.config import ChildKind, DaedalusConfig, SupervisorConfig
from daedalus.exitcodes import NEEDS_OPERATOR


class SupervisorUsageError(Exception):
    """A flag the supervisor cannot act on (unknown source, nothing to run): exit 2."""


@dataclass(frozen=True)
class ChildSpec:
    name: str  # ingest-coinbase | etl | sync
    kind: ChildKind
    source: str | None
    argv: tuple[str, ...]


def daedalus_argv(*args: str) -> tuple[str, ...]:
    """A ``daedalus`` command line with this very interpreter (the venv's, not whatever
    ``daedalus`` the PATH finds)."""
    return (sys.executable, "-m", "daedalus", *args)


def plan_children(
    settings: DaedalusConfig, config_file: Path, sources: list[str] | None, *, sync: bool
) -> list[ChildSpec]:
    """The children to run, or :class:`SupervisorUsageError` naming what is wrong."""
    from daedalus import sources as registry
    from daedalus.etl.job import etl_child

    config = str(Path(config_file).resolve())
    enabled = registry.enabled(settings)
    available = ", ".join(registry.names())
    if sources is None:
        chosen = enabled
        if not chosen:
            raise SupervisorUsageError("no source to capture: every source is disabled in the config (*.enabled)")
    else:
        if not sources:
            raise SupervisorUsageError("--sources: give at least one source (e.g. --sources coinbase)")
        for source in sources:
            if source not in registry.names():
                raise SupervisorUsageError(f"--sources: unknown source {source!r} (available: {available})")
            if source not in enabled:
                raise SupervisorUsageError(f"--sources: {source} is disabled in the config ({source}.enabled: false)")
        chosen = list(dict.fromkeys(sources))
    specs = [
        ChildSpec(f"ingest-{source}", "ingest", source,
                  daedalus_argv("ingest", "--config", config, "--source", source))
        for source in chosen
    ]  # fmt: skip
    specs += [
        ChildSpec(etl_child(source), "etl", source,
                  daedalus_argv("etl", "--config", config, "--watch", "--source", source))
        for source in chosen
    ]  # fmt: skip
    if sync and settings.sync.enabled:  # --no-sync leaves it out
        specs.append(ChildSpec("sync", "sync", None, daedalus_argv("sync", "--config", config)))
    return specs


@dataclass
class ChildPolicy:
    """The state of one child over its successive processes, driven by events with times
    (monotonic seconds). Counts what ``daedalus status`` shows."""

    config: SupervisorConfig
    rng: random.Random = field(default_factory=random.Random)
    state: str = "backoff"  # before the first start: due at once
    state_since: float = 0.0
    next_start_at: float | None = 0.0
    started_at: float | None = None
    starts: int = 0
    memory_restarts: int = 0
    hang_restarts: int = 0
    failures: int = 0  # consecutive, for the backoff delay
    probing: bool = False  # the current process is the retry after a crashloop's cool-down
    restart_times: deque[float] = field(default_factory=deque)  # within restart_window_seconds
    stop_reason: str | None = None  # why the supervisor is stopping the process (hang, memory, shutdown)

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    def _set(self, state: str, now: float) -> None:
        if state != self.state:
            self.state, self.state_since = state, now

    def due(self, now: float) -> bool:
        """Whether a new process should be started now."""
        return self.state in ("backoff", "crashloop") and self.next_start_at is not None and now >= self.next_start_at

    def started(self, now: float) -> None:
        self.starts += 1
        self.probing = self.state == "crashloop"
        self.started_at, self.next_start_at, self.stop_reason = now, None, None
        self._set("starting", now)

    def tick(self, now: float) -> None:
        up = None if self.started_at is None else now - self.started_at
        if self.state == "starting" and up is not None and up >= self.config.start_seconds:
            self._set("running", now)

    def stopping(self, now: float, reason: str) -> None:
        """The supervisor sends SIGTERM: ``hang``/``stalled``, ``memory`` (counted) or ``shutdown``."""
        self.stop_reason = reason
        if reason == "memory":
            self.memory_restarts += 1
        elif reason in ("hang", "stalled"):
            self.hang_restarts += 1
        self._set("stopping", now)

    def backoff_delay(self) -> float:
        """``initial * 2**(failures-1)`` capped at the maximum, minus up to 20 % jitter (so
        children that failed together do not retry in lockstep)."""
        cfg = self.config
        return backoff_delay(self.failures, cfg.backoff_initial_seconds, cfg.backoff_max_seconds, self.rng, low=0.8)

    def exited(self, now: float, returncode: int | None, *, shutting_down: bool = False) -> str:
        """The process is gone; decide what comes next and return the new state."""
        uptime = 0.0 if self.started_at is None else now - self.started_at
        planned = self.stop_reason
        self.started_at = None
        if shutting_down or planned == "shutdown":
            self._set("exited", now)
            self.next_start_at = None
            return self.state
        if returncode == NEEDS_OPERATOR and planned is None:
            self._set("fatal", now)
            self.next_start_at = None
            return self.state
        if planned is not None:
            # a restart the supervisor asked for (hang, memory) starts again at once and does not
            # count towards crashloop: it comes at most every memory_check/hang_timeout seconds, and
            # a leaking ingest restarted now and then still captures; ten minutes of cool-down would not
            self._set("backoff", now)
            self.next_start_at = now
            return self.state
        if uptime >= self.config.reset_after_seconds:
            self.failures, self.probing = 0, False
        self.failures += 1
        delay = self.backoff_delay()
        self.restart_times.append(now)
        while self.restart_times and now - self.restart_times[0] > self.config.restart_window_seconds:
            self.restart_times.popleft()
        if len(self.restart_times) > self.config.max_restarts or self.probing:
            self._set("crashloop", now)
            self.next_start_at = now + self.config.crashloop_cooldown_seconds
        else:
            self._set("backoff", now)
            self.next_start_at = now + delay
        return self.state

    def shutdown(self, now: float) -> None:
        """Supervisor stopping: a child without a process is simply ``exited`` (fatal stays)."""
        if self.state in ("backoff", "crashloop"):
            self._set("exited", now)
            self.next_start_at = None


# ---- heartbeat statistics over restarts ------------------------------------------------------
def add_counters(total: Any, more: Any) -> Any:
    """Counters of two processes added leaf by leaf (nested per-label mappings and
    histograms alike), so the sum over a child's restarts only grows. A leaf that is not a
    number (None, text) takes the newer value."""
    if isinstance(total, dict) and isinstance(more, dict):
        out = dict(total)
        for key, value in more.items():
            out[key] = add_counters(out[key], value) if key in out else _copy(value)
        return out
    if _is_number(total) and _is_number(more):
        return total + more
    return _copy(more)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _copy(value: Any) -> Any:
    return {k: _copy(v) for k, v in value.items()} if isinstance(value, dict) else value
