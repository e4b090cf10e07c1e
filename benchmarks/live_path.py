"""The live path's costs (issue 6):

1. scrape time and size of ``/metrics`` for the tiny preset and a 96-layer model at the
   default per-layer cap (targets: <= 20 ms, <= 150 KiB), on the series a real run
   exports: a real DeepSpeed trainer takes steps with every probe on (layer statistics and
   spectra included) and the exporter serves what it wrote;
2. ``notify()``'s cost on the training thread with the chat endpoint dead vs alive (it
   must not slow training);
3. end-to-end seconds from an injected fault to a webhook receiving it through each path
   (Prometheus -> Alertmanager -> webhook, and the trainer's own notifier), by running
   tests/integration/test_live_stack.py, which uses real servers.

    .venv/bin/python benchmarks/live_path.py            # all three
    .venv/bin/python benchmarks/live_path.py --quick    # 1 and 2 on small shapes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import make_trainer  # noqa: E402
from yoto import catalog  # noqa: E402
from yoto.dashboards.live.exporter import Exporter, parse_addr  # noqa: E402

SHAPES = {
    "tiny": [],
    "deep96": [
        "model.n_layer=96",
        "model.d_model=64",
        "model.n_head=4",
        "model.seq_len=64",
        "train.micro_batch_size=2",
        "train.global_batch_size=2",
    ],
}
PROBES = ["probes.layers.every=2", "probes.spectra.every=4", "probes.spectra.min_evals=8"]


def scrape_cost(shape: str, overrides: list[str], scrapes: int, wait_spectra: float) -> dict:
    trainer = make_trainer("tiny", [*overrides, *PROBES])
    exporter = Exporter("tiny")
    exporter.serve(parse_addr("127.0.0.1:0"))
    exporter.bind_run({"run": "bench", "name": shape})
    trainer.sinks.live.append(exporter)
    alpha = catalog.WEIGHT_ALPHA.name
    deadline = time.monotonic() + wait_spectra
    steps = 0
    while True:  # until the spectra worker has handed in a layer's alpha
        trainer.step_once()
        steps += 1
        have = any(k.startswith(alpha + "{") for k in exporter._last)
        if steps >= 6 and (have or time.monotonic() > deadline):
            break
    times, size = [], 0
    url = exporter.url()
    for _ in range(scrapes):
        start = time.perf_counter()
        with urllib.request.urlopen(url) as r:
            body = r.read()
        times.append(time.perf_counter() - start)
        size = len(body)
    text = body.decode()
    series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    layer_series = sum(1 for line in text.splitlines() if 'layer="' in line and line[0] != "#")
    exporter.close("finished")
    trainer.runner.detach()
    return {
        "shape": shape,
        "steps": steps,
        "spectra_exported": any(line.startswith(alpha + "{") for line in text.splitlines()),
        "series": series,
        "layer_series": layer_series,
        "bytes": size,
        "kib": round(size / 1024, 1),
        "scrape_ms_median": round(1000 * statistics.median(times), 2),
        "scrape_ms_p90": round(1000 * sorted(times)[int(0.9 * len(times))], 2),
    }


def notify_cost(calls: int) -> dict:
    from tests.integration.servers import Receiver
    from yoto.alerts.notifier import ChatNotifier
    from yoto.config import NotifyConfig
    from yoto.events import Event, EventKind, Severity

    out = {}
    for state in ("dead", "alive"):
        receiver = Receiver()
        if state == "alive":
            receiver.up()
        cfg = NotifyConfig(queue_size=calls + 1, rate_limit_burst=calls + 1, dedup_seconds=0)
        notifier = ChatNotifier([f"json://127.0.0.1:{receiver.port}/hook"], cfg, {"run": "b"})
        events = [
            Event(i, 0, EventKind.ALERT, Severity.WARNING, f"spike {i}", {"onset": i})
            for i in range(calls)
        ]
        start = time.perf_counter()
        for event in events:
            notifier.notify(event)
        per_call = (time.perf_counter() - start) / calls
        notifier.close(timeout=0.5 if state == "dead" else 30)
        receiver.down()
        out[f"notify_us_per_call_endpoint_{state}"] = round(1e6 * per_call, 1)
    return out


def end_to_end() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "latency.json"
        env = {**os.environ, "YOTO_LATENCY_OUT": str(path)}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/integration/test_live_stack.py",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not path.exists():
            return {"error": proc.stdout[-2000:]}
        return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, no end-to-end run")
    args = parser.parse_args()
    shapes = {"tiny": SHAPES["tiny"]} if args.quick else SHAPES
    results = [
        scrape_cost(name, overrides, 20 if args.quick else 100, 5 if args.quick else 180)
        for name, overrides in shapes.items()
    ]
    report = {"scrape": results, **notify_cost(50 if args.quick else 1000)}
    if not args.quick:
        report["fault_to_webhook"] = end_to_end()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
