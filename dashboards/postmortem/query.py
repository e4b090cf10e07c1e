"""DuckDB over one run directory's Parquet tables: pure functions, no Streamlit.

Every query opens its own in-memory DuckDB whose file access is limited to the run roots
the explorer was given (``allowed_directories`` with external access off and the
configuration locked), and names the segment files explicitly: ``part-*.parquet`` only, so
a segment still being written (``*.parquet.tmp``) is never read. Nothing here writes.

Branches. ``attempt`` grows by one at each rollback; attempt ``a`` restarts at its first
step, so the branch that attempt ``a`` saw (its *lineage*) is, for each earlier attempt
``b``, the rows of ``b`` before the first step of any attempt in ``(b, a]``. The surviving
branch is the lineage of the last attempt; the other rows are abandoned branches.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from yoto import runstore

from . import downsample

PRESELECT = 4  # min/max buckets per output point, as tsdownsample's MinMaxLTTB does


class ExplorerError(Exception):
    """Something about the run directory a person should be told in one sentence."""


# --- access -------------------------------------------------------------------------------


def inside(path: Path, roots: Sequence[Path]) -> bool:
    path = Path(path).resolve()
    return any(path == r or r in path.parents for r in (Path(r).resolve() for r in roots))


def connect(roots: Sequence[Path]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that can open files under ``roots`` only."""
    con = duckdb.connect(":memory:")
    allowed = [str(Path(r).resolve()).rstrip("/") + "/" for r in roots]
    con.execute("SET allowed_directories = $d", {"d": allowed})
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def segments(run: Path, folder: str, roots: Sequence[Path]) -> list[str]:
    """Complete segment files of one table; refuses a run outside the roots."""
    if not inside(run, roots):
        raise ExplorerError(f"{run} is not under the run roots the explorer was given")
    return [str(p.resolve()) for p in runstore.segment_files(run, folder)]


def readable(files: list[str]) -> tuple[list[str], list[str]]:
    """(readable, damaged) segment files, by their Parquet footers: a disk error in one
    segment must not hide the rest of the record."""
    good, bad = [], []
    for f in files:
        try:
            pq.read_metadata(f)
            good.append(f)
        except Exception:  # any damage: truncated, not Parquet, unreadable
            bad.append(f)
    return good, bad


_FILES = "read_parquet($files, union_by_name = true)"


@dataclass(frozen=True)
class Table:
    """One table of a run, ready to query: ``FROM {src}``.

    A table pruned to some of its segments (:meth:`between`, :meth:`newest`, :meth:`only`)
    keeps the whole table's ``schema``: a series absent from the kept files (a probe that
    did not run in those steps) reads as NULL there instead of failing the query."""

    files: tuple[str, ...]
    roots: tuple[Path, ...]
    damaged: tuple[str, ...] = ()
    schema: tuple[str, ...] = ()  # the whole table's columns, for a pruned one

    @property
    def src(self) -> str:
        missing = [c for c in self.schema if c not in set(self._file_columns)]
        if not missing:
            return _FILES
        nulls = ", ".join(f"NULL::DOUBLE AS {quote(c)}" for c in missing)
        return f"(SELECT *, {nulls} FROM {_FILES})"

    def query(self, sql: str, params: dict | None = None) -> duckdb.DuckDBPyRelation:
        # replace, not str.format: series keys hold braces
        return self._execute(sql.replace("{src}", self.src), params)

    def _execute(self, sql: str, params: dict | None = None) -> duckdb.DuckDBPyRelation:
        con = connect(self.roots)
        return con.execute(sql, {"files": list(self.files), **(params or {})})

    def df(self, sql: str, params: dict | None = None) -> pd.DataFrame:
        return self.query(sql, params).df()

    @functools.cached_property
    def _file_columns(self) -> tuple[str, ...]:
        if not self.files:
            return ()
        return tuple(r[0] for r in self._execute(f"DESCRIBE SELECT * FROM {_FILES}").fetchall())

    def columns(self) -> list[str]:
        own = self._file_columns
        return [*own, *(c for c in self.schema if c not in set(own))]

    def _pruned(self, files: tuple[str, ...]) -> Table:
        return Table(files, self.roots, self.damaged, tuple(self.columns()))

    @functools.cached_property
    def spans(self) -> dict[str, tuple[int, int, int]] | None:
        """file -> (attempt, first step, last step) from the segment names the run store
        gives (``part-a{attempt}-s{first}-{last}``); None if any name does not say."""
        out = {}
        for f in self.files:
            span = runstore.segment_span(Path(f).name)
            if span is None:
                return None
            out[f] = span
        return out

    def step_range(self) -> tuple[int, int] | None:
        """(first, last) step of all segments, from their names; None if they do not say."""
        if self.spans is None:
            return None
        return (
            min(first for _, first, _ in self.spans.values()),
            max(last for _, _, last in self.spans.values()),
        )

    def between(self, lo: int, hi: int) -> Table:
        """The segments whose step range meets [lo, hi] (file pruning by name)."""
        if self.spans is None:
            return self
        files = tuple(f for f in self.files if self.spans[f][1] <= hi and self.spans[f][2] >= lo)
        return self._pruned(files) if files else self

    def newest(self, n: int = 2) -> Table:
        """The last ``n`` segments (by name: attempt, then step)."""
        return self._pruned(tuple(sorted(self.files)[-n:]))

    def only(self, attempts: set[int]) -> Table:
        """The segments of the given attempts only (file pruning by name)."""
        if self.spans is None:
            return self
        files = tuple(f for f in self.files if self.spans[f][0] in attempts)
        return self._pruned(files) if files else self


def table(run: Path, folder: str, roots: Sequence[Path]) -> Table | None:
    """The table, or None when the run has no segment of it yet. Damaged segments are
    left out (and listed in ``damaged``) when DuckDB cannot read them all."""
    files = segments(run, folder, roots)
    if not files:
        return None
    t = Table(tuple(files), tuple(Path(r) for r in roots))
    try:
        t.columns()
    except duckdb.Error:
        good, bad = readable(files)
        if not good:
            raise ExplorerError(f"every {folder}/ segment of {run.name} is unreadable") from None
        t = Table(tuple(good), t.roots, tuple(bad))
    return t


def quote(name: str) -> str:
    """A column name (series keys hold braces and quotes) as a DuckDB identifier."""
    return '"' + name.replace('"', '""') + '"'


# --- branches -----------------------------------------------------------------------------


def attempts(t: Table) -> pd.DataFrame:
    """attempt, first, last: one line per attempt; from the segment names when they say
    (no scan of a 10M-row table), else from the data."""
    if t.spans is not None:
        rows: dict[int, list[int]] = {}
        for a, first, last in t.spans.values():
            lo, hi = rows.get(a, [first, last])
            rows[a] = [min(lo, first), max(hi, last)]
        return pd.DataFrame(
            [(a, lo, hi) for a, (lo, hi) in sorted(rows.items())],
            columns=["attempt", "first", "last"],
        )
    return t.df(
        'SELECT attempt, min(step) AS "first", max(step) AS "last" '
        "FROM {src} GROUP BY attempt ORDER BY attempt"
    )


def cutoffs(firsts: dict[int, int], lineage: int) -> dict[int, float]:
    """For each attempt ``b <= lineage``: the step from which its rows leave the lineage."""
    out = {}
    for b in firsts:
        if b > lineage:
            continue
        later = [firsts[c] for c in firsts if b < c <= lineage]
        out[b] = min(later) if later else math.inf
    return out


def lineage_sql(firsts: dict[int, int], lineage: int) -> str:
    """A WHERE predicate (built from integers only) selecting the lineage's rows."""
    parts = []
    for b, cut in cutoffs(firsts, lineage).items():
        bound = "" if math.isinf(cut) else f" AND step < {int(cut)}"
        parts.append(f"(attempt = {int(b)}{bound})")
    return "(" + (" OR ".join(parts) or "FALSE") + ")"


# --- wide metrics -------------------------------------------------------------------------


def series(
    t: Table,
    columns: Sequence[str],
    x: str = "step",
    max_points: int = downsample.MAX_POINTS,
    branches: Sequence[str] = ("surviving", "abandoned"),
    window: tuple[int, int] | None = None,
) -> pd.DataFrame:
    """Long frame (attempt, branch, series, x, value) of the given columns, each series
    downsampled to at most ``max_points`` points over all its pieces together. Columns the
    run does not have are left out. ``window`` (first, last step) keeps only those steps,
    so a zoom on an incident gets its points budget for the incident alone."""
    have = set(t.columns())
    columns = [c for c in columns if c in have]
    if x != "step" and x not in have:
        return _empty()
    info = attempts(t)
    lasts = dict(zip(info.attempt.astype(int), info["last"].astype(int), strict=True))
    firsts = dict(zip(info.attempt.astype(int), info["first"].astype(int), strict=True))
    pieces = []
    for attempt, cut in cutoffs(firsts, max(firsts, default=0)).items():
        lo, hi = firsts[attempt], lasts[attempt]
        if "surviving" in branches and lo < cut:
            pieces.append((attempt, "surviving", lo, int(min(hi, cut - 1))))
        if "abandoned" in branches and not math.isinf(cut) and hi >= cut:
            pieces.append((attempt, "abandoned", int(cut), hi))
    if window is not None:
        pieces = [
            (attempt, branch, max(lo, window[0]), min(hi, window[1]))
            for attempt, branch, lo, hi in pieces
            if lo <= window[1] and hi >= window[0]
        ]
    if not columns or not pieces:
        return _empty()
    spans = [hi - lo + 1 for *_, lo, hi in pieces]
    frames = []
    for (attempt, branch, lo, hi), n_out in zip(
        pieces, downsample.split_budget(spans, max_points), strict=True
    ):
        sub = t.only({attempt}).between(lo, hi)
        for col, (xs, ys) in zip(
            columns, _piece(sub, columns, x, attempt, lo, hi, n_out), strict=True
        ):
            if xs.size:
                frames.append(
                    pd.DataFrame(
                        {"attempt": attempt, "branch": branch, "series": col, "x": xs, "value": ys}
                    )
                )
    return pd.concat(frames, ignore_index=True) if frames else _empty()


def _empty() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "attempt": pd.Series([], dtype="int64"),
            "branch": pd.Series([], dtype="object"),
            "series": pd.Series([], dtype="object"),
            "x": pd.Series([], dtype="float64"),
            "value": pd.Series([], dtype="float64"),
        }
    )


def _piece(
    t: Table, columns: list[str], x: str, attempt: int, lo: int, hi: int, n_out: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One piece (an attempt's steps lo..hi) of several series, at most ``n_out`` points
    each, in one scan: short pieces are fetched whole and downsampled with MinMaxLTTB
    here; long ones get MinMaxLTTB's min/max preselection in DuckDB (a 10M-row piece sends
    ~4 x n_out rows per series to Python), then LTTB."""
    xq = f"{quote(x)}::DOUBLE"
    where = f"attempt = {int(attempt)} AND step BETWEEN {int(lo)} AND {int(hi)}"
    if hi - lo + 1 <= PRESELECT * n_out:
        cols = ", ".join(f"{quote(c)} AS c{i}" for i, c in enumerate(columns))
        got = t.df(f"SELECT {xq} AS x, {cols} FROM {{src}} WHERE {where} ORDER BY step")
        xs = got["x"].to_numpy(dtype=np.float64, na_value=np.nan)
        out = []
        for i in range(len(columns)):
            ys = got[f"c{i}"].to_numpy(dtype=np.float64, na_value=np.nan)
            idx = downsample.indices(xs, ys, n_out)
            out.append((xs[idx], ys[idx]))
        return out
    buckets = max(1, PRESELECT * n_out // 2)
    aggs = []
    xa = "step" if x == "step" else xq
    for i, c in enumerate(columns):
        # no FILTER (it doubles the cost): min/max skip NULLs, and a NaN or inf a max picks
        # up is dropped below (a non-finite loss is an event of its own)
        aggs.append(
            f"arg_min({xa}, {quote(c)}) AS x0_{i}, min({quote(c)}) AS y0_{i}, "
            f"arg_max({xa}, {quote(c)}) AS x1_{i}, max({quote(c)}) AS y1_{i}"
        )
    got = t.df(
        f"SELECT (step - {int(lo)}) * {buckets} // {int(hi - lo + 1)} AS bucket, "
        f"{', '.join(aggs)} FROM {{src}} WHERE {where} GROUP BY bucket"
    )
    out = []
    for i in range(len(columns)):
        xs = np.concatenate([got[f"x0_{i}"], got[f"x1_{i}"]]).astype(np.float64)
        ys = np.concatenate([got[f"y0_{i}"], got[f"y1_{i}"]]).astype(np.float64)
        keep = np.isfinite(xs) & np.isfinite(ys)
        xs, ys = xs[keep], ys[keep]
        order = np.lexsort((ys, xs))
        xs, ys = xs[order], ys[order]
        idx = downsample.lttb(xs, ys, n_out)
        out.append((xs[idx], ys[idx]))
    return out


def histogram(t: Table, col: str, bins: int = 60) -> tuple[pd.DataFrame, dict[str, float]]:
    """Equal-width histogram of a column (surviving and abandoned rows alike) between its
    0.5th and 99.5th percentiles (outliers land in the edge bins), and its quantiles."""
    c = quote(col)
    if col not in t.columns():
        return pd.DataFrame({"lo": [], "hi": [], "count": []}), {}
    q = t.query(
        f"SELECT quantile_cont({c}, [0.005, 0.5, 0.9, 0.99, 0.995]), max({c}), count({c}) "
        f"FROM {{src}} WHERE isfinite({c})"
    ).fetchone()
    if not q[2]:
        return pd.DataFrame({"lo": [], "hi": [], "count": []}), {}
    lo, p50, p90, p99, hi = q[0]
    stats = {"p50": p50, "p90": p90, "p99": p99, "max": q[1], "count": q[2]}
    width = (hi - lo) / bins if hi > lo else 1.0
    frame = t.df(
        f"SELECT least(greatest(floor(({c} - $lo) / $w), 0), {bins - 1})::INT AS bin, "
        f"count(*) AS count FROM {{src}} WHERE isfinite({c}) GROUP BY bin ORDER BY bin",
        {"lo": lo, "w": width},
    )
    frame["lo"] = lo + frame["bin"] * width
    frame["hi"] = frame["lo"] + width
    return frame[["lo", "hi", "count"]], stats
