"""One capped exponential backoff with jitter, for everything that retries: collectors
reconnecting, exchanges recovering, the supervisor restarting a child."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daedalus.config import IngestionConfig

MAX_DOUBLINGS = 32  # past this the cap has long been reached; a bounded exponent cannot overflow


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random, *, low: float = 0.5) -> float:
    """``base * 2**(attempt - 1)`` capped at ``cap``, times a jitter drawn in ``[low, 1]`` so
    that clients failing together do not retry in step. ``attempt`` counts from 1; days of
    failures (a huge ``attempt``) still give at most ``cap``."""
    step = min(cap, base * 2.0 ** min(max(0, attempt - 1), MAX_DOUBLINGS))
    return step * (low + rng.random() * (1.0 - low))


def reconnect_pause(ingestion: IngestionConfig, attempt: int, rng: random.Random) -> float | None:
    """Seconds a collector waits before its ``attempt``-th reconnect (counting from 1), by the
    ``ingestion`` settings; None when it must give up (``auto_reconnect: false``, or past
    ``max_reconnect_attempts``; -1 = never)."""
    limit = ingestion.max_reconnect_attempts
    if not ingestion.auto_reconnect or (limit >= 0 and attempt > limit):
        return None
    return backoff_delay(attempt, ingestion.reconnect_delay, ingestion.max_reconnect_delay, rng)
