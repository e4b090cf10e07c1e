"""The policy: a step's verdicts -> one action, the most severe wins.

Each verdict is classified (``nonfinite``, ``persistent_spike``, ``spike``,
``loss_scale_min``, ``overflow``, ``spectra``, ``probe_failure``) and mapped to an action
by the ``policy:`` config. Defaults: a non-finite loss or grad norm, or a spike that
persists -> rollback; an isolated spike -> alert; the fp16 loss scale at its minimum ->
rollback, and halt with advice to use bf16 if it happens again. A rollback asked for
when ``max_rollbacks`` were already spent within ``window_steps`` becomes a halt.

The verdicts come from globally reduced values (the loss is averaged over ranks, the grad
norm is global), so every rank computes the same ones; rank 0's decision is still
broadcast (``agree``) so a rank-local verdict can never split the job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import torch

from yoto.config import PolicyConfig
from yoto.events import EventKind, Severity
from yoto.probes.base import Verdict

from . import distributed


class Action(IntEnum):  # ordered by severity: the largest wins
    NONE = 0
    ALERT = 1
    LR_COOLDOWN = 2
    BATCH_SIZE = 3
    ROLLBACK = 4
    HALT = 5


@dataclass
class Decision:
    action: Action
    reason: str = ""  # the class of the deciding verdict, or why the action changed
    onset: int = 0
    message: str = ""
    advice: str = ""
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def acts(self) -> bool:
        return self.action > Action.ALERT


def classify(v: Verdict) -> str | None:
    data = v.data
    if v.kind == EventKind.SPIKE:
        if data.get("rule") == "nonfinite":
            return "nonfinite"
        return "persistent_spike" if data.get("persistent") else "spike"
    if v.kind == EventKind.OVERFLOW:
        return "loss_scale_min" if data.get("at_minimum") else "overflow"
    if v.kind == EventKind.SPECTRA:
        return "spectra" if v.severity != Severity.INFO or not data.get("in_band") else None
    if v.kind == EventKind.PROBE and "error" in data:
        return "probe_failure"
    return None


class Policy:
    def __init__(self, cfg: PolicyConfig) -> None:
        self.cfg = cfg

    def decide(
        self, step: int, verdicts: list[Verdict], recent_rollbacks: list[dict[str, Any]]
    ) -> Decision:
        if not self.cfg.enabled:
            return Decision(Action.NONE)
        best = Decision(Action.NONE)
        for v in verdicts:
            kind = classify(v)
            if kind is None:
                continue
            action = Action[str(getattr(self.cfg, kind)).upper()]
            if action > best.action or (action == best.action and v.onset < best.onset):
                best = Decision(action, kind, v.onset, v.message)
        best.verdicts = [v for v in verdicts if classify(v) is not None]
        if best.action == Action.ROLLBACK:
            if best.reason == "loss_scale_min" and any(
                r.get("reason") == "loss_scale_min" for r in recent_rollbacks
            ):
                return Decision(
                    Action.HALT,
                    "loss_scale_min",
                    best.onset,
                    best.message,
                    "the fp16 loss scale hit its minimum again after a rollback: "
                    "train in bf16 (train.precision=bf16)",
                    best.verdicts,
                )
            window = [
                r
                for r in recent_rollbacks
                if step - r["from_step"] < self.cfg.rollback.window_steps
            ]
            if len(window) >= self.cfg.rollback.max_rollbacks:
                return Decision(
                    Action.HALT,
                    "rollback_budget",
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
    return Decision(Action(action), "rank 0", onset, "decided on rank 0")
