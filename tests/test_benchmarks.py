"""The GPU scripts run on the CPU in their reduced mode, so they are known to work."""

import pytest

from tests.helpers import run_benchmark

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
    out = run_benchmark(script)
    assert "reduced mode" in out and expect in out
