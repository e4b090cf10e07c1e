"""Layer spectra: the run directory's spectra/ equals a direct weightwatcher call."""

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from yoto import catalog, runstore
from yoto.cli import main
from yoto.config import SpectraConfig
from yoto.probes.spectra import SpectraProbe
from yoto.trainer.offline import checkpoint_model

COLUMNS = ("alpha", "alpha_weighted", "stable_rank", "log_spectral_norm", "log_norm")


def direct_weightwatcher(model: nn.Module) -> dict[str, dict[str, float]]:
    """weightwatcher called directly on copies of the model's Linear layers."""
    import weightwatcher as ww

    names, layers = [], nn.ModuleDict()
    seen = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            copy = nn.Linear(module.in_features, module.out_features, bias=False)
            copy.weight.data.copy_(module.weight.data)
            layers[f"l{len(names)}"] = copy
            names.append(name)
    frame = ww.WeightWatcher(model=layers).analyze(min_evals=10, svd_method="accurate", plot=False)
    return {names[int(r["name"][1:])]: r for r in frame.to_dict("records")}


def test_recorded_spectra_equal_weightwatcher_on_the_same_weights(trained_run: Path) -> None:
    spectra = runstore.read_table(trained_run, runstore.SPECTRA).to_pylist()
    at500 = {r["layer"]: r for r in spectra if r["step"] == 500}  # analysed at the end
    assert len(at500) == 17  # 4 blocks x 4 matrices + the (tied) LM head
    model, _ = checkpoint_model(trained_run, 500)
    direct = direct_weightwatcher(model)
    assert set(direct) == set(at500)
    for layer, row in at500.items():
        for column in COLUMNS:
            assert row[column] == pytest.approx(direct[layer][column], rel=1e-6), (layer, column)
        assert len(row["esd"]) == int(row["num_evals"]) or len(row["esd"]) >= row["num_evals"]
    layers = runstore.read_layers(trained_run).to_pylist()
    gauges = {
        r["layer"]: r["value"]
        for r in layers
        if r["metric"] == catalog.WEIGHT_ALPHA.name and r["step"] == 500
    }
    assert gauges == pytest.approx({k: v["alpha"] for k, v in at500.items()})


def test_spectra_on_demand_for_a_checkpoint(run_copy: Path, capsys) -> None:
    rc = main(["spectra", str(run_copy), "--step", "400"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "blocks.0.attn.qkv" in out and "written to" in out
    rows = [
        r for r in runstore.read_table(run_copy, runstore.SPECTRA).to_pylist() if r["step"] == 400
    ]
    model, _ = checkpoint_model(run_copy, 400)
    direct = direct_weightwatcher(model)
    assert {r["layer"]: r["alpha"] for r in rows} == pytest.approx(
        {k: v["alpha"] for k, v in direct.items()}
    )
    assert main(["spectra", str(run_copy), "--step", "123"]) == 2
    assert "has no checkpoint for step 123; it has: 300, 400, 500" in capsys.readouterr().err


def test_analysis_in_flight_makes_the_next_one_skip() -> None:
    probe = SpectraProbe(SpectraConfig(every=2))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
    probe.attach(model, None)

    class Ctx:
        def __init__(self, step: int) -> None:
            self.step = step

    try:
        first = list(probe.on_step(Ctx(2)))  # submitted: the worker process starts
        second = list(probe.on_step(Ctx(4)))  # still starting/analysing: skipped
        assert probe.skipped == 1
        skipped = [
            s.value for s in second if getattr(s, "name", "") == catalog.SPECTRA_SKIPPED.name
        ]
        assert skipped == [1.0] and first
        deadline = time.time() + 120
        results = []
        while not results and time.time() < deadline:
            results = [x for x in probe.on_step(Ctx(5)) if getattr(x, "table", None)]
            time.sleep(0.2)
        assert results and results[0].step == 2 and len(results[0].rows) == 2
    finally:
        probe.detach()
