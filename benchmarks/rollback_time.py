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


def measure(shape: list[str], repeats: int) -> dict[str, float]:
    trainer = make_trainer("tiny", [*shape, *RUN, "faults=[nan_grad@75]"])
    trainer._start_batch_schedule()
    step_times = []
    while True:
        start = time.perf_counter()
        trainer.step_once()  # the apply() at its end runs the rollback
        elapsed = time.perf_counter() - start
        if trainer.decision.action == Action.ROLLBACK:
            decided = trainer.state.step  # already the checkpoint's step
            t0 = time.perf_counter()
            trainer.step_once()  # the first resumed step
            first_step = time.perf_counter() - t0
            break
        step_times.append(elapsed)
        if trainer.cfg.checkpoint.every and trainer.state.step % trainer.cfg.checkpoint.every == 0:
            trainer.save_checkpoint()
            trainer.finish_checkpoints()
    ordinary = statistics.median(step_times[-20:])
    rollback_seconds = trainer.run.rollbacks[-1]["seconds"]
    ckpt = next(c for c in list_checkpoints(trainer.checkpointer.root) if c.step == decided)
    loads = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trainer.checkpointer.load(trainer.engine, ckpt)
        loads.append(time.perf_counter() - t0)
    load = statistics.median(loads)
    return {
        "rollback_seconds": rollback_seconds,
        "plain_load_seconds": load,
        "ratio": rollback_seconds / load,
        "ordinary_step_seconds": ordinary,
        "first_resumed_step_seconds": first_step,
        "checkpoint_step": decided,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="tiny,wide")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    report = {}
    for name in args.shapes.split(","):
        report[name] = measure(SHAPES[name], args.repeats)
        r = report[name]
        print(
            f"{name:5s} rollback {r['rollback_seconds'] * 1e3:8.1f} ms   plain load "
            f"{r['plain_load_seconds'] * 1e3:8.1f} ms   ratio {r['ratio']:.2f}  "
            f"(checkpoint step-{r['checkpoint_step']}, ordinary step "
            f"{r['ordinary_step_seconds'] * 1e3:.0f} ms)"
        )
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
