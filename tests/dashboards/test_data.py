"""The explorer's data layer without a Streamlit server: downsampling, branches, bounds."""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from yoto import catalog, runstore
from yoto.config import SpectraConfig
from yoto.dashboards.postmortem import charts, data, downsample, incidents, layers, query
from yoto.events import EventKind, Reason, Rollback, Severity

LOSS = catalog.TRAIN_LOSS.name


def test_downsample_keeps_a_one_step_spike_and_drops_nans() -> None:
    x = np.arange(1_000_000)
    y = np.sin(x / 5_000.0)
    y[123_457] = 50.0
    y[500_000:500_010] = np.nan
    idx = downsample.indices(x, y, 2000)
    assert len(idx) <= 2000 and np.all(np.diff(idx) > 0)
    assert 123_457 in idx and np.isfinite(y[idx]).all()
    assert list(downsample.indices(x[:10], y[:10], 2000)) == list(range(10))


def test_budget_is_shared_and_bounded() -> None:
    assert downsample.split_budget([10, 20], 100) == [10, 20]
    parts = downsample.split_budget([1_000_000, 10, 3_000_000], 2000)
    assert sum(parts) <= 2000 and min(parts) >= 2 and parts[2] > parts[0]


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run written by the real run store: 30k steps, a rollback to step 20,000 (attempt
    1 runs 20,001-40,000), a one-step loss spike at 12,345 and a NaN at 25,000."""
    root = tmp_path_factory.mktemp("long")
    store = runstore.RunStore.create(
        root, "long", "model:\n  seq_len: 64\n", flush_every_steps=5000
    )
    for attempt, steps in ((0, range(1, 30_001)), (1, range(20_001, 40_001))):
        for s in steps:
            loss = 5.0 / math.sqrt(s) + 1.0 + 0.01 * attempt
            if attempt == 0 and s == 12_345:
                loss = 42.0
            if attempt == 1 and s == 25_000:
                loss = math.nan
            store.write_step(attempt, s, {LOSS: loss, catalog.TOKENS.name: 64.0 * s})
    store.close("finished")
    return store.path


def test_series_is_bounded_per_series_and_splits_branches(long_run: Path, yoto_runs) -> None:
    yoto_runs(long_run.parent)
    t = data.table(long_run, runstore.METRICS)
    frame = query.series(t, [LOSS, "not_a_column"], max_points=500)
    assert set(frame.series) == {LOSS}
    assert len(frame) <= 500
    ab = frame[frame.branch == "abandoned"]
    assert set(ab.attempt) == {0} and ab.x.min() >= 20_001 and ab.x.max() <= 30_000
    surv = frame[frame.branch == "surviving"]
    assert surv[surv.attempt == 0].x.max() <= 20_000
    assert surv[surv.attempt == 1].x.min() >= 20_001
    assert 42.0 in set(frame.value)  # the spike survives the min/max preselection in DuckDB
    assert np.isfinite(frame.value).all()


def test_series_over_tokens_of_the_surviving_branch(long_run: Path, yoto_runs) -> None:
    yoto_runs(long_run.parent)
    t = data.table(long_run, runstore.METRICS)
    frame = query.series(t, [LOSS], x=catalog.TOKENS.name, branches=("surviving",))
    assert set(frame.branch) == {"surviving"} and len(frame) <= downsample.MAX_POINTS
    assert frame.x.max() == 64.0 * 40_000


def test_lineage_of_each_attempt() -> None:
    firsts = {0: 1, 1: 61, 2: 30}  # attempt 2 rolled back further than attempt 1 had
    assert query.cutoffs(firsts, 2) == {0: 30, 1: 30, 2: math.inf}
    assert query.cutoffs(firsts, 1) == {0: 61, 1: math.inf}
    con = duckdb.connect()
    con.register("rows", pd.DataFrame({"attempt": [0, 0, 1, 1, 2], "step": [10, 70, 61, 65, 30]}))
    got = con.execute(f"SELECT attempt, step FROM rows WHERE {query.lineage_sql(firsts, 1)}")
    assert sorted(got.fetchall()) == [(0, 10), (1, 61), (1, 65)]


def test_duckdb_opens_nothing_outside_the_roots(tmp_path: Path, yoto_runs) -> None:
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    pq.write_table(pa.table({"a": [1]}), outside / "x.parquet")
    con = query.connect([inside])
    with pytest.raises(duckdb.PermissionException):
        con.execute(f"SELECT * FROM '{outside / 'x.parquet'}'").fetchall()
    with pytest.raises(duckdb.Error):  # nor can the limits be lifted
        con.execute("SET enable_external_access = true")
    yoto_runs(inside)
    with pytest.raises(query.ExplorerError, match="not under the run roots"):
        data.table(outside, runstore.METRICS)


def test_run_dirs_from_runs_and_roots(tmp_path: Path, yoto_runs) -> None:
    a = runstore.RunStore.create(tmp_path / "root", "a", "").path
    b = runstore.RunStore.create(tmp_path / "root", "b", "").path
    (tmp_path / "root" / "not-a-run").mkdir()
    single = runstore.RunStore.create(tmp_path / "other", "c", "").path
    yoto_runs(tmp_path / "root", single, tmp_path / "missing")
    assert data.run_dirs() == [a.resolve(), b.resolve(), single.resolve()]
    assert data.missing_roots() == [(tmp_path / "missing").resolve()]


def _layer_rows(jump_layer: str | None, jump_step: int) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    rows = []
    for step in range(10, 410, 10):
        for layer in ("0", "1", "2", "3"):
            value = 1.0 + 0.02 * rng.standard_normal()
            if layer == jump_layer and step >= jump_step:
                value *= 10
            rows.append((layer, step, value))
    return pd.DataFrame(rows, columns=["layer", "step", "value"])


def test_first_abnormal_layer_is_the_one_that_moved_first() -> None:
    found = layers.first_abnormal(_layer_rows("2", 390), onset=395, metric="m")
    assert found is not None and (found.layer, found.step) == ("2", 390) and found.z > 6
    assert "5 steps before the onset" in found.describe()
    assert layers.first_abnormal(_layer_rows(None, 0), onset=395, metric="m") is None
    # the look ends at the first recorded step at or after the onset
    late = layers.first_abnormal(_layer_rows("1", 400), onset=395, metric="m")
    assert late is not None and late.layer == "1" and late.step == 400


def test_layer_order_is_by_depth() -> None:
    assert layers.layer_order(["10", "2", "lm_head", "1"]) == ["1", "2", "10", "lm_head"]


def test_heatmap_when_the_newest_segment_holds_another_probes_rows(
    tmp_path: Path, yoto_runs
) -> None:
    """Spectra results arrive as layer rows of their own (a late segment with only
    yoto_weight_* metrics): the heatmap of another metric must still find its layers."""
    store = runstore.RunStore.create(tmp_path, "mixed", "", flush_every_steps=1000)
    norm = catalog.LAYER_GRAD_NORM
    for step in (10, 20, 30):
        store.write_step(0, step, {norm.key(layer=str(i)): 0.1 * step + i for i in range(3)})
    store.flush()
    store.write_step(0, 31, {catalog.WEIGHT_ALPHA.key(layer="blocks.0.attn.qkv"): 3.0})
    store.close("finished")
    yoto_runs(tmp_path)
    heat = data.layer_heatmap(store.path, norm.name, None)
    assert sorted(heat.layer.unique()) == ["0", "1", "2"] and len(heat) == 9
    assert norm.name in data.layer_metrics(store.path)


def test_a_window_gives_the_incident_its_whole_point_budget(long_run: Path, yoto_runs) -> None:
    yoto_runs(long_run.parent)
    t = data.table(long_run, runstore.METRICS)
    frame = query.series(t, [LOSS], max_points=500, window=(12_300, 12_400))
    assert frame.x.min() >= 12_300 and frame.x.max() <= 12_400
    # the window's 101 steps (attempt 0, before the rollback's cut) arrive whole, spike
    # included: a 30k-step series downsampled to 500 points would keep one in 60
    assert len(frame) == 101 and set(frame.branch) == {"surviving"}
    assert frame.set_index("x").value[12_345.0] == 42.0
    both = query.series(t, [LOSS], window=(19_990, 20_010))
    got = {(b, a): len(p) for (b, a), p in both.groupby(["branch", "attempt"])}
    # steps 19,990-20,000 of attempt 0 survive; 20,001-20,010 of attempt 0 were abandoned
    # and attempt 1 took them again
    assert got == {("surviving", 0): 11, ("abandoned", 0): 10, ("surviving", 1): 10}
    assert query.series(t, [LOSS], window=(50_000, 60_000)).empty


def _events(*rows: dict) -> pd.DataFrame:
    cols = {"step": 0, "attempt": 0, "kind": "", "severity": "info", "message": "", "data": {}}
    return pd.DataFrame([{**cols, **r} for r in rows])


def test_an_incident_per_rollback_with_a_window_that_shows_the_spike() -> None:
    events = _events(
        {"step": 300, "kind": EventKind.FAULT_INJECTED},
        {
            "step": 305,
            "attempt": 1,
            "kind": EventKind.ROLLBACK,
            "data": Rollback(305, 200, 301, Reason.PERSISTENT_SPIKE, 0, 1).to_data(),
        },
        # a record from before rollbacks named the attempt they abandoned
        {"step": 9_000, "attempt": 2, "kind": EventKind.ROLLBACK,
         "data": {"from_step": 9_000, "to_step": 1_000, "onset": 8_990, "reason": "spike",
                  "attempt": 2}},
    )  # fmt: skip
    first, second = incidents.incidents(events)
    assert (first.abandoned, first.onset, first.rolled_back_at, first.resumed_from) == (
        0, 301, 305, 200,
    )  # fmt: skip
    lo, hi = first.window
    assert lo < 200 and 305 < hi  # the checkpoint, the spike and the rollback in view
    assert (305 - 301 + 1) / (hi - lo) > 1 / 30  # the spike gets a visible share
    assert "attempt 0 abandoned (persistent_spike from step 301)" in first.label()
    # a checkpoint far before the onset is cut off: the 11 bad steps keep ~1/25 of the view
    lo, hi = second.window
    assert 1_000 < lo < 8_990 and hi > 9_000 and (9_000 - 8_990 + 1) / (hi - lo) > 1 / 35
    assert second.abandoned == 1  # the attempt before the record's own, when it is silent
    assert incidents.incidents(_events({"step": 5, "kind": EventKind.SPIKE})) == []


def test_a_rollback_event_missing_its_fields_still_makes_an_incident() -> None:
    [only] = incidents.incidents(
        _events({"step": 70, "attempt": 3, "kind": EventKind.ROLLBACK, "data": None})
    )
    assert (only.abandoned, only.onset, only.rolled_back_at, only.resumed_from) == (2, 70, 70, 70)
    assert only.window[0] < 70 < only.window[1]


def test_the_alpha_band_is_the_runs_own() -> None:
    default = SpectraConfig()
    assert data.alpha_band({}) == data.AlphaBand(default.alpha_low, default.alpha_high)
    custom = {"probes": {"spectra": {"alpha_low": 1.5, "alpha_high": 7.0}}}
    assert data.alpha_band(custom) == data.AlphaBand(1.5, 7.0)
    half = {"probes": {"spectra": {"alpha_high": 9}}}
    assert data.alpha_band(half) == data.AlphaBand(default.alpha_low, 9.0)
    for bad in ({"alpha_low": "two", "alpha_high": 6}, {"alpha_low": 6, "alpha_high": 2}):
        got = data.alpha_band({"probes": {"spectra": bad}})
        assert (got.low, got.high) == (default.alpha_low, default.alpha_high)
        assert "alpha_low < alpha_high" in got.problem and "default" in got.problem


def test_markers_keep_the_most_severe_and_only_marked_kinds() -> None:
    events = _events(
        *({"step": s, "kind": EventKind.SPIKE, "severity": Severity.WARNING} for s in range(5)),
        {"step": 9, "kind": EventKind.HALT, "severity": Severity.CRITICAL},
        {"step": 3, "kind": EventKind.CHECKPOINT},
    )
    assert set(charts.markers(events).kind) == {EventKind.SPIKE, EventKind.HALT}
    top = charts.markers(events, limit=2)
    assert list(top.kind) == [EventKind.HALT, EventKind.SPIKE] and list(top.step) == [9, 0]
    assert set(charts.MARKED) <= set(EventKind)


def test_a_window_over_segments_without_a_series_reads_it_as_missing(
    tmp_path: Path, yoto_runs
) -> None:
    """A probe's series can be absent from some segments (it did not run in those steps;
    every checkpoint cuts a segment): a window whose segments all lack it must draw what
    they have, not fail on the missing column."""
    store = runstore.RunStore.create(tmp_path, "sparse", "", flush_every_steps=1000)
    noise = catalog.GRADIENT_NOISE_SCALE.name
    for step in range(1, 11):
        store.write_step(0, step, {LOSS: 2.0, noise: 100.0 + step})
    store.flush()
    for step in range(11, 21):  # the probe is off here
        store.write_step(0, step, {LOSS: 1.0})
    store.close("finished")
    yoto_runs(tmp_path)
    t = data.table(store.path, runstore.METRICS)
    assert noise in t.columns() and noise in t.between(11, 20).columns()
    frame = query.series(t, [LOSS, noise], window=(12, 18))
    assert set(frame.series) == {LOSS} and sorted(frame.x) == list(range(12, 19))
    whole = query.series(t, [noise])
    assert sorted(whole.x) == list(range(1, 11))
