"""Compare: several runs on one axis (tokens, or the approximate compute C ≈ 6·N·D of
scaling laws): train loss and val loss per source."""

from pathlib import Path

import pandas as pd
import streamlit as st

from yoto import catalog, runstore
from yoto.dashboards.postmortem import charts, data, ui
from yoto.errors import RunDirError
from yoto.scaling.laws import COMPUTE_6ND_LABEL, compute_6nd

TOKENS = catalog.TOKENS.name
BY_TOKENS = "tokens"
BY_COMPUTE_6ND = "approximate compute (6·N·D)"


def non_embedding_parameters(run: Path) -> float | None:
    """N from the run's manifest (what ``yoto train`` recorded), or None."""
    try:
        n = runstore.read_manifest(run).get("non_embedding_parameters")
    except (RunDirError, OSError, ValueError, TypeError):
        return None
    return float(n) if n else None


def render() -> None:
    st.title("Compare")
    if ui.no_runs_message():
        return
    runs = [str(p) for p in data.run_dirs()]
    frame = ui.runs_table()
    names = {r.path: f"{r.name or r.run} ({Path(r.path).name})" for r in frame.itertuples()}
    default = [p for p in st.session_state.get(ui.COMPARE, []) if p in runs] or runs[:4]

    def keep() -> None:
        st.session_state[ui.COMPARE] = st.session_state["compare_pick"]

    picked = st.multiselect(
        "runs",
        runs,
        default=default,
        format_func=lambda p: names.get(p, p),
        key="compare_pick",
        on_change=keep,
    )
    axis = st.radio("x axis", [BY_TOKENS, BY_COMPUTE_6ND], horizontal=True, key="cmp_x")
    if not picked:
        st.info("Pick runs to compare (or select rows on the Runs page).")
        return
    parts = []
    for run in picked:
        path = Path(run)
        got = data.cached_series(run, ui.fp(path), _columns(path), TOKENS)
        if got is None or got[0].empty:
            st.info(f"{names.get(run, run)}: no metrics recorded yet.")
            continue
        part = got[0].assign(run=names.get(run, run))
        if axis == BY_COMPUTE_6ND:
            n = non_embedding_parameters(path)
            if n is None:
                st.warning(f"{names.get(run, run)}: no parameter count in its manifest.")
                continue
            part = part.assign(x=compute_6nd(n, part.x))
        parts.append(part)
    if not parts:
        return
    all_ = pd.concat(parts, ignore_index=True)
    x_title = "training tokens" if axis == BY_TOKENS else COMPUTE_6ND_LABEL
    for key_name, heading in (
        (catalog.TRAIN_LOSS.name, "train loss"),
        (catalog.VAL_LOSS.name, "val loss"),
    ):
        part = all_[all_.series.str.startswith(key_name)]
        if part.empty:
            continue
        part = part.assign(source=part.series.map(charts.title))
        st.subheader(heading)
        st.altair_chart(
            charts.lines(part, x_title, "cross-entropy (nats)", color="run", color_title="run")
            .encode(strokeDash="source:N" if heading == "val loss" else "branch:N")
            .properties(height=320),
            width="stretch",
        )


def _columns(run: Path) -> tuple[str, ...]:
    t = data.table(run, runstore.METRICS)
    cols = t.columns() if t else []
    return (catalog.TRAIN_LOSS.name, *[c for c in cols if c.startswith(catalog.VAL_LOSS.name)])


ui.guarded(render)
