"""The probe protocol (DESIGN.md "Probe protocol").

A probe hands back :class:`Sample` objects whose values may be 0-d device tensors; the
:class:`~yoto.probes.runner.ProbeRunner` stacks all of a step's tensors and copies them to
the host once. Probes never call ``.item()``, ``float(tensor)`` or ``.cpu()`` themselves,
and never change the model, optimizer or data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass(frozen=True, slots=True)
class Sample:
    name: str  # a catalog name
    value: float | torch.Tensor  # 0-d tensor allowed; the runner converts once per step
    labels: Mapping[str, str] = field(default_factory=dict)  # bounded: layer, source, rank


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
    seq_len: int
    loss: torch.Tensor  # mean over the global batch, on device
    grad_norm: torch.Tensor | float | None
    lr: float
    engine: Any


class Probe(Protocol):
    name: str
    every: int  # cadence in optimizer steps

    def on_micro_step(self, ctx: MicroStepContext) -> Iterable[Sample]: ...

    def on_step(self, ctx: StepContext) -> Iterable[Sample]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
