"""Events, and the small protocols through which the trainer writes what it measured.

The trainer never imports the run store, the Prometheus exporter, TensorBoard or the chat
notifier; it writes to :class:`Sinks` (metrics, events and long records), and the CLI wires
the real ones in. Dependencies point one way: kernel <- probes <- trainer.

The typed vocabulary of what happens to a run lives here too, because the trainer writes it
and the alerts and the explorer read it: :class:`EventKind`, :class:`Severity`,
:class:`Reason` (why a verdict or a decision was made) and :class:`Rollback` (what a
rollback did: the payload of a ``rollback`` event and an entry of the run's history).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
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
    ALERT = "alert"  # the page of an instability episode (one per episode, trainer/episodes.py)
    EPISODE = "episode"  # an episode's later verdicts and its summary when it closes (info)
    FAULT_INJECTED = "fault_injected"
    HALT = "halt"
    SPECTRA = "spectra"  # a layer's weight spectrum left the healthy band
    PROBE = "probe"  # a probe says something about itself (e.g. a metric it cannot compute)
    SKIP_STEP = "skip_step"  # skip-step did not apply this step's update
    SEQ_LEN = "seq_len"  # a sequence-length warmup began (at the start, or after a rollback)
    DIAGNOSIS = "diagnosis"  # why a rollback's spike happened: data, state or nondeterministic
    CHAT = "chat"  # chat messages not delivered (written by the notifier, never sent to chat)
    EVAL = "eval"  # few-shot scores of a checkpoint (eval.harness), or why there are none
    STRAGGLER = "straggler"  # a rank stayed slower than the median (probes/system.py)


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class Reason(StrEnum):
    """Why: the class of a verdict (set by the detector that made it) and the reason of a
    decision. The verdict classes are also the ``policy:`` config's field names, which map
    each to an action."""

    # verdict classes, mapped to actions by the policy config
    NONFINITE = "nonfinite"  # a non-finite loss or grad norm
    PERSISTENT_SPIKE = "persistent_spike"  # a spike that did not settle
    SPIKE = "spike"  # an isolated spike
    LOSS_SCALE_MIN = "loss_scale_min"  # the fp16 loss scale at DeepSpeed's minimum
    OVERFLOW = "overflow"  # fp16/bf16 steps skipped for inf/nan gradients
    SPECTRA = "spectra"  # a layer's alpha left the healthy band
    PROBE_FAILURE = "probe_failure"  # a probe raised
    STRAGGLER = "straggler"  # a rank slower than the median for several intervals
    # why the policy's decision is not the verdict's action
    NO_CHECKPOINT = "no_checkpoint"  # a rollback with no good checkpoint to go to
    ROLLBACK_BUDGET = "rollback_budget"  # too many rollbacks within the window
    RANK0 = "rank 0"  # this rank's own decision differed; rank 0's was taken
    NONDETERMINISTIC = "nondeterministic"  # a replay did not reproduce it: the machine


#: the verdict classes the ``policy:`` config maps to actions
VERDICT_REASONS = (
    Reason.NONFINITE,
    Reason.PERSISTENT_SPIKE,
    Reason.SPIKE,
    Reason.LOSS_SCALE_MIN,
    Reason.OVERFLOW,
    Reason.SPECTRA,
    Reason.PROBE_FAILURE,
    Reason.STRAGGLER,
)


@dataclass(frozen=True, slots=True)
class Rollback:
    """What one rollback did. The trainer's history keeps one per rollback (it survives
    later rollbacks and resumes); the ``rollback`` event's data is :meth:`to_data`, which
    readers (chat, explorer) turn back into this with :meth:`from_data`."""

    from_step: int  # the step the abandoned branch had reached
    to_step: int  # the checkpoint's step: the new branch trains from step to_step + 1
    onset: int  # the first step of the anomaly
    reason: Reason  # the deciding verdict's class
    from_attempt: int  # the abandoned branch
    attempt: int  # the new branch
    checkpoint: str = ""  # the checkpoint's tag (step-N)
    skipped_batches: int = 0  # at the batch size of the abandoned step
    skipped_sequences: int = 0
    sampler_position_checkpoint: int = 0  # where the checkpoint's data stream stood
    sampler_position_resume: int = 0  # where the new branch's stream starts
    onset_position: int = 0  # where the stream stood before the onset step
    lr_cooldown: tuple[float, int] | None = None  # (LR factor, up to step), if any
    trigger: str = ""  # the deciding verdict's message
    seconds: float = 0.0  # decision to ready-to-train

    def to_data(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["reason"] = str(self.reason)
        data["lr_cooldown"] = list(self.lr_cooldown) if self.lr_cooldown else None
        return data

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Rollback:
        """From an event's data or a history entry; records written before a field existed
        get its default (``from_attempt``: the attempt before ``attempt``)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("from_attempt", int(data["attempt"]) - 1)
        reason = values["reason"]
        values["reason"] = Reason(reason) if reason in Reason._value2member_map_ else reason
        if values.get("lr_cooldown") is not None:
            factor, until = values["lr_cooldown"]
            values["lr_cooldown"] = (float(factor), int(until))
        return cls(**values)


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


def describe_suspects(forensics: Mapping[str, Any] | None, limit: int = 3) -> list[str]:
    """One line per top sequence of a spike's forensics (trainer/diagnose.py: the
    ``forensics`` of a spike, alert or rollback event), for chat and the terminal."""
    lines = []
    for s in (forensics or {}).get("top", [])[:limit]:
        where = f"{s['source']}:{s['doc_id'] or '?'}+{s['offset']}"
        lines.append(f"loss {s['loss']:.3g} at {where}: {s['snippet'][:60]!r}")
    return lines


def describe_ranks(diagnosis: Mapping[str, Any] | None) -> str:
    """The ranks a replay diagnosis names, with their hosts: "1 (host-a), 3"; "" if none."""
    ranks, hosts = (diagnosis or {}).get("ranks") or [], (diagnosis or {}).get("hosts") or []
    named = [f"{r} ({h})" for r, h in zip(ranks, hosts, strict=False)]
    return ", ".join(named + [str(r) for r in ranks[len(hosts) :]])


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
        # the record first: a live sink's close may wait (a last scrape, chat delivery)
        # and a launcher may kill the process meanwhile
        if self.durable is not None:
            self.durable.close(status)
        self._each_live("close", status)
