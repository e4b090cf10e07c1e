"""Altair charts: interactive (pan/zoom, tooltips), axis titles with units from the catalog."""

from __future__ import annotations

import altair as alt
import pandas as pd

from yoto import catalog
from yoto.dashboards import units
from yoto.events import EventKind, Severity

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
    catalog.SEQ_LEN.name: "context length",
}
# The event kinds the charts mark, in lane order, each with its colour: the one list
# (the Timeline's markers, its events table's default filter, the markers' budget).
# Colours no attempt line uses (ATTEMPT_COLORS), so a marker never reads as data.
MARKED: dict[EventKind, str] = {
    EventKind.FAULT_INJECTED: "#000000",
    EventKind.SPIKE: "#d62728",
    EventKind.OVERFLOW: "#e377c2",
    EventKind.SKIP_STEP: "#008080",
    EventKind.ALERT: "#e6a100",
    EventKind.EPISODE: "#c51b7d",  # an episode's update or closing summary
    EventKind.ROLLBACK: "#9467bd",
    EventKind.BATCH_SIZE: "#6f6f6f",
    EventKind.HALT: "#5c0011",
}
UNMARKED_COLOR = "#888888"
MAX_MARKERS = 500  # event markers per chart; the events table lists them all


def markers(events: pd.DataFrame, limit: int = MAX_MARKERS) -> pd.DataFrame:
    """The events drawn on charts: the kinds that explain a run, most severe first when
    there are more than ``limit``."""
    marked = events[events.kind.isin(list(MARKED))]
    if len(marked) <= limit:
        return marked
    rank = marked.severity.map({Severity.CRITICAL: 0, Severity.WARNING: 1}).fillna(2)
    return marked.assign(_r=rank).sort_values(["_r", "step"]).head(limit).drop(columns="_r")


def title(key: str) -> str:
    """``yoto_val_loss{source="code"}`` -> ``val loss, code (nats)``."""
    try:
        name, labels = catalog.parse_series_key(key)
    except ValueError:
        return key
    metric = catalog.CATALOG.get(name)
    base = PLAIN.get(name) or name.removeprefix("yoto_").replace("_", " ")
    shown = units.unit(metric.unit) if metric else None
    unit = shown.axis if shown else ""
    base = base.removesuffix(" total")
    if shown and shown.restated_in_name:  # the parentheses say it
        base = base.removesuffix(" " + metric.unit.replace("_", " "))
    if labels:
        base += ", " + ", ".join(labels.values())
    return f"{base} ({unit})" if unit and f"({unit})" not in base else base


SURVIVING, ABANDONED = "surviving", "abandoned"
# Abandoned branches are drawn at full strength and dashed: what an attempt did before a
# rollback is the evidence, not a footnote. The dash is long enough to read at any zoom.
BRANCH_DASH = alt.Scale(domain=[SURVIVING, ABANDONED], range=[[1, 0], [6, 3]])
# attempts in clearly different hues that no event marker uses
ATTEMPT_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#17becf", "#8c564b", "#bcbd22", "#aec7e8"]
POINTS_UP_TO = 300  # an abandoned branch with at most this many points has them drawn
LANE_PX = 16  # height of one event kind's lane in the marker strip


def _pieces(frame: pd.DataFrame, color: str) -> pd.DataFrame:
    """One line per piece: the surviving branch is one line across attempts, each
    abandoned piece its own (and one per run when runs are overlaid)."""
    attempt = frame.attempt.astype(str).where(frame.branch != SURVIVING, "")
    piece = frame.series + " a" + attempt + frame.branch
    if color in frame and color not in ("series", "attempt", "branch"):
        piece = piece + " " + frame[color].astype(str)
    return frame.assign(piece=piece)


def _branch_dash(frame: pd.DataFrame) -> alt.StrokeDash:
    both = frame.branch.nunique() > 1
    legend = None
    if both:
        legend = alt.Legend(symbolType="stroke", symbolStrokeWidth=2, symbolStrokeColor="#444")
    return alt.StrokeDash("branch:N", scale=BRANCH_DASH, title="branch", legend=legend)


def _line_tooltip(x_title: str, y_title: str) -> list[alt.Tooltip]:
    return [
        alt.Tooltip("series:N"),
        alt.Tooltip("attempt:Q"),
        alt.Tooltip("branch:N"),
        alt.Tooltip("x:Q", title=x_title, format=",.0f"),
        alt.Tooltip("value:Q", title=y_title, format=".5g"),
    ]


def _y(y_title: str, log_y: bool, zero: bool = False) -> alt.Y:
    scale = alt.Scale(type="log" if log_y else "linear", zero=zero and not log_y)
    return alt.Y("value:Q", title=y_title, scale=scale)


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
    """One line per (series, attempt, branch); abandoned branches dashed."""
    frame = _pieces(frame, color)
    zoom = alt.selection_interval(bind="scales", encodings=["x"])
    sparse = len(frame) < 40 * max(1, frame.piece.nunique())  # e.g. val loss: show points
    return (
        alt.Chart(frame)
        .mark_line(interpolate="linear", strokeWidth=1.4, point=sparse)
        .encode(
            x=alt.X("x:Q", title=x_title),
            y=_y(y_title, log_y, zero),
            color=alt.Color(
                f"{color}:N",
                title=color_title,
                scale=alt.Scale(scheme="tableau10"),  # attempts/runs in clearly different hues
                legend=alt.Legend() if frame[color].nunique() > 1 else None,
            ),
            detail="piece:N",
            strokeDash=_branch_dash(frame),
            tooltip=_line_tooltip(x_title, y_title),
        )
        .add_params(zoom)
        .properties(height=height)
    )


def timeline(
    frame: pd.DataFrame,
    events: pd.DataFrame,
    x_title: str,
    y_title: str,
    log_y: bool = False,
    domain: tuple[int, int] | None = None,
    pick: str | None = None,
    height: int = 300,
) -> alt.TopLevelMixin:
    """A series per attempt, each in its own full-strength colour, with the run's events.

    Abandoned branches are dashed and drawn over the surviving one (which covers the same
    steps after a rollback), with their points when there are few, so a few-step spike
    stands out. Events are a strip of markers above the plot (a lane per kind, clickable:
    ``pick`` names the click selection) and thin translucent rules under the lines, so
    they never cover the data. ``domain`` fixes the x range (an incident's window)."""
    frame = _pieces(frame, "attempt")
    attempts = sorted(int(a) for a in frame.attempt.unique())
    x = alt.X(
        "x:Q",
        title=x_title,
        scale=alt.Scale(domain=list(domain), nice=False) if domain else alt.Undefined,
    )
    hues = alt.Scale(
        domain=attempts, range=[ATTEMPT_COLORS[a % len(ATTEMPT_COLORS)] for a in attempts]
    )
    base = alt.Chart(frame).encode(
        x=x, y=_y(y_title, log_y), tooltip=_line_tooltip(x_title, y_title)
    )
    lines = base.encode(
        color=alt.Color(
            "attempt:N",
            title="attempt",
            scale=hues,
            legend=alt.Legend(symbolType="stroke", symbolStrokeWidth=3),
        ),
        detail="piece:N",
        strokeDash=_branch_dash(frame),
    )
    surviving = lines.transform_filter(alt.datum.branch == SURVIVING).mark_line(
        strokeWidth=1.4, clip=True
    )
    layers = [surviving.add_params(alt.selection_interval(bind="scales", encodings=["x"]))]
    abandoned = frame[frame.branch == ABANDONED]
    if not abandoned.empty:
        only = alt.datum.branch == ABANDONED
        layers.append(lines.transform_filter(only).mark_line(strokeWidth=2, clip=True))
        if _in_view(abandoned, domain) <= POINTS_UP_TO:
            # fill, not colour: the attempt legend stays the lines' (a stroke per attempt)
            points = base.transform_filter(only).encode(
                fill=alt.Fill("attempt:N", scale=hues, legend=None)
            )
            layers.append(points.mark_point(filled=True, size=16, opacity=1, clip=True))
    marked = _marker_data(events, domain)
    if not marked.empty:
        layers.insert(0, _event_rules(marked, domain))
    plot = alt.layer(*layers).properties(height=height)
    if marked.empty:
        return plot
    strip = _event_strip(marked, domain, pick)
    return (
        alt.vconcat(strip, plot, spacing=4)
        .resolve_scale(x="shared", color="independent")
        .properties(autosize=alt.AutoSizeParams(type="fit-x", contains="padding"))
    )


def _in_view(frame: pd.DataFrame, domain: tuple[int, int] | None) -> int:
    if domain is None:
        return len(frame)
    return int(frame.x.between(*domain).sum())


def _marker_data(events: pd.DataFrame, domain: tuple[int, int] | None) -> pd.DataFrame:
    """The events to mark: those inside ``domain`` (so that only their lanes show)."""
    if domain is not None:
        events = events[events.step.between(*domain)]
    data = events[["step", "attempt", "kind", "severity", "message"]].copy()
    data["id"] = events.index.astype(int)
    data["colour"] = [MARKED.get(k, UNMARKED_COLOR) for k in data.kind]
    return data


def _lanes(marked: pd.DataFrame) -> list[str]:
    """The kinds present, in MARKED's order (then any other kind by name)."""
    present = set(marked.kind)
    return [str(k) for k in MARKED if k in present] + sorted(present - set(MARKED))


def _event_rules(marked: pd.DataFrame, domain: tuple[int, int] | None) -> alt.Chart:
    """Thin translucent rules at each event's step, drawn under the lines: guides to read
    the step off, not marks to click (aria off, so the strip's markers are the ones)."""
    scale = alt.Scale(domain=list(domain), nice=False) if domain else alt.Undefined
    return (
        alt.Chart(marked)
        .mark_rule(strokeWidth=1, strokeOpacity=0.4, clip=True, aria=False)
        # stroke, not colour: the colour legend (attempts) must not take the rules' opacity
        .encode(x=alt.X("step:Q", scale=scale), stroke=alt.Stroke("colour:N", scale=None))
    )


def _event_strip(marked: pd.DataFrame, domain: tuple[int, int] | None, pick: str | None):
    """A lane per event kind above the plot, a marker at each event's step."""
    lanes = _lanes(marked)
    scale = alt.Scale(domain=list(domain), nice=False) if domain else alt.Undefined
    chart = (
        alt.Chart(marked)
        .mark_point(shape="triangle-down", filled=True, size=110, opacity=1, clip=True)
        .encode(
            x=alt.X(
                "step:Q",
                scale=scale,
                axis=alt.Axis(title=None, labels=False, ticks=False, domain=False, grid=False),
            ),
            y=alt.Y("kind:N", sort=lanes, title=None, axis=alt.Axis(grid=True)),
            color=alt.Color("colour:N", scale=None),
            tooltip=["kind:N", "step:Q", "attempt:Q", "severity:N", "message:N"],
        )
        .properties(height=LANE_PX * len(lanes))
    )
    if pick:
        sel = alt.selection_point(name=pick, fields=["id"], on="click")
        chart = chart.add_params(sel).encode(
            size=alt.condition(sel, alt.value(200), alt.value(110))
        )
    return chart


# a replay diagnosis's trajectories (trainer/diagnose.py), in this order and these colours
REPLAY_COLORS = {"recorded": "#1f77b4", "replay": "#ff7f0e", "without_onset": "#2ca02c"}
REPLAY_DASH = {"recorded": [1, 0], "replay": [6, 3], "without_onset": [2, 2]}


def replays(frame: pd.DataFrame, onset: int, height: int = 150) -> alt.TopLevelMixin:
    """A diagnosis's trajectories against step, a panel per metric (catalog names): the
    recorded one wide and pale underneath, the replays dashed with their points on top, so
    a replay that repeats the record exactly shows as a dashed line inside a wide one; the
    onset a dashed red rule."""
    labels = [k for k in REPLAY_COLORS if k in set(frame.series)]
    labels += sorted(set(frame.series) - set(labels))
    color = alt.Color(
        "series:N",
        title=None,
        scale=alt.Scale(
            domain=labels, range=[REPLAY_COLORS.get(k, UNMARKED_COLOR) for k in labels]
        ),
        legend=alt.Legend(orient="top", symbolType="stroke", symbolStrokeWidth=3),
    )
    dash = alt.StrokeDash(
        "series:N",
        scale=alt.Scale(domain=labels, range=[REPLAY_DASH.get(k, [4, 2]) for k in labels]),
        legend=None,
    )
    onset_rule = (
        alt.Chart(pd.DataFrame({"step": [onset], "what": ["spike onset"]}))
        .mark_rule(color="red", strokeDash=[4, 3])
        .encode(x="step:Q", tooltip=["what:N", "step:Q"])
    )
    panels = []
    for metric, part in frame.groupby("metric", sort=False):
        base = alt.Chart(part).encode(
            x=alt.X("x:Q", title="optimizer step", scale=alt.Scale(zero=False)),
            y=_y(title(metric), log_y=False),
            color=color,
            tooltip=[
                alt.Tooltip("series:N", title="trajectory"),
                alt.Tooltip("x:Q", title="step"),
                alt.Tooltip("value:Q", title=title(metric), format=".5g"),
            ],
        )
        recorded = base.transform_filter(alt.datum.series == "recorded")
        others = base.transform_filter(alt.datum.series != "recorded")
        panels.append(
            alt.layer(
                recorded.mark_line(strokeWidth=5, opacity=0.35),
                others.mark_line(strokeWidth=1.6, point=True).encode(strokeDash=dash),
                onset_rule,
            ).properties(height=height)
        )
    return (
        alt.vconcat(*panels, spacing=6)
        .resolve_scale(x="shared")
        .properties(autosize=alt.AutoSizeParams(type="fit-x", contains="padding"))
    )


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
