"""How each catalog unit is shown: Grafana's unit id and the explorer's axis label.

One table for both dashboards (the live Grafana ones and the post-mortem explorer), so
that a unit added to the catalog is given its presentation once, in one place. It lives
here rather than in the catalog because it is presentation: the catalog is the kernel's
vocabulary (read by the trainer, the exporter and the alert rules, none of which draw
anything), while Grafana unit ids and axis wording concern the dashboards alone.

``tests/dashboards/test_units.py`` checks that every unit the catalog uses has an entry
and that no entry is left over from a unit the catalog no longer uses.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Unit:
    grafana: str  # Grafana's unit id ("count:X" scales like "short" and appends X)
    axis: str  # the explorer's axis title ends in "(axis)"; "" adds nothing
    # The metric name's last word only restates this unit (``_seconds``, Prometheus
    # style), so the explorer drops it from the title; words that name the quantity
    # (``batch_size_tokens``, ``..._steps``) stay.
    restated_in_name: bool = False


# catalog unit -> presentation
UNITS: dict[str, Unit] = {
    "": Unit("short", ""),  # dimensionless: the chart names the quantity instead
    "nats": Unit("suffix: nats", "nats", restated_in_name=True),
    "seconds": Unit("s", "s", restated_in_name=True),
    "tokens": Unit("count:tok", "tokens"),
    "tokens_per_second": Unit("count:tok/s", "tokens/s", restated_in_name=True),
    "ratio": Unit("percentunit", "fraction", restated_in_name=True),
    "samples": Unit("count:samples", "sequences"),
    "log2": Unit("suffix: log2", "bits", restated_in_name=True),  # powers of two
    "steps": Unit("count:steps", "steps"),
    "bytes": Unit("bytes", "bytes", restated_in_name=True),  # IEC: KiB, MiB, GiB
    "watts": Unit("watt", "W", restated_in_name=True),
    "celsius": Unit("celsius", "°C", restated_in_name=True),
    "hertz": Unit("hertz", "Hz", restated_in_name=True),
}


def unit(catalog_unit: str) -> Unit:
    """The presentation of a catalog unit; a unit missing here is a clear error."""
    try:
        return UNITS[catalog_unit]
    except KeyError:
        known = ", ".join(repr(u) for u in UNITS)
        raise KeyError(
            f"no presentation for catalog unit {catalog_unit!r}; add it to "
            f"yoto.dashboards.units.UNITS (known: {known})"
        ) from None


def grafana_unit(catalog_unit: str) -> str:
    return unit(catalog_unit).grafana


def axis_unit(catalog_unit: str) -> str:
    return unit(catalog_unit).axis
