"""The probe protocol (DESIGN.md "Probe protocol") and the detector protocol.

A **probe** observes the step on the device: it hands back :class:`Sample` objects whose
values may be 0-d device tensors; the :class:`~yoto.probes.runner.ProbeRunner` stacks all
of a step's tensors and copies them to the host once. Probes never call ``.item()``,
``float(tensor)`` or ``.cpu()`` themselves, and never change the model, optimizer or data.

A **detector** reads the step's host values after that one transfer and turns them into
:class:`Verdict` objects (a spike, an overflow, a layer out of band), each naming its
:class:`~yoto.events.Reason` (the class the policy maps to an action; ``None`` for a
verdict that is only news); the policy turns verdicts into actions. Detectors may also
report host-side metrics (counters, scores).

What a probe yields (:data:`StepOutput`): a :class:`Sample` (a value for the step's row), a
:class:`Verdict` (a probe may judge too: a layer's spectrum out of band), a
:class:`Record` (rows for a long table, e.g. spectra) or a :class:`Carry` (a tensor the
probe wants back on the host, in the same transfer). A probe with model hooks implements
:class:`Attaches` (and :class:`Guarded` when its hooks run through a :class:`HookGuard`);
one with work in flight at the end of a run implements :class:`Finishes`.

Both keep their windows/EMAs in ``state_dict`` so they survive checkpoints and rollbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from yoto.events import EventKind, Reason, Severity


@dataclass(frozen=True, slots=True)
class Sample:
    name: str  # a catalog name
    value: float | torch.Tensor  # 0-d tensor allowed; the runner converts once per step
    labels: Mapping[str, str] = field(default_factory=dict)  # bounded: layer, source, rank


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: EventKind  # spike, overflow, probe, ... (becomes the event's kind)
    severity: Severity
    step: int  # the step at which it was decided
    onset: int  # the first step of the anomaly (== step for a one-step event)
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)
    reason: Reason | None = None  # the class the policy acts on; None: news, no action


@dataclass(frozen=True, slots=True)
class Record:
    """Rows for one of the run directory's long tables (e.g. ``spectra``), written as they
    are by the durable sink. Rows are plain dicts of host values."""

    table: str
    step: int  # the step the rows describe (may be earlier than the step that emits them)
    rows: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Carry:
    """A tensor a probe wants on the host after the step, copied in the runner's one
    transfer with the step's samples (no transfer of its own, so no extra sync point);
    ``receive`` gets its values as floats right after that transfer, before the detectors
    run. For values that are not series of the record as such (e.g. every rank's timings,
    which a detector judges and records only in part)."""

    tensor: torch.Tensor
    receive: Callable[[list[float]], None]


@dataclass(frozen=True, slots=True)
class Summed:
    """A tensor a probe wants summed over the data-parallel ranks, yielded by
    ``on_micro_step`` at the accumulation boundary: it rides in the loop's one all-reduce
    of the step (the loss's, before the update), so the probe issues no collective of its
    own. ``receive`` gets the sum over ranks (fp64), on the device, before ``on_step``
    (with one rank: the tensor itself). Every rank must yield the same shapes: a probe
    that fails on one rank only puts the ranks' buffers out of step, as a collective of
    its own would be."""

    tensor: torch.Tensor
    receive: Callable[[torch.Tensor], None]


StepOutput = Sample | Verdict | Record | Carry  # what a probe's on_step (and finish) may yield
MicroOutput = Sample | Summed  # what a probe's on_micro_step may yield


@dataclass
class MicroStepContext:
    step: int  # optimizer step being accumulated (1-based: the step this micro-batch feeds)
    micro: int  # 0 .. n_micro - 1
    n_micro: int
    loss: torch.Tensor  # this micro-batch's mean loss, on device
    tokens: torch.Tensor  # (micro_batch, seq_len + 1) token ids of this rank
    engine: Any


@dataclass
class StepContext:
    step: int  # optimizer steps done, this one included
    attempt: int
    tokens_total: int  # training tokens consumed, this step included
    batch_size: int  # global batch of this step, sequences
    micro_batch_size: int  # sequences per micro-batch per rank
    n_micro: int  # micro-batches accumulated per rank this step
    world: int  # data-parallel ranks
    seq_len: int
    loss: torch.Tensor  # mean over the global batch, on device
    grad_norm: torch.Tensor | float | None  # global, before clipping, unscaled
    lr: float
    engine: Any
    clock: Any = None  # the rank's StepClock (probes/system.py): its own time per step


class Probe(Protocol):
    name: str
    every: int  # cadence in optimizer steps

    def on_micro_step(self, ctx: MicroStepContext) -> Iterable[MicroOutput]:
        """After each backward of a probe step (device tensors; no host reads); at the
        boundary, values to be summed over ranks too (:class:`Summed`)."""

    def on_step(self, ctx: StepContext) -> Iterable[StepOutput]:
        """After the optimizer step of a probe step: samples, and any verdicts or records
        the probe has (a background analysis may hand in a late one)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Attaches(Protocol):
    """Optional: a probe that needs hooks on the model gets them here, once, after the
    engine exists; ``detach`` removes them. ``active(step)`` tells the probe whether the
    coming step is one of its probe steps, so hooks can stay idle otherwise."""

    def attach(self, model: torch.nn.Module, engine: Any) -> None: ...

    def detach(self) -> None: ...

    def active(self, step: int) -> None: ...


@runtime_checkable
class Guarded(Protocol):
    """Optional: a probe whose hooks run through a :class:`HookGuard`; the runner takes the
    guard's error after each step and reports it as the probe's failure."""

    guard: HookGuard


@runtime_checkable
class Finishes(Protocol):
    """Optional: a probe with work in flight (a background analysis) hands it in at the end
    of a run, waiting at most ``timeout`` seconds (None: as long as it takes)."""

    def finish(self, timeout: float | None) -> Iterable[StepOutput]: ...


class Detector(Protocol):
    name: str

    def observe(self, step: int, values: Mapping[str, float]) -> Iterable[Verdict]: ...

    def metrics(self) -> Iterable[Sample]:
        """Host-side values (counters, scores) for the same step's row."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class HookGuard:
    """Hooks run inside autograd and forward passes, where an exception would kill the
    step. A probe routes each hook body through a guard: the first error is kept for the
    runner to report and the hooks go quiet until the runner clears it."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def run(self, fn: Any, *args: Any) -> Any:
        if self.error is not None:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # reported by the runner as a probe failure
            self.error = exc
            return None

    def take(self) -> BaseException | None:
        error, self.error = self.error, None
        return error
