"""Timeline: loss and grad norm with every event marked, each attempt in its own colour;
below them the context length when it changed (a sequence warmup, a rewarming rollback).

A run with a rollback opens on its first incident: the steps from the checkpoint the run
went back to until just past the rollback, so the spike that caused it and the abandoned
branch are in plain view; "whole run" shows everything. Under an incident's charts, its
evidence: the replay diagnosis (why it spiked, with the trajectories it compared) and the
onset batch's suspect sequences (highest loss first, with the batch's tokens per source).
"""

from pathlib import Path

import streamlit as st

from yoto import catalog
from yoto.dashboards.postmortem import charts, data, downsample, incidents, ui
from yoto.events import EventKind, describe_ranks

LOSS, GNORM, SEQ = catalog.TRAIN_LOSS.name, catalog.GRAD_NORM.name, catalog.SEQ_LEN.name
WHOLE_RUN = "whole run"
BRANCHES = (charts.SURVIVING, charts.ABANDONED)


def pick_view(events) -> incidents.Incident | None:
    """The incident to show (the first by default), or None for the whole run."""
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
    return None if choice == WHOLE_RUN else found[choice]


def render(run: Path) -> None:
    fp = ui.fp(run)
    events = data.cached_events(str(run), fp)
    incident = pick_view(events)
    window = incident.window if incident else None
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
    if incident is not None:
        evidence(events, incident)
    events_table(events)


def evidence(events, incident: incidents.Incident) -> None:
    """Why the incident's spike happened and what it trained on (trainer/diagnose.py)."""
    verdict = incidents.diagnosis(events, incident)
    found = incidents.forensics(events, incident)
    if not verdict and not found:
        return
    st.subheader(f"The spike from step {incident.onset}")
    if verdict:
        diagnosis_view(verdict, incident.onset)
    if found:
        forensics_view(found)


def diagnosis_view(verdict, onset: int) -> None:
    """The replay's verdict beside the trajectories it compared (the rollback's short form
    has the verdict only)."""
    frame = incidents.trajectories(verdict)
    left, right = st.columns([2, 3]) if not frame.empty else (st.container(), None)
    with left:
        st.markdown(f"**Diagnosis: {verdict.get('cause', '?')}**. {verdict.get('finding', '')}")
        named = describe_ranks(verdict)
        if named:
            st.markdown(f"Suspect rank(s): **{named}**")
        if verdict.get("advice"):
            st.markdown(f"Advice: {verdict['advice']}")
        st.caption(
            f"{verdict.get('replayed_steps', '?')} steps replayed in "
            f"{float(verdict.get('seconds') or 0):.1f} s from the checkpoint of step "
            f"{verdict.get('checkpoint_step', '?')}"
        )
    if right is not None:
        with right:
            st.altair_chart(charts.replays(frame, onset), width="stretch")
            st.caption(
                "recorded: the abandoned attempt's steps; replay: the same steps again on "
                "the same data; without_onset: replayed with the onset batches replaced."
            )


def forensics_view(found) -> None:
    """The onset batch's top sequences by loss; beside them (the spike event's full form)
    its tokens per source and the mixture's expectation."""
    median = found.get("median_loss")
    st.markdown(
        f"**Suspect sequences** of the batch of step {found.get('onset', '?')}, highest loss "
        "first" + (f" (the batch's median {median:.4g} nats)" if median is not None else "")
    )
    mix = incidents.source_mix(found)
    left, right = st.columns([4, 1]) if not mix.empty else (st.container(), None)
    with left:
        st.dataframe(
            incidents.suspects(found),
            column_config={
                "loss (nats)": st.column_config.NumberColumn(format="%.4g"),
                "snippet": st.column_config.TextColumn(width="large"),
            },
        )
    if right is not None:
        with right:
            st.table(mix.set_index("source").round().astype("Int64"))
            st.caption("tokens per source: the batch's, and the mixture's expectation")


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
        data = event.data or {}
        if event.kind == EventKind.DIAGNOSIS:
            diagnosis_view(data, int(data.get("onset", event.step)))
        elif incidents.mapping(data.get("diagnosis")):
            diagnosis_view(data["diagnosis"], int(data.get("onset", event.step)))
        if incidents.mapping(data.get("forensics")):
            forensics_view(data["forensics"])
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
