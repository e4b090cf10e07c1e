"""The Prometheus exporter: rank 0 serves ``/metrics`` while it trains.

It is a live :class:`~yoto.events.Sink`. The trainer writes a step's values (series keys
from the catalog) and events; a scrape reads the latest of each. Three things make a
15-second scrape of a run that takes several steps a second faithful:

- window maxima (``yoto_train_loss_window_max``, ``yoto_grad_norm_window_max``) hold the
  largest value since the previous scrape, so a one-step spike is never missed;
- counters (``yoto_events_total{kind,severity}``, ``yoto_nonfinite_loss_steps_total`` and
  the trainer's own ``*_total`` series) count what happened between scrapes;
- per-layer series are capped (``live.layer_series_max``): a 96-layer model's layer
  statistics and spectra would otherwise be thousands of series per run. The layers kept
  are spread evenly over the depth, first and last always included; the run directory
  keeps every layer.
- per-rank series (``rank`` label) come once per interval for the interval's ranks (the
  slowest ones when the world is large, probes/system.py): each interval's set replaces
  the previous one, so a rank that left it is not shown at a stale value.

Metric families are built at scrape time from the catalog (one custom collector), so a
name never appears here as a string. Writes and scrapes meet under one lock; a write is a
few dictionary updates, so the training loop never waits on a scrape for long.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import math
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server

from yoto import catalog
from yoto.errors import ConfigError
from yoto.events import Event, EventKind, Severity

log = logging.getLogger("yoto.live")

_LAYER_METRICS = tuple(m for m in catalog.CATALOG.values() if "layer" in m.labels)


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_addr(text: str) -> Address | None:
    """``HOST:PORT`` (port 0 = any free port); ``0``, ``off`` or empty = no exporter."""
    text = text.strip()
    if text in ("", "0", "off", "none"):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            f"metrics address {text!r} is not HOST:PORT (e.g. 127.0.0.1:9477, or "
            "0.0.0.0:9477 to be scraped from another machine); '0' turns the exporter off"
        )
    host = host.strip("[]") or "127.0.0.1"
    if re.fullmatch(r"[\d.]+", host) or ":" in host:  # an IP literal, not a host name
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(
                f"metrics address {text!r}: {host!r} is not a valid IP address (IPv4 is four "
                "numbers 0-255, e.g. 127.0.0.1; IPv6 goes in brackets, e.g. [::1]:9477)"
            ) from None
    return Address(host, int(port))


def _bind_problem(addr: Address, exc: OSError) -> str | None:
    """Why ``addr`` can never be listened on, or None when only its port is taken."""
    if exc.errno == errno.EADDRINUSE:
        return None
    if isinstance(exc, socket.gaierror):
        return f"{addr.host!r} is not a known host name here ({exc.strerror})"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{addr.host} is not an address of this machine"
    if exc.errno == errno.EACCES and 0 < addr.port < 1024:
        return f"port {addr.port} is privileged (below 1024) and needs root"
    return f"{exc.strerror or exc}"


def even_subset(values: list[str], limit: int) -> list[str]:
    """At most ``limit`` of ``values`` spread evenly, first and last included."""
    if len(values) <= limit:
        return list(values)
    if limit <= 1:
        return values[:limit]
    step = (len(values) - 1) / (limit - 1)
    return [values[round(i * step)] for i in range(limit)]


def _layer_order(value: str) -> tuple[int, str]:
    head = value.split(".", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, value)


class Exporter:
    """The live sink behind ``/metrics``. ``serve()`` binds the port (before training, so a
    busy port is a clear error at start, never a crash mid-run)."""

    def __init__(
        self,
        preset: str,
        layer_series_max: int = 1000,
        extra: Callable[[], Mapping[str, float]] | None = None,
        linger_seconds: float = 0.0,
    ) -> None:
        self.info = {"run": "", "name": "", "preset": preset}
        self.layer_budget = max(0, layer_series_max) // max(1, len(_LAYER_METRICS))
        self.extra = extra  # e.g. the notifier's delivery counters
        self.linger_seconds = linger_seconds
        self._ended = 0.0
        self._scrapes = 0
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}  # series key -> latest value
        self._window: dict[str, float] = {}  # metric name -> max since the last scrape
        # every (kind, severity) starts at 0: a counter first seen at 1 hides its own first
        # increase from increase()/rate(), and the first rollback is the one that matters
        self._events: dict[tuple[str, str], int] = {
            (str(kind), str(severity)): 0 for kind in EventKind for severity in Severity
        }
        self._nonfinite = 0
        self._layers_kept: dict[str, set[str]] = {}  # metric name -> layer values exported
        self._layers_dropped: dict[str, set[str]] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self.server: Any = None
        self.address: Address | None = None

    # --- serving ------------------------------------------------------------------------

    def serve(self, addr: Address, port_search: int = 10) -> Address:
        """Listen on ``addr``; when its port is busy, on the next free one of the following
        ``port_search`` ports (said in the log). Returns where it listens."""
        tried = []
        for offset in range(port_search + 1 if addr.port else 1):
            port = addr.port + offset if addr.port else 0
            try:
                self.server, _thread = start_http_server(port, addr.host, registry=self.registry)
            except OSError as exc:
                problem = _bind_problem(Address(addr.host, port), exc)
                if problem is not None:  # no other port would do better
                    raise ConfigError(
                        f"cannot serve /metrics on {addr}: {problem}; choose another with "
                        "--metrics-addr HOST:PORT (e.g. 127.0.0.1:9477), or --metrics-addr 0 "
                        "to run without the exporter"
                    ) from None
                tried.append(f"{port}: {exc.strerror or exc}")
                continue
            bound = Address(addr.host, self.server.server_address[1])
            if offset:
                log.warning("metrics port %s is busy; serving /metrics on %s", addr.port, bound)
            self.address = bound
            return bound
        raise ConfigError(
            f"cannot serve /metrics on {addr.host}: ports {addr.port}..{addr.port + port_search} "
            f"are busy ({'; '.join(tried[:3])}); choose another with "
            "--metrics-addr HOST:PORT, or --metrics-addr 0 to run without the exporter"
        )

    def url(self) -> str | None:
        if self.address is None:
            return None
        host = self.address.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return f"http://{host}:{self.address.port}/metrics"

    # --- Sink -----------------------------------------------------------------------------

    def bind_run(self, run: Mapping[str, str]) -> dict[str, Any]:
        with self._lock:
            self.info.update({k: run[k] for k in ("run", "name") if k in run})
        return {"metrics_url": self.url()}

    def write_step(self, attempt: int, step: int, values: Mapping[str, float]) -> None:
        now = time.time()
        with self._lock:
            ranked: set[str] = set()  # metrics with per-rank series in this write
            for key, value in values.items():
                name, labels = catalog.parse_series_key(key)
                if "layer" in labels and not self._keep_layer(name, labels["layer"], values):
                    continue
                if "rank" in labels:
                    ranked.add(name)
                self._last[key] = float(value)
            if ranked:
                self._forget_ranks(ranked, values)
            self._last[catalog.ATTEMPT.name] = float(attempt)
            self._last[catalog.LAST_STEP_TIME.name] = now
            loss = values.get(catalog.TRAIN_LOSS.name)
            if loss is not None and not math.isfinite(loss):
                self._nonfinite += 1
            for source, window in (
                (catalog.TRAIN_LOSS, catalog.TRAIN_LOSS_WINDOW_MAX),
                (catalog.GRAD_NORM, catalog.GRAD_NORM_WINDOW_MAX),
            ):
                value = values.get(source.name)
                if value is not None:
                    self._window[window.name] = _nanmax(self._window.get(window.name), value)

    def write_event(self, event: Event) -> None:
        with self._lock:
            key = (str(event.kind), str(event.severity))
            self._events[key] = self._events.get(key, 0) + 1

    def write_records(self, table: str, attempt: int, step: int, rows: list) -> None:
        pass  # spectra rows reach Prometheus as their per-layer gauges in write_step

    def flush(self) -> None:
        pass

    def close(self, status: str) -> None:
        """Stop serving. When Prometheus has been scraping, first wait (up to
        ``linger_seconds``) for one more scrape, so that it sees how the run ended
        (``yoto_run_ended``) and a finished run's target going down pages nobody."""
        with self._lock:
            self._ended = 0.0 if status == "crashed" else 1.0
            seen = self._scrapes
        if self.server is not None and seen and self.linger_seconds > 0:
            deadline = time.monotonic() + self.linger_seconds
            while time.monotonic() < deadline:
                with self._lock:
                    if self._scrapes > seen:
                        break
                time.sleep(0.05)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def _forget_ranks(self, names: set[str], values: Mapping[str, float]) -> None:
        """Drop the per-rank series of ``names`` that this write did not carry."""
        prefixes = tuple(f"{name}{{" for name in names)
        stale = [key for key in self._last if key.startswith(prefixes) and key not in values]
        for key in stale:
            del self._last[key]

    def _keep_layer(self, name: str, layer: str, values: Mapping[str, float]) -> bool:
        kept = self._layers_kept.get(name)
        if kept is None:  # first sight: choose evenly over the layers this step reports
            layers = sorted(
                {
                    labels["layer"]
                    for key in values
                    for n, labels in [catalog.parse_series_key(key)]
                    if n == name and "layer" in labels
                },
                key=_layer_order,
            )
            kept = self._layers_kept[name] = set(even_subset(layers, self.layer_budget))
            dropped = set(layers) - kept
            if dropped:
                self._layers_dropped[name] = dropped
                log.info(
                    "exporting %d of %d layers of %s (live.layer_series_max)",
                    len(kept),
                    len(layers),
                    name,
                )
        if layer in kept:
            return True
        if len(kept) < self.layer_budget and layer not in self._layers_dropped.get(name, ()):
            kept.add(layer)
            return True
        self._layers_dropped.setdefault(name, set()).add(layer)
        return False

    # --- Collector ------------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            self._scrapes += 1
            last = dict(self._last)
            last[catalog.RUN_ENDED.name] = self._ended
            window, self._window = self._window, {}
            events = dict(self._events)
            nonfinite = self._nonfinite
            dropped = sum(len(v) for v in self._layers_dropped.values())
        # a window with no step in it (a stalled run) repeats the last value it saw
        for source, target in (
            (catalog.TRAIN_LOSS, catalog.TRAIN_LOSS_WINDOW_MAX),
            (catalog.GRAD_NORM, catalog.GRAD_NORM_WINDOW_MAX),
        ):
            if target.name not in window and source.name in last:
                window[target.name] = last[source.name]
        last.update(window)
        if self.extra is not None:
            last.update(self.extra())
        families: dict[str, Metric] = {}
        for key, value in last.items():
            parsed = _series(key)
            if parsed is None:
                continue  # not a catalog series (never exported under a name typed elsewhere)
            metric, label_values = parsed
            family = families.get(metric.name)
            if family is None:
                family = families[metric.name] = _family(metric)
            family.add_metric(label_values, value)
        events_family = _family(catalog.EVENTS)
        for (kind, severity), count in sorted(events.items()):
            events_family.add_metric([kind, severity], count)
        families[catalog.EVENTS.name] = events_family
        nonfinite_family = _family(catalog.NONFINITE_LOSS_STEPS)
        nonfinite_family.add_metric([], nonfinite)
        families[catalog.NONFINITE_LOSS_STEPS.name] = nonfinite_family
        info = _family(catalog.RUN_INFO)
        info.add_metric([self.info[label] for label in catalog.RUN_INFO.labels], 1.0)
        families[catalog.RUN_INFO.name] = info
        dropped_family = _family(catalog.LAYER_SERIES_DROPPED)
        dropped_family.add_metric([], dropped)
        families[catalog.LAYER_SERIES_DROPPED.name] = dropped_family
        return [families[name] for name in sorted(families)]


@functools.lru_cache(maxsize=16384)
def _series(key: str) -> tuple[catalog.Metric, tuple[str, ...]] | None:
    """The catalog metric of a series key and its label values in the catalog's order;
    cached because a run exports the same keys at every scrape (the per-layer cap bounds
    them), and parsing them was a fifth of a 96-layer scrape."""
    name, labels = catalog.parse_series_key(key)
    metric = catalog.CATALOG.get(name)
    if metric is None:
        return None
    return metric, tuple(labels.get(label, "") for label in metric.labels)


def _family(metric: catalog.Metric) -> Metric:
    unit = ""  # the unit is already in the name; OpenMetrics' unit must be its suffix
    if metric.type == "counter":
        # prometheus_client appends _total itself
        return CounterMetricFamily(
            metric.name.removesuffix("_total"), metric.help, labels=metric.labels, unit=unit
        )
    return GaugeMetricFamily(metric.name, metric.help, labels=metric.labels, unit=unit)


def _nanmax(current: float | None, value: float) -> float:
    """max that lets NaN/inf through: a non-finite loss is the loudest value of a window."""
    if current is None or not math.isfinite(value):
        return value if current is None or math.isfinite(current) else current
    if not math.isfinite(current):
        return current
    return max(current, value)
