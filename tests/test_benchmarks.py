"""The GPU scripts run on the CPU in their reduced mode, so they are known to work; the
probe-sync script's own numbers are held to its target there (probes add no host read)."""

import json

import pytest

from tests.helpers import run_benchmark

pytestmark = pytest.mark.slow


def no_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run the script in full instead")


def test_probes_add_no_host_read_per_step() -> None:
    """The runner's one transfer is the loop's; every probe (the per-layer and headroom
    ones included: the reduced mode runs them every 5 steps) adds none."""
    no_gpu()
    out = run_benchmark("gpu_probe_syncs.py")
    assert "reduced mode" in out
    report = json.loads(out.strip().splitlines()[-1])
    on, off = report["probes_on"], report["probes_off"]
    assert off["per_step"] >= 1  # the loop's own transfer is counted
    assert report["added_by_probes_per_step"] == 0 and on["max"] == off["max"]
    # the probes did run: per-layer series are in the probe steps' rows
    assert on["values_per_step_max"] > off["values_per_step_max"] + 20


@pytest.mark.parametrize(
    ("script", "expect"),
    [("gpu_fp16_overflow.py", "PASS"), ("gpu_throughput.py", '"yoto_probes_on"')],
)
def test_gpu_script_reduced_mode(script: str, expect: str) -> None:
    no_gpu()
    out = run_benchmark(script)
    assert "reduced mode" in out and expect in out
