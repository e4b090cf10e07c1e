"""The in-process chat notifier: the trainer's own voice in Slack, Discord, Teams,
Mattermost or any JSON webhook, through Apprise.

It is independent of Prometheus and Alertmanager on purpose: when the monitoring stack is
down, the run still says that it rolled back. The training loop only ever calls
:meth:`ChatNotifier.notify`, which filters, de-duplicates, rate-limits and enqueues in
microseconds and never raises. A daemon thread delivers, in order, to every channel:

- a failed delivery is retried with exponential backoff (with jitter, up to
  ``notify.max_backoff_seconds``); a message waits for its channel to come back rather
  than being lost, for up to ``notify.give_up_after_seconds``;
- the queue is bounded (``notify.queue_size``): when it is full the oldest non-critical
  message is dropped, never a critical one while a non-critical one is queued;
- failures are counted (``yoto_alerts_failed_total{channel}``) and logged with the
  channel's scheme only: a webhook URL is a secret and never appears in a log.

Apprise is used only through its public surface: the request timeouts travel in each URL
as Apprise's own ``cto``/``rto`` parameters, and a delivery's outcome is the truth value
of ``Apprise.notify``. The retrying is the notifier's, not Apprise's (``?retry=`` sleeps
inside the call, a few times, on the wall clock), because a message must wait minutes
to hours for its channel and a closing run must be able to stop the wait. All waiting
goes through an injected :class:`Clock`, so tests move time instead of sleeping.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from yoto import catalog
from yoto.config import REDACTED, NotifyConfig
from yoto.errors import ConfigError
from yoto.events import Event, EventKind, Rollback, Severity

log = logging.getLogger("yoto.notify")

_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


# --- where the URLs come from ---------------------------------------------------------------


def resolve_urls(cfg: NotifyConfig, environ: Mapping[str, str] | None = None) -> list[str]:
    """Chat URLs from the config, the environment variable it names and the file it names
    (one URL per line or separated by whitespace/commas; ``#`` starts a comment)."""
    environ = os.environ if environ is None else environ
    urls: list[str] = []
    for url in cfg.webhook_urls:
        if url == REDACTED:  # a resumed run's saved config: the secret was never written
            log.warning(
                "a notify URL in the saved config is redacted; give it again through $%s "
                "or notify.urls_file",
                cfg.urls_env,
            )
            continue
        urls.append(url)
    if cfg.urls_env and environ.get(cfg.urls_env):
        urls.extend(_split(environ[cfg.urls_env]))
    if cfg.urls_file:
        path = Path(cfg.urls_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"notify.urls_file={cfg.urls_file!r} is not a readable file")
        lines = [line.split("#", 1)[0] for line in path.read_text().splitlines()]
        urls.extend(_split("\n".join(lines)))
    for url in urls:
        if "://" not in url:
            raise ConfigError(
                f"notify URL {channel_of(url)!r}... is not an Apprise URL (scheme://...), e.g. "
                "slack://TokenA/TokenB/TokenC, discord://id/token, msteams://..., "
                "mmost://host/token, json://host:port/path"
            )
    return list(dict.fromkeys(urls))


def _split(text: str) -> list[str]:
    return [u for u in text.replace(",", " ").split() if u]


def channel_of(url: str) -> str:
    """The label and log name of a channel: the URL's scheme (never the secret part)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else url[:6]
    return scheme.removesuffix("s") if scheme in ("jsons", "mmosts", "xmls") else scheme


# --- messages -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    title: str
    body: str
    severity: Severity
    key: tuple


def what_the_policy_did(event: Event) -> str:
    data = event.data
    kind = event.kind
    if kind == EventKind.ROLLBACK:
        done = Rollback.from_data(data)
        return (
            f"rolled back to step {done.to_step}, skipped {done.skipped_batches} batches "
            f"(attempt {done.attempt})"
        )
    if kind == EventKind.HALT:
        return f"halted the run. {data.get('advice', '')}".strip()
    if kind == EventKind.ALERT:
        return f"action: {data.get('action', 'alert')}"
    if kind == EventKind.LR_COOLDOWN:
        return f"LR x {data.get('factor', '?')} until step {data.get('until', '?')}"
    if kind == EventKind.BATCH_SIZE:
        return f"global batch {data.get('previous', '?')} -> {data.get('new', '?')}"
    if kind == EventKind.END:
        return f"run ended: {data.get('status', '?')}"
    return "none (for your information)"


def format_message(event: Event, run: Mapping[str, str], link: str | None) -> Message:
    name = run.get("name", "run")
    title = f"[yoto] {event.severity.upper()} {event.kind}: {name} at step {event.step}"
    lines = [
        f"run: {name} ({run.get('run', '?')}), step {event.step}, attempt {event.attempt}",
        f"what happened: {event.message}",
        f"what yoto did: {what_the_policy_did(event)}",
    ]
    if link:
        lines.append(f"dashboard: {link}")
    key = (str(event.kind), event.data.get("reason"), event.data.get("onset", event.step))
    return Message(title, "\n".join(lines), event.severity, key)


# --- time ---------------------------------------------------------------------------------


class Clock(Protocol):
    """The notifier's time: de-duplication, rate limit, backoff, give-up and drain all read
    it, and every wait goes through it, so a test can move time instead of sleeping."""

    def now(self) -> float:
        """Seconds on a clock that never goes back."""

    def wait(self, cond: threading.Condition, seconds: float) -> None:
        """Wait on ``cond`` (held by the caller) for up to ``seconds`` of this clock; may
        return early when ``cond`` is notified (the notifier re-checks what it waits for)."""


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    def wait(self, cond: threading.Condition, seconds: float) -> None:
        cond.wait(timeout=max(0.0, seconds))


# --- channels -----------------------------------------------------------------------------

# Apprise's HTTP plugins read their socket timeouts from these URL parameters (cto: connect,
# rto: read; URLBase.template_args), the documented way to set them per service.
_CONNECT_TIMEOUT, _READ_TIMEOUT = "cto", "rto"
_MAX_CONNECT_SECONDS = 4.0  # a live endpoint accepts within this, whatever the read timeout


def with_timeouts(url: str, connect: float, read: float) -> str:
    """``url`` with Apprise's ``cto``/``rto`` parameters added; ones the URL already has win.
    Apprise takes everything after the first ``?`` as its query, as this does."""
    base, sep, query = url.partition("?")
    given = {key.lower() for key in urllib.parse.parse_qs(query, keep_blank_values=True)}
    extra = [
        f"{key}={seconds:g}"
        for key, seconds in ((_CONNECT_TIMEOUT, connect), (_READ_TIMEOUT, read))
        if key not in given
    ]
    if not extra:
        return url
    return base + "?" + "&".join(([query] if sep and query else []) + extra)


class _Channel:
    """One chat URL and the Apprise object that delivers to it.

    What a delivery attempt can know, without reaching into ``requests``: the truth value
    of ``Apprise.notify`` (its documented result, in Apprise 1.x a bool and in 2.x an
    ``AppriseResult``), which says whether the endpoint accepted the message. The HTTP status
    appears only in the wording of a plugin's log line and the ``Retry-After`` header
    nowhere, so neither is relied on: a refusal, 429 included, is retried with the same
    exponential backoff as a dead endpoint. Apprise's Discord plugin honours Discord's
    own rate-limit headers inside the call, and the notifier's rate limit
    (``notify.rate_limit_per_minute``) keeps it well under the chat services' limits.
    """

    def __init__(self, url: str, timeout: float) -> None:
        import apprise

        self.name = channel_of(url)
        self.apprise = apprise.Apprise()
        connect = min(timeout, _MAX_CONNECT_SECONDS)
        if not self.apprise.add(with_timeouts(url, connect=connect, read=timeout)):
            raise ConfigError(
                f"Apprise does not understand the {self.name}:// URL given for chat "
                "notifications; see https://github.com/caronc/apprise/wiki for its form"
            )

    def send(self, message: Message) -> bool:
        """Deliver once; True when the endpoint accepted the message."""
        import apprise

        kind = {
            Severity.INFO: apprise.NotifyType.INFO,
            Severity.WARNING: apprise.NotifyType.WARNING,
            Severity.CRITICAL: apprise.NotifyType.FAILURE,
        }[message.severity]
        try:
            return bool(
                self.apprise.notify(title=message.title, body=message.body, notify_type=kind)
            )
        except Exception as exc:  # a plugin bug must not kill the delivery thread
            log.warning("chat delivery to %s raised %s", self.name, type(exc).__name__)
            return False


class ChatNotifier:
    """A :class:`~yoto.events.Sink`-shaped notifier (``write_event``) with delivery
    counters for the exporter (``stats``). ``clock`` and ``rng`` (the backoff's jitter) are
    for tests; a run uses the monotonic clock."""

    def __init__(
        self,
        urls: list[str],
        cfg: NotifyConfig,
        run: Mapping[str, str] | None = None,
        link: str | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.run = dict(run or {})
        self.link = link
        self.clock = clock or MonotonicClock()
        self._rng = rng or random.Random()
        self.channels = [_Channel(url, cfg.timeout_seconds) for url in urls]
        self._queue: collections.deque[Message] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._drain_deadline = float("inf")
        self._seen: dict[tuple, float] = {}
        self._tokens = float(cfg.rate_limit_burst)
        self._refilled = self.clock.now()
        self.sent: dict[str, int] = collections.Counter()
        self.failed: dict[str, int] = collections.Counter()
        self.dropped: dict[str, int] = collections.Counter()
        self._thread = threading.Thread(target=self._deliver_forever, name="yoto-notify")
        self._thread.daemon = True
        self._thread.start()

    # --- the training loop's side (never blocks, never raises) -----------------------------

    def wants(self, event: Event) -> bool:
        cfg = self.cfg
        return (
            _SEVERITY_RANK[event.severity] >= _SEVERITY_RANK[Severity(cfg.min_severity)]
            and str(event.kind) not in cfg.exclude_kinds
        )

    def notify(self, event: Event) -> None:
        try:
            if self.channels and self.wants(event):
                self.enqueue(format_message(event, self.run, self._link(event)))
        except Exception:  # the notifier never stops a run
            log.exception("chat notifier: could not queue an event")

    def enqueue(self, message: Message) -> bool:
        now = self.clock.now()
        with self._cond:
            last = self._seen.get(message.key)
            if last is not None and now - last < self.cfg.dedup_seconds:
                self.dropped["duplicate"] += 1
                return False
            if message.severity != Severity.CRITICAL and not self._take_token(now):
                self.dropped["rate_limited"] += 1
                return False
            if len(self._queue) >= self.cfg.queue_size and not self._make_room(message):
                self.dropped["queue_full"] += 1
                return False
            self._seen[message.key] = now  # only once queued: a dropped one may come again
            self._queue.append(message)
            self._cond.notify()
        return True

    # --- so that it can sit among the live sinks ---

    write_event = notify

    def bind_run(self, run: Mapping[str, str]) -> dict[str, Any]:
        self.run.update(run)
        return {"notify_channels": [c.name for c in self.channels]}

    def write_step(self, attempt: int, step: int, values: Mapping[str, float]) -> None:
        pass

    def flush(self) -> None:
        pass

    def _take_token(self, now: float) -> bool:
        rate = self.cfg.rate_limit_per_minute / 60.0
        self._tokens = min(self.cfg.rate_limit_burst, self._tokens + (now - self._refilled) * rate)
        self._refilled = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _make_room(self, incoming: Message) -> bool:
        """Drop the oldest queued non-critical message (not the one in flight at the head);
        a critical message displaces the oldest critical one only when nothing else is
        queued. False: the incoming message is the one to drop."""
        for i in range(1, len(self._queue)):
            if self._queue[i].severity != Severity.CRITICAL:
                del self._queue[i]
                self.dropped["queue_full"] += 1
                return True
        if incoming.severity == Severity.CRITICAL and len(self._queue) > 1:
            del self._queue[1]
            self.dropped["queue_full"] += 1
            return True
        return False

    def _link(self, event: Event) -> str | None:
        if not self.link:
            return None
        fields = {**self.run, "step": str(event.step)}
        try:
            return self.link.format(**fields)
        except (KeyError, IndexError, ValueError):
            return self.link

    # --- the delivery thread --------------------------------------------------------------

    def _deliver_forever(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue or (self._closing and self._past_drain()):
                    return
                message = self._queue[0]
            delivered = self._deliver(message)
            with self._cond:
                if delivered and self._queue and self._queue[0] is message:
                    self._queue.popleft()

    def _deliver(self, message: Message) -> bool:
        """True when the message is done with (delivered, or given up on); False when the
        notifier is closing and it stays queued."""
        pending = list(self.channels)
        delay = self.cfg.backoff_seconds
        started = self.clock.now()
        while True:
            pending = [channel for channel in pending if not self._send(channel, message)]
            if not pending:
                return True
            if self._closing and self._past_drain():
                return False  # stays queued; close() counts and logs what is left
            waited = self.clock.now() - started
            if waited >= self.cfg.give_up_after_seconds:
                self.dropped["gave_up"] += 1
                log.error(
                    "chat delivery to %s abandoned after %.0f s: %s",
                    ", ".join(c.name for c in pending),
                    waited,
                    message.title,
                )
                return True
            self._back_off(delay)
            delay = min(delay * 2, self.cfg.max_backoff_seconds)

    def _send(self, channel: _Channel, message: Message) -> bool:
        if channel.send(message):
            self.sent[channel.name] += 1
            return True
        self.failed[channel.name] += 1
        log.warning("chat delivery to %s failed; will retry", channel.name)
        return False

    def _back_off(self, delay: float) -> None:
        """Wait about ``delay`` (jittered, so that restarted runs do not retry in step);
        close() cuts the wait short, and while draining it never passes the deadline."""
        seconds = delay * self._rng.uniform(0.8, 1.2)
        with self._cond:
            if self._closing:
                seconds = min(seconds, max(0.0, self._drain_deadline - self.clock.now()))
            self.clock.wait(self._cond, seconds)

    def _past_drain(self) -> bool:
        return self.clock.now() >= self._drain_deadline

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, status: str = "", timeout: float | None = None) -> None:
        """Deliver what is queued, for up to ``notify.drain_seconds``, then stop."""
        timeout = self.cfg.drain_seconds if timeout is None else timeout
        self._drain_deadline = self.clock.now() + timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout + 1.0)  # real seconds: in case a request hangs
        left = self.pending()
        if left:
            self.dropped["gave_up"] += left
            log.error("chat notifier stopped with %d message(s) undelivered", left)

    # --- counters for the exporter --------------------------------------------------------

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for channel in self.channels:
            out[catalog.ALERTS_SENT.key(channel=channel.name)] = float(self.sent[channel.name])
            out[catalog.ALERTS_FAILED.key(channel=channel.name)] = float(self.failed[channel.name])
        for reason in ("duplicate", "rate_limited", "queue_full", "gave_up"):
            out[catalog.ALERTS_DROPPED.key(reason=reason)] = float(self.dropped[reason])
        return out
