"""The chat notifier against a real local HTTP receiver, through Apprise's json:// plugin.

Time is a :class:`ManualClock` that the test moves: the notifier's backoff waits block on
it until the test advances it, and every wait it asked for is recorded, so retries,
backoff, give-up and the rate limit are asserted on the clock, never on the wall."""

from __future__ import annotations

import itertools
import logging
import random
import socket
import threading
from pathlib import Path

import pytest
import requests

from tests.integration.servers import Receiver
from yoto import catalog, runstore
from yoto.alerts import outbox
from yoto.alerts.notifier import (
    ChatNotifier,
    channel_of,
    format_message,
    resolve_urls,
    retry_after_seconds,
    with_timeouts,
)
from yoto.config import REDACTED, NotifyConfig
from yoto.errors import ConfigError
from yoto.events import Event, EventKind, Reason, Rollback, Severity, describe_suspects
from yoto.runstore import RunStore

RUN = {"run": "20261128-demo-ab12", "name": "demo"}
HANG = 20.0  # real seconds that only bound a hang: a passing test never waits this long
SEED = 7


class ManualClock:
    """The notifier's :class:`~yoto.alerts.notifier.Clock`, moved by the test.

    A wait blocks until :meth:`advance` carries the clock past its end (or the notifier
    notifies its condition, as close() does); with ``free_running`` set, a wait instead
    moves the clock by the seconds asked and returns at once. Every wait is recorded."""

    def __init__(self, start: float = 1000.0) -> None:
        self.start = start
        self._now = start
        self.waits: list[float] = []
        self.free_running = False
        self._lock = threading.Condition()
        self._waiting_on: set[threading.Condition] = set()

    def now(self) -> float:
        with self._lock:
            return self._now

    def wait(self, cond: threading.Condition, seconds: float) -> None:
        with self._lock:
            self.waits.append(seconds)
            self._lock.notify_all()
            if self.free_running:
                self._now += seconds
                return
            end = self._now + seconds
            self._waiting_on.add(cond)
        if self.now() < end:
            cond.wait()  # the caller holds cond; advance() notifies it

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds
            conds = list(self._waiting_on)
        for cond in conds:
            with cond:
                cond.notify_all()

    def run_free(self) -> None:
        """From now on waits take no real time (for close(), which drains on this clock)."""
        self.free_running = True
        self.advance(0.0)  # wake a wait in progress

    def wait_until_waiting(self, count: int) -> list[float]:
        """The waits asked for, once there are ``count`` of them (a bounded real wait)."""
        with self._lock:
            self._lock.wait_for(lambda: len(self.waits) >= count, timeout=HANG)
            assert len(self.waits) >= count, f"the notifier began {len(self.waits)} waits"
            return list(self.waits)


def backoff_waits(conf: NotifyConfig, count: int) -> list[float]:
    """The jittered backoff the notifier asks for, replayed from the same seed."""
    rng, delay, out = random.Random(SEED), conf.backoff_seconds, []
    for _ in range(count):
        out.append(delay * rng.uniform(0.8, 1.2))
        delay = min(delay * 2, conf.max_backoff_seconds)
    return out


def cfg(**overrides) -> NotifyConfig:
    base = {"backoff_seconds": 0.2, "max_backoff_seconds": 0.5, "drain_seconds": 10.0}
    return NotifyConfig(**{**base, **overrides})


def notifier_for(urls: list[str], conf: NotifyConfig, clock: ManualClock, **kw) -> ChatNotifier:
    return ChatNotifier(urls, conf, RUN, clock=clock, rng=random.Random(SEED), **kw)


def json_url(receiver: Receiver) -> str:
    return f"json://127.0.0.1:{receiver.port}/hook"


def rollback(step: int, onset: int | None = None) -> Event:
    return Event(
        step,
        1,
        EventKind.ROLLBACK,
        Severity.WARNING,
        f"rolled back from step {step} to step 200",
        Rollback(
            from_step=step,
            to_step=200,
            onset=onset or step,
            reason=Reason.SPIKE,
            from_attempt=0,
            attempt=1,
            skipped_batches=150,
        ).to_data(),
    )


def test_message_says_run_step_what_happened_what_was_done_and_links() -> None:
    receiver = Receiver().up()
    try:
        clock = ManualClock()
        notifier = notifier_for(
            [json_url(receiver)], cfg(), clock, link="http://grafana/d/yoto?var-run={run}"
        )
        notifier.notify(rollback(305))
        notifier.close()
        assert clock.waits == []  # accepted at the first attempt: no backoff
        ((_, body),) = receiver.received
        text = body["title"] + "\n" + body["message"]
        for expected in (
            "demo",
            "20261128-demo-ab12",
            "step 305",
            "rolled back from step 305",  # what happened
            "rolled back to step 200, skipped 150 batches",  # what yoto did
            "http://grafana/d/yoto?var-run=20261128-demo-ab12",
        ):
            assert expected in text, (expected, text)
        stats = notifier.stats()
        assert stats[catalog.ALERTS_SENT.key(channel="json")] == 1
        assert stats[catalog.ALERTS_FAILED.key(channel="json")] == 0
    finally:
        receiver.down()


def test_receiver_down_then_back_loses_nothing_and_notify_never_blocks(caplog) -> None:
    receiver = Receiver()  # not listening yet: connection refused
    caplog.set_level(logging.DEBUG)
    secret_url = f"json://user:hunter2@127.0.0.1:{receiver.port}/hook"
    conf, clock = cfg(give_up_after_seconds=60), ManualClock()
    notifier = notifier_for([secret_url], conf, clock)
    for step in range(10):
        notifier.notify(rollback(100 + step))  # distinct onsets: no de-duplication
    assert notifier.pending() == 10  # queued, not delivered, and notify() came back
    for refused in (1, 2, 3):  # each refused attempt is followed by a backoff
        waits = clock.wait_until_waiting(refused)
        assert notifier.failed["json"] == refused and notifier.sent["json"] == 0
        assert not receiver.received and notifier.pending() == 10
        if refused < 3:
            clock.advance(waits[-1])
    assert waits == pytest.approx(backoff_waits(conf, 3))  # doubled, capped, jittered
    receiver.up()
    try:
        clock.advance(waits[-1])  # the third backoff ends: the endpoint is back
        got = receiver.wait_for(10, timeout=HANG)
        assert [b["title"].split(" at step ")[1] for _, b in got] == [
            str(100 + s) for s in range(10)
        ]  # all of them, in order
        notifier.close()
        assert len(clock.waits) == 3  # no backoff once it was back
        assert notifier.sent["json"] == 10 and notifier.failed["json"] == 3
        assert notifier.dropped["gave_up"] == 0 and notifier.dropped["queue_full"] == 0
        assert "hunter2" not in caplog.text  # the URL's secret is never logged
    finally:
        receiver.down()


def spacing(times: list[float]) -> list[float]:
    return [round(b - a, 9) for a, b in itertools.pairwise(times)]


def test_retry_after_is_honoured_and_a_new_message_does_not_cut_the_wait() -> None:
    """429 Retry-After: 2, three times: the retries come 2, 2 and 2 s apart on the clock,
    although a new message is queued during each wait (it used to wake the retry)."""
    clock = ManualClock()
    receiver = Receiver(clock=clock.now).up()
    receiver.reply.extend([(429, {"Retry-After": "2"})] * 3)
    conf = cfg()
    try:
        notifier = notifier_for([json_url(receiver)], conf, clock)
        notifier.notify(rollback(1))
        for refused in (1, 2, 3):
            waits = clock.wait_until_waiting(2 * refused - 1)
            assert waits[-1] == 2.0  # what the endpoint asked, not the 0.2 s backoff
            notifier.notify(rollback(100 + refused))  # wakes the condition...
            clock.wait_until_waiting(2 * refused)  # ...and the notifier waits on
            assert receiver.requests == refused  # no retry before the clock moved
            clock.advance(2.0)
        receiver.wait_for(4, timeout=HANG)
        notifier.close()
        assert spacing(receiver.arrivals[:4]) == [2.0, 2.0, 2.0]
        # counted exactly: attempts are the requests the receiver saw
        assert receiver.requests == 7 == notifier.sent["json"] + notifier.failed["json"]
        assert (notifier.sent["json"], notifier.failed["json"]) == (4, 3)
        assert [b["title"].split(" at step ")[1] for _, b in receiver.received] == [
            "1",
            "101",
            "102",
            "103",
        ]
    finally:
        receiver.down()


def test_a_server_error_gets_the_backoff_whatever_is_queued_meanwhile() -> None:
    clock = ManualClock()
    receiver = Receiver(clock=clock.now).up()
    receiver.reply.extend([(500, {}), (503, {})])
    conf = cfg()
    planned = backoff_waits(conf, 2)
    try:
        notifier = notifier_for([json_url(receiver)], conf, clock)
        notifier.notify(rollback(1))
        for n, wait in enumerate(planned, start=1):
            assert clock.wait_until_waiting(2 * n - 1)[-1] == pytest.approx(wait)
            notifier.notify(rollback(100 + n))
            clock.wait_until_waiting(2 * n)
            assert receiver.requests == n
            clock.advance(wait)
        receiver.wait_for(3, timeout=HANG)
        notifier.close()
        assert spacing(receiver.arrivals[:3]) == pytest.approx(planned)
        assert receiver.requests == 5 == notifier.sent["json"] + notifier.failed["json"]
    finally:
        receiver.down()


SUSPECTS = [
    {"index": 3, "position": 1267, "loss": 9.25, "source": "code", "doc_id": "difflib.py",
     "offset": 36278, "documents": 1, "snippet": "def ratio(self):"},
    {"index": 0, "position": 1264, "loss": 8.5, "source": "prose", "doc_id": None,
     "offset": 12, "documents": 2, "snippet": "Call me Ishmael."},
]  # fmt: skip


def test_a_message_names_the_suspect_sequences_and_the_diagnosis() -> None:
    """A rollback's message says what the replay found and which rank, and which sequences
    the onset step trained on (yoto.events.describe_suspects, one line each); a message
    without them is as before."""
    plain = rollback(305)
    diagnosis = {
        "cause": "nondeterministic",
        "finding": "not reproduced at step 301",
        "ranks": [1],
        "hosts": ["host-a"],
        "replayed_steps": 10,
        "seconds": 4.2,
    }
    forensics = {"onset": 301, "top": SUSPECTS}
    data = {**plain.data, "diagnosis": diagnosis, "forensics": forensics}
    event = Event(plain.step, plain.attempt, plain.kind, plain.severity, plain.message, data)
    body = format_message(event, RUN, None).body.splitlines()
    assert "diagnosis: nondeterministic: not reproduced at step 301" in body
    assert "suspect rank(s): 1 (host-a)" in body
    at = body.index("suspect sequences (batch of step 301):")
    assert [line.strip() for line in body[at + 1 :]] == describe_suspects(forensics)
    assert "difflib.py" in body[at + 1] and "prose:?+12" in body[at + 2]
    assert len(body) == 8  # run, happened, done; diagnosis, rank; suspects heading + 2
    # an alert's brief forensics, a diagnosis that names no rank, and neither
    data = {"action": "alert", "forensics": {"onset": 300, "top": SUSPECTS[:1]}}
    alert = Event(301, 0, EventKind.ALERT, Severity.WARNING, "loss spike", data)
    body = format_message(alert, RUN, None).body
    assert "suspect sequences (batch of step 300):" in body and "diagnosis" not in body
    quiet = {**plain.data, "diagnosis": {**diagnosis, "cause": "data", "ranks": [], "hosts": []}}
    body = format_message(Event(305, 1, plain.kind, plain.severity, "", quiet), RUN, None).body
    assert "diagnosis: data: " in body and "rank" not in body and "suspect" not in body
    body = format_message(plain, RUN, None).body
    assert "diagnosis" not in body and "suspect" not in body
    # the diagnosis event itself (info: sent only where notify.min_severity lets it)
    told = Event(
        200, 1, EventKind.DIAGNOSIS, Severity.INFO, "diagnosis", {**diagnosis, "onset": 301}
    )
    assert "suspect rank(s): 1 (host-a)" in format_message(told, RUN, None).body


def test_retry_after_as_seconds_or_an_http_date() -> None:
    assert retry_after_seconds("2") == 2.0 and retry_after_seconds("-3") == 0.0
    assert retry_after_seconds("Wed, 21 Oct 2026 07:28:00 GMT", wall_now=1792567670.0) == 10.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None


def test_the_webhook_posts_what_apprise_posts() -> None:
    """json:// is posted by the notifier itself (to see Retry-After): the body is the one
    Apprise's JSON plugin posts for the same URL, its payload mapping included."""
    import apprise

    receiver = Receiver().up()
    try:
        for query in ("", "?:type=kind&:attachments=&-x=1&+X-Team=ml"):
            url = json_url(receiver) + query
            message = format_message(rollback(305), RUN, None)
            notifier = notifier_for([url], cfg(), ManualClock())
            notifier.enqueue(message)
            notifier.close()
            theirs = apprise.Apprise()
            theirs.add(url)
            assert theirs.notify(
                title=message.title, body=message.body, notify_type=apprise.NotifyType.WARNING
            )
            (_, ours), (_, apprises) = receiver.wait_for(2, timeout=HANG)[-2:]
            assert ours == apprises and ours["message"] == message.body
            receiver.received.clear()
    finally:
        receiver.down()


def a_run_dir(tmp_path) -> Path:
    store = RunStore.create(tmp_path, "chat", "{}\n")
    store.close("finished")
    return store.path


def test_counts_match_the_receiver_and_what_is_left_is_kept_and_resent(tmp_path, capsys) -> None:
    """A receiver that answers 500: every attempt is counted as the receiver saw it; what
    is still queued at the end is counted undelivered, told as a chat event, kept in the
    outbox, and 'yoto alerts resend' delivers it once the receiver is well."""
    from yoto.cli import main

    run_dir = a_run_dir(tmp_path)
    clock = ManualClock()
    receiver = Receiver(clock=clock.now).up()
    receiver.reply.extend([(500, {})] * 100)
    conf = cfg(drain_seconds=1.0)
    try:
        notifier = notifier_for([json_url(receiver)], conf, clock)
        notifier.bind_run({**RUN, "dir": str(run_dir)})
        for step in range(4):
            notifier.notify(rollback(10 + step))
        clock.wait_until_waiting(1)
        clock.run_free()
        notifier.close()
        stats = notifier.stats()
        attempts = receiver.requests
        assert attempts >= 2 and not receiver.received
        assert stats[catalog.ALERTS_FAILED.key(channel="json")] == attempts
        assert stats[catalog.ALERTS_SENT.key(channel="json")] == 0
        assert stats[catalog.ALERTS_DROPPED.key(reason="undelivered")] == 4
        assert stats[catalog.ALERTS_DROPPED.key(reason="gave_up")] == 0

        lines = outbox.read_lines(run_dir)
        assert [x["outcome"] for x in lines if "id" in x] == ["undelivered"] * 4
        assert sum(len(x["attempts"]) for x in lines if "id" in x) == attempts
        assert lines[-1]["counts"] == stats  # the counters, in the run directory
        (event,) = [e for e in runstore.read_events(run_dir) if e["kind"] == EventKind.CHAT]
        assert "4 chat message(s) undelivered" in event["message"]
        assert "yoto alerts resend" in event["message"]
        assert [k.step for k in outbox.kept(run_dir)] == [10, 11, 12, 13]
        assert outbox.summarize(run_dir) == outbox.ChatSummary(0, attempts, 4)
        capsys.readouterr()
        assert main(["runs", "show", str(run_dir)]) == 0
        shown = capsys.readouterr().out
        assert f"chat     0 delivered ({attempts} attempts); 4 kept undelivered" in shown
        assert "[warning] chat: 4 chat message(s) undelivered" in shown

        receiver.reply.clear()  # the endpoint is well again
        assert main(["alerts", "resend", str(run_dir), "--url", json_url(receiver)]) == 0
        assert "4 kept message(s): 4 delivered, 0 still kept" in capsys.readouterr().out
        steps = [b["title"].split(" at step ")[1] for _, b in receiver.received]
        assert steps == ["10", "11", "12", "13"]  # each once, in order
        assert outbox.kept(run_dir) == []
        assert [x["resent"] for x in outbox.read_lines(run_dir) if "id" in x][-4:] == [True] * 4
        assert main(["alerts", "resend", str(run_dir), "--url", json_url(receiver)]) == 0
        assert "nothing to resend" in capsys.readouterr().out
        assert len(receiver.received) == 4
    finally:
        receiver.down()


def test_a_refusal_no_retry_cures_is_kept_at_once_and_the_next_run_delivers_it(tmp_path) -> None:
    run_dir = a_run_dir(tmp_path)
    receiver = Receiver().up()
    receiver.reply.append((404, {}))
    clock = ManualClock()
    try:
        notifier = notifier_for([json_url(receiver)], cfg(), clock)
        notifier.bind_run({**RUN, "dir": str(run_dir)})
        notifier.notify(rollback(7))
        notifier.close()
        assert clock.waits == [] and receiver.requests == 1  # not retried
        assert notifier.dropped["refused"] == 1
        (event,) = [e for e in runstore.read_events(run_dir) if e["kind"] == EventKind.CHAT]
        assert "refused by json (HTTP 404)" in event["message"]
        # a resume binds a new notifier to the run: it delivers what was kept, first
        again = notifier_for([json_url(receiver)], cfg(), ManualClock())
        again.bind_run({**RUN, "dir": str(run_dir)})
        again.close()
        ((_, body),) = receiver.received
        assert "at step 7" in body["title"] and outbox.kept(run_dir) == []
    finally:
        receiver.down()


def test_gives_up_on_a_message_after_give_up_after_seconds() -> None:
    receiver = Receiver()  # down for good
    conf, clock = cfg(give_up_after_seconds=1.0), ManualClock()
    planned = backoff_waits(conf, 10)
    # the attempt after the n-th backoff is the last: by then 1 s of the clock has passed
    backoffs = next(n for n in range(1, 11) if sum(planned[:n]) >= conf.give_up_after_seconds)
    notifier = notifier_for([json_url(receiver)], conf, clock)
    notifier.notify(rollback(1))
    for n in range(1, backoffs + 1):
        waits = clock.wait_until_waiting(n)
        assert notifier.dropped["gave_up"] == 0 and notifier.pending() == 1
        clock.advance(waits[-1])
    notifier.close()  # returns once the delivery thread has given up: nothing is left
    assert clock.waits == pytest.approx(planned[:backoffs])
    assert clock.now() - clock.start >= conf.give_up_after_seconds
    assert notifier.failed["json"] == backoffs + 1
    assert notifier.dropped["gave_up"] == 1 and notifier.pending() == 0


class SilentEndpoint:
    """Accepts connections (the kernel's backlog) and never answers: a hung webhook."""

    def __enter__(self) -> int:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        return self.sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_a_hung_endpoint_times_out_through_apprise_and_is_retried() -> None:
    conf, clock = cfg(timeout_seconds=0.3), ManualClock()
    with SilentEndpoint() as port:
        notifier = notifier_for([f"json://127.0.0.1:{port}/hook"], conf, clock)
        (server,) = notifier.channels[0].apprise
        assert (server.socket_connect_timeout, server.socket_read_timeout) == (0.3, 0.3)
        notifier.notify(rollback(1))
        clock.wait_until_waiting(1)  # the attempt came back (failed) instead of hanging
        assert notifier.failed["json"] == 1 and notifier.sent["json"] == 0
        clock.run_free()
        notifier.close(timeout=0.0)
    assert notifier.dropped["undelivered"] == 1  # undelivered at the end, and counted


def test_timeouts_travel_as_apprise_url_parameters() -> None:
    assert with_timeouts("json://h:1/x", 4, 10) == "json://h:1/x?cto=4&rto=10"
    assert with_timeouts("json://h/x?method=PUT", 4, 0.5) == "json://h/x?method=PUT&cto=4&rto=0.5"
    assert with_timeouts("json://h/x?RTO=7&cto=2", 4, 10) == "json://h/x?RTO=7&cto=2"  # theirs
    notifier = ChatNotifier(["json://127.0.0.1:9/x?rto=7"], cfg(timeout_seconds=10), RUN)
    (server,) = notifier.channels[0].apprise
    assert (server.socket_connect_timeout, server.socket_read_timeout) == (4.0, 7.0)
    notifier.close()


def test_the_notifier_leaves_requests_alone() -> None:
    """No process-wide patch: every other user of requests keeps requests' own code."""
    send, request = requests.Session.send, requests.request
    receiver = Receiver().up()
    try:
        notifier = notifier_for([json_url(receiver)], cfg(), ManualClock())
        notifier.notify(rollback(1))
        notifier.close()
        assert receiver.received
    finally:
        receiver.down()
    assert requests.Session.send is send and requests.request is request
    assert requests.Session.send.__module__ == "requests.sessions"


def test_duplicates_rate_limit_and_bounded_queue() -> None:
    receiver = Receiver()  # down: everything stays queued
    clock = ManualClock()
    notifier = notifier_for(
        [json_url(receiver)],
        cfg(queue_size=4, rate_limit_burst=100, give_up_after_seconds=0.5),
        clock,
    )
    notifier.notify(rollback(10, onset=7))
    notifier.notify(rollback(11, onset=7))  # same incident: once
    assert notifier.dropped["duplicate"] == 1
    for step in range(20, 30):
        notifier.notify(rollback(step))
    assert notifier.pending() == 4 and notifier.dropped["queue_full"] == 7
    critical = Event(50, 0, EventKind.HALT, Severity.CRITICAL, "halted", {"reason": "budget"})
    notifier.notify(critical)
    assert any(p.message.severity == Severity.CRITICAL for p in notifier._queue)
    clock.run_free()
    notifier.close(timeout=0.5)

    clock = ManualClock()
    limited = notifier_for(
        [json_url(receiver)], cfg(rate_limit_burst=2, rate_limit_per_minute=1), clock
    )
    for step in range(5):
        limited.notify(rollback(step))
    limited.notify(critical)  # critical messages are never rate-limited
    assert limited.dropped["rate_limited"] == 3
    assert limited.pending() == 3
    clock.advance(60.0)  # one minute at one a minute: one more token
    limited.notify(rollback(100))
    limited.notify(rollback(101))
    assert limited.dropped["rate_limited"] == 4 and limited.pending() == 4
    clock.run_free()
    limited.close(timeout=0.1)


def test_duplicates_come_again_after_dedup_seconds() -> None:
    receiver = Receiver()  # down
    clock = ManualClock()
    notifier = notifier_for([json_url(receiver)], cfg(dedup_seconds=600), clock)
    notifier.notify(rollback(10, onset=7))
    clock.advance(599.0)
    notifier.notify(rollback(11, onset=7))
    assert notifier.dropped["duplicate"] == 1 and notifier.pending() == 1
    clock.advance(1.0)  # ten minutes after the first: the same incident may be told again
    notifier.notify(rollback(12, onset=7))
    assert notifier.dropped["duplicate"] == 1 and notifier.pending() == 2
    clock.run_free()
    notifier.close(timeout=0.1)


def test_filters_by_severity_and_kind() -> None:
    notifier = ChatNotifier([], cfg(), RUN)
    info = Event(1, 0, EventKind.CHECKPOINT, Severity.INFO, "saved", {})
    spike = Event(1, 0, EventKind.SPIKE, Severity.WARNING, "spike", {})
    alert = Event(1, 0, EventKind.ALERT, Severity.WARNING, "spike; action: alert", {})
    assert not notifier.wants(info) and not notifier.wants(spike) and notifier.wants(alert)
    notifier.close()


def test_urls_from_env_and_file_and_errors(tmp_path) -> None:
    path = tmp_path / "urls"
    path.write_text("# team chat\nslack://a/b/c\njson://relay:8080/x  # relay\n")
    conf = NotifyConfig(webhook_urls=[REDACTED, "discord://1/2"], urls_file=str(path))
    urls = resolve_urls(conf, environ={"YOTO_NOTIFY_URLS": "mmost://host/tok, slack://a/b/c"})
    assert urls == ["discord://1/2", "mmost://host/tok", "slack://a/b/c", "json://relay:8080/x"]
    with pytest.raises(ConfigError, match="not an Apprise URL"):
        resolve_urls(NotifyConfig(webhook_urls=["https//oops"]), environ={})
    with pytest.raises(ConfigError, match="urls_file"):
        resolve_urls(NotifyConfig(urls_file=str(tmp_path / "missing")), environ={})
    with pytest.raises(ConfigError, match="does not understand"):
        ChatNotifier(["nosuchscheme://x"], cfg(), RUN)
    assert channel_of("jsons://u:p@h/x") == "json" and channel_of("slack://T/B/C") == "slack"


def test_yoto_alerts_test_command(capsys) -> None:
    from yoto.cli import main

    receiver = Receiver().up()
    try:
        assert main(["alerts", "test", json_url(receiver), "--timeout", "10"]) == 0
        assert "a test message from yoto" in receiver.received[0][1]["message"]
    finally:
        receiver.down()
    assert main(["alerts", "test", json_url(receiver), "--timeout", "1"]) == 1
    assert "NOT delivered" in capsys.readouterr().out
