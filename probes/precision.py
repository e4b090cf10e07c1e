"""Numerical precision: fp16 loss scaling, non-finite gradients, underflow, headroom.

Overflow counts come from what the engine really did: under fp16 a step DeepSpeed skipped
(``engine.was_step_applied()`` is false, its loss scaler halved); under bf16 and fp32
DeepSpeed applies whatever the gradients hold (it may even skip silently with ZeRO), so a
non-finite global grad norm is counted here, on the device.

Emits every ``probes.precision.every`` steps:

| metric | type | when | meaning |
|---|---|---|---|
| yoto_overflow_steps_total | counter | all | steps with inf/nan gradients |
| yoto_consecutive_overflow_steps | gauge | all | overflow steps in a row |
| yoto_loss_scale | gauge | fp16 | dynamic loss scale after the step |
| yoto_loss_scale_headroom_log2 | gauge | fp16 | log2(scale / DeepSpeed's minimum) |
| yoto_loss_scale_steps_since_growth | gauge | fp16 | steps since the scale last grew |

and every ``probes.precision.detail_every`` steps, by hooks active on those steps only:

| metric | type | labels | meaning |
|---|---|---|---|
| yoto_grad_underflow_ratio | gauge | | weight-gradient entries that are 0 or subnormal |
| yoto_activation_absmax | gauge | layer | max abs value at a block's output |
| yoto_activation_headroom_log2 | gauge | layer | log2(dtype max / absmax) |

The underflow ratio counts the weight matrices' gradients as the hooks see them: each
micro-batch's gradient on each rank, before DeepSpeed accumulates, reduces or partitions it
(so the same at every ZeRO stage), scaled by the loss scale under fp16, which is the point
of loss scaling; the ranks' counts are summed (in the loop's all-reduce of the loss, so no
collective of their own). Embedding
tables are left out because rows of tokens absent from a batch are zero by construction,
not by underflow.

:class:`OverflowDetector` turns the counters into ``overflow`` verdicts on the host.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from yoto import catalog
from yoto.config import PrecisionConfig
from yoto.events import EventKind, Reason, Severity

from .base import HookGuard, MicroStepContext, Sample, StepContext, Summed, Verdict
from .sharded import whole


def loss_scaler(engine: Any) -> Any | None:
    """DeepSpeed's DynamicLossScaler behind an fp16 engine (FP16 or ZeRO optimizer)."""
    return getattr(engine.optimizer, "loss_scaler", None)


def loss_scale(engine: Any) -> float:
    opt = engine.optimizer
    for attr in ("cur_scale", "loss_scale"):
        value = getattr(opt, attr, None)
        if isinstance(value, int | float):
            return float(value)
    scaler = loss_scaler(engine)
    return float(scaler.cur_scale) if scaler is not None else 1.0


def _is_matrix(p: nn.Parameter) -> bool:
    """A weight matrix (a ZeRO-3 parameter is flat and empty outside forward)."""
    return len(getattr(p, "ds_shape", p.shape)) >= 2


def blocks_of(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


class PrecisionProbe:
    """See the module docstring."""

    name = "precision"

    def __init__(self, cfg: PrecisionConfig, precision: str) -> None:
        self.every = cfg.every
        self.detail_every = cfg.detail_every
        self.fp16 = precision == "fp16"
        self.guard = HookGuard()
        self._handles: list[Any] = []
        self._detail = False
        self.overflows = 0  # fp16: host counts from the engine
        self.consecutive = 0
        self.since_growth = 0
        self._last_scale: float | None = None
        self._nonfinite: torch.Tensor | None = None  # bf16/fp32: device counters
        self._consecutive_dev: torch.Tensor | None = None
        self._absmax: dict[str, torch.Tensor] = {}
        self._dtype: dict[str, torch.dtype] = {}
        self._small = torch.zeros(())
        self._entries = 0
        self._counts: torch.Tensor | None = None  # (small, entries), summed over ranks

    # hooks (detail steps only)

    def attach(self, model: nn.Module, engine: Any) -> None:
        for i, block in enumerate(blocks_of(model)):
            self._handles.append(block.register_forward_hook(self._forward_hook(str(i))))
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        seen: set[int] = set()
        matrices = []
        for p in model.parameters():
            if p.requires_grad and _is_matrix(p) and id(p) not in embeddings | seen:
                seen.add(id(p))
                matrices.append(p)
        with whole(matrices):  # ZeRO-3: hooked while whole (probes/sharded.py)
            for p in matrices:
                self._handles.append(p.register_hook(self._grad_hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def active(self, step: int) -> None:
        self._detail = step > 0 and step % self.detail_every == 0

    def _forward_hook(self, layer: str) -> Any:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if self._detail and torch.is_grad_enabled():  # training forward, not eval
                self.guard.run(self._record_activation, layer, output)

        return hook

    def _record_activation(self, layer: str, output: torch.Tensor) -> None:
        absmax = output.detach().abs().amax().float()
        previous = self._absmax.get(layer)
        self._absmax[layer] = absmax if previous is None else torch.maximum(previous, absmax)
        self._dtype[layer] = output.dtype

    def _grad_hook(self, grad: torch.Tensor) -> None:
        if self._detail:
            self.guard.run(self._record_underflow, grad)

    def _record_underflow(self, grad: torch.Tensor) -> None:
        tiny = torch.finfo(grad.dtype).tiny
        small = (grad.detach().abs() < tiny).sum()
        self._small = small if self._entries == 0 else self._small + small
        self._entries += grad.numel()

    # probe protocol

    def on_micro_step(self, ctx: MicroStepContext) -> Iterable[Summed]:
        if ctx.micro == ctx.n_micro - 1 and self._entries:
            # every rank's counts, summed in the loop's all-reduce of the loss
            small = self._small.double()
            entries = torch.full_like(small, float(self._entries))  # a fill: no host copy
            return (Summed(torch.stack([small, entries]), self._receive),)
        return ()

    def _receive(self, counts: torch.Tensor) -> None:
        self._counts = counts

    def on_step(self, ctx: StepContext) -> Iterable[Sample]:
        samples = self._fp16_samples(ctx) if self.fp16 else self._nonfinite_samples(ctx)
        if self._absmax:
            for layer, absmax in self._absmax.items():
                top = torch.finfo(self._dtype[layer]).max
                samples.append(Sample(catalog.ACTIVATION_ABSMAX.name, absmax, {"layer": layer}))
                samples.append(
                    Sample(
                        catalog.ACTIVATION_HEADROOM.name,
                        torch.log2(top / absmax.double().clamp(min=1e-300)),
                        {"layer": layer},
                    )
                )
            self._absmax = {}
        if self._counts is not None:  # (small, entries) over every rank's micro-batches
            small, entries = self._counts
            samples.append(Sample(catalog.GRAD_UNDERFLOW.name, small / entries))
        self._entries, self._counts = 0, None
        return samples

    def _fp16_samples(self, ctx: StepContext) -> list[Sample]:
        scale = loss_scale(ctx.engine)
        scaler = loss_scaler(ctx.engine)
        floor = float(getattr(scaler, "min_scale", 1.0) or 1.0)
        if ctx.engine.was_step_applied():
            self.consecutive = 0
        else:
            self.overflows += 1
            self.consecutive += 1
        grew = self._last_scale is not None and scale > self._last_scale
        self.since_growth = 0 if grew else self.since_growth + 1
        self._last_scale = scale
        return [
            Sample(catalog.LOSS_SCALE.name, scale),
            Sample(catalog.LOSS_SCALE_HEADROOM.name, math.log2(max(scale, 1e-300) / floor)),
            Sample(catalog.LOSS_SCALE_STEPS_SINCE_GROWTH.name, float(self.since_growth)),
            Sample(catalog.OVERFLOW_STEPS.name, float(self.overflows)),
            Sample(catalog.CONSECUTIVE_OVERFLOWS.name, float(self.consecutive)),
        ]

    def _nonfinite_samples(self, ctx: StepContext) -> list[Sample]:
        norm = ctx.grad_norm
        if norm is None:
            return []
        bad = (~torch.isfinite(torch.as_tensor(norm, dtype=torch.float64))).double()
        if self._nonfinite is None:
            self._nonfinite = torch.zeros_like(bad)
            self._consecutive_dev = torch.zeros_like(bad)
        self._nonfinite = self._nonfinite + bad
        self._consecutive_dev = (self._consecutive_dev + 1) * bad
        return [
            Sample(catalog.OVERFLOW_STEPS.name, self._nonfinite),
            Sample(catalog.CONSECUTIVE_OVERFLOWS.name, self._consecutive_dev),
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "overflows": self.overflows,
            "consecutive": self.consecutive,
            "since_growth": self.since_growth,
            "last_scale": self._last_scale,
            # checkpoint time, not the hot path
            "nonfinite": None if self._nonfinite is None else float(self._nonfinite),
            "consecutive_dev": (
                None if self._consecutive_dev is None else float(self._consecutive_dev)
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.overflows, self.consecutive = state["overflows"], state["consecutive"]
        self.since_growth, self._last_scale = state["since_growth"], state["last_scale"]
        for attr, key in (("_nonfinite", "nonfinite"), ("_consecutive_dev", "consecutive_dev")):
            value = state.get(key)
            setattr(self, attr, None if value is None else torch.tensor(value, dtype=torch.float64))


class OverflowDetector:
    """Host side: a verdict for each overflow step, and a critical one while the fp16 loss
    scale sits at DeepSpeed's minimum (the next overflow there stops the run)."""

    name = "overflow"

    def __init__(self) -> None:
        self.seen = 0.0
        self.at_minimum = False

    def observe(self, step: int, values: Mapping[str, float]) -> Iterable[Verdict]:
        verdicts = []
        total = values.get(catalog.OVERFLOW_STEPS.name)
        if total is not None and math.isfinite(total) and total > self.seen:
            run = int(values.get(catalog.CONSECUTIVE_OVERFLOWS.name, 1) or 1)
            scale = values.get(catalog.LOSS_SCALE.name)
            what = (
                f"fp16 overflow: step skipped, loss scale now {scale:g}"
                if scale is not None
                else "non-finite gradients (bf16/fp32: the update was applied)"
            )
            verdicts.append(
                Verdict(
                    EventKind.OVERFLOW,
                    Severity.WARNING if run > 1 or scale is None else Severity.INFO,
                    step,
                    step - run + 1,
                    f"{what}; {run} overflow step(s) in a row",
                    {"overflow_steps_total": total, "consecutive": run, "loss_scale": scale},
                    Reason.OVERFLOW,
                )
            )
            self.seen = total
        headroom = values.get(catalog.LOSS_SCALE_HEADROOM.name)
        at_min = headroom is not None and headroom <= 0
        if at_min and not self.at_minimum:
            verdicts.append(
                Verdict(
                    EventKind.OVERFLOW,
                    Severity.CRITICAL,
                    step,
                    step,
                    "fp16 loss scale is at DeepSpeed's minimum: another overflow stops the run "
                    "(consider bf16)",
                    {"loss_scale": values.get(catalog.LOSS_SCALE.name), "at_minimum": True},
                    Reason.LOSS_SCALE_MIN,
                )
            )
        self.at_minimum = at_min
        return verdicts

    def metrics(self) -> Iterable[Sample]:
        return ()

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "at_minimum": self.at_minimum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.at_minimum = state["seen"], state["at_minimum"]
