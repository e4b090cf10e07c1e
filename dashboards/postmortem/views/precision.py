"""Precision: loss scale, overflow steps, gradient underflow, activation headroom per layer."""

from pathlib import Path

import streamlit as st

from yoto import catalog
from yoto.dashboards.postmortem import charts, data, layers, ui

SCALE = catalog.LOSS_SCALE.name
OVERFLOWS = catalog.OVERFLOW_STEPS.name
UNDERFLOW = catalog.GRAD_UNDERFLOW.name
HEADROOM = catalog.ACTIVATION_HEADROOM.name


def render(run: Path) -> None:
    fp = ui.fp(run)
    got = data.cached_series(str(run), fp, (SCALE, OVERFLOWS, UNDERFLOW), "step")
    if got is None:
        ui.no_data("metrics")
    else:
        frame, _, damaged = got
        ui.damaged_note(damaged)
        for key, log, missing in (
            (SCALE, True, "No loss scale: not an fp16 run."),
            (OVERFLOWS, False, "No overflow count recorded."),
            (UNDERFLOW, False, "No gradient underflow recorded."),
        ):
            part = frame[frame.series == key]
            if part.empty:
                st.info(missing)
                continue
            st.markdown(f"**{charts.title(key)}**")
            st.altair_chart(
                charts.lines(
                    part, "optimizer step", charts.title(key), log_y=log, height=200, zero=True
                ),
                width="stretch",
            )
        overflow = frame[frame.series == OVERFLOWS]
        if not overflow.empty:
            st.metric("overflow steps (surviving branch)", int(overflow.value.max()))
    st.subheader("Activation headroom per layer")
    heat = data.cached_heatmap(str(run), fp, HEADROOM, None)
    if heat is None or heat.empty:
        ui.no_data("activation headroom")
        return
    order = layers.layer_order(sorted(heat.layer.unique()))
    st.altair_chart(charts.heatmap(heat, order, charts.title(HEADROOM)), width="stretch")
    st.caption(
        "log2(dtype max / activation |max|) at each block's output, the least headroom in "
        "each cell: below ~2 bits a block is close to overflowing its dtype."
    )


ui.page("Precision", render)
