"""Layers: per-layer heatmaps (layer × step) and the first layer to go abnormal before a
spike (robust z-score against the layer's own trailing window; see ``layers.py``)."""

from pathlib import Path

import pandas as pd
import streamlit as st

from yoto import catalog
from yoto.dashboards.postmortem import charts, data, layers, ui
from yoto.events import EventKind

METRICS = [
    catalog.LAYER_GRAD_NORM.name,
    catalog.LAYER_UPDATE_RATIO.name,
    catalog.ATTENTION_LOGIT_MAX.name,
    catalog.ATTENTION_ENTROPY.name,
]


def spikes(events: pd.DataFrame) -> list[tuple[int, int, str]]:
    """(attempt, onset, label) of each spike episode, oldest first."""
    out: dict[tuple[int, int], str] = {}
    for e in events[events.kind == EventKind.SPIKE].itertuples():
        onset = int((e.data or {}).get("onset", e.step))
        out.setdefault((e.attempt, onset), f"step {onset} (attempt {e.attempt}): {e.message}")
    return [(a, s, label) for (a, s), label in sorted(out.items(), key=lambda kv: kv[0][1])]


def render(run: Path) -> None:
    fp = ui.fp(run)
    have = data.cached_layer_metrics(str(run), fp)
    options = [m for m in METRICS if m in have] or have
    if not options:
        ui.no_data("per-layer statistics")
        return
    episodes = spikes(data.cached_events(str(run), fp))
    left, right = st.columns([2, 1])
    with left:
        choice = st.selectbox(
            "spike",
            [None, *range(len(episodes))],
            index=1 if episodes else 0,
            format_func=lambda i: "none: the surviving branch" if i is None else episodes[i][2],
            key="layers_spike",
            help="the heatmaps show the branch the spike happened on",
        )
    lineage, onset = (None, None) if choice is None else episodes[choice][:2]
    found = None
    if onset is not None:
        found = data.cached_first_abnormal(str(run), fp, tuple(options), lineage, onset)
    with right:
        first = options.index(found.metric) if found and found.metric in options else 0
        metric = st.selectbox(
            "metric", options, index=first, format_func=charts.title, key="layers_metric"
        )
    heat = data.cached_heatmap(str(run), fp, metric, lineage)
    if heat is None or heat.empty:
        ui.no_data(charts.title(metric))
        return
    highlight = None
    if onset is not None and found is None:
        st.info(
            f"No layer was abnormal (|robust z| > {layers.Z_LIMIT} in "
            + ", ".join(map(charts.title, options))
            + f") in the {layers.LOOKBACK} recorded steps up to the spike at step {onset}."
        )
    elif found is not None:
        st.warning(found.describe().replace(found.metric, charts.title(found.metric)))
        highlight = heat[
            (heat.layer == found.layer) & (heat.step0 <= found.step) & (heat.step1 >= found.step)
        ]
    order = layers.layer_order(sorted(heat.layer.unique()))
    log = metric != catalog.ATTENTION_ENTROPY.name
    st.altair_chart(
        charts.heatmap(heat, order, charts.title(metric), log, highlight, onset),
        width="stretch",
    )
    st.caption(
        f"Each cell: the {'lowest' if metric in layers.LOW_IS_BAD else 'highest'} value in its "
        f"step range; ≤ {layers.MAX_CELLS:,} cells per chart. Red outline: the first layer "
        f"to go abnormal, |0.6745·(x − median)/MAD| > {layers.Z_LIMIT} against the "
        f"layer's previous {layers.WINDOW} recorded values of any metric listed above."
    )


ui.page("Layers", render, "Which layer moved first?")
