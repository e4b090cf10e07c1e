"""Per-layer statistics against direct computations in a real DeepSpeed step."""

import math
from pathlib import Path

import pytest
import torch

from tests.helpers import make_trainer
from yoto import catalog, runstore

LAYER_METRICS = (
    catalog.LAYER_GRAD_NORM,
    catalog.LAYER_PARAM_NORM,
    catalog.LAYER_UPDATE_RATIO,
    catalog.ACTIVATION_RMS,
    catalog.ATTENTION_LOGIT_MAX,
    catalog.ATTENTION_ENTROPY,
)


def _full(p: torch.nn.Parameter) -> torch.Tensor:
    """The whole parameter, flat (a ZeRO-3 one is empty outside forward: gathered)."""
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p).reshape(-1).clone()
    return p.detach().reshape(-1).clone()


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_layer_stats_match_direct_computation(tmp_path: Path, stage: int) -> None:
    trainer, store = make_trainer(
        tmp_path,
        "train.steps=2",
        "probes.layers.every=2",
        f"train.zero_stage={stage}",
        "optim.grad_clip=0",
    )
    model = trainer.engine.module
    trainer.step_once()  # step 1: not a probe step
    before = [torch.cat([_full(p) for p in b.parameters()]) for b in model.blocks]
    values, _ = trainer.step_once()  # step 2: the probe step
    store.close("finished")
    rows = runstore.read_layers(store.path).to_pylist()
    got = {(r["metric"], r["layer"]): r["value"] for r in rows if r["step"] == 2}
    for i, block in enumerate(model.blocks):
        after = torch.cat([_full(p) for p in block.parameters()])
        assert got[(catalog.LAYER_PARAM_NORM.name, str(i))] == pytest.approx(
            float(after.norm()), rel=1e-5
        )
        ratio = float((after - before[i]).norm() / before[i].norm())
        # the update ratio is estimated on a fixed sample of at most 4096 entries per tensor
        assert got[(catalog.LAYER_UPDATE_RATIO.name, str(i))] == pytest.approx(ratio, rel=0.2)
        for metric in LAYER_METRICS:
            assert math.isfinite(got[(metric.name, str(i))]), (metric.name, i)
        entropy = got[(catalog.ATTENTION_ENTROPY.name, str(i))]
        assert 0 < entropy < math.log(trainer.cfg.model.seq_len)
    # the blocks' squared grad norms are part of the global one (embeddings and ln_f add)
    block_sq = sum(
        got[(catalog.LAYER_GRAD_NORM.name, str(i))] ** 2 for i in range(len(model.blocks))
    )
    assert 0 < block_sq <= values[catalog.GRAD_NORM.name] ** 2 * (1 + 1e-5)
    assert values[catalog.OUTPUT_LOG_Z.name] > 0


def test_fixture_run_records_layers_on_probe_steps(trained_run: Path) -> None:
    rows = runstore.read_layers(trained_run).to_pylist()
    steps = {r["step"] for r in rows if r["metric"] == catalog.LAYER_GRAD_NORM.name}
    assert steps == set(range(50, 501, 50))
    layers = {r["layer"] for r in rows if r["metric"] == catalog.ATTENTION_LOGIT_MAX.name}
    assert layers == {"0", "1", "2", "3"}
    t = runstore.read_metrics(trained_run).to_pydict()
    log_z = [v for v in t[catalog.OUTPUT_LOG_Z.name] if v is not None]
    assert len(log_z) == 10
    # no layer-labelled series leak into the wide table
    assert not any("layer=" in column for column in t)
