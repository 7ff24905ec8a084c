"""A small fault-injecting HTTP proxy for the S3 tests: it forwards every request to a real S3
server (moto's) and, while told to, answers 500s, answers slowly, or refuses connections, so
the sync's retries meet the failures a home line and a busy server really produce.

Runs its own event loop in a thread, so synchronous code (boto3) can be tested against it.
"""

from __future__ import annotations

import asyncio
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
    delay_seconds: float = 0.0  # wait this long before forwarding each request
    requests: int = 0  # every request seen
    failed: int = 0  # requests answered with a 500


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
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        faults = self.faults
        faults.requests += 1
        body = await request.read()
        if faults.delay_seconds:
            await asyncio.sleep(faults.delay_seconds)
        if faults.fail_next > 0:
            faults.fail_next -= 1
            faults.failed += 1
            error = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                     b"<Message>injected by the test proxy</Message></Error>")  # fmt: skip
            return web.Response(status=500, body=error, content_type="application/xml")
        # the Host header stays the proxy's: the client signed its request for that host
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        assert self._session is not None
        async with self._session.request(request.method, self.upstream + request.rel_url.raw_path_qs,
                                         headers=headers, data=body, allow_redirects=False) as upstream:
            payload = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
            if request.method == "HEAD":  # no body, but the object's size is the answer
                response = web.StreamResponse(status=upstream.status, headers=out)
                response.content_length = int(upstream.headers.get("Content-Length", "0"))
                await response.prepare(request)
                return response
            return web.Response(status=upstream.status, body=payload, headers=out)
