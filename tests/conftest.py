"""Shared fixtures: a simulator on a free loopback port and a small WebSocket client."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
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
# fixture stay together on one worker (each worker would build a module fixture again). The
# groups are chosen here, by node id, because xdist's own ``xdist_group`` marks rename node ids,
# which pytest 9 no longer allows (they are silently ignored: ``loadgroup`` then behaves as
# ``load``). test_backfill's capture and reference are built once per session instead
# (:func:`built_once`), so its tests go to any worker.
XDIST_GROUPS = {
    "test_demo.py": "demo",  # one real `daedalus demo` run
    "test_plot.py": "plot",
    "test_query.py": "query",
    "test_query_s3.py": "query_s3",
    "test_harden_reader.py": "harden_reader",
}


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A directory that ``build(directory)`` fills once per test session, in whichever xdist
    worker asks first; the others wait for it (a file lock) and share it, read only. A build
    that fails leaves no mark, so the next worker to ask builds it again (and fails the same)."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, not the worker's
    target = root / name
    with (root / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".built").exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            build(target)
            (target / ".built").touch()
    return target


# Tests of several child processes each (dask clusters, moto, repeated `daedalus etl` runs): on 2
# cores shared by 4 workers they can exceed the 120 s hang guard of pyproject.toml while working.
SLOW_MODULES = {"test_backfill.py", "test_etl_s3.py"}
SLOW_TESTS = {
    "test_memory_stays_bounded_over_hundreds_of_partitions",
    "test_sigkilled_parquet_ingest_keeps_every_flushed_record_once",
    "test_sigkilled_ccxt_etl_reruns_to_the_uninterrupted_dataset",
    "test_pi_check_smoke_harness_natively_on_the_synthetic_market",  # sim + ingest + etl + read-back
}


# Under xdist these go to the workers first, heaviest first (wall seconds of each under `make test`
# on 2 loaded cores, 2026-11-26): a long test handed out last keeps one worker busy while the
# others have nothing left to do. A grouped module goes whole, at its heaviest test's place.
HEAVY_FIRST = [
    "test_backfill.py::test_the_backfill_from_s3_to_s3_equals_the_sequential_etl",  # 94, builds the capture
    "test_etl.py::test_sigkill_at_random_points_then_rerun_gives_the_same_dataset",  # 53
    "test_etl_s3.py::test_s3_raw_to_s3_processed_equals_a_local_run",  # 47
    "test_ccxt_pipeline.py::test_sigkilled_parquet_ingest_keeps_every_flushed_record_once",  # 46
    "test_record_writer.py::test_memory_stays_bounded_over_hundreds_of_partitions",  # 45
    "test_backfill.py::test_a_note_older_than_the_checkpoint_is_not_finished",  # 43
    "test_etl.py::test_books_equal_the_simulator_truth_across_segments_and_gaps",  # 42
    "test_backfill.py::test_the_dask_backfill_equals_the_sequential_etl",  # 42
    "test_supervisor_run.py::test_restarts_crashloop_hang_notify_and_clean_stop",  # 39
    "test_backfill.py::test_a_killed_client_is_finished_by_a_rerun",  # 36
    "test_etl_s3.py::test_s3_raw_to_a_local_directory_and_bad_locations",  # 33
    "test_sources_seam.py::test_sigkilled_ccxt_etl_reruns_to_the_uninterrupted_dataset",  # 31
    "test_demo.py::test_the_demo_prints_a_summary_of_a_real_capture",  # 30 (its module's fixture)
    "test_etl_s3.py::test_sigkill_mid_run_then_rerun_gives_the_same_dataset",  # 30
    "test_backfill.py::test_a_running_scheduler_by_address",  # 25
    "test_backfill.py::test_a_backfill_continues_from_the_sequential_etls_checkpoint",  # 25
    "test_databento_e2e.py::test_captured_mbo_books_equal_the_simulators_true_book_after_every_record",  # 23
    "test_databento_capture.py::test_ingest_survives_sigkill_and_every_ready_segment_opens_with_dbnstore",  # 21
    "test_supervisor_faults.py::test_fatal_child_single_supervisor_and_sigkill_of_the_supervisor",  # 18
    "test_backfill.py::test_a_worker_killed_mid_run_changes_nothing",  # 18
    "test_harden_job.py::test_a_damaged_checkpoint_gets_one_clear_error_and_a_way_out",  # 14-17 each
    "test_query_s3.py::test_plot_over_s3_draws_what_the_local_plot_draws",  # 15 (+ its module)
    "test_databento_etl.py::test_every_fixture_table_equals_databentos_decoder",  # 15
    "test_harden_job.py::test_a_segment_removed_from_processing_mid_run_gives_one_line_and_the_rerun_completes",  # 15
    "test_deploy.py::test_pi_check_smoke_harness_natively_on_the_synthetic_market",  # 15
    "test_etl_s3.py::test_two_etls_at_once_process_each_segment_once",  # 14
    "test_record_writer.py::test_sigkill_and_restart_keeps_every_flushed_record_once",  # 14
    "test_harden_job.py::test_a_sigkilled_run_leaves_nothing_in_tmp_and_the_rerun_cleans_its_scratch",  # 14
    "test_etl_s3.py::test_a_live_lease_keeps_a_second_etl_out",  # 14
    "test_capture_ingest.py::test_sigkill_at_random_moments_loses_at_most_a_flush_and_never_duplicates",  # 13
    "test_databento_e2e.py::test_daedalus_run_supervises_the_databento_source_and_health_sees_it",  # 12
    "test_backfill.py::test_a_commit_repeated_after_a_crash_does_not_count_twice",  # 10
]


def heavy_first_key(nodeid: str, groups_rank: dict[str, int]) -> int:
    """Where a test goes in the hand-out order: its place in :data:`HEAVY_FIRST`, its group's
    (the best place of any test of the group, in ``groups_rank``), or after all of them."""
    group = xdist_group(nodeid)
    if group is not None:
        return groups_rank.get(group, len(HEAVY_FIRST))
    return _heavy_rank(nodeid)


def _heavy_rank(nodeid: str) -> int:
    path, _, name = nodeid.partition("::")
    key = f"{path.rsplit('/', 1)[-1]}::{name.split('[')[0]}"
    return HEAVY_FIRST.index(key) if key in HEAVY_FIRST else len(HEAVY_FIRST)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in SLOW_MODULES or getattr(item, "originalname", "") in SLOW_TESTS:
            item.add_marker(pytest.mark.timeout(300))
    if hasattr(config, "workerinput"):  # every worker sorts the same way; the scheduler hands out in this order
        groups_rank: dict[str, int] = {}
        for item in items:
            if (group := xdist_group(item.nodeid)) is not None:
                groups_rank[group] = min(groups_rank.get(group, len(HEAVY_FIRST)), _heavy_rank(item.nodeid))
        order = {id(item): i for i, item in enumerate(items)}
        items.sort(key=lambda item: (heavy_first_key(item.nodeid, groups_rank), order[id(item)]))


def xdist_group(nodeid: str) -> str | None:
    """The group a test is scheduled with, or None for a test that may go anywhere."""
    return XDIST_GROUPS.get(nodeid.partition("::")[0].rsplit("/", 1)[-1])


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``: xdist's scope scheduler with :func:`xdist_group` as the scope (one
    test per scope otherwise), handing scopes out in collection order (:data:`HEAVY_FIRST`),
    not xdist's default of the scopes with most tests first; the other ``--dist`` modes are
    left to xdist."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid) or nodeid

    return GroupScheduling(config, log)


def _lower_priority() -> None:
    os.nice(10)


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
    # the longest part (the scanner, ~13 CPU-s cold) keeps a core; the two others (~7 and ~8) share
    # the other at a lower priority: ~15 s on 2 cores, against ~17.5 s when the three share both
    parts = {
        part: subprocess.Popen([sys.executable, "-m", "tests.numba_warmup", part, str(scratch / part)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=None if part == "level2_scanner" else _lower_priority)
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
