"""The two kinds of state a run has: its current branch, and its history.

A rollback goes back to a checkpoint and trains on from there: a new *branch* of the run,
numbered by its ``attempt``. What belongs to the branch is rolled back with it; what belongs
to the run's history is never rolled back (a rollback that forgot the rollbacks before it
could loop forever).

- :class:`Branch`: where the current line of training stands (steps, tokens, attempt). A
  checkpoint saves it; a rollback or a resume restores it.
- :class:`History`: the run's own record, which survives rollbacks: every
  :class:`~yoto.events.Rollback`, the attempt counter, which steps were unhealthy, the LR
  cooldown, the intervention counters, each recent step's trace (what it trained on and measured).
  Checkpoints carry a copy so that a *resume* gets it back; a rollback keeps its own.

The model, optimizer, sampler and probe windows are branch state too (the checkpoint holds
them); the batch controller, the fault injector and the episode tracker
(trainer/episodes.py) are history (see ``Trainer.restore``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from yoto.events import EventKind, Rollback, Severity
from yoto.probes.base import Verdict

_UNHEALTHY = {EventKind.SPIKE, EventKind.OVERFLOW}
_UNHEALTHY_KEPT = 10_000
_TRACES_KEPT = 4096  # steps back a replay diagnosis can reach (and forensics look)


@dataclass(frozen=True, slots=True)
class StepTrace:
    """One step of the current branch as it was trained and measured: enough to replay it
    exactly and to compare the replay (trainer/diagnose.py)."""

    position: int  # the sampler's position before the step
    batch: int  # sequences
    seq_len: int
    lr: float
    loss: float  # the global mean, as recorded
    grad_norm: float | None
    rank_losses: tuple[float, ...]  # every rank's own mean loss (rank order)


@dataclass
class Branch:
    """The current branch: restored from a checkpoint by a rollback or a resume."""

    step: int = 0  # optimizer steps done on this branch (the run's step count)
    tokens: int = 0  # training tokens consumed on it
    attempt: int = 0  # which branch: 0, then a new number at each rollback or replaying resume
    source_tokens: dict[str, int] = field(default_factory=dict)  # per data source


@dataclass
class History:
    """The run's history: kept across rollbacks, saved with checkpoints for resume."""

    rollbacks: list[Rollback] = field(default_factory=list)
    max_attempt: int = 0  # the highest attempt number given out so far
    unhealthy: list[int] = field(default_factory=list)  # steps with a spike or overflow
    lr_scale: float = 1.0
    lr_scale_until: int = 0  # the cooldown applies to steps <= this
    skipped_batches: int = 0
    batch_size_changes: int = 0
    faults_injected: int = 0
    skipped_steps: int = 0  # updates skip-step did not apply (the data was still used)
    halted: bool = False
    seq_ramp_origin: int = 0  # training tokens at which the length ramp began (a rewarm moves it)
    # the current branch's recent steps (a step trained again replaces the abandoned one's)
    traces: dict[int, StepTrace] = field(default_factory=dict)

    # --- attempts -------------------------------------------------------------------------

    def new_attempt(self, after: int = -1) -> int:
        """The number of a new branch: above every attempt given out so far and above
        ``after`` (the newest attempt the run directory has rows of)."""
        self.max_attempt = max(self.max_attempt, after) + 1
        return self.max_attempt

    def saw_attempt(self, attempt: int) -> None:
        """A restored branch carries its attempt number: never give it out again."""
        self.max_attempt = max(self.max_attempt, attempt)

    def attempt_of(self, step: int, branch: Branch) -> int:
        """The attempt that trained ``step``, for a late record (a spectra analysis handed
        in steps after it was asked for, perhaps after a rollback): the current branch
        trained the steps since the last rollback's checkpoint; a step past where it is now
        belongs to the branch that rollback abandoned; earlier steps, to earlier attempts."""
        hi, attempt = branch.step, branch.attempt
        for rb in reversed(self.rollbacks):
            if step > rb.to_step:
                return attempt if step <= hi else rb.from_attempt
            hi, attempt = rb.to_step, rb.from_attempt
        return attempt

    # --- rollbacks ------------------------------------------------------------------------

    def record_rollback(self, rollback: Rollback) -> None:
        self.rollbacks.append(rollback)
        self.skipped_batches += rollback.skipped_batches
        # the abandoned branch's unhealthy steps say nothing of the checkpoints before it
        self.unhealthy = [s for s in self.unhealthy if s <= rollback.to_step]
        if rollback.lr_cooldown is not None:
            self.cool_lr(*rollback.lr_cooldown)

    # --- health ---------------------------------------------------------------------------

    def observe(self, step: int, verdicts: list[Verdict]) -> None:
        if any(v.kind in _UNHEALTHY and v.severity != Severity.INFO for v in verdicts):
            self.unhealthy.append(step)
            del self.unhealthy[:-_UNHEALTHY_KEPT]

    def is_good(self, ckpt_step: int, now: int, healthy_steps: int, onset: int) -> bool:
        """A checkpoint is good, for an anomaly beginning at ``onset``, once ``healthy_steps``
        steps followed it and none of them before the onset was unhealthy: the anomaly's
        own steps say nothing of the checkpoint (else one taken exactly ``min_distance``
        steps before the onset, with ``min_distance <= healthy_steps``, never would be)."""
        if now - ckpt_step < healthy_steps:
            return False
        last = min(ckpt_step + healthy_steps, onset - 1)
        return not any(ckpt_step < s <= last for s in self.unhealthy)

    def record_trace(self, step: int, trace: StepTrace) -> None:
        self.traces.pop(step, None)  # keep insertion order = training order
        self.traces[step] = trace
        while len(self.traces) > _TRACES_KEPT:
            del self.traces[next(iter(self.traces))]

    # --- learning rate --------------------------------------------------------------------

    def cool_lr(self, factor: float, until: int) -> None:
        self.lr_scale, self.lr_scale_until = factor, until

    def lr_factor(self, step: int) -> float:
        return self.lr_scale if step <= self.lr_scale_until else 1.0

    # --- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["rollbacks"] = [r.to_data() for r in self.rollbacks]
        state["traces"] = {}  # rebuilt from the resumed steps on
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key in self.__dict__:
                setattr(self, key, value)
        self.rollbacks = [Rollback.from_data(r) for r in state.get("rollbacks", [])]
        self.traces = {}
