"""Every alert rule fires on the series it is meant for and stays quiet otherwise, run
through ``promtool test rules``; the generated deploy files match the code and pass
Prometheus' and Alertmanager's own checks."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT
from tests.integration.servers import require_binary
from yoto import catalog as m
from yoto.alerts import alertmanager, rules

TARGET = {"instance": "node1:9477", "job": m.SCRAPE_JOB}
RUN = {"run": "20261128-demo-ab12", "name": "demo", "preset": "tiny"}


def series(of: m.Metric | str, values: str, **labels: str) -> dict:
    name = of if isinstance(of, str) else of.name
    inner = ",".join(f'{k}="{v}"' for k, v in {**TARGET, **labels}.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


INFO = series(m.RUN_INFO, "1x200", **RUN)
SCORE = {"task": "stdlib_next_line", "metric": "acc"}  # labels of a few-shot score
# rule -> (series that make it fire, series that keep it quiet, extra labels of the alert,
#          minutes after which it is evaluated)
CASES: dict[str, tuple[list[dict], list[dict], dict[str, str], int]] = {
    "YotoInstabilityEpisode": (
        [series(m.PAGED_EPISODES, "0 0 1 1"), INFO],
        [series(m.PAGED_EPISODES, "1x30"), INFO],  # paged long ago only
        {},
        3,
    ),
    "YotoLossSpike": (
        [series(m.LOSS_SPIKES, "0 0 0 1 1"), INFO],
        [series(m.LOSS_SPIKES, "2x5"), INFO],  # old spikes only
        {},
        4,
    ),
    "YotoGradNormSpike": (
        [series(m.GRAD_NORM_SPIKES, "0 0 0 1 1"), INFO],
        [series(m.GRAD_NORM_SPIKES, "2x5"), INFO],  # old spikes only
        {},
        4,
    ),
    "YotoNonFiniteLoss": (
        [series(m.NONFINITE_LOSS_STEPS, "0 0 1"), series(m.TRAIN_LOSS_WINDOW_MAX, "3 3 3"), INFO],
        [series(m.NONFINITE_LOSS_STEPS, "0x3"), series(m.TRAIN_LOSS_WINDOW_MAX, "3x3"), INFO],
        {},
        2,
    ),
    "YotoOverflowStorm": (
        [series(m.OVERFLOW_STEPS, "0+10x5"), series(m.CONSECUTIVE_OVERFLOWS, "0x5"), INFO],
        [series(m.OVERFLOW_STEPS, "0+1x5"), series(m.CONSECUTIVE_OVERFLOWS, "0 1 0 1 0 1"), INFO],
        {},
        4,
    ),
    "YotoLossScaleAtMinimum": (
        [series(m.LOSS_SCALE_HEADROOM, "5 3 0 0 0"), INFO],
        [series(m.LOSS_SCALE_HEADROOM, "5 3 1 2 3"), INFO],
        {},
        4,
    ),
    "YotoRollback": (
        [series(m.ROLLBACKS, "0 0 1 1"), INFO],
        [series(m.ROLLBACKS, "0x30"), INFO],
        {},
        3,
    ),
    "YotoRunHalted": (
        [series(m.HALTED, "0 0 1"), INFO],
        [series(m.HALTED, "0 0 0"), INFO],
        {},
        2,
    ),
    "YotoThroughputDrop": (
        [series(m.THROUGHPUT, "1000x70 300x30"), INFO],
        [series(m.THROUGHPUT, "1000x70 900x30"), INFO],
        {},
        95,
    ),
    "YotoRunStalled": (
        # the step timestamp stops at t=60 s while scrapes go on
        [series(m.LAST_STEP_TIME, "60x40"), INFO],
        [series(m.LAST_STEP_TIME, "60+60x40"), INFO],
        {},
        30,
    ),
    "YotoMetricsAbsent": (
        # a crash: the run never said it ended
        [series("up", "1 1 0 0 0 0 0 0 0 0"), series(m.RUN_ENDED, "0 0")],
        # a finished run's last scrape said so; its target going down pages nobody
        [series("up", "1 1 0 0 0 0 0 0 0 0"), series(m.RUN_ENDED, "0 1")],
        {},
        9,
    ),
    "YotoFewShotScoreFell": (
        [series(m.EVAL_SCORE, "0.5 0.5 0.4 0.4", **SCORE), INFO],
        [series(m.EVAL_SCORE, "0.5 0.5 0.48 0.48", **SCORE), INFO],
        SCORE,
        3,
    ),
    "YotoStragglerRank": (
        # rank 1 at 1.5x the median, and the trainer flagged it
        [
            series(m.RANK_STEP, "0.1x10", rank="0"),
            series(m.RANK_STEP, "0.3x10", rank="1"),
            series(m.RANK_MEDIAN_STEP, "0.2x10"),
            series(m.STRAGGLERS, "1x10"),
            INFO,
        ],
        # as slow, but not for long enough to be flagged (yoto_stragglers 0)
        [
            series(m.RANK_STEP, "0.1x10", rank="0"),
            series(m.RANK_STEP, "0.3x10", rank="1"),
            series(m.RANK_MEDIAN_STEP, "0.2x10"),
            series(m.STRAGGLERS, "0x10"),
            INFO,
        ],
        {"rank": "1"},
        5,
    ),
    "YotoSpectraOutOfBand": (
        [series(m.EVENTS, "0 0 1 1", kind="spectra", severity="warning"), INFO],
        [series(m.EVENTS, "0 0 1 1", kind="spectra", severity="info"), INFO],
        {"kind": "spectra", "severity": "warning"},
        3,
    ),
}


def expected(rule: rules.Rule, extra: dict[str, str], joined: bool) -> dict:
    labels = {**TARGET, **extra, "severity": rule.severity, "team": "training"}
    if joined:
        labels.update({"run": RUN["run"], "name": RUN["name"]})
    subst = {"{{ $labels.name }}": RUN["name"], "{{ $labels.instance }}": TARGET["instance"]}
    subst.update({f"{{{{ $labels.{k} }}}}": v for k, v in extra.items()})

    def fill(text: str) -> str:
        for k, v in subst.items():
            text = text.replace(k, v)
        return text

    annotations = {"summary": fill(rule.summary), "description": fill(rule.description)}
    return {"exp_labels": labels, "exp_annotations": annotations}


def test_every_rule_has_a_firing_and_a_quiet_case() -> None:
    assert sorted(CASES) == sorted(r.alert for r in rules.build_rules())


def test_promtool_test_rules(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(rules.render())
    tests = []
    for rule in rules.build_rules():
        firing, quiet, extra, minutes = CASES[rule.alert]
        joined = m.RUN_INFO.name in rule.expr
        for inputs, alerts in ((firing, [expected(rule, extra, joined)]), (quiet, [])):
            tests.append(
                {
                    "name": f"{rule.alert} {'fires' if alerts else 'stays quiet'}",
                    "interval": "1m",
                    "input_series": inputs,
                    "alert_rule_test": [
                        {"eval_time": f"{minutes}m", "alertname": rule.alert, "exp_alerts": alerts}
                    ],
                }
            )
    test_file = tmp_path / "test.yml"
    test_file.write_text(
        yaml.safe_dump(
            {"rule_files": [str(rules_file)], "evaluation_interval": "1m", "tests": tests}
        )
    )
    out = subprocess.run(
        [promtool, "test", "rules", str(test_file)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_rules_read_only_catalog_metrics() -> None:
    for rule in rules.build_rules():
        used = set(re.findall(r"\byoto_[a-z0-9_]+", rule.expr))
        assert used <= set(m.CATALOG), used - set(m.CATALOG)
        assert used == {metric.name for metric in rule.metrics}, rule.alert


@pytest.mark.parametrize(
    ("path", "text"),
    [
        (rules.RULES_FILE, rules.render),
        (alertmanager.CONFIG_FILE, alertmanager.render),
    ],
)
def test_deploy_files_match_the_code(path: Path, text) -> None:
    assert (ROOT / path).read_text() == text(), (
        f"{path} is out of date with the code; run: yoto alerts build"
    )


def test_deploy_files_pass_promtool_and_amtool() -> None:
    promtool = require_binary("promtool")
    amtool = require_binary("amtool")
    out = subprocess.run(
        [promtool, "check", "rules", str(ROOT / rules.RULES_FILE)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(
        [amtool, "check-config", str(ROOT / alertmanager.CONFIG_FILE)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        # a raw spike is shown in Prometheus and Grafana, never sent: no page for an outlier
        (["severity=info", "alertname=YotoLossSpike"], alertmanager.SILENT),
        (["severity=info", "alertname=YotoGradNormSpike"], alertmanager.SILENT),
        # the episode is what pages
        (["severity=warning", "alertname=YotoInstabilityEpisode"], "training-chat"),
        (["severity=critical", "alertname=YotoRunHalted"], "training-chat"),
    ],
)
def test_info_alerts_reach_no_chat_and_episodes_do(labels: list[str], receiver: str) -> None:
    amtool = require_binary("amtool")
    config = ROOT / alertmanager.CONFIG_FILE
    out = subprocess.run(
        [amtool, "config", "routes", "test", f"--config.file={config}", *labels],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.split() == [receiver]
    silent = next(
        r
        for r in alertmanager.build_config(alertmanager.deploy_channels())["receivers"]
        if r["name"] == alertmanager.SILENT
    )
    assert silent == {"name": alertmanager.SILENT}  # no notification configs at all


def test_the_spike_rules_are_info_and_the_episode_rule_pages() -> None:
    by_name = {r.alert: r for r in rules.build_rules()}
    assert by_name["YotoLossSpike"].severity == by_name["YotoGradNormSpike"].severity == "info"
    assert by_name["YotoInstabilityEpisode"].severity == "warning"
    assert by_name["YotoInstabilityEpisode"].metrics[0] == m.PAGED_EPISODES
