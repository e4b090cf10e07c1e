"""Every page of the explorer, run by Streamlit's AppTest on a recorded run directory
produced by a real training run with an injected fault and a rollback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import yaml

from tests.dashboards.helpers import PAGES, app, problems, texts, visit
from yoto import catalog, runstore
from yoto.dashboards.postmortem import wire
from yoto.events import Event, EventKind, Severity

LOSS = catalog.TRAIN_LOSS.name


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
                "tables": [t.value for t in at.table],
                "markdown": texts(at, "markdown"),
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


def events_table(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The Timeline's events table (beside it: an incident's suspect sequences)."""
    [events] = [f for f in frames if "kind" in f]
    return events


def test_timeline_marks_the_rollback_fault_and_spike(visited: dict, explorer_run: Path) -> None:
    page = visited["pages"]["timeline"]
    events = events_table(page["frames"])
    rollback = events[events.kind == "rollback"]
    assert len(rollback) == 1 and rollback.attempt.iloc[0] == 1
    # the rollback is the episode's page; the episode's summary closes it
    assert {"fault_injected", "spike", "episode", "batch_size"} <= set(events.kind)
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


def _x_domains(spec) -> list[list[float]]:
    """Every explicit x-scale domain in a Vega-Lite spec (any depth of layer/concat)."""
    found = []
    if isinstance(spec, dict):
        x = (spec.get("encoding") or {}).get("x") or {}
        domain = (x.get("scale") or {}).get("domain") if isinstance(x, dict) else None
        if domain is not None:
            found.append(domain)
        for value in spec.values():
            found += _x_domains(value)
    elif isinstance(spec, list):
        for item in spec:
            found += _x_domains(item)
    return found


def _drawn_series(proto) -> pd.DataFrame:
    parts = [t.to_pandas() for t in wire.datasets(proto) if "branch" in t.column_names]
    return pd.concat(parts, ignore_index=True)


def _incident(run: Path) -> dict:
    [rollback] = [e for e in runstore.read_events(run) if e["kind"] == EventKind.ROLLBACK]
    return rollback["data"]


def _recorded_loss(run: Path, attempt: int, lo: int, hi: int) -> dict[int, float]:
    files = [str(p) for p in sorted((run / runstore.METRICS).glob("part-*.parquet"))]
    rows = duckdb.execute(
        f'SELECT step, "{LOSS}" FROM read_parquet($f, union_by_name = true) '
        "WHERE attempt = $a AND step BETWEEN $lo AND $hi ORDER BY step",
        {"f": files, "a": attempt, "lo": lo, "hi": hi},
    ).fetchall()
    return {int(step): float(v) for step, v in rows}


def test_the_fixture_spike_is_at_known_steps(explorer_run: Path) -> None:
    """lr_spike@60: the loss of attempt 0 leaps at 61, the policy rolls back at 65 to the
    checkpoint of step 40, and attempt 1 retakes steps 41.. without the spike."""
    got = _incident(explorer_run)
    assert (got["onset"], got["from_step"], got["to_step"]) == (61, 65, 40)
    spiked = _recorded_loss(explorer_run, 0, 61, 65)
    calm = _recorded_loss(explorer_run, 1, 61, 65)
    assert sorted(spiked) == sorted(calm) == [61, 62, 63, 64, 65]
    assert max(spiked.values()) > 1.5 * max(calm.values())


def test_timeline_opens_on_the_incident_with_the_spike_drawn(
    visited: dict, explorer_run: Path
) -> None:
    incident = _incident(explorer_run)
    onset, at, back = incident["onset"], incident["from_step"], incident["to_step"]
    loss_chart = visited["pages"]["timeline"]["charts"][0]
    domains = {tuple(d) for d in _x_domains(json.loads(loss_chart.spec))}
    [(lo, hi)] = domains  # every layer and the event strip share one window
    assert lo <= back and at < hi and hi - lo < 60  # a zoom, not the whole 90 steps
    drawn = _drawn_series(loss_chart)
    spike = drawn[(drawn.branch == "abandoned") & (drawn.attempt == 0)]
    spike = spike[spike.x.between(onset, at)].set_index("x").value
    recorded = _recorded_loss(explorer_run, 0, onset, at)
    assert {int(x): v for x, v in spike.items()} == pytest.approx(recorded)
    assert drawn.x.between(lo, hi).all()


def test_timeline_whole_run_view(explorer_run: Path, yoto_runs) -> None:
    yoto_runs(explorer_run.parent)
    at = visit(app(), "timeline")
    [view] = [s for s in at.selectbox if s.key == "timeline_view"]
    assert view.value == 0 and "rollback at step 65" in view.format_func(0)
    view.set_value("whole run").run()  # the option views/timeline.py offers
    assert problems(at) == []
    loss_chart = at.get("vega_lite_chart")[0].proto
    assert _x_domains(json.loads(loss_chart.spec)) == []
    drawn = _drawn_series(loss_chart)
    assert drawn.x.min() == 1 and drawn.x.max() == 90
    assert {"surviving", "abandoned"} == set(drawn.branch)


def test_timeline_shows_the_incidents_diagnosis_and_suspect_sequences(
    visited: dict, explorer_run: Path
) -> None:
    """Under the incident's charts: the replay diagnosis written before the rollback (its
    verdict, and the trajectories it compared, a line each) and the spike's forensics (the
    onset batch's top sequences, and its tokens per source beside the mixture's)."""
    events = runstore.read_events(explorer_run)
    [rollback] = [e for e in events if e["kind"] == EventKind.ROLLBACK]
    [diagnosis] = [e["data"] for e in events if e["kind"] == EventKind.DIAGNOSIS]
    assert rollback["data"]["diagnosis"]["cause"] == diagnosis["cause"]
    onset = rollback["data"]["onset"]
    [forensics, *_] = [
        e["data"]["forensics"]
        for e in events
        if e["kind"] == EventKind.SPIKE and (e["data"].get("forensics") or {}).get("onset") == onset
    ]
    page = visited["pages"]["timeline"]
    assert f"**Diagnosis: {diagnosis['cause']}**. {diagnosis['finding']}" in page["markdown"]
    assert f"Advice: {diagnosis['advice']}" in page["markdown"]
    # the replays' chart, after loss and grad norm: every trajectory as recorded
    tables = [t.to_pandas() for t in wire.datasets(page["charts"][2])]
    drawn = pd.concat([t for t in tables if "series" in t], ignore_index=True)
    assert {t["label"] for t in diagnosis["trajectories"]} == set(drawn.series)
    for t in diagnosis["trajectories"]:
        for metric, values in ((LOSS, t["loss"]), (catalog.GRAD_NORM.name, t["grad_norm"])):
            line = drawn[(drawn.series == t["label"]) & (drawn.metric == metric)]
            want = dict(zip(t["steps"], values, strict=True))
            assert dict(zip(line.x, line.value, strict=True)) == pytest.approx(want)
    # the suspect sequences, highest loss first, and the batch's mix of sources
    [suspects] = [f for f in page["frames"] if "snippet" in f]
    top = forensics["top"]
    assert list(suspects.index) == [s["index"] for s in top]
    assert list(suspects["loss (nats)"]) == pytest.approx([s["loss"] for s in top])
    for column, key in (("source", "source"), ("offset", "offset"), ("snippet", "snippet")):
        assert list(suspects[column]) == [s[key] for s in top]
    assert list(suspects.document.fillna("")) == [s["doc_id"] or "" for s in top]
    [mix] = page["tables"]
    assert mix.tokens.to_dict() == forensics["source_tokens"]
    expected = {k: round(v) for k, v in forensics["expected_source_tokens"].items()}
    assert mix.expected.to_dict() == expected


def _set_band(run: Path, low, high) -> None:
    path = run / runstore.CONFIG
    cfg = yaml.safe_load(path.read_text())
    cfg["probes"]["spectra"].update(alpha_low=low, alpha_high=high)
    path.write_text(yaml.safe_dump(cfg))


def _band_rules(at) -> list[float]:
    [alpha] = [c.proto for c in at.get("vega_lite_chart")][:1]
    ys = [t["y"].to_pylist() for t in wire.datasets(alpha) if t.column_names == ["y"]]
    return sorted(v for y in ys for v in y)


def test_spectra_draws_the_runs_own_band(run_dir_copy: Path, yoto_runs) -> None:
    _set_band(run_dir_copy, 1.25, 7.5)
    yoto_runs(run_dir_copy)
    at = visit(app(), "spectra")
    assert problems(at) == [] and texts(at, "warning") == []
    assert _band_rules(at) == [1.25, 7.5]
    assert any("1.25 ≤ alpha ≤ 7.5" in c for c in texts(at, "caption"))
    _set_band(run_dir_copy, 6, 2)  # not a band: said, and the defaults drawn
    at.run()
    [warning] = texts(at, "warning")
    assert "alpha_low < alpha_high" in warning
    assert _band_rules(at) == [2.0, 6.0]


def test_layers_names_the_first_abnormal_layer_before_the_spike(visited: dict) -> None:
    [message] = visited["pages"]["layers"]["warning"]
    assert "went abnormal first" in message and "before the onset" in message


def test_spectra_page_draws_an_eigenvalue_histogram(visited: dict) -> None:
    charts = visited["pages"]["spectra"]["charts"]
    assert len(charts) == 2  # alpha over time, and the spectrum
    bars = [t for p in charts for t in wire.datasets(p) if "count" in t.column_names]
    assert bars and sum(sum(t["count"].to_pylist()) for t in bars) >= 32


def test_throughput_shows_each_rank_and_the_system(visited: dict) -> None:
    tables = [t for c in visited["pages"]["throughput"]["charts"] for t in wire.datasets(c)]
    ranks = {r for t in tables if "rank" in t.column_names for r in t["rank"].to_pylist()}
    assert ranks == {"0", "median"}  # the run's one rank, and the median it is judged by
    series = {s for t in tables if "series" in t.column_names for s in t["series"].to_pylist()}
    assert {catalog.RANK_STEP.key(rank="0"), catalog.PROCESS_RSS.name} <= series


def test_the_explorer_never_writes_into_the_run(visited: dict) -> None:
    assert visited["after"] == visited["before"]


def test_live_run_new_segments_show_after_a_rerun(run_dir_copy: Path, yoto_runs) -> None:
    """A live run: new rows written by the run store appear on the next rerun without
    clearing any cache (the loaders key on the run's file fingerprint)."""
    yoto_runs(run_dir_copy)
    at = visit(app(), "timeline")
    before = len(events_table([d.value for d in at.dataframe]))
    store = runstore.RunStore.reopen(run_dir_copy)
    store.write_event(Event(91, 1, EventKind.ALERT, Severity.WARNING, "late alert"))
    store.write_step(1, 91, {"yoto_train_loss": 2.5, "yoto_grad_norm": 0.5})
    store.flush()
    at.run()
    assert problems(at) == []
    table = events_table([d.value for d in at.dataframe])
    assert len(table) == before + 1 and "late alert" in set(table.message)


def test_every_page_file_is_registered_and_tested() -> None:
    from tests.dashboards.helpers import APP

    views = {p.stem for p in (APP.parent / "views").glob("*.py") if p.stem != "__init__"}
    app_text = APP.read_text()
    assert views == set(PAGES)
    for page in views:
        assert f'"{page}.py"' in app_text, f"views/{page}.py is not in app.py's PAGES"


def test_timeline_draws_the_context_length_when_it_changed(
    explorer_run: Path, tmp_path: Path, yoto_runs
) -> None:
    """A sequence warmup's lengths, as recorded, in a third chart under loss and grad
    norm; a run at one length (the explorer's) has only the two."""
    from tests.helpers import FAST, train_in_process

    sets = [
        "train.steps=10",
        "train.seq_warmup.start=16",
        "train.seq_warmup.tokens=6000",
        "probes.spectra.enabled=false",
    ]
    run = train_in_process(tmp_path, *[a for s in (*FAST, *sets) for a in ("--set", s)])
    recorded = runstore.read_metrics(run).to_pydict()
    want = dict(zip(recorded["step"], recorded[catalog.SEQ_LEN.name], strict=True))
    assert len(set(want.values())) >= 3
    yoto_runs(run.parent)
    at = visit(app(), "timeline")
    assert problems(at) == []
    charts = [c.proto for c in at.get("vega_lite_chart")]
    drawn = _drawn_series(charts[2])
    assert {int(x): v for x, v in zip(drawn.x, drawn.value, strict=True)} == want
    # the noise page puts B_noise in tokens with each step's own length
    at = visit(app(), "noise")
    assert problems(at) == []
    tables = [t.to_pandas() for t in wire.datasets(at.get("vega_lite_chart")[0].proto)]
    drawn = pd.concat([t for t in tables if "series" in t.columns], ignore_index=True)
    drawn = drawn[drawn.series == "B_noise (critical batch)"]
    gns, lengths = recorded[catalog.GRADIENT_NOISE_SCALE.name], recorded[catalog.SEQ_LEN.name]
    tokens = recorded[catalog.TOKENS.name]
    expect = {int(x): b * n for x, b, n in zip(tokens, gns, lengths, strict=True) if b is not None}
    assert len(expect) >= 3 and len(set(recorded[catalog.SEQ_LEN.name])) >= 3
    assert {int(x): v for x, v in zip(drawn.x, drawn.value, strict=True)} == pytest.approx(expect)
    yoto_runs(explorer_run.parent)
    at = visit(app(), "timeline")
    assert len([c for c in at.get("vega_lite_chart")]) == 3  # and the diagnosis's replays
