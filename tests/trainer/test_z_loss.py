"""PaLM's z-loss (``model.z_loss``): the term and its gradient against a direct computation,
the cross-entropy untouched when it is off, and a real run that reports it apart from the
LM loss (``yoto_z_loss`` beside ``yoto_train_loss``, also over two ranks) and keeps the
log-partition nearer zero: ``.venv/bin/python -m pytest -s tests/trainer/test_z_loss.py -k
log_partition`` prints the mean |log Z| of both runs (in-process runs under pytest: set
GOMP_SPINCOUNT=10000 on a shared CPU, as ``yoto train`` does before torch loads)."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import (
    FAST,
    counting_host_reads,
    make_trainer,
    only_run,
    subprocess_env,
    torchrun,
    train_in_process,
)
from yoto import catalog, runstore
from yoto.config import AttentionConfig, ModelConfig
from yoto.trainer.model import GPT, LossTerms

V = 320
COEF = 1e-2


def pair(z_loss: float, **model: object) -> tuple[GPT, GPT]:
    """Two GPTs with the same weights: z-loss off, and on with ``z_loss``."""
    cfg = dict(n_layer=2, n_head=2, d_model=32, seq_len=16, **model)
    torch.manual_seed(0)
    off = GPT(ModelConfig(**cfg), V)
    on = GPT(ModelConfig(**cfg, z_loss=z_loss), V)
    on.load_state_dict(off.state_dict())
    return off, on


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 257, (3, 16), generator=g), torch.randint(0, 257, (3, 16), generator=g)


def grads(model: GPT) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def backward_with_logits(model: GPT, *args: torch.Tensor | None) -> tuple[LossTerms, torch.Tensor]:
    """A training forward and backward; returns its terms and the LM head's output
    gradient (the logits' gradient)."""
    seen: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        seen.append(output)

    handle = model.lm_head.register_forward_hook(keep)
    model.zero_grad()
    out = model(*args, terms=True)
    out.loss.backward()
    handle.remove()
    return out, seen[0].grad


@pytest.mark.parametrize("prefix_lm", [False, True], ids=["causal", "prefix"])
def test_z_loss_gradient_matches_autograd_of_z_log_z_squared(prefix_lm: bool) -> None:
    """The added term's gradient (on - off, same weights and batch) is autograd's gradient
    of z x mean(log^2 Z) computed here from the logits, on every parameter and on the
    logits themselves, where it is also the closed form 2 z log Z softmax / N. With a
    prefix-LM (trained on the targets after its prefix), the mean is over the positions
    the cross-entropy counts."""
    extra = {"attention": AttentionConfig(pattern="prefix")} if prefix_lm else {}
    off, on = pair(COEF, **extra)
    idx, tgt = batch()
    prefix = torch.tensor([5, 9, 1]) if prefix_lm else None
    out_off, dlogits_off = backward_with_logits(off, idx, tgt, prefix)
    out_on, dlogits_on = backward_with_logits(on, idx, tgt, prefix)
    g_off, g_on = grads(off), grads(on)

    # direct: log Z of the model's own logits, squared, averaged over counted positions
    off.zero_grad()
    logits = off(idx, prefix_len=prefix)
    logits.retain_grad()
    counted = torch.ones(3, 16, dtype=torch.bool)
    if prefix_lm:
        counted = torch.arange(16)[None, :] + 1 >= prefix[:, None]
    log_z = torch.logsumexp(logits.float(), dim=-1)
    direct = COEF * log_z[counted].square().mean()
    direct.backward()

    assert out_off.z is None and out_on.z is not None
    torch.testing.assert_close(out_on.z, direct.detach())
    torch.testing.assert_close(out_on.loss, out_on.lm + out_on.z)
    assert torch.equal(out_on.lm, out_off.lm)  # the LM part is the cross-entropy as before
    closed = 2 * COEF * log_z[..., None] * logits.softmax(-1) * counted[..., None]
    closed = closed / counted.sum()
    torch.testing.assert_close(dlogits_on - dlogits_off, logits.grad)
    torch.testing.assert_close(dlogits_on - dlogits_off, closed.detach())
    for name, p in off.named_parameters():
        torch.testing.assert_close(g_on[name] - g_off[name], p.grad, msg=name)
    assert any(p.grad.abs().max() > 1e-4 for p in off.parameters())  # not vacuous


def test_z_loss_off_is_the_cross_entropy_bit_for_bit() -> None:
    """model.z_loss = 0 (the default): the training loss and every gradient are exactly
    those of the cross-entropy of the logits, as before z-loss existed; ``terms`` gives
    the same tensor and no z."""
    off, _ = pair(0.0)
    assert off.cfg.z_loss == 0.0 == ModelConfig().z_loss
    idx, tgt = batch()
    off.zero_grad()
    ref = F.cross_entropy(off(idx).float().view(-1, V), tgt.reshape(-1), ignore_index=-100)
    ref.backward()
    g_ref = grads(off)
    off.zero_grad()
    loss = off(idx, tgt)
    loss.backward()
    assert torch.equal(loss, ref)
    for name, p in off.named_parameters():
        assert torch.equal(p.grad, g_ref[name]), name
    loss, lm, z = off(idx, tgt, terms=True)
    assert torch.equal(loss, ref) and torch.equal(lm, ref) and z is None
    assert not lm.requires_grad


def test_z_loss_rides_the_steps_one_transfer_and_validation_stays_the_cross_entropy(
    tmp_path: Path,
) -> None:
    """In a real DeepSpeed step: ``yoto_z_loss`` comes with the step's values (absent when
    off) without one more host read; validation with the same weights (before any step)
    gives the same loss with z-loss on as off, the cross-entropy."""
    reads, values, val = {}, {}, {}
    for z_loss in (0.0, 0.1):
        trainer, store = make_trainer(tmp_path / str(z_loss), f"model.z_loss={z_loss}")
        val[z_loss] = trainer.evaluate()
        trainer.step_once()  # warm (first-step allocations, lazy imports)
        counts: Counter = Counter()
        with counting_host_reads(counts):
            values[z_loss], _ = trainer.step_once()
        reads[z_loss] = counts
        store.close("finished")
    assert val[0.0] and val[0.1] == val[0.0]
    assert catalog.Z_LOSS.name not in values[0.0]
    assert values[0.1][catalog.Z_LOSS.name] > 0
    assert reads[0.1] == reads[0.0], reads


@pytest.mark.slow
def test_a_run_reports_z_loss_apart_and_keeps_the_log_partition_nearer_zero(
    tmp_path: Path,
) -> None:
    """The tiny preset for 30 steps, the same seed and data, z-loss 0.1 vs off, log Z
    probed every step. Step 1 (equal weights): the same ``yoto_train_loss``, the LM loss;
    ``yoto_z_loss`` = 0.1 x log^2 Z then (log Z about log V at init), a row every step,
    none without z-loss. Over the last 10 steps |log Z| is nearer zero with z-loss on."""
    steps, last = 30, 10
    tables = {}
    for z_loss in (0.0, 0.1):
        sets = (*FAST, f"train.steps={steps}", "probes.layers.every=1", f"model.z_loss={z_loss}")
        run = train_in_process(
            tmp_path / str(z_loss), *(x for s in sets for x in ("--set", s)), name=f"z{z_loss}"
        )
        tables[z_loss] = runstore.read_metrics(run).to_pydict()
    off, on = tables[0.0], tables[0.1]
    assert on["step"] == off["step"] == list(range(1, steps + 1))
    assert on[catalog.TRAIN_LOSS.name][0] == off[catalog.TRAIN_LOSS.name][0]
    assert all(v is None for v in off.get(catalog.Z_LOSS.name, [None]))
    z = on[catalog.Z_LOSS.name]
    assert all(v is not None and v > 0 for v in z)
    log_z_1 = on[catalog.OUTPUT_LOG_Z.name][0]  # sampled rows; near log V for all at init
    assert z[0] == pytest.approx(0.1 * log_z_1**2, rel=0.02)
    mean_abs = {
        name: sum(abs(v) for v in t[catalog.OUTPUT_LOG_Z.name][-last:]) / last
        for name, t in (("off", off), ("on", on))
    }
    print(f"mean |log Z| over steps {steps - last + 1}-{steps}: {mean_abs}")
    assert mean_abs["on"] < 0.9 * mean_abs["off"], mean_abs


@pytest.mark.slow
def test_two_ranks_report_the_global_batchs_z_loss(tmp_path: Path) -> None:
    """Two ranks (gloo), each half of the global batch: ``yoto_z_loss`` is reduced with the
    loss in the step's one collective, so it is the one-rank run's number, and the stop
    flags that share the collective still read right (the run finishes, not interrupted)."""
    sets = [x for s in (*FAST, "train.steps=2", "model.z_loss=0.1") for x in ("--set", s)]
    one = runstore.read_metrics(train_in_process(tmp_path / "one", *sets)).to_pydict()
    env = subprocess_env()
    env["DS_ACCELERATOR"] = "cpu"
    cmd = [*torchrun(2), "-m", "yoto.cli", "train", "--run-root", str(tmp_path / "two")]
    proc = subprocess.run(
        [*cmd, "--no-progress", *sets], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = runstore.read_metrics(only_run(tmp_path / "two")).to_pydict()
    assert two["step"] == [1, 2]
    for key in (catalog.TRAIN_LOSS.name, catalog.Z_LOSS.name):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
