"""The live path end to end, with real servers on 127.0.0.1: a real ``yoto train`` with
an injected fault, scraped by a real Prometheus that evaluates the generated rules and
sends to a real Alertmanager, which delivers to a webhook receiver; the trainer's own
notifier delivers to a second receiver. Then every PromQL expression of every generated
dashboard panel and alert rule is run against what Prometheus recorded."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.helpers import FAST, only_run, subprocess_env, yoto_bin
from tests.integration import servers
from yoto import catalog, runstore
from yoto.alerts import alertmanager, rules

pytestmark = pytest.mark.slow

STEPS = 160
FAULT_STEP = 80
ARGS = [
    *(f"--set={item}" for item in FAST),
    "--set=checkpoint.every=20",
    f"--set=train.steps={STEPS}",
    "--set=eval.every=40",
    "--set=probes.layers.every=10",
    # a multiple of STEPS: the last step's analysis is awaited and handed in at the end
    "--set=probes.spectra.every=40",
    "--set=probes.spectra.min_evals=8",
    f"--inject=lr_spike@{FAULT_STEP}",
]

# Panels that are valid but draw nothing on this run, and why.
EMPTY_BECAUSE = {
    catalog.LOSS_SCALE.name: "fp16 only; this run trains in fp32",
    catalog.LOSS_SCALE_HEADROOM.name: "fp16 only",
    catalog.LOSS_SCALE_STEPS_SINCE_GROWTH.name: "fp16 only",
    catalog.CONSECUTIVE_OVERFLOWS.name: "fp16 only",
    catalog.MFU.name: "no dense peak is known for a CPU",
    'kind="halt"': "the run did not halt",
    'kind="lr_cooldown"': "the default policy makes no LR cooldown",
    catalog.BATCH_SIZE_CHANGES.name: "no batch warmup in this short run",
    catalog.PROBE_FAILURES.name: "no probe failed",
    catalog.ALERTS_FAILED.name: "no chat delivery failed",
    catalog.ALERTS_DROPPED.name: "no chat message was dropped",
    catalog.Z_LOSS.name: "z-loss is off (model.z_loss=0)",
    catalog.STEP_SKIPPED.name: "skip-step is off (optim.skip_step.enabled=false)",
    catalog.SKIPPED_STEPS.name: "skip-step is off: no update was skipped",
    catalog.EVAL_SCORE.name: "few-shot evaluation is off (eval.harness.every=0)",
    catalog.EVAL_SKIPPED.name: "few-shot evaluation is off (eval.harness.every=0)",
    catalog.RANK_PEAK_MEMORY.name: "CUDA only; this run trains on the CPU",
    catalog.CUDA_ALLOCATED.name: "CUDA only",
    catalog.CUDA_RESERVED.name: "CUDA only",
    catalog.CUDA_PEAK.name: "CUDA only",
    catalog.CUDA_ALLOC_RETRIES.name: "CUDA only",
    catalog.GPU_POWER.name: "NVML only (a GPU and nvidia-ml-py)",
    catalog.GPU_TEMPERATURE.name: "NVML only",
    catalog.GPU_UTILIZATION.name: "NVML only",
    catalog.GPU_SM_CLOCK.name: "NVML only",
}


def test_fault_to_prometheus_alertmanager_and_chat(tmp_path: Path) -> None:
    am_receiver = servers.Receiver().up()
    chat_receiver = servers.Receiver().up()
    am_config = alertmanager.build_config([alertmanager.Channel("webhook", url=am_receiver.url)])
    for route in (am_config["route"], *am_config["route"]["routes"]):
        route.update(group_wait="1s", group_interval="1s")
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(rules.render(interval="1s"))
    port = servers.free_port()
    env = subprocess_env()
    env["YOTO_NOTIFY_URLS"] = f"json://127.0.0.1:{chat_receiver.port}/hook"
    try:
        with (
            servers.alertmanager(tmp_path, yaml.safe_dump(am_config)) as am,
            servers.prometheus(tmp_path, [f"127.0.0.1:{port}"], rules_file, am) as prom,
        ):
            cmd = [
                yoto_bin(),
                "train",
                "--run-root",
                str(tmp_path / "runs"),
                "--name",
                "live",
                "--no-progress",
                f"--metrics-addr=127.0.0.1:{port}",
                "--set=notify.link=http://grafana.example/d/yoto-overview?var-run={run}",
                *ARGS,
            ]
            with open(tmp_path / "train.log", "wb") as log:
                proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
                try:
                    check_a_live_scrape(f"http://127.0.0.1:{port}/metrics", proc)
                    am_got = am_receiver.wait_for(1, timeout=600)
                    chat_got = chat_receiver.wait_for(1, timeout=60)
                    rc = proc.wait(timeout=600)
                finally:
                    if proc.poll() is None:
                        proc.kill()
            assert rc == 0, (tmp_path / "train.log").read_text()[-3000:]
            run = only_run(tmp_path / "runs")
            events = runstore.read_events(run)
            start = next(e for e in events if e["kind"] == "start")
            end = next(e for e in events if e["kind"] == "end")
            # + 10 s: the exporter serves the last row until Prometheus has scraped it
            check_expressions(prom, start["time"], end["time"] + 10)
            # the exporter waited for one more scrape: Prometheus knows the run ended
            ended = prom.query_range(catalog.RUN_ENDED.name, start["time"], end["time"] + 10)
            assert ended and max(float(v) for _, v in ended[0]["values"]) == 1
    finally:
        am_receiver.down()
        chat_receiver.down()

    fault = next(e for e in events if e["kind"] == "fault_injected")
    assert any(e["kind"] == "rollback" for e in events)
    alert_names = {
        a["labels"]["alertname"] for _, body in am_receiver.received for a in body["alerts"]
    }
    assert alert_names & {"YotoInstabilityEpisode", "YotoRollback"}, alert_names
    # the raw spike rules are info: shown in Prometheus, routed to no chat
    assert not alert_names & {"YotoLossSpike", "YotoGradNormSpike"}, alert_names
    first_alert = am_receiver.received[0][1]["alerts"][0]
    assert first_alert["labels"]["run"] == run.name  # joined from yoto_run_info
    chat_text = "\n".join(b["title"] + "\n" + b["message"] for _, b in chat_receiver.received)
    # the rollback is the episode's page, and names it
    assert run.name in chat_text and "what yoto did: rolled back to step" in chat_text
    assert re.search(r"episode \d+ from step", chat_text), chat_text
    assert f"var-run={run.name}" in chat_text
    manifest = runstore.read_manifest(run)
    assert manifest["metrics_url"] == f"http://127.0.0.1:{port}/metrics"
    assert manifest["notify_channels"] == ["json"]
    latency = {
        "alertmanager_seconds": round(am_got[0][0] - fault["time"], 2),
        "notifier_seconds": round(chat_got[0][0] - fault["time"], 2),
    }
    print("fault-to-webhook " + json.dumps(latency), file=sys.stderr)
    if os.environ.get("YOTO_LATENCY_OUT"):  # the benchmark reads it
        Path(os.environ["YOTO_LATENCY_OUT"]).write_text(json.dumps(latency))


def check_expressions(prom: servers.Prometheus, start: float, end: float) -> None:
    """Every alert rule's and dashboard panel's PromQL is valid (a query raises otherwise),
    the rules that should have fired did, and every panel draws something over the run
    unless EMPTY_BECAUSE says why it cannot."""
    for rule in rules.build_rules():
        prom.query_range(rule.expr, start, end)  # valid
    firing = prom.query_range('ALERTS{alertstate="firing"}', start, end + 5)
    fired = {series["metric"]["alertname"] for series in firing}
    assert {"YotoLossSpike", "YotoRollback", "YotoInstabilityEpisode"} <= fired, fired
    assert not fired & {"YotoRunHalted", "YotoMetricsAbsent", "YotoLossScaleAtMinimum"}, fired
    from yoto.dashboards.live import grafana

    empty: list[str] = []
    for name, dashboard in grafana.build_all().items():
        for expr in grafana.panel_queries(dashboard):
            if not prom.query_range(expr, start, end) and not any(
                key in expr for key in EMPTY_BECAUSE
            ):
                empty.append(f"{name}: {expr}")
    assert not empty, "panels with no data on a live run:\n" + "\n".join(empty)


def check_a_live_scrape(url: str, proc: subprocess.Popen) -> None:
    """Once the layer probes have reported, a scrape passes ``promtool check metrics``."""
    promtool = servers.require_binary("promtool")
    wanted = catalog.LAYER_GRAD_NORM.name + "{"
    deadline = time.monotonic() + 300
    text = ""
    while wanted not in text:
        assert proc.poll() is None and time.monotonic() < deadline, "no layer metrics served"
        time.sleep(0.5)
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
