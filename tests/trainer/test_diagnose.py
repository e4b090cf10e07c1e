"""Why did it spike (trainer/diagnose.py): spike forensics name the sequences a bad batch
put in, a replay tells data from state from machine, and neither changes what the run
trains on afterwards."""

import json
import math
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import (
    FAST,
    make_trainer,
    only_run,
    subprocess_env,
    torchrun,
    train_in_process,
)
from yoto import catalog, runstore
from yoto.config import load_config
from yoto.trainer.data.corpus import stdlib_documents
from yoto.trainer.diagnose import (
    Cause,
    Trajectory,
    classify,
    first_difference,
    peak,
)
from yoto.trainer.faults import FaultInjector

LOSS = catalog.TRAIN_LOSS.name
CADENCE = [
    "checkpoint.every=20",
    "checkpoint.keep_last=10",
    "probes.layers.every=1000",
    "probes.spectra.enabled=false",
]
DIAGNOSE = ["policy.rollback.diagnose.enabled=true"]


def events_of(run: Path, kind: str) -> list[dict]:
    return [e for e in runstore.read_events(run) if e["kind"] == kind]


# --- the verdict, from trajectories ---------------------------------------------------------


def _traj(label: str, losses: list[float], ranks: list[list[float]] | None = None) -> Trajectory:
    t = Trajectory(label)
    for i, loss in enumerate(losses):
        t.add(10 + i, loss, 1.0, (ranks or [[loss]] * len(losses))[i])
    return t


def test_verdicts_from_trajectories() -> None:
    level = (2.0, 1.0)
    rec = _traj("recorded", [2.0, 2.0, 6.0, 5.0])
    same = _traj("replay", [2.0, 2.0, 6.0, 5.0])
    gone = _traj("without_onset", [2.0, 2.0, 2.1, 2.0])
    kept = _traj("without_onset", [2.0, 2.0, 5.5, 5.0])
    kw = dict(onset=12, level=level, tolerance=0.0, gone_fraction=0.3, hosts=["h0"])
    assert classify(recorded=rec, replay=same, without=gone, **kw)[0] == Cause.DATA
    assert classify(recorded=rec, replay=same, without=kept, **kw)[0] == Cause.STATE
    # one rank's own loss differs at the first differing step: that rank is named
    rec2 = _traj("recorded", [2.0, 4.0], [[2.0, 2.0], [2.0, 6.0]])
    rep2 = _traj("replay", [2.0, 2.0], [[2.0, 2.0], [2.0, 2.0]])
    cause, message, step, ranks = classify(recorded=rec2, replay=rep2, without=None, **kw)
    assert (cause, step, ranks) == (Cause.NONDETERMINISTIC, 11, [1])
    assert "rank 1" in message
    # bit-exact by default; a stated tolerance forgives rounding, never a real difference
    near = _traj("replay", [2.0, 2.0, 6.0 * (1 + 1e-7), 5.0])
    assert first_difference(rec, near, 0.0) == (12, [0])
    assert first_difference(rec, near, 1e-6) is None
    # a non-finite loss is the largest peak there is
    assert peak(_traj("r", [2.0, 2.0, math.inf]), 12, level) == math.inf
    cut = _traj("replay", [2.0, 2.0])
    cut.complete = False
    assert classify(recorded=rec, replay=cut, without=None, **kw)[0] == Cause.INCONCLUSIVE


# --- forensics --------------------------------------------------------------------------------


def test_forensics_name_the_corrupted_sequences_and_their_documents(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A bad batch replacing 8 of 16 sequences: the spike event's top 8 by loss are exactly
    those, and each names the source, document and offset the window was cut from (checked
    against the documents themselves, not the sampler's index)."""
    k = 8
    trainer, store = make_trainer(
        tmp_path,
        *CADENCE,
        "train.steps=82",
        f"policy.forensics.top_k={k}",
        f"faults=['bad_batch@80:sequences={k},steps=1']",
    )
    assert trainer.fit() == "finished"
    store.close("finished")
    run = store.path
    [fault] = events_of(run, "fault_injected")
    spikes = [e for e in events_of(run, "spike") if e["data"].get("onset") == 80]
    assert spikes, "the bad batch makes a spike at step 80"
    forensics = spikes[0]["data"]["forensics"]
    position, batch = fault["data"]["sampler_position"], fault["data"]["batch"]
    assert (forensics["sampler_position"], forensics["batch"]) == (position, batch)
    replaced = set(trainer.faults.corrupted(position, batch))
    assert len(replaced) == k
    assert {s["position"] for s in forensics["top"]} == replaced
    losses = [s["loss"] for s in forensics["top"]]
    assert losses == sorted(losses, reverse=True) and min(losses) > forensics["median_loss"]

    cfg = load_config(preset="tiny", overrides=[*FAST, *CADENCE])
    documents = {d.id: d for d in stdlib_documents()}
    windows = trainer.sampler.windows_at(position, batch)
    for s in forensics["top"]:
        doc = documents[s["doc_id"]]
        assert doc.source == s["source"]
        original = trainer.sampler.window(int(windows[s["index"]]))  # before the fault
        n = min(len(original), len(doc.data) - s["offset"])
        assert n > 0
        assert bytes(original[:n].astype(np.uint8)) == doc.data[s["offset"] : s["offset"] + n]
    assert sum(forensics["source_tokens"].values()) == batch * cfg.model.seq_len
    assert math.isclose(sum(forensics["expected_source_tokens"].values()), batch * 128)

    # yoto data batch prints the same sequences, the replaced ones marked
    from yoto.cli import main

    capsys.readouterr()
    assert main(["data", "batch", str(run), "--step", "80", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert (listed["attempt"], listed["sampler_position"], listed["batch"]) == (0, position, batch)
    marked = {q["position"] for q in listed["sequences"] if q["replaced"]}
    assert marked == replaced
    by_position = {q["position"]: q for q in listed["sequences"]}
    for s in forensics["top"]:
        q = by_position[s["position"]]
        assert (q["source"], q["doc_id"], q["offset"]) == (s["source"], s["doc_id"], s["offset"])
        assert q["snippet"].startswith(s["snippet"][:40])
    assert listed["source_tokens"] == forensics["source_tokens"]


def test_bad_input_to_the_offline_tools_is_a_clear_error(tmp_path: Path, trained_run: Path) -> None:
    from yoto.cli import EXIT_BAD_INPUT, main

    assert main(["data", "batch", str(trained_run), "--step", "999999"]) == EXIT_BAD_INPUT
    assert main(["diagnose", str(trained_run), "--step", "3"]) == EXIT_BAD_INPUT


# --- replay diagnosis ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_batch_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """The same bad batch at step 60 with the diagnosis on and off."""
    runs = {}
    for on in (True, False):
        root = tmp_path_factory.mktemp(f"diagnose-{on}")
        runs[on] = train_in_process(
            root,
            *(a for item in CADENCE for a in ("--set", item)),
            "--set",
            "train.steps=70",
            "--set",
            f"policy.rollback.diagnose.enabled={str(on).lower()}",
            "--inject",
            "bad_batch@60",
            name=f"diagnose-{on}",
        )
    return runs


def test_a_bad_batch_is_diagnosed_as_data_and_changes_nothing_after(
    bad_batch_runs: dict[bool, Path],
) -> None:
    on, off = bad_batch_runs[True], bad_batch_runs[False]
    [diagnosis] = events_of(on, "diagnosis")
    [rollback] = events_of(on, "rollback")
    data = diagnosis["data"]
    assert data["cause"] == Cause.DATA, data["finding"]
    assert diagnosis["step"] == rollback["step"] and diagnosis["attempt"] == rollback["attempt"]
    assert rollback["data"]["diagnosis"]["cause"] == Cause.DATA
    assert "diagnosis: data" in rollback["message"]
    labels = {t["label"]: t for t in data["trajectories"]}
    recorded, replay, without = labels["recorded"], labels["replay"], labels["without_onset"]
    # bit-exact on CPU: the replay is the record, step for step
    assert replay["loss"] == recorded["loss"] and replay["grad_norm"] == recorded["grad_norm"]
    onset = data["onset"]
    before = [x for s, x in zip(without["steps"], without["loss"], strict=True) if s < onset]
    assert before == [x for s, x in zip(replay["steps"], replay["loss"], strict=True) if s < onset]
    assert max(without["loss"]) < max(replay["loss"]) - 1.0  # the spike is gone without it
    assert data["replayed_steps"] == 2 * (data["end"] - data["checkpoint_step"])

    # the replays are not rows: each (attempt, step) once, attempt 0 up to the rollback
    t_on, t_off = (runstore.read_metrics(r).to_pydict() for r in (on, off))
    keys = list(zip(t_on["attempt"], t_on["step"], strict=True))
    assert len(keys) == len(set(keys))
    assert max(s for a, s in keys if a == 0) == rollback["data"]["from_step"]
    # the surviving branch is the one without a diagnosis, bit for bit
    assert events_of(off, "diagnosis") == []
    [rollback_off] = events_of(off, "rollback")
    for key in ("to_step", "onset", "sampler_position_resume", "skipped_batches"):
        assert rollback["data"][key] == rollback_off["data"][key], key
    for column in (LOSS, catalog.GRAD_NORM.name, catalog.SAMPLER_POSITION.name):
        assert t_on[column] == t_off[column], column


def test_yoto_diagnose_after_the_fact_agrees_with_the_run(
    bad_batch_runs: dict[bool, Path], capsys: pytest.CaptureFixture
) -> None:
    from yoto.cli import main

    run = bad_batch_runs[True]
    [diagnosis] = events_of(run, "diagnosis")
    onset = diagnosis["data"]["onset"]
    before = runstore.read_events(run), runstore.read_metrics(run).num_rows
    capsys.readouterr()
    assert main(["diagnose", str(run), "--step", str(onset), "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["cause"] == diagnosis["data"]["cause"] == Cause.DATA
    assert after["checkpoint_step"] == diagnosis["data"]["checkpoint_step"]
    assert after["peaks"] == diagnosis["data"]["peaks"]  # the same replay, bit for bit
    assert (runstore.read_events(run), runstore.read_metrics(run).num_rows) == before


def test_a_halting_policy_names_the_machine(tmp_path: Path) -> None:
    """A NaN gradient from nowhere does not come back in a replay: nondeterministic, and
    with on_nondeterministic=halt the run stops naming the rank and host."""
    run = train_in_process(
        tmp_path,
        *(a for item in (*CADENCE, *DIAGNOSE) for a in ("--set", item)),
        "--set",
        "train.steps=70",
        "--set",
        "policy.rollback.diagnose.on_nondeterministic=halt",
        "--inject",
        "nan_grad@50",
        status="halted",
    )
    [diagnosis] = events_of(run, "diagnosis")
    assert diagnosis["data"]["cause"] == Cause.NONDETERMINISTIC
    assert diagnosis["data"]["ranks"] == [0]
    assert diagnosis["data"]["hosts"] == [socket.gethostname()]
    [halt] = events_of(run, "halt")
    assert halt["data"]["reason"] == "nondeterministic"
    assert socket.gethostname() in halt["message"]


@pytest.mark.slow
def test_a_flaky_rank_is_named_among_two(tmp_path: Path) -> None:
    """Rank 1's computation goes wrong once in the first pass only (a flaky GPU): both
    ranks roll back, and the diagnosis names rank 1 of two from the ranks' own losses."""
    sets = ["--inject", "flaky@50:rank=1,factor=inf"]
    for item in (*FAST, *CADENCE, *DIAGNOSE, "train.steps=75"):
        sets += ["--set", item]
    cmd = [*torchrun(2), "-m", "yoto.cli", "train", "--run-root", str(tmp_path), "--no-progress"]
    proc = subprocess.run(
        [*cmd, *sets], env=subprocess_env(), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = only_run(tmp_path)
    [rollback] = events_of(run, "rollback")
    [diagnosis] = events_of(run, "diagnosis")
    data = diagnosis["data"]
    assert data["cause"] == Cause.NONDETERMINISTIC, data["finding"]
    assert data["first_difference"] == 50 and data["ranks"] == [1]
    assert data["hosts"] == [socket.gethostname()] and "rank 1" in rollback["message"]
    t = runstore.read_metrics(run).to_pydict()
    resumed = [s for a, s in zip(t["attempt"], t["step"], strict=True) if a == 1]
    assert resumed[0] == rollback["data"]["to_step"] + 1 and resumed[-1] == 75


def test_flaky_fault_acts_only_in_the_first_pass() -> None:
    faults = FaultInjector(["flaky@5:factor=3,rank=1"], rank=1, precision="fp32")
    import torch

    model = torch.nn.Module()
    faults.begin_step(5, model, 0, 4)
    assert faults.loss_factor() == 3.0
    faults.rolled_back()  # a replay or the branch after it
    assert faults.loss_factor() == 1.0
    other = FaultInjector(["flaky@5:factor=3,rank=1"], rank=0, precision="fp32")
    other.begin_step(5, model, 0, 4)
    assert other.loss_factor() == 1.0


def test_the_budget_bounds_a_diagnosis(tmp_path: Path) -> None:
    """Over the step budget a diagnosis is not run; past the time budget the replay is cut
    short (inconclusive); either way the checkpoint is restored for the rollback."""
    from types import SimpleNamespace

    import torch

    from yoto.trainer.checkpoint import CheckpointDir
    from yoto.trainer.diagnose import Diagnoser

    trainer, store = make_trainer(
        tmp_path, "train.steps=30", "checkpoint.every=10", "probes.spectra.enabled=false"
    )
    assert trainer.fit() == "finished"
    store.close("finished")
    root = trainer.checkpointer.root
    ckpt = CheckpointDir(10, root / "step-10")
    plan = SimpleNamespace(checkpoint=ckpt, onset=25, from_step=27, skip_to=10_000)
    trainer.restore(ckpt)
    saved = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}

    diagnose = trainer.cfg.policy.rollback.diagnose
    diagnose.max_steps = 10  # 2 x 17 steps needed
    found = Diagnoser(trainer, "cpu").run(plan)
    assert found.cause == Cause.NOT_RUN and "max_steps=10" in found.finding
    assert found.replayed_steps == 0

    diagnose.max_steps, diagnose.max_seconds = 200, 1e-6
    found = Diagnoser(trainer, "cpu").run(plan)
    assert found.cause == Cause.INCONCLUSIVE
    replay = found.trajectories[1]
    assert not replay.complete and len(replay.steps) == 1  # stopped after its first step
    for name, tensor in trainer.engine.module.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert (
        trainer.branch.step == 10
        and trainer.sampler.position == trainer.history.traces[11].position
    )
