"""The one backoff every retry loop uses."""

from __future__ import annotations

import random

from daedalus.backoff import backoff_delay
from daedalus.capture.ccxt_collector import CcxtCollector
from daedalus.config import CcxtExchangeConfig


def test_doubles_from_base_to_the_cap_with_jitter_in_range():
    rng = random.Random(1)
    for attempt, step in [(1, 1.0), (2, 2.0), (3, 4.0), (7, 60.0), (8, 60.0)]:
        for _ in range(50):
            assert step * 0.5 <= backoff_delay(attempt, 1.0, 60.0, rng) <= step
            assert step * 0.8 <= backoff_delay(attempt, 1.0, 60.0, rng, low=0.8) <= step


def test_days_of_failures_stay_at_the_cap_instead_of_overflowing():
    """The ccxt collector used to compute ``base * 2**attempt`` unbounded: after ~1,000 failed
    attempts (about 17 hours of an exchange down at the 60 s cap) that overflowed a float."""
    assert backoff_delay(10**6, 1.0, 60.0, random.Random(2)) <= 60.0
    collector = CcxtCollector("coinbase", CcxtExchangeConfig(channels={"watchTrades": ["BTC/USD"]}), sink=None)
    assert 30.0 <= collector._backoff(5000) <= 60.0


def test_reconnect_pause_follows_the_ingestion_settings():
    from daedalus.backoff import reconnect_pause
    from daedalus.config import IngestionConfig

    rng = random.Random(3)
    limited = IngestionConfig(max_reconnect_attempts=2, reconnect_delay=1.0, max_reconnect_delay=4.0)
    assert [reconnect_pause(limited, n, rng) is None for n in (1, 2, 3)] == [False, False, True]
    assert 1.0 <= reconnect_pause(limited, 2, rng) <= 2.0  # base * 2, jittered by [0.5, 1]
    assert reconnect_pause(IngestionConfig(auto_reconnect=False), 1, rng) is None
    forever = IngestionConfig(max_reconnect_attempts=-1, reconnect_delay=1.0, max_reconnect_delay=4.0)
    assert reconnect_pause(forever, 10**9, rng) <= 4.0
