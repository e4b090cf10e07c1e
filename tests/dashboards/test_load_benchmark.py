"""The explorer's load benchmark runs in its reduced mode, so it is known to work."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, subprocess_env

pytestmark = pytest.mark.slow


def test_explorer_load_reduced_mode() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "explorer_load.py"), "--quick"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "reduced mode" in proc.stdout
    report = json.loads(proc.stdout[proc.stdout.index("{\n") : proc.stdout.rindex("}") + 1])
    for page in ("timeline", "layers"):
        assert report[page]["charts"] >= 1 and report[page]["problems"] == []
        assert 0 < report[page]["max_points_per_series"] <= 5000
