"""Post-mortem explorer on a long run: time to first render and points sent per chart.

Builds a synthetic run directory in the run store's format (written with pyarrow
directly): 10 million steps of wide metrics with a rollback at 60% (so an abandoned
branch is drawn), eval every 1,000 steps, and 96 layers x 100k recorded steps of layer
statistics (4 metrics, long table), plus events (a spike, its alert, the rollback,
checkpoints). Then, with ``streamlit.testing.v1.AppTest`` on this machine, it measures
the time to first render of Timeline and Layers (cold: empty cache; warm: a rerun), and
counts the points each chart sends (Arrow datasets in the chart protos).
Targets: <= 2 s to first render, <= 5,000 points per series.

    .venv/bin/python benchmarks/explorer_load.py            # full size (~2 GB on disk)
    .venv/bin/python benchmarks/explorer_load.py --quick    # reduced sizes, for tests
    .venv/bin/python benchmarks/explorer_load.py --dir /tmp/big --keep   # reuse the run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from yoto import catalog, runstore

FULL = {"steps": 10_000_000, "layers": 96, "layer_steps": 100_000, "segment": 500_000}
QUICK = {"steps": 200_000, "layers": 16, "layer_steps": 2_000, "segment": 50_000}
LAYER_METRICS = (
    catalog.LAYER_GRAD_NORM.name,
    catalog.LAYER_UPDATE_RATIO.name,
    catalog.ATTENTION_LOGIT_MAX.name,
    catalog.ATTENTION_ENTROPY.name,
)
SEQ = 2048
BATCH_TOKENS = 1024 * SEQ
APP = Path(__file__).resolve().parents[1] / "dashboards" / "postmortem" / "app.py"


def plan(steps: int) -> dict[str, int]:
    """Attempt 0 runs to ``end0``; the spike starts at ``onset``; attempt 1 restarts from
    the checkpoint at ``resume`` and runs to the end."""
    end0 = int(steps * 0.6)
    onset = end0 - 5
    resume = max(1, onset - max(1_000, steps // 1000))
    return {"end0": end0, "onset": onset, "resume": resume, "steps": steps}


def write_metrics(run: Path, steps: int, segment: int, rng: np.random.Generator) -> int:
    p = plan(steps)
    rows = 0
    for attempt, first, last in ((0, 1, p["end0"]), (1, p["resume"] + 1, steps)):
        for lo in range(first, last + 1, segment):
            hi = min(last, lo + segment - 1)
            step = np.arange(lo, hi + 1, dtype=np.int64)
            n = step.size
            loss = 2.0 + 3.5 / np.sqrt(1 + step / 2_000) + rng.normal(0, 0.03, n)
            gnorm = 0.3 + 0.05 * rng.standard_normal(n) ** 2
            if attempt == 0:  # the spike the rollback answered
                hit = step >= p["onset"]
                loss[hit] += 4.0
                gnorm[hit] *= 40
            val = np.where(step % 1000 == 0, loss + 0.05, np.nan)
            dur = 0.5 + rng.gamma(2.0, 0.01, n)
            cols = {
                "attempt": pa.array(np.full(n, attempt, np.int32)),
                "step": pa.array(step),
                "time": pa.array(1.8e9 + step * 0.5),
                catalog.TRAIN_LOSS.name: loss,
                catalog.GRAD_NORM.name: gnorm,
                catalog.LEARNING_RATE.name: np.full(n, 3e-4),
                catalog.BATCH_SIZE_TOKENS.name: np.full(n, float(BATCH_TOKENS)),
                catalog.STEPS.name: step.astype(np.float64),
                catalog.TOKENS.name: step * float(BATCH_TOKENS),
                catalog.ATTEMPT.name: np.full(n, float(attempt)),
                catalog.STEP_DURATION.name: dur,
                catalog.THROUGHPUT.name: BATCH_TOKENS / dur,
                catalog.MFU.name: 0.4 * 0.5 / dur,
                catalog.OVERFLOW_STEPS.name: np.floor(step / 250_000),
                catalog.GRADIENT_NOISE_SCALE.name: 200 + step / 20_000 + rng.normal(0, 5, n),
                catalog.SPIKE_SCORE.name: np.zeros(n),
                catalog.VAL_LOSS.key(source="code"): val,
                catalog.VAL_LOSS.key(source="prose"): val + 0.1,
            }
            table = pa.table({k: pa.array(v) for k, v in cols.items()})
            stem = f"part-a{attempt:04d}-s{lo:010d}-{hi:010d}"
            pq.write_table(
                table, run / runstore.METRICS / f"{stem}.parquet", row_group_size=1 << 17
            )
            rows += n
    return rows


def write_layers(
    run: Path, steps: int, n_layers: int, layer_steps: int, rng: np.random.Generator
) -> int:
    """Long rows in the writer's order (step, then layer, then metric); layer 37 (or the
    middle one) jumps one recorded step before the spike."""
    p = plan(steps)
    every = max(1, steps // layer_steps)
    culprit = 37 if n_layers > 37 else n_layers // 2
    names = pa.array([str(i) for i in range(n_layers)])
    metrics = pa.array(list(LAYER_METRICS))
    per_segment = max(1, 2_000_000 // (n_layers * len(LAYER_METRICS)))
    rows = 0
    for attempt, first, last in ((0, every, p["end0"]), (1, p["resume"] + every, steps)):
        recorded = np.arange(first - first % every, last + 1, every, dtype=np.int64)
        recorded = recorded[recorded >= first]
        before = recorded[recorded < p["onset"]]
        last_before = int(before[-1]) if attempt == 0 and before.size else -1
        for i in range(0, recorded.size, per_segment):
            st = recorded[i : i + per_segment]
            k, L, M = st.size, n_layers, len(LAYER_METRICS)
            step = np.repeat(st, L * M)
            layer = np.tile(np.repeat(np.arange(L, dtype=np.int32), M), k)
            metric = np.tile(np.arange(M, dtype=np.int32), k * L)
            base = np.array([0.05, 1e-3, 8.0, 2.5])[metric] * (1 + 0.2 * layer / L)
            value = base * np.exp(rng.normal(0, 0.05, step.size))
            if attempt == 0:
                value[(step == last_before) & (layer == culprit) & (metric == 0)] *= 30
                value[(step >= p["onset"]) & (metric == 0)] *= 20
            table = pa.table(
                {
                    "attempt": pa.array(np.full(step.size, attempt, np.int32)),
                    "step": pa.array(step),
                    "layer": pa.DictionaryArray.from_arrays(pa.array(layer), names),
                    "metric": pa.DictionaryArray.from_arrays(pa.array(metric), metrics),
                    "value": pa.array(value),
                }
            )
            stem = f"part-a{attempt:04d}-s{st[0]:010d}-{st[-1]:010d}"
            pq.write_table(table, run / runstore.LAYERS / f"{stem}.parquet", row_group_size=1 << 20)
            rows += step.size
    return rows


def write_events(run: Path, steps: int) -> int:
    p = plan(steps)
    ev = [(0, 0, "start", "info", "training on 1024 rank(s)", {})]
    ev += [
        (s, 0 if s <= p["end0"] else 1, "checkpoint", "info", f"checkpoint step-{s} complete", {})
        for s in range(10_000, steps + 1, 10_000)
    ]
    ev += [
        (p["onset"], 0, "spike", "warning", f"loss spike from step {p['onset']}",
         {"onset": p["onset"], "series": "loss"}),
        (p["onset"], 0, "alert", "warning", "spike: action alert", {"onset": p["onset"]}),
        (p["end0"], 1, "rollback", "warning", f"rolled back to step-{p['resume']}",
         {"from_step": p["end0"], "to_step": p["resume"], "attempt": 1}),
        (1_000, 0, "batch_size", "info", "global batch 512 -> 1024 sequences", {"new": 1024}),
    ]  # fmt: skip
    ev.sort(key=lambda e: (e[0], e[1]))
    with open(run / runstore.EVENTS, "w") as f:
        for step, attempt, kind, sev, msg, data in ev:
            rec = {"time": 1.8e9 + step * 0.5, "step": step, "attempt": attempt, "kind": kind}
            f.write(json.dumps({**rec, "severity": sev, "message": msg, "data": data}) + "\n")
    return len(ev)


def build(root: Path, steps: int, layers: int, layer_steps: int, segment: int) -> Path:
    run = root / "synthetic-long"
    if run.exists():
        shutil.rmtree(run)
    for folder in (runstore.METRICS, runstore.LAYERS):
        (run / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    metric_rows = write_metrics(run, steps, segment, rng)
    layer_rows = write_layers(run, steps, layers, layer_steps, rng)
    events = write_events(run, steps)
    manifest = {
        "id": run.name, "name": "synthetic-long", "status": "finished", "start": 1.8e9,
        "end": 1.8e9 + steps * 0.5, "non_embedding_parameters": 7e9,
        "summary": {"attempt": 1, "last_step": steps, catalog.TOKENS.name: steps * BATCH_TOKENS,
                    "val_loss": {"code": 2.1, "prose": 2.2},
                    "best_val_loss": {"code": 2.1, "prose": 2.2}},
    }  # fmt: skip
    runstore.atomic_write_json(run / runstore.MANIFEST, manifest)
    (run / runstore.CONFIG).write_text(f"model:\n  seq_len: {SEQ}\n")
    size = sum(f.stat().st_size for f in run.rglob("*") if f.is_file())
    print(
        json.dumps(
            {
                "built_seconds": round(time.perf_counter() - t0, 1),
                "metric_rows": metric_rows,
                "layer_rows": layer_rows,
                "events": events,
                "bytes": size,
            }
        ),
        flush=True,
    )
    return run


def measure(run: Path, pages: list[str], timeout: float) -> dict[str, dict]:
    os.environ["YOTO_RUNS"] = str(run)
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from yoto.dashboards.postmortem import wire

    at = AppTest.from_file(str(APP), default_timeout=timeout)
    at.run()  # the Runs page: imports and the sidebar, outside the timings
    out = {}
    for page in pages:
        st.cache_data.clear()
        timings = []
        for _ in range(2):  # cold (empty cache), then warm
            t = time.perf_counter()
            at.switch_page(f"views/{page}.py").run()
            timings.append(time.perf_counter() - t)
        problems = [e.value for e in at.exception] + [e.value for e in at.error]
        charts = [wire.points(c.proto) for c in at.get("vega_lite_chart")]
        out[page] = {
            "first_render_seconds": round(timings[0], 3),
            "rerun_seconds": round(timings[1], 3),
            "charts": len(charts),
            "points_per_chart": [total for total, _ in charts],
            "max_points_per_series": max((s for _, s in charts), default=0),
            "problems": [str(p)[:300] for p in problems],
        }
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced sizes (tests, slow machines)")
    ap.add_argument("--dir", help="where to build the run (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep (and reuse) the built run")
    args = ap.parse_args()
    size = QUICK if args.quick else FULL
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="yoto-explorer-"))
    root.mkdir(parents=True, exist_ok=True)
    run = root / "synthetic-long"
    try:
        if not (args.keep and (run / runstore.MANIFEST).is_file()):
            run = build(root, **size)
        mode = "reduced mode" if args.quick else "full size"
        print(f"explorer_load ({mode}): {json.dumps(size)}", flush=True)
        result = measure(run, ["timeline", "layers"], timeout=600)
        print(json.dumps(result, indent=2))
        ok = all(
            r["first_render_seconds"] <= 2.0 and r["max_points_per_series"] <= 5000
            for r in result.values()
        )
        broken = any(r["problems"] or not r["charts"] for r in result.values())
        print(("PASS" if ok else "MISSED TARGET") + " (targets: <= 2 s, <= 5,000 points/series)")
        return 1 if broken else 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
