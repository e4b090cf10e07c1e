"""The policy: verdicts -> the most severe action, budgets and the fp16 minimum-scale path."""

import torch

from yoto import catalog
from yoto.config import PolicyConfig, SpikesConfig
from yoto.events import EventKind, Reason, Rollback, Severity
from yoto.probes.base import Verdict
from yoto.probes.precision import OverflowDetector
from yoto.probes.spikes import SpikeDetector
from yoto.trainer.policy import Action, Policy


def spike(step: int, onset: int, reason: Reason = Reason.SPIKE, **data) -> Verdict:
    return Verdict(EventKind.SPIKE, Severity.WARNING, step, onset, "spike", data, reason)


def rolled_back(from_step: int, reason: Reason) -> Rollback:
    return Rollback(from_step, from_step - 20, from_step, reason, from_attempt=0, attempt=1)


def test_defaults_map_verdicts_to_actions() -> None:
    policy = Policy(PolicyConfig())
    assert policy.decide(10, [], []).action == Action.NONE
    assert policy.decide(10, [spike(10, 10, rule="sigma")], []).action == Action.ALERT
    persistent = spike(14, 10, Reason.PERSISTENT_SPIKE, rule="persistent", persistent=True)
    d = policy.decide(14, [spike(14, 14, rule="ewm"), persistent], [])
    assert (d.action, d.reason, d.onset) == (Action.ROLLBACK, "persistent_spike", 10)
    nonfinite = spike(7, 7, Reason.NONFINITE, rule="nonfinite")
    assert policy.decide(7, [nonfinite], []).action == Action.ROLLBACK
    probe = Verdict(EventKind.PROBE, Severity.INFO, 3, 3, "note", {"reason": "one_batch"})
    assert policy.decide(3, [probe], []).action == Action.NONE


def test_the_detectors_name_the_reason_the_policy_acts_on() -> None:
    """The spike detector itself classifies: NaN -> nonfinite; a run of spikes ->
    spike, then persistent_spike (no dict key is read by the policy)."""
    detector = SpikeDetector(SpikesConfig())
    reasons = []
    for step in range(1, 200):
        loss = 2.0 + 0.01 * (step % 3) if step < 150 else 50.0
        values = {catalog.TRAIN_LOSS.name: loss, catalog.GRAD_NORM.name: 1.0}
        verdicts = list(detector.observe(step, values))
        reasons += [v.reason for v in verdicts if v.kind == EventKind.SPIKE]
    assert Reason.SPIKE in reasons and Reason.PERSISTENT_SPIKE in reasons
    nan_values = {catalog.TRAIN_LOSS.name: float("nan"), catalog.GRAD_NORM.name: 1.0}
    nan = list(detector.observe(200, nan_values))
    assert [v.reason for v in nan] == [Reason.NONFINITE]
    assert Policy(PolicyConfig()).decide(200, nan, []).reason == Reason.NONFINITE


def test_config_changes_the_mapping() -> None:
    policy = Policy(PolicyConfig(spike="lr_cooldown", persistent_spike="halt"))
    assert policy.decide(5, [spike(5, 5, rule="sigma")], []).action == Action.LR_COOLDOWN
    d = policy.decide(9, [spike(9, 5, Reason.PERSISTENT_SPIKE, persistent=True)], [])
    assert d.action == Action.HALT
    assert Policy(PolicyConfig(enabled=False)).decide(9, [spike(9, 9)], []).action == Action.NONE


def test_rollback_budget_turns_into_halt() -> None:
    policy = Policy(
        PolicyConfig.model_validate({"rollback": {"max_rollbacks": 2, "window_steps": 100}})
    )
    nan = spike(250, 250, Reason.NONFINITE, rule="nonfinite")
    old = [rolled_back(100, Reason.NONFINITE), rolled_back(200, Reason.NONFINITE)]
    assert policy.decide(250, [nan], old[1:]).action == Action.ROLLBACK  # one in the window
    halt = policy.decide(250, [nan], [rolled_back(170, Reason.SPIKE), *old[1:]])
    assert halt.action == Action.HALT and halt.reason == "rollback_budget"


def test_fp16_scale_at_minimum_rolls_back_then_halts_with_advice() -> None:
    """The verdict comes from DeepSpeed's own DynamicLossScaler fed real fp16 overflows."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.utils import CheckOverflow

    from yoto.trainer.distributed import setup

    setup(torch.device("cpu"))
    scaler = DynamicLossScaler(
        init_scale=2.0**15,
        scale_window=1000,
        min_scale=2.0**14,
        delayed_shift=1,
        consecutive_hysteresis=False,
        raise_error_at_min_scale=False,
    )
    model = torch.nn.Linear(8, 8).half()
    detector, policy = OverflowDetector(), Policy(PolicyConfig())
    rollbacks: list[Rollback] = []
    decisions = []
    total = 0
    for step in range(1, 5):
        model.zero_grad()
        x = torch.randn(2, 8).half() * 300.0
        (model(x).float().pow(2).mean() * scaler.cur_scale).backward()
        overflow = CheckOverflow().has_overflow_serial(list(model.parameters()))
        scaler.update_scale(overflow)
        total += overflow
        values = {
            catalog.OVERFLOW_STEPS.name: float(total),
            catalog.CONSECUTIVE_OVERFLOWS.name: float(step),
            catalog.LOSS_SCALE.name: scaler.cur_scale,
            catalog.LOSS_SCALE_HEADROOM.name: float(
                torch.log2(torch.tensor(scaler.cur_scale / scaler.min_scale))
            ),
        }
        decision = policy.decide(step, list(detector.observe(step, values)), rollbacks)
        decisions.append(decision)
        if decision.action == Action.HALT:
            break
        if decision.action == Action.ROLLBACK:
            rollbacks.append(rolled_back(step, decision.reason))
            detector.at_minimum = False  # a rollback restores a state before the minimum
    actions = [d.action for d in decisions]
    assert actions == [Action.ROLLBACK, Action.HALT]
    assert decisions[-1].reason == "loss_scale_min" and "bf16" in decisions[-1].advice
