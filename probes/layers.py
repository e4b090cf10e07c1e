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

How, without slowing the other steps, at every ZeRO stage:

- Grad norm, parameter norm and update ratio are sums of squares, so each rank sums the
  entries it holds (probes/sharded.py: the whole tensor at ZeRO-0, its partition's
  fragment at ZeRO-1/2, its partition at ZeRO-3, on the CPU under optimizer offload) and
  one all-reduce of a stacked vector (4 numbers per block) per probe step adds the shares;
  nothing is gathered. Gradients are read after the boundary micro-batch's backward and
  before the optimizer step: the reduced gradient, as the optimizer will apply it.
- The update ratio compares a fixed random subset of each parameter's entries (about
  ``_SAMPLE`` per tensor, drawn over the whole tensor's index space, so the subset is the
  same at every stage and each rank keeps the part in its share) before and after the
  step; the snapshot costs a sliver of the model's memory at any size.
- Attention statistics come from the attention module's ``stats_hook`` (q and k as the
  kernel sees them) for ``attention_heads`` evenly spread heads and the last
  ``attention_rows`` query rows of the first sequence, so the fused kernel stays the path
  on every step and the sampled logits are small.
- Activation RMS and the LM head's log-partition come from forward hooks on probe steps;
  they see whole activations at every stage (ZeRO-3 gathers a module's parameters for its
  forward), and are rank 0's micro-batches, as every per-step value the loop records.
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
from .sharded import Shares, local_positions, sampled_indices

_SAMPLE = 4096  # entries per parameter tensor kept for the update ratio


class LayerStatsProbe:
    """See the module docstring."""

    name = "layers"

    def __init__(self, cfg: LayersConfig, fp16: bool = False) -> None:
        self.every = cfg.every
        self.cfg = cfg
        self.fp16 = fp16
        self.guard = HookGuard()
        self._handles: list[Any] = []
        self._blocks: list[nn.Module] = []
        self._params: list[list[nn.Parameter]] = []
        self._shares: Shares | None = None
        # id(param) -> positions in this rank's share of the sampled entries (None: all),
        # and the parameter's weight in the update ratio: entries / entries sampled
        self._index: dict[int, torch.Tensor | None] = {}
        self._scale: dict[int, float] = {}
        self._device = torch.device("cpu")
        self._on = False
        self._before: list[list[torch.Tensor]] | None = None  # sampled weights, pre-step
        self._grad_sq: torch.Tensor | None = None  # (blocks,) this rank's shares, pre-step
        self._unscale = 1.0
        self._rms: dict[int, list[torch.Tensor]] = {}
        self._attn: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._log_z: list[torch.Tensor] = []

    # hooks

    def attach(self, model: nn.Module, engine: Any) -> None:
        self._blocks = blocks_of(model)
        gen = torch.Generator().manual_seed(0)
        self._params = [[p for p in b.parameters() if p.requires_grad] for b in self._blocks]
        self._shares = shares = Shares([p for params in self._params for p in params])
        for i, block in enumerate(self._blocks):
            for p in self._params[i]:
                self._device = p.device
                n = shares.numel(p)
                index = sampled_indices(n, _SAMPLE, gen)  # the same subset at every stage
                start, count = shares.span(p)
                self._index[id(p)] = local_positions(index, start, count)
                self._scale[id(p)] = n / (n if index is None else index.numel())
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
        if self._shares is None or ctx.micro != ctx.n_micro - 1:
            return ()
        # the boundary: gradients reduced into their shares, the update not yet applied
        shares = self._shares
        sums = []
        for params in self._params:
            grads = [g for g in map(shares.grad, params) if g is not None and g.numel()]
            sums.append(_sum_sq(grads, self._device))
        self._grad_sq = torch.stack(sums) if sums else None
        # the scale these gradients carry (fp16; the step may grow or halve it)
        self._unscale = 1.0 / loss_scale(ctx.engine) if self.fp16 else 1.0
        self._before = [[self._sampled(p).clone() for p in params] for params in self._params]
        return ()

    def _sampled(self, p: nn.Parameter) -> torch.Tensor:
        """The sampled entries of this rank's share of ``p``'s weights, fp32."""
        assert self._shares is not None
        flat = self._shares.weights(p)
        if flat is None:
            return torch.zeros(0, device=self._device)
        flat = flat.detach()
        index = self._index[id(p)]
        if index is not None and index.device != flat.device:
            index = self._index[id(p)] = index.to(flat.device)
        return (flat if index is None else flat[index]).float()

    def on_step(self, ctx: StepContext) -> Iterable[Sample]:
        samples: list[Sample] = []
        if self._shares is not None and self._params:
            samples.extend(self._norm_samples(ctx))
        for i in range(len(self._blocks)):
            label = {"layer": str(i)}
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
        self._before = self._grad_sq = None
        self._rms, self._attn, self._log_z = {}, {}, []
        return samples

    def _norm_samples(self, ctx: StepContext) -> list[Sample]:
        """Grad norm, parameter norm and update ratio of every block: this rank's sums of
        squares, stacked, then one all-reduce (sharded engines only) adds the ranks'."""
        assert self._shares is not None
        shares, n = self._shares, len(self._params)
        param_sq, delta_sq, base_sq = [], [], []
        for i, params in enumerate(self._params):
            weights = [w for w in map(shares.weights, params) if w is not None and w.numel()]
            param_sq.append(_sum_sq([w.detach() for w in weights], self._device))
            if self._before is not None:
                after = [self._sampled(p) for p in params]
                scale = [self._scale[id(p)] for p in params]
                # each tensor's sampled sums scaled up to its size: estimates of full sums
                delta_sq.append(
                    _sum_sq(
                        [a - b for a, b in zip(after, self._before[i], strict=True)],
                        self._device,
                        scale,
                    )
                )
                base_sq.append(_sum_sq(self._before[i], self._device, scale))
        parts = [torch.stack(param_sq)]
        if self._grad_sq is not None:
            parts.append(self._grad_sq)
        if self._before is not None:
            parts += [torch.stack(delta_sq), torch.stack(base_sq)]
        sums = shares.total_(torch.cat(parts).double())  # (blocks x 2..4,)
        param_norm = sums[:n].sqrt()
        samples = []
        grad_norm = update = None
        if self._grad_sq is not None:
            grad_norm = sums[n : 2 * n].sqrt() * self._unscale
        if self._before is not None:
            delta, base = sums[-2 * n : -n], sums[-n:]
            update = (delta / base.clamp(min=1e-30)).sqrt()
        for i in range(n):
            label = {"layer": str(i)}
            samples.append(Sample(catalog.LAYER_PARAM_NORM.name, param_norm[i], label))
            if grad_norm is not None:
                samples.append(Sample(catalog.LAYER_GRAD_NORM.name, grad_norm[i], label))
            if update is not None:
                samples.append(Sample(catalog.LAYER_UPDATE_RATIO.name, update[i], label))
        return samples

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _sum_sq(
    tensors: list[torch.Tensor], device: torch.device, scale: list[float] | None = None
) -> torch.Tensor:
    """sum_i scale_i * |t_i|^2 as a 0-d fp64 tensor on ``device`` (one fused norm kernel
    per device; offloaded shares are summed on the CPU and their sum moved)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    scale = scale or [1.0] * len(tensors)
    norms = torch._foreach_norm([t.float() for t in tensors], 2)
    terms = [(x.double() ** 2 * s).to(device) for x, s in zip(norms, scale, strict=False)]
    return torch.stack(terms).sum()


class _Restore:
    """A handle that unsets an attention module's stats hook on detach."""

    def __init__(self, attn: nn.Module) -> None:
        self.attn = attn

    def remove(self) -> None:
        self.attn.stats_hook = None
