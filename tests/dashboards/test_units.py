"""One unit table for Grafana and the explorer: every catalog unit has its presentation,
and no entry is left over from a unit the catalog no longer uses."""

from __future__ import annotations

import pytest

from yoto import catalog
from yoto.dashboards import units
from yoto.dashboards.live import panels
from yoto.dashboards.postmortem import charts


def test_every_catalog_unit_has_an_entry_and_no_entry_is_dead() -> None:
    used = {m.unit for m in catalog.CATALOG.values()}
    assert sorted(used - set(units.UNITS)) == [], "catalog units without a presentation"
    assert sorted(set(units.UNITS) - used) == [], "entries no catalog metric uses"


def test_both_dashboards_read_the_one_table() -> None:
    for metric in catalog.CATALOG.values():
        shown = units.UNITS[metric.unit]
        assert panels.value(metric).unit == shown.grafana, metric.name
        if shown.axis:
            assert charts.title(metric.name).endswith(f"({shown.axis})"), metric.name
    # the headroom gauges are in log2 units: the explorer's axis says bits
    assert charts.title(catalog.ACTIVATION_HEADROOM.name) == "activation headroom (bits)"
    assert charts.title(catalog.TRAIN_LOSS.name) == "train loss (nats)"


def test_a_unit_missing_from_the_table_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="'furlongs'.*yoto.dashboards.units.UNITS"):
        units.grafana_unit("furlongs")
    with pytest.raises(KeyError, match="known: '', 'nats'"):
        units.axis_unit("furlongs")
