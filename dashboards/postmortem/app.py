"""The post-mortem explorer: ``yoto explore [RUN_DIR_OR_ROOT ...]`` or
``YOTO_RUNS=runs streamlit run dashboards/postmortem/app.py``.

Pages are files in ``views/`` registered with ``st.navigation`` (not a ``pages/`` folder,
which Streamlit's legacy multipage mode would pick up on its own). To add a page, add a
file to ``views/`` and one line to ``PAGES``.
"""

from pathlib import Path

import streamlit as st

from yoto.dashboards.postmortem import ui

VIEWS = Path(__file__).resolve().parent / "views"

st.set_page_config(page_title="yoto post-mortem", page_icon=":material/monitoring:", layout="wide")

PAGES = [
    st.Page(VIEWS / "runs.py", title="Runs", icon=":material/table_rows:", default=True),
    st.Page(VIEWS / "timeline.py", title="Timeline", icon=":material/timeline:"),
    st.Page(VIEWS / "noise.py", title="Gradient noise & batch", icon=":material/grain:"),
    st.Page(VIEWS / "precision.py", title="Precision", icon=":material/tune:"),
    st.Page(VIEWS / "layers.py", title="Layers", icon=":material/layers:"),
    st.Page(VIEWS / "spectra.py", title="Spectra", icon=":material/equalizer:"),
    st.Page(VIEWS / "compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page(VIEWS / "evals.py", title="Evals", icon=":material/fact_check:"),
    st.Page(VIEWS / "throughput.py", title="Throughput", icon=":material/speed:"),
    st.Page(VIEWS / "scaling.py", title="Scaling", icon=":material/trending_down:"),
]

page = st.navigation(PAGES)
ui.sidebar()
page.run()
