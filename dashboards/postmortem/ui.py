"""What every page shares: the run picker, the refresh button, and turning a bad run
directory into a message instead of a traceback."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import streamlit as st

from yoto.errors import RunDirError

from . import data
from .query import ExplorerError

RUN = "run"  # session key of the sidebar's run picker (rendered on every page)
COMPARE = "compare_runs"  # runs picked for Compare; survives page switches (not a widget key)


def sidebar() -> None:
    """Rendered by app.py before the page, so its widgets live on every page."""
    with st.sidebar:
        if st.button("Refresh", icon=":material/refresh:", help="re-read the run directories"):
            st.cache_data.clear()  # a live run's new segments are picked up anyway
        runs = [str(p) for p in data.run_dirs()]
        if not runs:
            return
        frame = runs_table()
        labels = {r.path: f"{r.name or r.run} · {r.status}" for r in frame.itertuples()}
        if st.session_state.get(RUN) not in runs:
            st.session_state[RUN] = runs[0] if not len(frame) else _newest(frame, runs)
        st.selectbox(
            "Run",
            runs,
            key=RUN,
            format_func=lambda p: labels.get(p, Path(p).name),
            help="the run the single-run pages show; pick several on Runs for Compare",
        )
        st.caption(f"{len(runs)} run(s) under {os.pathsep.join(map(str, data.roots()))}")


def _newest(frame, runs: list[str]) -> str:
    ok = frame[frame.path.isin(runs)] if "path" in frame else frame.iloc[0:0]
    if ok.empty or "started" not in ok or ok.started.isna().all():
        return runs[0]
    return str(ok.sort_values("started").path.iloc[-1])


def runs_table():
    paths = tuple(str(p) for p in data.run_dirs())
    prints = tuple(data.fingerprint(Path(p)) for p in paths)
    return data.cached_runs(paths, prints)


def no_runs_message() -> bool:
    """Tell the person why there is nothing to show; True when there is nothing."""
    missing = data.missing_roots()
    if missing:
        st.error(
            "These run paths do not exist: "
            + ", ".join(f"`{p}`" for p in missing)
            + f". Pass existing run directories or roots to `yoto explore` (or `{data.ENV}`)."
        )
    if not data.run_dirs():
        st.info(
            "No run directories found under "
            + ", ".join(f"`{p}`" for p in data.roots())
            + ". A run directory holds a `manifest.json` (or, if that is lost, two of "
            "`config.yaml`, `events.jsonl`, `metrics/`, `checkpoints/`); `yoto train` "
            "creates one under `--run-root`."
        )
        return True
    return False


def current_run() -> Path | None:
    if no_runs_message():
        return None
    picked = st.session_state.get(RUN)
    runs = [str(p) for p in data.run_dirs()]
    return Path(picked if picked in runs else runs[0])


def fp(run: Path) -> tuple:
    return data.fingerprint(run)


def page(title: str, render: Callable[[Path], None], caption: str = "") -> None:
    """Run a single-run page; a damaged or half-written run becomes a message."""
    st.title(title)
    if caption:
        st.caption(caption)
    run = current_run()
    if run is None:
        return
    guarded(lambda: damage_notes(run), run)
    guarded(lambda: render(run), run)


def damage_notes(run: Path) -> None:
    """What of the run could not be read, above the page that shows the rest."""
    for problem in data.cached_problems(str(run), fp(run)):
        st.warning(f"Not all of this run could be read: {problem}. The rest is shown.")


def guarded(fn: Callable[[], None], run: Path | None = None) -> None:
    try:
        fn()
    except (RunDirError, ExplorerError) as exc:
        st.error(f"Cannot read this run: {exc}")
    except (duckdb.Error, pa.ArrowException, OSError, ValueError) as exc:
        where = f" `{run}`" if run else ""
        st.error(
            f"The run directory{where} could not be read ({type(exc).__name__}: {exc}). "
            "It may be damaged or still being written; try Refresh."
        )


def no_data(what: str) -> None:
    st.info(
        f"No {what} recorded in this run yet (a run that just started, or a probe that is off)."
    )


def damaged_note(damaged: tuple[str, ...]) -> None:
    if damaged:
        st.warning(
            f"{len(damaged)} damaged segment(s) left out: "
            + ", ".join(Path(d).name for d in damaged)
        )
