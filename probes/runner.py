"""Runs the probes and moves each step's values to the host in one transfer."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from yoto import catalog

from .base import MicroStepContext, Probe, Sample, StepContext


class ProbeRunner:
    """Collects :class:`Sample` objects during a step; :meth:`flush` returns them as
    ``{series key: float}`` after a single device-to-host copy of all tensor values.

    The loop's own numbers (loss, grad norm, LR, ...) go through the same path, so a step
    costs one synchronisation whatever the number of probes.
    """

    def __init__(self, probes: Iterable[Probe] = ()) -> None:
        self.probes = list(probes)
        self._pending: list[tuple[str, float | torch.Tensor]] = []

    def add(self, sample: Sample) -> None:
        metric = catalog.CATALOG.get(sample.name)
        if metric is None:
            raise KeyError(f"{sample.name!r} is not in the metric catalog (yoto/catalog.py)")
        if set(sample.labels) != set(metric.labels):
            raise ValueError(
                f"{sample.name} takes labels {metric.labels}, got {tuple(sample.labels)}"
            )
        self._pending.append((catalog.series_key(sample.name, dict(sample.labels)), sample.value))

    def extend(self, samples: Iterable[Sample]) -> None:
        for sample in samples:
            self.add(sample)

    def on_micro_step(self, ctx: MicroStepContext) -> None:
        for probe in self.probes:
            if ctx.step % probe.every == 0:
                self.extend(probe.on_micro_step(ctx))

    def on_step(self, ctx: StepContext) -> None:
        for probe in self.probes:
            if ctx.step % probe.every == 0:
                self.extend(probe.on_step(ctx))

    def flush(self, control: torch.Tensor | None = None) -> tuple[dict[str, float], list[float]]:
        """All pending values as floats, plus ``control`` (a 1-d tensor of flags the loop
        needs on the host, e.g. agreed stop/rollback codes) in the same transfer."""
        pending, self._pending = self._pending, []
        tensors = [(i, v) for i, (_, v) in enumerate(pending) if isinstance(v, torch.Tensor)]
        parts = [v.detach().reshape(-1)[:1].to(torch.float64) for _, v in tensors]
        n_control = 0
        if control is not None:
            parts.append(control.detach().reshape(-1).to(torch.float64))
            n_control = control.numel()
        if parts:
            device = parts[0].device
            host = torch.cat([p.to(device) for p in parts]).cpu().tolist()
        else:
            host = []
        values: dict[str, float] = {}
        for key, value in pending:
            values[key] = float(value) if not isinstance(value, torch.Tensor) else math.nan
        for (i, _), value in zip(tensors, host, strict=False):
            values[pending[i][0]] = value
        controls = host[len(host) - n_control :] if n_control else []
        return values, controls

    def state_dict(self) -> dict[str, Any]:
        return {p.name: p.state_dict() for p in self.probes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for probe in self.probes:
            if probe.name in state:
                probe.load_state_dict(state[probe.name])
