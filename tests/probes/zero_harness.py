"""The same run at several ZeRO stages, on the ranks torchrun started, in one process group.

    python -m torch.distributed.run --nproc_per_node 2 tests/probes/zero_harness.py \
        RUN_ROOT STEPS VARIANTS_JSON [OVERRIDE ...]

``VARIANTS_JSON`` maps a variant's name to its config overrides (applied after the common
OVERRIDEs); the variants train one after another, each from the same seed on the same
data. Rank 0 prints one line ``RESULT {variant: {"values": [per-step values], "reads":
[host reads per step]}}``: every value the step recorded (its row, per-layer series
included) and how many tensor values the step read to the host (tests/helpers.py
``counting_host_reads``). Variants with ZeRO-3 go last: DeepSpeed's ZeRO-3 engine swaps
in its own linear function for the process.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.helpers import counting_host_reads  # noqa: E402
from yoto.config import load_config  # noqa: E402
from yoto.trainer import run  # noqa: E402


def main() -> None:
    root, steps, variants = Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
    common = sys.argv[4:]
    out = {}
    for name, overrides in variants.items():
        cfg = load_config(preset="tiny", overrides=[*common, f"train.steps={steps}", *overrides])
        rank = int(os.environ.get("RANK", "0"))  # the process group starts in make_trainer
        trainer, store = run.make_trainer(cfg, root / name / f"rank{rank}", name)
        values, reads = [], []
        for _ in range(steps):
            counts: Counter = Counter()
            with counting_host_reads(counts):
                step_values, _ = trainer.step_once()
            values.append(step_values)
            reads.append(sum(counts.values()))
        store.close("finished")
        trainer.runner.detach()
        out[name] = {"values": values, "reads": reads}
        del trainer
        gc.collect()
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
