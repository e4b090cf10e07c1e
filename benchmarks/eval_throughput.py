"""Evaluation throughput: lm-eval requests per second of the ``yoto`` backend
(evals/harness.py's ``YotoLM`` on a checkpoint) vs lm-eval's own ``hf`` backend (``HFLM``)
on the ``yoto export`` of the same checkpoint: same tasks, limit and batch size, same run.
Target (issue): yoto / hf >= 1.0x.

For each shape a run trains for a few steps (``yoto train`` in a subprocess: throughput
hardly depends on how long it trained), or ``--run-dir`` names an existing one; its newest
checkpoint is exported (``yoto export``). Both models are loaded once, outside the timing;
one untimed warm-up evaluation of each (``--limit 2``) pays lm-eval's first-call costs.
Then ``evaluate(..., write=False, model=...)`` runs the offline tasks (evals/tasks.py)
``stdlib_next_line`` (a multiple-choice doc makes one loglikelihood request per choice: 4)
and ``stdlib_cloze`` (one request per doc), the two backends in turn, the order swapped every
repeat (this machine is shared and noisy: both sides see the same load), and medians over
the repeats are reported, at three depths, each timed by wrapping the instance's method:

- ``score``: the instance's ``_loglikelihood_tokens`` (the batched forward passes and the
  picking of the continuation log-probabilities: the backend's own work);
- ``ll``:    its ``loglikelihood`` (the above and the tokenization of every request);
- ``wall``:  the whole ``evaluate()`` (also: lm-eval's task index, building the task data,
  the datasets loader, the metrics; the same work for both backends).

requests/s = requests / seconds at that depth; the ratio is yoto's requests/s over hf's
(the per-repeat ratios' median, so each ratio compares two evaluations under one load).
Both backends' scores are printed: they should agree (to float rounding).

The bigger shape ``wide`` is benchmarks/_common.py's model (8 layers, d_model 256, 8 heads,
context 256). --limit 300 is more than either test split holds, so the full run scores
them whole (219 next-line docs and 156 cloze docs: 1,032 requests an evaluation). The
process sets yoto's OpenMP wait default first, as ``yoto eval`` does (cli.py's
``share_cpus_gracefully``: without it a loaded 2-core machine made one evaluation vary
14x), and leaves torch its default threads. The full run (tiny and wide, 3 repeats) took
7 minutes on 2 cores shared with other jobs (load average about 3), most of it wide's
8 evaluations at 25-40 s each; on such a machine a single repeat's ratio can be off by
2x either way, so read the medians (and the per-repeat lines printed above the tables).

    .venv/bin/python benchmarks/eval_throughput.py [--shapes tiny,wide] [--limit 300]
        [--batch-size 16] [--repeats 3] [--run-dir RUN_DIR]
    .venv/bin/python benchmarks/eval_throughput.py --quick   # tiny, 20 steps, --limit 40

Prints a table per shape and one JSON line.

**In-loop cost** (part 2, ``--part inloop``; run first by default): two trainers of the
tiny preset in this process, stepped in turn with the order swapped every step, both
checkpointing every 20 steps; one has eval.harness every 20 steps (the background lm-eval
process of evals/inloop.py, ``--limit 200``), the other none. Each ``step_once`` plus the
checkpoint bookkeeping (where a sealed checkpoint is handed over and results are polled)
is timed with ``perf_counter``; the table gives median and mean step time of each and
their ratio. On this 2-core machine the evaluator's process (niced, one thread) competes
with training for the CPU: what it costs there is the CPU it takes, not a wait.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from yoto.cli import share_cpus_gracefully  # no torch: the CLI module loads it lazily

share_cpus_gracefully()  # yoto eval's OpenMP wait default, before torch loads (as the CLI)
for _key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")

from _common import SHAPES  # noqa: E402

from yoto.evals import tasks as offline  # noqa: E402

TASKS = (offline.NEXT_LINE, offline.CLOZE)  # multiple choice (4 requests a doc), cloze
TRAIN = [  # a short CPU run: only its checkpoint is used
    "train.device=cpu",
    "eval.every=0",
    "probes.spectra.enabled=false",
]
MODEL_KEYS = ("model.",)  # of a shape's overrides, the ones that change the model
STEPS = {"tiny": 200, "wide": 40}  # full mode; --quick trains 20
FULL = {"limit": 300, "repeats": 3, "shapes": "tiny,wide"}
QUICK = {"limit": 40, "repeats": 1, "shapes": "tiny", "steps": 20}
DEPTHS = ("score", "ll", "wall")


def yoto(*args: str) -> str:
    """``yoto ARGS`` in a subprocess; its output (raised with it on failure)."""
    cmd = [sys.executable, "-m", "yoto.cli", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def train(shape: str, steps: int, root: Path) -> Path:
    overrides = [*TRAIN, *(o for o in SHAPES[shape] if o.startswith(MODEL_KEYS))]
    if shape != "tiny":  # a smaller batch: the checkpoint is what counts, not its loss
        overrides += ["train.micro_batch_size=4", "train.global_batch_size=8"]
    overrides += [
        "train.batch_warmup.start=null",
        f"train.steps={steps}",
        f"checkpoint.every={steps}",
    ]
    sets = [a for o in overrides for a in ("--set", o)]
    yoto(
        "train", "--preset", "tiny", "--run-root", str(root), "--name", f"bench-{shape}",
        "--no-progress", "--metrics-addr", "0", *sets,
    )  # fmt: skip
    [run_dir] = [p for p in root.iterdir() if p.is_dir() and f"bench-{shape}" in p.name]
    return run_dir


class Timed:
    """Wraps an lm-eval LM instance's ``loglikelihood`` and ``_loglikelihood_tokens``: the
    seconds in each and the requests by task, per evaluation."""

    def __init__(self, lm) -> None:
        self.lm = lm
        self.seconds = {"score": 0.0, "ll": 0.0}
        self.requests: Counter = Counter()
        self.docs: dict[str, set] = {}
        outer, inner = lm.loglikelihood, lm._loglikelihood_tokens

        def loglikelihood(requests, *args, **kwargs):
            for r in requests:
                self.requests[r.task_name] += 1
                self.docs.setdefault(r.task_name, set()).add(r.doc_id)
            kwargs.setdefault("disable_tqdm", True)  # both backends' progress bars
            start = time.perf_counter()
            try:
                return outer(requests, *args, **kwargs)
            finally:
                self.seconds["ll"] += time.perf_counter() - start

        def loglikelihood_tokens(requests, *args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(requests, *args, **kwargs)
            finally:
                self.seconds["score"] += time.perf_counter() - start

        lm.loglikelihood = loglikelihood  # the instance's: what lm-eval's evaluator calls
        lm._loglikelihood_tokens = loglikelihood_tokens  # what TemplateLM's calls

    def reset(self) -> None:
        self.seconds = {"score": 0.0, "ll": 0.0}
        self.requests, self.docs = Counter(), {}


def one_evaluation(run_dir: Path, timed: Timed, limit: int, batch_size: int) -> dict:
    from yoto.evals.evaluate import evaluate

    timed.reset()
    start = time.perf_counter()
    _, rows = evaluate(
        run_dir, list(TASKS), limit=limit, batch_size=batch_size, write=False, model=timed.lm
    )
    wall = time.perf_counter() - start
    n = sum(timed.requests.values())
    seconds = {**timed.seconds, "wall": wall}
    return {
        "requests": n,
        "requests_by_task": dict(timed.requests),
        "docs_by_task": {t: len(d) for t, d in timed.docs.items()},
        "seconds": seconds,
        "per_second": {k: n / s for k, s in seconds.items()},
        "scores": {f"{r['task']} {r['metric']}": r["value"] for r in rows},
    }


def measure(run_dir: Path, export_dir: Path, limit: int, batch_size: int, repeats: int) -> dict:
    import torch
    from lm_eval.models.huggingface import HFLM

    from yoto.evals.harness import YotoLM
    from yoto.trainer.offline import run_config

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # HFLM warns per truncated request
    lms = {
        "yoto": Timed(YotoLM(run_dir=str(run_dir), batch_size=batch_size, device="cpu")),
        "hf": Timed(
            HFLM(
                pretrained=str(export_dir),
                backend="causal",
                batch_size=batch_size,
                device="cpu",
                dtype="float32",
            )
        ),
    }
    for timed in lms.values():  # warm-up: imports, lm-eval's task index, first calls
        one_evaluation(run_dir, timed, 2, batch_size)
    runs: dict[str, list[dict]] = {name: [] for name in lms}
    for repeat in range(repeats):
        order = list(lms) if repeat % 2 == 0 else list(reversed(lms))
        for name in order:
            runs[name].append(one_evaluation(run_dir, lms[name], limit, batch_size))
            got = runs[name][-1]
            print(
                f"  repeat {repeat + 1}/{repeats} {name:4s}: {got['requests']} requests, "
                + ", ".join(f"{k} {s:.2f} s" for k, s in got["seconds"].items()),
                flush=True,
            )
    m = run_config(run_dir).model
    out: dict = {
        "run_dir": str(run_dir),
        "step": lms["yoto"].lm.step,
        "model": f"{m.n_layer} layers x d_model {m.d_model}, {m.n_head} heads, context {m.seq_len}",
        "torch_threads": torch.get_num_threads(),
    }
    for name, got in runs.items():
        out[name] = {
            "requests": got[0]["requests"],
            "requests_by_task": got[0]["requests_by_task"],
            "docs_by_task": got[0]["docs_by_task"],
            "seconds": {k: statistics.median(g["seconds"][k] for g in got) for k in DEPTHS},
            "per_second": {k: statistics.median(g["per_second"][k] for g in got) for k in DEPTHS},
            "scores": got[0]["scores"],
        }
    out["ratio"] = {
        k: statistics.median(
            y["per_second"][k] / h["per_second"][k]
            for y, h in zip(runs["yoto"], runs["hf"], strict=True)
        )
        for k in DEPTHS
    }
    a, b = out["yoto"]["scores"], out["hf"]["scores"]
    out["same_requests"] = out["yoto"]["requests_by_task"] == out["hf"]["requests_by_task"]
    out["score_max_relative_difference"] = max(
        (abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in a.keys() & b.keys()),
        default=math.nan,
    )
    out["same_metrics"] = a.keys() == b.keys()
    return out


def export(run_dir: Path, out: Path) -> Path:
    yoto("export", str(run_dir), "--out", str(out))
    return out


def print_shape(name: str, r: dict, batch_size: int) -> None:
    y, h = r["yoto"], r["hf"]
    print(
        f"\n### {name}: {r['model']}; checkpoint step {r['step']}; "
        f"{r['torch_threads']} torch threads\n"
    )
    tasks = ", ".join(
        f"{t} {y['docs_by_task'].get(t, 0)} docs -> {n} requests"
        for t, n in sorted(y["requests_by_task"].items())
    )
    print(f"{y['requests']} loglikelihood requests per evaluation ({tasks}), batch {batch_size}")
    print("same requests on both sides" if r["same_requests"] else "REQUESTS DIFFER")
    print()
    print("| depth | yoto s | hf s | yoto req/s | hf req/s | yoto / hf |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, label in zip(
        DEPTHS,
        ("score (_loglikelihood_tokens)", "ll (loglikelihood)", "wall (evaluate())"),
        strict=True,
    ):
        print(
            f"| {label} | {y['seconds'][k]:.2f} | {h['seconds'][k]:.2f} | "
            f"{y['per_second'][k]:.0f} | {h['per_second'][k]:.0f} | {r['ratio'][k]:.2f}x |"
        )
    print()
    print("| task metric | yoto | hf |")
    print("|---|---:|---:|")
    for key in sorted(y["scores"].keys() | h["scores"].keys()):
        print(
            f"| {key} | {y['scores'].get(key, math.nan):.6g} "
            f"| {h['scores'].get(key, math.nan):.6g} |"
        )
    agree = r["score_max_relative_difference"]
    print(
        f"\nscores: largest relative difference {agree:.2g}"
        + ("" if r["same_metrics"] else " (METRICS DIFFER)")
    )


# --- part 2: what an in-loop evaluation adds to training ------------------------------------

INLOOP_RUN = [
    "train.device=cpu",
    "log.progress=false",
    "eval.every=0",
    "probes.spectra.enabled=false",
    "policy.rollback.diagnose.enabled=false",
]


def inloop_cost(root: Path, steps: int, every: int, limit: int) -> dict:
    """Two trainers in this process, stepped in turn (the order swapped every step, so
    the machine's noise hits both): one with eval.harness every ``every`` steps (its
    background lm-eval process running while it trains), one without. Both checkpoint
    every ``every`` steps. Returns the per-step wall times of each."""
    from yoto import runstore
    from yoto.config import load_config
    from yoto.evals.inloop import BackgroundEvaluator
    from yoto.trainer import run

    variants = {
        "on": [f"eval.harness.every={every}", f"eval.harness.limit={limit}"],
        "off": ["eval.harness.every=0"],
    }
    trainers, stores, times = {}, {}, {}
    for name, extra in variants.items():
        cfg = load_config(
            preset="tiny",
            overrides=[
                *INLOOP_RUN,
                *extra,
                f"train.steps={steps}",
                f"checkpoint.every={every}",
                "checkpoint.keep_last=2",
            ],
        )
        trainers[name], stores[name] = run.make_trainer(cfg, root, f"inloop-{name}")
        times[name] = []
    trainers["on"].evaluator = BackgroundEvaluator(trainers["on"].cfg.eval.harness)
    try:
        for trainer in trainers.values():
            trainer._start_batch_schedule()
        for turn in range(steps):
            order = list(trainers) if turn % 2 == 0 else list(reversed(trainers))
            for name in order:
                trainer = trainers[name]
                t0 = time.perf_counter()
                trainer.step_once()  # the evaluator's results are polled in here
                trainer._collect_checkpoints()  # a sealed checkpoint is handed over here
                if trainer.branch.step % every == 0 and trainer.branch.step < steps:
                    trainer.save_checkpoint()
                times[name].append(time.perf_counter() - t0)
        for trainer in trainers.values():
            trainer.finish_checkpoints()
        evaluator = trainers["on"].evaluator
        submitted = len(evaluator.submitted)
        trainers["on"].finish_evaluations()
    finally:
        for store in stores.values():
            store.close("finished")
    evaluated = len(runstore.read_evals(stores["on"].path))
    return {
        "times": times,
        "submitted": submitted,
        "skipped": trainers["on"].eval_skipped,
        "eval_rows": evaluated,
    }


def report_inloop(got: dict, steps: int, every: int) -> None:
    on, off = got["times"]["on"], got["times"]["off"]
    med_on, med_off = statistics.median(on), statistics.median(off)
    mean_on, mean_off = statistics.fmean(on), statistics.fmean(off)
    print(f"\n### In-loop evaluation: {steps} tiny steps each, eval.harness.every={every}\n")
    print("| | median step | mean step | evaluations started | skipped (busy) |")
    print("|---|---:|---:|---:|---:|")
    print(
        f"| eval.harness on | {med_on * 1e3:.1f} ms | {mean_on * 1e3:.1f} ms | "
        f"{got['submitted']} | {got['skipped']} |"
    )
    print(f"| off | {med_off * 1e3:.1f} ms | {mean_off * 1e3:.1f} ms | - | - |")
    print(
        f"\nratio on/off: median {med_on / med_off:.3f}, mean {mean_on / mean_off:.3f} "
        f"({got['eval_rows']} result rows written by the background process)"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", help=f"of {sorted(SHAPES)} (default {FULL['shapes']})")
    ap.add_argument("--run-dir", type=Path, help="an existing run instead of training one")
    ap.add_argument("--steps", type=int, help=f"training steps (default {STEPS}; quick 20)")
    ap.add_argument("--limit", type=int, help="docs per task (default 300; quick 40)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, help="evaluations per backend (default 3; quick 1)")
    ap.add_argument("--quick", action="store_true", help="reduced mode: tiny, a short run")
    ap.add_argument(
        "--part",
        choices=("all", "throughput", "inloop"),
        default="all",
        help="requests/s (throughput), the in-loop cost (inloop), or both",
    )
    args = ap.parse_args()
    size = QUICK if args.quick else FULL
    limit = args.limit or size["limit"]
    repeats = args.repeats or size["repeats"]
    shapes = (args.shapes or size["shapes"]).split(",")
    if args.run_dir:
        shapes = [args.run_dir.name]
    mode = "reduced mode" if args.quick else "full size"
    command = " ".join([".venv/bin/python", "benchmarks/eval_throughput.py", *sys.argv[1:]])
    load = {"load_average_before": os.getloadavg()}
    print(
        f"eval throughput ({mode}): tasks {', '.join(TASKS)}, --limit {limit}, batch "
        f"{args.batch_size}, {repeats} repeat(s) per backend, shapes {', '.join(shapes)}",
        flush=True,
    )
    report = {}
    if args.part in ("all", "inloop"):
        steps, every = (40, 10) if args.quick else (160, 20)
        with tempfile.TemporaryDirectory(prefix="yoto-bench-inloop-") as tmp:
            inloop = inloop_cost(Path(tmp), steps, every, limit=40 if args.quick else 200)
        report_inloop(inloop, steps, every)
        if args.part == "inloop":
            return 0
    with tempfile.TemporaryDirectory(prefix="yoto-bench-eval-") as tmp:
        root = Path(tmp)
        for name in shapes:
            if args.run_dir:
                run_dir = args.run_dir
            else:
                steps = args.steps or size.get("steps") or STEPS.get(name, 40)
                print(f"{name}: training {steps} steps ...", flush=True)
                run_dir = train(name, steps, root / name)
            print(f"{name}: exporting {run_dir.name} ...", flush=True)
            out = export(run_dir, root / f"{name}-export")
            report[name] = measure(run_dir, out, limit, args.batch_size, repeats)
    load["load_average_after"] = os.getloadavg()
    for name, r in report.items():
        print_shape(name, r, args.batch_size)
    print()
    for name, r in report.items():
        verdict = "meets" if r["ratio"]["score"] >= 1.0 else "MISSES"
        print(
            f"{name}: yoto / hf {r['ratio']['score']:.2f}x scoring, {r['ratio']['ll']:.2f}x "
            f"loglikelihood, {r['ratio']['wall']:.2f}x evaluate(): {verdict} the 1.0x target"
        )
    before, after = load["load_average_before"], load["load_average_after"]
    print(
        f"load average (1, 5, 15 min) {', '.join(f'{x:.2f}' for x in before)} at start, "
        f"{', '.join(f'{x:.2f}' for x in after)} at end, on {os.cpu_count()} CPUs"
    )
    print(f"reproduce: {command}")
    print(
        json.dumps(
            {
                "mode": mode,
                "limit": limit,
                "batch_size": args.batch_size,
                "repeats": repeats,
                "command": command,
                **load,
                "shapes": report,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
