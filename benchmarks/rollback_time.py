"""Rollback time (decision to first resumed step) vs a plain checkpoint load, same run.

For each shape, a run trains to a few checkpoints, is hit by a NaN gradient, and the
policy rolls it back; the rollback's wall time is measured by the rollback itself, from
the decision until the first resumed step can start (choose and verify the checkpoint,
load it, restore sampler and probes, skip the data, drop the abandoned branch's
checkpoints), and reported in the rollback event. The first resumed step is timed too.
In the same process the same checkpoint is then loaded plainly
(``Checkpointer.load``, which is DeepSpeed's ``load_checkpoint`` plus yoto's RNG file)
several times. Reports the ratio; the target is <= 1.5x.

    .venv/bin/python benchmarks/rollback_time.py [--shapes tiny,wide] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from _common import SHAPES, make_trainer

from yoto.runstore import list_checkpoints
from yoto.trainer.policy import Action

RUN = [
    "checkpoint.every=20",
    "checkpoint.keep_last=3",
    "probes.spectra.enabled=false",
    "probes.layers.every=1000",
]


def measure(shape: list[str], repeats: int, rollbacks: int) -> dict[str, float]:
    """``rollbacks`` NaN faults, 60 steps apart; after each rollback the same checkpoint
    is loaded plainly ``repeats`` times, interleaved, so both see the same machine."""
    faults = ",".join(f"nan_grad@{75 + 60 * i}" for i in range(rollbacks))
    trainer = make_trainer(
        "tiny", [*shape, *RUN, f"faults=[{faults}]", "policy.rollback.max_rollbacks=1000"]
    )
    trainer._start_batch_schedule()
    step_times, rollback_times, load_times, first_steps = [], [], [], []
    while len(rollback_times) < rollbacks:
        start = time.perf_counter()
        trainer.step_once()  # the apply() at its end runs the rollback
        elapsed = time.perf_counter() - start
        if trainer.decision.action != Action.ROLLBACK:
            step_times.append(elapsed)
            if trainer.branch.step % trainer.cfg.checkpoint.every == 0:
                trainer.save_checkpoint()
                trainer.finish_checkpoints()
            continue
        rollback_times.append(trainer.history.rollbacks[-1].seconds)
        ckpt = next(
            c for c in list_checkpoints(trainer.checkpointer.root) if c.step == trainer.branch.step
        )
        t0 = time.perf_counter()
        trainer.step_once()  # the first resumed step
        first_steps.append(time.perf_counter() - t0)
        position, branch = trainer.sampler.position, trainer.branch
        for _ in range(repeats):
            t0 = time.perf_counter()
            trainer.checkpointer.load(trainer.engine, ckpt)
            load_times.append(time.perf_counter() - t0)
        trainer.restore(ckpt)  # back where the run was, then on
        trainer.sampler.position, trainer.branch = position, branch
        trainer.step_once()
    rollback = statistics.median(rollback_times)
    load = statistics.median(load_times)
    return {
        "rollback_seconds": rollback,
        "rollback_seconds_all": rollback_times,
        "plain_load_seconds": load,
        "ratio": rollback / load,
        "ordinary_step_seconds": statistics.median(step_times[-20:]),
        "first_resumed_step_seconds": statistics.median(first_steps),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="tiny,wide")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rollbacks", type=int, default=5)
    args = ap.parse_args()
    report = {}
    for name in args.shapes.split(","):
        report[name] = measure(SHAPES[name], args.repeats, args.rollbacks)
        r = report[name]
        print(
            f"{name:5s} rollback {r['rollback_seconds'] * 1e3:8.1f} ms   plain load "
            f"{r['plain_load_seconds'] * 1e3:8.1f} ms   ratio {r['ratio']:.2f}  "
            f"(median of {len(r['rollback_seconds_all'])} rollbacks; ordinary step "
            f"{r['ordinary_step_seconds'] * 1e3:.0f} ms, first resumed step "
            f"{r['first_resumed_step_seconds'] * 1e3:.0f} ms)"
        )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
