"""The policy: a step's verdicts -> one action, the most severe wins.

Each verdict carries its class, set by the detector that made it (:class:`Reason`:
``nonfinite``, ``persistent_spike``, ``spike``, ``loss_scale_min``, ``overflow``,
``spectra``, ``probe_failure``, ``straggler``; none for a verdict that is only news), and
the ``policy:`` config maps each class to an action. Defaults: a non-finite loss or grad
norm, or a spike that persists -> rollback; an isolated spike -> skip_step (its update was
left out by skip-step, ``optim.skip_step``: an event, no page; without skip-step, or when
the step was not skipped, an alert); the fp16 loss scale at its minimum -> rollback, and
halt with advice to use bf16 if it happens again; a straggler rank (probes/system.py) ->
none: its ``straggler`` event, a warning, is the page (chat, and Prometheus's
``YotoStragglerRank``), and a slow rank is no unstable training, so it opens no
instability episode and nothing is rolled back. A rollback asked for when
``max_rollbacks`` were already spent within ``window_steps`` becomes a halt.

What pages is not decided per step but per instability episode (trainer/episodes.py,
``policy.episode``): the steps acted on are grouped, and an episode writes one ``alert``
event (the chat page) once it is confirmed (alerting verdicts on ``page_after`` steps, a
critical one, an LR cooldown or batch change); its later verdicts are info ``episode``
events. A rollback or halt pages by its own event, which carries the episode; a
``skip_step`` never pages, and a one-step outlier that is quiet afterwards closes unpaged.

The verdicts come from globally reduced values (the loss is averaged over ranks, the grad
norm is global), so every rank computes the same ones; rank 0's decision is still
broadcast (``agree``) so a rank-local verdict can never split the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import torch

from yoto.config import PolicyConfig
from yoto.events import VERDICT_REASONS, Reason, Rollback
from yoto.probes.base import Verdict

from . import distributed


class Action(IntEnum):  # ordered by severity: the largest wins
    NONE = 0
    SKIP_STEP = 1  # the outlier's update was not applied (skip-step): an event, no page
    ALERT = 2  # pages once per episode, when it is confirmed (trainer/episodes.py)
    LR_COOLDOWN = 3
    BATCH_SIZE = 4
    ROLLBACK = 5
    HALT = 6


@dataclass
class Decision:
    action: Action
    reason: Reason | None = None  # the class of the deciding verdict, or why it changed
    onset: int = 0
    message: str = ""
    advice: str = ""
    verdicts: list[Verdict] = field(default_factory=list)  # those the policy acted on


class Policy:
    def __init__(self, cfg: PolicyConfig) -> None:
        self.cfg = cfg
        missing = [r for r in VERDICT_REASONS if not hasattr(cfg, r)]
        assert not missing, f"policy config has no action for {missing}"

    def action_for(self, reason: Reason) -> Action:
        return Action[str(getattr(self.cfg, reason)).upper()]

    def decide(
        self,
        step: int,
        verdicts: list[Verdict],
        rollbacks: Sequence[Rollback],
        update_skipped: bool = False,
    ) -> Decision:
        """The step's decision from its verdicts, the run's rollbacks so far, and whether
        skip-step already left this step's update out (``skip_step`` is then the action;
        otherwise a ``skip_step`` mapping alerts, as without skip-step)."""
        if not self.cfg.enabled:
            return Decision(Action.NONE)
        best = Decision(Action.NONE)
        judged = [v for v in verdicts if v.reason is not None]
        for v in judged:
            action = self.action_for(v.reason)
            if action == Action.SKIP_STEP and not update_skipped:
                action = Action.ALERT
            if action > best.action or (action == best.action and v.onset < best.onset):
                best = Decision(action, v.reason, v.onset, v.message)
        best.verdicts = judged
        if best.action == Action.ROLLBACK:
            if best.reason == Reason.LOSS_SCALE_MIN and any(
                r.reason == Reason.LOSS_SCALE_MIN for r in rollbacks
            ):
                return Decision(
                    Action.HALT,
                    Reason.LOSS_SCALE_MIN,
                    best.onset,
                    best.message,
                    "the fp16 loss scale hit its minimum again after a rollback: "
                    "train in bf16 (train.precision=bf16)",
                    best.verdicts,
                )
            window = [r for r in rollbacks if step - r.from_step < self.cfg.rollback.window_steps]
            if len(window) >= self.cfg.rollback.max_rollbacks:
                return Decision(
                    Action.HALT,
                    Reason.ROLLBACK_BUDGET,
                    best.onset,
                    best.message,
                    f"{len(window)} rollbacks within "
                    f"{self.cfg.rollback.window_steps} steps; the instability "
                    f"keeps coming back: look at the data and the LR",
                    best.verdicts,
                )
        return best


def agree(decision: Decision, world: int, device: torch.device) -> Decision:
    """Every rank takes rank 0's decision (one small broadcast; only with several ranks)."""
    if world <= 1:
        return decision
    box = torch.tensor([int(decision.action), decision.onset], dtype=torch.int64, device=device)
    distributed.broadcast_(box, src=0)
    action, onset = (int(x) for x in box.tolist())
    if action == int(decision.action) and onset == decision.onset:
        return decision
    return Decision(Action(action), Reason.RANK0, onset, "decided on rank 0")
