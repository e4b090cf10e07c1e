"""Frames and Altair charts for the Scaling page (no Streamlit here, so tests can call it).

Loss against N (non-embedding parameters) and against the approximate training compute
C ≈ 6·N·D (``laws.compute_6nd``, Kaplan et al.'s estimate; not the trainer's exact FLOP
count), each with the fitted law drawn through the points; residuals as
log(observed / predicted) per run. The same charts draw a few-shot score's fit
(``yoto.scaling.runs.ScoreFit``): its points hold the fitted quantity (1 - accuracy, log
perplexity), named by ``y_title``; ``effective_table`` is the table of effective sizes by
loss and by score.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from yoto.scaling.laws import COMPUTE_6ND_LABEL, Fit, compute_6nd, fmt_count
from yoto.scaling.runs import ScoreFit, size_cell

C_6ND = "C_6ND"  # the frames' column of approximate compute (laws.compute_6nd)


def points_frame(result: Fit, paths: list[str] | None = None) -> pd.DataFrame:
    """One row per fitted point: N, D, C_6ND, observed and predicted loss, residual."""
    pts = result.points
    n = np.array([p.n for p in pts], dtype=float)
    d = np.array([p.d if p.d is not None else np.nan for p in pts], dtype=float)
    pred = result.predict(n, d if result.law == "chinchilla" else None)
    loss = np.array([p.loss for p in pts])
    return pd.DataFrame(
        {
            "run": [p.name for p in pts],
            "N": n,
            "D": d,
            C_6ND: compute_6nd(n, d),
            "tokens": [fmt_count(x) for x in d],
            "loss": loss,
            "predicted": pred,
            "residual": np.log(loss) - np.log(pred),
            "path": paths or [""] * len(pts),
        }
    )


def curves_frame(result: Fit, frame: pd.DataFrame, samples: int = 60) -> pd.DataFrame:
    """The fitted law as lines: one over N for Kaplan; for Chinchilla one per token budget
    of the points (the law at that D), so each line runs through the runs of its budget."""
    lo, hi = frame.N.min() / 1.5, frame.N.max() * 1.5
    grid = np.geomspace(lo, hi, samples)
    rows = []
    budgets = [None] if result.law != "chinchilla" else sorted(frame.D.dropna().unique())
    for d in budgets:
        loss = result.predict(grid, None if d is None else np.full_like(grid, d))
        label = "law" if d is None else f"law at D={fmt_count(d)}"
        rows.append(
            pd.DataFrame(
                {
                    "N": grid,
                    C_6ND: compute_6nd(grid, d if d is not None else np.nan),
                    "loss": loss,
                    "curve": label,
                    "tokens": "" if d is None else fmt_count(d),
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def loss_vs(
    points: pd.DataFrame,
    curves: pd.DataFrame,
    x: str,
    x_title: str,
    highlight: str | None = None,
    y_title: str = "validation loss (nats)",
) -> alt.LayerChart:
    """Points (coloured by token budget) with the fitted law; ``highlight`` a run's path;
    ``y_title`` what the points' ``loss`` column holds."""
    tooltip = [
        "run:N",
        alt.Tooltip("N:Q", format=".4s", title="N (non-embedding)"),
        alt.Tooltip("D:Q", format=".4s", title="D (tokens)"),
        alt.Tooltip(f"{C_6ND}:Q", format=".3s", title=COMPUTE_6ND_LABEL),
        alt.Tooltip("loss:Q", format=".4f", title=y_title),
        alt.Tooltip("predicted:Q", format=".4f", title="law"),
    ]
    xs = alt.X(f"{x}:Q", title=x_title, scale=alt.Scale(type="log"))
    ys = alt.Y("loss:Q", title=y_title, scale=alt.Scale(type="log", zero=False))
    dots = (
        alt.Chart(points)
        .mark_circle(size=70, opacity=0.9)
        .encode(x=xs, y=ys, color=alt.Color("tokens:N", title="tokens D"), tooltip=tooltip)
    )
    layers = []
    drawn = curves.dropna(subset=[x])
    if not drawn.empty:
        layers.append(
            alt.Chart(drawn)
            .mark_line(strokeDash=[5, 3], strokeWidth=1.5)
            .encode(x=xs, y=ys, color=alt.Color("tokens:N", title="tokens D"), detail="curve:N")
        )
    layers.append(dots)
    if highlight:
        chosen = points[points.path == highlight]
        if not chosen.empty:
            layers.append(
                alt.Chart(chosen)
                .mark_point(size=260, shape="diamond", filled=False, strokeWidth=2, color="red")
                .encode(x=xs, y=ys, tooltip=tooltip)
            )
    return alt.layer(*layers).properties(height=320)


def residuals(points: pd.DataFrame) -> alt.LayerChart:
    base = alt.Chart(points).encode(
        x=alt.X("N:Q", title="non-embedding parameters N", scale=alt.Scale(type="log")),
    )
    dots = base.mark_circle(size=70).encode(
        y=alt.Y("residual:Q", title="log(observed / law)", axis=alt.Axis(format=".1%")),
        color=alt.Color("tokens:N", title="tokens D"),
        tooltip=[
            "run:N",
            alt.Tooltip("residual:Q", format="+.2%", title="observed / law - 1 (≈)"),
        ],
    )
    zero = alt.Chart(pd.DataFrame({"zero": [0.0]})).mark_rule(color="gray").encode(y="zero:Q")
    return alt.layer(zero, dots).properties(height=220)


def effective_table(sf: ScoreFit) -> pd.DataFrame:
    """One row per fitted run: N, its loss and effective size by loss, its score, the law's
    score and its effective size by score (with the bootstrap interval) and the ratio."""
    metric = sf.metric.metric
    rows = []
    for row in sf.rows():
        eff, by_loss = row["effective_size"], row["effective_size_by_loss"]
        finite = eff.finite and not np.isnan(eff.value)
        rows.append(
            {
                "run": row["name"],
                "N": fmt_count(row["N"]),
                "step": row["step"],
                "loss": row["loss"],
                "N_eff(loss)": size_cell(by_loss, row["N"], interval=False),
                metric: row["score"],
                f"law's {metric}": row["predicted_score"],
                "N_eff(score)": size_cell(eff, None, interval=False),
                f"{sf.fit.confidence:.0%} interval": (
                    f"[{fmt_count(eff.low)}, {fmt_count(eff.high)}]" if finite else "-"
                ),
                "× its size": eff.value / row["N"] if finite else np.nan,
                "path": row["path"],
            }
        )
    return pd.DataFrame(rows)
