"""The explorer's data layer: which runs it may read, and cached loaders over them.

``YOTO_RUNS`` holds run directories or roots of runs, joined by ``os.pathsep`` (``yoto
explore`` sets it). The explorer opens files under those paths only, and never writes.

Loaders are pure functions of (run path, fingerprint); the ``st.cache_data`` wrappers key
on the fingerprint (the names and sizes of the run's files), so a live run's new segments
and events show up on the next rerun (the Refresh button) while a finished run is read
once. Importing this module needs no Streamlit server.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from yoto import catalog, runstore
from yoto.config import SpectraConfig
from yoto.errors import RunDirError
from yoto.events import EventKind, Severity

from . import layers as layers_mod
from . import query
from .query import ExplorerError

ENV = "YOTO_RUNS"
DEFAULT_ROOT = "runs"


# --- discovery ----------------------------------------------------------------------------


def roots() -> list[Path]:
    """The paths in ``YOTO_RUNS`` (default ``runs``), resolved."""
    raw = os.environ.get(ENV) or DEFAULT_ROOT
    return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]


def missing_roots() -> list[Path]:
    return [r for r in roots() if not r.is_dir()]


def run_dirs() -> list[Path]:
    """Run directories under the paths in ``YOTO_RUNS`` (``runstore.find_runs``: each path
    is a run directory or a root whose children are), resolved, duplicates dropped. A path
    that is not a folder is left out here; ``missing_roots`` names it."""
    present = [root for root in roots() if root.is_dir()]
    return [run.resolve() for run in runstore.find_runs(present)]


def fingerprint(run: Path) -> tuple:
    """Changes whenever the run gains a segment, an event, a new manifest or config."""
    items = []
    for name in (runstore.MANIFEST, runstore.CONFIG, runstore.EVENTS):
        f = run / name
        if f.exists():
            st_ = f.stat()
            items.append((name, st_.st_size, st_.st_mtime_ns))
    for folder in (runstore.METRICS, runstore.LAYERS, runstore.SPECTRA, runstore.EVALS):
        d = run / folder
        if d.is_dir():
            names = os.listdir(d)
            items.append((folder, len(names), max(names, default="")))
    return tuple(items)


def _check(run: str | Path) -> Path:
    path = Path(run).resolve()
    if not query.inside(path, roots()):
        raise ExplorerError(f"{path} is not under the run roots the explorer was given")
    return runstore.require_run_dir(path)


# --- pure loaders -------------------------------------------------------------------------


def runs_frame(paths: Sequence[Path]) -> pd.DataFrame:
    """One line per run for the Runs page; a run with parts that could not be read says
    which in ``problem`` (a run without a readable manifest is summarised from the rest,
    status ``damaged``); one that cannot be summarised at all is listed with its error."""
    rows = []
    for path in paths:
        try:
            s = runstore.summarize(_check(path))
        except (RunDirError, ExplorerError, OSError) as exc:
            rows.append(
                {"run": path.name, "status": "unreadable", "problem": str(exc), "path": str(path)}
            )
            continue
        val = s.val_loss or {}
        best = s.best_val_loss or {}
        rows.append(
            {
                "run": s.id,
                "name": s.name,
                "status": s.state,
                "steps": s.last_step,
                "tokens": s.tokens,
                "train loss (nats)": s.train_loss,
                "final val loss (nats)": _mean(val.values()),
                "best val loss (nats)": min(best.values()) if best else None,
                "attempt": s.attempt,
                "rollbacks": s.events.get(EventKind.ROLLBACK, 0),
                "halts": s.events.get(EventKind.HALT, 0),
                "spikes": s.events.get(EventKind.SPIKE, 0),
                "started": pd.to_datetime(s.start, unit="s", utc=True) if s.start else None,
                "problem": "; ".join(s.problems),
                "path": str(s.path),
            }
        )
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


RUN_COLUMNS = [
    "run", "name", "status", "steps", "tokens", "train loss (nats)", "final val loss (nats)",
    "best val loss (nats)", "attempt", "rollbacks", "halts", "spikes", "started", "problem",
    "path",
]  # fmt: skip


def _mean(values: Any) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def events_frame(run: Path) -> pd.DataFrame:
    """Every event, one row each; lines that are not events are skipped (``problems``
    names them)."""
    records = [e for e in runstore.read_events(_check(run)) if isinstance(e, dict)]
    cols = ["step", "attempt", "kind", "severity", "message", "time", "data"]
    if not records:
        return pd.DataFrame({c: [] for c in cols})
    frame = pd.DataFrame.from_records(records)
    for col in cols:
        if col not in frame:
            frame[col] = None
    frame = frame[cols]
    for col in ("step", "attempt"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce").fillna(0).astype("int64")
    for col, default in (("kind", "?"), ("severity", Severity.INFO), ("message", "")):
        frame[col] = frame[col].fillna(default).astype(str)
    frame["time"] = pd.to_datetime(pd.to_numeric(frame.time, errors="coerce"), unit="s", utc=True)
    frame["data"] = [d if isinstance(d, dict) else {} for d in frame.data]
    return frame


def config(run: Path) -> runstore.ConfigRead:
    """config.yaml as a mapping, and why it is empty when it cannot be read."""
    return runstore.read_config(_check(run))


def problems(run: Path) -> list[str]:
    """What of the run could not be read, one sentence each: its manifest, event lines,
    config.yaml. The pages show the rest and these as warnings."""
    path = _check(run)
    found = (
        runstore.manifest_damage(path),
        runstore.read_events_report(path).problem,
        runstore.read_config(path).problem,
    )
    return [p for p in found if p]


@dataclass(frozen=True, slots=True)
class AlphaBand:
    low: float
    high: float
    problem: str = ""  # why the run's own band could not be used (then the defaults are)


def alpha_band(cfg: dict[str, Any]) -> AlphaBand:
    """The spectra probe's healthy alpha band as the run recorded it in config.yaml
    (``probes.spectra.alpha_low/high``); the defaults for a run that has none, and the
    defaults with the reason when what it has is not a band."""
    default = SpectraConfig()
    probes = cfg.get("probes") if isinstance(cfg, dict) else None
    spectra = probes.get("spectra") if isinstance(probes, dict) else None
    if not isinstance(spectra, dict):
        return AlphaBand(default.alpha_low, default.alpha_high)
    raw = (
        spectra.get("alpha_low", default.alpha_low),
        spectra.get("alpha_high", default.alpha_high),
    )
    try:
        low, high = (float(v) for v in raw)
    except (TypeError, ValueError):
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        return AlphaBand(
            default.alpha_low,
            default.alpha_high,
            f"config.yaml's probes.spectra band ({raw[0]!r}, {raw[1]!r}) is not two numbers "
            f"with alpha_low < alpha_high; drawn: the default {default.alpha_low:g}..."
            f"{default.alpha_high:g}",
        )
    return AlphaBand(low, high)


def table(run: Path, folder: str) -> query.Table | None:
    return query.table(_check(run), folder, roots())


def firsts(t: query.Table) -> dict[int, int]:
    info = query.attempts(t)
    return dict(zip(info.attempt.astype(int), info["first"].astype(int), strict=True))


def metric_series(
    run: Path,
    columns: tuple[str, ...],
    x: str,
    branches: tuple[str, ...],
    window: tuple[int, int] | None = None,
):
    t = table(run, runstore.METRICS)
    if t is None:
        return None
    frame = query.series(t, columns, x=x, branches=branches, window=window)
    return frame, tuple(t.columns()), t.damaged


def layer_heatmap(run: Path, metric: str, lineage: int | None) -> pd.DataFrame | None:
    t = table(run, runstore.LAYERS)
    if t is None:
        return None
    f = _lineage_firsts(run, t)
    return layers_mod.heatmap(t, metric, f, max(f) if lineage is None else lineage)


def first_abnormal(run: Path, metrics: tuple[str, ...], lineage: int, onset: int):
    """The earliest abnormal (layer, step) over the given metrics (ties: larger |z|)."""
    t = table(run, runstore.LAYERS)
    if t is None:
        return None
    rows = layers_mod.rows_before(t, list(metrics), _lineage_firsts(run, t), lineage, onset)
    found = [
        hit
        for metric, part in rows.groupby("metric")
        if (hit := layers_mod.first_abnormal(part, onset, str(metric))) is not None
    ]
    return min(found, key=lambda a: (a.step, -abs(a.z)), default=None)


def _lineage_firsts(run: Path, layers_table: query.Table) -> dict[int, int]:
    """Attempt starts from the metrics table (every step) when there is one: the layers
    table only sees every N-th step, so its first step of an attempt comes late."""
    m = table(run, runstore.METRICS)
    f = firsts(layers_table)
    if m is not None:
        f = {**f, **firsts(m)}
    return f


def layer_metrics(run: Path) -> list[str]:
    t = table(run, runstore.LAYERS)
    return [] if t is None else layers_mod.metrics(t)


def spectra_frame(run: Path) -> pd.DataFrame | None:
    """Every analysed matrix, without its eigenvalues."""
    t = table(run, runstore.SPECTRA)
    if t is None:
        return None
    cols = [c for c in t.columns() if c != "esd"]
    return t.df(f"SELECT {', '.join(map(query.quote, cols))} FROM {{src}} ORDER BY step, layer")


def eigenvalues(run: Path, layer: str, step: int) -> list[float]:
    t = table(run, runstore.SPECTRA)
    if t is None or "esd" not in t.columns():
        return []
    got = t.query(
        "SELECT esd FROM {src} WHERE layer = $layer AND step = $step ORDER BY attempt DESC LIMIT 1",
        {"layer": layer, "step": step},
    ).fetchone()
    return [float(v) for v in (got[0] or [])] if got else []


def step_time_histogram(run: Path):
    t = table(run, runstore.METRICS)
    return None if t is None else query.histogram(t, catalog.STEP_DURATION.name)


# --- cached wrappers (the pages call these) -----------------------------------------------
# The fingerprint argument is only the cache key: new data, new entry.

_CACHE = {"max_entries": 256, "show_spinner": False}


@st.cache_data(**_CACHE)
def cached_runs(paths: tuple[str, ...], prints: tuple) -> pd.DataFrame:
    return runs_frame([Path(p) for p in paths])


@st.cache_data(**_CACHE)
def cached_events(run: str, fp: tuple) -> pd.DataFrame:
    return events_frame(Path(run))


@st.cache_data(**_CACHE)
def cached_series(
    run: str,
    fp: tuple,
    columns: tuple,
    x: str = "step",
    branches=("surviving",),
    window: tuple[int, int] | None = None,
):
    return metric_series(Path(run), columns, x, tuple(branches), window)


@st.cache_data(**_CACHE)
def cached_heatmap(run: str, fp: tuple, metric: str, lineage: int | None):
    return layer_heatmap(Path(run), metric, lineage)


@st.cache_data(**_CACHE)
def cached_first_abnormal(run: str, fp: tuple, metrics: tuple, lineage: int, onset: int):
    return first_abnormal(Path(run), tuple(metrics), lineage, onset)


@st.cache_data(**_CACHE)
def cached_layer_metrics(run: str, fp: tuple) -> list[str]:
    return layer_metrics(Path(run))


@st.cache_data(**_CACHE)
def cached_spectra(run: str, fp: tuple):
    return spectra_frame(Path(run))


@st.cache_data(**_CACHE)
def cached_eigenvalues(run: str, fp: tuple, layer: str, step: int) -> list[float]:
    return eigenvalues(Path(run), layer, step)


@st.cache_data(**_CACHE)
def cached_step_times(run: str, fp: tuple):
    return step_time_histogram(Path(run))


@st.cache_data(**_CACHE)
def cached_config(run: str, fp: tuple) -> runstore.ConfigRead:
    return config(Path(run))


@st.cache_data(**_CACHE)
def cached_problems(run: str, fp: tuple) -> list[str]:
    return problems(Path(run))
