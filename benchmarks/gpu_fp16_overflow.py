"""fp16 overflow through the full DeepSpeed fp16 engine path, on a GPU.

Trains the tiny preset in fp16 on CUDA and poisons one block's gradient with inf on two
consecutive steps. DeepSpeed must skip both steps and halve its loss scale after the
second (hysteresis 2); the run directory must show both: ``yoto_overflow_steps_total``
+2, ``yoto_loss_scale`` halved, two ``overflow`` events. Prints PASS or FAIL and the rows.

Without CUDA (DeepSpeed's CPU accelerator has no fp16 here) it runs a reduced mode: the
same poisoning on a bf16 CPU engine, where the step is applied and must show as a
non-finite gradient step instead, so the script is known to work. bf16 is emulated on most
CPUs (about 15x slower than fp32), so the reduced mode poisons early (step 6) and stops
three steps later.

    .venv/bin/python benchmarks/gpu_fp16_overflow.py [--at 30]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from _common import make_trainer

from yoto import catalog, runstore
from yoto.events import EventKind


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--at", type=int, help="first poisoned step (30 on CUDA, 6 reduced)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    precision, device = ("fp16", "cuda") if cuda else ("bf16", "cpu")
    if not cuda:
        print("no CUDA: reduced mode, bf16 on the CPU (non-finite step, applied)")
    at = args.at or (30 if cuda else 6)
    steps = at + (10 if cuda else 3)  # the report reads rows at-1 .. at+2
    trainer = make_trainer(
        "tiny",
        [
            f"train.precision={precision}",
            f"train.device={device}",
            f"train.steps={steps}",
            "eval.every=0",
            "policy.enabled=false",  # record only: no rollback
        ],
    )
    poisoned = {at, at + 1}
    weight = trainer.engine.module.blocks[0].mlp.fc.weight

    def poison(grad: torch.Tensor) -> torch.Tensor:
        return grad * float("inf") if trainer.branch.step + 1 in poisoned else grad

    weight.register_hook(poison)
    trainer.fit()
    store = trainer.sinks.durable
    store.close("finished")
    t = runstore.read_metrics(store.path).to_pydict()
    rows = {s: i for i, s in enumerate(t["step"])}
    before, after = rows[at - 1], rows[at + 1]
    overflows = t[catalog.OVERFLOW_STEPS.name]
    events = [e for e in runstore.read_events(store.path) if e["kind"] == EventKind.OVERFLOW]
    checks = {
        "two overflow steps": overflows[after] - overflows[before] == 2,
        "two overflow events": len([e for e in events if not e["data"].get("at_minimum")]) == 2,
    }
    if cuda:
        scale = t[catalog.LOSS_SCALE.name]
        checks["loss scale halved"] = scale[after] == scale[before] / 2
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": precision,
        "checks": checks,
        "rows": {
            k: [t[k][i] for i in range(before, after + 2)]
            for k in (catalog.OVERFLOW_STEPS.name, catalog.LOSS_SCALE.name, catalog.GRAD_NORM.name)
            if k in t
        },
    }
    print(json.dumps(report, indent=2, default=str))
    ok = all(checks.values())
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
