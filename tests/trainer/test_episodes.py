"""One instability, one page: the episode tracker groups the policy's acted-on verdicts,
pages an episode at most once (or lets its rollback or halt be the page), records the
rest as info ``episode`` events and closes an episode once it is quiet. Synthetic
verdicts through the real policy; no training."""

from __future__ import annotations

import math

import pytest
import torch

from yoto import catalog
from yoto.config import EpisodeConfig, PolicyConfig
from yoto.events import EventKind, Reason, Severity
from yoto.probes.base import Verdict
from yoto.trainer.episodes import EpisodeTracker, Notice, Outcome, Stage
from yoto.trainer.policy import Action, Policy


def spike(step: int, series: str, rule: str, value: float, onset: int | None = None) -> Verdict:
    """A verdict as probes/spikes.py makes it: persistent and non-finite ones critical."""
    reason = {"persistent": Reason.PERSISTENT_SPIKE, "nonfinite": Reason.NONFINITE}.get(
        rule, Reason.SPIKE
    )
    severity = Severity.WARNING if reason == Reason.SPIKE else Severity.CRITICAL
    onset = step if onset is None else onset
    metric = {"loss": catalog.TRAIN_LOSS, "grad norm": catalog.GRAD_NORM}[series].name
    data = {"series": series, "metric": metric, "rule": rule, "value": value, "onset": onset}
    return Verdict(EventKind.SPIKE, severity, step, onset, f"{series} spike", data, reason)


# the injected LR spike of the issue: each rule crossed its threshold one step later
LR_SPIKE = {
    131: [spike(131, "loss", "sigma", 6.1)],
    132: [spike(132, "grad norm", "ratio", 40.0)],
    133: [spike(133, "loss", "persistent", 7.5, onset=131)],
}


def drive(
    verdicts: dict[int, list[Verdict]],
    until: int,
    policy: PolicyConfig | None = None,
    skipped: frozenset[int] = frozenset(),
    tracker: EpisodeTracker | None = None,
    start: int = 1,
    values: dict[int, dict[str, float]] | None = None,
) -> tuple[list[Notice], EpisodeTracker]:
    """Steps ``start``..``until`` as Trainer.step_once and Trainer.apply see them: the
    policy decides, the tracker observes; a rollback or halt closes the episode (the
    rollback event would carry ``tracker.summary()``, recorded here as a ``rollback``)."""
    cfg = policy or PolicyConfig()
    pol, tracker = Policy(cfg), tracker or EpisodeTracker(cfg.episode)
    notices: list[Notice] = []
    for step in range(start, until + 1):
        decision = pol.decide(step, verdicts.get(step, []), [], step in skipped)
        notices += tracker.observe(step, decision, (values or {}).get(step, {}))
        if decision.action == Action.ROLLBACK:
            page = Notice(
                EventKind.ROLLBACK,
                Severity.WARNING,
                step,
                tracker.mention(),
                {"episode": tracker.summary()},
            )
            notices += [page, tracker.close(Outcome.ROLLED_BACK)]
    return notices, tracker


def of(notices: list[Notice], kind: EventKind, stage: Stage | None = None) -> list[Notice]:
    return [n for n in notices if n.kind == kind and (stage is None or n.data["stage"] == stage)]


def test_a_spike_that_only_alerts_pages_once_and_is_updated_after() -> None:
    """131 loss spike, 132 grad-norm spike, 133 persistent (mapped to alert here): one
    alert, when the second step confirms the episode; 133 is an info update."""
    notices, tracker = drive(LR_SPIKE, 160, PolicyConfig(persistent_spike="alert"))
    [alert] = of(notices, EventKind.ALERT)
    assert alert.step == 132 and alert.severity == Severity.WARNING
    assert alert.data["action"] == "alert" and alert.data["onset"] == 131
    assert alert.data["episode"]["rules"] == ["loss:sigma", "grad norm:ratio"]
    assert "episode 1 from step 131" in alert.message
    [update] = of(notices, EventKind.EPISODE, Stage.UPDATED)
    assert update.step == 133 and update.severity == Severity.INFO
    assert update.data["episode"]["rules"][-1] == "loss:persistent"
    [closed] = of(notices, EventKind.EPISODE, Stage.CLOSED)
    assert closed.step == 133 + 10 and closed.severity == Severity.INFO
    assert closed.data["outcome"] == Outcome.RECOVERED
    summary = closed.data["episode"]
    assert summary["paged"] and summary["paged_step"] == 132
    assert (summary["onset"], summary["last_step"], summary["steps"]) == (131, 133, [131, 132, 133])
    assert summary["peaks"] == {
        "loss": {"value": 7.5, "step": 133},
        "grad norm": {"value": 40.0, "step": 132},
    }
    assert (tracker.count, tracker.paged, tracker.current) == (1, 1, None)


def test_the_rollback_is_the_page_with_no_alert_beside_it() -> None:
    """The default policy rolls the persistent spike back: the alert of the confirmed
    episode (132) stays the only one; the rollback carries the episode and closes it."""
    notices, tracker = drive(LR_SPIKE, 150)
    assert [n.step for n in of(notices, EventKind.ALERT)] == [132]
    [rollback] = of(notices, EventKind.ROLLBACK)
    assert rollback.data["episode"]["number"] == 1 and rollback.data["episode"]["onset"] == 131
    assert rollback.data["episode"]["rules"] == ["loss:sigma", "grad norm:ratio", "loss:persistent"]
    assert rollback.message.startswith("; episode 1 from step 131")
    [closed] = of(notices, EventKind.EPISODE, Stage.CLOSED)
    assert closed.step == 133 and closed.data["outcome"] == Outcome.ROLLED_BACK
    assert not of(notices, EventKind.EPISODE, Stage.UPDATED)
    assert (tracker.count, tracker.paged) == (1, 1)


def test_with_skip_step_the_rollback_is_the_only_page() -> None:
    """Skip-step absorbed 131 and 132 (no page); the persistent spike's rollback at 133
    pages, carrying the whole episode."""
    notices, tracker = drive(LR_SPIKE, 150, skipped=frozenset({131, 132}))
    assert not of(notices, EventKind.ALERT)
    [rollback] = of(notices, EventKind.ROLLBACK)
    assert rollback.data["episode"]["steps"] == [131, 132, 133]
    assert rollback.data["episode"]["paged"]
    [closed] = of(notices, EventKind.EPISODE, Stage.CLOSED)
    assert closed.data["outcome"] == Outcome.ROLLED_BACK
    assert tracker.paged == 1


def test_a_rollback_at_the_second_step_pages_only_by_itself() -> None:
    verdicts = {
        50: [spike(50, "loss", "sigma", 5.0)],
        51: [spike(51, "loss", "nonfinite", math.nan)],
    }
    notices, tracker = drive(verdicts, 70)
    assert not of(notices, EventKind.ALERT)
    [rollback] = of(notices, EventKind.ROLLBACK)
    peak = rollback.data["episode"]["peaks"]["loss"]
    assert math.isnan(peak["value"]) and peak["step"] == 51  # non-finite is the peak
    assert (tracker.count, tracker.paged) == (1, 1)


def test_isolated_outliers_far_apart_close_unpaged() -> None:
    """Two single-step grad-norm outliers (the clean 800-step run's): no page at all, two
    episodes closed unpaged."""
    verdicts = {
        100: [spike(100, "grad norm", "sigma", 3.0)],
        400: [spike(400, "grad norm", "ewm", 4.0)],
    }
    notices, tracker = drive(verdicts, 800)
    assert not of(notices, EventKind.ALERT)
    closed = of(notices, EventKind.EPISODE, Stage.CLOSED)
    assert [(n.step, n.data["outcome"]) for n in closed] == [
        (110, Outcome.RECOVERED),
        (410, Outcome.RECOVERED),
    ]
    assert [n.data["episode"]["number"] for n in closed] == [1, 2]
    assert not any(n.data["episode"]["paged"] for n in closed)
    assert "not paged" in closed[0].message
    assert len(notices) == 2 and (tracker.count, tracker.paged) == (2, 0)


def test_an_outlier_skip_step_absorbed_closes_as_absorbed() -> None:
    notices, tracker = drive({60: [spike(60, "loss", "sigma", 9.0)]}, 90, skipped=frozenset({60}))
    [closed] = notices
    assert closed.data["outcome"] == Outcome.ABSORBED and "absorbed by skip-step" in closed.message
    assert (tracker.count, tracker.paged) == (1, 0)


def test_a_paged_episode_is_updated_not_paged_again() -> None:
    verdicts = {s: [spike(s, "grad norm", "sigma", 10.0 + s)] for s in (20, 21, 23, 26, 30)}
    notices, tracker = drive(verdicts, 60)
    assert [n.step for n in of(notices, EventKind.ALERT)] == [21]
    assert [n.step for n in of(notices, EventKind.EPISODE, Stage.UPDATED)] == [23, 26, 30]
    [closed] = of(notices, EventKind.EPISODE, Stage.CLOSED)
    assert closed.step == 40 and closed.data["episode"]["peaks"]["grad norm"]["step"] == 30
    assert (tracker.count, tracker.paged) == (1, 1)


def test_quiet_steps_close_the_episode() -> None:
    cfg = PolicyConfig(episode=EpisodeConfig(quiet_steps=5))
    # 10, then 14 (3 quiet steps between: the same episode), then quiet from 15
    notices, tracker = drive(
        {10: [spike(10, "loss", "sigma", 3.0)], 14: [spike(14, "loss", "ewm", 3.5)]}, 18, cfg
    )
    assert tracker.current is not None and tracker.current.steps == [10, 14]
    notices, tracker = drive({}, 19, cfg, tracker=tracker, start=19)
    [closed] = notices
    assert closed.step == 19 and closed.data["episode"]["last_step"] == 14
    # a verdict just after the close opens episode 2
    notices, tracker = drive(
        {20: [spike(20, "loss", "sigma", 3.0)]}, 20, cfg, tracker=tracker, start=20
    )
    assert tracker.current is not None and tracker.current.number == 2


@pytest.mark.parametrize(
    ("cfg", "verdict", "why"),
    [
        (
            PolicyConfig(episode=EpisodeConfig(page_after=1)),
            spike(5, "loss", "sigma", 3.0),
            "page_after=1",
        ),
        (PolicyConfig(persistent_spike="alert"), spike(5, "loss", "persistent", 3.0), "critical"),
        (PolicyConfig(spike="lr_cooldown"), spike(5, "loss", "sigma", 3.0), "LR cooldown"),
    ],
)
def test_some_episodes_page_at_their_first_step(
    cfg: PolicyConfig, verdict: Verdict, why: str
) -> None:
    notices, _ = drive({5: [verdict]}, 5, cfg)
    [alert] = of(notices, EventKind.ALERT)
    assert alert.step == 5, why
    assert alert.severity == (Severity.CRITICAL if why == "critical" else Severity.WARNING)


def test_state_survives_a_checkpoint_round_trip(tmp_path) -> None:
    """Saved mid-episode (already paged) and loaded into a fresh tracker, as a resume does
    (through torch.save, as in the checkpoint's client state): numbering and paging go on."""
    verdicts = {5: [spike(5, "loss", "sigma", 3.0)], 6: [spike(6, "loss", "ewm", 4.0)]}
    _, tracker = drive(verdicts, 8)
    torch.save({"episodes": tracker.state_dict()}, tmp_path / "state.pt")
    resumed = EpisodeTracker(EpisodeConfig())
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True)["episodes"])
    assert resumed.state_dict() == tracker.state_dict()
    more = {9: [spike(9, "loss", "sigma", 5.0)], 40: [spike(40, "loss", "sigma", 2.0)]}
    notices, resumed = drive(more, 60, tracker=resumed, start=9)
    assert not of(notices, EventKind.ALERT)  # episode 1 paged before the save
    [update] = of(notices, EventKind.EPISODE, Stage.UPDATED)
    assert update.step == 9 and update.data["episode"]["number"] == 1
    closed = of(notices, EventKind.EPISODE, Stage.CLOSED)
    assert [n.data["episode"]["number"] for n in closed] == [1, 2]
    assert (resumed.count, resumed.paged) == (2, 1)


def test_a_step_nothing_acted_on_neither_opens_nor_extends_an_episode() -> None:
    """Verdicts the policy maps to none (here overflow) are no instability to page about."""
    overflow = Verdict(EventKind.OVERFLOW, Severity.WARNING, 3, 3, "overflow", {}, Reason.OVERFLOW)
    notices, tracker = drive({3: [overflow]}, 30)
    assert notices == [] and tracker.count == 0


def test_the_peak_is_the_highest_value_while_the_episode_is_open() -> None:
    """The rule fires at the first outlier; the loss climbs on for two steps (no new
    verdict: each rule fires once per run of outliers): the peak is step 33's."""
    loss = catalog.TRAIN_LOSS.name
    values = {s: {loss: v} for s, v in {31: 6.0, 32: 8.0, 33: 9.5, 34: 4.0, 60: 99.0}.items()}
    notices, _ = drive({31: [spike(31, "loss", "sigma", 6.0)]}, 70, values=values)
    [closed] = notices
    assert closed.step == 41
    assert closed.data["episode"]["peaks"] == {"loss": {"value": 9.5, "step": 33}}
    assert "peak loss 9.5 at step 33" in closed.message


def test_an_episode_open_when_the_run_finishes_is_summed_up_as_unfinished() -> None:
    notices, tracker = drive({95: [spike(95, "grad norm", "ratio", 30.0)]}, until=100)
    assert tracker.current is not None and not [n for n in notices if n.kind == EventKind.ALERT]
    closed = tracker.close(Outcome.UNFINISHED, 100)
    assert closed is not None and closed.step == 100 and tracker.current is None
    assert closed.data["outcome"] == Outcome.UNFINISHED and "still open" in closed.message
    assert tracker.close(Outcome.UNFINISHED) is None  # nothing open: nothing to say
