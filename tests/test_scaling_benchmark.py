"""benchmarks/scaling_sweep.py --quick: the benchmark's sweep, fits and diagnostic run, in
process (one import of torch and DeepSpeed for all seven runs)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def test_scaling_benchmark_quick(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location(
        "scaling_sweep", ROOT / "benchmarks" / "scaling_sweep.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report_file = tmp_path / "report.json"
    argv = ["--quick", "--run-root", str(tmp_path / "runs"), "--json", str(report_file)]
    assert bench.main([*argv, "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    assert "Chinchilla law (requested) on 6 runs" in out and "suspect run" in out

    report = json.loads(report_file.read_text())
    law = report["law_fit"]
    assert law["law"] == "chinchilla" and law["points"] == 6
    assert law["parameter_count"] == "non-embedding"
    for p in law["params"].values():
        assert p["low"] <= p["high"]
    sizes = sorted({r["N"] for r in law["runs"]})
    assert len(sizes) == 3 and len({r["D"] for r in law["runs"]}) == 2
    kaplan = report["kaplan_longest_budget"]
    assert kaplan["points"] == 3 and kaplan["params"]["alpha_N"]["value"] > 0
    suspect = report["suspect"]
    assert suspect["N"] == max(sizes) and math.isfinite(suspect["loss"])
    assert "value" in suspect["effective_size"]
