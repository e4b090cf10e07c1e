import re

import pytest

from tests.helpers import ROOT
from yoto import catalog


def test_catalog_follows_prometheus_conventions() -> None:
    assert catalog.check_catalog() == []


def test_issue_metrics_present() -> None:
    for metric in (
        catalog.TRAIN_LOSS,
        catalog.GRAD_NORM,
        catalog.LEARNING_RATE,
        catalog.STEPS,
        catalog.TOKENS,
        catalog.BATCH_SIZE_TOKENS,
        catalog.STEP_DURATION,
        catalog.THROUGHPUT,
        catalog.VAL_LOSS,
    ):
        assert catalog.CATALOG[metric.name] is metric
    assert catalog.VAL_LOSS.labels == ("source",)


def test_series_keys_round_trip() -> None:
    key = catalog.VAL_LOSS.key(source='we"ird\\src')
    assert key == 'yoto_val_loss{source="we\\"ird\\\\src"}'
    assert catalog.parse_series_key(key) == ("yoto_val_loss", {"source": 'we"ird\\src'})
    assert catalog.parse_series_key("yoto_train_loss") == ("yoto_train_loss", {})
    with pytest.raises(ValueError):
        catalog.parse_series_key("not a key")


def test_defining_a_name_twice_fails() -> None:
    with pytest.raises(ValueError, match="defined twice"):
        catalog._metric("yoto_train_loss", "gauge", "", "again")


def test_no_metric_name_typed_outside_the_catalog() -> None:
    pattern = re.compile(r"[\"']yoto_[a-z0-9_]+[\"'{]")
    offenders = []
    for folder in ("yoto", "trainer", "probes", "dashboards", "alerts"):
        for file in (ROOT / folder).rglob("*.py"):
            if file == ROOT / "yoto" / "catalog.py":
                continue
            for lineno, line in enumerate(file.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{file.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert offenders == []
