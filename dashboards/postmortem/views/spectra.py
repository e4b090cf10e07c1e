"""Spectra: weightwatcher alpha per layer over time, and one matrix's eigenvalue spectrum.

The healthy band drawn is the run's own (its config.yaml), so a run trained with a custom
band is judged by the band its probe warned on."""

from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from yoto.dashboards.postmortem import data, ui


def render(run: Path) -> None:
    fp = ui.fp(run)
    frame = data.cached_spectra(str(run), fp)
    if frame is None or frame.empty:
        ui.no_data("weight spectra (probes.spectra, or `yoto spectra RUN --step S`)")
        return
    st.subheader("alpha per matrix over time")
    cfg = data.cached_config(str(run), fp)
    band = data.alpha_band(cfg.data)
    if band.problem:
        st.warning(band.problem)
    edges = pd.DataFrame({"y": [band.low, band.high]})
    alpha = (
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=alt.X("step:Q", title="optimizer step (weights analysed)"),
            y=alt.Y("alpha:Q", title="power-law alpha (dimensionless)"),
            color=alt.Color("layer:N", title="matrix"),
            tooltip=["layer:N", "step:Q", "attempt:Q", alt.Tooltip("alpha:Q", format=".3f")],
        )
        .add_params(alt.selection_point(fields=["layer"], bind="legend"))
    )
    rules = alt.Chart(edges).mark_rule(strokeDash=[4, 3], color="gray").encode(y="y:Q")
    st.altair_chart((alpha + rules).properties(height=320).interactive(), width="stretch")
    whose = "the default, config.yaml unreadable" if cfg.problem else "this run's probes.spectra"
    st.caption(
        f"Healthy band {band.low:g} ≤ alpha ≤ {band.high:g} (dashed; {whose}): "
        "below is over-trained / heavy-tailed, above under-trained."
    )

    st.subheader("Eigenvalue spectrum")
    c1, c2 = st.columns(2)
    layer = c1.selectbox("matrix", sorted(frame.layer.unique()), key="spectra_layer")
    steps = sorted(frame[frame.layer == layer].step.unique())
    step = c2.selectbox("step", steps, index=len(steps) - 1, key="spectra_step")
    evals = np.asarray(data.cached_eigenvalues(str(run), fp, layer, int(step)))
    evals = evals[evals > 0]
    if evals.size == 0:
        st.info("No eigenvalues stored for this matrix and step.")
        return
    row = frame[(frame.layer == layer) & (frame.step == step)].iloc[-1]
    edges = np.logspace(np.log10(evals.min()), np.log10(evals.max()), 40)
    counts, _ = np.histogram(evals, bins=edges)
    hist = pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "count": counts})
    bars = (
        alt.Chart(hist)
        .mark_bar()
        .encode(
            x=alt.X("lo:Q", title="eigenvalue λ of WᵀW (log scale)", scale=alt.Scale(type="log")),
            x2="hi:Q",
            y=alt.Y("count:Q", title="eigenvalues per bin"),
            y2=alt.datum(0),  # ranged in x: the bar must be told to start at zero
            tooltip=[alt.Tooltip("lo:Q", format=".3g"), alt.Tooltip("hi:Q", format=".3g"), "count"],
        )
    )
    chart = bars
    xmin = row.get("xmin")
    if xmin is not None and np.isfinite(xmin) and xmin > 0:
        chart = bars + alt.Chart(
            pd.DataFrame({"x": [xmin], "what": ["xmin (power-law fit)"]})
        ).mark_rule(color="red", strokeDash=[4, 3]).encode(
            x="x:Q", tooltip=["what:N", alt.Tooltip("x:Q", format=".3g")]
        )
    st.altair_chart(
        chart.properties(
            height=300,
            title=f"{layer} at step {step}: alpha {row.alpha:.2f}, {evals.size} eigenvalues",
        ),
        width="stretch",
    )


ui.page("Spectra", render, "weightwatcher's view of each weight matrix.")
