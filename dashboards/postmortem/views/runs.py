"""Runs: every run found, with what happened to it; pick one (or several for Compare)."""

import streamlit as st

from yoto.dashboards.postmortem import ui

st.title("Runs")
st.caption("Select rows: the first becomes the run the other pages show; all go to Compare.")

if not ui.no_runs_message():
    frame = ui.runs_table()
    shown = frame.drop(columns=["path"])
    if not frame.problem.fillna("").eq("").all():
        for row in frame[frame.problem.fillna("") != ""].itertuples():
            st.warning(f"`{row.run}` ({row.status}): {row.problem}")

    def picked() -> None:
        rows = st.session_state["runs_table"].selection.rows
        paths = [str(frame.path.iloc[i]) for i in rows]
        if paths:
            st.session_state[ui.RUN] = paths[0]
            st.session_state[ui.COMPARE] = paths

    st.dataframe(
        shown,
        key="runs_table",
        on_select=picked,
        selection_mode="multi-row",
        hide_index=True,
        width="stretch",
        column_config={
            "tokens": st.column_config.NumberColumn("tokens", format="compact"),
            "train loss (nats)": st.column_config.NumberColumn(format="%.4f"),
            "final val loss (nats)": st.column_config.NumberColumn(
                format="%.4f", help="last validation loss, mean over sources"
            ),
            "best val loss (nats)": st.column_config.NumberColumn(
                format="%.4f", help="best validation loss of any source"
            ),
            "started": st.column_config.DatetimeColumn("started (UTC)", format="YYYY-MM-DD HH:mm"),
        },
    )
    chosen = st.session_state.get(ui.COMPARE) or []
    if chosen:
        st.caption("For Compare: " + ", ".join(p.rsplit("/", 1)[-1] for p in chosen))
