"""The GPU scripts run on the CPU in their reduced mode, so they are known to work."""

import subprocess
import sys

import pytest

from tests.helpers import ROOT, subprocess_env

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("script", "expect"),
    [
        ("gpu_probe_syncs.py", '"added_by_probes_per_step"'),
        ("gpu_fp16_overflow.py", "PASS"),
        ("gpu_throughput.py", '"yoto_probes_on"'),
    ],
)
def test_gpu_script_reduced_mode(script: str, expect: str) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run the script in full instead")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "reduced mode" in proc.stdout and expect in proc.stdout
