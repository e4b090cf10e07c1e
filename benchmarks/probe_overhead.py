"""Step time with the default probe set and cadence vs probes off, on CPU.

Same process, same model and batches, the variants interleaved round by round so noise
from this shared machine hits all alike. Two shapes: the tiny preset and a wider CPU
config. Per variant it also counts the host reads of tensor values per step (``.item()``,
``.tolist()``, ``.cpu()``, ``float()``/``bool()`` of a tensor, ``.numpy()``), the CPU
stand-in for host-device synchronisations (the GPU script counts real ones with
``torch.cuda.set_sync_debug_mode``).

The default spectra cadence (every 500 steps) is longer than a round, so its cost is
measured with a variant analysing every ``--spectra-every`` steps and scaled to 500.

    .venv/bin/python benchmarks/probe_overhead.py [--rounds 6] [--steps 50] [--shapes tiny,wide]

``--zero`` measures the probes where parameters are partitioned: two CPU ranks (gloo, the
script starts itself under torchrun), the tiny shape at ZeRO-3 and at ZeRO-0, probes on
and off, the four interleaved round by round in the same processes. It reports each
stage's step time with probes on vs off at the default cadence, the ratio of ZeRO-3's probe
cost to ZeRO-0's, and host reads per step. The ZeRO-3 trainers are built first: DeepSpeed's
ZeRO-3 engine replaces ``torch.nn.functional.linear`` for the whole process, so all four
variants run the same linear. Spectra need checkpoints at ZeRO-3 (none here), so this mode
leaves them out of both stages (``probes.spectra.enabled=false``).

    .venv/bin/python benchmarks/probe_overhead.py --zero [--rounds 6] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from _common import SHAPES, counting_host_reads, make_trainer


def make(shape: list[str], variant: list[str], root: str):
    return make_trainer("tiny", [*shape, *variant], root)


def interleaved(
    trainers: dict, args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, Counter]]:
    """Warm every trainer up, then ``args.rounds`` rounds of ``args.steps`` steps each, the
    variants in alternating order, so the machine's noise hits all alike. Returns each
    variant's mean step time per round, and its host reads."""
    for trainer in trainers.values():  # warm-up, not measured: one-time costs (lazy
        for _ in range(args.warmup):  # imports, the spectra worker's start) stay out
            trainer.step_once()
    times: dict[str, list[float]] = {name: [] for name in trainers}
    reads: dict[str, Counter] = {name: Counter() for name in trainers}
    for r in range(args.rounds):
        order = list(trainers) if r % 2 == 0 else list(reversed(trainers))
        for name in order:
            trainer = trainers[name]
            with counting_host_reads(reads[name]):
                start = time.perf_counter()
                for _ in range(args.steps):
                    trainer.step_once()
                times[name].append((time.perf_counter() - start) / args.steps)
    return times, reads


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument(
        "--steps",
        type=int,
        default=50,
        help="steps per variant per round (>= the layer-statistics cadence)",
    )
    ap.add_argument("--warmup", type=int, default=55)
    ap.add_argument("--spectra-every", type=int, default=40)
    ap.add_argument("--shapes", default="tiny,wide")
    ap.add_argument("--zero", action="store_true", help="ZeRO-3 vs ZeRO-0 on two CPU ranks")
    args = ap.parse_args()
    if args.zero:
        return zero_main(args) if "RANK" in os.environ else _under_torchrun()
    root = tempfile.mkdtemp(prefix="yoto-probe-bench-")
    report = {}
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        variants = {
            "probes_off": ["probes.enabled=false"],
            "default": [],
            f"spectra_every_{args.spectra_every}": [f"probes.spectra.every={args.spectra_every}"],
        }
        trainers = {name: make(shape, v, root) for name, v in variants.items()}
        times, reads = interleaved(trainers, args)
        steps = Counter(dict.fromkeys(trainers, args.rounds * args.steps))
        # a round spans the probes' cadence, so its mean step time includes their periodic
        # work; the median over rounds resists the machine's noise
        med = {name: statistics.median(v) for name, v in times.items()}
        mean = med
        base = mean["probes_off"]
        spectra_name = f"spectra_every_{args.spectra_every}"
        # one analysis per `spectra_every` steps costs (mean difference x spectra_every);
        # at the default cadence of 500 that cost is spread over 500 steps
        per_analysis = (mean[spectra_name] - mean["default"]) * args.spectra_every
        spectra_at_500 = max(0.0, per_analysis) / 500
        overhead_default = mean["default"] / base - 1
        print(
            f"\n== {shape_name}: {args.rounds} rounds x {args.steps} steps per variant, "
            f"{torch.get_num_threads()} threads"
        )
        print(
            f"{'variant':22s} {'ms/step':>9s} {'min':>8s} {'max':>8s} {'vs off':>8s} "
            f"{'host reads/step':>16s}"
        )
        for name in trainers:
            per_step = sum(reads[name].values()) / steps[name]
            print(
                f"{name:22s} {med[name] * 1e3:9.2f} {min(times[name]) * 1e3:8.2f} "
                f"{max(times[name]) * 1e3:8.2f} {med[name] / base:8.3f} {per_step:16.2f}  "
                f"{dict(reads[name])}"
            )
        print(
            f"spectra: {per_analysis * 1e3:.0f} ms of training time per analysis; at the "
            f"default cadence (500 steps) {spectra_at_500 / base * 100:.2f}% per step"
        )
        total = overhead_default + spectra_at_500 / base
        print(f"default probe set, amortised: {total * 100:+.2f}% step time vs probes off")
        report[shape_name] = {
            "median_round_step_seconds": med,
            "overhead_default_excluding_spectra": overhead_default,
            "spectra_seconds_per_analysis": per_analysis,
            "overhead_default_amortised": total,
            "host_reads_per_step": {n: sum(c.values()) / steps[n] for n, c in reads.items()},
        }
    print(json.dumps(report))
    return 0


def _under_torchrun() -> int:
    """This script again, as two ranks (gloo on the CPU), on a free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(Path(__file__).resolve()),
        *sys.argv[1:],
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(cmd, env=env).returncode


def zero_main(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    root = tempfile.mkdtemp(prefix=f"yoto-probe-bench-zero-r{rank}-")
    off = ["probes.spectra.enabled=false"]
    variants = {  # ZeRO-3 first (see the module docstring)
        "zero3_probes_off": ["train.zero_stage=3", "probes.enabled=false"],
        "zero3_default": ["train.zero_stage=3", *off],
        "zero0_probes_off": ["train.zero_stage=0", "probes.enabled=false"],
        "zero0_default": ["train.zero_stage=0", *off],
    }
    trainers = {name: make(SHAPES["tiny"], v, root) for name, v in variants.items()}
    times, reads = interleaved(trainers, args)
    # both ranks measured the same rounds; a step ends when the slower rank is done
    mine = {name: statistics.median(v) for name, v in times.items()}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    med = {name: max(g[name] for g in gathered) for name in trainers}
    if rank != 0:
        return 0
    total = args.rounds * args.steps
    cost = {
        stage: med[f"{stage}_default"] / med[f"{stage}_probes_off"] - 1
        for stage in ("zero3", "zero0")
    }
    print(
        f"\n== tiny, 2 CPU ranks (gloo): {args.rounds} rounds x {args.steps} steps per "
        f"variant, {torch.get_num_threads()} thread(s) per rank"
    )
    print(f"{'variant':18s} {'ms/step':>9s} {'vs off':>8s} {'host reads/step':>16s}")
    for name in trainers:
        stage = name.split("_")[0]
        per_step = sum(reads[name].values()) / total
        ratio = med[name] / med[f"{stage}_probes_off"]
        print(f"{name:18s} {med[name] * 1e3:9.2f} {ratio:8.3f} {per_step:16.2f}")
    ratio = cost["zero3"] / cost["zero0"] if cost["zero0"] > 0 else float("nan")
    print(
        f"probe cost at the default cadence: ZeRO-3 {cost['zero3'] * 100:+.2f}%, "
        f"ZeRO-0 {cost['zero0'] * 100:+.2f}%; ZeRO-3 / ZeRO-0 cost {ratio:.2f}"
    )
    report = {
        "median_round_step_seconds": med,
        "probe_cost": cost,
        "zero3_over_zero0_cost": ratio,
        "host_reads_per_step": {n: sum(c.values()) / total for n, c in reads.items()},
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
