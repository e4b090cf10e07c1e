"""The gradient noise scale: exact on a least-squares problem, right inside DeepSpeed."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import FAST, ROOT, subprocess_env, torchrun, train_in_process
from tests.probes.gns_harness import exact, problem, run
from yoto import catalog, runstore
from yoto.probes.grad_noise import NoiseScaleEstimator


def test_estimator_recovers_b_simple_from_exact_batch_norms() -> None:
    """Per-example gradients give the exact |G|^2 and tr(Sigma); batches drawn with
    replacement give |G_B|^2 whose mean is |G|^2 + tr(Sigma)/B."""
    x, y, w0 = problem()
    truth = exact(x, y, w0)
    per = 2 * (x @ w0 - y)[:, None] * x
    gen = torch.Generator().manual_seed(1)
    est = NoiseScaleEstimator(ema=0.999)
    for _ in range(5000):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        small = per[idx[:8]].mean(0).pow(2).sum()
        big = per[idx].mean(0).pow(2).sum()
        est.update(float(small), 8, float(big), 64)
    assert float(est.grad_sq) == pytest.approx(truth["grad_sq"], rel=0.05)
    assert float(est.trace_sigma) == pytest.approx(truth["trace_sigma"], rel=0.05)
    assert float(est.b_simple) == pytest.approx(truth["b_simple"], rel=0.05)


def test_estimator_contract() -> None:
    est = NoiseScaleEstimator(ema=0.5)
    assert math.isnan(float(est.b_simple))
    with pytest.raises(ValueError, match="small batch < big batch"):
        est.update(1.0, 8, 1.0, 8)
    est.update(torch.tensor(3.0), 4, torch.tensor(1.0), 16)  # tensors stay tensors
    a = (float(est.grad_sq), float(est.trace_sigma))
    est.update(float("inf"), 4, 1.0, 16)  # an overflow step is skipped
    assert (float(est.grad_sq), float(est.trace_sigma)) == a
    # first update, bias-corrected: exactly the single two-batch estimate
    assert a == pytest.approx(((16 * 1 - 4 * 3) / 12, (3 - 1) / (1 / 4 - 1 / 16)))
    est.update(5.0, 4, 0.1, 16)  # |G|^2 estimate goes negative: scale undefined, not made up
    assert float(est.grad_sq) < 0 and math.isnan(float(est.b_simple))
    copy = NoiseScaleEstimator()
    copy.load_state_dict(est.state_dict())
    assert float(copy.trace_sigma) == float(est.trace_sigma)


@pytest.mark.parametrize(("stage", "gas"), [(0, 4), (2, 4), (3, 4)])
def test_hooked_micro_batch_norms_in_deepspeed(stage: int, gas: int) -> None:
    result = run(steps=500, micro=4, gas=gas, stage=stage)
    assert result["estimate"] == pytest.approx(result["exact_b_simple"], rel=0.15)
    assert result["grad_sq"] == pytest.approx(result["exact_grad_sq"], rel=0.15)


@pytest.mark.slow
def test_two_ranks_with_accumulation() -> None:
    cmd = [*torchrun(2), str(ROOT / "tests" / "probes" / "gns_harness.py"), "500", "4", "2", "1"]
    proc = subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["world"] == 2
    assert result["estimate"] == pytest.approx(result["exact_b_simple"], rel=0.15)


def test_one_micro_batch_on_one_rank_says_so_once(tmp_path: Path) -> None:
    args = []
    for item in (*FAST, "train.steps=5", "train.micro_batch_size=8", "train.global_batch_size=8"):
        args += ["--set", item]
    run_dir = train_in_process(tmp_path, *args)
    notes = [
        e
        for e in runstore.read_events(run_dir)
        if e["kind"] == "probe" and e["data"].get("reason") == "one_batch"
    ]
    assert len(notes) == 1 and "not reported" in notes[0]["message"]
    t = runstore.read_metrics(run_dir).to_pydict()
    assert catalog.GRADIENT_NOISE_SCALE.name not in t


def test_the_demo_shows_a_noise_scale(trained_run: Path) -> None:
    t = runstore.read_metrics(trained_run).to_pydict()
    b = [v for v in t[catalog.GRADIENT_NOISE_SCALE.name] if v is not None]
    assert len(b) > 400 and all(math.isfinite(v) and v > 0 for v in b[-100:])
