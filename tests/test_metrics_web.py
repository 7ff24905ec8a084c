"""The status server: /metrics parsed by prometheus_client's own parser, /healthz, /api/status."""

from __future__ import annotations

import os
import time
from html.parser import HTMLParser

import aiohttp
import orjson
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.utils import floatToGoString

from daedalus.capture.segments import LATENCY_BUCKETS_S
from daedalus.ops.metrics import History, histogram_of
from daedalus.ops.records import CHILD_STATES, ChildStatus, SupervisorStatus, read_heartbeat
from daedalus.ops.web import StatusServer
from tests.status_helpers import (
    Metrics,
    assert_every_family,
    child_from,
    config_for,
    daedalus_process,
    etl_heartbeat,
    get,
    ingest_heartbeat,
    snapshot_from_run_dir,
    status_of,
    wait_for,
)


async def scrape(server: StatusServer) -> Metrics:
    status, content_type, text = await get(server.url + "metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    return Metrics(text)


async def test_metrics_of_real_ingest_and_etl_processes(make_sim, tmp_path):
    sim = await make_sim(rate=300)
    config, config_file = config_for(tmp_path, sim.ws_url, queue_maxsize=5000, segment_max_mb=0.05)
    run = config.layout.run_dir

    def counter(child: str, name: str) -> float:
        beat = read_heartbeat(run / f"{child}.json")
        value = None if beat is None else beat.counters.get(name)
        return sum(value.values()) if isinstance(value, dict) else value or 0

    async with daedalus_process(config_file, "ingest"), daedalus_process(config_file, "etl", "--watch"):
        await wait_for(lambda: counter("ingest-coinbase", "frames_received") > 0, "an ingest heartbeat with frames")
        await wait_for(lambda: counter("ingest-coinbase", "segment_rotations") > 0, "a segment rotation")
        await wait_for(lambda: counter("etl", "segments_processed") > 0, "an etl heartbeat with a segment done", 60)
        server = StatusServer(host="127.0.0.1", port=0, config=config, snapshot=lambda: snapshot_from_run_dir(config))
        url = await server.start()
        try:
            assert url.startswith("http://127.0.0.1:") and url.endswith("/") and not url.endswith(":0/")
            metrics = await scrape(server)
        finally:
            await server.stop()
    assert_every_family(metrics)
    labels = {"source": "coinbase", "connection": "1"}
    assert metrics.value("daedalus_frames_received_total", **labels) > 0
    assert metrics.value("daedalus_received_bytes_total", **labels) > metrics.value(
        "daedalus_frames_received_total", **labels
    )
    assert metrics.value("daedalus_reconnects_total", **labels) == 0
    assert metrics.value("daedalus_gaps_total", **labels) == 0
    assert metrics.value("daedalus_connection_up", **labels) == 1
    source = {"source": "coinbase"}
    assert metrics.value("daedalus_queue_capacity", **source) == 5000
    assert 0 <= metrics.value("daedalus_queue_depth", **source) <= 5000
    assert metrics.value("daedalus_overflow_drops_total", **source) == 0
    assert metrics.value("daedalus_write_errors_total", **source) == 0
    assert metrics.value("daedalus_flushes_total", **source) > 0
    assert metrics.value("daedalus_frames_written_total", **source) > 0
    assert metrics.value("daedalus_written_bytes_total", **source) > 0
    assert metrics.value("daedalus_receive_to_durable_seconds_count", **source) > 0
    assert metrics.value("daedalus_receive_to_durable_seconds_sum", **source) > 0
    assert metrics.value("daedalus_receive_to_durable_seconds_bucket", **source, le="+Inf") == metrics.value(
        "daedalus_receive_to_durable_seconds_count", **source
    )
    child = {"child": "ingest-coinbase"}
    assert metrics.value("daedalus_child_state", **child, state="running") == 1
    assert sum(metrics.value("daedalus_child_state", **child, state=s) for s in CHILD_STATES) == 1
    assert metrics.value("daedalus_child_restarts_total", **child) == 0
    assert metrics.value("daedalus_child_rss_bytes", **child) > 10_000_000
    assert metrics.value("daedalus_child_uptime_seconds", **child) > 0
    # the heartbeat was written while the child ran: no older than the child
    age = metrics.value("daedalus_child_heartbeat_age_seconds", **child)
    assert 0 <= age <= metrics.value("daedalus_child_uptime_seconds", **child)
    assert metrics.value("daedalus_disk_free_bytes") > 0
    assert metrics.value("daedalus_disk_total_bytes") >= metrics.value("daedalus_disk_free_bytes")
    files = sum(metrics.value("daedalus_backlog_files", source="coinbase", state=s) for s in ("active", "ready"))
    assert files >= 1
    assert metrics.value("daedalus_segment_rotations_total", **source) > 0
    assert metrics.value("daedalus_etl_lag_seconds", **source) >= 0
    assert metrics.value("daedalus_etl_segments_processed_total", **source) > 0
    assert metrics.value("daedalus_etl_processed_bytes_total", **source) > 0
    assert metrics.value("daedalus_etl_rows_total", **source, channel="ticker") > 0
    assert metrics.value("daedalus_etl_quarantined_lines_total", **source) == 0
    assert metrics.value("daedalus_etl_quarantined_segments_total", **source) == 0
    assert metrics.value("daedalus_child_state", child="etl", state="running") == 1
    assert metrics.value("daedalus_child_rss_bytes", child="etl") > 10_000_000


async def test_every_family_with_exact_values_and_without_data(tmp_path):
    config, _ = config_for(tmp_path, "ws://127.0.0.1:9/ws")
    children = [
        child_from(ingest_heartbeat(1000), restarts=3, memory_restarts=1, hang_restarts=1, rss_bytes=50 << 20),
        child_from(etl_heartbeat(), rss_bytes=80 << 20),
        ChildStatus(name="sync", kind="sync", source=None, command=["x"], state="backoff", state_since=time.time()),
    ]
    holder = {"status": status_of(config, children)}
    server = StatusServer(host="127.0.0.1", port=0, config=config, snapshot=lambda: holder["status"],
                          health_cache_seconds=0)  # fmt: skip
    await server.start()
    try:
        metrics = await scrape(server)
        assert_every_family(metrics)
        conn2 = {"source": "coinbase", "connection": "2"}
        assert metrics.value("daedalus_frames_received_total", **conn2) == 500
        assert metrics.value("daedalus_received_bytes_total", **conn2) == 10
        assert metrics.value("daedalus_reconnects_total", source="coinbase", connection="1") == 1
        assert metrics.value("daedalus_gaps_total", source="coinbase", connection="1") == 2
        assert metrics.value("daedalus_overflow_drops_total", source="coinbase") == 3
        assert metrics.value("daedalus_segment_rotations_total", source="coinbase") == 2
        assert metrics.value("daedalus_queue_capacity", source="coinbase") == 10_000
        # the bounds as Prometheus writes them ("1.0", not the heartbeat's "1"), cumulative, +Inf last
        buckets = [s for s in metrics.samples("daedalus_receive_to_durable_seconds") if s.name.endswith("_bucket")]
        assert [s.labels["le"] for s in buckets] == [floatToGoString(b) for b in LATENCY_BUCKETS_S] + ["+Inf"]
        assert [s.value for s in buckets] == sorted(s.value for s in buckets)
        ten_ms = metrics.value("daedalus_receive_to_durable_seconds_bucket", source="coinbase", le="0.01")
        assert ten_ms == 11 * 20  # 0 to 10 ms of each 50
        assert metrics.value("daedalus_receive_to_durable_seconds_count", source="coinbase") == 1000
        assert metrics.value("daedalus_receive_to_durable_seconds_sum", source="coinbase") == pytest.approx(24.5)
        assert metrics.value("daedalus_etl_segments_processed_total", source="coinbase") == 4
        assert metrics.value("daedalus_etl_rows_total", source="coinbase", channel="level2") == 900
        assert metrics.value("daedalus_etl_quarantined_lines_total", source="coinbase") == 1
        assert metrics.value("daedalus_etl_quarantined_segments_total", source="coinbase") == 0
        assert metrics.value("daedalus_etl_lag_seconds", source="coinbase") == 0  # nothing in ready/
        assert metrics.value("daedalus_child_restarts_total", child="ingest-coinbase") == 3
        assert metrics.value("daedalus_child_memory_restarts_total", child="ingest-coinbase") == 1
        assert metrics.value("daedalus_child_hang_restarts_total", child="ingest-coinbase") == 1
        assert metrics.value("daedalus_child_rss_bytes", child="etl") == 80 << 20
        assert metrics.value("daedalus_child_state", child="sync", state="backoff") == 1
        assert metrics.value("daedalus_child_state", child="sync", state="running") == 0
        assert not [s for s in metrics.samples("daedalus_child_uptime_seconds") if s.labels["child"] == "sync"]
        assert metrics.value("daedalus_health_level") == 1  # the sync child in backoff is a warning
        code, _, body = await get(server.url + "healthz")
        assert code == 200 and orjson.loads(body)["level"] == "warning"  # a warning is still healthy

        # a scraper asking for OpenMetrics gets it
        code, content_type, text = await get(server.url + "metrics", Accept="application/openmetrics-text")
        assert code == 200 and content_type.startswith("application/openmetrics-text")
        parsed = {f.name: f for f in openmetrics_families(text)}
        assert parsed["daedalus_frames_received"].type == "counter" and text.endswith("# EOF\n")

        # a ready segment waiting: the ETL lag is its age
        ready = config.layout.ready("coinbase")
        ready.mkdir(parents=True)
        (ready / "segment_20260809T21_00001.ndjson").write_bytes(b"{}\n" * 10)
        old = time.time() - 120
        os.utime(ready / "segment_20260809T21_00001.ndjson", (old, old))
        metrics = await scrape(server)
        assert metrics.value("daedalus_etl_lag_seconds", source="coinbase") >= 119
        assert metrics.value("daedalus_backlog_files", source="coinbase", state="ready") == 1
        assert metrics.value("daedalus_backlog_bytes", source="coinbase", state="ready") == 30

        # no children, then no snapshot at all: every family still there, no error
        for status in (status_of(config, []), None):
            holder["status"] = status
            metrics = await scrape(server)
            assert_every_family(metrics)
            assert metrics.samples("daedalus_frames_received") == []
            assert metrics.samples("daedalus_child_state") == []
    finally:
        await server.stop()


async def test_healthz_is_200_when_running_and_503_with_a_fatal_child(tmp_path):
    config, _ = config_for(tmp_path, "ws://127.0.0.1:9/ws")
    beat = ingest_heartbeat(10)
    holder = {"status": status_of(config, [child_from(beat)])}
    server = StatusServer(host="127.0.0.1", port=0, config=config, snapshot=lambda: holder["status"],
                          health_cache_seconds=0)  # fmt: skip
    await server.start()
    try:
        code, content_type, body = await get(server.url + "healthz")
        assert code == 200, body
        assert content_type == "application/json"
        report = orjson.loads(body)
        assert report["level"] in ("ok", "warning") and "findings" in report and "disk" in report
        holder["status"] = status_of(config, [
            child_from(beat, state="fatal", pid=None, exit_reason="exit 2: configuration error"),
        ])  # fmt: skip
        code, _, body = await get(server.url + "healthz")
        assert code == 503, body
        report = orjson.loads(body)
        assert report["level"] == "critical"
        assert any(f["level"] == "critical" and "ingest-coinbase" in f["subject"] for f in report["findings"])
        metrics = await scrape(server)
        assert metrics.value("daedalus_health_level") == 2
        assert metrics.value("daedalus_child_state", child="ingest-coinbase", state="fatal") == 1
    finally:
        await server.stop()


async def test_api_status_carries_children_health_and_a_history_of_rates_and_mids(tmp_path):
    config, _ = config_for(tmp_path, "ws://127.0.0.1:9/ws")
    frames = {"n": 0}

    def snapshot():
        frames["n"] += 100
        beat = ingest_heartbeat(frames["n"], mids={"BTC-USD": 60_000.0 + frames["n"]})
        return status_of(config, [child_from(beat), child_from(etl_heartbeat())])

    server = StatusServer(host="127.0.0.1", port=0, config=config, snapshot=snapshot, sample_seconds=0.1)
    await server.start()
    try:
        await wait_for(lambda: len(server.history.samples) >= 4, "history samples", 10)
        code, _, body = await get(server.url + "api/status")
        data = orjson.loads(body)
    finally:
        await server.stop()
    assert code == 200
    assert [c["name"] for c in data["children"]] == ["ingest-coinbase", "etl"]
    assert data["children"][0]["state"] == "running" and data["children"][0]["uptime_seconds"] > 0
    assert data["health"]["level"] in ("ok", "warning")
    assert data["sources"]["coinbase"]["queue_capacity"] == 10_000
    assert data["sources"]["coinbase"]["rate"] > 0
    samples = data["history"]["samples"]
    assert len(samples) >= 4
    assert all(s["rates"]["coinbase"] > 0 for s in samples[1:])
    mids = [s["mids"]["BTC-USD"] for s in samples]
    assert mids == sorted(mids) and mids[0] > 60_000


def ingest_at(frames: int, now: float, beat_time: float) -> SupervisorStatus:
    """A snapshot taken at ``now`` of an ingest child whose last heartbeat was written at ``beat_time``."""
    child = child_from(ingest_heartbeat(frames), heartbeat_age=now - beat_time)
    return SupervisorStatus(pid=1, started_at=0, time=now, data_dir="/nonexistent", config_file="x", status_url=None,
                            children=[child])  # fmt: skip


def test_history_rate_is_the_growth_between_heartbeats_not_between_samples():
    history = History(seconds=10, interval=1, stale_seconds=8)
    history.add(ingest_at(1000, 100.0, 99.9), now=100)  # 1000 + 500 over two connections: no rate yet
    history.add(ingest_at(3000, 102.0, 101.9), now=102)  # 4500: +3000 in the 2 s between the heartbeats
    history.add(ingest_at(3000, 103.0, 101.9), now=103)  # the same heartbeat seen again: the same rate, not 0
    history.add(ingest_at(4000, 104.0, 102.9), now=104)  # +1500 in 1 s
    history.add(ingest_at(200, 105.0, 104.9), now=105)  # restarted with fresh counters: 300 in 2 s, not negative
    history.add(ingest_at(200, 115.0, 104.9), now=115)  # that heartbeat is now 10 s old: no rate
    history.add(None, now=116)
    rates = [s["rates"].get("coinbase") for s in history.samples]
    assert rates == [None, pytest.approx(1500), pytest.approx(1500), pytest.approx(1500), pytest.approx(150), None,
                     None]  # fmt: skip
    assert history.samples[0]["mids"] == {"BTC-USD": 60_000.0, "ETH-USD": 3_000.0}
    for i in range(20):
        history.add(None, now=117 + i)
    assert len(history.samples) == 10  # the last ten seconds


def test_a_malformed_histogram_is_left_out_rather_than_exposed_wrong():
    good = {"buckets": {"0.5": 1, "1": 3}, "sum": 2.0, "count": 4}  # no +Inf: the count is its value
    assert histogram_of(good) == ([("0.5", 1.0), ("1.0", 3.0), ("+Inf", 4.0)], 2.0)
    bad = [
        {"buckets": {"0.5": 4, "1": 3, "+Inf": 4}},  # not cumulative
        {"buckets": {"1": 1, "1.0": 1, "+Inf": 1}},  # the same bound twice
        {"buckets": {"nan": 1, "+Inf": 1}},
        {"buckets": {"soon": 1}},
        {"buckets": {"1": "many"}},
        {"buckets": [1, 2]},
        None,
    ]
    assert [histogram_of(value) for value in bad] == [None] * len(bad)


async def test_hostile_label_values_are_escaped_and_read_back_intact(tmp_path):
    config, _ = config_for(tmp_path, "ws://127.0.0.1:9/ws")
    weird = 'a"b\\c\nd{e}=f,</script>'
    ingest = ingest_heartbeat(10)
    ingest.counters["frames_received"] = {weird: 5}
    etl = etl_heartbeat()
    etl.counters["rows"] = {weird: 7}
    children = [child_from(ingest, name=weird, source=weird), child_from(etl)]
    server = StatusServer(host="127.0.0.1", port=0, config=config, snapshot=lambda: status_of(config, children))
    await server.start()
    try:
        metrics = await scrape(server)
        _, _, text = await get(server.url + "metrics", Accept="application/openmetrics-text")
    finally:
        await server.stop()
    assert metrics.value("daedalus_frames_received_total", source=weird, connection=weird) == 5
    assert metrics.value("daedalus_child_state", child=weird, state="running") == 1
    assert metrics.value("daedalus_etl_rows_total", source="coinbase", channel=weird) == 7
    parsed = {f.name: f for f in openmetrics_families(text)}
    assert [s.labels for s in parsed["daedalus_frames_received"].samples if s.name.endswith("_total")] == [
        {"source": weird, "connection": weird}
    ]


class Links(HTMLParser):
    """Every URL the page's markup would load or link to."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value or "" for name, value in attrs if name in ("src", "href", "action", "srcset", "data")]


async def test_the_page_is_self_contained_and_only_its_own_script_may_run(tmp_path):
    config, _ = config_for(tmp_path, "ws://127.0.0.1:9/ws")
    server = StatusServer(host="127.0.0.1", port=0, config=config, snapshot=lambda: None)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session, session.get(server.url) as response:
            assert response.status == 200
            csp, page = response.headers["Content-Security-Policy"], await response.text()
        for path in ("../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "page.html", "static/page.html", "metrics/../x"):
            code, _, _ = await get(server.url + path)
            assert code == 404, path
    finally:
        await server.stop()
    links = Links()
    links.feed(page)
    assert links.urls == []
    assert "url(" not in page and "@import" not in page and "innerHTML" not in page
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'" and directives["connect-src"] == "'self'"
    assert directives["script-src"].startswith("'sha256-") and "unsafe" not in csp
