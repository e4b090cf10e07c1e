"""Spectra at every ZeRO stage: the bounded consolidator equals DeepSpeed's zero_to_fp32
bit for bit (stages 1-3, two CPU ranks), and a ZeRO-3 checkpoint's spectra, through
``yoto spectra``, the probe's worker and a training run, equal weightwatcher called
directly on zero_to_fp32's weights."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import FAST, only_run, subprocess_env, torchrun, train_in_process
from tests.probes.test_spectra import direct_weightwatcher
from yoto import runstore
from yoto.cli import main
from yoto.config import SpectraConfig
from yoto.errors import ConfigError, RunDirError
from yoto.probes.base import Record, Sample, Verdict
from yoto.probes.consolidate import CheckpointGone, ShardedCheckpoint
from yoto.probes.spectra import SpectraProbe, analyze_checkpoint, weight_names
from yoto.trainer.model import GPT, vocab_size
from yoto.trainer.offline import run_config

COLUMNS = ("alpha", "alpha_weighted", "stable_rank", "log_spectral_norm", "log_norm")
# odd sizes (d_model 99): parameters whose numel is odd, so ZeRO-3 pads the last rank's
# share and the slices do not fall on round boundaries
MODEL = ["model.d_model=99", "model.n_head=3", "model.n_layer=2"]
LAYERS = 2 * 4 + 1  # 2 blocks x (qkv, attn proj, fc, mlp proj) + the tied LM head
COMMON = [
    *FAST,
    *MODEL,
    "checkpoint.keep_last=10",
]
PER_STAGE = {
    1: ["train.steps=4", "checkpoint.every=2"],
    2: ["train.steps=4", "checkpoint.every=2"],
    # spectra every 2 steps from checkpoints (auto at ZeRO-3): step-4 and step-8 are
    # sealed during the run, step-12 is saved after its last step
    3: ["train.steps=12", "checkpoint.every=4", "probes.spectra.every=2"],
}


def _train_two_ranks(root: Path, stage: int) -> Path:
    sets = []
    for item in (*COMMON, f"train.zero_stage={stage}", *PER_STAGE[stage]):
        sets += ["--set", item]
    env = subprocess_env()
    env["DS_ACCELERATOR"] = "cpu"
    cmd = [*torchrun(2), "-m", "yoto.cli", "train", "--run-root", str(root), "--no-progress"]
    proc = subprocess.run(
        [*cmd, "--name", f"z{stage}", *sets], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return only_run(root)


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory: pytest.TempPathFactory):
    """stage -> a two-rank run directory of that ZeRO stage (trained once, on first use)."""
    runs: dict[int, Path] = {}

    def get(stage: int) -> Path:
        if stage not in runs:
            runs[stage] = _train_two_ranks(tmp_path_factory.mktemp(f"zero{stage}"), stage)
        return runs[stage]

    return get


def _ckpt(run: Path, step: int) -> Path:
    return run / runstore.CHECKPOINTS / f"step-{step}"


def zero_to_fp32(ckpt: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def direct(run: Path, ckpt: Path) -> dict[str, dict]:
    """weightwatcher called directly on a model holding zero_to_fp32's weights, plus the
    eigenvalues of each matrix, by layer."""
    cfg = run_config(run)
    model = GPT(cfg.model, vocab_size(cfg))
    model.load_state_dict({k: v.detach().float() for k, v in zero_to_fp32(ckpt).items()})
    out = direct_weightwatcher(model)
    for layer, module in model.named_modules():
        if layer in out:
            w = module.weight.detach().double().numpy()
            out[layer]["esd"] = np.sort(np.linalg.svd(w, compute_uv=False) ** 2)
    return out


def assert_same_spectra(rows: list[dict], ref: dict[str, dict]) -> None:
    got = {r["layer"]: r for r in rows}
    assert len(rows) == LAYERS and set(got) == set(ref)
    for layer, r in got.items():
        for column in (*COLUMNS, "lambda_max"):
            assert r[column] == pytest.approx(ref[layer][column], rel=1e-7), (layer, column)
        assert int(r["num_evals"]) == int(ref[layer]["num_evals"]), layer
        np.testing.assert_allclose(np.asarray(r["esd"]), ref[layer]["esd"], rtol=1e-9)


def _layers(run: Path) -> dict[str, str]:
    cfg = run_config(run)
    with torch.device("meta"):
        return weight_names(GPT(cfg.model, vocab_size(cfg)))


class Ctx:
    def __init__(self, step: int) -> None:
        self.step = step


def _wait_for_output(probe: SpectraProbe, step: int = 1) -> list:
    """Off-cadence steps until the worker hands in what it was given."""
    deadline = time.time() + 180
    while time.time() < deadline:
        out = [x for x in probe.on_step(Ctx(step)) if isinstance(x, Record | Verdict)]
        if out:
            return out
        time.sleep(0.1)
    raise AssertionError("the spectra worker answered nothing in 180 s")


# --- the consolidator -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_consolidator_equals_zero_to_fp32(zero_run, stage: int) -> None:
    run = zero_run(stage)
    ckpts = [c for c in runstore.list_checkpoints(run / runstore.CHECKPOINTS) if c.complete]
    assert [c.step for c in ckpts] == ([2, 4] if stage < 3 else [4, 8, 12])
    for ckpt in ckpts:
        ref = zero_to_fp32(ckpt.path)
        with ShardedCheckpoint(ckpt.path) as shards:
            assert (shards.stage, shards.world) == (stage, 2)
            assert sorted(shards.names()) == sorted(ref)  # the tied alias included
            odd = [n for n in ref if ref[n].numel() % 2]
            assert len(odd) >= 10  # the fixture exercises the last rank's padding
            for name, tensor in shards.tensors(shards.names()):
                assert tensor.dtype == torch.float32 and tensor.shape == ref[name].shape
                assert torch.equal(tensor, ref[name]), (ckpt.tag, name)
            assert torch.equal(shards.tensor("lm_head.weight"), ref["tok_emb.weight"])


@pytest.mark.slow
def test_mapped_checkpoint_survives_its_removal(zero_run, tmp_path: Path) -> None:
    """Once the worker has mapped a checkpoint's files, a prune that deletes them changes
    nothing it reads."""
    source = _ckpt(zero_run(3), 8)
    ref = zero_to_fp32(source)
    copy = tmp_path / "step-8"
    shutil.copytree(source, copy)
    with ShardedCheckpoint(copy) as shards:
        shutil.rmtree(copy)
        for name, tensor in shards.tensors(shards.names()):
            assert torch.equal(tensor, ref[name]), name


def test_stage0_checkpoint_gives_its_module_weights(tmp_path: Path) -> None:
    run = train_in_process(
        tmp_path, *[a for s in (*FAST, *MODEL, "train.steps=2") for a in ("--set", s)]
    )
    ckpt = _ckpt(run, 2)  # the one saved at the end
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    with ShardedCheckpoint(ckpt) as shards:
        assert shards.stage == 0
        assert sorted(shards.names()) == sorted(module)
        for name, tensor in shards.tensors(module):
            assert torch.equal(tensor, module[name].float()), name


@pytest.mark.slow
def test_bad_checkpoints_are_named(zero_run, tmp_path: Path) -> None:
    with pytest.raises(CheckpointGone, match="does not exist"):
        ShardedCheckpoint(tmp_path / "step-99")
    empty = tmp_path / "step-1"
    empty.mkdir()
    with pytest.raises(RunDirError, match="holds neither mp_rank_00_model_states.pt nor"):
        ShardedCheckpoint(empty)
    half = tmp_path / "step-4"
    shutil.copytree(_ckpt(zero_run(3), 4), half)
    (half / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(RunDirError, match="saved by 2 ranks but holds 1 optimizer files"):
        ShardedCheckpoint(half)
    shards = ShardedCheckpoint(_ckpt(zero_run(3), 4))
    with pytest.raises(RunDirError, match="'nope.weight' is not a parameter of checkpoint"):
        shards.tensor("nope.weight")
    shards.close()


# --- spectra of a ZeRO-3 checkpoint -------------------------------------------------------


@pytest.mark.slow
def test_cli_spectra_of_a_zero3_checkpoint_equal_weightwatcher(zero_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(zero_run(3), run)
    shutil.rmtree(run / runstore.SPECTRA, ignore_errors=True)  # only the CLI's rows
    assert main(["spectra", str(run), "--step", "8"]) == 0
    out = capsys.readouterr().out
    assert "blocks.1.mlp.proj" in out and "lm_head" in out and "written to" in out
    rows = [
        r
        for r in runstore.read_table(run, runstore.SPECTRA).to_pylist()
        if r["step"] == 8 and r["attempt"] == 0
    ]
    ref = direct(run, _ckpt(run, 8))
    assert_same_spectra(rows, ref)
    # the comparison tells checkpoints apart: step 4's weights give other numbers
    other = direct(run, _ckpt(run, 4))
    assert any(ref[k]["alpha"] != pytest.approx(other[k]["alpha"], rel=1e-4) for k in ref)
    (_ckpt(run, 12) / runstore.COMPLETE).unlink()
    assert main(["spectra", str(run), "--step", "12"]) == 2
    assert "checkpoint step-12 cannot be used: no COMPLETE marker" in capsys.readouterr().err


@pytest.mark.slow
def test_probe_analyses_the_newest_complete_checkpoint(zero_run, tmp_path: Path) -> None:
    """The probe's own path: on a due step it hands the newest COMPLETE checkpoint that it
    has not analysed to its worker; the rows are that checkpoint's, under its step."""
    run = zero_run(3)
    root = tmp_path / "checkpoints"
    root.mkdir()
    probe = SpectraProbe(SpectraConfig(every=2), zero_stage=3, checkpoints=root)
    assert probe.source == "checkpoint"
    cfg = run_config(run)
    with torch.device("meta"):
        probe.attach(GPT(cfg.model, vocab_size(cfg)), None)
    try:
        assert list(probe.on_step(Ctx(2))) == []  # nothing saved yet: nothing said
        shutil.copytree(_ckpt(run, 4), root / "step-4")
        shutil.copytree(_ckpt(run, 8), root / "step-8", ignore=shutil.ignore_patterns("COMPLETE"))
        started = list(probe.on_step(Ctx(10)))  # step-8 is not sealed: step-4 it is
        assert [s.value for s in started if isinstance(s, Sample)] == [0.0]
        (record,) = [x for x in _wait_for_output(probe) if isinstance(x, Record)]
        assert record.table == runstore.SPECTRA and record.step == 4
        assert_same_spectra(record.rows, direct(run, _ckpt(run, 4)))
        assert list(probe.on_step(Ctx(12))) == []  # step-4 done, nothing newer sealed
        shutil.copy2(_ckpt(run, 8) / runstore.COMPLETE, root / "step-8" / runstore.COMPLETE)
        assert list(probe.on_step(Ctx(14)))  # sealed now: its analysis starts
        (record,) = [x for x in _wait_for_output(probe) if isinstance(x, Record)]
        assert record.step == 8
        assert_same_spectra(record.rows, direct(run, _ckpt(run, 8)))
        assert probe.skipped == 0
    finally:
        probe.detach()


@pytest.mark.slow
def test_checkpoint_pruned_before_it_is_read_is_one_failed_analysis(zero_run, tmp_path):
    """A prune under way (COMPLETE still there, a rank's file gone) costs that one
    analysis: an info spectra verdict, no rows, no probe failure; the next one runs."""
    run = zero_run(3)
    root = tmp_path / "checkpoints"
    root.mkdir()
    probe = SpectraProbe(SpectraConfig(every=2), zero_stage=3, checkpoints=root)
    probe.attach(GPT(run_config(run).model, vocab_size(run_config(run))), None)
    try:
        shutil.copytree(_ckpt(run, 4), root / "step-4")
        (root / "step-4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
        assert list(probe.on_step(Ctx(6)))
        (verdict,) = _wait_for_output(probe)
        assert isinstance(verdict, Verdict) and verdict.kind == "spectra"
        assert verdict.severity == "info" and verdict.reason is None and verdict.step == 4
        assert "spectra of checkpoint step-4 not analysed" in verdict.message
        shutil.copytree(_ckpt(run, 8), root / "step-8")
        probe.on_step(Ctx(8))
        (record,) = [x for x in _wait_for_output(probe) if isinstance(x, Record)]
        assert record.step == 8 and len(record.rows) == LAYERS
    finally:
        probe.detach()
    # a damaged checkpoint that no prune explains is an error, said as it is
    broken = tmp_path / "step-8"
    shutil.copytree(_ckpt(run, 8), broken)
    damaged = broken / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    damaged.write_bytes(b"\0" * damaged.stat().st_size)  # the size COMPLETE lists
    with pytest.raises(RunDirError, match="cannot be read as a torch checkpoint file") as err:
        analyze_checkpoint(broken, _layers(run), 10, "accurate")
    assert not isinstance(err.value, CheckpointGone)


@pytest.mark.slow
def test_zero3_training_records_spectra_of_its_checkpoints(zero_run) -> None:
    run = zero_run(3)
    rows = runstore.read_table(run, runstore.SPECTRA).to_pylist()
    steps = sorted({r["step"] for r in rows})
    # step-4 and step-8 are sealed while training runs; which of them the worker got to
    # depends on timing, at least one always (the last step waits for its analysis)
    assert steps and set(steps) <= {4, 8}, steps
    for step in steps:
        at = [r for r in rows if r["step"] == step]
        assert {r["attempt"] for r in at} == {0}
        assert_same_spectra(at, direct(run, _ckpt(run, step)))
    events = runstore.read_events(run)
    assert not [e for e in events if e["kind"] == "probe"], events
    assert not [e for e in events if "switched off" in e["message"] or "ZeRO" in e["message"]]


def test_spectra_source_follows_the_zero_stage(tmp_path: Path) -> None:
    assert SpectraProbe(SpectraConfig(), zero_stage=2).source == "live"
    assert SpectraProbe(SpectraConfig(), zero_stage=3, checkpoints=tmp_path).source == (
        "checkpoint"
    )
    asked = SpectraConfig(source="checkpoint")
    assert SpectraProbe(asked, zero_stage=0, checkpoints=tmp_path).source == "checkpoint"
    with pytest.raises(ConfigError, match="source=live needs the full weights on rank 0"):
        SpectraProbe(SpectraConfig(source="live"), zero_stage=3, checkpoints=tmp_path)
    with pytest.raises(ValueError, match="need the run's checkpoint folder"):
        SpectraProbe(SpectraConfig(), zero_stage=3)


def test_no_checkpoints_to_read_is_said_once(tmp_path: Path) -> None:
    probe = SpectraProbe(SpectraConfig(every=2), 3, tmp_path, checkpoint_every=0)
    probe.attach(torch.nn.Sequential(torch.nn.Linear(16, 16)), None)
    assert list(probe.on_step(Ctx(1))) == []  # not a due step
    (said,) = probe.on_step(Ctx(2))
    assert isinstance(said, Verdict) and said.severity == "info" and said.reason is None
    assert "checkpoint.every=0 saves none during the run" in said.message
    assert list(probe.on_step(Ctx(4))) == []
    probe.detach()
