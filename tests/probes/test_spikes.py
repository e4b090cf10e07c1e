"""Spike detectors: each rule fires at a planted spike's onset, and a clean run is quiet."""

import math
import random
from pathlib import Path

import pytest

from yoto import catalog, runstore
from yoto.config import SpikesConfig
from yoto.probes.spikes import SpikeDetector

LOSS, GNORM = catalog.TRAIN_LOSS.name, catalog.GRAD_NORM.name


def only(rule: str, **extra) -> SpikesConfig:
    """Spike config with one rule enabled on both series."""
    series = {}
    for name in ("sigma", "ratio", "ewm"):
        series[name] = {"enabled": name == rule, **(extra if name == rule else {})}
    return SpikesConfig.model_validate({"loss": series, "grad_norm": series})


def feed(
    detector: SpikeDetector, n: int, plant: dict[int, float], series: str = LOSS, seed: int = 0
) -> list:
    """A noisy, slowly falling loss (or grad norm) with values multiplied at planted steps."""
    rng = random.Random(seed)
    verdicts = []
    for step in range(1, n + 1):
        base = 3.0 - 0.002 * step + rng.gauss(0, 0.03)
        value = base * plant.get(step, 1.0)
        other = LOSS if series == GNORM else GNORM
        verdicts += detector.observe(step, {series: value, other: 1.0})
    return verdicts


@pytest.mark.parametrize("series", [LOSS, GNORM])
def test_sigma_rule_fires_at_onset(series: str) -> None:
    d = SpikeDetector(only("sigma"))
    verdicts = feed(d, 300, {200: 2.0}, series)
    assert [(v.step, v.onset, v.data["rule"]) for v in verdicts] == [(200, 200, "sigma")]
    assert verdicts[0].data["metric"] == series and verdicts[0].kind == "spike"


def test_ratio_rule_needs_patience_and_reports_the_onset() -> None:
    d = SpikeDetector(only("ratio"))
    assert feed(d, 300, {s: 2.5 for s in range(200, 204)}) == []  # 4 outliers: patience
    d = SpikeDetector(only("ratio"))
    verdicts = feed(d, 300, {s: 2.5 for s in range(200, 206)})  # 6 in a row
    assert [(v.step, v.onset) for v in verdicts] == [(204, 200)]


def test_ewm_rule_fires_at_onset() -> None:
    d = SpikeDetector(only("ewm"))
    verdicts = feed(d, 300, {250: 1.8})
    assert [(v.step, v.onset, v.data["rule"]) for v in verdicts] == [(250, 250, "ewm")]


def test_nonfinite_is_critical_even_without_history() -> None:
    d = SpikeDetector(SpikesConfig())
    verdicts = list(d.observe(1, {LOSS: math.nan, GNORM: 1.0}))
    verdicts += list(d.observe(2, {LOSS: math.inf, GNORM: 1.0}))  # same episode: once
    assert [(v.severity, v.data["rule"], v.onset) for v in verdicts] == [
        ("critical", "nonfinite", 1)
    ]


def test_counters_score_and_state_round_trip() -> None:
    d = SpikeDetector(only("sigma"))
    feed(d, 150, {100: 2.0, 120: 2.0})
    metrics = {s.name: s.value for s in d.metrics()}
    assert metrics[catalog.LOSS_SPIKES.name] == 2.0
    assert metrics[catalog.GRAD_NORM_SPIKES.name] == 0.0
    assert metrics[catalog.SPIKE_SCORE.name] == pytest.approx(2 / 100)
    copy = SpikeDetector(only("sigma"))
    copy.load_state_dict(d.state_dict())
    rng_a, rng_b = feed(d, 20, {10: 2.0}, seed=5), feed(copy, 20, {10: 2.0}, seed=5)
    assert [v.message for v in rng_a] == [v.message for v in rng_b]


def test_a_spike_does_not_raise_its_own_baseline() -> None:
    d = SpikeDetector(only("sigma"))
    feed(d, 200, {})
    rule = d.watches[0].rules[0]
    before = rule.limit()
    d.observe(201, {LOSS: 30.0, GNORM: 1.0})
    assert rule.limit() == before


def test_clean_demo_run_has_no_spikes(trained_run: Path) -> None:
    """The tiny preset's 500 clean steps with the default rules: no false positive."""
    events = runstore.read_events(trained_run)
    assert [e["message"] for e in events if e["kind"] == "spike"] == []
    t = runstore.read_metrics(trained_run).to_pydict()
    assert len(t["step"]) == 500
    assert t[catalog.LOSS_SPIKES.name][-1] == 0 and t[catalog.GRAD_NORM_SPIKES.name][-1] == 0
    assert max(t[catalog.SPIKE_SCORE.name]) == 0
