"""Fault injection settings, shared by the CLI flags and the in-process test API.

The server reads these on every frame and every monitor tick, so a test may change
them while clients are connected (``sim.faults.drop_rate = 0.2``).
"""

from __future__ import annotations

from dataclasses import dataclass


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
        for name in ("drop_rate", "malformed_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        for name in ("disconnect_every", "idle_timeout", "stall_every"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.stall_seconds < 0:
            raise ValueError(f"stall_seconds must be >= 0, got {self.stall_seconds}")
