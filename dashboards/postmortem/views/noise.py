"""Gradient noise & batch: B_noise over tokens, with the batch size actually used."""

from pathlib import Path

import pandas as pd
import streamlit as st

from yoto import catalog
from yoto.dashboards.postmortem import charts, data, ui
from yoto.events import EventKind

GNS, BATCH = catalog.GRADIENT_NOISE_SCALE.name, catalog.BATCH_SIZE_TOKENS.name
TOKENS, SEQ = catalog.TOKENS.name, catalog.SEQ_LEN.name


def in_tokens(gns: pd.DataFrame, lengths: pd.DataFrame) -> pd.DataFrame:
    """B_noise (sequences) x the context length recorded nearest the same point of the
    same attempt (a sequence warmup changes it as the run goes)."""
    seq = lengths[["attempt", "x", "value"]].rename(columns={"value": "seq_len"})
    merged = pd.merge_asof(
        gns.sort_values("x"), seq.sort_values("x"), on="x", by="attempt", direction="nearest"
    )
    return merged.assign(value=merged.value * merged.seq_len).drop(columns="seq_len")


def render(run: Path) -> None:
    fp = ui.fp(run)
    got = data.cached_series(str(run), fp, (GNS, BATCH, SEQ), TOKENS)
    if got is None or got[0].empty:
        ui.no_data("token counts or batch sizes")
        return
    frame, _, damaged = got
    ui.damaged_note(damaged)
    cfg = data.cached_config(str(run), fp)
    seq = (cfg.data.get("model") or {}).get("seq_len")
    gns, lengths = frame[frame.series == GNS], frame[frame.series == SEQ]
    if gns.empty:
        st.info(
            "No gradient noise scale recorded: it needs a small and a big batch "
            "(gradient accumulation or several ranks); the batch used is drawn alone."
        )
    elif not lengths.empty:  # B_simple is in sequences, the batch in tokens: one axis
        gns = in_tokens(gns, lengths)
    elif seq:  # runs from before yoto_seq_len: the configured length throughout
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
    unit = "tokens" if seq or not lengths.empty or gns.empty else "sequences / tokens"
    chart = charts.lines(
        named, "training tokens consumed", f"batch ({unit})", log_y=True, color="series"
    )
    events = charts.markers(data.cached_events(str(run), fp))
    changes = events[events.kind == EventKind.BATCH_SIZE]
    st.altair_chart(chart, width="stretch")
    st.caption(
        "B_noise = tr(Σ)/|G|² (McCandlish et al.), EMA-smoothed, × the step's sequence "
        "length. "
        "Batches well below B_noise waste steps; far above it waste tokens."
    )
    if not changes.empty:
        st.subheader("Batch changes")
        st.dataframe(changes[["step", "attempt", "message"]], hide_index=True, width="stretch")


ui.page("Gradient noise & batch", render)
