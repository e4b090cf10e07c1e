"""Gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training").

B_simple = tr(Sigma) / |G|^2, the batch size (in sequences) above which a bigger batch
stops buying proportionally faster progress. Two batch sizes give unbiased estimates:

    |G|^2   ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

Here the *small* batch is one micro-batch on one rank: gradient hooks add each
micro-batch's squared gradient norm on the device, before DeepSpeed accumulates or reduces
anything, and the step uses the mean over its micro-batches and ranks. The *big* batch is
the global batch, whose (pre-clipping, unscaled) norm the engine computes. The hooks see
the loss divided by the accumulation count (DeepSpeed's default) and, under fp16,
multiplied by the loss scale; both are undone. Overflow steps are skipped. The two
estimates are averaged separately (bias-corrected EMAs) and divided afterwards, never
averaged as a ratio; a negative tr(Sigma) average is clamped to 0, and while the |G|^2
average is not positive the scale is undefined (NaN).

Both estimates are per-sequence quantities, so a batch-size change needs no rescaling;
``reset_on_batch_change`` restarts the averages instead (they then reflect only the new
regime). With one micro-batch on one rank there is no small batch: the probe says so once
(a ``probe`` event) and emits nothing.

At every ZeRO stage the hooks see the same thing. They are tensor hooks on the parameters,
so autograd calls them with each micro-batch's whole gradient of each parameter, computed
on this rank, before it is accumulated into ``.grad``: before DeepSpeed's own hooks, which
run after accumulation (``register_grad_hook`` in ``deepspeed/runtime/zero/stage3.py`` and
``stage_1_and_2.py``) and reduce, reduce-scatter or partition it. ZeRO-3 gathers a module's
parameters for its forward and backward, so the gradient is complete when the hook runs;
nothing of the small batch depends on how the result is then partitioned. The big batch,
the engine's global grad norm, is computed by DeepSpeed from the partitions at ZeRO 1-3.
|G_small|^2 is the mean, over every micro-batch of every rank, of that micro-batch's
squared gradient norm: each is an unbiased estimate of E|G_B|^2 at B = micro-batch size
(the micro-batches are independent draws), so their mean is too, at any stage.

Emits (every ``probes.grad_noise.every`` steps):

| metric | type | meaning |
|---|---|---|
| yoto_gradient_noise_scale_samples | gauge | B_simple in sequences |
| yoto_gradient_noise_grad_sq | gauge | EMA of the |G|^2 estimate |
| yoto_gradient_noise_trace_sigma | gauge | EMA of the tr(Sigma) estimate |
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.autograd.graph import register_multi_grad_hook

from yoto import catalog
from yoto.config import GradNoiseConfig
from yoto.events import EventKind, Severity

from .base import HookGuard, MicroStepContext, Sample, StepContext, Summed, Verdict
from .precision import loss_scale
from .sharded import whole

Number = float | torch.Tensor


class NoiseScaleEstimator:
    """Two-batch estimators of |G|^2 and tr(Sigma) with bias-corrected EMAs.

    ``update`` takes floats or 0-d tensors (then everything stays on their device: no
    host synchronisation) and skips an update whose estimates are not finite. Batches are
    counted in samples (sequences)."""

    def __init__(self, ema: float = 0.95) -> None:
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {ema}")
        self.beta = ema
        self.reset()

    def reset(self) -> None:
        self._g2: torch.Tensor | None = None  # EMA sums, not yet bias-corrected
        self._tr: torch.Tensor | None = None
        self._weight: torch.Tensor | None = None  # 1 - beta^n over the accepted updates
        self.updates = 0

    def update(
        self, small_sq_norm: Number, small_batch: float, big_sq_norm: Number, big_batch: float
    ) -> None:
        if not 0 < small_batch < big_batch:
            raise ValueError(f"need 0 < small batch < big batch, got {small_batch} and {big_batch}")
        device = next(
            (x.device for x in (small_sq_norm, big_sq_norm) if isinstance(x, torch.Tensor)),
            torch.device("cpu"),
        )
        small = torch.as_tensor(small_sq_norm, dtype=torch.float64, device=device)
        big = torch.as_tensor(big_sq_norm, dtype=torch.float64, device=device)
        g2 = (big_batch * big - small_batch * small) / (big_batch - small_batch)
        tr = (small - big) / (1.0 / small_batch - 1.0 / big_batch)
        if self._g2 is None:
            zero = torch.zeros((), dtype=torch.float64, device=device)
            self._g2, self._tr, self._weight = zero, zero.clone(), zero.clone()
        ok = torch.isfinite(g2) & torch.isfinite(tr)
        b = self.beta
        self._g2 = torch.where(ok, b * self._g2 + (1 - b) * g2, self._g2)
        self._tr = torch.where(ok, b * self._tr + (1 - b) * tr, self._tr)
        self._weight = torch.where(ok, b * self._weight + (1 - b), self._weight)
        self.updates += 1

    def _corrected(self, ema: torch.Tensor | None) -> torch.Tensor:
        if ema is None or self._weight is None:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return torch.where(
            self._weight > 0,
            ema / self._weight.clamp(min=1e-300),
            torch.full_like(ema, float("nan")),
        )

    @property
    def grad_sq(self) -> torch.Tensor:
        """Estimate of |G|^2 (bias-corrected EMA; may be <= 0 early on)."""
        return self._corrected(self._g2)

    @property
    def trace_sigma(self) -> torch.Tensor:
        """Estimate of tr(Sigma), clamped at 0."""
        return self._corrected(self._tr).clamp(min=0.0)

    @property
    def b_simple(self) -> torch.Tensor:
        """tr(Sigma) / |G|^2 in samples; NaN while the |G|^2 estimate is not positive."""
        g2 = self.grad_sq
        return torch.where(g2 > 0, self.trace_sigma / g2, torch.full_like(g2, float("nan")))

    def state_dict(self) -> dict[str, Any]:
        def host(t: torch.Tensor | None) -> float | None:
            return None if t is None else float(t)  # checkpoint time, not the hot path

        return {
            "beta": self.beta,
            "g2": host(self._g2),
            "tr": host(self._tr),
            "weight": host(self._weight),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        self.beta = state["beta"]
        self.updates = state["updates"]
        if state["g2"] is None:
            self._g2 = self._tr = self._weight = None
            return
        kw = {"dtype": torch.float64, "device": device or torch.device("cpu")}
        self._g2 = torch.tensor(state["g2"], **kw)
        self._tr = torch.tensor(state["tr"], **kw)
        self._weight = torch.tensor(state["weight"], **kw)


def parameter_groups(model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """Trainable parameters grouped by top-level module (each element of a ModuleList,
    i.e. each transformer block, on its own); a tied parameter appears once."""
    seen: set[int] = set()
    groups = []
    for child in model.children():
        parts = list(child) if isinstance(child, torch.nn.ModuleList) else [child]
        for part in parts:
            group = [p for p in part.parameters() if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in group)
            if group:
                groups.append(group)
    rest = [p for p in model.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
    return groups + ([rest] if rest else [])


class GradNoiseProbe:
    """Feeds :class:`NoiseScaleEstimator` from DeepSpeed; see the module docstring."""

    name = "grad_noise"

    def __init__(self, cfg: GradNoiseConfig, fp16: bool = False) -> None:
        self.every = cfg.every
        self.cfg = cfg
        self.fp16 = fp16
        self.estimator = NoiseScaleEstimator(cfg.ema)
        self.guard = HookGuard()
        self._handles: list[Any] = []
        self._on = False
        self._norms: list[torch.Tensor] = []  # per-parameter norms of this micro-batch
        self._small_sum: torch.Tensor | None = None  # sum over this step's micro-batches
        self._small_total: torch.Tensor | None = None  # ... and over the ranks
        self._last_batch: int | None = None
        self._said: set[str] = set()
        self._device = torch.device("cpu")
        self._scale = 1.0

    # hooks

    def attach(self, model: torch.nn.Module, engine: Any) -> None:
        for group in parameter_groups(model):
            self._device = group[0].device
            # one Python call per block and backward, one fused norm kernel for its grads;
            # a block's grads are held only until its last one is computed
            with whole(group):
                self._handles.append(register_multi_grad_hook(group, self._hook, mode="all"))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def active(self, step: int) -> None:
        self._on = step > 0

    def _hook(self, grads: Sequence[torch.Tensor | None]) -> None:
        if self._on:
            self.guard.run(self._accumulate, grads)

    def _accumulate(self, grads: Sequence[torch.Tensor | None]) -> None:
        present = [g.detach() for g in grads if g is not None]
        if present:
            self._norms.extend(torch._foreach_norm(present, 2, dtype=torch.float32))

    # probe protocol

    def on_micro_step(self, ctx: MicroStepContext) -> Iterable[Summed]:
        if self.fp16:  # the scale this backward used (it may grow in the coming step)
            self._scale = loss_scale(ctx.engine)
        if self._norms:
            micro = torch.stack(self._norms).square().sum()
            self._small_sum = micro if self._small_sum is None else self._small_sum + micro
            self._norms = []
        if ctx.micro == ctx.n_micro - 1 and self._small_sum is not None:
            # the sum over ranks rides in the loop's all-reduce of the loss (no collective)
            return (Summed(self._small_sum, self._receive),)
        return ()

    def _receive(self, total: torch.Tensor) -> None:
        self._small_total = total

    def on_step(self, ctx: StepContext) -> Iterable[Sample | Verdict]:
        small_sum, self._small_sum = self._small_total, None  # summed over the ranks
        self._small_total = None
        if ctx.n_micro * ctx.world <= 1:
            return self._say_once(
                "one_batch",
                ctx.step,
                "gradient noise scale needs two batch sizes: while a step is one "
                "micro-batch on one rank the small and big batch coincide, so it is not "
                "reported (accumulate gradients or add ranks)",
            )
        if small_sum is None or ctx.grad_norm is None:
            return ()
        if not ctx.engine.was_step_applied():  # fp16 overflow: the norms mean nothing
            return ()
        # hooks saw d(loss / n_micro)/dw, times the loss scale under fp16
        scale = float(ctx.n_micro)
        if self.fp16:
            scale /= self._scale
        # the mean over this step's micro-batches of every rank
        small_sq = small_sum.double() * (scale * scale) / (ctx.n_micro * ctx.world)
        norm = ctx.grad_norm
        big_sq = norm.double() ** 2 if isinstance(norm, torch.Tensor) else float(norm) ** 2
        if (
            self._last_batch is not None
            and ctx.batch_size != self._last_batch
            and self.cfg.reset_on_batch_change
        ):
            self.estimator.reset()
        self._last_batch = ctx.batch_size
        self.estimator.update(small_sq, ctx.micro_batch_size, big_sq, ctx.batch_size)
        return (
            Sample(catalog.GRADIENT_NOISE_SCALE.name, self.estimator.b_simple),
            Sample(catalog.GRADIENT_SQ_NORM_ESTIMATE.name, self.estimator.grad_sq),
            Sample(catalog.GRADIENT_TRACE_SIGMA.name, self.estimator.trace_sigma),
        )

    def _say_once(self, key: str, step: int, message: str) -> Iterable[Verdict]:
        if key in self._said:
            return ()
        self._said.add(key)
        return (
            Verdict(
                EventKind.PROBE,
                Severity.INFO,
                step,
                step,
                message,
                {"probe": self.name, "reason": key},
            ),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "estimator": self.estimator.state_dict(),
            "last_batch": self._last_batch,
            "said": sorted(self._said),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.estimator.load_state_dict(state["estimator"], self._device)
        self._last_batch = state["last_batch"]
        self._said = set(state["said"])
