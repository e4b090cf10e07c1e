"""Rollback: back to the newest good checkpoint before the onset, past the bad data.

A checkpoint is *good* once ``healthy_steps`` steps followed it with no spike, non-finite
value or overflow before the onset (the anomaly's own steps do not count against it); a
rollback uses the newest good one taken at least ``min_distance`` steps before the onset.
It restores model, optimizer, sampler and probe state from it, then moves the sampler
past the data window between the checkpoint and the onset plus ``skip_margin`` batches
(PaLM: restart ~100 steps before the spike, skip 200-500 batches), optionally cools the
LR down, and starts a new ``attempt``: the abandoned branch's rows stay in the run
directory under the old one, its checkpoints are removed.

This module decides, and knows no Trainer: :func:`plan_rollback` turns (history,
checkpoints, decision) into a :class:`RollbackPlan`, which ``Trainer.roll_back`` carries
out on every rank (rank 0 also calls :func:`hide_abandoned`); the plan's
:meth:`~RollbackPlan.record` is the :class:`~yoto.events.Rollback` the history keeps.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from yoto.config import Config
from yoto.events import Reason, Rollback
from yoto.runstore import CheckpointDir

from .checkpoint import verify
from .history import Branch, History


def _intact(ckpt: CheckpointDir) -> bool:
    # our own marker, written this run: sizes suffice here (resume re-hashes)
    return verify(ckpt, check_hashes=False) is None


def good_checkpoint(
    checkpoints: Sequence[CheckpointDir],
    history: History,
    *,
    onset: int,
    now: int,
    cfg: Config,
    intact: Callable[[CheckpointDir], bool] = _intact,
) -> CheckpointDir | None:
    """The newest intact checkpoint (of ``checkpoints``, oldest first) taken at least
    ``min_distance`` steps before ``onset`` (step ``onset - min_distance`` qualifies) and
    followed by ``healthy_steps`` steps that were healthy up to the onset, at step ``now``
    of the current branch."""
    rb = cfg.policy.rollback
    for ckpt in reversed(checkpoints):
        if ckpt.step > onset - rb.min_distance or ckpt.step > now:
            continue
        if history.is_good(ckpt.step, now, rb.healthy_steps, onset) and intact(ckpt):
            return ckpt
    return None


@dataclass(frozen=True)
class RollbackPlan:
    """Where a rollback goes and what it changes; the same on every rank."""

    checkpoint: CheckpointDir  # restore this
    from_step: int  # the abandoned branch's step
    from_attempt: int
    attempt: int  # the new branch's attempt number
    onset: int
    reason: Reason
    trigger: str  # the deciding verdict's message
    onset_position: int  # the sampler's position before the onset step
    skip_to: int  # the new branch's data starts at this position or later
    batch: int  # sequences per step, for counting skipped batches
    lr_cooldown: tuple[float, int] | None  # (factor, up to step) from the checkpoint on
    batch_factor: float  # the global batch is raised by this after the rollback (1: kept)
    abandoned: tuple[CheckpointDir, ...]  # the abandoned branch's checkpoints

    def record(self, checkpoint_position: int, seconds: float) -> Rollback:
        """What the rollback did, once the checkpoint's sampler position is known."""
        resume = max(checkpoint_position, self.skip_to)
        return Rollback(
            from_step=self.from_step,
            to_step=self.checkpoint.step,
            onset=self.onset,
            reason=self.reason,
            from_attempt=self.from_attempt,
            attempt=self.attempt,
            checkpoint=self.checkpoint.tag,
            skipped_batches=(resume - checkpoint_position) // max(1, self.batch),
            skipped_sequences=resume - checkpoint_position,
            sampler_position_checkpoint=checkpoint_position,
            sampler_position_resume=resume,
            onset_position=self.onset_position,
            lr_cooldown=self.lr_cooldown,
            trigger=self.trigger,
            seconds=seconds,
        )


def plan_rollback(
    *,
    history: History,
    branch: Branch,
    checkpoints: Sequence[CheckpointDir],
    onset: int,
    reason: Reason,
    trigger: str,
    batch: int,
    position: int,
    cfg: Config,
    intact: Callable[[CheckpointDir], bool] = _intact,
) -> RollbackPlan | None:
    """The rollback for an anomaly from step ``onset``, at the current ``branch`` with the
    sampler at ``position`` and ``batch`` sequences per step; None when no good
    checkpoint precedes the onset."""
    ckpt = good_checkpoint(
        checkpoints, history, onset=onset, now=branch.step, cfg=cfg, intact=intact
    )
    if ckpt is None:
        return None
    rb = cfg.policy.rollback
    onset_trace = history.traces.get(onset)
    onset_position = onset_trace.position if onset_trace is not None else position
    return RollbackPlan(
        checkpoint=ckpt,
        from_step=branch.step,
        from_attempt=branch.attempt,
        attempt=history.max_attempt + 1,
        onset=onset,
        reason=reason,
        trigger=trigger,
        onset_position=onset_position,
        skip_to=onset_position + rb.skip_margin * batch,
        batch=batch,
        lr_cooldown=(
            (rb.lr_cooldown_factor, ckpt.step + rb.lr_cooldown_steps)
            if rb.lr_cooldown_steps
            else None
        ),
        batch_factor=cfg.train.adaptive_batch.after_rollback,
        abandoned=tuple(c for c in checkpoints if c.step > ckpt.step),
    )


def _remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def hide_abandoned(rollback_plan: RollbackPlan) -> None:
    """The abandoned branch's checkpoints: out of sight at once (renamed, so no resume or
    later rollback can pick them), deleted off the training path. Rank 0 only."""
    doomed = []
    for other in rollback_plan.abandoned:
        hidden = other.path.with_name(f".abandoned-{other.path.name}-a{rollback_plan.attempt}")
        other.path.rename(hidden)
        doomed.append(hidden)
    if doomed:
        threading.Thread(target=_remove, args=(doomed,), daemon=True).start()
