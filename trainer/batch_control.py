"""The global batch of each step: warmup ramp, then (optionally) the gradient noise scale.

Warmup (``train.batch_warmup``) ramps linearly in tokens to ``train.global_batch_size``.
After it, adaptive control (``train.adaptive_batch``) sets the target to
``clamp(k * B_noise, min, max)`` rounded down to micro-batch x ranks, at most every
``every`` steps, as Pollux/AdaScale do; the LR follows as ``(batch / base)^p`` with
p = 0, 1/2 or 1. A rollback may raise the batch (``after_rollback``), and so may the
policy's ``batch_size`` action. The controller's state (current target, last change) is
the run's: it survives checkpoints and is kept across a rollback.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

from yoto.config import TrainConfig

from .schedule import BatchRamp

_LR_POWER = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}


class BatchReason(StrEnum):
    """Why the global batch is what it is (a ``batch_size`` event's ``reason``)."""

    CONFIG = "config"  # train.global_batch_size
    WARMUP = "warmup"  # train.batch_warmup's ramp
    ADAPTIVE = "adaptive"  # the gradient noise scale
    POLICY = "policy"  # the policy's batch_size action
    ROLLBACK = "rollback"  # adaptive_batch.after_rollback


class BatchController:
    def __init__(self, cfg: TrainConfig, world: int) -> None:
        self.granularity = cfg.micro_batch_size * world
        self.base = cfg.global_batch_size
        warm = cfg.batch_warmup
        self.ramp = (
            BatchRamp(warm.start, self.base, warm.tokens, self.granularity)
            if warm.start is not None
            else BatchRamp.constant(self.base, self.granularity)
        )
        self.adaptive = cfg.adaptive_batch
        low = self.adaptive.min or self.base
        high = self.adaptive.max or 8 * low
        self.low = self._round(low)
        self.high = max(self.low, self._round(high))
        self.target = self.base
        self.last_change = 0
        self.in_warmup = False
        self.reason = BatchReason.CONFIG

    def _round(self, size: float) -> int:
        return max(self.granularity, int(size) - int(size) % self.granularity)

    def size(self, step: int, tokens: int, b_noise: float | None) -> tuple[int, BatchReason]:
        """Global batch (sequences) for ``step``, and the reason of its latest change
        (warmup, adaptive, policy, rollback). ``b_noise`` is the latest noise scale in
        sequences (None/NaN when unknown)."""
        was_warm = self.in_warmup
        self.in_warmup = bool(self.ramp.ramp_tokens) and tokens < self.ramp.ramp_tokens
        if self.in_warmup or was_warm:  # the ramp's last step lands on the target
            self.reason = BatchReason.WARMUP
        if self.in_warmup:
            return self.ramp.size_at(tokens), self.reason
        if (
            self.adaptive.enabled
            and b_noise is not None
            and math.isfinite(b_noise)
            and step - self.last_change >= self.adaptive.every
        ):
            want = min(self.high, max(self.low, self._round(self.adaptive.k * b_noise)))
            if want != self.target:
                self.target, self.last_change, self.reason = want, step, BatchReason.ADAPTIVE
        return self.target, self.reason

    def bump(self, factor: float, step: int, reason: BatchReason = BatchReason.POLICY) -> int:
        """Raise the target (after a rollback, or by the policy); bounded by the maximum."""
        ceiling = self.high if self.adaptive.enabled else max(self.high, self.base * 8)
        self.target = min(ceiling, self._round(self.target * factor))
        self.last_change, self.reason = step, reason
        return self.target

    def lr_factor(self) -> float:
        """LR multiplier for the current target (1 during warmup, which keeps the LR)."""
        if self.in_warmup or not self.adaptive.enabled:
            return 1.0
        return (self.target / self.base) ** _LR_POWER[self.adaptive.lr_scaling]

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target, "last_change": self.last_change, "reason": self.reason}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target, self.last_change = state["target"], state["last_change"]
        self.reason = BatchReason(state.get("reason", BatchReason.CONFIG))
