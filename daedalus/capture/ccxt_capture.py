"""The ccxt source's capture: one isolated collector per configured exchange
(:class:`~daedalus.capture.ccxt_collector.CcxtSource`) handing unified records to the raw
writer of ``ingestion.raw_format``: the Parquet record writer, or NDJSON segments with one
line per record (:class:`daedalus.sources.ccxt_raw.NdjsonRecordSink`)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from daedalus.capture.ccxt_collector import CcxtSource, RecordSink
from daedalus.capture.raw_writers import raw_writer
from daedalus.config import ConfigError, DaedalusConfig
from daedalus.logs import get_logger

log = get_logger(__name__)

SOURCE = "ccxt"


def product_key(exchange: str, symbol: str) -> str:
    """How a ccxt market is named in heartbeats and health: ``coinbase:BTC/USD``."""
    return f"{exchange}:{symbol}"


def _mid(channel: str, record: dict[str, Any]) -> float | None:
    """Mid price of a book (top levels) or a ticker (bid/ask), when both sides are there."""
    try:
        if channel == "orderbook":
            bid, ask = record["bids"][0][0], record["asks"][0][0]
        elif channel == "ticker":
            bid, ask = record.get("bid"), record.get("ask")
        else:
            return None
        return (float(bid) + float(ask)) / 2 if bid is not None and ask is not None else None
    except (LookupError, TypeError, ValueError):  # an empty side or an odd record: no mid, not an error
        return None


class ProductTap:
    """Notes each market's last record time (and mid) on the way to the writer, for the
    heartbeat and health's freshness: a dict update per record, no parsing."""

    def __init__(self, sink: RecordSink) -> None:
        self.sink = sink
        self.seen: dict[str, int] = {}  # product key -> recv_ns of its last record
        self.mid: dict[str, float] = {}
        self.exchange_seen: dict[str, int] = {}

    def put_record(self, *, channel: str, exchange: str, symbol: str, recv_ns: int, record: dict[str, Any]) -> bool:
        key = product_key(exchange, symbol)
        self.seen[key] = self.exchange_seen[exchange] = recv_ns
        if channel != "trades":
            mid = _mid(channel, record)
            if mid is not None:
                self.mid[key] = mid
        return self.sink.put_record(channel=channel, exchange=exchange, symbol=symbol, recv_ns=recv_ns, record=record)


class CcxtCapture:
    def __init__(self, config: DaedalusConfig, clock: Callable[[], int], raw_format: str) -> None:
        self.source = SOURCE
        self.config = config
        self.clock = clock
        self.raw = raw_writer(config, SOURCE, raw_format, clock)
        self.ndjson_sink = None
        if raw_format == "parquet":
            sink: RecordSink = self.raw.writer
        else:
            from daedalus.sources.ccxt_raw import NdjsonRecordSink

            sink = self.ndjson_sink = NdjsonRecordSink(self.raw.writer)
        self.tap = ProductTap(sink)
        self.exchanges = CcxtSource(config.ccxt, self.tap, clock)
        self.collectors = self.exchanges.collectors
        self._last_messages: dict[str, int] = {}

    def check_settings(self) -> None:
        if not self.config.ccxt.exchanges:
            raise ConfigError("ccxt", ["ccxt.exchanges: no exchange configured (e.g. coinbase: {channels: ...})"])
        if self.config.ingestion.on_queue_full == "block":
            log.warning("ccxt_queue_never_blocks", setting="ingestion.on_queue_full: block",
                        effect="ccxt records are never held back: a full queue drops them and counts them (overflow)")

    def tasks(self) -> dict[str, Coroutine[Any, Any, None]]:
        return {"ccxt": self.exchanges.run()}

    async def stop(self) -> None:
        """Nothing to say goodbye to: cancelling the task closes every exchange (``finally``)."""

    def started_fields(self) -> dict[str, object]:
        from daedalus.sources.ccxt import products

        return {"exchanges": len(self.collectors), "products": len(products(self.config))}

    def heartbeat(self) -> tuple[dict[str, object], dict[str, object], dict[str, dict[str, float | None]]]:
        now = self.clock()
        stats = {c.exchange_id: c.stats for c in self.collectors}
        ages = {e: (now - self.tap.exchange_seen[e]) / 1e9 if e in self.tap.exchange_seen else None for e in stats}
        running = {e: int(s.state == "running") for e, s in stats.items()}
        # failed and not (yet) back: ``connected`` alone cannot tell it from starting up
        failing = {e: int(s.state != "running" and s.last_error is not None) for e, s in stats.items()}
        watchdog = self.config.ingestion.watchdog_timeout_seconds
        silent = [e for e in stats if running[e] and (ages[e] is None or ages[e] > watchdog)]
        counters = {
            "frames_received": {e: s.messages for e, s in stats.items()},
            "reconnects": {e: s.reconnects for e, s in stats.items()},
            "errors": {e: s.errors for e, s in stats.items()},
        }
        if self.ndjson_sink is not None:  # records that could not become a JSON line (counted, dropped)
            counters["unserialisable_records"] = self.ndjson_sink.unserialisable
        gauges = {
            "connected": running,
            "failing": failing,
            "last_frame_age_seconds": ages,
            "uptime_seconds": {e: round(s.uptime(), 3) for e, s in stats.items()},
            "watchdog_seconds": watchdog,
            # every running exchange silent: the process (not one quiet market) is stuck
            "stalled": int(bool(silent) and len(silent) == sum(running.values())),
        }
        products = {k: {"last_time": ns / 1e9, "mid": self.tap.mid.get(k)} for k, ns in self.tap.seen.items()}
        return counters, gauges, products

    def status_lines(self, span: float) -> list[str]:
        lines = []
        for c in self.collectors:
            rate = (c.stats.messages - self._last_messages.get(c.exchange_id, 0)) / span
            self._last_messages[c.exchange_id] = c.stats.messages
            lines.append(f"{c.status_text()} ({rate:,.0f}/s)")
        return lines
