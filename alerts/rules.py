"""Prometheus alerting rules as code.

Each rule is written once here from the catalog's metric constants and rendered to
``deploy/prometheus/rules/yoto-rules.yml`` (checked in; ``yoto alerts build`` regenerates
it and a test fails when the file drifts). ``tests/alerts`` gives every rule a firing and
a quiet case and runs them through ``promtool test rules``.

Rules that concern one run carry its name: they are joined with ``yoto_run_info`` on the
target (``instance``, ``job``), so the chat message Alertmanager sends says which run.
Thresholds follow the probes' defaults (config.py); a team that changes a probe's band
regenerates the rules with ``yoto alerts build --config FILE``.

One instability, one page: the raw per-series spike rules (``YotoLossSpike``,
``YotoGradNormSpike``) are ``info``, visible in Prometheus and Grafana but routed to no
receiver (alerts/alertmanager.py), so an isolated outlier pages nobody; what pages is
``YotoInstabilityEpisode``, on the trainer's count of paged episodes
(trainer/episodes.py), which stays one firing alert per run while episodes keep coming.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from yoto import catalog
from yoto.config import Config
from yoto.events import EventKind, Severity

RULES_FILE = Path("deploy/prometheus/rules/yoto-rules.yml")
GROUP = "yoto-training"


@dataclass(frozen=True, slots=True)
class Rule:
    alert: str
    expr: str
    severity: str  # info (shown, never sent) | warning | critical: Alertmanager routes on it
    summary: str
    description: str
    for_: str = "0s"
    metrics: tuple[catalog.Metric, ...] = field(default=())  # what the rule reads

    def to_yaml(self) -> dict:
        rule = {"alert": self.alert, "expr": self.expr}
        if self.for_ != "0s":
            rule["for"] = self.for_
        rule["labels"] = {"severity": self.severity, "team": "training"}
        rule["annotations"] = {"summary": self.summary, "description": self.description}
        return rule


def _per_run(expr: str) -> str:
    """``expr`` with the run's labels joined on from ``yoto_run_info``."""
    return f"({expr})\n* on (instance, job) group_left (run, name) {catalog.RUN_INFO.name}"


def build_rules(cfg: Config | None = None) -> list[Rule]:
    cfg = cfg or Config()
    m = catalog
    spectra = cfg.probes.spectra
    system = cfg.probes.system
    where = "run {{ $labels.name }} ({{ $labels.instance }})"
    higher = f'{m.EVAL_SCORE.name}{{metric=~"acc|acc_norm|exact_match"}}'  # higher is better
    lower = f'{m.EVAL_SCORE.name}{{metric=~"perplexity|word_perplexity"}}'
    return [
        Rule(
            "YotoInstabilityEpisode",
            _per_run(f"increase({m.PAGED_EPISODES.name}[15m]) > 0"),
            "warning",
            "Training instability in " + where,
            "The policy confirmed an instability episode (spikes on several steps, a "
            "critical one, or a rollback or halt): one alert per run while episodes keep "
            "coming, not one per rule or step. The run's alert, rollback and episode events "
            "say its onset, the rules that fired and the peaks; see the Stability dashboard.",
            metrics=(m.PAGED_EPISODES, m.RUN_INFO),
        ),
        Rule(
            "YotoLossSpike",
            _per_run(f"increase({m.LOSS_SPIKES.name}[5m]) > 0"),
            "info",
            "Loss spike in " + where,
            "Loss spike(s) in the last 5 minutes: shown, not sent (an isolated outlier "
            "pages nobody; YotoInstabilityEpisode pages when the policy confirms an "
            "episode). See the run's events (yoto runs show) and the Stability dashboard.",
            metrics=(m.LOSS_SPIKES, m.RUN_INFO),
        ),
        Rule(
            "YotoGradNormSpike",
            _per_run(f"increase({m.GRAD_NORM_SPIKES.name}[5m]) > 0"),
            "info",
            "Grad-norm spike in " + where,
            "Global grad-norm spike(s) in the last 5 minutes: shown, not sent (an isolated "
            "outlier pages nobody; YotoInstabilityEpisode pages when the policy confirms an "
            "episode). A grad-norm spike often leads a loss spike by a step or two.",
            metrics=(m.GRAD_NORM_SPIKES, m.RUN_INFO),
        ),
        Rule(
            "YotoNonFiniteLoss",
            _per_run(
                f"increase({m.NONFINITE_LOSS_STEPS.name}[5m]) > 0"
                f" or {m.TRAIN_LOSS_WINDOW_MAX.name} != {m.TRAIN_LOSS_WINDOW_MAX.name}"
            ),
            "critical",
            "Non-finite loss in " + where,
            "The training loss was NaN or infinite. The policy rolls back to the last good "
            "checkpoint; if this repeats, the run halts.",
            metrics=(m.NONFINITE_LOSS_STEPS, m.TRAIN_LOSS_WINDOW_MAX, m.RUN_INFO),
        ),
        Rule(
            "YotoOverflowStorm",
            _per_run(
                f"increase({m.OVERFLOW_STEPS.name}[5m]) >= 20"
                f" or max_over_time({m.CONSECUTIVE_OVERFLOWS.name}[5m]) >= 8"
            ),
            "warning",
            "fp16 overflow storm in " + where,
            "Many skipped (overflowed) fp16 steps: the loss scale keeps halving. Look at "
            "activation headroom per layer on the Precision dashboard.",
            metrics=(m.OVERFLOW_STEPS, m.CONSECUTIVE_OVERFLOWS, m.RUN_INFO),
        ),
        Rule(
            "YotoLossScaleAtMinimum",
            _per_run(f"{m.LOSS_SCALE_HEADROOM.name} < 1"),
            "critical",
            "fp16 loss scale at its minimum in " + where,
            "The dynamic loss scale cannot halve again; DeepSpeed would stop the run. The "
            "policy rolls back, then halts with advice to train in bf16.",
            for_="1m",
            metrics=(m.LOSS_SCALE_HEADROOM, m.RUN_INFO),
        ),
        Rule(
            "YotoRollback",
            _per_run(f"increase({m.ROLLBACKS.name}[15m]) > 0"),
            "warning",
            "Rolled back: " + where,
            "The policy restored the last good checkpoint and skipped the bad data window "
            "(the run's rollback event says from where, to where and why).",
            metrics=(m.ROLLBACKS, m.RUN_INFO),
        ),
        Rule(
            "YotoRunHalted",
            _per_run(f"{m.HALTED.name} == 1"),
            "critical",
            "Run halted: " + where,
            "The policy stopped the run (rollback budget spent or nothing good to roll back "
            "to). Its final checkpoint is kept; the halt event says why and what to change.",
            metrics=(m.HALTED, m.RUN_INFO),
        ),
        Rule(
            "YotoThroughputDrop",
            _per_run(
                f"avg_over_time({m.THROUGHPUT.name}[5m])"
                f" < 0.5 * avg_over_time({m.THROUGHPUT.name}[1h] offset 5m)"
            ),
            "warning",
            "Throughput halved in " + where,
            "Tokens/s over the last 5 minutes is under half of the hour before: a slow node, "
            "a straggler rank, I/O, or thermal throttling.",
            for_="10m",
            metrics=(m.THROUGHPUT, m.RUN_INFO),
        ),
        Rule(
            "YotoRunStalled",
            _per_run(f"time() - {m.LAST_STEP_TIME.name} > 900"),
            "critical",
            "No step for 15 minutes in " + where,
            "The exporter answers but the trainer has not finished a step in 15 minutes: a "
            "hung collective, a dead rank or a stuck data loader.",
            for_="5m",
            metrics=(m.LAST_STEP_TIME, m.RUN_INFO),
        ),
        Rule(
            "YotoMetricsAbsent",
            # a run that ended on purpose said so in its last scrape; a crash did not
            f'up{{job="{m.SCRAPE_JOB}"}} == 0\nunless on (instance, job) '
            f"last_over_time({m.RUN_ENDED.name}[1h]) == 1",
            "critical",
            "Trainer metrics absent: {{ $labels.instance }}",
            "Prometheus cannot scrape this trainer's rank 0: the run crashed, the node is "
            "down, or the exporter is unreachable.",
            for_="5m",
            metrics=(m.RUN_ENDED,),
        ),
        Rule(
            "YotoFewShotScoreFell",
            # scores come once per evaluated checkpoint: compared with the best of the
            # last 12 hours of the same run, task and metric
            _per_run(
                f"{higher} < 0.9 * max_over_time({higher}[12h])\n"
                f"or {lower} > 1.5 * min_over_time({lower}[12h])"
            ),
            "warning",
            "Few-shot score fell in " + where,
            "{{ $labels.task }} {{ $labels.metric }} is more than 10% below its best of the "
            "last 12 hours (a perplexity: 50% above). The loss may not "
            "show it (BLOOM's 13B run looked fine by loss and scored like a 2.7-6B model); "
            "the Evals page of the explorer has the trajectory per task.",
            metrics=(m.EVAL_SCORE, m.RUN_INFO),
        ),
        Rule(
            "YotoStragglerRank",
            # the trainer's own verdict (yoto_stragglers counts the ranks slow for several
            # intervals in a row), one alert per such rank with its slowdown now
            _per_run(
                f"{m.RANK_STEP.name}\n/ on (instance, job) group_left "
                f"{m.RANK_MEDIAN_STEP.name} > {1 + system.straggler_margin:g}\n"
                f"and on (instance, job) {m.STRAGGLERS.name} > 0"
            ),
            "warning",
            "Straggler rank {{ $labels.rank }} in " + where,
            f"Rank {{{{ $labels.rank }}}} has been slower than the median rank by more than "
            f"{system.straggler_margin:.0%} for {system.straggler_intervals} intervals in a "
            "row (its own time per step: batch fetch and forward passes); every other rank "
            "waits for it at each gradient reduction. Look at its data wait, its GPU's "
            "clocks and temperature, and its host (the Overview dashboard's Ranks and "
            "System rows; the run's straggler events).",
            for_="2m",
            metrics=(m.RANK_STEP, m.RANK_MEDIAN_STEP, m.STRAGGLERS, m.RUN_INFO),
        ),
        Rule(
            "YotoSpectraOutOfBand",
            # the probe's own verdict (a spectra event at warning): it knows which
            # matrices are large enough for a power-law fit to mean something
            _per_run(
                f"increase({m.EVENTS.name}"
                f'{{kind="{EventKind.SPECTRA}",severity="{Severity.WARNING}"}}[30m]) > 0'
            ),
            "warning",
            "Layer spectra out of band in " + where,
            f"weightwatcher alpha left [{spectra.alpha_low:g}, {spectra.alpha_high:g}] for "
            "a layer: below, over-trained or carrying a spike's damage; above, under-trained "
            "or badly fit. The Layers & spectra dashboard shows which layer.",
            metrics=(m.EVENTS, m.RUN_INFO),
        ),
    ]


def render(rules: list[Rule] | None = None, interval: str = "15s") -> str:
    rules = rules if rules is not None else build_rules()
    doc = {
        "groups": [
            {"name": GROUP, "interval": interval, "rules": [r.to_yaml() for r in rules]},
        ]
    }
    header = "# Generated by `yoto alerts build` from alerts/rules.py; do not edit by hand.\n"
    return header + yaml.safe_dump(doc, sort_keys=False, width=100)
