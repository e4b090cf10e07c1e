"""Events, and the small protocols through which the trainer writes what it measured.

The trainer never imports the run store, the Prometheus exporter or the chat notifier; it
writes to a :class:`Sink` (metrics and events) and a :class:`Notifier` (chat), and the CLI
wires the real ones in. Dependencies point one way: kernel <- probes <- trainer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol

log = logging.getLogger("yoto")


class EventKind(StrEnum):
    START = "start"  # a process began (or resumed) writing the run
    END = "end"  # the process stopped writing; data.status says how
    SPIKE = "spike"
    OVERFLOW = "overflow"
    ROLLBACK = "rollback"
    BATCH_SIZE = "batch_size"
    LR_COOLDOWN = "lr_cooldown"
    CHECKPOINT = "checkpoint"
    RESUME = "resume"
    ALERT = "alert"
    FAULT_INJECTED = "fault_injected"
    HALT = "halt"
    SPECTRA = "spectra"  # a layer's weight spectrum left the healthy band
    PROBE = "probe"  # a probe says something about itself (e.g. a metric it cannot compute)


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True, slots=True)
class Event:
    step: int
    attempt: int
    kind: EventKind
    severity: Severity
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["kind"] = str(self.kind)
        record["severity"] = str(self.severity)
        record["data"] = dict(self.data)
        return {
            k: record[k] for k in ("time", "step", "attempt", "kind", "severity", "message", "data")
        }


class Sink(Protocol):
    """Where a step's values and the run's events go (run directory, Prometheus, ...)."""

    def write_step(self, attempt: int, step: int, values: Mapping[str, float]) -> None:
        """One row: series key -> value for one optimizer step of one attempt."""

    def write_event(self, event: Event) -> None: ...

    def flush(self) -> None:
        """Make everything written so far durable/visible."""

    def write_records(
        self, table: str, attempt: int, step: int, rows: list[Mapping[str, Any]]
    ) -> None:
        """Rows of a long table (spectra/...) describing ``step``."""

    def close(self, status: str) -> None:
        """The run stopped with ``status`` (finished, halted, crashed, interrupted)."""


class LiveSink(Sink, Protocol):
    """A sink that outlives no run: told which run it serves once the run directory
    exists (the exporter's ``yoto_run_info``, the notifier's message header). Returns
    what the run's manifest should say about it (e.g. the metrics URL)."""

    def bind_run(self, run: Mapping[str, str]) -> Mapping[str, Any]: ...


class Notifier(Protocol):
    """Delivers an event to people (chat). Must never block or raise into the loop."""

    def notify(self, event: Event) -> None: ...


class Sinks:
    """Fans out to several sinks. The first is *durable* (the run store): its errors
    propagate, because losing the record silently is worse than stopping. Errors of the
    others (live exporters) are logged and counted, never raised into the training loop."""

    def __init__(self, durable: Sink | None = None, live: list[Sink] | None = None) -> None:
        self.durable = durable
        self.live = list(live or [])
        self.live_errors = 0

    def _each_live(self, method: str, *args: Any) -> None:
        for sink in self.live:
            try:
                getattr(sink, method)(*args)
            except Exception:  # a dashboard must never stop a run
                self.live_errors += 1
                log.exception("live sink %s.%s failed", type(sink).__name__, method)

    def write_step(self, attempt: int, step: int, values: Mapping[str, float]) -> None:
        if self.durable is not None:
            self.durable.write_step(attempt, step, values)
        self._each_live("write_step", attempt, step, values)

    def write_event(self, event: Event) -> None:
        if self.durable is not None:
            self.durable.write_event(event)
        self._each_live("write_event", event)

    def write_records(
        self, table: str, attempt: int, step: int, rows: list[Mapping[str, Any]]
    ) -> None:
        if self.durable is not None:
            self.durable.write_records(table, attempt, step, rows)

    def flush(self) -> None:
        if self.durable is not None:
            self.durable.flush()
        self._each_live("flush")

    def close(self, status: str) -> None:
        self._each_live("close", status)
        if self.durable is not None:
            self.durable.close(status)
