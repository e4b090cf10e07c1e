"""Downsampling of one series, so a chart never carries more points than a screen can show.

A line chart costs about 12 bytes a point on the wire; a 10M-step run drawn raw would be
120 MB. MinMaxLTTB (tsdownsample) keeps the shape a person looks for, including a one-step
spike: it first keeps the min and max of many small buckets, then picks among those with
Largest-Triangle-Three-Buckets.
"""

from __future__ import annotations

import numpy as np
from tsdownsample import LTTBDownsampler, MinMaxLTTBDownsampler

MAX_POINTS = 2000  # per series: well under the 5,000 target, plenty for a 2,000 px chart

_DOWNSAMPLER = MinMaxLTTBDownsampler()
_LTTB = LTTBDownsampler()


def indices(x: np.ndarray, y: np.ndarray, n_out: int) -> np.ndarray:
    """Indices (ascending) of at most ``n_out`` points of the finite part of (x, y).

    ``x`` must be non-decreasing. Non-finite y values are dropped first (a NaN would poison
    the triangle areas); a NaN-free series of at most ``n_out`` points is kept whole.
    """
    if n_out < 1:
        raise ValueError("n_out must be >= 1")
    x = np.asarray(x)
    y = np.asarray(y, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(y) & np.isfinite(x.astype(np.float64)))
    if finite.size <= n_out:
        return finite
    if n_out < 3:  # LTTB needs a first, a last and one bucket between
        return finite[np.linspace(0, finite.size - 1, n_out).round().astype(np.int64)]
    xs = np.ascontiguousarray(x[finite])
    ys = np.ascontiguousarray(y[finite])
    if not np.issubdtype(xs.dtype, np.floating):
        xs = xs.astype(np.int64)
    picked = _DOWNSAMPLER.downsample(xs, ys, n_out=n_out)
    return finite[np.asarray(picked, dtype=np.int64)]


def split_budget(lengths: list[int], total: int) -> list[int]:
    """Share ``total`` points among parts of a series in proportion to their lengths, at
    least 2 each (a part's first and last point) and never more than a part has; the sum
    never exceeds ``total`` unless there are more parts than total / 2."""
    if not lengths:
        return []
    size = sum(lengths)
    if size <= total:
        return list(lengths)
    budget = [min(n, max(2, int(total * n / size))) for n in lengths]
    while sum(budget) > total and max(budget) > 2:
        i = int(np.argmax(budget))
        budget[i] -= sum(budget) - total if budget[i] - (sum(budget) - total) >= 2 else 1
    return budget


def lttb(x: np.ndarray, y: np.ndarray, n_out: int) -> np.ndarray:
    """LTTB alone, for points that are already a min/max preselection (done in DuckDB for
    long series): the second half of MinMaxLTTB. x sorted, x and y finite."""
    if len(x) <= n_out:
        return np.arange(len(x))
    if n_out < 3:
        return np.linspace(0, len(x) - 1, n_out).round().astype(np.int64)
    xs = np.ascontiguousarray(x, dtype=np.float64)
    ys = np.ascontiguousarray(y, dtype=np.float64)
    return np.asarray(_LTTB.downsample(xs, ys, n_out=n_out), dtype=np.int64)
