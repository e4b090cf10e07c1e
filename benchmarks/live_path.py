"""The live path's costs (issue 6):

1. scrape time and size of ``/metrics`` for the tiny preset and a 96-layer model at the
   default per-layer cap (targets: <= 20 ms, <= 150 KiB), on the series a real run
   exports: a real DeepSpeed trainer takes steps with every probe on (layer statistics and
   spectra included) and the exporter serves what it wrote;
2. ``notify()``'s cost on the training thread with the chat endpoint dead vs alive (it
   must not slow training);
3. end-to-end seconds from an injected fault to a webhook receiving it through each path
   (Prometheus -> Alertmanager -> webhook, and the trainer's own notifier), by running
   tests/integration/test_live_stack.py, which uses real servers with 1 s timing;
4. the same with the timing deploy/ ships (15 s scrape and rule evaluation, Alertmanager's
   30 s group_wait for warnings), which is what a user of the compose stack waits.

    .venv/bin/python benchmarks/live_path.py            # all four
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
from yoto.dashboards.live.localstack import Receiver  # noqa: E402

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
RUN = [  # the end-to-end run: small and on the CPU, checkpoints and eval off unless set
    "train.device=cpu",
    "data.max_bytes_per_source=2000000",
    "train.batch_warmup.start=null",
    "eval.every=0",
    "log.progress=false",
]
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


def end_to_end_shipped_timing() -> dict:
    """Real servers with deploy/'s timing; the run is stopped (SIGTERM) once both webhooks
    have the fault, since an alert resolves when its target is gone."""
    from yoto import runstore
    from yoto.alerts import alertmanager, rules
    from yoto.dashboards.live import localstack as servers
    from yoto.trainer.distributed import child_env

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        am_receiver, chat_receiver = servers.Receiver().up(), servers.Receiver().up()
        hook = alertmanager.Channel("webhook", url=am_receiver.url)
        am_config = alertmanager.build_config([hook])
        rules_file = tmp / "rules.yml"
        rules_file.write_text(rules.render())  # deploy/'s 15 s evaluation
        port = servers.free_port()
        env = {**child_env(), "YOTO_NOTIFY_URLS": f"json://127.0.0.1:{chat_receiver.port}/"}
        cmd = [
            str(Path(sys.executable).with_name("yoto")),
            "train",
            "--run-root",
            str(tmp / "runs"),
            "--no-progress",
            f"--metrics-addr=127.0.0.1:{port}",
            *(f"--set={item}" for item in RUN),
            "--set=checkpoint.every=20",
            "--set=train.steps=100000",
            "--inject=lr_spike@80",
        ]
        try:
            with (
                servers.alertmanager(tmp, json.dumps(am_config)) as am,
                servers.prometheus(tmp, [f"127.0.0.1:{port}"], rules_file, am, "15s"),
                open(tmp / "train.log", "wb") as log,
            ):
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
                try:
                    am_got = am_receiver.wait_for(1, timeout=300)
                    chat_got = chat_receiver.wait_for(1, timeout=10)
                finally:
                    proc.terminate()
                    proc.wait(timeout=120)
            if not am_got or not chat_got:
                return {"error": (tmp / "train.log").read_text()[-2000:]}
            [run] = runstore.find_runs([tmp / "runs"])
            events = runstore.read_events(run)
            fault = next(e for e in events if e["kind"] == "fault_injected")
            alerts = sorted({a["labels"]["alertname"] for a in am_got[0][1]["alerts"]})
            return {
                "alertmanager_seconds": round(am_got[0][0] - fault["time"], 1),
                "first_alerts": alerts,
                "notifier_seconds": round(chat_got[0][0] - fault["time"], 2),
            }
        finally:
            am_receiver.down()
            chat_receiver.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, no end-to-end run")
    parser.add_argument(
        "--shipped-timing-only", action="store_true", help="only 4: deploy/'s timing end to end"
    )
    args = parser.parse_args()
    if args.shipped_timing_only:
        print(json.dumps(end_to_end_shipped_timing(), indent=2))
        return
    shapes = {"tiny": SHAPES["tiny"]} if args.quick else SHAPES
    results = [
        scrape_cost(name, overrides, 20 if args.quick else 100, 5 if args.quick else 180)
        for name, overrides in shapes.items()
    ]
    report = {"scrape": results, **notify_cost(50 if args.quick else 1000)}
    if not args.quick:
        report["fault_to_webhook"] = end_to_end()
        report["fault_to_webhook_shipped_timing"] = end_to_end_shipped_timing()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
