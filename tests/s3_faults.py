"""A small fault-injecting HTTP proxy for the S3 tests: it forwards every request to a real S3
server (moto's) and, while told to, answers 500s, answers slowly, or is down (its port closed:
connections refused, and a request on a kept-alive connection cut without an answer), so the
sync's retries meet the failures a home line and a busy server really produce. Being down is
the proxy's doing, not moto's: moto keeps its objects and uploads in memory, so stopping it
would lose them.

Runs its own event loop in a thread, so synchronous code (boto3) can be tested against it.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from dataclasses import dataclass

import aiohttp
from aiohttp import web

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
               "proxy-authenticate", "content-length"}  # fmt: skip


@dataclass
class Faults:
    fail_next: int = 0  # answer this many requests with 500 (InternalError), then forward again
    fail_match: str | None = None  # only requests matching this regex (on "METHOD /path?query") count for fail_next
    delay_seconds: float = 0.0  # wait this long before forwarding each request
    down: bool = False  # set by FaultProxy.down()/up()
    down_at_request: int | None = None  # go down when this request (1-based count) arrives: mid-pass, exactly
    requests: int = 0  # every request seen
    failed: int = 0  # requests answered with a 500
    cut: int = 0  # requests on a kept-alive connection cut without an answer while down


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultProxy:
    """``http://127.0.0.1:<port>`` in front of ``upstream``; change ``faults`` at any time."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults = Faults()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="s3-fault-proxy", daemon=True)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._session: aiohttp.ClientSession | None = None

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await self._site.start()

    async def _close_port(self) -> None:
        if self._site is not None:
            await self._site.stop()
            self._site = None

    def down(self) -> None:
        """The server goes away: the port closes (new connections are refused) and requests on
        connections the client kept alive are cut without an answer, until :meth:`up`."""
        self.faults.down = True
        asyncio.run_coroutine_threadsafe(self._close_port(), self._loop).result(10)

    def up(self) -> None:
        """The server is back on the same port."""
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.faults.down = False

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        faults = self.faults
        faults.requests += 1
        if faults.down_at_request is not None and faults.requests >= faults.down_at_request:
            faults.down_at_request = None
            faults.down = True
            await self._close_port()
        if faults.down:  # as if the process behind this connection had died
            faults.cut += 1
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("the proxy is down")
        body = await request.read()
        if faults.delay_seconds:
            await asyncio.sleep(faults.delay_seconds)
        matches = faults.fail_match is None or re.search(faults.fail_match, f"{request.method} {request.rel_url}")
        if faults.fail_next > 0 and matches:
            faults.fail_next -= 1
            faults.failed += 1
            error = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                     b"<Message>injected by the test proxy</Message></Error>")  # fmt: skip
            return web.Response(status=500, body=error, content_type="application/xml")
        # the Host header stays the proxy's: the client signed its request for that host
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        assert self._session is not None
        async with self._session.request(
            request.method,
            self.upstream + request.rel_url.raw_path_qs,
            headers=headers,
            data=body,
            allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
            if request.method == "HEAD":  # no body, but the object's size is the answer
                response = web.StreamResponse(status=upstream.status, headers=out)
                response.content_length = int(upstream.headers.get("Content-Length", "0"))
                await response.prepare(request)
                return response
            return web.Response(status=upstream.status, body=payload, headers=out)
