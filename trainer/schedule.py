"""Learning-rate schedule and batch-size warmup: pure functions of the run's progress.

Both depend only on (step, tokens consumed), which the checkpoint stores, so a resumed or
rolled-back run continues on the same schedule without any scheduler state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from yoto.config import OptimConfig


def learning_rate(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """LR of optimizer step ``step`` (0-based): linear warmup, then cosine/linear decay to
    ``lr * min_lr_ratio`` at ``decay_steps`` (default: the run's length), flat after."""
    peak = cfg.lr
    floor = peak * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    decay = cfg.decay_steps or total_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, decay - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak - (peak - floor) * progress


@dataclass(frozen=True)
class BatchRamp:
    """Global batch (in sequences) as a function of training tokens consumed: a linear ramp
    from ``start`` to ``target`` over ``ramp_tokens``, rounded down to a multiple of
    ``granularity`` (micro-batch x data-parallel ranks, what DeepSpeed can accumulate)."""

    start: int
    target: int
    ramp_tokens: int
    granularity: int

    def __post_init__(self) -> None:
        if self.target % self.granularity:
            raise ValueError(
                f"global batch {self.target} is not a multiple of micro-batch x ranks "
                f"= {self.granularity}"
            )

    @classmethod
    def constant(cls, target: int, granularity: int) -> BatchRamp:
        return cls(target, target, 0, granularity)

    def size_at(self, tokens: int) -> int:
        first = max(self.granularity, self.start - self.start % self.granularity)
        if self.ramp_tokens <= 0 or tokens >= self.ramp_tokens or first >= self.target:
            return self.target
        exact = first + (self.target - first) * tokens / self.ramp_tokens
        size = int(exact) - int(exact) % self.granularity
        return min(self.target, max(first, size))


@dataclass(frozen=True)
class SeqRamp:
    """Context length (tokens per training sequence) as a function of the training tokens
    consumed since the ramp began: from ``start`` to ``target`` (``model.seq_len``) over
    ``ramp_tokens``, ``linear`` or ``root`` (the square root of the progress: long
    sequences sooner, as DeepSpeed's ``fixed_root`` curriculum), rounded down to a multiple
    of ``multiple`` (at least one multiple; ``target`` itself at the end).

    The clock is the same token count the batch ramp reads (one clock for both warmups,
    where DeepSpeed's two step-based schedules must not be combined): a step's batch and
    length are both fixed by the tokens before it, and its tokens are batch x length."""

    start: int
    target: int
    ramp_tokens: int
    schedule: str = "linear"  # linear | root
    multiple: int = 8

    @classmethod
    def constant(cls, target: int) -> SeqRamp:
        return cls(target, target, 0)

    @property
    def first(self) -> int:
        """The length of the ramp's first step."""
        return min(self.target, max(self.multiple, self.start - self.start % self.multiple))

    def length_at(self, tokens: int) -> int:
        """Length of the sequences of a step that begins ``tokens`` into the ramp."""
        if self.ramp_tokens <= 0 or tokens >= self.ramp_tokens or self.first >= self.target:
            return self.target
        progress = max(0, tokens) / self.ramp_tokens
        if self.schedule == "root":
            progress = math.sqrt(progress)
        exact = self.first + (self.target - self.first) * progress
        length = int(exact) - int(exact) % self.multiple
        return min(self.target, max(self.first, length))
