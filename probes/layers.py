"""Per-layer statistics: which block goes wrong first.

On probe steps (every ``probes.layers.every``), for each transformer block:

| metric | type | labels | meaning |
|---|---|---|---|
| yoto_layer_grad_norm | gauge | layer | the block's gradient norm (pre-clip, unscaled) |
| yoto_layer_param_norm | gauge | layer | the block's parameter norm after the step |
| yoto_layer_update_ratio | gauge | layer | |step update| / |parameters| (sampled entries) |
| yoto_activation_rms | gauge | layer | RMS of the block's output |
| yoto_attention_logit_max | gauge | layer | largest attention logit (sampled heads/rows) |
| yoto_attention_entropy_nats | gauge | layer | mean attention entropy (sampled heads/rows) |
| yoto_output_logit_log_z | gauge | | mean log-partition of the LM head (sampled rows) |

How, without slowing the other steps:

- Gradients are read after the boundary micro-batch's backward and before the optimizer
  step, with DeepSpeed's ``safe_get_full_grad`` (the reduced gradient under ZeRO 0-2).
- The update ratio compares a fixed random subset of each parameter's entries (at most
  ``_SAMPLE`` per tensor) before and after the step, so the snapshot costs a sliver of the
  model's memory at any size.
- Attention statistics come from the attention module's ``stats_hook`` (q and k as the
  kernel sees them) for ``attention_heads`` evenly spread heads and the last
  ``attention_rows`` query rows of the first sequence, so the fused kernel stays the path
  on every step and the sampled logits are small.
- Activation RMS and the LM head's log-partition come from forward hooks on probe steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from yoto import catalog
from yoto.config import LayersConfig

from .base import HookGuard, MicroStepContext, Sample, StepContext
from .precision import blocks_of, loss_scale

_SAMPLE = 4096  # entries per parameter tensor kept for the update ratio


class LayerStatsProbe:
    """See the module docstring."""

    name = "layers"

    def __init__(self, cfg: LayersConfig, fp16: bool = False, zero_stage: int = 0) -> None:
        self.every = cfg.every
        self.cfg = cfg
        self.fp16 = fp16
        self.zero_stage = zero_stage
        self.guard = HookGuard()
        self._handles: list[Any] = []
        self._blocks: list[nn.Module] = []
        self._params: list[list[nn.Parameter]] = []
        self._index: dict[int, torch.Tensor] = {}  # id(param) -> sampled flat indices
        self._on = False
        self._before: list[list[torch.Tensor]] | None = None
        self._grad_norms: list[torch.Tensor] | None = None
        self._rms: dict[int, list[torch.Tensor]] = {}
        self._attn: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._log_z: list[torch.Tensor] = []

    # hooks

    def attach(self, model: nn.Module, engine: Any) -> None:
        if self.zero_stage >= 3:  # parameters are partitioned outside forward
            return
        self._blocks = blocks_of(model)
        gen = torch.Generator().manual_seed(0)
        for i, block in enumerate(self._blocks):
            params = [p for p in block.parameters() if p.requires_grad]
            self._params.append(params)
            for p in params:
                n = p.numel()
                if n > _SAMPLE:
                    self._index[id(p)] = torch.randperm(n, generator=gen)[:_SAMPLE].to(p.device)
            self._handles.append(block.register_forward_hook(self._rms_hook(i)))
            attn = getattr(block, "attn", None)
            if attn is not None and hasattr(attn, "stats_hook"):
                self._handles.append(_Restore(attn))
        head = getattr(model, "lm_head", None)
        if isinstance(head, nn.Module):
            self._handles.append(head.register_forward_hook(self._head_hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def active(self, step: int) -> None:
        self._on = step > 0
        for i, block in enumerate(self._blocks):
            attn = getattr(block, "attn", None)
            if attn is not None and hasattr(attn, "stats_hook"):
                attn.stats_hook = self._attn_hook(i, attn.n_head) if self._on else None

    def _rms_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if self._on and torch.is_grad_enabled():
                self.guard.run(self._record_rms, layer, output)

        return hook

    def _record_rms(self, layer: int, output: torch.Tensor) -> None:
        self._rms.setdefault(layer, []).append(output.detach().float().pow(2).mean().sqrt())

    def _attn_hook(self, layer: int, n_head: int) -> Any:
        def hook(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> None:
            if torch.is_grad_enabled() and layer not in self._attn:
                self.guard.run(self._record_attention, layer, n_head, q, k, mask)

        return hook

    def _record_attention(
        self, layer: int, n_head: int, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """Sampled heads and the last query rows of the first sequence, with the layer's own
        bias and mask (ALiBi, causal or prefix), so the logits are the ones softmaxed."""
        heads = torch.linspace(0, n_head - 1, min(self.cfg.attention_heads, n_head)).long()
        T = q.size(2)
        rows = torch.arange(max(0, T - self.cfg.attention_rows), T, device=q.device)
        heads = heads.to(q.device)
        qs = q[0, heads][:, rows].detach().float()  # (h, r, D)
        ks = k[0, heads].detach().float()  # (h, T, D)
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(q.size(-1))  # (h, r, T)
        add = mask[heads if mask.size(0) > 1 else 0][..., rows, :].float()  # (h or r, ...)
        logits = scores + add
        seen = torch.isfinite(logits)
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp.masked_fill(~seen, 0.0)).sum(-1).mean()
        self._attn[layer] = (logits.masked_fill(~seen, float("-inf")).amax(), entropy)

    def _head_hook(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if self._on and torch.is_grad_enabled():
            self.guard.run(self._record_log_z, output)

    def _record_log_z(self, logits: torch.Tensor) -> None:
        rows = logits[0, -self.cfg.attention_rows :].detach().float()  # (r, V)
        self._log_z.append(torch.logsumexp(rows, dim=-1).mean())

    # probe protocol

    def on_micro_step(self, ctx: MicroStepContext) -> Iterable[Sample]:
        if (
            self._params and ctx.micro == ctx.n_micro - 1
        ):  # gradients complete; the update has not happened
            from deepspeed.utils import safe_get_full_grad

            unscale = 1.0 / loss_scale(ctx.engine) if self.fp16 else 1.0
            norms = []
            for params in self._params:
                sq = [
                    g.detach().float().pow(2).sum()
                    for g in map(safe_get_full_grad, params)
                    if g is not None
                ]
                norms.append(torch.stack(sq).sum().sqrt() * unscale if sq else None)
            self._grad_norms = norms
            self._before = [[self._sampled(p).clone() for p in params] for params in self._params]
        return ()

    def _sampled(self, p: torch.Tensor) -> torch.Tensor:
        index = self._index.get(id(p))
        flat = p.detach().reshape(-1)
        return (flat if index is None else flat[index]).float()

    def on_step(self, ctx: StepContext) -> Iterable[Sample]:
        samples: list[Sample] = []
        for i, params in enumerate(self._params):
            label = {"layer": str(i)}
            param_sq = torch.stack([p.detach().float().pow(2).sum() for p in params]).sum()
            samples.append(Sample(catalog.LAYER_PARAM_NORM.name, param_sq.sqrt(), label))
            if self._grad_norms is not None and self._grad_norms[i] is not None:
                samples.append(Sample(catalog.LAYER_GRAD_NORM.name, self._grad_norms[i], label))
            if self._before is not None:
                # each tensor's sampled sums scaled up to its size: estimates of the full sums
                weights = [
                    p.numel() / b.numel() for p, b in zip(params, self._before[i], strict=True)
                ]
                delta = torch.stack(
                    [
                        (self._sampled(p) - b).pow(2).sum() * w
                        for p, b, w in zip(params, self._before[i], weights, strict=True)
                    ]
                )
                base = torch.stack(
                    [b.pow(2).sum() * w for b, w in zip(self._before[i], weights, strict=True)]
                )
                samples.append(
                    Sample(
                        catalog.LAYER_UPDATE_RATIO.name,
                        (delta.sum() / base.sum().clamp(min=1e-30)).sqrt(),
                        label,
                    )
                )
            if i in self._rms:
                samples.append(
                    Sample(catalog.ACTIVATION_RMS.name, torch.stack(self._rms[i]).mean(), label)
                )
            if i in self._attn:
                logit_max, entropy = self._attn[i]
                samples.append(Sample(catalog.ATTENTION_LOGIT_MAX.name, logit_max, label))
                samples.append(Sample(catalog.ATTENTION_ENTROPY.name, entropy, label))
        if self._log_z:
            samples.append(Sample(catalog.OUTPUT_LOG_Z.name, torch.stack(self._log_z).mean()))
        self._before = self._grad_norms = None
        self._rms, self._attn, self._log_z = {}, {}, []
        return samples

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class _Restore:
    """A handle that unsets an attention module's stats hook on detach."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn

    def remove(self) -> None:
        self.attn.stats_hook = None
