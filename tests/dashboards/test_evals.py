"""The explorer's Evals page on copies of the explorer's recorded run (a rollback at step 65
to the checkpoint of step 40: attempt 0's steps 41..65 are an abandoned branch) with
few-shot scores written into their evals/ tables as ``yoto eval`` writes them."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from tests.dashboards.helpers import app, problems, texts, visit
from yoto import catalog, runstore
from yoto.dashboards.postmortem import wire

NEXT, CLOZE = "stdlib_next_line", "stdlib_cloze"


def score(task: str, metric: str, value: float, stderr: float = math.nan) -> dict:
    return {
        "task": task,
        "metric": metric,
        "value": value,
        "stderr": stderr,
        "num_fewshot": 0,
        "limit": 200,
        "backend": "YotoLM",
    }


def tokens_at(run: Path) -> dict[tuple[int, int], float]:
    m = runstore.read_metrics(run).to_pydict()
    cols = (m["attempt"], m["step"], m[catalog.TOKENS.name])
    return {(a, s): t for a, s, t in zip(*cols, strict=True)}


@pytest.fixture
def scored(run_dir_copy: Path) -> tuple[Path, Path]:
    """Two runs with scores: the first on both branches, the second at one step."""
    first = run_dir_copy
    second = first.parent / "second"
    shutil.copytree(first, second)
    for attempt, step, rows in (
        (0, 20, [score(NEXT, "acc", 0.30, 0.02), score(CLOZE, "acc", 0.50, 0.03)]),
        (0, 40, [score(NEXT, "acc", 0.35, 0.02), score(CLOZE, "acc", 0.60, 0.03)]),
        (0, 60, [score(NEXT, "acc", 0.20, 0.02), score(CLOZE, "acc", 0.55, 0.03)]),  # undone
        (1, 80, [score(NEXT, "acc", 0.40, 0.02)]),
    ):
        runstore.append_records(first, runstore.EVALS, attempt, step, rows)
    runstore.append_records(second, runstore.EVALS, 1, 80, [score(NEXT, "acc", 0.45)])
    runstore.append_records(second, runstore.EVALS, 1, 80, [score(NEXT, "acc", 0.5)])  # again
    return first, second


def drawn(at) -> pd.DataFrame:
    [chart] = at.get("vega_lite_chart")
    tables = [t.to_pandas() for t in wire.datasets(chart.proto)]
    return pd.concat([t for t in tables if "value" in t], ignore_index=True)


def newest(at) -> pd.DataFrame:
    [table] = [d.value for d in at.dataframe]
    return table


def test_scores_against_tokens_side_by_side(scored: tuple[Path, Path], yoto_runs) -> None:
    first, second = scored
    yoto_runs(first.parent)
    at = visit(app(), "evals")
    assert problems(at) == [] and texts(at, "title") == ["Evals"]
    [pick] = [m for m in at.multiselect if m.key == "evals_pick"]
    assert set(pick.value) == {str(first.resolve()), str(second.resolve())}
    assert any("2 score(s) on abandoned branches hidden" in c for c in texts(at, "caption"))
    assert [s.value for s in at.selectbox if s.key.startswith("evals_")] == [CLOZE, "acc"]

    at.selectbox(key="evals_task").set_value(NEXT).run()
    assert problems(at) == []
    got = drawn(at)
    runs = {r: next(n for n in set(got.run) if n.endswith(f"({r.name})")) for r in scored}
    toks = tokens_at(first)
    # the surviving branch only: the scores at 20, 40 (attempt 0) and 80 (attempt 1)
    mine = got[got.run == runs[first]].sort_values("step")
    assert list(mine.step) == [20, 40, 80] and set(mine.branch) == {"surviving"}
    assert list(mine.x) == [toks[(0, 20)], toks[(0, 40)], toks[(1, 80)]]
    assert list(mine.value) == pytest.approx([0.30, 0.35, 0.40])
    assert list(mine.lo) == pytest.approx([0.28, 0.33, 0.38])
    assert list(mine.hi) == pytest.approx([0.32, 0.37, 0.42])
    theirs = got[got.run == runs[second]]
    assert list(theirs.value) == pytest.approx([0.45, 0.5])  # both evaluations drawn
    assert theirs.x.tolist() == [toks[(1, 80)]] * 2 and theirs.lo.isna().all()

    table = newest(at).set_index(["run", "task"])
    row = table.loc[(runs[first], NEXT)]
    assert (row.value, row.stderr, row.step, row.attempt) == (0.40, 0.02, 80, 1)
    assert (row.tokens, row["n-shot"], row.examples) == (toks[(1, 80)], 0, 200)
    row = table.loc[(runs[first], CLOZE)]  # its step 60 was undone: step 40 is the newest
    assert (row.value, row.step, row.attempt) == (0.60, 40, 0)
    row = table.loc[(runs[second], NEXT)]  # the row written last
    assert (row.value, row.step) == (0.5, 80) and math.isnan(row.stderr)
    assert "branch" not in newest(at)

    at.toggle(key="evals_abandoned").set_value(True).run()
    assert problems(at) == []
    got = drawn(at)
    mine = got[got.run == runs[first]].sort_values("step")
    assert list(mine.step) == [20, 40, 60, 80]
    assert list(mine.branch) == ["surviving", "surviving", "abandoned", "surviving"]
    assert mine.x.iloc[2] == toks[(0, 60)] and mine.value.iloc[2] == pytest.approx(0.20)
    row = newest(at).set_index(["run", "task"]).loc[(runs[first], CLOZE)]
    assert (row.value, row.step, row.attempt, row.branch) == (0.55, 60, 0, "abandoned")

    at.radio(key="evals_x").set_value("optimizer step").run()
    assert problems(at) == []
    got = drawn(at)
    assert sorted(got[got.run == runs[first]].x) == [20, 40, 60, 80]


def test_a_run_without_evals_says_how_to_get_them(run_dir_copy: Path, yoto_runs) -> None:
    yoto_runs(run_dir_copy)
    at = visit(app(), "evals")
    assert problems(at) == [] and not at.get("vega_lite_chart")
    [info] = texts(at, "info")
    assert "no few-shot evaluations recorded" in info
    assert f"yoto eval {run_dir_copy.resolve()} --tasks" in info
    assert "eval.harness.every" in info
