"""The served explorer in a real browser: Debian's chromium driven by Playwright opens
``yoto explore`` on the recorded run, visits every page, finds no error element,
clicks the rollback's marker on the Timeline to see its details, and saves screenshots.
Under CI (CI=true) a missing browser fails instead of skipping."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dashboards.helpers import PAGES
from tests.helpers import subprocess_env, yoto_bin

pytestmark = pytest.mark.slow

SCREENS = Path("/tmp/yoto-screens")  # a copy of two screenshots, for people to look at
CHART_PAGES = {"timeline", "noise", "precision", "layers", "spectra", "compare", "throughput"}
ERRORS = '[data-testid="stException"], [data-testid="stAlertContentError"]'
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'


def chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return found or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def browser_path() -> str:
    exe = chromium()
    if exe is None:
        why = "chromium not found (make system-deps installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI must run the browser test: {why}")
        pytest.skip(why)
    return exe


@pytest.fixture
def served(explorer_run: Path, tmp_path: Path) -> Iterator[str]:
    """``yoto explore`` on a free port; stopped (SIGTERM, then SIGKILL) after the test."""
    port = free_port()
    log = open(tmp_path / "explore.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [yoto_bin(), "explore", str(explorer_run.parent), "--port", str(port)],
        env=subprocess_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "explore.log").read_text()
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the explorer did not come up in 90 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def click_rollback_marker(page) -> None:
    """A click on the rollback's rule in the loss chart shows that event's details."""
    detail = page.get_by_text("rollback at step")
    assert detail.count() == 0, "event details shown before any click"
    loss_chart = page.locator('[data-testid="stVegaLiteChart"]').first
    marker = loss_chart.locator('[aria-label*="kind: rollback"]').first
    marker.click(force=True)  # a 2 px rule: skip Playwright's hit-target check
    detail.first.wait_for(timeout=60_000)
    page.wait_for_selector(IDLE, timeout=120_000)
    box = page.locator('[data-testid="stVerticalBlock"]', has=detail).last
    assert "rolled back from step" in box.inner_text()


def test_every_page_in_chromium(served: str, browser_path: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    shots = tmp_path / "screens"
    shots.mkdir()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            for name, title in PAGES.items():
                page.goto(f"{served}/{'' if name == 'runs' else name}")
                page.wait_for_selector(IDLE, timeout=120_000)
                page.get_by_role("heading", name=title).first.wait_for(timeout=30_000)
                if name in CHART_PAGES:
                    # a screenshot right after load may precede the charts: wait for one
                    page.wait_for_selector(
                        '[data-testid="stVegaLiteChart"] canvas, '
                        '[data-testid="stVegaLiteChart"] svg.marks',
                        timeout=60_000,
                    )
                page.wait_for_selector(IDLE, timeout=120_000)
                errors = page.locator(ERRORS)
                assert errors.count() == 0, f"{name}: {errors.all_inner_texts()}"
                if name == "timeline":
                    click_rollback_marker(page)
                page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
            # the runs table lists the run in the page itself
            page.goto(served)
            page.wait_for_selector(IDLE, timeout=120_000)
            assert page.locator('[data-testid="stDataFrame"]').count() == 1
        finally:
            browser.close()
    assert sorted(p.stem for p in shots.glob("*.png")) == sorted(PAGES)
    SCREENS.mkdir(parents=True, exist_ok=True)
    for name in ("timeline", "layers"):
        shutil.copy(shots / f"{name}.png", SCREENS / f"{name}.png")
