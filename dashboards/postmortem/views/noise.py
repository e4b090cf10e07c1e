"""Gradient noise & batch: B_noise over tokens, with the batch size actually used."""

from pathlib import Path

import pandas as pd
import streamlit as st

from yoto import catalog
from yoto.dashboards.postmortem import charts, data, ui
from yoto.events import EventKind

GNS, BATCH = catalog.GRADIENT_NOISE_SCALE.name, catalog.BATCH_SIZE_TOKENS.name
TOKENS = catalog.TOKENS.name


def render(run: Path) -> None:
    fp = ui.fp(run)
    got = data.cached_series(str(run), fp, (GNS, BATCH), TOKENS)
    if got is None or got[0].empty:
        ui.no_data("token counts or batch sizes")
        return
    frame, _, damaged = got
    ui.damaged_note(damaged)
    cfg = data.cached_config(str(run), fp)
    seq = (cfg.data.get("model") or {}).get("seq_len")
    gns = frame[frame.series == GNS]
    if gns.empty:
        st.info(
            "No gradient noise scale recorded: it needs a small and a big batch "
            "(gradient accumulation or several ranks); the batch used is drawn alone."
        )
    elif seq:
        # B_simple is in sequences; the batch is in tokens: one axis, tokens
        gns = gns.assign(value=gns.value * float(seq))
    else:
        why = "config.yaml could not be read" if cfg.problem else "config.yaml has no model.seq_len"
        st.warning(f"{why}: B_noise is drawn in sequences.")
    named = pd.concat(
        [
            gns.assign(series="B_noise (critical batch)"),
            frame[frame.series == BATCH].assign(series="batch used"),
        ]
    )
    unit = "tokens" if seq or gns.empty else "sequences / tokens"
    chart = charts.lines(
        named, "training tokens consumed", f"batch ({unit})", log_y=True, color="series"
    )
    events = charts.markers(data.cached_events(str(run), fp))
    changes = events[events.kind == EventKind.BATCH_SIZE]
    st.altair_chart(chart, width="stretch")
    st.caption(
        "B_noise = tr(Σ)/|G|² (McCandlish et al.), EMA-smoothed, × sequence length. "
        "Batches well below B_noise waste steps; far above it waste tokens."
    )
    if not changes.empty:
        st.subheader("Batch changes")
        st.dataframe(changes[["step", "attempt", "message"]], hide_index=True, width="stretch")


ui.page("Gradient noise & batch", render)
