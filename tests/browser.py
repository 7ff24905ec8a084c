"""Headless chromium for the tests that open a page (status page, plot report, demo report).

One place that finds the browser and isolates it: its profile, HOME and caches live under
the test's tmp_path, so a run leaves nothing in the real home directory and tests never
share browser state. Tests that need it are skipped when no chromium is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

BROWSER = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no chromium: apt install chromium")
TIMEOUT = 90.0


def browser_command(url: str, tmp_path: Path, *options: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that open ``url`` headless, everything under ``tmp_path``."""
    assert BROWSER is not None, "guard the test with @needs_browser"
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
           "XDG_CACHE_HOME": str(tmp_path / "xdg-cache")}  # fmt: skip
    argv = [BROWSER, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", *options, url]  # fmt: skip
    return argv, env


def dump_dom(url: str, tmp_path: Path) -> str:
    """The DOM of ``url`` after it loaded (``--dump-dom``); fails the test if chromium does."""
    argv, env = browser_command(url, tmp_path, "--dump-dom")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
