"""Two ranks on CPU (gloo) under torchrun: one run directory, written by rank 0 only."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import FAST, only_run, subprocess_env, train_in_process
from yoto import catalog, runstore

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_write_one_run_directory(tmp_path: Path) -> None:
    sets = []
    for item in (*FAST, "train.steps=6", "eval.every=3", "checkpoint.every=3"):
        sets += ["--set", item]
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]
    cmd = [
        *launcher,
        "-m",
        "yoto.cli",
        "train",
        "--run-root",
        str(tmp_path / "two"),
        "--name",
        "two",
        "--no-progress",
        *sets,
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = only_run(tmp_path / "two")
    manifest = runstore.read_manifest(run)
    assert manifest["world_size"] == 2 and manifest["status"] == "finished"
    t = runstore.read_metrics(run).to_pydict()
    assert t["step"] == [1, 2, 3, 4, 5, 6]  # rank 1 wrote no rows of its own
    kinds = [e["kind"] for e in runstore.read_events(run)]
    assert kinds.count("start") == 1 and kinds.count("end") == 1
    for ckpt in runstore.list_checkpoints(run / "checkpoints"):
        assert ckpt.complete
        assert {p.name for p in ckpt.path.glob("yoto-rank*.pt")} == {
            "yoto-rank00000.pt",
            "yoto-rank00001.pt",
        }
    for source in ("code", "prose"):
        assert t[catalog.VAL_LOSS.key(source=source)][2] is not None

    # the same global batch on one rank: ranks took different halves of it, not copies
    one = train_in_process(tmp_path / "one", *sets)
    ref = runstore.read_metrics(one).to_pydict()
    loss = catalog.TRAIN_LOSS.name
    assert t[loss][0] == pytest.approx(ref[loss][0], rel=1e-5)
    assert t[loss][-1] == pytest.approx(ref[loss][-1], rel=1e-4)
    gn = catalog.GRAD_NORM.name
    assert t[gn][0] == pytest.approx(ref[gn][0], rel=1e-4)
