"""The supervisor's HTTP side: ``/metrics``, ``/healthz``, ``/api/status`` and the status page ``/``.

:class:`StatusServer` runs on the supervisor's event loop. Everything it shows comes from the
``snapshot()`` callable (the supervisor's live :class:`SupervisorStatus`) and from
:func:`daedalus.ops.health.check_health`, which lists directories and so runs in a worker
thread and is cached for ``health_cache_seconds`` (scrapes and the page refresh every few
seconds; a Pi's SD card need not be listed for each). Read-only: no route changes anything.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import re
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

import orjson
from aiohttp import web
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from daedalus.config import DaedalusConfig
from daedalus.logs import get_logger
from daedalus.ops.health import HealthReport, check_health, child_summary, heartbeat_fresh_seconds
from daedalus.ops.metrics import DaedalusCollector, History, Inputs, frames_by_source, number, per_label, source_of
from daedalus.ops.records import ChildStatus, SupervisorStatus

log = get_logger(__name__)

NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def _json(data: Any, status: int = 200) -> web.Response:
    body = orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)
    return web.Response(body=body, status=status, content_type="application/json", headers=NO_STORE)


def page_html() -> bytes:
    return resources.files("daedalus.ops").joinpath("page.html").read_bytes()


def content_security_policy(page: bytes) -> str:
    """The page may run its own inline script and style (by their SHA-256) and talk to this
    server, nothing else: no other script, no external resource, no framing. Text from the
    server is put in with ``textContent`` already; this is the second lock on that door."""

    def hashes(tag: bytes) -> str:
        bodies = re.findall(rb"<%b>(.*?)</%b>" % (tag, tag), page, re.DOTALL)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'" for body in bodies)

    return (
        f"default-src 'none'; script-src {hashes(b'script')}; style-src {hashes(b'style')}; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


class StatusServer:
    """The HTTP side of the supervisor, bound where ``supervisor.status_host/status_port`` say
    (127.0.0.1 by default: the page is for the Pi's own network only when configured so).

    Bounded by construction: one cached health report, a history ring of
    ``history_seconds / sample_seconds`` samples, fixed routes and no request body."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        config: DaedalusConfig,
        snapshot: Callable[[], SupervisorStatus | None],
        sample_seconds: float = 2.0,
        history_seconds: float = 600.0,
        health_cache_seconds: float = 2.0,
    ) -> None:
        self.host, self.port, self.config = host, port, config
        self.snapshot = snapshot
        self.sample_seconds = sample_seconds
        self.health_cache_seconds = health_cache_seconds
        fresh_for = heartbeat_fresh_seconds(config)
        self.history = History(seconds=history_seconds, interval=sample_seconds, stale_seconds=fresh_for)
        self.url: str | None = None
        self._inputs: Inputs = (None, None)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaedalusCollector(lambda: self._inputs))
        self._health: tuple[float, HealthReport | None, str | None] | None = None  # (monotonic, report, error)
        self._health_lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._page = page_html()
        self._page_headers = {**NO_STORE, "Content-Security-Policy": content_security_policy(self._page),
                              "Referrer-Policy": "no-referrer"}  # fmt: skip

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> str:
        """Bind ``host:port`` (0: a free port) and start sampling; the URL actually bound."""
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/api/status", self._api_status)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        self._sampler = asyncio.create_task(self._sample_forever(), name="status-history")
        return self.url  # the supervisor logs status_server_started with it

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            log.info("status_server_stopped", url=self.url)

    async def _sample_forever(self) -> None:
        failed: str | None = None  # logged when it changes, not every sample for months
        while True:
            try:
                self.history.add(self._status())
                failed = None
            except Exception as exc:  # odd heartbeat content must not end the chart for good
                if repr(exc) != failed:
                    log.warning("status_history_sample_failed", error=repr(exc))
                failed = repr(exc)
            await asyncio.sleep(self.sample_seconds)

    # ---- inputs ----------------------------------------------------------------------------
    def _status(self) -> SupervisorStatus | None:
        """A private copy of the snapshot: health reads it in a worker thread while the
        supervisor goes on changing its own objects."""
        try:
            return copy.deepcopy(self.snapshot())
        except Exception as exc:  # the pages say "no data" rather than fail
            log.warning("status_snapshot_failed", error=repr(exc))
            return None

    async def health(self, status: SupervisorStatus | None) -> tuple[HealthReport | None, str | None]:
        """The health report (cached), or None and the error when the check failed."""
        async with self._health_lock:
            cached = self._health
            if cached is not None and time.monotonic() - cached[0] < self.health_cache_seconds:
                return cached[1], cached[2]
            report: HealthReport | None = None
            error: str | None = None
            try:
                report = await asyncio.to_thread(check_health, self.config, supervisor=status, supervisor_running=True)
            except Exception as exc:  # the page and /metrics must keep working without it
                error = f"{type(exc).__name__}: {exc}"
                log.warning("status_health_check_failed", error=error)
            self._health = (time.monotonic(), report, error)
            return report, error

    # ---- routes ----------------------------------------------------------------------------
    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8", headers=self._page_headers)

    async def _metrics(self, request: web.Request) -> web.Response:
        status = self._status()
        report, _ = await self.health(status)
        self._inputs = (status, report)
        # the text format 0.0.4, or OpenMetrics when the scraper asks for it (Accept header)
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(self.registry)  # a few hundred samples from memory: no need for a thread
        return web.Response(body=body, headers={"Content-Type": content_type, **NO_STORE})

    async def _healthz(self, request: web.Request) -> web.Response:
        report, error = await self.health(self._status())
        if report is None:
            return _json({"level": "critical", "error": error}, status=503)
        return _json(report.to_dict(), status=503 if report.level == "critical" else 200)

    async def _api_status(self, request: web.Request) -> web.Response:
        status = self._status()
        report, error = await self.health(status)
        return _json(api_status(status, report, error, self.history))


def api_status(
    status: SupervisorStatus | None, report: HealthReport | None, error: str | None, history: History
) -> dict[str, Any]:
    """What the page shows: children, per-source capture figures, health and the chart's history."""
    now = time.time()
    children = list(status.children) if status is not None else []
    sources = capture_summary(children)
    for source, rate in history.latest_rates().items():
        sources.setdefault(source, {})["rate"] = rate
    return {
        "time": now,
        "supervisor": None if status is None else {
            "pid": status.pid, "started_at": status.started_at, "time": status.time, "data_dir": status.data_dir,
            "status_url": status.status_url,
        },
        "children": [child_summary(child, now) for child in children],
        "sources": sources,
        "health": report.to_dict() if report is not None else {"level": "unknown", "error": error},
        "history": history.to_dict(),
    }  # fmt: skip


def capture_summary(children: list[ChildStatus]) -> dict[str, dict[str, Any]]:
    """Per source, over its ingest children: frames received, connections (open / all), queue
    depth and capacity, overflow drops, stalled, and (ccxt) how many exchanges are failing (the
    page's Capture table)."""
    sources: dict[str, dict[str, Any]] = {
        source: {"frames_received": frames, "connections": 0, "connected": 0}
        for source, frames in frames_by_source(children).items()
    }
    for child in children:
        if child.kind != "ingest":
            continue
        entry = sources[source_of(child)]
        connected = per_label(child.gauges.get("connected"))
        entry["connections"] += len(connected or per_label(child.counters.get("frames_received")))
        entry["connected"] += int(sum(connected.values()))
        figures: dict[str, Any] = {key: child.gauges.get(key) for key in ("queue_depth", "queue_capacity", "stalled")}
        figures["failing"] = sum(per_label(child.gauges.get("failing")).values()) if "failing" in child.gauges else None
        figures["overflow_drops"] = child.counters.get("overflow_drops")
        for key, value in figures.items():
            if (n := number(value)) is not None:
                entry[key] = entry.get(key, 0) + n
    return sources
