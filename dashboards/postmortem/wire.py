"""What a chart sends to the browser: its datasets, counted. Used by the tests and the
load benchmark to check the downsampling really happens before the wire."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

SERIES_COLUMNS = ("piece", "series", "layer", "run")  # what one line / one heatmap row is


def datasets(proto: Any) -> list[pa.Table]:
    """Arrow tables a ``vega_lite_chart`` proto carries (named datasets and inline data)."""
    blobs = [d.data.data for d in proto.datasets]
    if proto.HasField("data") and proto.data.data:
        blobs.append(proto.data.data)
    return [pa.ipc.open_stream(b).read_all() for b in blobs if b]


def points(proto: Any) -> tuple[int, int]:
    """(points in the chart, most points of any one series in it)."""
    total, per_series = 0, 0
    for t in datasets(proto):
        total += t.num_rows
        key = next((c for c in SERIES_COLUMNS if c in t.column_names), None)
        if key is None:
            per_series = max(per_series, t.num_rows)
            continue
        counts = t.group_by(key).aggregate([([], "count_all")])["count_all"].to_pylist()
        per_series = max([per_series, *counts])
    return total, per_series
