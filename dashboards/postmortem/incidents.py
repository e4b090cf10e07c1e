"""Incidents: what each rollback undid, as the step window the Timeline opens on.

A rollback event (written by the trainer when the policy rolls back) says where the
abandoned attempt got to (``from_step``), the checkpoint the next attempt restarted from
(``to_step``) and where the trouble began (``onset``). The window reaches from the
checkpoint to a little past the rollback, so the abandoned branch, its spike and the
surviving branch that replaced it are all in view; a checkpoint far before the onset is
cut off so that a few-step spike still gets a visible share of the chart's width.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

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
            )
        )
    return found
