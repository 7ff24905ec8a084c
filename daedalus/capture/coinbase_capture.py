"""The Coinbase source's capture: one :class:`CoinbaseCollector` per ``max_products_per_connection``
products, over the NDJSON segment writer (frames are kept verbatim, so Coinbase always writes
ndjson whatever ``ingestion.raw_format`` says for unified-record sources)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from daedalus.capture.auth import ws_jwt
from daedalus.capture.coinbase import CoinbaseCollector
from daedalus.capture.raw_writers import NdjsonRaw, mb
from daedalus.config import DaedalusConfig

SOURCE = "coinbase"


class CoinbaseCapture:
    def __init__(self, config: DaedalusConfig, clock: Callable[[], int]) -> None:
        self.source = SOURCE
        self.config = config
        self.raw = NdjsonRaw(config, SOURCE, clock)
        products = config.coinbase.product_ids
        per_conn = config.coinbase.max_products_per_connection
        self.collectors = [
            CoinbaseCollector(
                i + 1, products[start : start + per_conn], config.coinbase, config.ingestion, self.raw.writer, clock
            )
            for i, start in enumerate(range(0, len(products), per_conn))
        ]
        self._last_messages: dict[int, int] = {}

    def check_settings(self) -> None:
        """Fail fast, with the reason, when API keys are set but cannot sign a token."""
        key = self.config.coinbase.api_key.get_secret_value()
        if key:
            ws_jwt(key, self.config.coinbase.api_secret.get_secret_value())

    def tasks(self) -> dict[str, Coroutine[Any, Any, None]]:
        return {f"collector-{c.conn_id}": c.run() for c in self.collectors}

    async def stop(self) -> None:
        for collector in self.collectors:
            with contextlib.suppress(Exception):
                await collector.stop()

    def started_fields(self) -> dict[str, object]:
        return {"connections": len(self.collectors), "products": len(self.config.coinbase.product_ids)}

    def heartbeat(self) -> tuple[dict[str, object], dict[str, object], dict[str, dict[str, float | None]]]:
        conns = {str(c.conn_id): c.stats for c in self.collectors}
        watchdog = self.config.ingestion.watchdog_timeout_seconds
        ages = {k: s.last_message_age() for k, s in conns.items()}
        connected = {k: int(s.state == "connected") for k, s in conns.items()}
        stalled = any(connected[k] and (ages[k] if ages[k] is not None else s.uptime()) > watchdog
                      for k, s in conns.items())  # fmt: skip
        products: dict[str, dict[str, float | None]] = {}
        for c in self.collectors:
            for product, seen_ns in c.stats.product_seen.items():
                products[product] = {"last_time": seen_ns / 1e9, "mid": c.stats.product_mid.get(product)}
        counters = {
            "frames_received": {k: s.messages for k, s in conns.items()},
            "bytes_received": {k: s.bytes for k, s in conns.items()},
            "reconnects": {k: s.reconnects for k, s in conns.items()},
            "gaps": {k: s.gaps for k, s in conns.items()},
        }
        gauges = {
            "connected": connected,
            "last_frame_age_seconds": ages,
            "uptime_seconds": {k: round(s.uptime(), 3) for k, s in conns.items()},
            "watchdog_seconds": watchdog,
            "stalled": int(stalled),
        }
        return counters, gauges, products

    def status_lines(self, span: float) -> list[str]:
        lines = []
        for c in self.collectors:
            s = c.stats
            rate = (s.messages - self._last_messages.get(c.conn_id, 0)) / span
            self._last_messages[c.conn_id] = s.messages
            age = s.last_message_age()
            lines.append(
                f"[coinbase#{c.conn_id}] {s.state} up={s.uptime():.0f}s msgs={s.messages:,} ({rate:,.0f}/s) "
                f"bytes={mb(s.bytes)} errors={s.errors} reconnects={s.reconnects} gaps={s.gaps} pauses={s.read_pauses} "
                f"last={'-' if age is None else f'{age:.2f}s'} ago"
            )
        return lines
