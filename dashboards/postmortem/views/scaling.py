"""Scaling: the runs against a fitted scaling law, and what size of model a run performs
like (its effective size). The fits are yoto.scaling's, the same as ``yoto scaling fit``;
the metric is the validation loss or a few-shot score (``--metric eval:TASK/METRIC``),
whose effective size by score stands beside the one by loss."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import streamlit as st

from yoto.dashboards.postmortem import data, ui
from yoto.dashboards.postmortem import scaling_charts as charts
from yoto.errors import RunDirError
from yoto.scaling import runs as sr
from yoto.scaling.laws import (
    COMPUTE_6ND_LABEL,
    LAW_NAMES,
    PARAMETER_COUNT,
    Point,
    ScalingError,
    fmt_count,
)

LAWS = {
    "auto": "auto (Chinchilla when D varies enough)",
    "kaplan": "Kaplan L(N)",
    "chinchilla": "Chinchilla L(N, D)",
    "floor": "floor E + A/N^α",
}
ALL_RUNS = "(all runs)"


@st.cache_data(show_spinner=False, max_entries=64)
def read_records(paths: tuple[str, ...], prints: tuple) -> tuple[list, list[str]]:
    """Run records for the fits, and the runs that could not be read (prints: cache key)."""
    records, bad = [], []
    for p in paths:
        try:
            records.append(sr.read_run(p))
        except (RunDirError, OSError, ValueError) as exc:
            bad.append(f"{Path(p).name}: {exc}")
    return records, bad


@st.cache_data(show_spinner="fitting…", max_entries=32)
def fit_points(points: tuple[tuple, ...], law: str, bootstrap: int):
    pts = [Point(n, d, loss, name) for n, d, loss, name in points]
    return sr.fit_points(pts, law, bootstrap)


@st.cache_data(show_spinner="fitting…", max_entries=32)
def fit_scores(
    paths: tuple[str, ...], prints: tuple, metric: str, law: str, bootstrap: int, source: str
):
    """The few-shot score's fit over these runs (``yoto scaling fit --metric``)."""
    records, _ = read_records(paths, prints)
    spec = sr.parse_metric(metric)
    assert spec is not None
    return sr.fit_scores(records, spec, law, bootstrap, loss_source=source)


def render() -> None:
    st.title("Scaling")
    st.caption(
        f"N = {PARAMETER_COUNT} parameters, D = training tokens, loss = final validation "
        "loss; compute is the approximation C ≈ 6·N·D. Bootstrap intervals resample the runs."
    )
    if ui.no_runs_message():
        return
    paths = tuple(str(p) for p in data.run_dirs())
    records, bad = read_records(paths, tuple(data.fingerprint(Path(p)) for p in paths))
    for line in bad:
        st.warning(f"Left out an unreadable run: {line}")
    usable = [r for r in records if r.val_loss and r.n and r.d]
    scored = [r for r in records if r.scores and r.n]  # few-shot scores (yoto eval)
    pool = usable + [r for r in scored if r not in usable]
    left_out = [r for r in records if r not in usable]
    if left_out:
        st.caption(
            f"{len(left_out)} run(s) without a validation loss, N or D are left out of the "
            "loss fit: " + ", ".join(r.name or r.id for r in left_out)
        )
    if not pool:
        st.info("No run has a validation loss yet: a fit needs finished runs of several sizes.")
        return

    selected = st.session_state.get(ui.RUN)
    chosen = next((r for r in pool if str(r.path) == selected), None)
    sweeps = sorted({r.sweep["id"] for r in pool if r.sweep})
    default = chosen.sweep["id"] if chosen is not None and chosen.sweep else None
    cols = st.columns(5)
    options = [*sweeps, ALL_RUNS]
    sweep = cols[0].selectbox(
        "runs",
        options,
        index=options.index(default) if default in options else 0,
        key="scaling_sweep",
        help="the runs of one sweep (yoto sweep), or every run found",
    )
    in_sweep = [r for r in pool if sweep == ALL_RUNS or (r.sweep or {}).get("id") == sweep]
    fitted = [r for r in in_sweep if r in usable]
    metric = cols[1].selectbox(
        "metric", [sr.VAL_LOSS, *sr.score_labels(in_sweep)], key="scaling_metric",
        format_func=lambda m: "validation loss" if m == sr.VAL_LOSS else m,
        help="fit the validation loss, or a few-shot score of yoto eval (its effective size "
        "by score beside the one by loss)",
    )  # fmt: skip
    sources = [sr.ALL, *sr.sources_of(fitted)] if len(sr.sources_of(fitted)) > 1 else [sr.ALL]
    source = cols[2].selectbox(
        "loss", sources, key="scaling_source",
        format_func=lambda s: "mean over sources" if s == sr.ALL else f"source {s}",
    )  # fmt: skip
    law = cols[3].selectbox("law", list(LAWS), format_func=LAWS.get, key="scaling_law")
    bootstrap = cols[4].number_input("bootstrap resamples", 0, 1000, 100, 50, key="scaling_boot")
    if metric != sr.VAL_LOSS:
        _render_scores(in_sweep, metric, law, int(bootstrap), source, chosen)
        return
    if not fitted:
        st.info("No run here has a validation loss yet: pick a few-shot metric, or other runs.")
        return

    points = sr.points_from_runs(fitted, source)
    key = tuple((p.n, p.d, p.loss, p.name) for p in points)
    try:
        result, why = fit_points(key, law, int(bootstrap))
    except ScalingError as exc:
        st.warning(f"No fit: {exc}")
        return

    frame = charts.points_frame(result, [str(r.path) for r in fitted])
    curves = charts.curves_frame(result, frame)
    st.subheader(f"{LAW_NAMES[result.law]} law ({why})")
    st.code(result.formula(), language=None)
    st.dataframe(_params_table(result), hide_index=True)
    if result.at_bounds():
        st.warning(
            f"{', '.join(result.at_bounds())} sit at the edge of the search box: these runs "
            "do not determine them (add model sizes or token budgets)."
        )

    highlight = str(chosen.path) if chosen is not None else None
    left, right = st.columns(2)
    with left:
        st.markdown("**Loss vs model size**")
        st.altair_chart(
            charts.loss_vs(frame, curves, "N", "non-embedding parameters N", highlight),
            width="stretch",
        )
    with right:
        st.markdown("**Loss vs approximate compute (6·N·D)**")
        st.altair_chart(
            charts.loss_vs(frame, curves, charts.C_6ND, COMPUTE_6ND_LABEL, highlight),
            width="stretch",
        )
    st.markdown("**Residuals** (the runs the law explains worst are the ones to look at)")
    st.altair_chart(charts.residuals(frame), width="stretch")

    _verdict(result, usable, chosen if chosen in usable else None, source)


def _render_scores(runs: list, metric: str, law: str, bootstrap: int, source: str, chosen) -> None:
    """The few-shot score's fit, its charts and the effective sizes by loss and by score."""
    paths = tuple(str(r.path) for r in runs)
    try:
        sf = fit_scores(
            paths, tuple(data.fingerprint(Path(p)) for p in paths), metric, law, bootstrap, source
        )
    except ScalingError as exc:
        st.warning(f"No fit: {exc}")
        return
    result = sf.fit
    st.subheader(f"{LAW_NAMES[result.law]} law ({sf.why}) on {metric}")
    st.caption(f"{sf.metric.describe()}; each run's final score (its newest evaluated step)")
    st.code(result.formula(), language=None)
    st.dataframe(_params_table(result), hide_index=True)
    for note in sf.notes:
        st.caption(f"Note: {note}")
    if result.at_bounds():
        st.warning(
            f"{', '.join(result.at_bounds())} sit at the edge of the search box: these runs "
            "do not determine them (add model sizes)."
        )
    frame = charts.points_frame(result, [str(r.path) for r in sf.runs])
    curves = charts.curves_frame(result, frame)
    highlight = str(chosen.path) if chosen is not None else None
    y_title = sf.metric.quantity if sf.metric.fitted != "error" else f"1 − {sf.metric.metric}"
    left, right = st.columns(2)
    with left:
        st.markdown(f"**{y_title} vs model size**")
        st.altair_chart(
            charts.loss_vs(frame, curves, "N", "non-embedding parameters N", highlight, y_title),
            width="stretch",
        )
    with right:
        st.markdown(f"**{y_title} vs approximate compute (6·N·D)**")
        st.altair_chart(
            charts.loss_vs(frame, curves, charts.C_6ND, COMPUTE_6ND_LABEL, highlight, y_title),
            width="stretch",
        )
    st.markdown("**Residuals** (log of observed / law)")
    st.altair_chart(charts.residuals(frame), width="stretch")
    st.subheader("Effective size by score and by loss")
    if sf.loss_fit is not None:
        st.caption(f"by loss: {LAW_NAMES[sf.loss_fit.law]} law, {sf.loss_fit.formula()}")
    else:
        st.caption(f"by loss: {sf.loss_why}")
    table = charts.effective_table(sf)
    st.dataframe(table.drop(columns="path"), hide_index=True)
    if sf.skipped:
        st.caption(
            f"{len(sf.skipped)} run(s) skipped: "
            + "; ".join(f"{r.name or r.id}: {why}" for r, why in sf.skipped)
        )
    pick = str(chosen.path) if chosen is not None and str(chosen.path) in paths else None
    row = next((r for r in sf.rows() if r["path"] == pick), None)
    if row is not None and row["effective_size"].finite:
        eff = row["effective_size"]
        st.markdown(
            f"**{row['name']}** performs like a {fmt_count(eff.value)}-parameter model on "
            f"{sf.metric.key} ({eff.value / row['N']:.2g}× its size)."
        )


def _params_table(result) -> pd.DataFrame:
    rows = []
    for k, v in result.params.items():
        iv = result.intervals.get(k)
        rows.append(
            {
                "parameter": k,
                "value": f"{v:.5g}",
                f"{result.confidence:.0%} interval": f"[{iv.low:.4g}, {iv.high:.4g}]"
                if iv
                else "-",
            }
        )
    return pd.DataFrame(rows)


def _verdict(result, usable: list, chosen, source: str) -> None:
    st.subheader("Effective size")
    names = {str(r.path): f"{r.name or r.id} ({fmt_count(r.n)})" for r in usable}
    options = list(names)
    index = options.index(str(chosen.path)) if chosen is not None else 0
    pick = st.selectbox(
        "run", options, index=index, format_func=names.get, key="scaling_judge",
        help="any run, in the fit or not: the law says what size of model reaches its loss",
    )  # fmt: skip
    run = next(r for r in usable if str(r.path) == pick)
    loss = run.loss(source)
    if loss is None:
        st.info(f"This run has no validation loss for {source}.")
        return
    eff = result.effective_size(loss, run.d)
    if not eff.finite:
        st.error(
            f"Loss {loss:.4f} at D = {fmt_count(run.d)} is at or below the law's floor "
            f"({result.floor(run.d):.4f}): no finite model size reaches it on these tokens; "
            "the law does not describe this run."
        )
        return
    if math.isnan(eff.value):
        st.warning("The fitted law does not fall with N, so it maps no loss to a size.")
        return
    c1, c2, c3 = st.columns(3)
    c1.metric("performs like", f"{fmt_count(eff.value)} params")
    c2.metric("its size (non-embedding)", f"{fmt_count(run.n)} params")
    c3.metric("ratio", f"{eff.value / run.n:.2f}×")
    st.markdown(f"**{run.name or run.id}** {sr.verdict(eff, run.n, result.law)}.")


ui.guarded(render)
