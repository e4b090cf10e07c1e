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


@dataclass(frozen=True)
class Table:
    """One table of a run, ready to query: ``FROM {src}``."""

    files: tuple[str, ...]
    roots: tuple[Path, ...]
    damaged: tuple[str, ...] = ()

    @property
    def src(self) -> str:
        return "read_parquet($files, union_by_name = true)"

    def query(self, sql: str, params: dict | None = None) -> duckdb.DuckDBPyRelation:
        con = connect(self.roots)
        # replace, not str.format: series keys hold braces
        sql = sql.replace("{src}", self.src)
        return con.execute(sql, {"files": list(self.files), **(params or {})})

    def df(self, sql: str, params: dict | None = None) -> pd.DataFrame:
        return self.query(sql, params).df()

    def columns(self) -> list[str]:
        if not self.files:
            return []
        return [r[0] for r in self.query("DESCRIBE SELECT * FROM {src}").fetchall()]


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
    """attempt, first, last, rows: one line per attempt."""
    return t.df(
        'SELECT attempt, min(step) AS "first", max(step) AS "last", count(*) AS rows '
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


def parts(firsts: dict[int, int]) -> list[tuple[int, str, str]]:
    """(attempt, branch, predicate) for every piece: the surviving branch's piece of each
    attempt, then the abandoned remainder of each earlier attempt."""
    if not firsts:
        return []
    last = max(firsts)
    out = []
    for b, cut in cutoffs(firsts, last).items():
        if math.isinf(cut):
            out.append((b, "surviving", f"attempt = {int(b)}"))
        else:
            out.append((b, "surviving", f"attempt = {int(b)} AND step < {int(cut)}"))
            out.append((b, "abandoned", f"attempt = {int(b)} AND step >= {int(cut)}"))
    return out


# --- wide metrics -------------------------------------------------------------------------


def series(
    t: Table,
    columns: Sequence[str],
    x: str = "step",
    max_points: int = downsample.MAX_POINTS,
    branches: Sequence[str] = ("surviving", "abandoned"),
) -> pd.DataFrame:
    """Long frame (attempt, branch, series, x, value) of the given columns, each series
    downsampled to at most ``max_points`` points over all its pieces together. Columns the
    run does not have are left out."""
    have = set(t.columns())
    columns = [c for c in columns if c in have]
    if x != "step" and x not in have:
        return _empty()
    info = attempts(t)
    firsts = dict(zip(info.attempt.astype(int), info["first"].astype(int), strict=True))
    pieces = [p for p in parts(firsts) if p[1] in branches]
    if not columns or not pieces:
        return _empty()
    counts = [
        t.query(f"SELECT count(*) FROM {{src}} WHERE {pred}").fetchone()[0] for *_, pred in pieces
    ]
    frames = []
    for col in columns:
        for (attempt, branch, pred), n_out in zip(
            pieces, downsample.split_budget(counts, max_points), strict=True
        ):
            xs, ys = _piece(t, col, x, pred, n_out)
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


def _piece(t: Table, col: str, x: str, pred: str, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """One piece of one series, at most ``n_out`` points: small pieces are fetched whole
    and downsampled here; big ones get MinMaxLTTB's min/max preselection in DuckDB (so a
    10M-row piece sends ~4 x n_out rows to Python), then LTTB."""
    c, xq = quote(col), quote(x)
    ok = f"isfinite({c}) AND isfinite({xq}::DOUBLE)"
    n = t.query(f"SELECT count(*) FROM {{src}} WHERE {pred} AND {ok}").fetchone()[0]
    if n == 0 or n_out == 0:
        return np.array([]), np.array([])
    if n <= PRESELECT * n_out:
        got = t.query(
            f"SELECT {xq}::DOUBLE AS x, {c} AS y FROM {{src}} WHERE {pred} AND {ok} ORDER BY step"
        ).fetchnumpy()
        idx = downsample.indices(got["x"], got["y"], n_out)
        return np.asarray(got["x"])[idx], np.asarray(got["y"])[idx]
    buckets = max(1, PRESELECT * n_out // 2)
    got = t.query(
        f"""
        WITH r AS (SELECT step, {xq}::DOUBLE AS x, {c} AS y FROM {{src}} WHERE {pred} AND {ok}),
        lim AS (SELECT min(step) AS lo, max(step) - min(step) + 1 AS span FROM r),
        b AS (
            SELECT (r.step - lim.lo) * {buckets} // lim.span AS bucket,
                   arg_min(r.x, r.y) AS x0, min(r.y) AS y0,
                   arg_max(r.x, r.y) AS x1, max(r.y) AS y1,
                   arg_min(r.x, r.step) AS xf, arg_min(r.y, r.step) AS yf,
                   arg_max(r.x, r.step) AS xl, arg_max(r.y, r.step) AS yl
            FROM r, lim GROUP BY bucket
        )
        SELECT x0 AS x, y0 AS y FROM b UNION SELECT x1, y1 FROM b
        UNION SELECT xf, yf FROM b WHERE bucket = 0
        UNION SELECT xl, yl FROM b WHERE bucket = (SELECT max(bucket) FROM b)
        ORDER BY x
        """
    ).fetchnumpy()
    xs, ys = np.asarray(got["x"]), np.asarray(got["y"])
    idx = downsample.lttb(xs, ys, n_out)
    return xs[idx], ys[idx]


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
