"""The served explorer in a real browser: Debian's chromium driven by Playwright opens
``yoto explore`` on the recorded run, visits every page, finds no error element,
checks that the Timeline opens on the rollback with the abandoned attempt's spike drawn
(read back from the rendered SVG: every spike point, its value, its place and opacity),
clicks the rollback's marker to see its details, and saves screenshots.
Under CI (CI=true) a missing browser fails instead of skipping."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from tests.dashboards.helpers import PAGES
from tests.helpers import subprocess_env, yoto_bin
from yoto import catalog, runstore
from yoto.events import EventKind

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


POINT = re.compile(
    r"optimizer step: (?P<step>\d+); train loss \(nats\): (?P<loss>[-+.\deE]+); "
    r"attempt: (?P<attempt>\d+);.*branch: abandoned"
)
# what the SVG renderer drew for each point: its label, where, and how opaque it shows
DRAWN_POINTS = """els => els.map(e => {
  let opacity = Number(getComputedStyle(e).fillOpacity);
  for (let n = e; n && n.tagName !== 'svg'; n = n.parentElement) {
    opacity *= Number(getComputedStyle(n).opacity);
  }
  const plot = e.closest('g.mark-group').querySelector('path.background').getBBox();
  const [x, y] = e.getAttribute('transform').match(/[-\\d.]+/g).map(Number);
  return {label: e.getAttribute('aria-label'), x, y, width: plot.width,
          height: plot.height, opacity, fill: e.getAttribute('fill')};
})"""


def recorded_spike(run: Path) -> tuple[int, int, dict[int, float]]:
    """(onset, rollback step, loss of the abandoned attempt 0 at each spike step)."""
    [rollback] = [e for e in runstore.read_events(run) if e["kind"] == EventKind.ROLLBACK]
    onset, at = rollback["data"]["onset"], rollback["data"]["from_step"]
    files = [str(p) for p in sorted((run / runstore.METRICS).glob("part-*.parquet"))]
    rows = duckdb.execute(
        f'SELECT step, "{catalog.TRAIN_LOSS.name}" FROM read_parquet($f, union_by_name = true) '
        "WHERE attempt = 0 AND step BETWEEN $lo AND $hi",
        {"f": files, "lo": onset, "hi": at},
    ).fetchall()
    return onset, at, {int(step): float(loss) for step, loss in rows}


def check_spike_is_drawn(page, run: Path) -> None:
    """The first view of the Timeline shows the abandoned attempt's spike: a point at
    every spike step with the recorded loss, inside the plot and the visible x range, at
    full strength; and the abandoned line itself is dashed, not faded."""
    onset, at, loss = recorded_spike(run)
    assert (onset, at) == (61, 65), "the fixture's lr_spike@60 should spike at 61..65"
    chart = page.locator('[data-testid="stVegaLiteChart"]').first
    axis = chart.locator('g.role-axis[aria-label^="X-axis"]').last.get_attribute("aria-label")
    lo, hi = map(float, re.search(r"values from ([-\d.]+) to ([-\d.]+)", axis).groups())
    assert lo <= onset and at <= hi and hi - lo < 60, f"the incident is not in view: {axis}"
    points = chart.locator('g.mark-symbol path[aria-label*="branch: abandoned"]')
    drawn = {}
    for p in points.evaluate_all(DRAWN_POINTS):
        m = POINT.search(p["label"])
        if m and int(m["attempt"]) == 0 and onset <= int(m["step"]) <= at:
            drawn[int(m["step"])] = p
    assert sorted(drawn) == sorted(loss), f"spike steps drawn: {sorted(drawn)}"
    for step, p in drawn.items():
        assert float(POINT.search(p["label"])["loss"]) == pytest.approx(loss[step], rel=1e-6)
        assert 0 <= p["x"] <= p["width"] and 0 <= p["y"] <= p["height"], (step, p)
        assert p["opacity"] >= 0.9 and p["fill"] not in (None, "none", "transparent"), p
    line = chart.locator('g.mark-line path[aria-label*="branch: abandoned"]').first
    style = line.evaluate(
        "e => [getComputedStyle(e).strokeOpacity * getComputedStyle(e).opacity,"
        " e.getAttribute('stroke-dasharray')]"
    )
    assert float(style[0]) >= 0.9 and style[1], f"abandoned line opacity/dash: {style}"


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


def test_every_page_in_chromium(
    served: str, browser_path: str, explorer_run: Path, tmp_path: Path
) -> None:
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
                    check_spike_is_drawn(page, explorer_run)
                    click_rollback_marker(page)
                page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
            # the runs table lists the run in the page itself
            page.goto(served)
            page.wait_for_selector(IDLE, timeout=120_000)
            # the script may be idle a moment before the table is drawn: wait for it
            page.wait_for_selector('[data-testid="stDataFrame"]', timeout=60_000)
            assert page.locator('[data-testid="stDataFrame"]').count() == 1
        finally:
            browser.close()
    assert sorted(p.stem for p in shots.glob("*.png")) == sorted(PAGES)
    SCREENS.mkdir(parents=True, exist_ok=True)
    for name in ("timeline", "layers"):
        shutil.copy(shots / f"{name}.png", SCREENS / f"{name}.png")
