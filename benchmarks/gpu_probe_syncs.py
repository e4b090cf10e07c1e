"""Host-device synchronisations and step time per step, probes on vs off, on a GPU.

On CUDA every synchronising call is caught with ``torch.cuda.set_sync_debug_mode("warn")``
(one warning each) and counted per step, for yoto's loop with the default probe set and
with probes off, GPT-2-124M-shaped in bf16 by default. The target: the probes add no
synchronisation; the loop's own is the one transfer per step (``ProbeRunner.flush``).

Without CUDA it runs a reduced mode (the tiny preset, a few steps, the per-layer and
headroom probes every 5 steps so that they run inside the window) so the script is known
to work: sync debug mode does not exist there, so host reads of tensor values are counted
instead (the same wrapper as benchmarks/probe_overhead.py). Per variant it also reports the
values recorded per step, which shows the probes ran.

    .venv/bin/python benchmarks/gpu_probe_syncs.py [--steps 100] [--preset gpt2-124m]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections import Counter

import torch
from _common import counting_host_reads, make_trainer


def count_cuda_syncs(trainer, steps: int) -> tuple[list[int], list[float], list[int]]:
    syncs, times, recorded = [], [], []
    for _ in range(steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            start = time.perf_counter()
            values, _ = trainer.step_once()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            torch.cuda.set_sync_debug_mode("default")
        syncs.append(sum("synchronizing" in str(w.message) for w in caught))
        recorded.append(len(values))
    return syncs, times, recorded


def count_host_reads(trainer, steps: int) -> tuple[list[int], list[float], list[int]]:
    reads, times, recorded = [], [], []
    for _ in range(steps):
        counts: Counter = Counter()
        with counting_host_reads(counts):
            start = time.perf_counter()
            values, _ = trainer.step_once()
            times.append(time.perf_counter() - start)
        reads.append(sum(counts.values()))
        recorded.append(len(values))
    return reads, times, recorded


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # the window holds steps 50 and 100, where the layer-statistics and headroom probes run
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--micro-batch", type=int, default=16)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        preset = args.preset
        shape = [
            f"train.micro_batch_size={args.micro_batch}",
            f"train.global_batch_size={2 * args.micro_batch}",
            "train.device=cuda",
        ]
        measure, unit = count_cuda_syncs, "CUDA syncs"
    else:
        preset = "tiny"
        shape = ["train.device=cpu", "probes.layers.every=5", "probes.precision.detail_every=5"]
        args.steps, args.warmup = min(args.steps, 10), min(args.warmup, 5)
        measure, unit = count_host_reads, "host reads (CPU: no sync debug mode)"
        print("no CUDA: reduced mode on the CPU (tiny preset, host reads counted)")
    report = {}
    for name, extra in (("probes_off", ["probes.enabled=false"]), ("probes_on", [])):
        trainer = make_trainer(preset, [*shape, *extra])
        for _ in range(args.warmup):
            trainer.step_once()
        counts, times, recorded = measure(trainer, args.steps)
        report[name] = {
            "per_step": statistics.mean(counts),
            "max": max(counts),
            "step_seconds": statistics.median(times),
            "values_per_step_max": max(recorded),
        }
        print(
            f"{name:11s} {unit}/step: mean {report[name]['per_step']:.2f}, "
            f"max {report[name]['max']}; median step {report[name]['step_seconds'] * 1e3:.1f} ms"
        )
    report["added_by_probes_per_step"] = (
        report["probes_on"]["per_step"] - report["probes_off"]["per_step"]
    )
    report["step_time_ratio_on_off"] = (
        report["probes_on"]["step_seconds"] / report["probes_off"]["step_seconds"]
    )
    report["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
