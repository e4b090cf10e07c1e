"""Timeline: loss and grad norm with every event marked, each attempt in its own colour;
below them the context length when it changed (a sequence warmup, a rewarming rollback).

A run with a rollback opens on its first incident: the steps from the checkpoint the run
went back to until just past the rollback, so the spike that caused it and the abandoned
branch are in plain view; "whole run" shows everything.
"""

from pathlib import Path

import streamlit as st

from yoto import catalog
from yoto.dashboards.postmortem import charts, data, downsample, incidents, ui

LOSS, GNORM, SEQ = catalog.TRAIN_LOSS.name, catalog.GRAD_NORM.name, catalog.SEQ_LEN.name
WHOLE_RUN = "whole run"
BRANCHES = (charts.SURVIVING, charts.ABANDONED)


def pick_view(events) -> tuple[int, int] | None:
    """The step window to show: an incident's (the first by default), or None for all."""
    found = incidents.incidents(events)
    if not found:
        return None
    options = [*range(len(found)), WHOLE_RUN]
    choice = st.selectbox(
        "show",
        options,
        index=0,
        format_func=lambda i: WHOLE_RUN if i == WHOLE_RUN else found[i].label(),
        key="timeline_view",
        help="an incident: from the checkpoint the run went back to until just past the "
        "rollback; zoom and pan with the mouse",
    )
    return None if choice == WHOLE_RUN else found[choice].window


def render(run: Path) -> None:
    fp = ui.fp(run)
    events = data.cached_events(str(run), fp)
    window = pick_view(events)
    got = data.cached_series(str(run), fp, (LOSS, GNORM, SEQ), "step", BRANCHES, window)
    if got is None or got[0].empty:
        ui.no_data("metrics")
    else:
        frame, _, damaged = got
        ui.damaged_note(damaged)
        marks = charts.markers(events)
        log = st.toggle("log scale", value=False, key="timeline_log")
        for key, pick in ((LOSS, "loss_event"), (GNORM, "gnorm_event"), (SEQ, "seq_event")):
            part = frame[frame.series == key]
            if part.empty or (key == SEQ and part.value.nunique() < 2):
                continue  # a constant context length needs no chart
            chart = charts.timeline(
                part,
                marks,
                "optimizer step",
                charts.title(key),
                log_y=log,
                domain=window,
                pick=pick,
            )
            st.markdown(f"**{charts.title(key)}**")
            state = st.altair_chart(
                chart,
                width="stretch",
                on_select="rerun",
                key=f"chart_{pick}",
            )
            show_picked(state, pick, events)
        note = f"Each series ≤ {downsample.MAX_POINTS:,} points (MinMaxLTTB)."
        if (frame.branch == charts.ABANDONED).any():
            note = (
                "Solid: the surviving branch. Dashed, with its points: abandoned branches "
                "(the steps an attempt took before a rollback undid them), in the colour "
                "of their attempt. " + note
            )
        st.caption("Triangles above each chart: the events (click one for its details). " + note)
    events_table(events)


def show_picked(state, pick: str, events) -> None:
    chosen = (state.get("selection") or {}).get(pick) if state else None
    for item in chosen or []:
        if "id" in item and int(item["id"]) in events.index:
            detail(events.loc[int(item["id"])])


def detail(event) -> None:
    with st.container(border=True):
        st.markdown(
            f"**{event.kind}** at step {event.step} (attempt {event.attempt}, {event.severity})"
        )
        st.write(event.message)
        st.json(event.data, expanded=False)


def events_table(events) -> None:
    st.subheader("Events")
    if events.empty:
        st.info("No events recorded yet.")
        return
    kinds = sorted(events.kind.unique())
    default = [k for k in kinds if k in charts.MARKED] or kinds
    # keyed on the kinds present: a kind that first appears in a live run (its first
    # alert, say) is shown on the next rerun instead of being left out of a kept choice
    show = st.multiselect("kinds", kinds, default=default, key=f"timeline_kinds:{','.join(kinds)}")
    view = events[events.kind.isin(show)]
    state = st.dataframe(
        view.drop(columns=["data"]),
        key="timeline_events",
        on_select="rerun",
        selection_mode="single-row",
        width="stretch",
        hide_index=True,
    )
    rows = state.selection.rows if state else []
    if rows:
        detail(view.iloc[rows[0]])
    else:
        st.caption("Select an event (here or on a chart) to see its details.")


ui.page("Timeline", render, "What happened, and when: loss and gradient norm with every event.")
