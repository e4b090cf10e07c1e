"""Incidents: what each rollback undid, as the step window the Timeline opens on.

A rollback event (written by the trainer when the policy rolls back) says where the
abandoned attempt got to (``from_step``), the checkpoint the next attempt restarted from
(``to_step``) and where the trouble began (``onset``). The window reaches from the
checkpoint to a little past the rollback, so the abandoned branch, its spike and the
surviving branch that replaced it are all in view; a checkpoint far before the onset is
cut off so that a few-step spike still gets a visible share of the chart's width.

Its evidence (trainer/diagnose.py): the spike's *forensics*, the onset batch's sequences
ranked by loss (on its spike events, in brief on the rollback), and the replay
*diagnosis* written just before the rollback, in the same attempt: the verdict (data,
state, nondeterministic) and the loss and grad norm trajectories it compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from yoto import catalog
from yoto.events import EventKind, Rollback

# the onset..rollback stretch gets at least 1/SPIKE_SHARE of the window's width
SPIKE_SHARE = 25
PAD_SHARE = 10  # each side gets a tenth of the window, at least MIN_PAD steps
MIN_PAD = 3


@dataclass(frozen=True, slots=True)
class Incident:
    abandoned: int  # the attempt the rollback abandoned
    onset: int  # the first bad step (the verdict's onset)
    rolled_back_at: int  # the last step the abandoned attempt took
    resumed_from: int  # the checkpoint step the next attempt restarted from
    reason: str
    step: int = 0  # the rollback event's step and attempt (the next attempt's)
    attempt: int = 0

    @property
    def window(self) -> tuple[int, int]:
        """(first, last) step to show."""
        bad = self.rolled_back_at - self.onset + 1
        lo = max(min(self.resumed_from, self.onset), self.onset - SPIKE_SHARE * bad)
        hi = self.rolled_back_at
        pad = max(MIN_PAD, (hi - lo) // PAD_SHARE)
        return max(0, lo - pad), hi + pad

    def label(self) -> str:
        why = f"{self.reason} from step {self.onset}" if self.reason else f"from step {self.onset}"
        return (
            f"rollback at step {self.rolled_back_at}: attempt {self.abandoned} abandoned "
            f"({why}), resumed from step {self.resumed_from}"
        )


def incidents(events: pd.DataFrame) -> list[Incident]:
    """One incident per rollback event, oldest first, read as the trainer wrote it (a
    :class:`~yoto.events.Rollback`). A damaged record falls back to what the event itself
    says (its step, and the attempt before its own)."""
    found = []
    for e in events[events.kind == EventKind.ROLLBACK].sort_values("step").itertuples():
        try:
            done = Rollback.from_data(e.data)
        except (KeyError, TypeError, ValueError, AttributeError):
            at = int(e.step)
            done = Rollback(at, at, at, "", from_attempt=max(0, int(e.attempt) - 1), attempt=0)
        found.append(
            Incident(
                abandoned=done.from_attempt,
                onset=min(done.onset, done.from_step),
                rolled_back_at=done.from_step,
                resumed_from=done.to_step,
                reason=str(done.reason),
                step=int(e.step),
                attempt=int(e.attempt),
            )
        )
    return found


def mapping(value: Any) -> Mapping[str, Any] | None:
    """``value`` when it is a mapping (a damaged record's field may be anything), else None."""
    return value if isinstance(value, Mapping) else None


def _data(events: pd.DataFrame, kind: EventKind, attempt: int) -> list[Mapping[str, Any]]:
    rows = events[(events.kind == kind) & (events.attempt == attempt)]
    return [d for d in rows.data if mapping(d)]


def _rollback_data(events: pd.DataFrame, incident: Incident) -> Mapping[str, Any]:
    rows = events[(events.kind == EventKind.ROLLBACK) & (events.step == incident.step)]
    mine = [d for d in rows[rows.attempt == incident.attempt].data if mapping(d)]
    return mine[-1] if mine else {}


def diagnosis(events: pd.DataFrame, incident: Incident) -> Mapping[str, Any] | None:
    """The replay diagnosis of the incident's spike: the ``diagnosis`` event's data (in the
    rollback's attempt, of its onset), else the short form the rollback itself carries (a
    verdict without trajectories); None when the rollback was not diagnosed."""
    full = [
        d
        for d in _data(events, EventKind.DIAGNOSIS, incident.attempt)
        if d.get("onset") == incident.onset
    ]
    return full[-1] if full else mapping(_rollback_data(events, incident).get("diagnosis"))


def forensics(events: pd.DataFrame, incident: Incident) -> Mapping[str, Any] | None:
    """The spike's forensics: a spike event's of the onset (with the batch's tokens per
    source), else the rollback's brief form (the top sequences only); None without."""
    spikes = [
        mapping(d.get("forensics")) for d in _data(events, EventKind.SPIKE, incident.abandoned)
    ]
    spikes = [f for f in spikes if f and f.get("onset") == incident.onset]
    return spikes[-1] if spikes else mapping(_rollback_data(events, incident).get("forensics"))


SUSPECT_COLUMNS = {  # forensics' top entry -> the table's column
    "loss": "loss (nats)",
    "source": "source",
    "doc_id": "document",
    "offset": "offset",
    "documents": "documents",
    "snippet": "snippet",
}


def suspects(found: Mapping[str, Any]) -> pd.DataFrame:
    """The onset batch's top sequences by loss, one row each, by their index in the batch."""
    top = [s for s in found.get("top") or [] if mapping(s)]
    rows = [{v: s.get(k) for k, v in SUSPECT_COLUMNS.items()} for s in top]
    index = pd.Index([s.get("index") for s in top], name="sequence")
    return pd.DataFrame(rows, columns=list(SUSPECT_COLUMNS.values()), index=index)


def source_mix(found: Mapping[str, Any]) -> pd.DataFrame:
    """The onset batch's tokens per source beside the mixture's expectation (empty for the
    brief form, which has neither)."""
    got = found.get("source_tokens") or {}
    expected = found.get("expected_source_tokens") or {}
    names = [*got, *(s for s in expected if s not in got)]
    return pd.DataFrame(
        {
            "source": names,
            "tokens": [got.get(s, 0) for s in names],
            "expected": [expected.get(s) for s in names],
        }
    )


# a trajectory's lists -> the metric they are (catalog names, for the charts' titles)
TRAJECTORY_METRICS = {"loss": catalog.TRAIN_LOSS.name, "grad_norm": catalog.GRAD_NORM.name}


def trajectories(found: Mapping[str, Any]) -> pd.DataFrame:
    """The diagnosis's trajectories, long: series (its label: recorded, replay,
    without_onset), metric (a catalog name), x (the step), value; non-finite values and
    steps without a grad norm are left out."""
    rows = []
    for t in filter(mapping, found.get("trajectories") or []):
        for key, metric in TRAJECTORY_METRICS.items():
            values = t.get(key) or []
            for step, value in zip(t.get("steps") or [], values, strict=False):
                if isinstance(value, int | float) and math.isfinite(value):
                    rows.append((t.get("label", "?"), metric, int(step), float(value)))
    return pd.DataFrame(rows, columns=["series", "metric", "x", "value"])
