"""Panels described from the catalog, then rendered with grafana-foundation-sdk builders.

A :class:`Query` carries the catalog metrics it reads and the Grafana unit its values
have (from :mod:`yoto.dashboards.units`, the table the explorer shares); a
:class:`PanelSpec` gets its title, unit and description from those entries unless the
layout says otherwise. Only :func:`render` knows the SDK.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from grafana_foundation_sdk.builders import bargauge, common, dashboard, heatmap, prometheus, stat
from grafana_foundation_sdk.builders import timeseries as ts
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm

from yoto.catalog import Metric
from yoto.dashboards.live import promql
from yoto.dashboards.units import grafana_unit

DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")

Kind = Literal["timeseries", "stat", "heatmap", "bargauge"]


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str
    metrics: tuple[Metric, ...]
    unit: str
    note: str = ""  # how the expression derives from the metric, for the description


def _legend(labels: Iterable[str]) -> str:
    return " ".join("{{" + label + "}}" for label in labels)


def value(metric: Metric, agg: str | None = None, legend: str | None = None) -> Query:
    """The metric as exported: one series per run and label set, or ``agg`` per label
    (e.g. max per layer over the chosen runs, so a heatmap has one row per layer)."""
    if agg:
        expr = promql.aggregate(agg, metric, metric.labels)
        default_legend = _legend(metric.labels)
        note = f"{agg} over the chosen runs"
    else:
        expr = promql.selector(metric)
        default_legend = _legend(("instance", *metric.labels))
        note = ""
    unit = grafana_unit(metric.unit)
    return Query(expr, legend or default_legend, (metric,), unit, note)


def per_second(metric: Metric, labels: Sequence[str] = ("instance",)) -> Query:
    """Rate of a counter; its unit is the catalog unit per second."""
    return Query(
        promql.rate(metric, labels),
        _legend(labels),
        (metric,),
        grafana_unit(f"{metric.unit}_per_second"),
        "per second",
    )


def events(metric: Metric, labels: Sequence[str] = ("instance",), **matchers: str) -> Query:
    """How many times a counter moved in the rate window (a bar per event burst)."""
    return Query(
        promql.increase(metric, labels, **matchers),
        _legend(labels),
        (metric,),
        grafana_unit(metric.unit),
        "increase over the rate window",
    )


def age(metric: Metric) -> Query:
    """Seconds since a ``*_timestamp_seconds`` gauge was set."""
    if metric.unit != "seconds":
        raise ValueError(f"{metric.name} is not a timestamp in seconds")
    expr = f"time() - max by (instance) ({promql.selector(metric)})"
    return Query(expr, "{{instance}}", (metric,), grafana_unit("seconds"), "seconds ago")


def custom(expr: str, legend: str, metrics: Sequence[Metric], unit: str, note: str) -> Query:
    """An expression the helpers above cannot write (names still come from constants)."""
    return Query(expr, legend, tuple(metrics), unit, note)


def title_of(metric: Metric) -> str:
    """``yoto_grad_norm_spikes_total`` -> ``Grad norm spikes``."""
    words = metric.name.removeprefix("yoto_").removesuffix("_total").split("_")
    return " ".join(words).capitalize()


@dataclass
class PanelSpec:
    kind: Kind
    queries: tuple[Query, ...]
    title: str = ""
    unit: str = ""
    description: str = ""
    width: int = 8
    height: int = 8
    log_scale: int = 0  # log base of the y axis (0: linear)
    bars: bool = False
    stack: str = ""  # "normal" or "percent" (a share of the whole)
    right_axis: tuple[str, ...] = ()  # refIds drawn on a right-hand axis in their own unit
    mappings: dict[str, tuple[str, str]] = field(default_factory=dict)  # value->(text,color)
    thresholds: tuple[tuple[float | None, str], ...] = ()
    text_mode: str = ""  # stat: "name" shows the legend instead of the value
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        first = self.queries[0]
        if not self.title and not first.metrics:
            raise ValueError(f"a panel on {first.expr!r} needs a title (no catalog metric)")
        self.title = self.title or title_of(first.metrics[0])
        self.unit = self.unit or first.unit
        if not self.description:
            self.description = describe(self.queries)

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return tuple(m for q in self.queries for m in q.metrics)


def describe(queries: Iterable[Query]) -> str:
    """The catalog help of every metric the panel reads (and how it is derived)."""
    seen, lines = set(), []
    for q in queries:
        for m in q.metrics:
            if m.name in seen:
                continue
            seen.add(m.name)
            how = f" ({q.note})" if q.note else ""
            lines.append(f"`{m.name}`{how}: {m.help}")
    return "\n\n".join(lines)


def ref_id(index: int) -> str:
    return chr(ord("A") + index)


def render(spec: PanelSpec, panel_id: int) -> dashboard.Panel:
    """The SDK builder for one panel."""
    builder = {
        "timeseries": _timeseries,
        "stat": _stat,
        "heatmap": _heatmap,
        "bargauge": _bargauge,
    }[spec.kind](spec)
    builder = (
        builder.id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .datasource(DATASOURCE)
        .unit(spec.unit)
        .span(spec.width)
        .height(spec.height)
    )
    for i, q in enumerate(spec.queries):
        target = (
            prometheus.Dataquery()
            .expr(q.expr)
            .legend_format(q.legend)
            .ref_id(ref_id(i))
            .datasource(DATASOURCE)
        )
        target = target.instant() if spec.kind in ("stat", "bargauge") else target.range()
        builder = builder.with_target(target)
    if spec.min is not None:
        builder = builder.min(spec.min)
    if spec.max is not None:
        builder = builder.max(spec.max)
    if spec.mappings:
        options = {
            k: dm.ValueMappingResult(text=text, color=color, index=i)
            for i, (k, (text, color)) in enumerate(sorted(spec.mappings.items()))
        }
        builder = builder.mappings([dm.ValueMap(options)])
    if spec.thresholds:
        steps = [dm.Threshold(value=v, color=c) for v, c in spec.thresholds]
        builder = builder.thresholds(
            dashboard.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(steps)
        )
    return builder


def _timeseries(spec: PanelSpec) -> ts.Panel:
    panel = (
        ts.Panel()
        .legend(
            common.VizLegendOptions()
            .show_legend(True)
            .display_mode(cm.LegendDisplayMode.LIST)
            .placement(cm.LegendPlacement.BOTTOM)
        )
        .tooltip(common.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI))
    )
    if spec.log_scale:
        panel = panel.scale_distribution(
            common.ScaleDistributionConfig().type(cm.ScaleDistribution.LOG).log(spec.log_scale)
        )
    if spec.bars:
        panel = panel.draw_style(cm.GraphDrawStyle.BARS).fill_opacity(60)
    if spec.stack:
        panel = panel.stacking(common.StackingConfig().mode(cm.StackingMode(spec.stack)))
    for ref in spec.right_axis:
        index = ord(ref) - ord("A")
        panel = panel.override_by_query(
            ref,
            [
                dm.DynamicConfigValue(id_val="unit", value=spec.queries[index].unit),
                dm.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
            ],
        )
    return panel


def _stat(spec: PanelSpec) -> stat.Panel:
    panel = (
        stat.Panel()
        .graph_mode(cm.BigValueGraphMode.NONE)
        .color_mode(cm.BigValueColorMode.VALUE)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    if spec.text_mode:
        panel = panel.text_mode(cm.BigValueTextMode(spec.text_mode))
    return panel


def _heatmap(spec: PanelSpec) -> heatmap.Panel:
    # Each series (one per layer) is a row of cells: no bucketing by Grafana.
    return (
        heatmap.Panel()
        .calculate(False)
        .color(
            heatmap.HeatmapColorOptions()
            .mode(hm.HeatmapColorMode.SCHEME)
            .scheme("Spectral")
            .scale(hm.HeatmapColorScale.EXPONENTIAL)
            .exponent(0.5)
            .steps(64)
        )
        .y_axis(heatmap.YAxisConfig().axis_label("layer"))
        .cell_values(heatmap.CellValues().unit(spec.unit))
        .show_tooltip()
        .show_legend()
    )


def _bargauge(spec: PanelSpec) -> bargauge.Panel:
    return (
        bargauge.Panel()
        .display_mode(cm.BarGaugeDisplayMode.GRADIENT)
        .orientation(cm.VizOrientation.HORIZONTAL)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
