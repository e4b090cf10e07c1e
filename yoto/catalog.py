"""The metric catalog: every metric yoto emits is named here once.

The Prometheus exporter, the run directory's Parquet columns, the Grafana panels, the alert
rules and the explorer's charts all take their names from this table; a metric name typed
anywhere else is a bug. Code refers to a metric by its constant (``catalog.TRAIN_LOSS``),
never by the string.

Naming follows Prometheus: prefix ``yoto_``, base units in the name (``_seconds``,
``_tokens``), ``_total`` for counters, ``_ratio`` for 0-1 fractions, and labels whose values
are bounded (layer, source, rank; never step or run id).

A *series key* names one labelled series the way PromQL writes it: ``yoto_val_loss`` or
``yoto_val_loss{source="code"}``. It is the column name in the run directory's wide metric
table, so a value can be followed by one name from where it is born to where it is drawn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

MetricType = Literal["gauge", "counter"]
Cadence = Literal["step", "eval", "probe", "event"]

_NAME = re.compile(r"^yoto_[a-z][a-z0-9_]*$")
_LABEL = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    type: MetricType
    unit: str  # base unit ("seconds", "tokens", "nats", "ratio") or "" when dimensionless
    help: str
    labels: tuple[str, ...] = ()
    cadence: Cadence = "step"

    def key(self, **labels: str) -> str:
        """The series key of this metric with the given label values."""
        return series_key(self.name, labels)


CATALOG: dict[str, Metric] = {}


def _metric(
    name: str,
    type: MetricType,
    unit: str,
    help: str,
    labels: tuple[str, ...] = (),
    cadence: Cadence = "step",
) -> Metric:
    if name in CATALOG:
        raise ValueError(f"metric {name!r} is defined twice in the catalog")
    metric = Metric(name, type, unit, help, labels, cadence)
    CATALOG[name] = metric
    return metric


# --- training loop (foundation) -----------------------------------------------------------
TRAIN_LOSS = _metric(
    "yoto_train_loss",
    "gauge",
    "nats",
    "Mean cross-entropy of the last optimizer step over the global batch.",
)
GRAD_NORM = _metric(
    "yoto_grad_norm",
    "gauge",
    "",
    "Global L2 norm of the gradient before clipping, unscaled.",
)
LEARNING_RATE = _metric(
    "yoto_learning_rate",
    "gauge",
    "",
    "Learning rate used by the last optimizer step.",
)
STEPS = _metric(
    "yoto_steps_total",
    "counter",
    "",
    "Optimizer steps taken on the surviving branch of the run.",
)
TOKENS = _metric(
    "yoto_tokens_total",
    "counter",
    "tokens",
    "Training tokens consumed on the surviving branch of the run.",
)
BATCH_SIZE_TOKENS = _metric(
    "yoto_batch_size_tokens",
    "gauge",
    "tokens",
    "Global batch of the last step in tokens, as the DeepSpeed engine used it.",
)
STEP_DURATION = _metric(
    "yoto_step_duration_seconds",
    "gauge",
    "seconds",
    "Wall-clock time of the last optimizer step, including its host transfer.",
)
THROUGHPUT = _metric(
    "yoto_throughput_tokens_per_second",
    "gauge",
    "tokens_per_second",
    "Training tokens per second of the last step, over all ranks.",
)
ATTEMPT = _metric(
    "yoto_attempt",
    "gauge",
    "",
    "0 for the first branch of the run, +1 after each rollback or replaying resume.",
)
VAL_LOSS = _metric(
    "yoto_val_loss",
    "gauge",
    "nats",
    "Mean cross-entropy on the held-out split of one data source.",
    labels=("source",),
    cadence="eval",
)


def series_key(name: str, labels: dict[str, str] | None = None) -> str:
    """``name`` or ``name{a="x",b="y"}`` with labels in sorted order."""
    if not labels:
        return name
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


_KEY = re.compile(r"^(?P<name>[a-z_][a-z0-9_]*)(?:\{(?P<labels>.*)\})?$")
_PAIR = re.compile(r'([a-z_][a-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_series_key(key: str) -> tuple[str, dict[str, str]]:
    """Inverse of :func:`series_key`."""
    match = _KEY.match(key)
    if not match:
        raise ValueError(f"not a series key: {key!r}")
    labels = {k: _unescape(v) for k, v in _PAIR.findall(match.group("labels") or "")}
    return match.group("name"), labels


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _unescape(value: str) -> str:
    return value.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def check_catalog() -> list[str]:
    """Problems with the catalog's names (empty when it follows the conventions)."""
    problems = []
    for metric in CATALOG.values():
        if not _NAME.match(metric.name):
            problems.append(f"{metric.name}: must match {_NAME.pattern}")
        if metric.type == "counter" and not metric.name.endswith("_total"):
            problems.append(f"{metric.name}: a counter's name must end in _total")
        if metric.type != "counter" and metric.name.endswith("_total"):
            problems.append(f"{metric.name}: only counters end in _total")
        if metric.unit == "ratio" and not metric.name.endswith("_ratio"):
            problems.append(f"{metric.name}: a 0-1 fraction's name must end in _ratio")
        if metric.unit in ("seconds", "bytes") and metric.unit not in metric.name:
            problems.append(f"{metric.name}: the base unit {metric.unit} must be in the name")
        for label in metric.labels:
            if not _LABEL.match(label) or label in ("step", "run", "run_id", "time"):
                problems.append(f"{metric.name}: label {label!r} is not a bounded label")
        if not metric.help.strip():
            problems.append(f"{metric.name}: help text is empty")
    return problems
