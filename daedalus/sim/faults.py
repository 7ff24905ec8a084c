"""Fault injection settings, shared by the CLI flags and the in-process test API.

The server reads these on every frame and every monitor tick, so a test may change
them while clients are connected (``sim.faults.drop_rate = 0.2``).
"""

from __future__ import annotations

from dataclasses import dataclass

from daedalus.sim.checks import check_range


@dataclass
class FaultConfig:
    drop_rate: float = 0.0
    """Fraction of update frames (level2, trades, ticker, heartbeats) not sent; their
    ``sequence_num`` is still consumed, so the client sees a gap."""

    disconnect_every: float | None = None
    """Close every connection this many seconds after it opened."""

    idle_timeout: float | None = None
    """Close a connection that received nothing for this many seconds and is not
    subscribed to ``heartbeats`` (Coinbase closes idle channels the same way)."""

    malformed_rate: float = 0.0
    """Fraction of frames preceded by a truncated copy that is not valid JSON (the
    truncated copy consumes no ``sequence_num``)."""

    stall_every: float | None = None
    """Every this many seconds, stop sending to each connection for ``stall_seconds``;
    frames produced meanwhile are held back and then delivered in one burst."""

    stall_seconds: float = 0.0

    def validate(self) -> None:
        """Raise :class:`SimConfigError` naming the first setting out of range (NaN and inf included)."""
        for name in ("drop_rate", "malformed_rate"):
            check_range(name, getattr(self, name), 0.0, 1.0)
        for name in ("disconnect_every", "idle_timeout", "stall_every"):
            value = getattr(self, name)
            if value is not None:
                check_range(name, value, 0.0, low_open=True)
        check_range("stall_seconds", self.stall_seconds, 0.0)
