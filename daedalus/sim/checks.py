"""Range checks shared by :class:`~daedalus.sim.SimConfig` and :class:`~daedalus.sim.FaultConfig`.

Settings reach the simulator from CLI flags and from tests; both get the same one-line
reason. The error carries the setting's name so the CLI can name its flag
(``levels`` -> ``--levels``).
"""

from __future__ import annotations

import math


class SimConfigError(ValueError):
    """One simulator setting is out of range; ``name`` is the setting (``drop_rate``)."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(message)

    @property
    def flag(self) -> str:
        """The CLI flag of this setting (``--drop-rate``)."""
        return "--" + self.name.replace("_", "-")


def check_range(name: str, value: float, low: float, high: float = math.inf, *, low_open: bool = False) -> None:
    """Raise :class:`SimConfigError` unless ``value`` is finite and within ``[low, high]``
    (``(low, high]`` with ``low_open``). NaN and infinity are never a valid setting."""
    finite = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    inside = finite and (value > low if low_open else value >= low) and value <= high
    if inside:
        return
    if high == math.inf:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise SimConfigError(name, f"{name} must be a finite number {bound}, got {value!r}")
    raise SimConfigError(name, f"{name} must be between {low:g} and {high:g}, got {value!r}")
