"""A CPU scaling sweep and its fit: the diagnostic of issue 8, measured.

Trains a grid of widths x token budgets with ``yoto sweep --budget steps`` (each an
ordinary run directory), fits the Chinchilla law L(N, D) = E + A/N^α + B/D^β on all runs
and Kaplan's L(N) = (N_c/N)^α_N on the longest budget, with bootstrap intervals, and
reports every run's effective size. Then it trains one *suspect* run outside the sweep (the
largest width with a learning rate 10x too high, the kind of mistake the diagnostic is
for) and asks the law what size of model it performs like.

N is the non-embedding parameter count; D the training tokens each run recorded; the loss
the final validation loss, mean over the sources (the standard library's code and prose).

    .venv/bin/python benchmarks/scaling_sweep.py [--quick] [--run-root DIR] [--json FILE]

Full: d_model 32, 64, 96, 128 x 100, 200, 400 steps of 16 x 64 tokens (2 blocks), about
26 minutes on 2 cores shared with other jobs (load ~7). --quick: 3 widths x 2 budgets of a
1-block model, about a minute (what the test runs).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

from yoto.cli import main as yoto
from yoto.scaling import runs as sr
from yoto.scaling.laws import fmt_count

COMMON = [
    "train.device=cpu",
    "train.batch_warmup.start=null",
    "data.max_bytes_per_source=4000000",
    "eval.every=0",  # validate once, at the end: the point of the run
    "checkpoint.every=0",
    "probes.enabled=false",  # measured elsewhere; here they would only add time
]
FULL = {
    "sets": [
        *COMMON,
        "model.n_layer=2",
        "model.seq_len=64",
        "train.micro_batch_size=16",
        "train.global_batch_size=16",
        "eval.batches=4",
    ],
    "grid": ["model.d_model=32,64,96,128", "train.steps=100,200,400"],
    "suspect": ["model.d_model=128", "train.steps=400", "optim.lr=2e-2"],
    "law": "auto",
}
QUICK = {
    "sets": [
        *COMMON,
        "data.max_bytes_per_source=1000000",
        "model.n_layer=1",
        "model.seq_len=32",
        "train.micro_batch_size=8",
        "train.global_batch_size=8",
        "eval.batches=2",
    ],
    "grid": ["model.d_model=16,32,64", "train.steps=15,30"],
    "suspect": ["model.d_model=64", "train.steps=30", "optim.lr=2e-2"],
    "law": "chinchilla",  # 6 points: auto would fall back to Kaplan below 10
}


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def run_sweep(spec: dict, root: Path) -> str:
    argv = ["sweep", "--preset", "tiny", "--budget", "steps", "--run-root", str(root)]
    argv += sets(spec["sets"]) + [a for g in spec["grid"] for a in ("--grid", g)]
    argv += ["--name", "scale", "--no-fit"]
    out = StringIO()
    with redirect_stdout(out):
        rc = yoto(argv)
    text = out.getvalue()
    if rc != 0:
        raise SystemExit(f"the sweep failed (rc {rc}):\n{text}")
    return re.search(r"sweep (sweep-\S+):", text).group(1)


def run_suspect(spec: dict, root: Path) -> Path:
    argv = ["train", "--preset", "tiny", "--run-root", str(root), "--name", "suspect"]
    argv += ["--no-progress", *sets([*spec["sets"], *spec["suspect"]])]
    if yoto(argv) != 0:
        raise SystemExit("the suspect run failed")
    return next(p for p in root.iterdir() if "suspect" in p.name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 widths x 2 budgets, tiny runs")
    ap.add_argument("--run-root", help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    ap.add_argument("--bootstrap", type=int, default=200)
    args = ap.parse_args(argv)
    spec = QUICK if args.quick else FULL
    root = Path(args.run_root or tempfile.mkdtemp(prefix="yoto-scaling-"))
    started = time.time()
    sweep_id = run_sweep(spec, root / "sweep")
    suspect_dir = run_suspect(spec, root / "suspect")
    trained = time.time() - started

    records = sr.check_runs(sr.load_runs([root / "sweep"], sweep_id))
    points = sr.points_from_runs(records, sr.ALL)
    chinchilla = sr.fit_groups({sr.ALL: points}, spec["law"], args.bootstrap)[0]
    longest = max(p.d for p in points)
    last = [p for p in points if abs(p.d / longest - 1) < 0.01]
    kaplan = sr.fit_groups({sr.ALL: last}, "kaplan", args.bootstrap)[0]
    suspect = sr.read_run(suspect_dir)
    fitted = chinchilla.fit
    eff = fitted.effective_size(suspect.loss(sr.ALL), suspect.d)

    print(sr.format_report([chinchilla], "runs"))
    print()
    print(sr.format_report([kaplan], f"runs of the longest budget ({fmt_count(longest)} tokens)"))
    print()
    print(
        f"suspect run ({', '.join(spec['suspect'])}): N={fmt_count(suspect.n)}, "
        f"D={fmt_count(suspect.d)}, val loss {suspect.loss(sr.ALL):.4f}: "
        f"{sr.verdict(eff, suspect.n)} (law: {fitted.law})"
    )
    print(f"\n{len(records) + 1} runs trained in {trained / 60:.1f} min under {root}")
    report = {
        "mode": "quick" if args.quick else "full",
        "sweep": sweep_id,
        "run_root": str(root),
        "train_minutes": trained / 60,
        "law_fit": sr.report_json([chinchilla])[0],
        "kaplan_longest_budget": sr.report_json([kaplan])[0],
        "suspect": {
            "overrides": spec["suspect"],
            "N": suspect.n,
            "D": suspect.d,
            "loss": suspect.loss(sr.ALL),
            "effective_size": eff.to_json(),
        },
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"effective_size_suspect": eff.to_json()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
