import itertools
import math

import pytest

from yoto.config import OptimConfig
from yoto.trainer.schedule import BatchRamp, learning_rate


def test_warmup_then_cosine_to_floor() -> None:
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    lrs = [learning_rate(s, cfg, total_steps=110) for s in range(130)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1) and lrs[129] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))


def test_decay_steps_override_and_other_shapes() -> None:
    cfg = OptimConfig(lr=2.0, warmup_steps=0, min_lr_ratio=0.0, decay_steps=100, schedule="linear")
    assert learning_rate(50, cfg, total_steps=10) == pytest.approx(1.0)
    const = OptimConfig(lr=2.0, warmup_steps=4, schedule="constant")
    assert [learning_rate(s, const, 100) for s in (0, 3, 50)] == [0.5, 2.0, 2.0]


def test_batch_ramp_is_linear_in_tokens_and_granular() -> None:
    ramp = BatchRamp(start=8, target=64, ramp_tokens=1000, granularity=8)
    sizes = [ramp.size_at(t) for t in range(0, 1200, 10)]
    assert sizes[0] == 8 and ramp.size_at(1000) == 64 and ramp.size_at(10**9) == 64
    assert all(s % 8 == 0 and 8 <= s <= 64 for s in sizes)
    assert all(a <= b for a, b in itertools.pairwise(sizes))
    assert ramp.size_at(500) == 32  # halfway in tokens, halfway in batch


def test_batch_ramp_start_below_granularity_and_constant() -> None:
    assert BatchRamp(start=3, target=32, ramp_tokens=100, granularity=16).size_at(0) == 16
    assert BatchRamp.constant(32, 16).size_at(0) == 32
    with pytest.raises(ValueError, match="not a multiple of micro-batch x ranks = 16"):
        BatchRamp(start=16, target=40, ramp_tokens=10, granularity=16)
