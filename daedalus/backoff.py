"""One capped exponential backoff with jitter, for everything that retries: collectors
reconnecting, exchanges recovering, the supervisor restarting a child."""

from __future__ import annotations

import random

MAX_DOUBLINGS = 32  # past this the cap has long been reached; a bounded exponent cannot overflow


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random, *, low: float = 0.5) -> float:
    """``base * 2**(attempt - 1)`` capped at ``cap``, times a jitter drawn in ``[low, 1]`` so
    that clients failing together do not retry in step. ``attempt`` counts from 1; days of
    failures (a huge ``attempt``) still give at most ``cap``."""
    step = min(cap, base * 2.0 ** min(max(0, attempt - 1), MAX_DOUBLINGS))
    return step * (low + rng.random() * (1.0 - low))
