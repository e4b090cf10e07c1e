"""Skip-step: what it costs when nothing is skipped, and what each remedy costs to recover
from the same one-step fault.

1. Step time, skip-step on vs off, on a clean stretch: two trainers of the same shape,
   interleaved round by round (this machine is shared and noisy); the ratio of their
   median step times. Target <= 1.01 on CPU.
2. Recovery from one injected ``bad_batch`` (one step of corrupt data) at the same step of
   the same run, by each remedy: skip-step (the update of that step is left out) and a
   rollback (the policy mapping an isolated spike to ``rollback``: reload the newest good
   checkpoint, retrain from it, skip the data window). Steps lost: updates that did not
   make it into the model (skip-step: the one left out; rollback: the steps from the
   checkpoint to where the rollback was decided, retrained, plus that one); seconds lost:
   those steps at the run's median step time, plus the rollback's own time.

    .venv/bin/python benchmarks/skip_step.py [--shape tiny] [--rounds 7] [--steps 15]

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from _common import SHAPES, make_trainer

from yoto import catalog
from yoto.trainer.policy import Action

SKIP = ["optim.skip_step.enabled=true"]
FAULT_STEP = 150  # the skip window (128 steps) is full by then
RECOVERY = [
    "checkpoint.every=50",
    "checkpoint.keep_last=3",
    "probes.spectra.enabled=false",
    "probes.layers.every=1000",
    f"faults=[bad_batch@{FAULT_STEP}:steps=1]",
]


def step_time_ratio(shape: list[str], rounds: int, steps: int) -> dict[str, float]:
    trainers = {name: make_trainer("tiny", [*shape, *extra]) for name, extra in
                (("off", []), ("on", SKIP))}  # fmt: skip
    for trainer in trainers.values():
        trainer._start_batch_schedule()
        for _ in range(5):  # warm-up, not measured
            trainer.step_once()
    times: dict[str, list[float]] = {name: [] for name in trainers}
    skipped = 0
    for r in range(rounds):
        for name in list(trainers) if r % 2 == 0 else list(reversed(trainers)):
            trainer = trainers[name]
            start = time.perf_counter()
            for _ in range(steps):
                values, _ = trainer.step_once()
                skipped += values.get(catalog.STEP_SKIPPED.name, 0.0) == 1.0
            times[name].append((time.perf_counter() - start) / steps)
    med = {name: statistics.median(v) for name, v in times.items()}
    return {
        "step_seconds_off": med["off"],
        "step_seconds_on": med["on"],
        "ratio_on_vs_off": med["on"] / med["off"],
        "skipped_while_timed": skipped,
    }


def recovery(shape: list[str], remedy: str) -> dict[str, float]:
    extra = SKIP if remedy == "skip_step" else ["policy.spike=rollback"]
    trainer = make_trainer("tiny", [*shape, *RECOVERY, *extra, f"train.steps={FAULT_STEP + 60}"])
    trainer._start_batch_schedule()
    step_times, lost_steps, rollback_seconds = [], 0, 0.0
    while trainer.branch.step < FAULT_STEP + 40:
        start = time.perf_counter()
        values, _ = trainer.step_once()
        elapsed = time.perf_counter() - start
        if trainer.decision.action == Action.ROLLBACK:
            done = trainer.history.rollbacks[-1]
            rollback_seconds += done.seconds
            lost_steps += done.from_step - done.to_step
        else:
            step_times.append(elapsed)
        lost_steps += values.get(catalog.STEP_SKIPPED.name, 0.0) == 1.0
        if trainer.branch.step % trainer.cfg.checkpoint.every == 0:
            trainer.save_checkpoint()
            trainer.finish_checkpoints()
    step = statistics.median(step_times)
    return {
        "steps_lost": lost_steps,
        "seconds_lost": lost_steps * step + rollback_seconds,
        "rollback_seconds": rollback_seconds,
        "step_seconds": step,
        "rollbacks": len(trainer.history.rollbacks),
        "skipped_steps": trainer.history.skipped_steps,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=15, help="steps per trainer per round")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    cost = step_time_ratio(shape, args.rounds, args.steps)
    remedies = {name: recovery(shape, name) for name in ("skip_step", "rollback")}
    print(
        f"{args.shape}: step time with skip-step {cost['step_seconds_on'] * 1e3:.1f} ms vs "
        f"{cost['step_seconds_off'] * 1e3:.1f} ms without: ratio {cost['ratio_on_vs_off']:.3f}"
        f" ({cost['skipped_while_timed']} skipped while timed)"
    )
    print(f"recovery from bad_batch@{FAULT_STEP} (one step):")
    for name, r in remedies.items():
        print(
            f"  {name:9s} steps lost {r['steps_lost']:4.0f}   seconds lost "
            f"{r['seconds_lost']:6.2f}   (rollbacks {r['rollbacks']}, skipped updates "
            f"{r['skipped_steps']}, rollback itself {r['rollback_seconds']:.2f} s)"
        )
    print(json.dumps({"shape": args.shape, "step_time": cost, "recovery": remedies}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
