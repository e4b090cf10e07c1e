"""Throughput: tokens/s, MFU and the distribution of step times."""

from pathlib import Path

import streamlit as st

from yoto import catalog
from yoto.dashboards.postmortem import charts, data, ui

TPS, MFU, DURATION = catalog.THROUGHPUT.name, catalog.MFU.name, catalog.STEP_DURATION.name


def render(run: Path) -> None:
    fp = ui.fp(run)
    got = data.cached_series(str(run), fp, (TPS, MFU), "step")
    if got is None or got[0].empty:
        ui.no_data("throughput")
        return
    frame, _, damaged = got
    ui.damaged_note(damaged)
    for key, missing in (
        (TPS, "No tokens/s recorded."),
        (MFU, "No MFU: the device's dense peak is unknown (CPU); set train.peak_tflops."),
    ):
        part = frame[frame.series == key]
        if part.empty:
            st.info(missing)
            continue
        st.altair_chart(
            charts.lines(part, "optimizer step", charts.title(key)).properties(
                title=charts.title(key)
            ),
            width="stretch",
        )
    hist, stats = data.cached_step_times(str(run), fp) or (None, {})
    if not stats:
        ui.no_data("step times")
        return
    st.subheader("Step time distribution")
    cols = st.columns(4)
    for col, name in zip(cols, ("p50", "p90", "p99", "max"), strict=True):
        col.metric(f"{name} step time", f"{stats[name] * 1000:.1f} ms")
    st.altair_chart(charts.histogram(hist, "step duration (s)"), width="stretch")
    st.caption(f"{int(stats['count']):,} steps (all attempts); edge bins hold the outliers.")


ui.page("Throughput", render)
