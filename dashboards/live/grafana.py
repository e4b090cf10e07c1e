"""Grafana dashboards as code: five dashboards generated from the metric catalog.

    build_all()             {"yoto-overview.json": {...dashboard JSON...}, ...}
    panel_queries(board)    every PromQL expression of a dashboard, ready for Prometheus
    write_all(out_dir)      the JSON files as checked in under deploy/grafana/dashboards

Every expression is written through :mod:`yoto.dashboards.live.promql` from catalog
constants, carries ``instance=~"$instance"`` (the run picker) and uses no Grafana macro
but ``$__rate_interval``. A catalog metric that no curated panel shows still gets a
generic panel in the Overview's last row, so adding a metric never leaves it unseen.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

from yoto import catalog as c
from yoto.config import Config
from yoto.dashboards.live import promql
from yoto.dashboards.live.panels import (
    DATASOURCE,
    PanelSpec,
    Query,
    age,
    custom,
    describe,
    events,
    per_second,
    render,
    value,
)
from yoto.dashboards.units import grafana_unit
from yoto.events import EventKind

TAG = "yoto"
REFRESH = "30s"


@dataclass(frozen=True)
class Section:
    title: str
    panels: tuple[PanelSpec, ...]


@dataclass(frozen=True)
class Annotation:
    name: str
    query: Query
    color: str
    enabled: bool = True


@dataclass(frozen=True)
class Board:
    file: str
    uid: str
    title: str
    description: str
    sections: tuple[Section, ...]


def _ts(*queries: Query, **kw: Any) -> PanelSpec:
    return PanelSpec("timeseries", queries, **kw)


def _stat(*queries: Query, **kw: Any) -> PanelSpec:
    kw.setdefault("width", 3)
    kw.setdefault("height", 4)
    return PanelSpec("stat", queries, **kw)


def _heat(metric: c.Metric, agg: str = "max", **kw: Any) -> PanelSpec:
    return PanelSpec("heatmap", (value(metric, agg=agg),), width=12, height=9, **kw)


def _bars(*queries: Query, **kw: Any) -> PanelSpec:
    return PanelSpec("timeseries", queries, bars=True, **kw)


# --- the five dashboards --------------------------------------------------------------


def _overview() -> Board:
    up = custom(
        promql.selector("up", job=c.SCRAPE_JOB),
        "{{instance}}",
        (),
        grafana_unit(""),
        "Prometheus' own scrape health of the trainer's rank 0",
    )
    health = Section(
        "Health",
        (
            _stat(
                value(c.RUN_INFO, legend="{{name}} · {{run}} ({{preset}})"),
                title="Run",
                text_mode="name",
                width=6,
            ),
            _stat(
                up,
                title="Metrics endpoint",
                description="1 when Prometheus could scrape the trainer's /metrics.",
                mappings={"0": ("DOWN", "red"), "1": ("up", "green")},
            ),
            _stat(
                value(c.HALTED),
                title="Status",
                mappings={"0": ("training", "green"), "1": ("HALTED", "red")},
            ),
            _stat(
                value(c.RUN_ENDED),
                title="Ended",
                mappings={"0": ("running", "green"), "1": ("ended", "blue")},
            ),
            _stat(
                age(c.LAST_STEP_TIME),
                title="Since last step",
                thresholds=((None, "green"), (120, "orange"), (600, "red")),
            ),
            _stat(value(c.ATTEMPT), thresholds=((None, "green"), (1, "orange"))),
            _stat(value(c.STEPS), title="Steps"),
            _stat(value(c.TOKENS), title="Tokens"),
        ),
    )
    training = Section(
        "Training",
        (
            _ts(value(c.TRAIN_LOSS), value(c.TRAIN_LOSS_WINDOW_MAX), width=12),
            _ts(value(c.GRAD_NORM), value(c.GRAD_NORM_WINDOW_MAX), width=12, log_scale=10),
            _ts(value(c.Z_LOSS)),
            _ts(value(c.LEARNING_RATE)),
            _ts(value(c.BATCH_SIZE_TOKENS)),
            _ts(value(c.SEQ_LEN), title="Context length (sequence warmup)"),
            _ts(value(c.SAMPLER_POSITION), title="Data position (sequences drawn; skips jump)"),
            _ts(value(c.ATTEMPT)),
            _ts(value(c.THROUGHPUT), per_second(c.TOKENS)),
            _ts(value(c.MFU), min=0, max=1),
            _ts(value(c.STEP_DURATION)),
        ),
    )
    ranks = Section(
        "Ranks",
        (
            _ts(
                value(c.RANK_STEP),
                value(c.RANK_MEDIAN_STEP, legend="{{instance}} median"),
                title="Own step time per rank (and the median)",
                width=16,
            ),
            _stat(
                value(c.STRAGGLERS),
                title="Stragglers",
                thresholds=((None, "green"), (1, "red")),
                width=8,
                height=8,
            ),
            _ts(value(c.RANK_DATA_WAIT), title="Data wait per rank", width=12),
            _ts(value(c.RANK_PEAK_MEMORY), title="Peak CUDA memory per rank", width=12),
        ),
    )
    system = Section(
        "System",
        (
            _ts(value(c.PROCESS_RSS), title="Host memory (RSS, rank 0)"),
            _ts(
                value(c.CUDA_ALLOCATED),
                value(c.CUDA_RESERVED),
                value(c.CUDA_PEAK),
                title="CUDA memory (rank 0)",
            ),
            _bars(events(c.CUDA_ALLOC_RETRIES), title="CUDA allocation retries (rank 0)"),
            _ts(value(c.GPU_POWER), title="GPU power (rank 0)", width=6),
            _ts(value(c.GPU_TEMPERATURE), title="GPU temperature (rank 0)", width=6),
            _ts(value(c.GPU_UTILIZATION), title="GPU utilisation (rank 0)", min=0, max=1, width=6),
            _ts(value(c.GPU_SM_CLOCK), title="GPU SM clock (rank 0)", width=6),
        ),
    )
    live = Section(
        "Live path",
        (
            _bars(events(c.ALERTS_SENT, ("channel",)), title="Chat notifications sent"),
            _bars(events(c.ALERTS_FAILED, ("channel",)), title="Chat delivery failures"),
            _bars(events(c.ALERTS_DROPPED, ("reason",)), title="Chat notifications dropped"),
            _bars(events(c.PROBE_FAILURES, ("probe",))),
            _stat(value(c.LAYER_SERIES_DROPPED), width=8, height=8),
        ),
    )
    return Board(
        "yoto-overview.json",
        "yoto-overview",
        "yoto · Overview",
        "Is the run alive and learning: health, loss, gradient, schedule, speed, ranks, "
        "memory and GPUs.",
        (health, training, ranks, system, live),
    )


def _stability() -> Board:
    spikes = Section(
        "Spikes",
        (
            _ts(value(c.TRAIN_LOSS), value(c.TRAIN_LOSS_WINDOW_MAX), width=12),
            _ts(value(c.GRAD_NORM), value(c.GRAD_NORM_WINDOW_MAX), width=12, log_scale=10),
            _bars(events(c.LOSS_SPIKES)),
            _bars(events(c.GRAD_NORM_SPIKES)),
            _ts(value(c.SPIKE_SCORE), min=0, max=1),
            _bars(events(c.NONFINITE_LOSS_STEPS), title="Non-finite loss steps"),
            _ts(value(c.STEP_SKIPPED), min=0, max=1, title="Update skipped (skip-step)"),
        ),
    )
    interventions = Section(
        "Interventions",
        (
            _bars(events(c.ROLLBACKS)),
            _bars(events(c.EPISODES)),
            _bars(events(c.PAGED_EPISODES), title="Paged episodes (one page each)"),
            _bars(events(c.SKIPPED_STEPS)),
            _bars(events(c.SKIPPED_BATCHES)),
            _bars(events(c.BATCH_SIZE_CHANGES)),
            _bars(events(c.FAULTS_INJECTED)),
            _ts(value(c.HALTED), min=0, max=1),
            _bars(
                events(c.EVENTS, ("kind", "severity")),
                title="Events by kind",
                stack="normal",
            ),
        ),
    )
    gns = Section(
        "Gradient noise scale",
        (
            _ts(
                value(c.GRADIENT_NOISE_SCALE),
                value(c.BATCH_SIZE_TOKENS),
                title="Gradient noise scale vs batch size",
                right_axis=("B",),
                width=12,
            ),
            _ts(
                value(c.GRADIENT_SQ_NORM_ESTIMATE),
                value(c.GRADIENT_TRACE_SIGMA),
                title="|G|² and tr(Σ) estimates",
                log_scale=10,
                width=12,
            ),
        ),
    )
    return Board(
        "yoto-stability.json",
        "yoto-stability",
        "yoto · Stability",
        "Spikes, what the policy did about them, and the gradient noise scale.",
        (spikes, interventions, gns),
    )


def _precision() -> Board:
    scale = Section(
        "Loss scale",
        (
            _ts(value(c.LOSS_SCALE), log_scale=2),
            _ts(value(c.LOSS_SCALE_HEADROOM), min=0),
            _ts(value(c.LOSS_SCALE_STEPS_SINCE_GROWTH)),
        ),
    )
    overflow = Section(
        "Overflow and underflow",
        (
            _bars(events(c.OVERFLOW_STEPS)),
            _ts(value(c.CONSECUTIVE_OVERFLOWS)),
            _ts(value(c.GRAD_UNDERFLOW), min=0),
        ),
    )
    headroom_min = custom(
        promql.aggregate("min", c.ACTIVATION_HEADROOM, ("instance",)),
        "{{instance}}",
        (c.ACTIVATION_HEADROOM,),
        grafana_unit(c.ACTIVATION_HEADROOM.unit),
        "smallest over layers",
    )
    activations = Section(
        "Activations",
        (
            _heat(c.ACTIVATION_HEADROOM, agg="min", title="Activation headroom per layer"),
            _heat(c.ACTIVATION_ABSMAX, title="Activation absmax per layer"),
            _ts(headroom_min, title="Smallest activation headroom", width=24),
        ),
    )
    return Board(
        "yoto-precision.json",
        "yoto-precision",
        "yoto · Precision",
        "fp16/bf16 health: loss scale, overflows, gradient underflow, activation headroom.",
        (scale, overflow, activations),
    )


def _alpha_gauge(cfg: Config) -> PanelSpec:
    """Latest alpha per layer against the spectra probe's healthy band (from the config
    the dashboards are built from: the band the probe warns on is the band drawn)."""
    band = cfg.probes.spectra
    latest = value(c.WEIGHT_ALPHA, agg="max")
    return PanelSpec(
        "bargauge",
        (latest,),
        title="Weight alpha per layer (latest)",
        description=describe((latest,))
        + f"\n\nHealthy band {band.alpha_low:g} ≤ alpha ≤ {band.alpha_high:g} (probes.spectra):"
        " below, over-trained or heavy-tailed (red); above, under-trained or a bad fit (orange).",
        # below the band red, inside green, above orange
        thresholds=((None, "red"), (band.alpha_low, "green"), (band.alpha_high, "orange")),
        min=0,
        max=max(10, band.alpha_high + 2),  # the band stays on the scale
        width=12,
        height=18,
    )


def _layers(cfg: Config) -> Board:
    layers = Section(
        "Per-layer statistics",
        (
            _heat(c.LAYER_GRAD_NORM, title="Grad norm per layer"),
            _heat(c.LAYER_UPDATE_RATIO, title="Update ratio per layer"),
            _heat(c.ACTIVATION_RMS, title="Activation RMS per layer"),
            _heat(c.LAYER_PARAM_NORM, title="Parameter norm per layer"),
            _heat(c.ATTENTION_LOGIT_MAX, title="Attention logit max per layer"),
            _heat(c.ATTENTION_ENTROPY, agg="min", title="Attention entropy per layer"),
            _ts(value(c.OUTPUT_LOG_Z), width=12),
            _ts(value(c.Z_LOSS), width=12),  # model.z_loss: what keeps log Z near zero
        ),
    )
    spectra = Section(
        "Spectra (weightwatcher)",
        (
            _alpha_gauge(cfg),
            _heat(c.WEIGHT_ALPHA, title="Weight alpha per layer"),
            _heat(c.WEIGHT_ALPHA_WEIGHTED, title="Weighted alpha per layer"),
            _heat(c.WEIGHT_STABLE_RANK, title="Stable rank per layer"),
            _heat(c.WEIGHT_LOG_SPECTRAL_NORM, title="Log spectral norm per layer"),
            _heat(c.WEIGHT_LOG_NORM, title="Log norm per layer"),
            _bars(events(c.SPECTRA_SKIPPED), width=12),
        ),
    )
    return Board(
        "yoto-layers.json",
        "yoto-layers",
        "yoto · Layers & spectra",
        "Per-layer gradient, update, activation and attention statistics; weight spectra.",
        (layers, spectra),
    )


def _data() -> Board:
    data = Section(
        "Data sources",
        (
            _ts(value(c.VAL_LOSS), title="Validation loss per source", width=12),
            _ts(
                value(c.EVAL_SCORE),
                title="Few-shot scores of the newest evaluated checkpoint (eval.harness)",
                width=12,
            ),
            _ts(value(c.EVAL_SKIPPED), title="Checkpoints not evaluated (evaluator busy)"),
            _ts(
                per_second(c.SOURCE_TOKENS, ("instance", "source")),
                title="Tokens per second per source",
                stack="normal",
                width=12,
            ),
            _ts(
                per_second(c.SOURCE_TOKENS, ("source",)),
                title="Token share per source",
                stack="percent",
                width=12,
            ),
            _stat(
                value(c.SOURCE_TOKENS, agg="sum"),
                title="Tokens per source",
                width=12,
                height=8,
            ),
        ),
    )
    return Board(
        "yoto-data.json",
        "yoto-data",
        "yoto · Data",
        "Validation loss and consumed tokens per data source.",
        (data,),
    )


def _annotations() -> tuple[Annotation, ...]:
    """Interventions drawn on every time axis (a rollback explains the loss curve)."""

    def marks(q: Query) -> Query:
        return custom(f"{q.expr} > 0", q.legend, q.metrics, q.unit, q.note)

    def kind(k: EventKind) -> Query:
        return marks(events(c.EVENTS, ("instance",), kind=str(k)))

    return (
        Annotation("Rollbacks", marks(events(c.ROLLBACKS)), "red"),
        Annotation("Halt", kind(EventKind.HALT), "dark-red"),
        Annotation("Batch size changes", marks(events(c.BATCH_SIZE_CHANGES)), "blue"),
        Annotation("LR cooldown", kind(EventKind.LR_COOLDOWN), "orange"),
        Annotation("Faults injected", marks(events(c.FAULTS_INJECTED)), "purple"),
        Annotation("Skipped updates", marks(events(c.SKIPPED_STEPS)), "light-blue"),
        # off by default: spikes are frequent enough to clutter every chart
        Annotation("Spikes", kind(EventKind.SPIKE), "yellow", enabled=False),
    )


def boards(cfg: Config | None = None) -> tuple[Board, ...]:
    """The curated dashboards, with unplaced catalog metrics appended to the Overview.
    ``cfg`` gives the thresholds that follow the probes (the spectra alpha band);
    the defaults when None."""
    cfg = cfg or Config()
    curated = (_overview(), _stability(), _precision(), _layers(cfg), _data())
    shown = {m.name for b in curated for s in b.sections for p in s.panels for m in p.metrics}
    extra = tuple(_generic(m) for m in c.CATALOG.values() if m.name not in shown)
    if not extra:
        return curated
    first = curated[0]
    overview = Board(
        first.file,
        first.uid,
        first.title,
        first.description,
        (*first.sections, Section("Other catalog metrics", extra)),
    )
    return (overview, *curated[1:])


def _generic(metric: c.Metric) -> PanelSpec:
    """A default panel for a metric no layout mentions yet."""
    if metric.type == "counter":
        return _bars(events(metric, ("instance", *metric.labels)))
    return _ts(value(metric))


# --- JSON --------------------------------------------------------------------------------


def _variables() -> list[Any]:
    run_label = "run"
    if run_label not in c.RUN_INFO.labels:
        raise ValueError(f"{c.RUN_INFO.name} lost its {run_label!r} label")
    # query_result() lists the series text, e.g. yoto_run_info{instance="h:9477",...,run="x"};
    # the named groups make the picker show the run id while queries match the instance.
    # Prometheus sorts labels, so instance comes before run.
    regex = f'/instance="(?<value>[^"]+)".*{run_label}="(?<text>[^"]+)"/'
    return [
        dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        dashboard.QueryVariable("instance")
        .label("Run")
        .description("The run (its rank-0 metrics endpoint) whose series every panel shows.")
        .datasource(DATASOURCE)
        .query(f"query_result({c.RUN_INFO.name})")
        .regex(regex)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dm.VariableOption(text="All", value="$__all")),
    ]


def _annotation_json(a: Annotation) -> dict[str, Any]:
    built = dashboard.AnnotationQuery().name(a.name).datasource(DATASOURCE)
    built = built.enable(a.enabled).icon_color(a.color).expr(a.query.expr).build()
    data = _plain(built)
    # Prometheus annotation options the SDK has no setter for.
    data.update(
        {"titleFormat": a.name, "textFormat": "{{instance}}", "tagKeys": "instance", "step": "15s"}
    )
    return data


def _plain(model: Any) -> Any:
    return json.loads(json.dumps(model, cls=JSONEncoder))


def build(board: Board) -> dict[str, Any]:
    """The dashboard JSON of one board (panel ids numbered in layout order)."""
    builder = (
        dashboard.Dashboard(board.title)
        .uid(board.uid)
        .description(board.description)
        .tags([TAG])
        .refresh(REFRESH)
        .time("now-3h", "now")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .editable()
        .link(
            dashboard.DashboardLink("yoto dashboards")
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )
    for variable in _variables():
        builder = builder.with_variable(variable)
    panel_id = 0
    for section in board.sections:
        panel_id += 1
        builder = builder.with_row(dashboard.Row(section.title).id(panel_id))
        for spec in section.panels:
            panel_id += 1
            builder = builder.with_panel(render(spec, panel_id))
    data = _plain(builder.build())
    data["annotations"] = {"list": [_annotation_json(a) for a in _annotations()]}
    return data


def build_all(cfg: Config | None = None) -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON for every yoto dashboard (thresholds from ``cfg``)."""
    return {board.file: build(board) for board in boards(cfg)}


def dumps(data: dict[str, Any]) -> str:
    """Deterministic text: sorted keys, two-space indent, newline at the end."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_all(out_dir: str | Path, cfg: Config | None = None) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in sorted(build_all(cfg).items()):
        path = out / name
        path.write_text(dumps(data), encoding="utf-8")
        written.append(path)
    return written


def iter_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def raw_queries(board: dict[str, Any]) -> list[str]:
    """Every ``expr`` in panels and annotations, as Grafana stores it."""
    exprs = [t["expr"] for p in iter_panels(board) for t in p.get("targets", []) if "expr" in t]
    exprs += [a["expr"] for a in board.get("annotations", {}).get("list", []) if "expr" in a]
    return exprs


def panel_queries(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard, variables substituted so that Prometheus
    accepts it as is: ``$instance`` -> ``.*``, ``$__rate_interval``/``$__interval`` -> 1m."""
    return [promql.substitute(expr) for expr in raw_queries(board)]
