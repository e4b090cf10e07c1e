"""The Prometheus exporter, scraped over real HTTP and checked by the real promtool."""

from __future__ import annotations

import logging
import math
import socket
import subprocess
import urllib.request

import pytest

from tests.integration.servers import require_binary
from yoto import catalog
from yoto.dashboards.live.exporter import Exporter, even_subset, parse_addr
from yoto.errors import ConfigError
from yoto.events import Event, EventKind, Severity

LOSS = catalog.TRAIN_LOSS.name


def scrape(exporter: Exporter) -> str:
    with urllib.request.urlopen(exporter.url(), timeout=5) as r:
        return r.read().decode()


def sample(text: str, key: str) -> float:
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(key)


@pytest.fixture
def exporter():
    e = Exporter("tiny", layer_series_max=1000)
    e.serve(parse_addr("127.0.0.1:0"))
    e.bind_run({"run": "20261128-demo-ab12", "name": "demo"})
    yield e
    e.close("finished")


def layer_values(n_layer: int) -> dict[str, float]:
    values = {LOSS: 2.0, catalog.GRAD_NORM.name: 1.0, catalog.STEPS.name: 10.0}
    for metric in catalog.CATALOG.values():
        if "layer" in metric.labels:
            for layer in range(n_layer):
                values[metric.key(layer=str(layer))] = 0.25
    return values


def test_a_one_step_spike_between_scrapes_reaches_prometheus(exporter: Exporter) -> None:
    for step, loss in enumerate([2.0, 2.1, 9.5, 2.0, 2.05], start=1):  # spike at step 3
        exporter.write_step(0, step, {LOSS: loss})
    first = scrape(exporter)
    assert sample(first, LOSS) == 2.05  # the last value alone would miss it
    assert sample(first, catalog.TRAIN_LOSS_WINDOW_MAX.name) == 9.5
    exporter.write_step(0, 6, {LOSS: 1.9})
    assert sample(scrape(exporter), catalog.TRAIN_LOSS_WINDOW_MAX.name) == 1.9  # new window
    assert sample(scrape(exporter), catalog.TRAIN_LOSS_WINDOW_MAX.name) == 1.9  # no step: last


def test_nonfinite_loss_and_events_are_counted(exporter: Exporter) -> None:
    exporter.write_step(0, 1, {LOSS: 2.0})
    exporter.write_step(0, 2, {LOSS: math.nan})
    exporter.write_step(0, 3, {LOSS: 2.0})
    exporter.write_event(Event(3, 0, EventKind.ROLLBACK, Severity.WARNING, "rolled back"))
    exporter.write_event(Event(4, 1, EventKind.ROLLBACK, Severity.WARNING, "rolled back"))
    text = scrape(exporter)
    assert sample(text, catalog.NONFINITE_LOSS_STEPS.name) == 1
    assert math.isnan(sample(text, catalog.TRAIN_LOSS_WINDOW_MAX.name))
    assert sample(text, catalog.EVENTS.key(kind="rollback", severity="warning")) == 2
    assert (
        sample(text, catalog.RUN_INFO.key(name="demo", preset="tiny", run="20261128-demo-ab12"))
        == 1
    )


def test_96_layers_stay_under_the_series_cap_and_pass_promtool(exporter: Exporter) -> None:
    promtool = require_binary("promtool")
    exporter.write_step(0, 1, layer_values(96))
    text = scrape(exporter)
    layer_lines = [x for x in text.splitlines() if 'layer="' in x and not x.startswith("#")]
    assert 900 <= len(layer_lines) <= 1000
    assert len(text.encode()) <= 150 * 1024
    for metric in catalog.CATALOG.values():
        if "layer" in metric.labels:  # first and last layers are always among those kept
            assert f'{metric.name}{{layer="0"}}' in text
            assert f'{metric.name}{{layer="95"}}' in text
    assert sample(text, catalog.LAYER_SERIES_DROPPED.name) == 96 * 13 - len(layer_lines)
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_small_models_export_every_layer(exporter: Exporter) -> None:
    exporter.write_step(0, 1, layer_values(4))
    text = scrape(exporter)
    assert sample(text, catalog.LAYER_SERIES_DROPPED.name) == 0
    assert sample(text, catalog.LAYER_GRAD_NORM.key(layer="2")) == 0.25
    exporter.write_step(0, 2, {catalog.LAYER_GRAD_NORM.key(layer="2"): 0.5})
    assert sample(scrape(exporter), catalog.LAYER_GRAD_NORM.key(layer="2")) == 0.5


def test_names_off_the_catalog_are_never_exported(exporter: Exporter) -> None:
    exporter.write_step(0, 1, {LOSS: 2.0, "yoto_typed_elsewhere": 1.0, 'yoto_x{layer="1"}': 2.0})
    text = scrape(exporter)
    assert sample(text, LOSS) == 2.0
    assert "yoto_typed_elsewhere" not in text and "yoto_x" not in text


def test_busy_port_moves_on_or_fails_clearly(caplog) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        e = Exporter("tiny")
        with caplog.at_level(logging.WARNING, logger="yoto.live"):
            bound = e.serve(parse_addr(f"127.0.0.1:{port}"), port_search=20)
        e.close("finished")
        assert bound.port != port and f"{port} is busy" in caplog.text
        with pytest.raises(ConfigError, match="--metrics-addr"):
            Exporter("tiny").serve(parse_addr(f"127.0.0.1:{port}"), port_search=0)


def test_addresses() -> None:
    assert parse_addr("0") is None and parse_addr("off") is None
    assert str(parse_addr("0.0.0.0:9477")) == "0.0.0.0:9477"
    for bad in ("9477", "host:port", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            parse_addr(bad)
    assert even_subset([str(i) for i in range(10)], 4) == ["0", "3", "6", "9"]


def test_the_end_of_a_run_is_scraped_before_the_port_closes() -> None:
    import threading

    e = Exporter("tiny", linger_seconds=10)
    e.serve(parse_addr("127.0.0.1:0"))
    e.write_step(0, 1, {LOSS: 2.0})
    assert sample(scrape(e), catalog.RUN_ENDED.name) == 0
    seen: list[str] = []
    timer = threading.Timer(0.3, lambda: seen.append(scrape(e)))  # Prometheus' next scrape
    timer.start()
    e.close("finished")  # waits for that scrape
    timer.join()
    assert sample(seen[0], catalog.RUN_ENDED.name) == 1

    crashed = Exporter("tiny", linger_seconds=0)  # nobody scraped: no waiting
    crashed.serve(parse_addr("127.0.0.1:0"))
    crashed.close("crashed")
    assert crashed._ended == 0


@pytest.mark.parametrize(
    ("addr", "message"),
    [
        ("999.1.1.1:80", "'999.1.1.1' is not a valid IP address"),
        ("[12::zz]:9477", "is not a valid IP address"),
    ],
)
def test_an_invalid_host_is_named_at_parse(addr: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_addr(addr)


@pytest.mark.parametrize(
    ("addr", "message"),
    [
        # TEST-NET-3 (RFC 5737): valid, but never an address of this machine
        ("203.0.113.7:9477", "203.0.113.7 is not an address of this machine"),
        ("no-such-host.invalid:9477", "'no-such-host.invalid' is not a known host name"),
    ],
)
def test_an_address_that_cannot_be_served_is_not_called_busy(addr: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as got:
        Exporter("tiny").serve(parse_addr(addr), port_search=10)
    assert "busy" not in str(got.value)
