"""Precision: fp16 overflow through DeepSpeed's own loss scaler, bf16 non-finite gradients
end to end, activation headroom and underflow in a real run."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import make_trainer
from yoto import catalog, runstore
from yoto.config import PrecisionConfig
from yoto.events import Event, EventKind, Sinks
from yoto.probes.base import StepContext
from yoto.probes.precision import OverflowDetector, PrecisionProbe
from yoto.probes.runner import ProbeRunner
from yoto.runstore import RunStore


class ScalerEngine:
    """What the probe reads from an fp16 engine, holding DeepSpeed's real scaler (the CPU
    here cannot run DeepSpeed's fp16 engine: no oneDNN fp16)."""

    def __init__(self, scaler) -> None:
        self.optimizer = self
        self.loss_scaler = scaler
        self.applied = True

    @property
    def cur_scale(self) -> float:
        return self.loss_scaler.cur_scale

    def was_step_applied(self) -> bool:
        return self.applied


def test_fp16_overflow_is_a_skipped_step_and_a_scale_drop(tmp_path: Path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.utils import CheckOverflow

    from yoto.trainer.distributed import setup

    setup(torch.device("cpu"))  # the scaler logs through torch.distributed's rank
    scaler = DynamicLossScaler(
        init_scale=2.0**16,
        scale_window=1000,
        min_scale=2.0**14,
        delayed_shift=2,
        consecutive_hysteresis=False,
    )
    engine = ScalerEngine(scaler)
    torch.manual_seed(0)
    model = nn.Linear(16, 16).half()
    probe = PrecisionProbe(PrecisionConfig(), "fp16")
    runner = ProbeRunner([probe], [OverflowDetector()])
    store = RunStore.create(tmp_path, "fp16", "")
    sinks = Sinks(durable=store)
    scales = []
    for step in range(1, 9):
        x = torch.randn(4, 16).half() * (300.0 if step in (3, 4, 6) else 0.01)
        model.zero_grad()
        loss = model(x).float().pow(2).mean()
        (loss * scaler.cur_scale).backward()  # real fp16 gradients, scaled as DeepSpeed does
        # DeepSpeed's fp16 optimizers' own check (DynamicLossScaler.has_overflow_serial is
        # broken in 0.19: its _has_inf_or_nan lacks @staticmethod)
        overflow = CheckOverflow().has_overflow_serial(list(model.parameters()))
        scaler.update_scale(overflow)
        engine.applied = not overflow
        runner.on_step(StepContext(step, 0, 0, 4, 4, 1, 1, 16, loss.detach(), None, 0.0, engine))
        values, _ = runner.flush()
        for v in runner.detect(step, values):
            sinks.write_event(Event(v.step, 0, v.kind, v.severity, v.message, v.data))
        sinks.write_step(0, step, values)
        scales.append(scaler.cur_scale)
    store.close("finished")
    t = runstore.read_metrics(store.path).to_pydict()
    assert t[catalog.OVERFLOW_STEPS.name] == [0, 0, 1, 2, 2, 3, 3, 3]
    assert t[catalog.CONSECUTIVE_OVERFLOWS.name] == [0, 0, 1, 2, 0, 1, 0, 0]
    # hysteresis 2: the second overflow in a row halves the scale; then each one does
    assert t[catalog.LOSS_SCALE.name] == scales == [2.0**16] * 3 + [2.0**15] * 2 + [2.0**14] * 3
    assert t[catalog.LOSS_SCALE_HEADROOM.name][3] == 1.0
    events = runstore.read_events(store.path)
    overflow = [e for e in events if e["kind"] == "overflow"]
    assert [e["step"] for e in overflow if not e["data"].get("at_minimum")] == [3, 4, 6]
    at_min = [e for e in overflow if e["data"].get("at_minimum")]
    assert len(at_min) == 1 and at_min[0]["severity"] == "critical" and at_min[0]["step"] == 6
    assert "loss scale is at DeepSpeed's minimum" in at_min[0]["message"]


def test_bf16_non_finite_gradient_step_shows_end_to_end(tmp_path: Path) -> None:
    trainer, store = make_trainer(
        tmp_path, "train.precision=bf16", "train.steps=8", "probes.precision.detail_every=4"
    )
    target = trainer.engine.module.blocks[1].mlp.fc.weight
    seen = {"n": 0}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        seen["n"] += 1
        return grad * float("nan") if trainer.branch.step + 1 == 5 else grad

    target.register_hook(poison)
    trainer.fit()
    store.close("finished")
    assert seen["n"] > 0
    t = runstore.read_metrics(store.path).to_pydict()
    assert t[catalog.OVERFLOW_STEPS.name][3] == 0 and t[catalog.OVERFLOW_STEPS.name][4] == 1
    assert not math.isfinite(t[catalog.GRAD_NORM.name][4])
    events = runstore.read_events(store.path)
    overflow = [e for e in events if e["kind"] == EventKind.OVERFLOW]
    assert overflow and overflow[0]["step"] == 5
    assert "non-finite gradients" in overflow[0]["message"]
    layers = runstore.read_layers(store.path).to_pylist()
    at4 = {(r["metric"], r["layer"]): r["value"] for r in layers if r["step"] == 4}
    top = torch.finfo(torch.bfloat16).max  # activations are bf16 in a bf16 engine
    for layer in ("0", "1", "2", "3"):
        absmax = at4[(catalog.ACTIVATION_ABSMAX.name, layer)]
        headroom = at4[(catalog.ACTIVATION_HEADROOM.name, layer)]
        assert headroom == pytest.approx(math.log2(top / absmax))
    under = t[catalog.GRAD_UNDERFLOW.name]
    assert under[3] is not None and 0 <= under[3] < 0.5 and under[0] is None


@pytest.mark.parametrize("precision", ["fp32"])
def test_headroom_of_fp32_run(trained_run: Path, precision: str) -> None:
    layers = runstore.read_layers(trained_run).to_pylist()
    rows = [r for r in layers if r["metric"] == catalog.ACTIVATION_ABSMAX.name]
    assert {r["step"] for r in rows} == set(range(50, 501, 50))
    assert all(0 < r["value"] < 1e3 for r in rows)
