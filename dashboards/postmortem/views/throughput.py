"""Throughput: tokens/s, MFU, the distribution of step times, every rank's own step time
and data wait (with the straggler events), and the system's memory and GPU readings."""

from pathlib import Path

import pandas as pd
import streamlit as st

from yoto import catalog
from yoto.dashboards.postmortem import charts, data, ui
from yoto.events import EventKind

TPS, MFU, DURATION = catalog.THROUGHPUT.name, catalog.MFU.name, catalog.STEP_DURATION.name
RANK_STEP, RANK_WAIT = catalog.RANK_STEP.name, catalog.RANK_DATA_WAIT.name
MEDIAN = catalog.RANK_MEDIAN_STEP.name
# (heading, series): rank 0's system health, one chart each when recorded
SYSTEM = (
    ("Host memory (RSS)", (catalog.PROCESS_RSS.name,)),
    (
        "CUDA memory",
        (catalog.CUDA_ALLOCATED.name, catalog.CUDA_RESERVED.name, catalog.CUDA_PEAK.name),
    ),
    ("CUDA allocation retries", (catalog.CUDA_ALLOC_RETRIES.name,)),
    ("GPU power", (catalog.GPU_POWER.name,)),
    ("GPU temperature", (catalog.GPU_TEMPERATURE.name,)),
    ("GPU utilisation", (catalog.GPU_UTILIZATION.name,)),
    ("GPU SM clock", (catalog.GPU_SM_CLOCK.name,)),
)


def render(run: Path) -> None:
    fp = ui.fp(run)
    got = data.cached_series(str(run), fp, (TPS, MFU), "step")
    if got is None or got[0].empty:
        ui.no_data("throughput")
        return
    frame, columns, damaged = got
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
    else:
        st.subheader("Step time distribution")
        cols = st.columns(4)
        for col, name in zip(cols, ("p50", "p90", "p99", "max"), strict=True):
            col.metric(f"{name} step time", f"{stats[name] * 1000:.1f} ms")
        st.altair_chart(charts.histogram(hist, "step duration (s)"), width="stretch")
        st.caption(f"{int(stats['count']):,} steps (all attempts); edge bins hold the outliers.")
    _ranks(run, fp, columns)
    _system(run, fp)


def _per_rank(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    part = frame[frame.series.str.startswith(name + "{")]
    ranks = part.series.map(lambda key: catalog.parse_series_key(key)[1].get("rank", "?"))
    return part.assign(rank=ranks)


def _ranks(run: Path, fp: tuple, columns: tuple[str, ...]) -> None:
    """Every recorded rank's own step time and data wait per interval, the median, and
    the straggler events."""
    st.subheader("Ranks")
    keys = tuple(c for c in columns if c.startswith((RANK_STEP + "{", RANK_WAIT + "{")))
    got = data.cached_series(str(run), fp, (*keys, MEDIAN), "step") if keys else None
    if got is None or got[0].empty:
        st.info("No per-rank timings recorded (probes.system off, or no interval reached).")
        return
    frame = got[0]
    step_times = _per_rank(frame, RANK_STEP)
    median = frame[frame.series == MEDIAN].assign(rank="median")
    st.altair_chart(
        charts.lines(
            pd.concat([step_times, median], ignore_index=True),
            "optimizer step",
            charts.title(RANK_STEP),
            color="rank",
            color_title="rank",
            zero=True,
        ).properties(title="Own step time per rank (batch fetch and forward passes)"),
        width="stretch",
    )
    waits = _per_rank(frame, RANK_WAIT)
    if not waits.empty:
        st.altair_chart(
            charts.lines(
                waits, "optimizer step", charts.title(RANK_WAIT), color="rank", color_title="rank"
            ).properties(title="Data wait per rank", height=200),
            width="stretch",
        )
    events = data.cached_events(str(run), fp)
    slow = events[events.kind == str(EventKind.STRAGGLER)]
    if slow.empty:
        st.caption("No straggler: no rank stayed slower than the median by the margin.")
        return
    st.dataframe(slow[["step", "attempt", "severity", "message"]], hide_index=True, width="stretch")


def _system(run: Path, fp: tuple) -> None:
    """Rank 0's process and device memory and GPU readings, as recorded every step."""
    st.subheader("System (rank 0)")
    wanted = tuple(key for _, keys in SYSTEM for key in keys)
    got = data.cached_series(str(run), fp, wanted, "step")
    if got is None or got[0].empty:
        st.info("No system health recorded.")
        return
    frame, shown = got[0], 0
    for heading, keys in SYSTEM:
        part = frame[frame.series.isin(keys)]
        if part.empty:
            continue
        shown += 1
        st.altair_chart(
            charts.lines(part, "optimizer step", charts.title(keys[0]), height=180).properties(
                title=heading
            ),
            width="stretch",
        )
    if shown == 1:
        st.caption(
            "CUDA memory and GPU readings appear on CUDA runs (GPU readings need "
            "pip install 'yoto[gpu]')."
        )


ui.page("Throughput", render)
