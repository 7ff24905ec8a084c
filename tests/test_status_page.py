"""The status page in a real headless browser (Debian's chromium), fed by a real ingest process."""

from __future__ import annotations

import asyncio
import time
from html.parser import HTMLParser
from pathlib import Path

from daedalus.ops.records import ChildStatus, SupervisorStatus
from daedalus.ops.web import StatusServer
from tests.browser import TIMEOUT, browser_command, needs_browser
from tests.status_helpers import config_for, daedalus_process, snapshot_from_run_dir, wait_for

pytestmark = needs_browser


class Page(HTMLParser):
    """The dumped DOM: attributes of elements by id, the text of elements by class and by ``#id``."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, str | None]] = {}
        self.texts: dict[str, list[str]] = {}
        self._open: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.by_id[found["id"]] = found
        self._open = (found.get("class") or "").split() + ([f"#{found['id']}"] if found.get("id") else [])

    def handle_endtag(self, tag: str) -> None:
        self._open = []

    def handle_data(self, data: str) -> None:
        for name in self._open if data.strip() else []:
            self.texts.setdefault(name, []).append(data)
        self._open = []


async def browse(url: str, tmp_path: Path, *options: str) -> tuple[str, str]:
    """Run chromium headless on ``url`` (profile and caches under tmp_path): stdout, stderr."""
    argv, env = browser_command(url, tmp_path, "--virtual-time-budget=8000", *options)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode(), err.decode(errors="replace")


HOSTILE = """<img id="injected" src="x" onerror="document.title='pwned'"><script>document.title='pwned'</script>"""


async def test_the_page_shows_the_children_and_a_live_chart(make_sim, tmp_path):
    sim = await make_sim(rate=200)
    config, config_file = config_for(tmp_path, sim.ws_url)

    def snapshot() -> SupervisorStatus:
        """The live ingest, and a child whose name and exit reason are markup (shown as text)."""
        status = snapshot_from_run_dir(config)
        status.children.append(ChildStatus(name=HOSTILE, kind="sync", source=None, command=["x"], state="backoff",
                                           state_since=time.time(), exit_reason=HOSTILE))  # fmt: skip
        return status

    async with daedalus_process(config_file, "ingest"):
        await wait_for(lambda: config.layout.heartbeat_file("ingest-coinbase").exists(), "the ingest heartbeat")
        server = StatusServer(host="127.0.0.1", port=0, config=config, snapshot=snapshot, sample_seconds=0.2)
        url = await server.start()
        try:
            samples = server.history.samples
            await wait_for(lambda: sum(bool(s["rates"]) for s in samples) >= 3
                           and sum(bool(s["mids"]) for s in samples) >= 3, "rates and mids in the history")  # fmt: skip
            dom, _ = await browse(url, tmp_path, "--dump-dom")
            png = tmp_path / "page.png"
            await browse(url, tmp_path, f"--screenshot={png}", "--window-size=390,1800")  # a phone's width
        finally:
            await server.stop()
    page = Page(dom)
    assert page.texts.get("child-name") == ["ingest-coinbase", HOSTILE]  # the markup as text
    assert "injected" not in page.by_id and "<title>Daedalus status</title>" in dom  # no markup ran
    assert page.by_id["level"]["class"] != "badge l-unknown"  # the health verdict arrived
    assert int(page.by_id["chart-rate"]["data-points"]) >= 3
    assert int(page.by_id["chart-mid"]["data-points"]) >= 3
    assert not page.texts.get("#error")  # no "cannot reach the supervisor"
    assert page.texts["#updated"][0].startswith("updated ")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
