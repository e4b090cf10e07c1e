"""Altair charts: interactive (pan/zoom, tooltips), axis titles with units from the catalog."""

from __future__ import annotations

import altair as alt
import pandas as pd

from yoto import catalog

UNITS = {
    "nats": "nats",
    "tokens": "tokens",
    "seconds": "s",
    "tokens_per_second": "tokens/s",
    "ratio": "fraction",
    "samples": "sequences",
    "bits": "bits",
    "steps": "steps",
}
# how a person says the unitless ones
PLAIN = {
    catalog.GRAD_NORM.name: "grad norm (L2, before clipping)",
    catalog.LEARNING_RATE.name: "learning rate",
    catalog.LOSS_SCALE.name: "fp16 loss scale (×)",
    catalog.LAYER_GRAD_NORM.name: "layer grad norm (L2)",
    catalog.LAYER_UPDATE_RATIO.name: "update ratio |Δw|/|w|",
    catalog.LAYER_PARAM_NORM.name: "layer param norm (L2)",
    catalog.ATTENTION_LOGIT_MAX.name: "attention max logit",
    catalog.ACTIVATION_ABSMAX.name: "activation |max|",
    catalog.ACTIVATION_RMS.name: "activation RMS",
    catalog.WEIGHT_ALPHA.name: "power-law alpha",
}
KIND_COLORS = {
    "spike": "#e45756",
    "overflow": "#f58518",
    "rollback": "#4c78a8",
    "batch_size": "#72b7b2",
    "alert": "#b279a2",
    "fault_injected": "#000000",
    "halt": "#9d755d",
}


def title(key: str) -> str:
    """``yoto_val_loss{source="code"}`` -> ``val loss, code (nats)``."""
    try:
        name, labels = catalog.parse_series_key(key)
    except ValueError:
        return key
    metric = catalog.CATALOG.get(name)
    base = PLAIN.get(name) or name.removeprefix("yoto_").replace("_", " ")
    for suffix in (" total", " seconds", " tokens per second", " ratio", " nats", " bits"):
        base = base.removesuffix(suffix)
    if labels:
        base += ", " + ", ".join(labels.values())
    unit = UNITS.get(metric.unit) if metric else None
    return f"{base} ({unit})" if unit and f"({unit})" not in base else base


def lines(
    frame: pd.DataFrame,
    x_title: str,
    y_title: str,
    log_y: bool = False,
    color: str = "series",
    color_title: str = "series",
    height: int = 260,
    zero: bool = False,
) -> alt.Chart:
    """One line per (series, attempt, branch); abandoned branches faded and dashed."""
    # the surviving branch is one line across attempts; each abandoned piece its own
    attempt = frame.attempt.astype(str).where(frame.branch != "surviving", "")
    piece = frame.series + " a" + attempt + frame.branch
    if color in frame and color not in ("series", "attempt", "branch"):
        piece = piece + " " + frame[color].astype(str)  # runs overlaid: one line each
    frame = frame.assign(piece=piece)
    zoom = alt.selection_interval(bind="scales", encodings=["x"])
    sparse = len(frame) < 40 * max(1, frame.piece.nunique())  # e.g. val loss: show points
    return (
        alt.Chart(frame)
        .mark_line(interpolate="linear", strokeWidth=1.4, point=sparse)
        .encode(
            x=alt.X("x:Q", title=x_title),
            y=alt.Y(
                "value:Q",
                title=y_title,
                scale=alt.Scale(type="log" if log_y else "linear", zero=zero and not log_y),
            ),
            color=alt.Color(
                f"{color}:N",
                title=color_title,
                scale=alt.Scale(scheme="tableau10"),  # attempts/runs in clearly different hues
                legend=alt.Legend() if frame[color].nunique() > 1 else None,
            ),
            detail="piece:N",
            opacity=alt.Opacity(
                "branch:N",
                scale=alt.Scale(domain=["surviving", "abandoned"], range=[1.0, 0.3]),
                title="branch",
            ),
            strokeDash=alt.StrokeDash(
                "branch:N",
                scale=alt.Scale(domain=["surviving", "abandoned"], range=[[1, 0], [4, 3]]),
                legend=None,
            ),
            tooltip=[
                alt.Tooltip("series:N"),
                alt.Tooltip("attempt:Q"),
                alt.Tooltip("branch:N"),
                alt.Tooltip("x:Q", title=x_title, format=",.0f"),
                alt.Tooltip("value:Q", title=y_title, format=".5g"),
            ],
        )
        .add_params(zoom)
        .properties(height=height)
    )


def event_rules(events: pd.DataFrame, pick: str | None = None) -> alt.Chart:
    """A vertical rule per event, coloured by kind; ``pick`` names a click selection."""
    data = events[["step", "attempt", "kind", "severity", "message"]].copy()
    data["id"] = events.index.astype(int)
    kinds = sorted(data.kind.unique())
    chart = (
        alt.Chart(data)
        .mark_rule(strokeWidth=2, opacity=0.8)
        .encode(
            x=alt.X("step:Q"),
            color=alt.Color(
                "kind:N",
                title="event",
                scale=alt.Scale(domain=kinds, range=[KIND_COLORS.get(k, "#888") for k in kinds]),
            ),
            tooltip=["kind:N", "step:Q", "attempt:Q", "severity:N", "message:N"],
        )
    )
    if pick:
        sel = alt.selection_point(name=pick, fields=["id"], on="click")
        chart = chart.add_params(sel).encode(
            strokeWidth=alt.condition(sel, alt.value(3), alt.value(1.5))
        )
    return chart


def heatmap(
    frame: pd.DataFrame,
    order: list[str],
    value_title: str,
    log_color: bool = False,
    highlight: pd.DataFrame | None = None,
    onset: int | None = None,
) -> alt.LayerChart:
    """Layer × step cells; ``highlight`` (layer, step0, step1) outlined in red, the onset a
    dashed rule."""
    frame = with_cell_ends(frame)
    base = (
        alt.Chart(frame)
        .mark_rect()
        .encode(
            x=alt.X("step0:Q", title="optimizer step"),
            x2="step_end:Q",
            y=alt.Y("layer:N", sort=order, title="layer (block)"),
            color=alt.Color(
                "value:Q",
                title=value_title,
                scale=alt.Scale(type="symlog" if log_color else "linear", scheme="viridis"),
            ),
            tooltip=[
                "layer:N",
                alt.Tooltip("step0:Q", title="from step"),
                alt.Tooltip("step1:Q", title="to step"),
                alt.Tooltip("value:Q", title=value_title, format=".4g"),
            ],
        )
    )
    layers: list[alt.Chart] = [
        base.add_params(alt.selection_interval(bind="scales", encodings=["x"]))
    ]
    if highlight is not None and not highlight.empty:
        ends = frame.set_index(["layer", "step0"]).step_end
        hl = highlight.assign(
            step_end=[ends.get((r.layer, r.step0), r.step1 + 1) for r in highlight.itertuples()]
        )
        layers.append(
            alt.Chart(hl)
            .mark_rect(fill=None, stroke="red", strokeWidth=3)
            .encode(x="step0:Q", x2="step_end:Q", y=alt.Y("layer:N", sort=order))
        )
    if onset is not None:
        layers.append(
            alt.Chart(pd.DataFrame({"step": [onset], "what": ["spike onset"]}))
            .mark_rule(color="red", strokeDash=[4, 3])
            .encode(x="step:Q", tooltip=["what:N", "step:Q"])
        )
    return alt.layer(*layers).properties(height=max(160, 14 * len(order)))


def with_cell_ends(frame: pd.DataFrame) -> pd.DataFrame:
    """A cell reaches to the next cell of its layer: probes record layers every N steps,
    and a one-step-wide cell per record would leave the heatmap mostly blank."""
    frame = frame.sort_values(["layer", "step0"])
    nxt = frame.groupby("layer").step0.shift(-1)
    gaps = (nxt - frame.step0).dropna()
    gap = float(gaps.median()) if len(gaps) else 1.0
    return frame.assign(step_end=nxt.fillna(frame.step1 + gap))


def histogram(frame: pd.DataFrame, x_title: str) -> alt.Chart:
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("lo:Q", bin="binned", title=x_title),
            x2="hi:Q",
            y=alt.Y("count:Q", title="steps"),
            tooltip=[
                alt.Tooltip("lo:Q", format=".4g"),
                alt.Tooltip("hi:Q", format=".4g"),
                "count:Q",
            ],
        )
        .properties(height=240)
    )
