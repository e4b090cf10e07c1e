"""Per-layer tables (layers/, long) as heatmaps, and which layer went abnormal first.

**Abnormal**, as this explorer defines it: a layer's value at a recorded step is abnormal
when its robust z-score against the same layer's own trailing window exceeds
``Z_LIMIT`` in magnitude::

    z = 0.6745 * (x - median(w)) / MAD(w)

where ``w`` is the layer's previous ``WINDOW`` recorded values of that metric (at least
``MIN_HISTORY``), on the branch the spike happened on (its attempt's lineage), and MAD is
the median absolute deviation (floored at 1e-3 x |median| so that a flat history does
not make every wiggle infinite). 0.6745 makes z comparable to a normal z-score; 3.5 is
Iglewicz and Hoaglin's outlier limit. The *first* layer to go abnormal before a spike is
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

WINDOW = 16
MIN_HISTORY = 5
Z_LIMIT = 3.5
LOOKBACK = 8  # recorded steps before the onset searched for the first abnormal value
MAX_CELLS = 20_000  # per heatmap: bins per layer = MAX_CELLS // layers

# a heatmap cell summarises several steps: by the extreme that matters for the metric
LOW_IS_BAD = {catalog.ATTENTION_ENTROPY.name, catalog.ACTIVATION_HEADROOM.name}


def layer_order(names: list[str]) -> list[str]:
    """Blocks in depth order (numeric labels numerically), other names after."""
    return sorted(names, key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s))


def metrics(t: Table) -> list[str]:
    return [r[0] for r in t.query("SELECT DISTINCT metric FROM {src} ORDER BY 1").fetchall()]


def heatmap(
    t: Table, metric: str, firsts: dict[int, int], lineage: int, max_cells: int = MAX_CELLS
) -> pd.DataFrame:
    """layer, step0, step1 (the bin's step range), value: one row per (layer, step bin) on
    one lineage; each layer gets at most ``max_cells // layers`` bins."""
    where = f"metric = $metric AND {lineage_sql(firsts, lineage)} AND isfinite(value)"
    lim = t.query(
        f"SELECT min(step), max(step), count(DISTINCT layer), count(DISTINCT step) "
        f"FROM {{src}} WHERE {where}",
        {"metric": metric},
    ).fetchone()
    if lim[0] is None:
        return pd.DataFrame({"layer": [], "step0": [], "step1": [], "value": []})
    lo, hi, n_layers, n_steps = lim
    bins = max(1, min(n_steps, max_cells // max(1, n_layers)))
    agg = "min" if metric in LOW_IS_BAD else "max"
    frame = t.df(
        f"SELECT layer, (step - $lo) * {bins} // ($hi - $lo + 1) AS bin, min(step) AS step0, "
        f"max(step) AS step1, {agg}(value) AS value FROM {{src}} WHERE {where} "
        "GROUP BY layer, bin ORDER BY layer, bin",
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
            f"{lead} steps before the onset"
            if lead > 0
            else ("at the onset" if lead == 0 else f"{-lead} steps after the onset")
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
    t: Table, metric: str, firsts: dict[int, int], lineage: int, onset: int
) -> pd.DataFrame:
    """The rows ``first_abnormal`` needs: the recorded steps up to the first at or after
    the onset, with enough history before them for the trailing windows."""
    where = f"metric = $metric AND {lineage_sql(firsts, lineage)}"
    end = t.query(
        f"SELECT min(step) FROM {{src}} WHERE {where} AND step >= $onset",
        {"metric": metric, "onset": onset},
    ).fetchone()[0]
    end = end if end is not None else onset
    need = WINDOW + LOOKBACK + 1
    start = t.query(
        f"SELECT min(step) FROM (SELECT DISTINCT step FROM {{src}} WHERE {where} "
        f"AND step <= $end ORDER BY step DESC LIMIT {need})",
        {"metric": metric, "end": end},
    ).fetchone()[0]
    if start is None:
        return pd.DataFrame({"layer": [], "step": [], "value": []})
    return t.df(
        f"SELECT layer, step, value FROM {{src}} WHERE {where} AND step BETWEEN $s AND $e "
        "ORDER BY layer, step",
        {"metric": metric, "s": start, "e": end},
    )
