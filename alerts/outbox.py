"""The chat notifier's record in a run directory: ``chat.jsonl``.

One line per message and channel when its delivery ends (``delivered``, or one of the
outcomes that keep it: ``gave_up``, ``refused``, ``undelivered``), with every attempt's
HTTP status where the channel sees it; and, when a notifier closes, one ``counts`` line
with its ``yoto_alerts_*`` counters, the values the exporter served last. A message not
delivered is kept: ``yoto alerts resend RUN_DIR`` and the next resume deliver it, and its
later ``delivered`` line (same ``id``) settles it. The latest line of an (id, channel)
says where it stands.

Messages that were not delivered are also told in ``events.jsonl`` (kind ``chat``), so
that the explorer's timeline and ``yoto runs show`` say so; they are appended beside the
run store, in one write each, and also after it closed (a notifier drains last).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from yoto import runstore
from yoto.events import Event, EventKind, Severity

log = logging.getLogger("yoto.notify")


class Outcome(StrEnum):
    DELIVERED = "delivered"
    GAVE_UP = "gave_up"  # retried for notify.give_up_after_seconds
    REFUSED = "refused"  # an answer no retry cures (HTTP 400, 401, 403, 404, ...)
    UNDELIVERED = "undelivered"  # still queued when the notifier closed (drain_seconds)


#: outcomes that keep a message for ``yoto alerts resend``
KEPT = (Outcome.GAVE_UP, Outcome.REFUSED, Outcome.UNDELIVERED)


@dataclass(frozen=True)
class Kept:
    """A message waiting to be delivered, as the outbox holds it."""

    id: str
    title: str
    body: str
    severity: Severity
    key: tuple
    step: int
    attempt: int
    delivered_to: frozenset[str]  # channels that did get it
    missing: frozenset[str]  # channels whose latest outcome keeps it


class Outbox:
    """Writes ``chat.jsonl`` (and the ``chat`` events) of one run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / runstore.CHAT

    def record(
        self,
        message: Any,
        channel: str,
        outcome: Outcome,
        attempts: Iterable[Any],
        *,
        resent: bool = False,
        waited: float = 0.0,
    ) -> None:
        """One message's delivery to one channel ended with ``outcome``."""
        tries = [a.to_json() for a in attempts]
        line = {
            "id": message.id,
            "channel": channel,
            "outcome": str(outcome),
            "attempts": tries,
            "resent": resent,
            "waited_seconds": round(waited, 3),
            "step": message.step,
            "attempt": message.attempt,
            "severity": str(message.severity),
            "key": list(message.key),
            "title": message.title,
            "body": message.body,
        }
        self._append(line)
        if outcome != Outcome.DELIVERED and outcome != Outcome.UNDELIVERED:
            statuses = [t["http"] for t in tries if t["http"] is not None]
            answered = f" (HTTP {', '.join(map(str, statuses))})" if statuses else ""
            why = (
                f"refused by {channel}{answered}"
                if outcome == Outcome.REFUSED
                else f"gave up on {channel} after {len(tries)} attempts in {waited:.0f} s{answered}"
            )
            self.event(
                message.step,
                message.attempt,
                f"chat message not delivered, {why}: {message.title}; kept for "
                f"'yoto alerts resend {self.run_dir}'",
                {"outcome": str(outcome), "channel": channel, "id": message.id},
            )

    def undelivered_at_close(self, step: int, attempt: int, by_channel: Mapping[str, int]) -> None:
        """The messages still queued when the notifier closed, in one event."""
        total = sum(by_channel.values())
        where = ", ".join(f"{n} to {c}" for c, n in sorted(by_channel.items()))
        self.event(
            step,
            attempt,
            f"{total} chat message(s) undelivered when the notifier closed ({where}); kept "
            f"for 'yoto alerts resend {self.run_dir}'",
            {"outcome": str(Outcome.UNDELIVERED), "undelivered": dict(by_channel)},
        )

    def counts(self, stats: Mapping[str, float]) -> None:
        """The notifier's counters (``yoto_alerts_*`` series keys) when it closed."""
        self._append({"counts": dict(stats)})

    def event(self, step: int, attempt: int, message: str, data: Mapping[str, Any]) -> None:
        event = Event(step, attempt, EventKind.CHAT, Severity.WARNING, message, dict(data))
        try:
            runstore.append_line(self.run_dir / runstore.EVENTS, event.to_json())
        except OSError as exc:
            log.error("could not write a chat event to %s: %s", self.run_dir, exc.strerror)

    def _append(self, line: Mapping[str, Any]) -> None:
        try:
            runstore.append_line(self.path, line)
        except OSError as exc:  # a full disk: the counters still say it
            log.error("could not write to %s: %s", self.path, exc.strerror or exc)


def read_lines(run_dir: str | Path) -> list[dict[str, Any]]:
    """``chat.jsonl``'s lines; a line cut by a crash, or garbage, is skipped (and logged)."""
    path = Path(run_dir) / runstore.CHAT
    if not path.is_file():
        return []
    lines, bad = [], 0
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(line, dict):
            lines.append(line)
    if bad:
        log.warning("%d unreadable line(s) of %s skipped", bad, path)
    return lines


def kept(run_dir: str | Path) -> list[Kept]:
    """The messages of a run that some channel has not got yet, oldest first."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    order: dict[str, int] = {}
    for line in read_lines(run_dir):
        if "id" not in line or "channel" not in line:
            continue
        order.setdefault(line["id"], len(order))
        latest[(line["id"], line["channel"])] = line
    by_id: dict[str, list[dict[str, Any]]] = {}
    for (msg_id, _), line in latest.items():
        by_id.setdefault(msg_id, []).append(line)
    out = []
    for msg_id, lines in sorted(by_id.items(), key=lambda item: order[item[0]]):
        missing = frozenset(x["channel"] for x in lines if x["outcome"] in KEPT)
        if not missing:
            continue
        first = lines[0]
        out.append(
            Kept(
                id=msg_id,
                title=first["title"],
                body=first["body"],
                severity=Severity(first.get("severity", Severity.WARNING)),
                key=tuple(first.get("key", ())),
                step=int(first.get("step", 0)),
                attempt=int(first.get("attempt", 0)),
                delivered_to=frozenset(
                    x["channel"] for x in lines if x["outcome"] == Outcome.DELIVERED
                ),
                missing=missing,
            )
        )
    return out


@dataclass(frozen=True)
class ChatSummary:
    """What ``yoto runs show`` says about a run's chat."""

    delivered: int  # (message, channel) deliveries
    attempts: int  # HTTP requests (or Apprise calls) made, retries included
    kept: int  # messages some channel has not got


def summarize(run_dir: str | Path) -> ChatSummary | None:
    lines = [line for line in read_lines(run_dir) if "id" in line]
    if not lines:
        return None
    return ChatSummary(
        delivered=sum(line.get("outcome") == Outcome.DELIVERED for line in lines),
        attempts=sum(len(line.get("attempts", [])) for line in lines),
        kept=len(kept(run_dir)),
    )
