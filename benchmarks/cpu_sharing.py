"""Step time of the tiny preset on CPU, alone and beside a second job on the same cores,
with OpenMP's default wait policy, with ``OMP_WAIT_POLICY=PASSIVE``, and with yoto's
default (``yoto.cli.CPU_SHARING_DEFAULTS``).

How ``yoto train`` chooses its thread defaults (trainer/distributed.py): a thread that
finished its share of a parallel region spins, by default, for a while before it sleeps,
which is free on an idle machine and ruinous when another job wants the cores. Each
variant runs in a fresh process (OpenMP reads the policy once, when torch loads it), with
the threads yoto gives a world of one; the second job is the same training loop with the
default policy, started before and stopped after. Rounds alternate the variants' order.

    .venv/bin/python benchmarks/cpu_sharing.py [--rounds 3] [--steps 20]

Prints a table and one JSON line: median step ms per variant and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from yoto.cli import CPU_SHARING_DEFAULTS  # no torch: the CLI module loads it lazily

ROOT = Path(__file__).resolve().parents[1]
POLICIES = {  # name -> the OpenMP environment of the measured job
    "default": {},  # libgomp's own: spin 300,000 times, then sleep
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # sleep at once
    "yoto": CPU_SHARING_DEFAULTS,  # what yoto's CLI sets when the user set neither
}
_OMP_KEYS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")


def worker(steps: int, forever: bool) -> None:
    """The bare training loop of the tiny preset (forward, backward, AdamW)."""
    import torch

    from yoto.config import load_config
    from yoto.trainer.distributed import cpu_threads
    from yoto.trainer.model import GPT, vocab_size

    torch.set_num_threads(cpu_threads(1))
    cfg = load_config(preset="tiny")
    torch.manual_seed(0)
    model = GPT(cfg.model, vocab_size(cfg))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch, seq = cfg.train.global_batch_size, cfg.model.seq_len
    tokens = torch.randint(0, vocab_size(cfg), (batch, seq + 1))

    def step() -> float:
        start = time.perf_counter()
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - start

    for _ in range(3):
        step()
    if forever:
        while True:
            step()
    times = [step() for _ in range(steps)]
    print(json.dumps({"median_ms": 1000 * statistics.median(times)}))


def measure(policy: dict[str, str], steps: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in _OMP_KEYS}
    env.update(policy)
    out = subprocess.run(
        [sys.executable, __file__, "--worker", "--steps", str(steps)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["median_ms"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--forever", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.steps, args.forever)
        return 0

    results: dict[str, list[float]] = {}
    for load in ("alone", "shared"):
        other = None
        if load == "shared":
            env = {k: v for k, v in os.environ.items() if k not in _OMP_KEYS}
            other = subprocess.Popen(
                [sys.executable, __file__, "--worker", "--forever"], env=env, cwd=ROOT
            )
            time.sleep(5.0)  # past its start-up
        try:
            for r in range(args.rounds):
                names = list(POLICIES) if r % 2 == 0 else list(reversed(POLICIES))
                for name in names:
                    ms = measure(POLICIES[name], args.steps)
                    results.setdefault(f"{load}_{name}", []).append(ms)
        finally:
            if other is not None:
                other.kill()
                other.wait()
    med = {name: statistics.median(v) for name, v in results.items()}
    print(
        f"tiny preset, bare loop, {os.cpu_count()} cores, {args.rounds} rounds x "
        f"{args.steps} steps; 'shared': beside the same loop with the default policy"
    )
    print(f"{'variant':18s} {'median ms':>10s} {'min':>8s} {'max':>8s}")
    for name, values in results.items():
        print(f"{name:18s} {med[name]:10.1f} {min(values):8.1f} {max(values):8.1f}")
    ratios = {}
    for name in POLICIES:
        if name != "default":
            for load in ("alone", "shared"):
                ratios[f"{name}_vs_default_{load}"] = med[f"{load}_{name}"] / med[f"{load}_default"]
    for name in POLICIES:
        ratios[f"shared_vs_alone_{name}"] = med[f"shared_{name}"] / med[f"alone_{name}"]
    for name, value in ratios.items():
        print(f"{name:28s} {value:.3f}")
    print(json.dumps({"median_ms": med, **{k: round(v, 3) for k, v in ratios.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
