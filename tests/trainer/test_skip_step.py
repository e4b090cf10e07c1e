"""Skip-step: an outlier step's update is left out, exactly, decided on the device, the same
on every rank, at every ZeRO stage, with no host read on the step path."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, counting_host_reads, make_trainer, subprocess_env, torchrun
from yoto import catalog, runstore
from yoto.config import SkipStepConfig
from yoto.events import Reason, Severity
from yoto.probes.base import Verdict
from yoto.trainer.engine import skip_gate
from yoto.trainer.policy import Action, Policy
from yoto.trainer.skip_step import SkipGate, SkipStepAdamW

CPU = torch.device("cpu")
SKIP = ["optim.skip_step.enabled=true", "optim.skip_step.window=16"]
FAULT_STEP = 30


def test_a_skipped_first_step_with_infinite_grads_changes_nothing() -> None:
    """The update is one addcdiv over (sqrt(v) + eps) / step: with v = 0 and step = 0 it
    must still be an exact zero, not 0 / 0."""
    params = [torch.zeros(3, requires_grad=True), torch.ones(2, requires_grad=True)]
    gate = SkipGate(SkipStepConfig(enabled=True, window=8), CPU)
    opt = SkipStepAdamW([{"params": params, "weight_decay": 0.1}], gate, lr=1e-3)
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    gate.begin(torch.tensor(float("nan")), torch.tensor(float("inf")))
    opt.step()
    assert gate.end()
    assert torch.equal(params[0], torch.zeros(3)) and torch.equal(params[1], torch.ones(2))
    for p in params:
        state = opt.state[p]
        assert state["step"] == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def test_skip_step_adamw_is_adamw_until_it_skips_and_then_changes_nothing() -> None:
    torch.manual_seed(0)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    ours_params = [torch.randn(s, requires_grad=True) for s in shapes]
    theirs_params = [p.detach().clone().requires_grad_() for p in ours_params]

    def groups(ps: list[torch.Tensor]) -> list[dict]:
        return [
            {"params": ps[:1] + ps[2:], "weight_decay": 0.1},
            {"params": ps[1:2], "weight_decay": 0.0},
        ]

    gate = SkipGate(SkipStepConfig(enabled=True, window=8), CPU)
    ours = SkipStepAdamW(groups(ours_params), gate, lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    theirs = torch.optim.AdamW(groups(theirs_params), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(6):
        grads = [torch.randn(s) for s in shapes]
        for a, b, g in zip(ours_params, theirs_params, grads, strict=True):
            a.grad, b.grad = g.clone(), g.clone()
        gate.begin(torch.tensor(2.0), torch.tensor(1.0))
        ours.step()
        assert not gate.end()
        theirs.step()
    for a, b in zip(ours_params, theirs_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # AdamW's arithmetic

    before = {
        "params": [p.detach().clone() for p in ours_params],
        "state": {k: v.clone() for p in ours_params for k, v in ours.state[p].items()},
    }
    for p in ours_params:
        p.grad = torch.randn_like(p) * 100
    gate.begin(torch.tensor(float("nan")), torch.tensor(1.0))  # a non-finite loss: skip
    ours.step()
    assert gate.end()
    for p, old in zip(ours_params, before["params"], strict=True):
        assert torch.equal(p, old)
    after = {k: v for p in ours_params for k, v in ours.state[p].items()}
    assert all(torch.equal(after[k], before["state"][k]) for k in after)


def test_the_gate_waits_for_half_a_window_and_keeps_non_finite_steps_out() -> None:
    gate = SkipGate(SkipStepConfig(enabled=True, window=8, sigma=6.0), CPU)

    def step(loss: float, norm: float = 1.0) -> bool:
        gate.begin(torch.tensor(loss), torch.tensor(norm))
        verdict = bool(gate.skip())
        assert bool(gate.end()) == verdict
        return verdict

    assert [step(2.0 + 0.01 * i) for i in range(3)] == [False] * 3
    assert not step(50.0)  # 3 steps seen: not ready (half of 8 is 4), and it enters
    assert step(float("inf"))  # not finite: skipped at once, and kept out of the window
    assert int(gate.count) == 4
    for i in range(4):
        step(2.0 + 0.01 * i)
    assert step(200.0)  # ready now: a loss far above mean + 6 sigma
    assert step(2.0, norm=1e4)  # or a grad norm
    assert not step(2.02)
    restored = SkipGate(SkipStepConfig(enabled=True, window=8), CPU)
    restored.load_state_dict(gate.state_dict())  # branch state, in checkpoints
    assert torch.equal(restored.losses, gate.losses) and int(restored.count) == int(gate.count)


def test_the_policy_calls_an_absorbed_spike_an_event_and_an_unabsorbed_one_an_alert() -> None:
    from yoto.config import PolicyConfig
    from yoto.events import EventKind

    spike = Verdict(EventKind.SPIKE, Severity.WARNING, 10, 10, "loss spike", reason=Reason.SPIKE)
    policy = Policy(PolicyConfig())  # spike -> skip_step, the default
    assert policy.decide(10, [spike], [], update_skipped=True).action == Action.SKIP_STEP
    assert policy.decide(10, [spike], [], update_skipped=False).action == Action.ALERT


def client_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the client optimizer: its parameters (ZeRO's fp32 partitions) and
    its state."""
    out = {}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            out[f"p{g}.{i}"] = p.detach().clone()
            for key, value in optimizer.state[p].items():
                out[f"p{g}.{i}.{key}"] = value.clone()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_bad_batch_is_skipped_bit_exactly_at_every_zero_stage(tmp_path: Path, stage) -> None:
    trainer, store = make_trainer(
        tmp_path,
        *SKIP,
        f"train.zero_stage={stage}",
        f"faults=[bad_batch@{FAULT_STEP}:steps=1]",
        "train.steps=40",
    )
    gate = skip_gate(trainer.engine)
    wrapped = (trainer.engine.optimizer, getattr(trainer.engine.optimizer, "optimizer", None))
    client = next(o for o in wrapped if isinstance(o, SkipStepAdamW))
    assert gate is client.gate
    try:
        for _ in range(FAULT_STEP - 1):
            trainer.step_once()
        model = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
        optim = client_state(client)
        values, _ = trainer.step_once()  # the bad batch
        assert values[catalog.STEP_SKIPPED.name] == 1.0
        # an event, never a page (the spike detector may not have judged it yet)
        assert trainer.decision.action in (Action.NONE, Action.SKIP_STEP)
        now = trainer.engine.module.state_dict()
        assert all(torch.equal(now[k], model[k]) for k in model), "the model changed"
        after = client_state(client)
        assert all(torch.equal(after[k], optim[k]) for k in optim), "the optimizer changed"
        values, _ = trainer.step_once()  # training goes on
        assert values[catalog.STEP_SKIPPED.name] == 0.0
        later = trainer.engine.module.state_dict()
        assert any(not torch.equal(later[k], model[k]) for k in model)
        assert values[catalog.SKIPPED_STEPS.name] >= 1
    finally:
        store.close("finished")
    events = runstore.read_events(store.path)
    skipped = [e for e in events if e["kind"] == "skip_step"]
    assert FAULT_STEP in [e["step"] for e in skipped]
    assert not [e for e in events if e["kind"] in ("rollback", "alert")]


def count_reads(trainer, steps: int) -> list[int]:
    """Host reads of tensor values in each of ``steps`` training steps."""
    per_step = []
    for _ in range(steps):
        counts: Counter = Counter()
        with counting_host_reads(counts):
            trainer.train_step()
        per_step.append(sum(counts.values()))
    return per_step


@pytest.mark.slow
def test_skip_step_adds_no_host_read(tmp_path: Path) -> None:
    reads = {}
    for name, extra in (("off", []), ("on", SKIP)):
        trainer, store = make_trainer(tmp_path / name, *extra, "train.steps=100")
        try:
            reads[name] = count_reads(trainer, 12)  # the gate is ready from step 8 on
        finally:
            store.close("finished")
    # none added; fewer, in fact: torch's AdamW (not capturable) reads each parameter's
    # step count to the host, SkipStepAdamW keeps them on the device
    assert max(reads["on"]) <= min(reads["off"]), reads
    assert len(set(reads["on"])) == 1, reads  # the same every step, the gate ready or not


RANKS_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from yoto.config import load_config
from yoto.trainer import run
from yoto import catalog
cfg = load_config(preset="tiny", overrides=sys.argv[2:])
trainer, store = run.make_trainer(cfg, sys.argv[1], "ranks")
skipped = []
for _ in range(cfg.train.steps):
    values, _ = trainer.step_once()
    skipped.append(values[catalog.STEP_SKIPPED.name])
flat = torch.cat([p.detach().reshape(-1) for p in trainer.engine.module.parameters()])
seen = [None] * dist.get_world_size()
dist.all_gather_object(seen, {"skipped": skipped, "params": flat.double().sum().item(),
                              "first": flat[:64].tolist()})
if dist.get_rank() == 0:
    print("RESULT " + json.dumps(seen))
if store is not None:
    store.close("finished")
"""


@pytest.mark.slow
def test_two_ranks_skip_together_when_the_bad_batch_is_on_rank_1_only(tmp_path: Path) -> None:
    """ZeRO 0 keeps a full replica on each rank: a rank that applied the update the other
    skipped would leave the replicas different."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    sets = [
        *SKIP,
        "optim.skip_step.sigma=3",  # half the batch is bad: a smaller outlier, early on
        "train.device=cpu",
        "data.max_bytes_per_source=2000000",
        "train.batch_warmup.start=null",
        "eval.every=0",
        "checkpoint.every=0",
        "log.progress=false",
        "train.steps=32",
        f'faults=["bad_batch@{FAULT_STEP}:steps=1,rank=1"]',
    ]
    proc = subprocess.run(
        [*torchrun(2), str(script), str(tmp_path / "runs"), *sets],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    rank0, rank1 = json.loads(line.removeprefix("RESULT "))
    assert rank0["skipped"][FAULT_STEP - 1] == 1.0  # rank 1's bad data, skipped by both
    assert rank0["skipped"] == rank1["skipped"]
    assert rank0["params"] == rank1["params"] and rank0["first"] == rank1["first"]


def test_skip_step_is_refused_nowhere_deepspeed_runs() -> None:
    """The DeepSpeed config says the optimizer is yoto's own when skip-step is on."""
    from yoto.config import load_config
    from yoto.trainer.engine import deepspeed_config

    on = load_config(preset="tiny", overrides=[*SKIP, "train.zero_stage=2"])
    assert deepspeed_config(on, 1)["zero_allow_untested_optimizer"] is True
    assert "zero_allow_untested_optimizer" not in deepspeed_config(load_config(preset="tiny"), 1)
