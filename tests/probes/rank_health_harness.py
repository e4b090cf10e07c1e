"""Runs under torchrun: trains the tiny preset once per variant, in one process group, and
counts the collectives that probes/system.py issues.

    python -m torch.distributed.run --nproc_per_node 2 tests/probes/rank_health_harness.py \
        RUN_ROOT OUT_DIR VARIANTS_JSON [OVERRIDE ...]

``VARIANTS_JSON`` maps a variant's name to its config overrides (after the common
OVERRIDEs) and, under the key ``faults``, its injected faults. Every collective function of
``torch.distributed`` is wrapped for the whole run: a call whose caller is
probes/system.py is counted under the function's name. Each rank writes
``OUT_DIR/rank{R}.json``: ``{variant: {"run_dir": ..., "collectives": {name: count}}}``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections import Counter
from pathlib import Path

import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from yoto.config import load_config  # noqa: E402
from yoto.trainer import run  # noqa: E402

COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "broadcast",
    "broadcast_object_list",
    "reduce_scatter_tensor",
    "barrier",
)
SYSTEM = str(ROOT / "probes" / "system.py")


def count_collectives(counts: Counter) -> None:
    """Wrap torch.distributed's collectives for the rest of the process: calls made from
    probes/system.py are counted by name (a count of what the probe really issued)."""
    for name in COLLECTIVES:
        original = getattr(dist, name)

        @functools.wraps(original)
        def counted(*args, _name=name, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if os.path.realpath(caller) == os.path.realpath(SYSTEM):
                counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def main() -> None:
    root, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    variants, common = json.loads(sys.argv[3]), sys.argv[4:]
    counts: Counter = Counter()
    count_collectives(counts)
    result = {}
    for name, spec in variants.items():
        counts.clear()
        cfg = load_config(preset="tiny", overrides=[*common, *spec.get("overrides", [])])
        cfg.faults = list(spec.get("faults", []))
        trained = run.train(cfg, root / name, name)
        result[name] = {"run_dir": str(trained.run_dir), "collectives": dict(counts)}
    rank = dist.get_rank() if dist.is_initialized() else 0
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main()
