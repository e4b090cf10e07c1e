"""Rollback: back to the newest good checkpoint before the onset, past the bad data.

A checkpoint is *good* once ``healthy_steps`` steps without a spike, non-finite value or
overflow followed it; a rollback uses the newest good one taken at least ``min_distance``
steps before the onset. It restores model, optimizer, sampler and probe state from it,
then moves the sampler past the data window between the checkpoint and the onset plus
``skip_margin`` batches (PaLM: restart ~100 steps before the spike, skip 200-500
batches), optionally cools the LR down, and starts a new ``attempt``: the abandoned
branch's rows stay in the run directory under the old one, its checkpoints are removed.

:class:`RunState` is what survives a rollback (it is the run's, not the checkpoint's):
the rollback history, the attempt counter, which steps were unhealthy, the LR cooldown and
the sampler position before each recent step.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from yoto.events import EventKind, Severity
from yoto.probes.base import Verdict
from yoto.runstore import CheckpointDir, list_checkpoints

from . import distributed
from .checkpoint import verify

if TYPE_CHECKING:
    from .loop import Trainer
    from .policy import Decision

_UNHEALTHY = {EventKind.SPIKE, EventKind.OVERFLOW}
_POSITIONS_KEPT = 100_000


@dataclass
class RunState:
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    max_attempt: int = 0
    unhealthy: list[int] = field(default_factory=list)
    lr_scale: float = 1.0
    lr_scale_until: int = 0  # the cooldown applies to steps <= this
    skipped_batches: int = 0
    batch_size_changes: int = 0
    faults_injected: int = 0
    halted: bool = False
    positions: dict[int, int] = field(default_factory=dict)  # step -> sampler position before

    def record_position(self, step: int, position: int) -> None:
        self.positions[step] = position
        if len(self.positions) > _POSITIONS_KEPT:
            del self.positions[next(iter(self.positions))]

    def observe(self, step: int, verdicts: list[Verdict]) -> None:
        if any(v.kind in _UNHEALTHY and v.severity != Severity.INFO for v in verdicts):
            self.unhealthy.append(step)
            del self.unhealthy[:-10_000]

    def lr_factor(self, step: int) -> float:
        return self.lr_scale if step <= self.lr_scale_until else 1.0

    def is_good(self, ckpt_step: int, now: int, healthy_steps: int) -> bool:
        if now - ckpt_step < healthy_steps:
            return False
        return not any(ckpt_step < s <= ckpt_step + healthy_steps for s in self.unhealthy)

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["positions"] = {}  # rebuilt from the resumed steps on
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key in self.__dict__:
                setattr(self, key, value)
        self.positions = {}


def _remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def find_good_checkpoint(trainer: Trainer, onset: int) -> CheckpointDir | None:
    """The newest complete checkpoint taken ``min_distance`` before ``onset`` and followed
    by ``healthy_steps`` healthy steps, as this rank sees the checkpoint folder."""
    cfg = trainer.cfg.policy.rollback
    if trainer.checkpointer is None:
        return None
    for ckpt in reversed(list_checkpoints(trainer.checkpointer.root)):
        if ckpt.step > onset - cfg.min_distance or ckpt.step > trainer.state.step:
            continue
        if not trainer.run.is_good(ckpt.step, trainer.state.step, cfg.healthy_steps):
            continue
        # our own marker, written this run: sizes suffice here (resume re-hashes)
        if verify(ckpt, check_hashes=False) is None:
            return ckpt
    return None


def good_checkpoint(trainer: Trainer, onset: int) -> CheckpointDir | None:
    """:func:`find_good_checkpoint` decided on rank 0, the answer given to every rank."""
    chosen = find_good_checkpoint(trainer, onset) if trainer.info.is_main else None
    return distributed.broadcast_object(chosen)


def rollback(trainer: Trainer, decision: Decision) -> bool:
    """Roll back on every rank; False when there is no good checkpoint to go to."""
    cfg = trainer.cfg.policy.rollback
    run, sampler = trainer.run, trainer.sampler
    started = time.perf_counter()
    if trainer.checkpointer is not None:
        trainer.checkpointer.wait()  # a save of this branch may still be sealing
        trainer._collect_checkpoints()
    ckpt = good_checkpoint(trainer, decision.onset)
    if ckpt is None:
        return False
    from_step, batch = trainer.state.step, trainer.engine.train_batch_size()
    onset_position = run.positions.get(decision.onset, sampler.position)
    trainer.restore(ckpt)  # model, optimizer, sampler, probes, step/tokens
    resumed_at = sampler.position
    target = max(resumed_at, onset_position + cfg.skip_margin * batch)
    sampler.skip(target - resumed_at)
    skipped = (target - resumed_at) // max(1, batch)
    trainer.faults.rolled_back()
    abandoned = trainer.state.attempt
    run.max_attempt += 1
    trainer.state.attempt = run.max_attempt
    run.skipped_batches += skipped
    run.unhealthy = [s for s in run.unhealthy if s <= ckpt.step]
    if cfg.lr_cooldown_steps:
        run.lr_scale = cfg.lr_cooldown_factor
        run.lr_scale_until = ckpt.step + cfg.lr_cooldown_steps
    factor = trainer.cfg.train.adaptive_batch.after_rollback
    if factor > 1.0:
        trainer.batch.bump(factor, ckpt.step, reason="rollback")
    record = {
        "from_step": from_step,
        "to_step": ckpt.step,
        "onset": decision.onset,
        "reason": decision.reason,
        "attempt": run.max_attempt,
        "from_attempt": abandoned,
    }
    run.rollbacks.append(record)
    if trainer.info.is_main:  # the abandoned branch's checkpoints: out of sight at once
        doomed = []
        for other in list_checkpoints(trainer.checkpointer.root):
            if other.step > ckpt.step:
                hidden = other.path.with_name(f".abandoned-{other.path.name}-a{run.max_attempt}")
                other.path.rename(hidden)
                doomed.append(hidden)
        if doomed:  # and deleted off the training path
            threading.Thread(target=_remove, args=(doomed,), daemon=True).start()
    distributed.barrier()
    record["seconds"] = time.perf_counter() - started  # decision to ready-to-train
    trainer.event(
        EventKind.ROLLBACK,
        Severity.WARNING,
        f"rolled back from step {from_step} to checkpoint {ckpt.tag} ({decision.reason} "
        f"from step {decision.onset}); skipped {skipped} batches "
        f"({target - resumed_at} sequences); attempt {run.max_attempt}",
        step=from_step,
        **record,
        checkpoint=ckpt.tag,
        skipped_batches=skipped,
        skipped_sequences=target - resumed_at,
        sampler_position_checkpoint=resumed_at,
        sampler_position_resume=target,
        onset_position=onset_position,
        lr_cooldown=[run.lr_scale, run.lr_scale_until] if cfg.lr_cooldown_steps else None,
        trigger=decision.message,
    )
    return True
