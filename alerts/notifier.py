"""The in-process chat notifier: the trainer's own voice in Slack, Discord, Teams,
Mattermost or any JSON webhook, through Apprise.

It is independent of Prometheus and Alertmanager on purpose: when the monitoring stack is
down, the run still says that it rolled back. The training loop only ever calls
:meth:`ChatNotifier.notify`, which filters, de-duplicates, rate-limits and enqueues in
microseconds and never raises. A daemon thread delivers, in order, to every channel:

- a failed delivery is retried after what the endpoint asked (``Retry-After``, where the
  channel sees the response) or else with exponential backoff (with jitter, up to
  ``notify.max_backoff_seconds``); a message waits for its channel to come back rather
  than being lost, for up to ``notify.give_up_after_seconds``; a refusal no retry cures
  (HTTP 400, 401, 404, ...) ends the attempts at once;
- the queue is bounded (``notify.queue_size``): when it is full the oldest non-critical
  message is dropped, never a critical one while a non-critical one is queued;
- attempts are counted (``yoto_alerts_sent_total`` / ``yoto_alerts_failed_total`` per
  channel: together, the requests the endpoint saw) and logged with the channel's scheme
  only: a webhook URL is a secret and never appears in a log;
- bound to a run directory, every delivery's end is recorded in its outbox
  (``chat.jsonl``, :mod:`yoto.alerts.outbox`); a message not delivered (given up,
  refused, or still queued at the end) is kept there, told as a ``chat`` event, and
  delivered by ``yoto alerts resend RUN_DIR`` or the run's next resume.

Apprise parses every URL and delivers to every service but one: a JSON webhook
(``json://``) is posted by the notifier itself (:class:`_JsonWebhook`, the same body as
Apprise's), because Apprise keeps a plugin's HTTP response to itself and the notifier
needs its status and ``Retry-After``. The request timeouts travel in each URL as
Apprise's own ``cto``/``rto`` parameters. The retrying is the notifier's, not Apprise's
(``?retry=`` sleeps inside the call, a few times, on the wall clock), because a message
must wait minutes to hours for its channel and a closing run must be able to stop the
wait. All waiting goes through an injected :class:`Clock`, so tests move time instead of
sleeping.
"""

from __future__ import annotations

import collections
import email.utils
import json
import logging
import os
import random
import threading
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from yoto import catalog
from yoto.alerts.outbox import KEPT, Kept, Outbox, Outcome, kept
from yoto.config import REDACTED, NotifyConfig
from yoto.errors import ConfigError
from yoto.events import (
    Event,
    EventKind,
    Rollback,
    Severity,
    describe_ranks,
    describe_suspects,
)

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
    key: tuple  # what de-duplication compares: (kind, reason, onset)
    step: int = 0  # of the event it tells
    attempt: int = 0
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # its outbox lines'


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


def what_the_evidence_says(event: Event) -> list[str]:
    """The lines a spike's forensics and a rollback's replay diagnosis add (trainer/
    diagnose.py): the sequences the onset step trained on, and why it spiked."""
    lines = []
    diagnosis = event.data.get("diagnosis")
    if event.kind == EventKind.DIAGNOSIS:
        diagnosis = event.data
    if diagnosis:
        lines.append(f"diagnosis: {diagnosis.get('cause', '?')}: {diagnosis.get('finding', '')}")
        named = describe_ranks(diagnosis)
        if named:
            lines.append(f"suspect rank(s): {named}")
    forensics = event.data.get("forensics")
    suspects = describe_suspects(forensics)
    if suspects:
        lines.append(f"suspect sequences (batch of step {forensics.get('onset', '?')}):")
        lines += [f"  {line}" for line in suspects]
    return lines


def format_message(event: Event, run: Mapping[str, str], link: str | None) -> Message:
    name = run.get("name", "run")
    title = f"[yoto] {event.severity.upper()} {event.kind}: {name} at step {event.step}"
    lines = [
        f"run: {name} ({run.get('run', '?')}), step {event.step}, attempt {event.attempt}",
        f"what happened: {event.message}",
        f"what yoto did: {what_the_policy_did(event)}",
    ]
    lines += what_the_evidence_says(event)
    if link:
        lines.append(f"dashboard: {link}")
    key = (str(event.kind), event.data.get("reason"), event.data.get("onset", event.step))
    return Message(title, "\n".join(lines), event.severity, key, event.step, event.attempt)


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
# refusals a retry can cure: timeout, conflict, too early, too many requests (and any 5xx)
_RETRYABLE_4XX = frozenset({408, 409, 425, 429})


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


def retry_after_seconds(value: str | None, wall_now: float | None = None) -> float | None:
    """An HTTP ``Retry-After`` header in seconds: a number of seconds or an HTTP date
    (RFC 9110 10.2.3); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    wall_now = time.time() if wall_now is None else wall_now
    return max(0.0, when.timestamp() - wall_now)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery attempt to one channel, as far as the channel can see it."""

    delivered: bool
    http_status: int | None = None  # where the channel sees the response
    retry_after: float | None = None  # seconds the endpoint asked for (Retry-After)
    final: bool = False  # refused in a way no retry cures (a 4xx such as 400, 401, 404)
    error: str = ""  # no answer: why (the exception's type; never its text, it has the URL)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.delivered, "http": self.http_status, "retry_after": self.retry_after}


def _severity_type(severity: Severity) -> Any:
    import apprise

    return {
        Severity.INFO: apprise.NotifyType.INFO,
        Severity.WARNING: apprise.NotifyType.WARNING,
        Severity.CRITICAL: apprise.NotifyType.FAILURE,
    }[severity]


class _Channel:
    """One chat URL, delivered through Apprise.

    What an attempt can know, without reaching into ``requests``: the truth value of
    ``Apprise.notify`` (its documented result, in Apprise 1.x a bool and in 2.x an
    ``AppriseResult``), which says whether the endpoint accepted the message. Apprise
    keeps the HTTP response to itself (the status appears only in a log line's wording,
    ``Retry-After`` nowhere), so a refusal here gets the notifier's exponential backoff;
    Apprise's Discord plugin honours Discord's rate-limit headers inside the call, and the
    notifier's rate limit keeps well under the chat services' limits. JSON webhooks go
    through :class:`_JsonWebhook` instead, which sees the response.
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

    def send(self, message: Message) -> Attempt:
        try:
            ok = self.apprise.notify(
                title=message.title, body=message.body, notify_type=_severity_type(message.severity)
            )
        except Exception as exc:  # a plugin bug must not kill the delivery thread
            log.warning("chat delivery to %s raised %s", self.name, type(exc).__name__)
            return Attempt(False)
        return Attempt(bool(ok))


class _JsonWebhook(_Channel):
    """A ``json://`` / ``jsons://`` webhook: the URL is Apprise's (parsed by Apprise, with
    its headers, query parameters, payload mapping, method, credentials and timeouts), the
    request is yoto's, so that the response is seen: a ``Retry-After`` is honoured and a
    refusal no retry cures (400, 401, 404...) is told apart from one that passes (429,
    5xx). The body is byte for byte what Apprise's JSON plugin posts (a test compares them)."""

    def __init__(self, url: str, timeout: float) -> None:
        super().__init__(url, timeout)
        (self.plugin,) = self.apprise  # Apprise's NotifyJSON, holding the parsed URL
        self.session = None

    def _request(self, message: Message) -> tuple[str, dict[str, Any]]:
        p = self.plugin
        payload: dict[str, Any] = {
            "version": p.json_version,
            "title": message.title,
            "message": message.body,
            "attachments": [],
            "type": _severity_type(message.severity).value,
        }
        for key, value in p.payload_extras.items():  # Apprise's ':key=value' URL mapping
            if key in payload:
                if value:
                    payload[value] = payload[key]
                del payload[key]
            else:
                payload[key] = value
        port = f":{p.port}" if isinstance(p.port, int) else ""
        url = f"{'https' if p.secure else 'http'}://{p.host}{port}{p.fullpath}"
        kwargs = {
            "data": json.dumps(payload),
            "params": p.params,
            "headers": {"User-Agent": p.app_id, "Content-Type": "application/json", **p.headers},
            "auth": p.request_auth,
            "verify": p.verify_certificate,
            "timeout": p.request_timeout,
            "allow_redirects": getattr(p, "redirects", True),
        }
        return url, kwargs

    def send(self, message: Message) -> Attempt:
        import requests

        if self.session is None:
            self.session = requests.Session()
        url, kwargs = self._request(message)
        try:
            response = self.session.request(self.plugin.method, url, **kwargs)
        except requests.RequestException as exc:
            return Attempt(False, error=type(exc).__name__)
        status = response.status_code
        response.close()
        if 200 <= status < 300:
            return Attempt(True, status)
        return Attempt(
            False,
            status,
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            final=400 <= status < 500 and status not in _RETRYABLE_4XX,
        )


def make_channel(url: str, timeout: float) -> _Channel:
    if channel_of(url) == "json":
        return _JsonWebhook(url, timeout)
    return _Channel(url, timeout)


@dataclass
class _Pending:
    """A queued message and the channels that have not got it yet."""

    message: Message
    channels: list[_Channel]
    attempts: dict[str, list[Attempt]] = field(default_factory=dict)
    resent: bool = False  # from the outbox (a resume, or yoto alerts resend)


class ChatNotifier:
    """A :class:`~yoto.events.Sink`-shaped notifier (``write_event``) with delivery
    counters for the exporter (``stats``). ``clock`` and ``rng`` (the backoff's jitter) are
    for tests; a run uses the monotonic clock.

    What is counted, exactly: ``sent`` and ``failed`` per channel are attempts (a request,
    or one Apprise call), so that together they are the requests an endpoint saw;
    ``dropped`` counts messages, per channel for the outcomes of delivery (``gave_up``,
    ``refused``, ``undelivered``) and per message for the filters before the queue
    (``duplicate``, ``rate_limited``, ``queue_full``). Bound to a run directory
    (:meth:`bind_run`), every delivery's end goes to its outbox (:mod:`.outbox`)."""

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
        self.channels = [make_channel(url, cfg.timeout_seconds) for url in urls]
        self.outbox: Outbox | None = None
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._drain_deadline = float("inf")
        self._seen: dict[tuple, float] = {}
        self._tokens = float(cfg.rate_limit_burst)
        self._refilled = self.clock.now()
        self._last_event = (0, 0)  # (step, attempt) of the newest event told
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
            self._last_event = (event.step, event.attempt)
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
            self._queue.append(_Pending(message, list(self.channels)))
            self._cond.notify()
        return True

    def resend(self, messages: list[Kept]) -> int:
        """Queue messages kept in the outbox, for the channels that have not got them (by
        name), past de-duplication and the rate limit (they passed both once). Returns how
        many were queued."""
        queued = 0
        with self._cond:
            for old in messages:
                channels = [c for c in self.channels if c.name not in old.delivered_to]
                if not channels:
                    continue
                message = Message(
                    old.title, old.body, old.severity, old.key, old.step, old.attempt, old.id
                )
                self._queue.append(_Pending(message, channels, resent=True))
                queued += 1
            self._cond.notify()
        return queued

    # --- so that it can sit among the live sinks ---

    write_event = notify

    def bind_run(self, run: Mapping[str, str]) -> dict[str, Any]:
        """Told which run it serves; with the run's directory (``dir``), deliveries are
        recorded there, and messages an earlier process kept are queued first."""
        self.run.update({k: v for k, v in run.items() if k != "dir"})
        if run.get("dir"):
            self.outbox = Outbox(run["dir"])
            waiting = kept(run["dir"])
            if waiting and self.channels:
                log.info("chat: %d kept message(s) queued again", self.resend(waiting))
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
            if self._queue[i].message.severity != Severity.CRITICAL:
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
                item = self._queue[0]
            done = self._deliver(item)
            with self._cond:
                if done and self._queue and self._queue[0] is item:
                    self._queue.popleft()

    def _deliver(self, item: _Pending) -> bool:
        """True when the message is done with on every channel (delivered, refused, or
        given up on); False when the notifier is closing and it stays queued.

        Between rounds it waits what the endpoints asked (``Retry-After``), else the
        jittered exponential backoff; a message queued meanwhile does not shorten it."""
        delay = self.cfg.backoff_seconds
        started = self.clock.now()
        while True:
            asked: list[float] = []
            backoff = False
            for channel in list(item.channels):
                attempt = self._send(channel, item)
                if attempt.delivered:
                    self._finish(item, channel, Outcome.DELIVERED, started)
                elif attempt.final:
                    self._finish(item, channel, Outcome.REFUSED, started)
                elif attempt.retry_after is not None:
                    asked.append(attempt.retry_after)
                else:
                    backoff = True
            if not item.channels:
                return True
            if self._closing and self._past_drain():
                return False  # stays queued; close() records what is left
            waited = self.clock.now() - started
            if waited >= self.cfg.give_up_after_seconds:
                for channel in list(item.channels):
                    self._finish(item, channel, Outcome.GAVE_UP, started)
                return True
            server_wait = min(max(asked), self.cfg.give_up_after_seconds) if asked else 0.0
            jittered = delay * self._rng.uniform(0.8, 1.2) if backoff else 0.0
            self._wait(max(server_wait, jittered), keep_at_close=server_wait)
            if backoff:
                delay = min(delay * 2, self.cfg.max_backoff_seconds)

    def _send(self, channel: _Channel, item: _Pending) -> Attempt:
        attempt = channel.send(item.message)
        item.attempts.setdefault(channel.name, []).append(attempt)
        if attempt.delivered:
            self.sent[channel.name] += 1
        else:
            self.failed[channel.name] += 1
            answer = (
                f"HTTP {attempt.http_status}"
                if attempt.http_status
                else f"no answer{': ' + attempt.error if attempt.error else ''}"
            )
            after = "" if attempt.final else "; will retry"
            log.warning("chat delivery to %s failed (%s)%s", channel.name, answer, after)
        return attempt

    def _finish(self, item: _Pending, channel: _Channel, outcome: Outcome, started: float) -> None:
        item.channels.remove(channel)
        waited = self.clock.now() - started
        if outcome != Outcome.DELIVERED:
            self.dropped[str(outcome)] += 1
            log.error(
                "chat delivery to %s %s after %.0f s: %s",
                channel.name,
                "refused" if outcome == Outcome.REFUSED else "abandoned",
                waited,
                item.message.title,
            )
        if self.outbox is not None:
            attempts = item.attempts.get(channel.name, [])
            self.outbox.record(
                item.message, channel.name, outcome, attempts, resent=item.resent, waited=waited
            )

    def _wait(self, seconds: float, keep_at_close: float) -> None:
        """Wait ``seconds`` of the clock, whatever wakes the condition meanwhile (a new
        message, a spurious wakeup), and never past the drain deadline. When close() begins
        during the wait, only the part the endpoint asked for (``keep_at_close``) is kept:
        a backoff gives way to one more try while the run ends."""
        with self._cond:
            start, closing_before = self.clock.now(), self._closing
            while True:
                end = start + seconds
                if self._closing:
                    cut = end if closing_before else start + keep_at_close
                    end = min(cut, self._drain_deadline)
                now = self.clock.now()
                if now >= end:
                    return
                self.clock.wait(self._cond, end - now)

    def _past_drain(self) -> bool:
        return self.clock.now() >= self._drain_deadline

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, status: str = "", timeout: float | None = None) -> None:
        """Deliver what is queued, for up to ``notify.drain_seconds``, then stop; what is
        left is counted ``undelivered`` and kept in the outbox."""
        timeout = self.cfg.drain_seconds if timeout is None else timeout
        self._drain_deadline = self.clock.now() + timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        # real seconds: a request in flight ends within its own timeout
        self._thread.join(timeout + self.cfg.timeout_seconds + 1.0)
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
        by_channel: dict[str, int] = collections.Counter()
        for item in left:
            for channel in list(item.channels):
                self._finish(item, channel, Outcome.UNDELIVERED, self.clock.now())
                by_channel[channel.name] += 1
        if by_channel:
            log.error(
                "chat notifier stopped with %d message(s) undelivered%s",
                len(left),
                f"; kept for 'yoto alerts resend {self.outbox.run_dir}'" if self.outbox else "",
            )
        if self.outbox is not None:
            if by_channel:
                self.outbox.undelivered_at_close(*self._last_event, by_channel)
            self.outbox.counts(self.stats())

    # --- counters for the exporter --------------------------------------------------------

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for channel in self.channels:
            out[catalog.ALERTS_SENT.key(channel=channel.name)] = float(self.sent[channel.name])
            out[catalog.ALERTS_FAILED.key(channel=channel.name)] = float(self.failed[channel.name])
        for reason in DROP_REASONS:
            out[catalog.ALERTS_DROPPED.key(reason=reason)] = float(self.dropped[reason])
        return out


#: the ``reason`` label of ``yoto_alerts_dropped_total``
DROP_REASONS = ("duplicate", "rate_limited", "queue_full", *map(str, KEPT))
