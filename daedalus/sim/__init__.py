"""Exchange simulator speaking the Coinbase Advanced Trade protocol (WebSocket + REST)."""

from daedalus.sim.checks import SimConfigError
from daedalus.sim.faults import FaultConfig
from daedalus.sim.server import SimConfig, SimConnection, SimServer, serve

__all__ = ["FaultConfig", "SimConfig", "SimConfigError", "SimConnection", "SimServer", "serve"]
