"""Each rank's share of the parameters, gradients and master weights, at any ZeRO stage.

A per-layer norm is a square root of a sum of squares, and a sum adds across ranks: every
rank sums the squares of the entries it holds, and one all-reduce of a stacked vector (all
layers, all statistics of a probe step) gives the model's numbers. Nothing is gathered.

What "the entries this rank holds" are, by how DeepSpeed keeps a parameter ``p``:

- ZeRO-0 (fp32, fp16): the gradient share is ``p.grad`` (already averaged over ranks), the
  weight share ``p`` itself; every rank holds all of it.
- ZeRO-1/2, and the bf16 optimizer: the fragment of this rank's flat partition that holds
  part of ``p`` (``p._hp_mapping``: gradient fragment, fp32 master fragment, and where it
  sits in ``p``, ``lp_fragment_address``).
- ZeRO-3: ``safe_get_local_grad(p)`` and ``safe_get_local_fp32_param(p)``, the entries
  ``[rank x partition size, ...)`` of the flattened ``p``.

Every share is the reduced (rank-averaged) gradient as the optimizer will see it, scaled by
the loss scale under fp16, and the weights after (or before) the update, so the sums equal
those of ZeRO-0 up to reduction order. With optimizer offload the shares live on the CPU
(the CPU optimizer's step has already waited for them); their sums are moved to the
model's device. Gradient shares exist only between the boundary micro-batch's backward and
``engine.step()`` (DeepSpeed frees them in the step).

``replicated`` (ZeRO-0) means every rank holds everything: nothing to add up, no
collective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def _is_zero3(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def _has_fragment(p: nn.Parameter) -> bool:
    return hasattr(p, "_hp_mapping")


class Shares:
    """This rank's share of each of ``params``; see the module docstring. Build it after
    ``deepspeed.initialize`` (the partitioning exists then)."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self.replicated = not any(_is_zero3(p) or _has_fragment(p) for p in self.params)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0

    @staticmethod
    def numel(p: nn.Parameter) -> int:
        """Entries of the whole parameter (a ZeRO-3 parameter is empty outside forward)."""
        return int(p.ds_numel) if _is_zero3(p) else p.numel()

    def span(self, p: nn.Parameter) -> tuple[int, int]:
        """(first entry, count) of the flattened parameter that this rank's shares hold."""
        if _is_zero3(p):
            size = p.ds_tensor.numel()  # the partition size (the last rank's is padded)
            start = min(self.rank * size, int(p.ds_numel))
            return start, max(0, min(size, int(p.ds_numel) - start))
        if _has_fragment(p):
            if p._hp_mapping is None:  # this rank's partition holds none of p
                return 0, 0
            address = p._hp_mapping.lp_fragment_address
            return int(address.start), int(address.numel)
        return 0, p.numel()

    def grad(self, p: nn.Parameter) -> torch.Tensor | None:
        """This rank's share of the reduced gradient, flat; None where there is none (no
        entry of ``p`` here, or no gradient)."""
        if _is_zero3(p):
            from deepspeed.utils import safe_get_local_grad

            g = safe_get_local_grad(p)
            return None if g is None else g.reshape(-1)[: self.span(p)[1]]
        if _has_fragment(p):
            if p._hp_mapping is None:
                return None
            g = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group).reshape(-1)
            start, count = self.span(p)
            # the bf16 optimizer keeps a whole-parameter buffer on every rank: take this
            # rank's fragment of it, or the fragment would be counted once per rank
            return g.narrow(0, start, count) if g.numel() != count else g
        return None if p.grad is None else p.grad.reshape(-1)

    def weights(self, p: nn.Parameter) -> torch.Tensor | None:
        """This rank's share of the weights (the fp32 master where there is one), flat."""
        if _is_zero3(p):
            from deepspeed.utils import safe_get_local_fp32_param

            w = safe_get_local_fp32_param(p)
            return None if w is None else w.reshape(-1)[: self.span(p)[1]]
        if _has_fragment(p):
            if p._hp_mapping is None:
                return None
            return p._hp_mapping.get_hp_fragment().reshape(-1)
        return p.detach().reshape(-1)

    def total_(self, sums: torch.Tensor) -> torch.Tensor:
        """Each rank's partial sums -> the model's, in place: one all-reduce when the
        parameters are partitioned over several ranks, nothing otherwise. On NCCL the
        reduction is queued on the stream; the host does not wait for it."""
        if not self.replicated and self.world > 1:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        return sums


def sampled_indices(n: int, k: int, generator: torch.Generator) -> torch.Tensor | None:
    """A fixed, sorted random subset of ``range(n)`` of about ``k`` entries (None: all of
    them). Drawn with replacement and deduplicated, so a billion-entry tensor costs ``k``
    draws, not a permutation of its length; every entry is equally likely, which keeps
    the scaled-up sums unbiased."""
    if n <= k:
        return None
    return torch.unique(torch.randint(0, n, (k,), generator=generator))  # sorted


def local_positions(index: torch.Tensor | None, start: int, count: int) -> torch.Tensor | None:
    """The entries of a sorted global ``index`` that fall in ``[start, start + count)``,
    as positions in that span (None: the whole span)."""
    if index is None:
        return None
    lo = int(torch.searchsorted(index, start))
    hi = int(torch.searchsorted(index, start + count))
    return index[lo:hi] - start


def whole(params: Sequence[torch.nn.Parameter]) -> contextlib.AbstractContextManager[Any]:
    """ZeRO-3 parameters gathered whole for the block (a collective on every rank; once,
    at attach), else nothing. A hook on a parameter's gradient makes autograd keep the
    parameter's gradient accumulator, which records the parameter's shape as it is now;
    made while a ZeRO-3 parameter is partitioned (empty), it would refuse the whole
    gradient in every later backward. DeepSpeed gathers before registering its own
    hooks for the same reason."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
