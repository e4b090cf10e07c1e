"""The in-process chat notifier: the trainer's own voice in Slack, Discord, Teams,
Mattermost or any JSON webhook, through Apprise.

It is independent of Prometheus and Alertmanager on purpose: when the monitoring stack is
down, the run still says that it rolled back. The training loop only ever calls
:meth:`ChatNotifier.notify`, which filters, de-duplicates, rate-limits and enqueues in
microseconds and never raises. A daemon thread delivers, in order, to every channel:

- a failed delivery is retried with exponential backoff (with jitter), honouring the
  endpoint's ``Retry-After``; a message waits for its channel to come back rather than
  being lost, for up to ``notify.give_up_after_seconds``;
- the queue is bounded (``notify.queue_size``): when it is full the oldest non-critical
  message is dropped, never a critical one while a non-critical one is queued;
- failures are counted (``yoto_alerts_failed_total{channel}``) and logged with the
  channel's scheme only: a webhook URL is a secret and never appears in a log.

Apprise reports success as a bool; to read ``Retry-After`` the notifier thread captures the
HTTP responses of its own calls through a pass-through wrapper of ``requests``' send that
is inert on every other thread.
"""

from __future__ import annotations

import collections
import email.utils
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yoto import catalog
from yoto.config import REDACTED, NotifyConfig
from yoto.errors import ConfigError
from yoto.events import Event, Severity

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
    created: float = field(default_factory=time.time)


def what_the_policy_did(event: Event) -> str:
    data = event.data
    kind = str(event.kind)
    if kind == "rollback":
        return (
            f"rolled back to step {data.get('to_step', '?')}, skipped "
            f"{data.get('skipped_batches', '?')} batches (attempt {event.attempt})"
        )
    if kind == "halt":
        return f"halted the run. {data.get('advice', '')}".strip()
    if kind == "alert":
        return f"action: {data.get('action', 'alert')}"
    if kind == "lr_cooldown":
        return f"LR x {data.get('factor', '?')} until step {data.get('until', '?')}"
    if kind == "batch_size":
        return f"global batch {data.get('previous', '?')} -> {data.get('new', '?')}"
    if kind == "end":
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


# --- capturing Retry-After ----------------------------------------------------------------

_capture = threading.local()
_wrap_lock = threading.Lock()


def _install_response_capture() -> None:
    import requests

    with _wrap_lock:
        if getattr(requests.Session.send, "_yoto_capture", False):
            return
        original = requests.Session.send

        def send(self: Any, request: Any, **kwargs: Any) -> Any:
            response = original(self, request, **kwargs)
            if getattr(_capture, "responses", None) is not None:
                _capture.responses.append((response.status_code, dict(response.headers)))
            return response

        send._yoto_capture = True  # type: ignore[attr-defined]
        requests.Session.send = send  # type: ignore[method-assign]


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """``Retry-After`` as seconds: a number, or an HTTP date."""
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    value = value.strip()
    if value.replace(".", "", 1).isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


# --- the notifier -------------------------------------------------------------------------


class _Channel:
    def __init__(self, url: str, timeout: float) -> None:
        import apprise

        self.name = channel_of(url)
        self.apprise = apprise.Apprise()
        if not self.apprise.add(url):
            raise ConfigError(
                f"Apprise does not understand the {self.name}:// URL given for chat "
                "notifications; see https://github.com/caronc/apprise/wiki for its form"
            )
        for server in self.apprise:
            server.socket_connect_timeout = min(timeout, 4.0)
            server.socket_read_timeout = timeout

    def send(self, message: Message) -> tuple[bool, float | None]:
        """Deliver once. Returns (delivered, Retry-After seconds if the endpoint gave one)."""
        import apprise

        kind = {
            Severity.INFO: apprise.NotifyType.INFO,
            Severity.WARNING: apprise.NotifyType.WARNING,
            Severity.CRITICAL: apprise.NotifyType.FAILURE,
        }[message.severity]
        _capture.responses = []
        try:
            # each plugin directly, on this thread: Apprise.notify may fan out to a pool,
            # where this thread's response capture cannot see Retry-After
            ok = all(
                bool(server.notify(title=message.title, body=message.body, notify_type=kind))
                for server in self.apprise
            )
        except Exception as exc:  # a plugin bug must not kill the delivery thread
            log.warning("chat delivery to %s raised %s", self.name, type(exc).__name__)
            ok = False
        finally:
            responses, _capture.responses = _capture.responses, None
        retry = None
        for status, headers in responses:
            if status in (429, 503) or status >= 500:
                retry = retry_after_seconds(headers)
        return ok, retry


class ChatNotifier:
    """A :class:`~yoto.events.Sink`-shaped notifier (``write_event``) with delivery
    counters for the exporter (``stats``)."""

    def __init__(
        self,
        urls: list[str],
        cfg: NotifyConfig,
        run: Mapping[str, str] | None = None,
        link: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _install_response_capture()
        self.cfg = cfg
        self.run = dict(run or {})
        self.link = link
        self.clock = clock
        self.channels = [_Channel(url, cfg.timeout_seconds) for url in urls]
        self._queue: collections.deque[Message] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._drain_deadline = float("inf")
        self._seen: dict[tuple, float] = {}
        self._tokens = float(cfg.rate_limit_burst)
        self._refilled = clock()
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
        now = self.clock()
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
        started = self.clock()
        while pending:
            for channel in list(pending):
                ok, retry_after = channel.send(message)
                if ok:
                    self.sent[channel.name] += 1
                    pending.remove(channel)
                else:
                    self.failed[channel.name] += 1
                    log.warning("chat delivery to %s failed; will retry", channel.name)
                    if retry_after is not None:
                        delay = max(delay, min(retry_after, self.cfg.give_up_after_seconds))
            if not pending:
                return True
            waited = self.clock() - started
            if self._closing and self._past_drain():
                return False  # stays queued; close() counts and logs what is left
            if waited >= self.cfg.give_up_after_seconds:
                self.dropped["gave_up"] += 1
                log.error(
                    "chat delivery to %s abandoned after %.0f s: %s",
                    ", ".join(c.name for c in pending),
                    waited,
                    message.title,
                )
                return True
            with self._cond:
                self._cond.wait(timeout=delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.cfg.max_backoff_seconds)

    def _past_drain(self) -> bool:
        return self.clock() >= self._drain_deadline

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, status: str = "", timeout: float | None = None) -> None:
        """Deliver what is queued, for up to ``notify.drain_seconds``, then stop."""
        timeout = self.cfg.drain_seconds if timeout is None else timeout
        self._drain_deadline = self.clock() + timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout + 1.0)
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
