import math

import pytest
import torch

from yoto import catalog
from yoto.probes.base import Sample
from yoto.probes.runner import ProbeRunner


class CountingProbe:
    name = "counting"
    every = 2

    def __init__(self) -> None:
        self.calls = 0

    def on_micro_step(self, ctx):
        return []

    def on_step(self, ctx):
        self.calls += 1
        return [Sample(catalog.GRAD_NORM.name, torch.tensor(float(self.calls)))]

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


class Ctx:
    def __init__(self, step: int) -> None:
        self.step = step


def test_flush_converts_tensors_and_floats_once() -> None:
    runner = ProbeRunner()
    runner.add(Sample(catalog.TRAIN_LOSS.name, torch.tensor(2.5)))
    runner.add(Sample(catalog.LEARNING_RATE.name, 1e-3))
    runner.add(Sample(catalog.VAL_LOSS.name, torch.tensor([float("nan")]), {"source": "code"}))
    values, control = runner.flush(torch.tensor([1.0, 0.0]))
    assert values[catalog.TRAIN_LOSS.name] == 2.5
    assert values[catalog.LEARNING_RATE.name] == 1e-3
    assert math.isnan(values['yoto_val_loss{source="code"}'])
    assert control == [1.0, 0.0]
    assert runner.flush() == ({}, [])  # pending values were consumed


def test_one_host_copy_per_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    copies = []
    original = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        copies.append(self.shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    runner = ProbeRunner()
    for i in range(10):
        runner.add(Sample(catalog.TRAIN_LOSS.name, torch.tensor(float(i))))
        runner.add(Sample(catalog.GRAD_NORM.name, torch.tensor(float(i))))
    runner.flush(torch.zeros(1))
    assert len(copies) == 1


def test_unknown_names_and_wrong_labels_are_refused() -> None:
    runner = ProbeRunner()
    with pytest.raises(KeyError, match="not in the metric catalog"):
        runner.add(Sample("yoto_made_up", 1.0))
    with pytest.raises(ValueError, match=r"takes labels \('source',\)"):
        runner.add(Sample(catalog.VAL_LOSS.name, 1.0))


def test_cadence_and_state() -> None:
    probe = CountingProbe()
    runner = ProbeRunner([probe])
    for step in range(1, 7):
        runner.on_step(Ctx(step))
    assert probe.calls == 3
    values, _ = runner.flush()
    assert values[catalog.GRAD_NORM.name] == 3.0  # the last one wins within a flush
    state = runner.state_dict()
    fresh = ProbeRunner([CountingProbe()])
    fresh.load_state_dict(state)
    assert fresh.probes[0].calls == 3
