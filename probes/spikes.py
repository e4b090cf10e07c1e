"""Loss and grad-norm spike detectors (host side, after the step's one transfer).

Three rules, each optional, each watching one series (train loss, grad norm):

- ``sigma``: value > mean + k*sigma of the last ``window`` healthy values (OLMo-core: 6
  sigma over 128 steps). A one-step outlier is a spike.
- ``ratio``: value >= ratio x the window mean is an outlier; more than ``patience``
  consecutive outliers is a spike (Composer/llm-foundry KillLossSpike: 2x, 4 in a row).
- ``ewm``: value / exponentially weighted mean (span 9) > ratio (metaseq/OPT).

A non-finite value is always a critical spike. Outliers are kept out of the windows, so a
spike does not raise the baseline it is judged against. Each rule fires once per run of
outliers, with the run's first step as the onset. A series is *in a spike* while any rule
calls it one (the ratio rule only after its patience); ``yoto_*_spikes_total`` counts such
episodes and ``yoto_spike_score_ratio`` is the fraction of the last ``score_window`` steps
in which either series was.

Emits (host values, every step):

| metric | type | meaning |
|---|---|---|
| yoto_loss_spikes_total | counter | loss spike episodes |
| yoto_grad_norm_spikes_total | counter | grad-norm spike episodes |
| yoto_spike_score_ratio | gauge | fraction of recent steps that were in a spike |

Verdicts: ``spike`` (warning; critical when non-finite) with the onset step, the rule, the
value and the baseline it was compared with.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from yoto import catalog
from yoto.config import SeriesSpikeConfig, SpikesConfig
from yoto.events import EventKind, Reason, Severity

from .base import Sample, Verdict


class _Rule:
    """One outlier rule on one series; ``check`` returns (outlier, spike_now)."""

    name = ""

    def __init__(self) -> None:
        self.run_start: int | None = None  # first step of the current run of outliers
        self.fired = False  # already reported this run

    def baseline(self) -> float | None:
        raise NotImplementedError

    def limit(self) -> float | None:
        return self.baseline()

    def is_outlier(self, value: float) -> bool:
        raise NotImplementedError

    def healthy(self, value: float) -> None:
        """Take a healthy value into the rule's window."""
        raise NotImplementedError

    def spike_after(self, run_length: int) -> bool:
        return run_length >= 1

    def check(self, step: int, value: float) -> tuple[bool, bool]:
        """(spiking, fire): whether this rule calls the step part of a spike (an outlier
        run long enough), and whether that starts now (report it once)."""
        if not self.is_outlier(value):
            self.healthy(value)
            self.run_start, self.fired = None, False
            return False, False
        if self.run_start is None:
            self.run_start = step
        spiking = self.spike_after(step - self.run_start + 1)
        fire = spiking and not self.fired
        self.fired = self.fired or fire
        return spiking, fire

    def state(self) -> dict[str, Any]:
        return {"run_start": self.run_start, "fired": self.fired}

    def load(self, state: dict[str, Any]) -> None:
        self.run_start, self.fired = state["run_start"], state["fired"]


class SigmaRule(_Rule):
    name = "sigma"

    def __init__(self, k: float, window: int, min_history: int, log: bool = False) -> None:
        super().__init__()
        self.k, self.min_history, self.log = k, min_history, log
        self.values: deque[float] = deque(maxlen=window)

    def _t(self, value: float) -> float:
        return (math.log(value) if value > 0 else -math.inf) if self.log else value

    def check(self, step: int, value: float) -> tuple[bool, bool]:
        return super().check(step, self._t(value))

    def limit(self) -> float | None:
        """The threshold in the series' own units."""
        bound = self.baseline()
        return None if bound is None else (math.exp(bound) if self.log else bound)

    def _stats(self) -> tuple[float, float] | None:
        n = len(self.values)
        if n < self.min_history:
            return None
        mean = sum(self.values) / n
        var = sum((v - mean) ** 2 for v in self.values) / max(1, n - 1)
        return mean, math.sqrt(var)

    def baseline(self) -> float | None:
        stats = self._stats()
        return None if stats is None else stats[0] + self.k * stats[1]

    def is_outlier(self, value: float) -> bool:
        bound = self.baseline()
        return bound is not None and value > bound

    def healthy(self, value: float) -> None:
        self.values.append(value)

    def state(self) -> dict[str, Any]:
        return {**super().state(), "values": list(self.values)}

    def load(self, state: dict[str, Any]) -> None:
        super().load(state)
        self.values.clear()
        self.values.extend(state["values"])


class RatioRule(SigmaRule):
    name = "ratio"

    def __init__(self, ratio: float, window: int, patience: int, min_history: int) -> None:
        super().__init__(0.0, window, min_history, log=False)
        self.ratio, self.patience = ratio, patience

    def baseline(self) -> float | None:
        stats = self._stats()
        return None if stats is None else self.ratio * stats[0]

    def is_outlier(self, value: float) -> bool:
        limit = self.baseline()
        return limit is not None and value >= limit

    def spike_after(self, run_length: int) -> bool:
        return run_length > self.patience


class EwmRule(_Rule):
    name = "ewm"

    def __init__(self, span: float, ratio: float, min_history: int) -> None:
        super().__init__()
        self.alpha = 2.0 / (span + 1.0)
        self.ratio, self.min_history = ratio, min_history
        self.mean: float | None = None
        self.count = 0

    def baseline(self) -> float | None:
        if self.mean is None or self.count < self.min_history:
            return None
        return self.ratio * self.mean

    def is_outlier(self, value: float) -> bool:
        limit = self.baseline()
        return limit is not None and value > limit

    def healthy(self, value: float) -> None:
        self.mean = value if self.mean is None else self.mean + self.alpha * (value - self.mean)
        self.count += 1

    def state(self) -> dict[str, Any]:
        return {**super().state(), "mean": self.mean, "count": self.count}

    def load(self, state: dict[str, Any]) -> None:
        super().load(state)
        self.mean, self.count = state["mean"], state["count"]


class SeriesWatch:
    """All enabled rules on one series, plus its episode counter."""

    def __init__(
        self,
        key: str,
        label: str,
        counter: catalog.Metric,
        rules: SeriesSpikeConfig,
        min_history: int,
        persistent_steps: int = 5,
    ) -> None:
        self.key, self.label, self.counter = key, label, counter
        self._config, self._min_history = rules, min_history
        self.rules = self._make_rules()
        self.episodes = 0
        self.in_spike = False
        self.nonfinite_since: int | None = None
        self.episode_start = 0
        self.persistent_steps = persistent_steps

    def _make_rules(self) -> list[_Rule]:
        rules, min_history = self._config, self._min_history
        made: list[_Rule] = []
        if rules.sigma.enabled:
            made.append(SigmaRule(rules.sigma.k, rules.sigma.window, min_history, rules.sigma.log))
        if rules.ratio.enabled:
            made.append(
                RatioRule(rules.ratio.ratio, rules.ratio.window, rules.ratio.patience, min_history)
            )
        if rules.ewm.enabled:
            made.append(EwmRule(rules.ewm.span, rules.ewm.ratio, min_history))
        return made

    def restart(self) -> None:
        """Empty the rules' windows (the series changed level for a known reason: the
        context got shorter); they judge again after ``min_history`` healthy values. The
        episode count stays."""
        self.rules = self._make_rules()
        self.in_spike, self.nonfinite_since = False, None

    def observe(self, step: int, value: float | None) -> list[Verdict]:
        if value is None:  # e.g. no grad norm on this engine path
            return []
        verdicts = []
        if not math.isfinite(value):
            now = True
            if self.nonfinite_since is None:
                self.nonfinite_since = step
                verdicts.append(
                    self._verdict(step, step, "nonfinite", value, None, Reason.NONFINITE)
                )
        else:
            now = False
            self.nonfinite_since = None
            for rule in self.rules:
                limit = rule.limit()
                spiking, fire = rule.check(step, value)
                now = now or spiking
                if fire:
                    verdicts.append(
                        self._verdict(
                            step, rule.run_start or step, rule.name, value, limit, Reason.SPIKE
                        )
                    )
        if now and not self.in_spike:
            self.episodes += 1
            self.episode_start = step
        if now and step - self.episode_start + 1 == self.persistent_steps:
            verdicts.append(
                Verdict(
                    EventKind.SPIKE,
                    Severity.CRITICAL,
                    step,
                    self.episode_start,
                    f"{self.label} spike persists: {self.persistent_steps} steps since step "
                    f"{self.episode_start} (now {value:.4g})",
                    {
                        "series": self.label,
                        "metric": self.key,
                        "rule": "persistent",
                        "value": value,
                        "onset": self.episode_start,
                        "persistent": True,
                    },
                    Reason.PERSISTENT_SPIKE,
                )
            )
        self.in_spike = now
        return verdicts

    def _verdict(
        self,
        step: int,
        onset: int,
        rule: str,
        value: float,
        limit: float | None,
        reason: Reason,
    ) -> Verdict:
        bound = "" if limit is None else f" (limit {limit:.4g})"
        return Verdict(
            EventKind.SPIKE,
            Severity.CRITICAL if reason == Reason.NONFINITE else Severity.WARNING,
            step,
            onset,
            f"{self.label} spike from step {onset}: {value:.4g}{bound}, rule {rule}",
            {
                "series": self.label,
                "metric": self.key,
                "rule": rule,
                "value": value,
                "limit": limit,
                "onset": onset,
            },
            reason,
        )

    def state(self) -> dict[str, Any]:
        return {
            "rules": [r.state() for r in self.rules],
            "episodes": self.episodes,
            "in_spike": self.in_spike,
            "nonfinite_since": self.nonfinite_since,
            "episode_start": self.episode_start,
        }

    def load(self, state: dict[str, Any]) -> None:
        for rule, saved in zip(self.rules, state["rules"], strict=False):
            rule.load(saved)
        # a count of what the detectors saw: it survives a rollback (a Prometheus counter
        # never goes back; rolled back within one scrape, a spike would never be seen)
        self.episodes = max(self.episodes, state["episodes"])
        self.in_spike = state["in_spike"]
        self.nonfinite_since = state["nonfinite_since"]
        self.episode_start = state.get("episode_start", 0)


class SpikeDetector:
    """Loss and grad-norm spike detection; see the module docstring."""

    name = "spikes"

    def __init__(self, cfg: SpikesConfig) -> None:
        self.watches = [
            SeriesWatch(
                catalog.TRAIN_LOSS.name,
                "loss",
                catalog.LOSS_SPIKES,
                cfg.loss,
                cfg.min_history,
                cfg.persistent_steps,
            ),
            SeriesWatch(
                catalog.GRAD_NORM.name,
                "grad norm",
                catalog.GRAD_NORM_SPIKES,
                cfg.grad_norm,
                cfg.min_history,
                cfg.persistent_steps,
            ),
        ]
        self.flags: deque[bool] = deque(maxlen=cfg.score_window)
        self.seq_len: float | None = None  # the context length of the last step seen

    def observe(self, step: int, values: Mapping[str, float]) -> Iterable[Verdict]:
        seq_len = values.get(catalog.SEQ_LEN.name)
        if seq_len is not None and self.seq_len is not None and seq_len < self.seq_len:
            # a shorter context (a rewarming rollback) raises the loss: not a spike, a new
            # level; judge it against itself once enough of it has been seen
            for watch in self.watches:
                watch.restart()
        self.seq_len = seq_len if seq_len is not None else self.seq_len
        verdicts = []
        for watch in self.watches:
            verdicts.extend(watch.observe(step, values.get(watch.key)))
        self.flags.append(any(w.in_spike for w in self.watches))
        return verdicts

    def metrics(self) -> Iterable[Sample]:
        for watch in self.watches:
            yield Sample(watch.counter.name, float(watch.episodes))
        score = sum(self.flags) / len(self.flags) if self.flags else 0.0
        yield Sample(catalog.SPIKE_SCORE.name, score)

    def state_dict(self) -> dict[str, Any]:
        return {
            "watches": [w.state() for w in self.watches],
            "flags": list(self.flags),
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for watch, saved in zip(self.watches, state["watches"], strict=False):
            watch.load(saved)
        self.flags.clear()
        self.flags.extend(state["flags"])
        self.seq_len = state.get("seq_len")
