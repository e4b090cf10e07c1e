"""PromQL built from the metric catalog, and read back.

Dashboards (and anything else that queries Prometheus) write their expressions through
these helpers so that a metric name or label is never typed twice: the helpers take a
catalog :class:`~yoto.catalog.Metric` and refuse a label the catalog does not give it.
:func:`metric_names` goes the other way, so a test can check that every expression in a
generated file names only catalog metrics.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from yoto.catalog import Metric

# Target labels Prometheus adds to every scraped series; the catalog does not list them.
TARGET_LABELS = ("job", "instance")
# Series Prometheus itself writes for each target; allowed besides the catalog's names.
PROMETHEUS_SERIES = frozenset({"up"})
# The Grafana variable that picks the run(s). Every selector carries it as a regex matcher,
# which stays valid PromQL after Grafana (or panel_queries) substitutes ".*" or "a|b".
INSTANCE_MATCHER = 'instance=~"$instance"'


def selector(metric: Metric | str, **matchers: str) -> str:
    """``name{instance=~"$instance",label="value"}``; labels must belong to the metric."""
    name = metric if isinstance(metric, str) else metric.name
    allowed = set(TARGET_LABELS) | set(() if isinstance(metric, str) else metric.labels)
    parts = [INSTANCE_MATCHER]
    for label, value in sorted(matchers.items()):
        if label not in allowed:
            raise ValueError(f"{name} has no label {label!r}")
        parts.append(f'{label}="{value}"')
    return f"{name}{{{','.join(parts)}}}"


def by(labels: Iterable[str], metric: Metric | None = None) -> str:
    """A ``by (...)`` clause, checked against the metric's catalog labels."""
    labels = tuple(labels)
    if metric is not None:
        unknown = set(labels) - set(TARGET_LABELS) - set(metric.labels)
        if unknown:
            raise ValueError(f"{metric.name} has no label(s) {sorted(unknown)}")
    return f"by ({', '.join(labels)})"


def aggregate(op: str, metric: Metric, labels: Iterable[str], **matchers: str) -> str:
    """``op by (labels) (selector)``, e.g. the max per layer over the chosen runs."""
    return f"{op} {by(labels, metric)} ({selector(metric, **matchers)})"


def rate(metric: Metric, labels: Iterable[str] = ("instance",), **matchers: str) -> str:
    """Per-second rate of a counter, summed per ``labels`` (resets by rollback are fine:
    rate() treats a drop as a counter reset)."""
    _require_counter(metric)
    inner = f"rate({selector(metric, **matchers)}[$__rate_interval])"
    return f"sum {by(labels, metric)} ({inner})"


def increase(metric: Metric, labels: Iterable[str] = ("instance",), **matchers: str) -> str:
    """Counter increase over the rate window: how many events happened "just now"."""
    _require_counter(metric)
    inner = f"increase({selector(metric, **matchers)}[$__rate_interval])"
    return f"sum {by(labels, metric)} ({inner})"


def _require_counter(metric: Metric) -> None:
    if metric.type != "counter":
        raise ValueError(f"{metric.name} is a {metric.type}; rate/increase need a counter")


# --- reading expressions back ----------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_LABEL_LISTS = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_IDENT = re.compile(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
    }
)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords and labels left out).

    Enough PromQL for what yoto writes: strings, label matchers, ranges and grouping
    clauses are removed first, then any identifier not followed by ``(`` is a name.
    """
    text = _STRING.sub('""', expr)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _LABEL_LISTS.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
# What the Grafana variables/macros become outside Grafana: a regex that matches every run,
# and a range wide enough for rate() at yoto's 15 s scrape interval.
SUBSTITUTIONS = {
    "instance": ".*",
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
}


def substitute(expr: str, values: dict[str, str] | None = None) -> str:
    """Replace Grafana variables so the expression can be sent to Prometheus as is.

    An unknown variable is an error rather than a silent pass-through, so a new
    Grafana-only macro cannot slip into a dashboard unnoticed.
    """
    table = {**SUBSTITUTIONS, **(values or {})}

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in table:
            raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")
        return table[name]

    return _VARIABLE.sub(replace, expr)
