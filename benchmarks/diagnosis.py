"""Diagnosis cost: seconds and replayed steps per replay diagnosis vs the rollback alone,
and spike forensics' cost per spike event, for the tiny preset and a larger CPU shape.

For each shape two runs of the same config train side by side in this process, stepped
in turn (the order swapped every step: this machine is shared and noisy, so both see the
same load), through one injected ``bad_batch`` that the policy rolls back. They differ in
one setting: the replay diagnosis is on in one (``policy.rollback.diagnose.enabled=true``:
before the rollback skips data it replays the steps from the good checkpoint twice, on
the same data and without the onset batches) and off in the other. Spike forensics (one
no-grad forward of the onset batch at a spike verdict) is on in both. Everything is read
back from the two run directories afterwards:

- the ``diagnosis`` event: its ``seconds``, ``replayed_steps`` and ``cause`` (a bad batch
  should be ``data``);
- each run's ``rollback`` event: ``seconds`` (decision to ready-to-train: with the
  diagnosis inside it in the one run) and their ratio, on / off;
- the mean training step time of each run (``yoto_step_duration_seconds`` in the metrics
  table), and the diagnosis' seconds in those steps; beside it the same in *local* steps:
  the median duration of the 10 rows (of both runs) written just before the rollback
  began and the 10 just after it ended, which follows a load that changed during the run;
- ``forensics.seconds`` of every spike event that carries forensics, both runs: mean,
  and in step times. Forensics is computed once per onset and every later spike event of
  the same onset carries that one result, so the count of distinct computations (and the
  seconds they took per spike event) is reported as well.

A data verdict leaves the rollback's plan as it was (``on_data=skip``), so both runs'
surviving branches train the same steps on the same data: their last losses are compared
(bit-equal on the CPU) to show the diagnosis left nothing behind.

The larger shape is ``wide`` of benchmarks/_common.py (8 layers, d_model 256, context
256, 8 sequences a step: about 5x the tiny preset's step time). Both shapes take about
7 minutes on 2 quiet cores (4 runs of ~120 steps plus 2 x 44 replayed steps); on a loaded
machine much longer, and a run's mean step time then carries the load's spikes (compare
its median, in the JSON, and the local step time).

    .venv/bin/python benchmarks/diagnosis.py [--shapes tiny,wide] [--repeats 1]
    .venv/bin/python benchmarks/diagnosis.py --quick    # tiny only, a shorter run

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from _common import SHAPES

from yoto import runstore
from yoto.config import load_config
from yoto.trainer import run

RUN = [  # tests/trainer/test_interventions.py's cadence, on the CPU
    "train.device=cpu",
    "data.max_bytes_per_source=2000000",
    "train.batch_warmup.start=null",
    "eval.every=0",
    "log.progress=false",
    "checkpoint.every=20",
    "checkpoint.keep_last=3",
    "probes.layers.every=1000",
    "probes.spectra.enabled=false",
    "policy.forensics.enabled=true",
]
VARIANTS = {
    "on": ["policy.rollback.diagnose.enabled=true"],
    "off": ["policy.rollback.diagnose=false"],
}
FULL = {"fault_step": 80, "steps": 100}  # checkpoint 60 is the newest 20 steps before 80
QUICK = {"fault_step": 50, "steps": 60}  # checkpoint 20 (40 is too close to the onset)
STEP_DURATION = "yoto_step_duration_seconds"
LOCAL_ROWS = 10  # rows each side of the rollback for the local step time


def train_side_by_side(shape: list[str], fault_step: int, steps: int, root: Path) -> dict:
    """The two variants' runs, stepped in turn; returns variant -> run directory."""
    trainers, stores = {}, {}
    for name, extra in VARIANTS.items():
        cfg = load_config(
            preset="tiny",
            overrides=[
                *RUN,
                *shape,
                *extra,
                f"train.steps={steps}",
                f"faults=[bad_batch@{fault_step}]",
            ],
        )
        trainers[name], stores[name] = run.make_trainer(cfg, root, f"diagnose-{name}")
    status = dict.fromkeys(trainers, "finished")
    try:
        for trainer in trainers.values():
            trainer._start_batch_schedule()
        turn = 0
        while True:  # the loop of Trainer.fit, one step of each run at a time
            live = [
                n for n, t in trainers.items() if t.branch.step < steps and not t.history.halted
            ]
            if not live:
                break
            for name in live if turn % 2 == 0 else reversed(live):
                trainer = trainers[name]
                trainer.step_once()
                if trainer.history.halted:
                    status[name] = "halted"
                    continue
                trainer._collect_checkpoints()
                every = trainer.cfg.checkpoint.every
                if every and trainer.branch.step % every == 0 and trainer.branch.step < steps:
                    trainer.save_checkpoint()
            turn += 1
        for trainer in trainers.values():
            trainer.finish_checkpoints()
    finally:
        for name, store in stores.items():
            store.close(status[name])
    return {name: store.path for name, store in stores.items()}


def events(path: Path, kind: str) -> list[dict]:
    return [e for e in runstore.read_events(path) if e["kind"] == kind]


def read_run(path: Path) -> dict:
    metrics = runstore.read_metrics(path).to_pydict()
    durations = [d for d in metrics.get(STEP_DURATION, []) if d is not None]
    last = max(
        range(len(metrics["step"])), key=lambda i: (metrics["attempt"][i], metrics["step"][i])
    )
    spikes = [e for e in events(path, "spike") if (e["data"] or {}).get("forensics")]
    # one computation per onset: the spike events of that onset carry the same result
    distinct = {
        (e["data"]["forensics"]["onset"], e["data"]["forensics"]["seconds"]) for e in spikes
    }
    return {
        "path": str(path),
        "rows_timed": list(zip(metrics["time"], metrics.get(STEP_DURATION, []), strict=True)),
        "step_seconds_mean": statistics.fmean(durations),
        "step_seconds_median": statistics.median(durations),
        "rows": len(durations),
        "last_step": metrics["step"][last],
        "last_loss": metrics["yoto_train_loss"][last],
        "rollbacks": events(path, "rollback"),
        "diagnoses": events(path, "diagnosis"),
        "forensics_seconds": [e["data"]["forensics"]["seconds"] for e in spikes],
        "forensics_distinct": [seconds for _, seconds in distinct],
        "spike_events": len(events(path, "spike")),
    }


def local_step_seconds(pair: dict, rollback: dict) -> float:
    """Median duration of the rows (both runs) written just before ``rollback`` began and
    just after it ended."""
    end = rollback["time"]
    start = end - rollback["data"]["seconds"]
    rows = sorted(r for run_ in pair.values() for r in run_["rows_timed"] if r[1] is not None)
    before = [d for t, d in rows if t < start][-LOCAL_ROWS:]
    after = [d for t, d in rows if t > end][:LOCAL_ROWS]
    return statistics.median(before + after)


def measure(shape: list[str], fault_step: int, steps: int, repeats: int) -> dict:
    pairs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="yoto-bench-diagnosis-") as root:
            paths = train_side_by_side(shape, fault_step, steps, Path(root))
            pairs.append({name: read_run(p) for name, p in paths.items()})
    on_rb = [r["data"]["seconds"] for p in pairs for r in p["on"]["rollbacks"]]
    off_rb = [r["data"]["seconds"] for p in pairs for r in p["off"]["rollbacks"]]
    diagnoses = [d["data"] for p in pairs for d in p["on"]["diagnoses"]]
    step_on = statistics.fmean(p["on"]["step_seconds_mean"] for p in pairs)
    step_off = statistics.fmean(p["off"]["step_seconds_mean"] for p in pairs)
    step = (step_on + step_off) / 2
    forensics = [s for p in pairs for run_ in p.values() for s in run_["forensics_seconds"]]
    local = [local_step_seconds(p, r) for p in pairs for r in p["on"]["rollbacks"]]
    distinct = [s for p in pairs for run_ in p.values() for s in run_["forensics_distinct"]]
    spike_events = sum(r["spike_events"] for p in pairs for r in p.values())
    diag_s = statistics.median(d["seconds"] for d in diagnoses) if diagnoses else None
    replayed = statistics.median(d["replayed_steps"] for d in diagnoses) if diagnoses else None
    return {
        "rollbacks_on": len(on_rb),
        "rollbacks_off": len(off_rb),
        "rollback_seconds_on": statistics.median(on_rb) if on_rb else None,
        "rollback_seconds_off": statistics.median(off_rb) if off_rb else None,
        "rollback_ratio_on_vs_off": (
            statistics.median(on_rb) / statistics.median(off_rb) if on_rb and off_rb else None
        ),
        "diagnoses": len(diagnoses),
        "diagnosis_seconds": diag_s,
        "replayed_steps": replayed,
        "diagnosis_in_steps": diag_s / step_on if diag_s is not None else None,
        "diagnosis_in_local_steps": (
            diag_s / statistics.median(local) if diag_s is not None and local else None
        ),
        "local_step_seconds": statistics.median(local) if local else None,
        "seconds_per_replayed_step": diag_s / replayed if diagnoses and replayed else None,
        "replayed_step_in_steps": diag_s / replayed / step_on if diagnoses and replayed else None,
        "causes": [d["cause"] for d in diagnoses],
        "findings": [d["finding"] for d in diagnoses],
        "checkpoint_steps": [d["checkpoint_step"] for d in diagnoses],
        "onsets": [d["onset"] for d in diagnoses],
        "step_seconds_on": step_on,
        "step_seconds_off": step_off,
        "step_seconds_median_on": statistics.median(p["on"]["step_seconds_median"] for p in pairs),
        "step_seconds_median_off": statistics.median(
            p["off"]["step_seconds_median"] for p in pairs
        ),
        "spike_events": spike_events,
        "spike_events_with_forensics": len(forensics),
        "forensics_seconds_mean": statistics.fmean(forensics) if forensics else None,
        "forensics_in_steps": statistics.fmean(forensics) / step if forensics else None,
        "forensics_computations": len(distinct),
        "forensics_seconds_per_spike_event_incurred": (
            sum(distinct) / len(forensics) if forensics else None
        ),
        "same_last_loss": all(p["on"]["last_loss"] == p["off"]["last_loss"] for p in pairs),
        "last_loss": [[p["on"]["last_loss"], p["off"]["last_loss"]] for p in pairs],
    }


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="tiny,wide", help=f"of {sorted(SHAPES)}")
    ap.add_argument("--repeats", type=int, default=1, help="pairs of runs per shape")
    ap.add_argument("--quick", action="store_true", help="reduced mode: tiny, a shorter run")
    args = ap.parse_args()
    size = QUICK if args.quick else FULL
    shapes = ["tiny"] if args.quick else args.shapes.split(",")
    mode = "reduced mode" if args.quick else "full size"
    print(
        f"diagnosis ({mode}): bad_batch@{size['fault_step']}, {size['steps']} steps, "
        f"checkpoint every 20, {args.repeats} pair(s) of runs per shape",
        flush=True,
    )
    report = {}
    load = {"load_average_before": os.getloadavg()[0]}
    for name in shapes:
        report[name] = measure(SHAPES[name], size["fault_step"], size["steps"], args.repeats)
    load["load_average_after"] = os.getloadavg()[0]
    print(
        f"{'shape':5s} {'step ms':>8s} {'diag s':>7s} {'replayed':>8s} {'diag/step':>9s} "
        f"{'/local':>6s} {'rb on s':>8s} {'rb off s':>8s} {'on/off':>7s} {'forens ms':>9s} "
        f"{'fo/step':>7s}  cause"
    )
    for name, r in report.items():
        print(
            f"{name:5s} {r['step_seconds_on'] * 1e3:8.1f} {fmt(r['diagnosis_seconds'], '7.2f')} "
            f"{fmt(r['replayed_steps'], '8.0f')} {fmt(r['diagnosis_in_steps'], '9.1f')} "
            f"{fmt(r['diagnosis_in_local_steps'], '6.1f')} "
            f"{fmt(r['rollback_seconds_on'], '8.2f')} {fmt(r['rollback_seconds_off'], '8.2f')} "
            f"{fmt(r['rollback_ratio_on_vs_off'], '7.1f')} "
            f"{fmt(ms(r['forensics_seconds_mean']), '9.1f')} "
            f"{fmt(r['forensics_in_steps'], '7.2f')}  {','.join(r['causes']) or '-'}"
        )
    for name, r in report.items():
        agree = "agree" if r["same_last_loss"] else "DIFFER"
        print(
            f"  {name}: {r['rollbacks_on']}/{r['rollbacks_off']} rollbacks (on/off); "
            f"{r['spike_events_with_forensics']}/{r['spike_events']} spike events with "
            f"forensics, {r['forensics_computations']} computed; a replayed step "
            f"{fmt(r['replayed_step_in_steps'], '.2f')} steps; local step "
            f"{fmt(ms(r['local_step_seconds']), '.0f')} ms; surviving branches {agree} "
            f"(last loss); {'; '.join(r['findings'])}"
        )
    print(
        f"load average (1 min) {load['load_average_before']:.1f} before, "
        f"{load['load_average_after']:.1f} after, on {os.cpu_count()} CPUs"
    )
    print(json.dumps({"mode": mode, **size, "repeats": args.repeats, **load, "shapes": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
