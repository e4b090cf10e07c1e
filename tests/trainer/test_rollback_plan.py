"""A rollback is planned from (history, checkpoints, decision) alone, without a Trainer:
which checkpoint, how far the data skips, the new attempt, what the history records."""

from pathlib import Path

from yoto.config import load_config
from yoto.events import Reason
from yoto.runstore import CheckpointDir
from yoto.trainer.history import Branch, History, StepTrace
from yoto.trainer.rollback import good_checkpoint, plan_rollback

CKPTS = [CheckpointDir(s, Path(f"/nowhere/step-{s}")) for s in (20, 40, 60, 80)]
CFG = load_config(
    preset="tiny",
    overrides=["policy.rollback.lr_cooldown_steps=30", "policy.rollback.lr_cooldown_factor=0.5"],
)


def plan(history: History, onset: int, **kw):
    return plan_rollback(
        history=history,
        branch=Branch(step=85, attempt=history.max_attempt),
        checkpoints=CKPTS,
        onset=onset,
        reason=Reason.PERSISTENT_SPIKE,
        trigger="loss spike persists",
        batch=16,
        position=85 * 16,
        cfg=CFG,
        intact=kw.get("intact", lambda c: True),
    )


def drawn_at(position: int) -> StepTrace:
    """A recorded step whose batch began at sampler ``position``."""
    return StepTrace(position, 16, 128, 1e-3, 2.0, 1.0, (2.0,))


def test_the_newest_good_checkpoint_min_distance_before_the_onset() -> None:
    history = History(traces={81: drawn_at(80 * 16)})
    p = plan(history, onset=81)
    # 80 is too close to the onset (min_distance 20) and not followed by 20 steps; 60 is good
    assert p.checkpoint.step == 60 and p.abandoned == (CKPTS[3],)
    assert (p.from_step, p.from_attempt, p.attempt) == (85, 0, 1)
    assert p.onset_position == 80 * 16 and p.skip_to == 80 * 16 + 50 * 16
    assert p.lr_cooldown == (0.5, 90)
    done = p.record(checkpoint_position=60 * 16, seconds=0.1)
    assert (done.to_step, done.skipped_sequences, done.skipped_batches) == (60, 70 * 16, 70)
    assert done.sampler_position_resume == 130 * 16 and done.checkpoint == "step-60"


def test_a_checkpoint_exactly_min_distance_before_the_onset_is_good() -> None:
    """A weight blow-up at step 220 (min_distance = healthy_steps = 20) goes back to step-200,
    not step-100: the onset's own unhealthy steps do not count against the checkpoint."""
    ckpts = [CheckpointDir(s, Path(f"/nowhere/step-{s}")) for s in (100, 200)]
    rb = CFG.policy.rollback
    assert rb.min_distance == rb.healthy_steps == 20

    def chosen(unhealthy: list[int], onset: int = 220) -> int | None:
        history = History(unhealthy=unhealthy)
        ckpt = good_checkpoint(ckpts, history, onset=onset, now=225, cfg=CFG, intact=lambda c: True)
        return ckpt.step if ckpt is not None else None

    assert chosen([220, 221, 222]) == 200  # exactly min_distance before the onset
    assert chosen([219, 220]) == 100  # an unhealthy step before the onset: not good
    assert chosen([220], onset=219) == 100  # 200 is one step too close
    assert chosen([], onset=120) == 100 and chosen([], onset=119) is None


def test_unhealthy_and_damaged_checkpoints_are_passed_over() -> None:
    history = History(unhealthy=[50])  # step-40 was not followed by 20 healthy steps
    p = plan(history, onset=81, intact=lambda c: c.step != 60)  # step-60's files are bad
    assert p.checkpoint.step == 20
    assert plan(History(), onset=39) is None  # nothing 20 steps before step 39 but 0..19


def test_the_history_keeps_what_the_rollback_did() -> None:
    history = History(unhealthy=[50, 83], max_attempt=2, traces={81: drawn_at(1296)})
    p = plan(history, onset=81)
    assert p.attempt == 3  # above every attempt given out
    history.record_rollback(p.record(checkpoint_position=960, seconds=0.2))
    assert history.skipped_batches == p.record(960, 0.2).skipped_batches
    assert history.unhealthy == [50]  # the abandoned branch's steps are forgotten
    assert (history.lr_scale, history.lr_scale_until) == (0.5, 90)
    assert history.lr_factor(90) == 0.5 and history.lr_factor(91) == 1.0
    restored = History()
    restored.load_state_dict(history.state_dict())
    assert restored.rollbacks == history.rollbacks  # typed records survive a checkpoint
