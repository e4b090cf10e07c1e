"""Downstream scaling (issue 19): a few-shot score fitted against N across a sweep and each
run's effective size by score beside the one by loss. Run directories are written with the
run store (manifest, metrics with tokens per step, evals/ rows), no training; the scores
come from known laws with a little noise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from yoto import catalog, runstore
from yoto.cli import main
from yoto.runstore import RunStore
from yoto.scaling import runs as sr
from yoto.scaling.laws import ScalingError

TASK = "stdlib_next_line"
ACC = f"eval:{TASK}/acc_norm"
LOSS_LAW = (1e10, 0.1)  # validation loss L(N) = (N_c / N)^alpha: effective size by loss = N
POWER = (50.0, 0.12)  # err = 1 - acc_norm = (N_c / N)^alpha
FLOOR = (0.15, 8.0, 0.25)  # err = E + A / N^alpha


def loss_at(n: float) -> float:
    return (LOSS_LAW[0] / n) ** LOSS_LAW[1]


def power_err(n: float) -> float:
    return (POWER[0] / n) ** POWER[1]


def floor_err(n: float) -> float:
    e, a, alpha = FLOOR
    return e + a / n**alpha


def eval_row(metric: str, value: float, task: str = TASK, shots: int = 0) -> dict:
    return {
        "task": task,
        "metric": metric,
        "value": value,
        "stderr": 0.01,
        "num_fewshot": shots,
        "limit": -1,
        "backend": "YotoLM",
    }


def scored_run(
    root: Path,
    name: str,
    n: float,
    evals: list[tuple[int, int, list[dict]]],
    d: float = 1e8,
    loss: float | None = None,
    steps: tuple[int, ...] = (50, 100),
    sweep: str = "s1",
) -> Path:
    """A finished run: metrics at ``steps`` (tokens growing to ``d``, a validation loss),
    then evals/ rows (attempt, step, rows) as ``yoto eval`` appends them."""
    extra = {"non_embedding_parameters": n, "sweep": {"id": sweep, "index": 0, "point": {}}}
    store = RunStore.create(root, name, "model: {}\n", extra=extra)
    for step in steps:
        row = {catalog.TOKENS.name: d * step / steps[-1], catalog.TRAIN_LOSS.name: 3.0}
        if loss is not None:
            row[catalog.VAL_LOSS.key(source="text")] = loss
        store.write_step(0, step, row)
    store.close("finished")
    for attempt, step, rows in evals:
        runstore.append_records(store.path, runstore.EVALS, attempt, step, rows)
    return store.path


def power_sweep(root: Path, noise: float = 3e-3, seed: int = 0) -> list[float]:
    """Six runs on the power law (acc_norm) and the loss law, one without evaluations."""
    rng = np.random.default_rng(seed)
    sizes = list(np.geomspace(1e5, 1e8, 6))
    for i, n in enumerate(sizes):
        acc = 1 - power_err(n) * math.exp(rng.normal(0, noise))
        rows = [eval_row("acc_norm", acc), eval_row("acc", acc - 0.05)]
        # an older, worse evaluation at step 50: the final score is step 100's
        evals = [(0, 50, [eval_row("acc_norm", acc - 0.1)]), (0, 100, rows)]
        scored_run(root, f"p{i}", n, evals, loss=loss_at(n))
    scored_run(root, "noeval", 3e6, [], loss=loss_at(3e6))
    return sizes


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# --- the final score --------------------------------------------------------------------


def test_final_score_is_the_newest_step_ties_to_the_highest_attempt(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path, "r", "model: {}\n", extra={"non_embedding_parameters": 1e6})
    for attempt, step, tokens in [(0, 50, 500.0), (0, 100, 1000.0), (1, 100, 1100.0)]:
        store.write_step(attempt, step, {catalog.TOKENS.name: tokens})
    store.close("finished")
    path = store.path
    for attempt, step, value in [(0, 100, 0.5), (1, 100, 0.6), (0, 50, 0.9)]:
        runstore.append_records(path, runstore.EVALS, attempt, step, [eval_row("acc", value)])
    runstore.append_records(path, runstore.EVALS, 0, 50, [eval_row("perplexity", 40.0)])
    scores = sr.read_run(path).scores
    assert set(scores) == {f"{TASK}/acc", f"{TASK}/perplexity"}
    final = scores[f"{TASK}/acc"]
    assert (final.value, final.step, final.attempt) == (0.6, 100, 1)
    assert final.d == 1100.0  # the tokens of attempt 1 at step 100
    assert scores[f"{TASK}/perplexity"].d == 500.0
    # evaluated twice at the same step and attempt: the row written last
    runstore.append_records(path, runstore.EVALS, 1, 100, [eval_row("acc", 0.65)])
    assert sr.read_run(path).scores[f"{TASK}/acc"].value == 0.65
    assert sr.score_labels([sr.read_run(path)]) == [f"eval:{TASK}/acc", f"eval:{TASK}/perplexity"]


# --- the laws ---------------------------------------------------------------------------


def test_power_law_on_the_error_and_effective_size_by_score(tmp_path: Path) -> None:
    sizes = power_sweep(tmp_path)
    records = sr.load_runs([tmp_path])
    sf = sr.fit_scores(records, sr.parse_metric(ACC), bootstrap=50)
    assert sf.fit.law == "kaplan" and "too few for a floor" in sf.why
    assert sf.fit.quantity == "err" and sf.fit.formula().startswith("err(N) = (")
    assert sf.fit.params["alpha_N"] == pytest.approx(POWER[1], rel=0.05)
    assert sf.fit.params["N_c"] == pytest.approx(POWER[0], rel=0.25)
    assert [r.name for r, _ in sf.skipped] == ["noeval"]
    assert "no eval:stdlib_next_line/acc_norm in its evals/ table" in sf.skipped[0][1]
    rows = sf.rows()
    assert [row["N"] for row in rows] == pytest.approx(sizes)
    for row in rows:  # on both laws: each run performs like its own size, by either
        assert row["effective_size"].value == pytest.approx(row["N"], rel=0.1)
        assert row["effective_size_by_loss"].value == pytest.approx(row["N"], rel=1e-6)
        assert row["step"] == 100 and row["D"] == 1e8
        assert row["predicted_score"] == pytest.approx(1 - power_err(row["N"]), abs=0.01)
    assert sf.loss_fit is not None and sf.loss_fit.law == "kaplan"  # over 7 runs, noeval too
    assert len(sf.loss_fit.points) == 7


def test_floor_law_and_a_run_that_performs_like_a_larger_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for i, n in enumerate(np.geomspace(1e5, 1e9, 8)):
        acc = 1 - floor_err(n) * math.exp(rng.normal(0, 2e-3))
        scored_run(tmp_path, f"f{i}", n, [(0, 100, [eval_row("acc_norm", acc)])], loss=loss_at(n))
    # a 1M-parameter run whose few-shot score is the law's at 2M; its loss is its size's
    scored_run(
        tmp_path, "good", 1e6, [(0, 100, [eval_row("acc_norm", 1 - floor_err(2e6))])],
        loss=loss_at(1e6),
    )  # fmt: skip
    sf = sr.fit_scores(sr.load_runs([tmp_path]), sr.parse_metric(ACC), bootstrap=40)
    assert sf.fit.law == "floor" and "9 points over 9 model sizes" in sf.why
    for key, true in zip(("E", "A", "alpha"), FLOOR, strict=True):
        assert sf.fit.params[key] == pytest.approx(true, rel=0.15), key
    good = next(row for row in sf.rows() if row["name"] == "good")
    assert good["effective_size"].value == pytest.approx(2e6, rel=0.1)
    assert good["effective_size_by_loss"].value == pytest.approx(1e6, rel=1e-6)
    iv = good["effective_size"]
    assert iv.low <= iv.value <= iv.high
    # a score past the law's ceiling 1 - E has no finite size
    assert not sf.fit.effective_size(0.5 * FLOOR[0]).finite


def test_perplexity_is_fitted_as_its_log_like_a_loss(tmp_path: Path) -> None:
    for i, n in enumerate(np.geomspace(1e5, 1e8, 4)):
        ppl = math.exp((1e9 / n) ** 0.2)  # log perplexity on a Kaplan law
        scored_run(tmp_path, f"q{i}", n, [(0, 100, [eval_row("perplexity", ppl, "stdlib_cloze")])])
    spec = sr.parse_metric("eval:stdlib_cloze/perplexity")
    assert not spec.higher_is_better and spec.fitted == "log"
    sf = sr.fit_scores(sr.load_runs([tmp_path]), spec, bootstrap=0)
    assert sf.fit.law == "kaplan" and sf.fit.quantity == "log perplexity"
    assert sf.fit.params["alpha_N"] == pytest.approx(0.2, rel=1e-6)
    assert sf.fit.params["N_c"] == pytest.approx(1e9, rel=1e-6)
    assert sf.loss_fit is None and "no fit of the validation loss" in sf.loss_why
    for row in sf.rows():
        assert row["predicted_score"] == pytest.approx(row["score"], rel=1e-6)
        assert row["effective_size"].value == pytest.approx(row["N"], rel=1e-6)
        assert row["effective_size_by_loss"] is None


def test_the_metric_table_and_spec_errors() -> None:
    assert sr.parse_metric(None) is None and sr.parse_metric("val_loss") is None
    for metric in ("acc", "acc_norm", "exact_match"):
        assert sr.parse_metric(f"eval:t/{metric}").fitted == "error"
    for metric in ("perplexity", "word_perplexity", "bits_per_byte"):
        assert not sr.parse_metric(f"eval:t/{metric}").higher_is_better
    assert sr.parse_metric("eval:t/f1", higher_is_better=True).fitted == "error"
    assert sr.parse_metric("eval:t/nll", higher_is_better=False).fitted == "value"
    spec = sr.parse_metric("eval:t/acc")
    assert spec.fitted_value(0.75) == (0.25, "")
    assert spec.fitted_value(1.0)[0] is None and spec.fitted_value(1.5)[0] is None
    for bad, message in [
        ("acc", "expected val_loss (the default) or eval:TASK/METRIC"),
        ("eval:acc", "expected val_loss (the default) or eval:TASK/METRIC"),
        ("eval:t/", "expected val_loss"),
        ("eval:t/f1", "which way is 'f1' better? Known metrics: acc, acc_norm, exact_match"),
        ("eval:t/f1", "--higher-is-better"),
    ]:
        with pytest.raises(ScalingError) as err:
            sr.parse_metric(bad)
        assert message in str(err.value), (bad, str(err.value))
    with pytest.raises(ScalingError, match="acc is higher is better; drop --lower-is-better"):
        sr.parse_metric("eval:t/acc", higher_is_better=False)


# --- the command ------------------------------------------------------------------------


def test_cli_prints_both_effective_sizes_and_the_skipped_run(tmp_path: Path, capsys) -> None:
    power_sweep(tmp_path)
    rc, out, err = run_cli(
        capsys, "scaling", "fit", str(tmp_path), "--metric", ACC, "--bootstrap", "20"
    )
    assert rc == 0, err
    assert (
        "Kaplan law (" in out
        and f"on 6 runs, {ACC} (higher is better; fitted as err = 1 - acc_norm)" in out
    )
    assert "err(N) = (" in out and "by loss (mean over sources): Kaplan law" in out
    header = next(line for line in out.splitlines() if "N_eff(loss)" in line)
    assert header.split() == [
        "run",
        "N",
        "D",
        "loss",
        "N_eff(loss)",
        "acc_norm",
        "law",
        "N_eff(score)",
    ]
    assert "p0 performs like a" in out and f"-parameter model on {TASK}/acc_norm" in out
    assert "skipped noeval" in out and "no eval:stdlib_next_line/acc_norm" in out

    rc, out, err = run_cli(
        capsys, "scaling", "fit", str(tmp_path), "--metric", ACC, "--json", "--bootstrap", "20"
    )
    assert rc == 0, err
    (body,) = json.loads(out)
    assert body["metric"] == ACC and body["higher_is_better"] and body["law"] == "kaplan"
    assert body["quantity"] == "err" and body["loss_fit"]["law"] == "kaplan"
    assert [s["name"] for s in body["skipped"]] == ["noeval"]
    for run in body["runs"]:
        assert run["effective_size"]["value"] == pytest.approx(run["N"], rel=0.1)
        assert run["effective_size_by_loss"]["value"] == pytest.approx(run["N"], rel=1e-6)
        assert run["effective_size"]["fitted_value"] == pytest.approx(1 - run["score"])

    # the default metric is still the validation loss
    rc, out, _ = run_cli(capsys, "scaling", "fit", str(tmp_path), "--json", "--bootstrap", "0")
    assert rc == 0 and json.loads(out)[0]["source"] == "all"


def test_cli_bad_metric_specs(tmp_path: Path, capsys) -> None:
    power_sweep(tmp_path)

    def fails(*argv: str) -> str:
        rc, _, err = run_cli(capsys, "scaling", "fit", *argv)
        assert rc == 2 and "Traceback" not in err, err
        return err

    root = str(tmp_path)
    assert "expected val_loss (the default) or eval:TASK/METRIC" in fails(root, "--metric", "acc")
    err = fails(root, "--metric", "eval:stdlib_cloze/acc")
    assert "no run has eval:stdlib_cloze/acc" in err
    assert f"the runs' few-shot scores: eval:{TASK}/acc, {ACC}" in err
    assert "which way is 'f1' better?" in fails(root, "--metric", f"eval:{TASK}/f1")
    err = fails(root, "--metric", ACC, "--lower-is-better")
    assert "acc_norm is higher is better; drop --lower-is-better" in err
    assert "go with --metric eval:TASK/METRIC" in fails(root, "--higher-is-better")
    assert "reads run directories, not --table" in fails("--table", "x.csv", "--metric", ACC)
    # too few runs with the score: the fit's message, and the runs it skipped
    lone = tmp_path / "lone"
    scored_run(lone, "a", 1e6, [(0, 100, [eval_row("acc_norm", 0.5)])])
    scored_run(lone, "b", 2e6, [])
    err = fails(str(lone), "--metric", ACC)
    assert "only 1 point(s)" in err and "skipped" in err and "it has: no evaluations" in err


# --- the explorer -----------------------------------------------------------------------


def test_scaling_page_fits_the_chosen_few_shot_metric(tmp_path: Path, monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    from tests.dashboards.helpers import APP

    power_sweep(tmp_path)
    monkeypatch.setenv("YOTO_RUNS", str(tmp_path))
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    at.switch_page("views/scaling.py").run()
    assert not at.exception and not at.error
    metric = at.selectbox(key="scaling_metric")
    assert metric.options == ["validation loss", f"eval:{TASK}/acc", ACC]
    assert any("L(N) = (" in c.value for c in at.code)  # the loss first
    metric.set_value(ACC).run()
    assert not at.exception and not at.error, [e.value for e in at.exception]
    assert any(c.value.startswith("err(N) = (") for c in at.code)
    assert len(at.get("vega_lite_chart")) == 3  # err vs N, vs compute, residuals
    table = at.dataframe[-1].value
    assert {"N_eff(loss)", "N_eff(score)", "acc_norm", "× its size"} <= set(table.columns)
    assert len(table) == 6
    assert table["× its size"].to_numpy() == pytest.approx(np.ones(6), rel=0.1)
    assert any("noeval" in c.value for c in at.caption)  # skipped, with the reason
