"""Every page of the explorer, run by Streamlit's AppTest on a recorded run directory
produced by a real training run with an injected fault and a rollback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.dashboards.helpers import PAGES, app, problems, texts, visit
from yoto import runstore
from yoto.dashboards.postmortem import wire
from yoto.events import Event, EventKind, Severity


def snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")
    }


@pytest.fixture(scope="module")
def visited(explorer_run: Path) -> dict:
    """Visit every page once (module scope: AppTest runs cost seconds on this machine)."""
    before = snapshot(explorer_run)
    old = os.environ.get("YOTO_RUNS")
    os.environ["YOTO_RUNS"] = str(explorer_run.parent)
    try:
        at = app()
        pages = {}
        for page in PAGES:
            visit(at, page)
            pages[page] = {
                "problems": problems(at),
                "titles": texts(at, "title"),
                "info": texts(at, "info"),
                "warning": texts(at, "warning"),
                "charts": [c.proto for c in at.get("vega_lite_chart")],
                "frames": [d.value for d in at.dataframe],
            }
        return {"pages": pages, "before": before, "after": snapshot(explorer_run)}
    finally:
        if old is None:
            os.environ.pop("YOTO_RUNS", None)
        else:
            os.environ["YOTO_RUNS"] = old


@pytest.mark.parametrize("page", list(PAGES))
def test_every_page_renders_without_errors(visited: dict, page: str) -> None:
    got = visited["pages"][page]
    assert got["problems"] == []
    assert got["titles"] == [PAGES[page]]


@pytest.mark.parametrize(
    "page", ["timeline", "noise", "precision", "layers", "spectra", "compare", "throughput"]
)
def test_chart_pages_draw_charts_within_the_point_budget(visited: dict, page: str) -> None:
    charts = visited["pages"][page]["charts"]
    assert charts, f"{page} drew no chart"
    for proto in charts:
        total, per_series = wire.points(proto)
        assert 0 < per_series <= 5000 and total > 0


def test_runs_table_lists_the_run(visited: dict, explorer_run: Path) -> None:
    [table] = visited["pages"]["runs"]["frames"]
    row = table[table.run == explorer_run.name]
    assert len(row) == 1
    assert row.status.iloc[0] == "finished" and row.rollbacks.iloc[0] == 1
    assert row.steps.iloc[0] == 90 and row["best val loss (nats)"].iloc[0] > 0


def test_timeline_marks_the_rollback_fault_and_spike(visited: dict, explorer_run: Path) -> None:
    page = visited["pages"]["timeline"]
    [events] = page["frames"]
    rollback = events[events.kind == "rollback"]
    assert len(rollback) == 1 and rollback.attempt.iloc[0] == 1
    assert {"fault_injected", "spike", "alert", "batch_size"} <= set(events.kind)
    # the markers travel with the charts, not only in the table
    loss_chart = page["charts"][0]
    kinds = set()
    for table in wire.datasets(loss_chart):
        if "kind" in table.column_names:
            kinds |= set(table["kind"].to_pylist())
    assert {"rollback", "fault_injected", "spike"} <= kinds
    # the abandoned branch (attempt 0 after the restart) is drawn, faded
    branches = set()
    for table in wire.datasets(loss_chart):
        if "branch" in table.column_names:
            branches |= set(table["branch"].to_pylist())
    assert branches == {"surviving", "abandoned"}


def test_layers_names_the_first_abnormal_layer_before_the_spike(visited: dict) -> None:
    [message] = visited["pages"]["layers"]["warning"]
    assert "went abnormal first" in message and "before the onset" in message


def test_spectra_page_draws_an_eigenvalue_histogram(visited: dict) -> None:
    charts = visited["pages"]["spectra"]["charts"]
    assert len(charts) == 2  # alpha over time, and the spectrum
    bars = [t for p in charts for t in wire.datasets(p) if "count" in t.column_names]
    assert bars and sum(sum(t["count"].to_pylist()) for t in bars) >= 32


def test_the_explorer_never_writes_into_the_run(visited: dict) -> None:
    assert visited["after"] == visited["before"]


def test_live_run_new_segments_show_after_a_rerun(run_dir_copy: Path, yoto_runs) -> None:
    """A live run: new rows written by the run store appear on the next rerun without
    clearing any cache (the loaders key on the run's file fingerprint)."""
    yoto_runs(run_dir_copy)
    at = visit(app(), "timeline")
    [table] = at.dataframe
    before = len(table.value)
    store = runstore.RunStore.reopen(run_dir_copy)
    store.write_event(Event(91, 1, EventKind.ALERT, Severity.WARNING, "late alert"))
    store.write_step(1, 91, {"yoto_train_loss": 2.5, "yoto_grad_norm": 0.5})
    store.flush()
    at.run()
    assert problems(at) == []
    [table] = at.dataframe
    assert len(table.value) == before + 1 and "late alert" in set(table.value.message)


def test_every_page_file_is_registered_and_tested() -> None:
    from tests.dashboards.helpers import APP

    views = {p.stem for p in (APP.parent / "views").glob("*.py") if p.stem != "__init__"}
    app_text = APP.read_text()
    assert views == set(PAGES)
    for page in views:
        assert f'"{page}.py"' in app_text, f"views/{page}.py is not in app.py's PAGES"
