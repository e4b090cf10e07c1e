"""Instability episodes: one instability, one page.

The policy turns each step's verdicts into one action (trainer/policy.py). Before this
module every step with an action of ``alert`` or more wrote an ``alert`` event (and chat
got each): a single LR spike paged three times as the sigma, ewm and ratio rules crossed
their thresholds on three successive steps, then once more with its rollback. Here the
steps the policy acted on are grouped into *episodes*, and an episode pages once.

Where it fires (trainer/loop.py):

- ``Trainer.step_once``, after the agreed decision: :meth:`EpisodeTracker.observe`. An
  episode opens at the first step whose decision acted on verdicts (action ``skip_step``
  or more) and records its number (1, 2, ... over the run), its onset (the earliest
  verdict onset), the steps with verdicts, the rules that fired (``loss:sigma``,
  ``grad norm:ratio``, ``loss:persistent``; another detector's verdict by its class,
  e.g. ``overflow``), the peak of each series with verdicts (its highest value while the
  episode is open, from the steps' values, and that step), and the highest action.
- The page is one ``alert`` event, written when the episode is *confirmed*: verdicts
  that alert (action ``alert`` or more) came on ``policy.episode.page_after`` distinct
  steps, or one of those steps had a critical verdict (a persistent or non-finite spike),
  or the action is an LR cooldown or a batch-size change. A step whose update skip-step
  absorbed (``skip_step``) never counts: it is an event, not a page. Later verdicts of a
  paged episode are one ``episode`` event (info, not sent to chat) per step: the record
  is updated, not repeated.
- ``Trainer.apply``: a rollback or a halt is its own page. Its event carries
  :meth:`EpisodeTracker.summary` under ``episode`` and its message names the episode
  (:meth:`EpisodeTracker.mention`); no alert event is written beside it. Then
  :meth:`EpisodeTracker.close` ends the episode (outcome rolled back / halted).
- An episode with no acted-on verdict for ``policy.episode.quiet_steps`` steps closes
  (outcome recovered, or absorbed by skip-step when every step of it was). An isolated
  one-step outlier therefore closes unpaged. Every close is one ``episode`` event (info)
  that summarises it: onset, last step, rules, peaks, whether it paged, outcome.

The tracker is run history (trainer/history.py): a rollback does not restore it (the
episode numbering goes on, and the rollback closes the episode), and the checkpoint
carries a copy (``client_state()["yoto"]["episodes"]``) so that a resume continues it.
Its counters are the catalog's ``yoto_instability_episodes_total`` and
``yoto_paged_episodes_total`` (Trainer._intervention_values); Prometheus pages on the
latter (alerts/rules.py, ``YotoInstabilityEpisode``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from yoto.config import EpisodeConfig
from yoto.events import EventKind, Severity
from yoto.probes.base import Verdict

from .policy import Action, Decision

_STEPS_KEPT = 256  # steps listed per episode (the count goes on)
_CONFIRMING = (Action.LR_COOLDOWN, Action.BATCH_SIZE)  # page at once
_OWN_PAGE = (Action.ROLLBACK, Action.HALT)  # their own event is the page


class Outcome(StrEnum):
    """How an episode ended: the ``outcome`` of its closing ``episode`` event."""

    RECOVERED = "recovered"  # quiet for quiet_steps steps after verdicts that alerted
    ABSORBED = "absorbed"  # quiet again, and skip-step had left out every update of it
    ROLLED_BACK = "rolled_back"
    HALTED = "halted"
    UNFINISHED = "unfinished"  # the run reached train.steps while it was open


OUTCOME_TEXT = {
    Outcome.RECOVERED: "recovered",
    Outcome.ABSORBED: "absorbed by skip-step",
    Outcome.ROLLED_BACK: "rolled back",
    Outcome.HALTED: "halted",
    Outcome.UNFINISHED: "still open when the run finished",
}


class Stage(StrEnum):
    """What an ``episode`` event reports: its data's ``stage``."""

    UPDATED = "updated"  # more verdicts of an episode that already paged
    CLOSED = "closed"  # the summary at its end


@dataclass(frozen=True, slots=True)
class Notice:
    """An event the tracker asks the trainer to write (Trainer._announce)."""

    kind: EventKind
    severity: Severity
    step: int
    message: str
    data: dict[str, Any]


def rule_of(verdict: Verdict) -> str:
    """``series:rule`` for a spike verdict (``loss:sigma``), else the verdict's class."""
    series, rule = verdict.data.get("series"), verdict.data.get("rule")
    if series and rule:
        return f"{series}:{rule}"
    return str(verdict.reason or verdict.kind)


def _rank(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def _above(value: float, than: float) -> bool:
    """Peak order: a non-finite value outranks every finite one (and the first one stays)."""
    return _rank(value) > _rank(than)


@dataclass
class Episode:
    number: int
    onset: int  # the earliest onset of its verdicts
    first_step: int  # the step it opened at
    last_step: int  # the last step with acted-on verdicts
    steps: list[int] = field(default_factory=list)  # those steps (the first _STEPS_KEPT)
    step_count: int = 0
    alerting_steps: int = 0  # of them, those whose action was alert or more
    rules: list[str] = field(default_factory=list)  # in the order they first fired
    # series -> its highest value while the episode was open, and that step
    peaks: dict[str, dict[str, float | int]] = field(default_factory=dict)
    metrics: dict[str, str] = field(default_factory=dict)  # series -> its catalog key
    action: Action = Action.NONE  # the highest
    critical: bool = False  # a critical verdict on a step that alerted
    paged: bool = False
    paged_step: int | None = None

    def add(self, step: int, decision: Decision) -> None:
        """One step's acted-on decision and its verdicts."""
        self.last_step = step
        self.step_count += 1
        if len(self.steps) < _STEPS_KEPT:
            self.steps.append(step)
        alerts = decision.action >= Action.ALERT
        self.alerting_steps += alerts
        self.action = max(self.action, decision.action)
        self.onset = min([self.onset, decision.onset, *(v.onset for v in decision.verdicts)])
        for v in decision.verdicts:
            self._add_verdict(v)
            self.critical = self.critical or (alerts and v.severity == Severity.CRITICAL)

    def _add_verdict(self, v: Verdict) -> None:
        rule = rule_of(v)
        if rule not in self.rules:
            self.rules.append(rule)
        series, value = v.data.get("series"), v.data.get("value")
        if series is None or value is None:
            return
        if v.data.get("metric"):
            self.metrics[series] = v.data["metric"]
        self._peak(series, float(value), v.step)

    def _peak(self, series: str, value: float, step: int) -> None:
        peak = self.peaks.get(series)
        if peak is None or _above(value, float(peak["value"])):
            self.peaks[series] = {"value": value, "step": step}

    def track(self, step: int, values: Mapping[str, float]) -> None:
        """A step's values while the episode is open: the peaks of its series (a spike
        often climbs for steps after the rule that caught it fired)."""
        for series, key in self.metrics.items():
            value = values.get(key)
            if value is not None:
                self._peak(series, float(value), step)

    def describe(self) -> str:
        """``episode 3 from step 131 (loss:sigma, grad norm:ratio; peak loss 9.1 at step
        133)``: how messages name it."""
        peaks = ", ".join(
            f"{series} {p['value']:.4g} at step {p['step']}" for series, p in self.peaks.items()
        )
        what = ", ".join(self.rules) + (f"; peak {peaks}" if peaks else "")
        return f"episode {self.number} from step {self.onset} ({what})"

    def summary(self) -> dict[str, Any]:
        """What events carry under ``episode`` (plain JSON types)."""
        return {
            "number": self.number,
            "onset": self.onset,
            "first_step": self.first_step,
            "last_step": self.last_step,
            "steps": list(self.steps),
            "step_count": self.step_count,
            "rules": list(self.rules),
            "peaks": {s: dict(p) for s, p in self.peaks.items()},
            "action": self.action.name.lower(),
            "paged": self.paged,
            "paged_step": self.paged_step,
        }

    def state(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "alerting_steps": self.alerting_steps,
            "critical": self.critical,
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Episode:
        known = {k: v for k, v in state.items() if k in cls.__dataclass_fields__}
        known["action"] = Action[str(state.get("action", "none")).upper()]
        return cls(**known)


class EpisodeTracker:
    """Groups the policy's acted-on decisions into episodes and says what pages; see the
    module docstring. Every rank keeps one (the decisions are agreed); rank 0 writes."""

    def __init__(self, cfg: EpisodeConfig) -> None:
        self.cfg = cfg
        self.current: Episode | None = None  # the open episode
        self.count = 0  # episodes opened in this run
        self.paged = 0  # of them, those that paged

    # --- Trainer.step_once ----------------------------------------------------------------

    def observe(
        self, step: int, decision: Decision, values: Mapping[str, float] | None = None
    ) -> list[Notice]:
        """The step's agreed decision and its values (Trainer.step_once, before its row is
        written): the events to write now, an ``alert`` page or an ``episode`` update or
        summary."""
        values = values or {}
        acted = decision.action >= Action.SKIP_STEP
        notices: list[Notice] = []
        ep = self.current
        if ep is not None:
            quiet = step - ep.last_step - acted  # quiet steps since its last verdicts
            if quiet >= self.cfg.quiet_steps:
                notices.append(self._close_quiet(step))
            elif not acted:
                ep.track(step, values)
        if acted:
            notices.extend(self._add(step, decision, values))
        return notices

    def _add(self, step: int, decision: Decision, values: Mapping[str, float]) -> list[Notice]:
        ep = self.current
        if ep is None:
            self.count += 1
            ep = self.current = Episode(self.count, decision.onset, step, step)
        was_paged = ep.paged
        ep.add(step, decision)
        ep.track(step, values)
        if decision.action in _OWN_PAGE:  # Trainer.apply writes the page (rollback / halt)
            self._mark_paged(ep, step)
            return []
        if was_paged:
            return [self._update(ep, step, decision)] if decision.action >= Action.ALERT else []
        if self._confirmed(ep, decision):
            self._mark_paged(ep, step)
            return [self._page(ep, step, decision)]
        return []

    def _confirmed(self, ep: Episode, decision: Decision) -> bool:
        if decision.action < Action.ALERT:  # skip-step absorbed it: never a page
            return False
        return (
            ep.alerting_steps >= self.cfg.page_after
            or ep.critical
            or decision.action in _CONFIRMING
        )

    def _mark_paged(self, ep: Episode, step: int) -> None:
        if not ep.paged:
            ep.paged, ep.paged_step = True, step
            self.paged += 1

    def _page(self, ep: Episode, step: int, decision: Decision) -> Notice:
        """The episode's one ``alert`` event (sent to chat)."""
        action = decision.action.name.lower()
        return Notice(
            EventKind.ALERT,
            Severity.CRITICAL if ep.critical else Severity.WARNING,
            step,
            f"{ep.describe()}: {decision.reason} at step {decision.onset}: "
            f"{decision.message}; action: {action}",
            {
                "action": action,
                "reason": decision.reason,
                "onset": ep.onset,
                "episode": ep.summary(),
            },
        )

    def _update(self, ep: Episode, step: int, decision: Decision) -> Notice:
        """A paged episode's later verdicts: an ``episode`` event, not a second page."""
        action = decision.action.name.lower()
        return Notice(
            EventKind.EPISODE,
            Severity.INFO,
            step,
            f"{ep.describe()} goes on at step {step}: {decision.message}; action: {action}",
            {
                "stage": Stage.UPDATED,
                "action": action,
                "reason": decision.reason,
                "onset": ep.onset,
                "episode": ep.summary(),
            },
        )

    # --- closing ------------------------------------------------------------------------

    def _close_quiet(self, step: int) -> Notice:
        assert self.current is not None
        absorbed = self.current.action == Action.SKIP_STEP
        notice = self.close(Outcome.ABSORBED if absorbed else Outcome.RECOVERED, step)
        assert notice is not None
        return notice

    def close(self, outcome: Outcome, step: int | None = None) -> Notice | None:
        """End the open episode (quiet again, or from Trainer.apply after a rollback or a
        halt): its summary as one ``episode`` event at ``step`` (default: its last step);
        None when no episode is open."""
        ep, self.current = self.current, None
        if ep is None:
            return None
        at = ep.last_step if step is None else step
        paged = "paged" if ep.paged else "not paged"
        return Notice(
            EventKind.EPISODE,
            Severity.INFO,
            at,
            f"{ep.describe()} closed, {OUTCOME_TEXT[outcome]} (steps {ep.first_step}-"
            f"{ep.last_step}, {ep.step_count} with verdicts; {paged})",
            {
                "stage": Stage.CLOSED,
                "outcome": outcome,
                "onset": ep.onset,
                "episode": {**ep.summary(), "outcome": outcome},
            },
        )

    # --- what rollback and halt events say -------------------------------------------------

    def summary(self) -> dict[str, Any] | None:
        """The open episode's summary (a rollback or halt event's ``episode``), or None."""
        return None if self.current is None else self.current.summary()

    def mention(self) -> str:
        """``; episode 3 from step 131 (...)`` to end a rollback or halt message; empty
        when no episode is open."""
        return "" if self.current is None else f"; {self.current.describe()}"

    # --- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "paged": self.paged,
            "current": None if self.current is None else self.current.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("count", 0))
        self.paged = int(state.get("paged", 0))
        current = state.get("current")
        self.current = None if current is None else Episode.from_state(current)
