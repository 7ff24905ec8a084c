"""Shared fixtures: a simulator on a free loopback port and a small WebSocket client."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from daedalus.sim import SimConfig, SimServer
from tests.s3_server import BUCKET, S3Server, start_server, stop_server

REPO = Path(__file__).resolve().parents[1]
RECORDING = REPO.parent / "shared" / "data" / "coinbase-advanced-trade-2026-08-09.jsonl.zst"


@pytest.fixture
async def make_sim() -> AsyncIterator[Callable[..., Any]]:
    """``sim = await make_sim(rate=0, ...)``: started now, stopped after the test."""
    servers: list[SimServer] = []

    async def start(**kwargs: Any) -> SimServer:
        server = SimServer(SimConfig(**kwargs))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


# `make test` runs the suite in pytest-xdist workers with ``--dist loadgroup``: every test goes to
# whichever worker is free, except that the tests of a module sharing an expensive module-scoped
# fixture stay together on one worker (each worker would build a module fixture again).
# test_backfill is split in two halves (each builds its capture and reference once) so that
# neither half is the critical path of the run. The groups are chosen here, by node id, because
# xdist's own ``xdist_group`` marks rename node ids, which pytest 9 no longer allows (they are
# silently ignored: ``loadgroup`` then behaves as ``load``).
XDIST_GROUPS = {
    "test_demo.py": "demo",  # one real `daedalus demo` run
    "test_plot.py": "plot",
    "test_query.py": "query",
    "test_query_s3.py": "query_s3",
    "test_harden_reader.py": "harden_reader",
}
BACKFILL_SECOND_HALF = {
    "test_the_backfill_from_s3_to_s3_equals_the_sequential_etl",
    "test_a_running_scheduler_by_address",
    "test_a_killed_client_is_finished_by_a_rerun",
}


# Tests of several child processes each (dask clusters, moto, repeated `daedalus etl` runs): on 2
# cores shared by 4 workers they can exceed the 120 s hang guard of pyproject.toml while working.
SLOW_MODULES = {"test_backfill.py", "test_etl_s3.py"}
SLOW_TESTS = {
    "test_memory_stays_bounded_over_hundreds_of_partitions",
    "test_sigkilled_parquet_ingest_keeps_every_flushed_record_once",
    "test_sigkilled_ccxt_etl_reruns_to_the_uninterrupted_dataset",
    "test_pi_check_smoke_harness_natively_on_the_synthetic_market",  # sim + ingest + etl + read-back
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SLOW_MODULES or getattr(item, "originalname", "") in SLOW_TESTS:
            item.add_marker(pytest.mark.timeout(300))


def xdist_group(nodeid: str) -> str | None:
    """The group a test is scheduled with, or None for a test that may go anywhere."""
    path, _, name = nodeid.partition("::")
    module = path.rsplit("/", 1)[-1]
    if module == "test_backfill.py":
        return "backfill_b" if name.split("[")[0] in BACKFILL_SECOND_HALF else "backfill_a"
    return XDIST_GROUPS.get(module)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``: xdist's scope scheduler with :func:`xdist_group` as the scope (one
    test per scope otherwise); the other ``--dist`` modes are left to xdist."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid) or nodeid

    return GroupScheduling(config, log)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under xdist, fill numba's on-disk cache (``cache=True``) once, before the workers start
    (xdist starts them in its own, later, sessionstart): on a fresh clone every worker and every
    `daedalus etl` child would otherwise compile the same functions at the same time, ~10 CPU-s
    a part, enough to push the first tests past their timeout on 2 cores. The parts
    (:mod:`tests.numba_warmup`) compile side by side, each in a process of its own, in scratch
    directories under ``.pytest_cache/`` (a killed run's leftovers are removed by the next)."""
    config = session.config
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None):
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    say = reporter.write_line if reporter is not None else print
    scratch = REPO / ".pytest_cache" / "numba-warmup"
    shutil.rmtree(scratch, ignore_errors=True)
    started = time.monotonic()
    parts = {
        part: subprocess.Popen([sys.executable, "-m", "tests.numba_warmup", part, str(scratch / part)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for part in ("book_engine", "level2_scanner", "databento")
    }  # fmt: skip
    for part, process in parts.items():
        try:
            output, _ = process.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        if process.returncode != 0:  # the tests that use these functions report it properly
            say(f"numba cache warm-up of {part} failed ({process.returncode}): {output[-2000:]}")
    shutil.rmtree(scratch, ignore_errors=True)
    say(f"numba cache warmed in {time.monotonic() - started:.1f} s")


@pytest.fixture(scope="session")
def _moto_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One moto server per test process (each xdist worker has its own): starting one costs
    seconds on a loaded machine, and ``s3_server`` resets it to empty before every test."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    process, endpoint, port = start_server(log)
    yield S3Server(endpoint, port, BUCKET, process, log)
    stop_server(process)


@pytest.fixture
def s3_server(_moto_process: S3Server) -> S3Server:
    """moto's S3 API on 127.0.0.1 holding only an empty bucket :data:`BUCKET`: every bucket,
    object and multipart upload of the previous test is gone (moto's ``/moto-api/reset``)."""
    server = _moto_process
    assert server.process.poll() is None, f"moto exited: {server.log.read_text()[-2000:]}"
    request = urllib.request.Request(f"{server.endpoint}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=30):
        pass
    client = server.client()
    assert not client.list_buckets().get("Buckets"), "moto kept buckets across its reset"
    client.create_bucket(Bucket=BUCKET)
    return server


class Client:
    """A plain aiohttp WebSocket client with helpers for reading JSON frames."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_str(orjson.dumps(message).decode())

    async def subscribe(self, channel: str, products: list[str] | None = None, kind: str = "subscribe") -> None:
        await self.send({"type": kind, "channel": channel, "product_ids": products or []})

    async def recv_text(self, timeout: float = 5.0) -> str:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"expected a text frame, got {msg.type!r} {msg.data!r}")
        return msg.data

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        return orjson.loads(await self.recv_text(timeout))

    async def recv_n(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        return [await self.recv(timeout) for _ in range(n)]

    async def recv_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> list[dict[str, Any]]:
        """Frames up to and including the first one matching ``predicate``."""
        frames: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                frames.append(await self.recv(timeout))
                if predicate(frames[-1]):
                    return frames

    async def quiet(self, seconds: float) -> list[str]:
        """Everything that arrives within ``seconds``."""
        frames: list[str] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while True:
                    frames.append(await self.recv_text(seconds))
        return frames


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Any]]:
    """``client = await connect(url)``; closed after the test."""
    session = aiohttp.ClientSession()
    sockets: list[aiohttp.ClientWebSocketResponse] = []

    async def open_client(url: str, **kwargs: Any) -> Client:
        ws = await session.ws_connect(url, max_msg_size=64 * 1024 * 1024, **kwargs)
        sockets.append(ws)
        return Client(ws)

    yield open_client
    for ws in sockets:
        await ws.close()
    await session.close()


def apply_l2(book: dict[str, dict[float, float]], frame: dict[str, Any]) -> None:
    """Apply one l2_data frame to ``{product: {signed price: size}}`` (bids keyed negative)."""
    for event in frame["events"]:
        side_books = book.setdefault(event["product_id"], {})
        if event["type"] == "snapshot":
            side_books.clear()
        for u in event["updates"]:
            key = (u["side"], u["price_level"])
            if u["new_quantity"] == "0" or float(u["new_quantity"]) == 0:
                side_books.pop(key, None)
            else:
                side_books[key] = u["new_quantity"]


def top_of(levels: dict[tuple[str, str], str], depth: int) -> dict[str, list[tuple[str, str]]]:
    bids = sorted(((p, s) for (side, p), s in levels.items() if side == "bid"), key=lambda x: -float(x[0]))
    asks = sorted(((p, s) for (side, p), s in levels.items() if side == "offer"), key=lambda x: float(x[0]))
    return {"bids": bids[:depth], "asks": asks[:depth]}
