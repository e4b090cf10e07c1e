"""Every probe at every ZeRO stage: the same run (seed, data, model; two CPU ranks, gloo,
fp32) at ZeRO 0, 1, 2 and 3, and with CPU optimizer offload at 2 and 3, records the same
numbers. One torchrun of tests/probes/zero_harness.py trains all variants."""

from __future__ import annotations

import json
import math
import subprocess
from typing import Any

import pytest

from tests.helpers import FAST, ROOT, subprocess_env, torchrun
from tests.probes.test_layers import LAYER_METRICS
from yoto import catalog

STEPS = 6
COMMON = [
    *FAST,
    "train.global_batch_size=32",  # two ranks x 8 x 2 micro-batches: a small and a big batch
    "probes.layers.every=2",
    "probes.precision.detail_every=2",
    "probes.spectra.enabled=false",  # spectra at ZeRO-3 are tested with checkpoints
]
VARIANTS = {  # ZeRO-3 last: its engine swaps in its own linear function for the process
    "zero0": ["train.zero_stage=0"],
    "zero0_probes_off": ["train.zero_stage=0", "probes.enabled=false"],
    "zero1": ["train.zero_stage=1"],
    "zero2": ["train.zero_stage=2"],
    "zero2_offload": ["train.zero_stage=2", "train.offload_optimizer=cpu"],
    "zero3": ["train.zero_stage=3"],
    "zero3_probes_off": ["train.zero_stage=3", "probes.enabled=false"],
    "zero3_offload": ["train.zero_stage=3", "train.offload_optimizer=cpu"],
}
SHARDED = [v for v in VARIANTS if v != "zero0" and not v.endswith("probes_off")]
EXACT = (  # within 1e-4 relative of ZeRO-0, step by step
    *LAYER_METRICS,
    catalog.OUTPUT_LOG_Z,
    catalog.ACTIVATION_ABSMAX,
    catalog.GRAD_UNDERFLOW,
    catalog.GRAD_NORM,
    catalog.TRAIN_LOSS,
)
NOISE = (
    catalog.GRADIENT_NOISE_SCALE,
    catalog.GRADIENT_SQ_NORM_ESTIMATE,
    catalog.GRADIENT_TRACE_SIGMA,
)


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("zero")
    cmd = [
        *torchrun(2),
        str(ROOT / "tests" / "probes" / "zero_harness.py"),
        str(root),
        str(STEPS),
        json.dumps(VARIANTS),
        *COMMON,
    ]
    proc = subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return {"result": json.loads(line.removeprefix("RESULT ")), "root": root}


def _series(values: dict[str, float], metric: catalog.Metric) -> dict[str, float]:
    return {k: v for k, v in values.items() if k.split("{")[0] == metric.name}


@pytest.mark.slow
@pytest.mark.parametrize("variant", SHARDED)
def test_probes_record_the_same_numbers_at_every_stage(stages: dict, variant: str) -> None:
    base, other = stages["result"]["zero0"]["values"], stages["result"][variant]["values"]
    seen: dict[str, int] = {}
    for step, (a, b) in enumerate(zip(base, other, strict=True), start=1):
        for metric in EXACT + NOISE:
            want, got = _series(a, metric), _series(b, metric)
            assert set(got) == set(want), (variant, step, metric.name)
            rel = 0.05 if metric in NOISE else 1e-4
            for key, value in want.items():
                if math.isnan(value):
                    assert math.isnan(got[key]), (variant, step, key)
                    continue
                assert got[key] == pytest.approx(value, rel=rel, abs=1e-12), (variant, step, key)
                seen[metric.name] = seen.get(metric.name, 0) + 1
    # every statistic was there to compare, on its cadence, for every block
    layers = 4  # the tiny preset
    probe_steps = STEPS // 2
    for metric in (catalog.LAYER_GRAD_NORM, catalog.LAYER_UPDATE_RATIO, catalog.ATTENTION_ENTROPY):
        assert seen[metric.name] == layers * probe_steps, metric.name
    assert seen[catalog.GRAD_UNDERFLOW.name] == probe_steps
    assert seen[catalog.GRADIENT_NOISE_SCALE.name] >= STEPS - 1  # NaN while |G|^2 <= 0


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero0", "zero3"])
def test_probes_add_no_host_read(stages: dict, stage: str) -> None:
    """Per step, the probes' values reach the host in the step's one transfer: the same
    count of host reads with the probes on as with them off, at ZeRO-3 as at ZeRO-0."""
    on = stages["result"][stage]["reads"]
    off = stages["result"][f"{stage}_probes_off"]["reads"]
    assert on == off, (on, off)


@pytest.mark.slow
def test_no_probe_is_switched_off_at_any_stage(stages: dict) -> None:
    """No probe event (switched off, failed) in any variant's run directory."""
    from yoto import runstore

    for variant in VARIANTS:
        run_dir = stages["root"] / variant / "rank0"
        (run,) = [p for p in run_dir.iterdir() if (p / "manifest.json").is_file()]
        probe_events = [e for e in runstore.read_events(run) if e["kind"] == "probe"]
        assert probe_events == [], (variant, probe_events)
