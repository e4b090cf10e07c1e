"""Streamlit explorer over a run directory (see the post-mortem explorer issue)."""
