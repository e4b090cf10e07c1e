"""Evals: few-shot scores (``yoto eval``, in-loop ``eval.harness``) of several runs against
the tokens each had trained on at the evaluated step, a chart per task and metric with
±stderr error bars, and each run's newest scores.

The tokens of an evaluated (attempt, step) are the metrics table's ``yoto_tokens_total``
at that step, on the highest attempt up to the row's that recorded it (as ``yoto scaling
fit`` reads them). A score on an abandoned branch (its attempt's step was re-trained by a
later attempt after a rollback) is hidden unless asked for, as Compare shows the surviving
branch only; shown, it is dashed with hollow points, as the Timeline draws those branches.
The newest score is that of the newest evaluated step, ties to the highest attempt, then to
the row written last (``yoto scaling fit``'s final score), among the rows shown.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from yoto import catalog, runstore
from yoto.dashboards.postmortem import charts, data, query, ui
from yoto.scaling.runs import SCORE_METRICS

TOKENS = catalog.TOKENS.name
BY_TOKENS, BY_STEP = "tokens", "optimizer step"
COLUMNS = ("attempt", "step", "task", "metric", "value", "stderr", "num_fewshot", "limit")
# append_records names a second file of one step ...-s{step}-1.parquet (it sorts first)
_WRITTEN = re.compile(r"part-a\d+-s\d+(?:-(\d+))?\.parquet$")
HOW = (
    "`yoto eval {run} --tasks stdlib_cloze,stdlib_next_line` scores its newest checkpoint "
    "(`--step N` another); `--set eval.harness.every=N` on `yoto train` scores checkpoints "
    "while it trains."
)


# --- loading --------------------------------------------------------------------------------


def evals_print(run: Path) -> tuple:
    """The run's fingerprint and its evals/ folder's (the cache key of its scores)."""
    folder = run / runstore.EVALS
    names = os.listdir(folder) if folder.is_dir() else []
    return (*ui.fp(run), (runstore.EVALS, len(names), max(names, default="")))


def evals_frame(run: Path) -> tuple[pd.DataFrame, tuple[str, ...]] | None:
    """Every evaluation row of a run with ``tokens`` (at its step; NaN when the metrics
    lack it), ``branch`` (surviving or abandoned) and ``written`` (the order of rows of one
    step); None without an evals/ table. Also the damaged segments left out."""
    t = data.table(run, runstore.EVALS)
    if t is None:
        return None
    have = set(t.columns())
    got = t.df(
        "SELECT *, filename AS _file, file_row_number AS _row FROM read_parquet($files, "
        "union_by_name = true, filename = true, file_row_number = true)"
    )
    for col in COLUMNS:
        if col not in have:
            got[col] = None
    if "backend" not in have:
        got["backend"] = ""
    got = got.dropna(subset=["task", "metric", "value"])
    got["written"] = [
        int(m.group(1) or 0) if (m := _WRITTEN.search(f)) else 0 for f in got["_file"]
    ]
    got = got.astype({"attempt": "int64", "step": "int64", "value": "float64"})
    got["stderr"] = pd.to_numeric(got.stderr, errors="coerce")
    got = got.sort_values(["attempt", "step", "written", "_row"], kind="stable")
    firsts, tokens = _metrics_at(run, sorted(set(got.step.astype(int))))
    got["tokens"] = [tokens(a, s) for a, s in zip(got.attempt, got.step, strict=True)]
    got["branch"] = [
        charts.ABANDONED if s >= _cut(firsts, a) else charts.SURVIVING
        for a, s in zip(got.attempt, got.step, strict=True)
    ]
    keep = [*COLUMNS, "backend", "written", "tokens", "branch"]
    return got[keep].reset_index(drop=True), t.damaged


def _cut(firsts: dict[int, int], attempt: int) -> float:
    """The step from which the attempt's rows were re-trained by a later one (query.cutoffs)."""
    later = [first for a, first in firsts.items() if a > attempt]
    return min(later) if later else math.inf


def _metrics_at(run: Path, steps: list[int]):
    """Each attempt's first step, and tokens(attempt, step) from the metrics table."""
    m = data.table(run, runstore.METRICS)
    if m is None or not steps:
        return {}, lambda a, s: math.nan
    firsts = data.firsts(m)
    found: dict[int, dict[int, float]] = {}  # step -> attempt -> tokens
    if TOKENS in m.columns():
        rows = m.between(min(steps), max(steps)).df(
            f"SELECT attempt, step, {query.quote(TOKENS)} AS tokens FROM {{src}} "
            f"WHERE list_contains($steps, step) AND isfinite({query.quote(TOKENS)})",
            {"steps": steps},
        )
        for a, s, tok in zip(rows.attempt, rows.step, rows.tokens, strict=True):
            found.setdefault(int(s), {})[int(a)] = float(tok)

    def tokens(attempt: int, step: int) -> float:
        on_line = [b for b in found.get(int(step), {}) if b <= attempt]
        return found[int(step)][max(on_line)] if on_line else math.nan

    return firsts, tokens


@st.cache_data(show_spinner=False, max_entries=64)
def cached_evals(run: str, key: tuple):
    return evals_frame(Path(run))


def newest(frame: pd.DataFrame) -> pd.DataFrame:
    """Each (run, task, metric, n-shot)'s row of the newest step, ties to the highest
    attempt, then to the row written last."""
    order = frame.sort_values(["step", "attempt", "written"], kind="stable")
    return order.groupby(["run", "task", "metric", "num_fewshot"], dropna=False).tail(1)


# --- the page -----------------------------------------------------------------------------


def render() -> None:
    st.title("Evals")
    st.caption(
        "Few-shot scores (`yoto eval`, in-loop `eval.harness`) against the tokens each run "
        "had trained on at the evaluated step; bars: ±1 standard error."
    )
    if ui.no_runs_message():
        return
    runs = [str(p) for p in data.run_dirs()]
    frame = ui.runs_table()
    names = {r.path: f"{r.name or r.run} ({Path(r.path).name})" for r in frame.itertuples()}
    with_evals = [p for p in runs if runstore.segment_files(p, runstore.EVALS)]
    default = [p for p in st.session_state.get(ui.COMPARE, []) if p in runs] or with_evals[:4]
    if not default:
        default = [st.session_state.get(ui.RUN) or runs[0]]

    def keep() -> None:
        st.session_state[ui.COMPARE] = st.session_state["evals_pick"]

    picked = st.multiselect(
        "runs",
        runs,
        default=[p for p in default if p in runs],
        format_func=lambda p: names.get(p, p),
        key="evals_pick",
        on_change=keep,
        help="the runs side by side (the rows selected on Runs, or those with evaluations)",
    )
    left, right = st.columns(2)
    axis = left.radio("x axis", [BY_TOKENS, BY_STEP], horizontal=True, key="evals_x")
    abandoned = right.toggle(
        "show abandoned branches",
        value=False,
        key="evals_abandoned",
        help="scores of checkpoints whose steps a later attempt re-trained after a rollback",
    )
    if not picked:
        st.info("Pick runs (or select rows on the Runs page).")
        return
    parts = []
    for run in picked:
        name = names.get(run, run)
        got = cached_evals(run, evals_print(Path(run)))
        if got is None or got[0].empty:
            st.info(f"{name}: no few-shot evaluations recorded. " + HOW.format(run=run))
            continue
        ui.damaged_note(got[1])
        parts.append(got[0].assign(run=name))
    if not parts:
        return
    rows = pd.concat(parts, ignore_index=True)
    hidden = rows[rows.branch == charts.ABANDONED]
    if not abandoned:
        rows = rows[rows.branch == charts.SURVIVING]
        if len(hidden):
            st.caption(
                f"{len(hidden)} score(s) on abandoned branches hidden (checkpoints whose "
                "steps a later attempt re-trained): **show abandoned branches** draws them."
            )
    if rows.empty:
        return
    chart_view(rows, axis)
    table_view(rows, abandoned and len(hidden) > 0)


def chart_view(rows: pd.DataFrame, axis: str) -> None:
    cols = st.columns(3)
    tasks = sorted(rows.task.unique())
    task = cols[0].selectbox("task", tasks, key="evals_task")
    of_task = rows[rows.task == task]
    metric = cols[1].selectbox("metric", sorted(of_task.metric.unique()), key="evals_metric")
    part = of_task[of_task.metric == metric]
    shots = sorted(int(n) for n in part.num_fewshot.dropna().unique())
    if len(shots) > 1:
        n = cols[2].selectbox("n-shot", shots, key="evals_shots")
        part = part[part.num_fewshot == n]
    x = "tokens" if axis == BY_TOKENS else "step"
    part = part.assign(x=part[x].astype(float))
    missing = part[part.x.isna()]
    part = part.dropna(subset=["x"])
    higher = SCORE_METRICS.get(metric, (None,))[0]
    better = {True: " (higher is better)", False: " (lower is better)"}.get(higher, "")
    st.subheader(f"{task} · {metric}{better}")
    if missing.size:
        st.caption(
            f"{len(missing)} score(s) left out: no {TOKENS} in the metrics at their step "
            "(pick the optimizer step axis to see them)."
        )
    if part.empty:
        return
    x_title = "training tokens at the evaluated step" if x == "tokens" else "optimizer step"
    st.altair_chart(score_chart(part, x_title, metric), width="stretch")


def score_chart(part: pd.DataFrame, x_title: str, metric: str) -> alt.LayerChart:
    """A line per run (and per abandoned piece), a point per score, ±stderr bars."""
    err = part.stderr.where(part.stderr.abs() < math.inf)  # NaN: no bar
    frame = part.assign(
        lo=part.value - err,
        hi=part.value + err,
        piece=part.run + " a" + part.attempt.astype(str).where(part.branch != charts.SURVIVING, "")
        + part.branch,
    )[["run", "piece", "branch", "attempt", "step", "tokens", "x", "value", "stderr", "lo", "hi",
       "num_fewshot", "limit"]]  # fmt: skip
    runs = list(dict.fromkeys(frame.run))
    color = alt.Color("run:N", title="run", scale=alt.Scale(domain=runs, scheme="tableau10"))
    tooltip = [
        alt.Tooltip("run:N"),
        alt.Tooltip("step:Q"),
        alt.Tooltip("attempt:Q"),
        alt.Tooltip("branch:N"),
        alt.Tooltip("tokens:Q", format=",.0f"),
        alt.Tooltip("value:Q", title=metric, format=".4g"),
        alt.Tooltip("stderr:Q", format=".3g"),
        alt.Tooltip("num_fewshot:Q", title="n-shot"),
    ]
    base = alt.Chart(frame).encode(
        x=alt.X("x:Q", title=x_title),
        y=alt.Y("value:Q", title=metric, scale=alt.Scale(zero=False)),
        color=color,
    )
    dash = alt.StrokeDash(
        "branch:N",
        scale=charts.BRANCH_DASH,
        title="branch",
        legend=alt.Legend() if frame.branch.nunique() > 1 else None,
    )
    zoom = alt.selection_interval(bind="scales", encodings=["x"])
    layers = [
        base.mark_line(strokeWidth=1.4).encode(detail="piece:N", strokeDash=dash).add_params(zoom),
        base.transform_filter("isValid(datum.lo)")
        .mark_rule(strokeWidth=1.2)
        .encode(y="lo:Q", y2="hi:Q", tooltip=tooltip),
        base.transform_filter(alt.datum.branch == charts.SURVIVING)
        .mark_point(filled=True, size=40, opacity=1)
        .encode(tooltip=tooltip),
    ]
    if (frame.branch == charts.ABANDONED).any():  # hollow, as a branch that was undone
        layers.append(
            base.transform_filter(alt.datum.branch == charts.ABANDONED)
            .mark_point(filled=False, size=50, opacity=1, strokeWidth=1.5)
            .encode(tooltip=tooltip)
        )
    return alt.layer(*layers).properties(height=320)


def table_view(rows: pd.DataFrame, with_branch: bool) -> None:
    st.subheader("Newest scores")
    table = newest(rows).sort_values(["run", "task", "metric", "num_fewshot"])
    table = table.assign(
        limit=table["limit"].where(table["limit"].fillna(-1).astype(float) >= 0)
    ).rename(columns={"num_fewshot": "n-shot", "limit": "examples"})
    cols = ["run", "task", "metric", "value", "stderr", "step", "attempt"]
    cols += [*(["branch"] if with_branch else []), "tokens", "n-shot", "examples", "backend"]
    st.dataframe(
        table[cols],
        hide_index=True,
        width="stretch",
        column_config={
            "value": st.column_config.NumberColumn(format="%.4f"),
            "stderr": st.column_config.NumberColumn(format="%.4f"),
            "tokens": st.column_config.NumberColumn(format="compact"),
            "examples": st.column_config.NumberColumn(help="limit of examples; empty: all"),
        },
    )
    st.caption(
        "Each run's newest evaluated step per task, metric and n-shot (ties: the highest "
        "attempt, then the row written last), among the rows shown above."
    )


ui.guarded(render)
