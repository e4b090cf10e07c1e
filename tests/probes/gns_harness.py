"""A least-squares problem whose gradient noise scale is known exactly, run through a real
DeepSpeed engine (lr = 0, so the truth does not move) with GradNoiseProbe attached and
driven the way trainer/loop.py drives it (the probe's sum over ranks included, which the
loop adds to its all-reduce of the loss). Used in-process by the tests, and under torchrun
for several ranks (``python -m torch.distributed.run ... tests/probes/gns_harness.py``,
which prints one JSON line from rank 0)."""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

from yoto import catalog
from yoto.config import GradNoiseConfig
from yoto.probes.base import MicroStepContext, StepContext
from yoto.probes.grad_noise import GradNoiseProbe
from yoto.probes.runner import ProbeRunner


class LeastSquares(nn.Module):
    def __init__(self, w0: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(w0.numel(), 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(w0[None, :])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.lin(x).squeeze(-1) - y).pow(2).mean()


def problem(n: int = 4096, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w_true = torch.randn(d, generator=g)
    y = x @ w_true + 0.5 * torch.randn(n, generator=g)
    w0 = w_true + 0.15 * torch.randn(d, generator=g)
    return x, y, w0


def exact(x: torch.Tensor, y: torch.Tensor, w0: torch.Tensor) -> dict[str, float]:
    """From per-example gradients: |G|^2, tr(Sigma) and B_simple of sampling with
    replacement from the data set."""
    per = 2 * (x @ w0 - y)[:, None] * x  # d/dw (x.w - y)^2 for every example
    grad = per.mean(0)
    trace = (per - grad).pow(2).sum(1).mean()
    return {
        "grad_sq": float(grad.pow(2).sum()),
        "trace_sigma": float(trace),
        "b_simple": float(trace / grad.pow(2).sum()),
    }


def run(
    steps: int, micro: int, gas: int, stage: int = 0, ema: float = 0.99, seed: int = 0
) -> dict[str, float]:
    import deepspeed
    import torch.distributed as dist

    from yoto.trainer.distributed import setup
    from yoto.trainer.engine import clip_own

    info = setup(torch.device("cpu"))
    x, y, w0 = problem(seed=seed)
    model = LeastSquares(w0)
    config = {
        "train_batch_size": micro * gas * info.world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 2**62,
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    probe = GradNoiseProbe(GradNoiseConfig(ema=ema))
    runner = ProbeRunner([probe])
    runner.attach(engine.module, engine)
    gen = torch.Generator().manual_seed(1000 * seed + info.rank)
    values: dict[str, float] = {}
    for step in range(1, steps + 1):
        runner.begin_step(step)
        norm = None
        for m in range(gas):
            idx = torch.randint(0, len(x), (micro,), generator=gen)  # with replacement
            engine.set_gradient_accumulation_boundary(m == gas - 1)
            loss = engine(x[idx], y[idx])
            engine.backward(loss)
            runner.on_micro_step(MicroStepContext(step, m, gas, loss.detach(), idx, engine))
            for item in runner.take_summed():  # the loop sums these with its loss
                total = item.tensor.detach().double().reshape(-1).clone()
                if info.world > 1:
                    dist.all_reduce(total)
                item.receive(total.reshape(item.tensor.shape))
            if m == gas - 1 and stage == 0:
                norm = clip_own(engine, 0.0)
            engine.step()
        if norm is None:
            norm = engine.get_global_grad_norm()
        runner.on_step(
            StepContext(
                step,
                0,
                0,
                micro * gas * info.world,
                micro,
                gas,
                info.world,
                1,
                loss.detach(),
                norm,
                0.0,
                engine,
            )
        )
        values, _ = runner.flush()
    runner.detach()
    result = {
        "estimate": values.get(catalog.GRADIENT_NOISE_SCALE.name, float("nan")),
        "grad_sq": values.get(catalog.GRADIENT_SQ_NORM_ESTIMATE.name, float("nan")),
        "trace_sigma": values.get(catalog.GRADIENT_TRACE_SIGMA.name, float("nan")),
        "world": info.world,
        **{f"exact_{k}": v for k, v in exact(x, y, w0).items()},
    }
    if dist.is_initialized() and info.world > 1:
        dist.barrier()
    return result


if __name__ == "__main__":
    steps, micro, gas, stage = (int(a) for a in sys.argv[1:5])
    out = run(steps, micro, gas, stage)
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(out), flush=True)
