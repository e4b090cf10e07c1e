"""The explorer's load benchmark runs in its reduced mode, so it is known to work."""

import json

import pytest

from tests.helpers import run_benchmark

pytestmark = pytest.mark.slow


def test_explorer_load_reduced_mode() -> None:
    out = run_benchmark("explorer_load.py", "--quick")
    assert "reduced mode" in out
    report = json.loads(out[out.index("{\n") : out.rindex("}") + 1])
    for page in ("timeline", "layers"):
        assert report[page]["charts"] >= 1 and report[page]["problems"] == []
        assert 0 < report[page]["max_points_per_series"] <= 5000
