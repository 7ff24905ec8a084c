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


def check_int(name: str, value: int, low: float = -math.inf, high: float = math.inf) -> None:
    """Raise :class:`SimConfigError` unless ``value`` is an integer within ``[low, high]``.

    A port or a count given as ``80.5`` or ``2.5`` (possible in process; the CLI parses
    integers) would pass :func:`check_range` and fail later, far from its cause."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int and low <= value <= high:
        return
    if math.isinf(low) and math.isinf(high):
        bound = ""
    elif math.isinf(high):
        bound = f" >= {low:g}"
    else:
        bound = f" between {low:g} and {high:g}"
    raise SimConfigError(name, f"{name} must be an integer{bound}, got {value!r}")
