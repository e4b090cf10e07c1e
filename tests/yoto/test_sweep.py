"""``yoto sweep`` end to end on the CPU: three model sizes trained for a few steps, each an
ordinary run directory tagged with the sweep, then fitted; larger models must come out
better and the fitted law must fall with N."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import FAST
from yoto import runstore
from yoto.cli import main

pytestmark = pytest.mark.slow

# a 1-block model on 32-token contexts: a few seconds a run, and 30 steps are enough for
# width to matter (the losses differ by ~0.5 nats between neighbouring sizes)
SMALL = [
    *FAST,
    "data.max_bytes_per_source=1000000",
    "probes.enabled=false",
    "model.n_layer=1",
    "model.seq_len=32",
    "train.micro_batch_size=8",
    "train.global_batch_size=8",
    "train.steps=30",
]


def test_three_size_sweep_then_fit(tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs"
    sets = [arg for item in SMALL for arg in ("--set", item)]
    grid = ["--grid", "model.d_model=16,32,64", "--name", "w"]
    rc = main(["sweep", "--preset", "tiny", "--run-root", str(root), *sets, *grid])
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    sweep_id = re.search(r"sweep (sweep-\S+): 3 of 3 runs finished", out).group(1)
    assert "Kaplan law" in out and f"--sweep {sweep_id}" in out

    runs = sorted(runstore.list_runs(root), key=lambda r: r.sweep["index"])
    assert [r.sweep["point"] for r in runs] == [{"model.d_model": w} for w in (16, 32, 64)]
    assert {r.sweep["id"] for r in runs} == {sweep_id}
    assert all(r.status == "finished" and r.last_step == 30 for r in runs)
    sizes = [r.non_embedding_parameters for r in runs]
    assert sizes[0] < sizes[1] < sizes[2]
    # equal tokens: every run trained on 30 steps x 8 sequences x 32 tokens
    assert {r.tokens for r in runs} == {30 * 8 * 32}
    losses = [sum(r.val_loss.values()) / len(r.val_loss) for r in runs]
    assert losses[0] == max(losses), losses  # the smallest model is the worst

    rc = main(["scaling", "fit", str(root), "--sweep", sweep_id, "--json", "--bootstrap", "50"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    fits = {f["source"]: f for f in json.loads(out)}
    mean = fits["all"]
    assert mean["law"] == "kaplan" and mean["points"] == 3
    assert mean["params"]["alpha_N"]["value"] > 0  # the fitted law falls with N
    by_size = sorted(mean["runs"], key=lambda r: r["N"])
    predicted = [r["predicted"] for r in by_size]
    assert predicted == sorted(predicted, reverse=True)
    assert [r["N"] for r in by_size] == sizes
    effective = [r["effective_size"]["value"] for r in by_size]
    assert effective == sorted(effective)
    assert {"code", "prose"} <= set(fits)  # per-source laws from per-source val losses
