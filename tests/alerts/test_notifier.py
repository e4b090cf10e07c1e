"""The chat notifier against a real local HTTP receiver, through Apprise's json:// plugin."""

from __future__ import annotations

import logging
import time

import pytest

from tests.integration.servers import Receiver
from yoto import catalog
from yoto.alerts.notifier import ChatNotifier, channel_of, resolve_urls, retry_after_seconds
from yoto.config import REDACTED, NotifyConfig
from yoto.errors import ConfigError
from yoto.events import Event, EventKind, Severity

RUN = {"run": "20261128-demo-ab12", "name": "demo"}


def cfg(**overrides) -> NotifyConfig:
    base = {"backoff_seconds": 0.2, "max_backoff_seconds": 0.5, "drain_seconds": 10.0}
    return NotifyConfig(**{**base, **overrides})


def json_url(receiver: Receiver) -> str:
    return f"json://127.0.0.1:{receiver.port}/hook"


def rollback(step: int, onset: int | None = None) -> Event:
    return Event(
        step,
        1,
        EventKind.ROLLBACK,
        Severity.WARNING,
        f"rolled back from step {step} to step 200",
        {"to_step": 200, "skipped_batches": 150, "onset": onset or step, "reason": "spike"},
    )


def test_message_says_run_step_what_happened_what_was_done_and_links() -> None:
    receiver = Receiver().up()
    try:
        notifier = ChatNotifier(
            [json_url(receiver)], cfg(), RUN, link="http://grafana/d/yoto?var-run={run}"
        )
        notifier.notify(rollback(305))
        notifier.close()
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
        assert notifier.stats()[catalog.ALERTS_SENT.key(channel="json")] == 1
    finally:
        receiver.down()


def test_receiver_down_then_back_loses_nothing_and_notify_never_blocks(caplog) -> None:
    receiver = Receiver()  # not listening yet: connection refused
    caplog.set_level(logging.DEBUG)
    secret_url = f"json://user:hunter2@127.0.0.1:{receiver.port}/hook"
    notifier = ChatNotifier([secret_url], cfg(give_up_after_seconds=60), RUN)
    for step in range(10):
        notifier.notify(rollback(100 + step))  # distinct onsets: no de-duplication
    assert notifier.pending() >= 9  # queued, not delivered, and notify() came back
    time.sleep(1.0)  # a few failed attempts with backoff
    assert notifier.failed["json"] >= 1 and not receiver.received
    receiver.up()
    try:
        got = receiver.wait_for(10, timeout=20)
        assert [b["title"].split(" at step ")[1] for _, b in got] == [
            str(100 + s) for s in range(10)
        ]  # all of them, in order
        notifier.close()
        assert notifier.dropped["gave_up"] == 0 and notifier.dropped["queue_full"] == 0
        assert "hunter2" not in caplog.text  # the URL's secret is never logged
    finally:
        receiver.down()


def test_retry_after_is_honoured() -> None:
    receiver = Receiver().up()
    receiver.reply.append((429, {"Retry-After": "1"}))
    try:
        notifier = ChatNotifier([json_url(receiver)], cfg(backoff_seconds=0.05), RUN)
        start = time.monotonic()
        notifier.notify(rollback(1))
        got = receiver.wait_for(1, timeout=10)
        elapsed = time.monotonic() - start
        notifier.close()
        assert got and receiver.requests == 2
        assert elapsed >= 0.8, f"retried after {elapsed:.2f} s despite Retry-After: 1"
    finally:
        receiver.down()


def test_duplicates_rate_limit_and_bounded_queue() -> None:
    receiver = Receiver()  # down: everything stays queued
    notifier = ChatNotifier(
        [json_url(receiver)],
        cfg(queue_size=4, rate_limit_burst=100, give_up_after_seconds=0.5),
        RUN,
    )
    notifier.notify(rollback(10, onset=7))
    notifier.notify(rollback(11, onset=7))  # same incident: once
    assert notifier.dropped["duplicate"] == 1
    for step in range(20, 30):
        notifier.notify(rollback(step))
    assert notifier.pending() <= 4 and notifier.dropped["queue_full"] >= 6
    critical = Event(50, 0, EventKind.HALT, Severity.CRITICAL, "halted", {"reason": "budget"})
    notifier.notify(critical)
    assert any(m.severity == Severity.CRITICAL for m in notifier._queue)
    notifier.close(timeout=0.5)

    limited = ChatNotifier(
        [json_url(receiver)], cfg(rate_limit_burst=2, rate_limit_per_minute=1), RUN
    )
    for step in range(5):
        limited.notify(rollback(step))
    limited.notify(critical)  # critical messages are never rate-limited
    assert limited.dropped["rate_limited"] == 3
    assert limited.pending() == 3
    limited.close(timeout=0.1)


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


def test_retry_after_forms() -> None:
    assert retry_after_seconds({"Retry-After": "7"}) == 7.0
    now = 1_700_000_000.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
    assert retry_after_seconds({"retry-after": date}, now=now) == pytest.approx(30, abs=1)
    assert retry_after_seconds({}) is None


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
