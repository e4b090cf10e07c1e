"""Per-layer tables (layers/, long) as heatmaps, and which layer went abnormal first.

**Abnormal**, as this explorer defines it: a layer's value at a recorded step is abnormal
when its robust z-score against the same layer's own trailing window exceeds
``Z_LIMIT`` in magnitude::

    z = 0.6745 * (x - median(w)) / MAD(w)

where ``w`` is the layer's previous ``WINDOW`` recorded values of that metric (at least
``MIN_HISTORY``), on the branch the spike happened on (its attempt's lineage), and MAD is
the median absolute deviation (floored at 1e-3 x |median| so that a flat history does
not make every wiggle infinite). 0.6745 makes z comparable to a normal z-score; the
limit is 6 (OLMo-core's spike rule is 6 sigma) rather than Iglewicz and Hoaglin's 3.5,
because a 96-layer model tests hundreds of (layer, metric, step) values per spike and a
looser limit finds noise. The *first* layer to go abnormal before a spike is
the one with the earliest abnormal step in the stretch that ends at the first recorded
step at or after the spike's onset (probes record layers every N steps, so the first look
after the onset is included), ties broken by the larger |z|.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from yoto import catalog

from .query import Table, lineage_sql

WINDOW = 32
MIN_HISTORY = 5
Z_LIMIT = 6.0
LOOKBACK = 4  # recorded steps before the onset searched for the first abnormal value
MAX_CELLS = 20_000  # per heatmap: bins per layer = MAX_CELLS // layers

# a heatmap cell summarises several steps: by the extreme that matters for the metric
LOW_IS_BAD = {catalog.ATTENTION_ENTROPY.name, catalog.ACTIVATION_HEADROOM.name}


def layer_order(names: list[str]) -> list[str]:
    """Blocks in depth order (numeric labels numerically), other names after."""
    return sorted(names, key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s))


def metrics(t: Table) -> list[str]:
    """The metrics of the newest segments (probes do not change during a run; reading the
    metric column of a 38M-row table would cost a second)."""
    q = "SELECT DISTINCT metric FROM {src} ORDER BY 1"
    return [r[0] for r in t.newest(8).query(q).fetchall()] or [r[0] for r in t.query(q).fetchall()]


def heatmap(
    t: Table, metric: str, firsts: dict[int, int], lineage: int, max_cells: int = MAX_CELLS
) -> pd.DataFrame:
    """layer, step0, step1 (the bin's step range), value: one row per (layer, step bin) on
    one lineage; each layer gets at most ``max_cells // layers`` bins."""
    t = t.only({a for a in firsts if a <= lineage})
    where = f"metric = $metric AND {lineage_sql(firsts, lineage)}"
    # the layer count from the newest segments (a segment may hold only another probe's
    # rows, e.g. spectra results: then ask the whole table)
    count = "SELECT count(DISTINCT layer) FROM {src} WHERE metric = $metric"
    n_layers = t.newest(8).query(count, {"metric": metric}).fetchone()[0]
    n_layers = n_layers or t.query(count, {"metric": metric}).fetchone()[0]
    lo, hi = (
        t.step_range()
        or t.query(
            f"SELECT min(step), max(step) FROM {{src}} WHERE {where}", {"metric": metric}
        ).fetchone()
    )
    if lo is None or not n_layers:
        return pd.DataFrame({"layer": [], "step0": [], "step1": [], "value": []})
    bins = max(1, min(hi - lo + 1, max_cells // n_layers))
    agg = "min" if metric in LOW_IS_BAD else "max"
    frame = t.df(
        f"SELECT layer, (step - $lo) * {bins} // ($hi - $lo + 1) AS bin, min(step) AS step0, "
        f"max(step) AS step1, {agg}(value) FILTER (WHERE isfinite(value)) AS value "
        f"FROM {{src}} WHERE {where} GROUP BY layer, bin HAVING value IS NOT NULL "
        "ORDER BY layer, bin",
        {"metric": metric, "lo": lo, "hi": hi},
    )
    return frame[["layer", "step0", "step1", "value"]]


@dataclass(frozen=True)
class Abnormal:
    layer: str
    step: int
    value: float
    z: float
    onset: int
    metric: str

    def describe(self) -> str:
        lead = self.onset - self.step
        when = (
            f"{lead} step{'s' * (lead != 1)} before the onset"
            if lead > 0
            else (
                "at the onset" if lead == 0 else f"{-lead} step{'s' * (lead != -1)} after the onset"
            )
        )
        return (
            f"layer {self.layer} went abnormal first: {self.metric} = {self.value:.4g} at step "
            f"{self.step} (robust z = {self.z:+.1f}), {when} at step {self.onset}"
        )


def robust_z(values: np.ndarray, window: int = WINDOW, min_history: int = MIN_HISTORY):
    """z of each value against the ``window`` values before it (NaN without history)."""
    z = np.full(values.shape, np.nan)
    for i in range(values.size):
        hist = values[max(0, i - window) : i]
        hist = hist[np.isfinite(hist)]
        if hist.size < min_history or not np.isfinite(values[i]):
            continue
        med = np.median(hist)
        mad = max(np.median(np.abs(hist - med)), 1e-3 * abs(med), 1e-12)
        z[i] = 0.6745 * (values[i] - med) / mad
    return z


def first_abnormal(
    rows: pd.DataFrame, onset: int, metric: str, lookback: int = LOOKBACK
) -> Abnormal | None:
    """From long rows (layer, step, value) of one metric on one lineage, the first layer
    to go abnormal in the stretch defined in the module docstring."""
    if rows.empty:
        return None
    steps = np.sort(rows.step.unique())
    after = steps[steps >= onset]
    end = after[0] if after.size else steps[-1]
    candidates = steps[steps <= end][-(lookback + 1) :]
    best: Abnormal | None = None
    for layer, group in rows.groupby("layer"):
        group = group.sort_values("step")
        z = robust_z(group.value.to_numpy(dtype=np.float64))
        hit = np.isin(group.step.to_numpy(), candidates) & (np.abs(z) > Z_LIMIT)
        if not hit.any():
            continue
        i = int(np.flatnonzero(hit)[0])
        found = Abnormal(
            str(layer),
            int(group.step.iloc[i]),
            float(group.value.iloc[i]),
            float(z[i]),
            onset,
            metric,
        )
        if best is None or (found.step, -abs(found.z)) < (best.step, -abs(best.z)):
            best = found
    return best


def rows_before(
    t: Table, metrics: list[str], firsts: dict[int, int], lineage: int, onset: int
) -> pd.DataFrame:
    """The rows (metric, layer, step, value) ``first_abnormal`` needs: the recorded steps
    up to the first at or after the onset, with enough history before them for the
    trailing windows. Read through a step window that widens until it holds them, from
    the segments whose names say they meet it."""
    t = t.only({a for a in firsts if a <= lineage})
    where = f"metric IN $metrics AND {lineage_sql(firsts, lineage)}"
    need = WINDOW + LOOKBACK + 1
    lo_all, hi_all = min(firsts.values(), default=0), _last(t)
    radius = 1024
    while True:
        lo, hi = onset - radius, onset + radius
        rows = t.between(lo, hi).df(
            f"SELECT metric, layer, step, value FROM {{src}} WHERE {where} "
            "AND step BETWEEN $lo AND $hi ORDER BY metric, layer, step",
            {"metrics": list(metrics), "lo": lo, "hi": hi},
        )
        steps = np.sort(rows.step.unique()) if not rows.empty else np.array([], dtype=np.int64)
        after = steps[steps >= onset]
        enough = steps[steps < onset].size >= need or lo <= lo_all
        if (after.size or hi >= hi_all) and enough:
            end = after[0] if after.size else onset
            keep = steps[steps <= end][-need:]
            return rows[rows.step.isin(keep)].reset_index(drop=True)
        radius *= 4


def _last(t: Table) -> int:
    known = t.step_range()
    if known is not None:
        return known[1]
    return int(t.query("SELECT max(step) FROM {src}").fetchone()[0] or 0)
