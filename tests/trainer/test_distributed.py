"""Two ranks on CPU (gloo) under torchrun and under the deepspeed launcher: one run
directory, written by rank 0 only, training on halves of the same global batch."""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import FAST, VENV_BIN, only_run, subprocess_env, torchrun, train_in_process
from yoto import catalog, runstore

pytestmark = pytest.mark.slow

SETS = []
for _item in (*FAST, "train.steps=6", "eval.every=3", "checkpoint.every=3"):
    SETS += ["--set", _item]


def launcher(name: str) -> list[str]:
    if name == "torchrun":
        return [*torchrun(2), "-m"]
    port = torchrun(2)[-1]  # a free port
    return [
        str(VENV_BIN / "deepspeed"),
        "--num_accelerators",
        "2",
        "--master_port",
        port,
        "--module",
    ]


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same global batch on one rank, for comparison."""
    run = train_in_process(tmp_path_factory.mktemp("one"), *SETS)
    return runstore.read_metrics(run).to_pydict()


@pytest.mark.parametrize("name", ["torchrun", "deepspeed"])
def test_two_ranks_write_one_run_directory(tmp_path: Path, name: str, one_rank_run) -> None:
    env = subprocess_env()
    env["DS_ACCELERATOR"] = "cpu"
    cmd = [
        *launcher(name),
        "yoto.cli",
        "train",
        "--run-root",
        str(tmp_path),
        "--name",
        name,
        "--no-progress",
        *SETS,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = only_run(tmp_path)
    manifest = runstore.read_manifest(run)
    assert manifest["world_size"] == 2 and manifest["status"] == "finished"
    t = runstore.read_metrics(run).to_pydict()
    assert t["step"] == [1, 2, 3, 4, 5, 6]  # rank 1 wrote no rows of its own
    kinds = [e["kind"] for e in runstore.read_events(run)]
    assert kinds.count("start") == 1 and kinds.count("end") == 1
    ckpts = runstore.list_checkpoints(run / "checkpoints")
    assert [c.step for c in ckpts] == [3, 6]
    for ckpt in ckpts:
        assert ckpt.complete
        assert {p.name for p in ckpt.path.glob("yoto-rank*.pt")} == {
            "yoto-rank00000.pt",
            "yoto-rank00001.pt",
        }
    for source in ("code", "prose"):
        assert t[catalog.VAL_LOSS.key(source=source)][2] is not None

    # ranks took different halves of the global batch (copies would change the numbers)
    ref = one_rank_run
    for key, rel in ((catalog.TRAIN_LOSS.name, 1e-5), (catalog.GRAD_NORM.name, 1e-4)):
        assert t[key][0] == pytest.approx(ref[key][0], rel=rel)
        assert t[key][-1] == pytest.approx(ref[key][-1], rel=10 * rel)


def _rank_pids(parent: int) -> dict[int, int]:
    """rank -> pid of the workers torchrun started (its children, by their RANK)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = dict(
                item.split("=", 1)
                for item in (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in item
            )
        except (OSError, ValueError, IndexError):
            continue  # it ended meanwhile
        if "RANK" in env:
            found[int(env["RANK"])] = int(proc.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_rank_killed_mid_run_ends_the_run_crashed(tmp_path: Path) -> None:
    """SIGKILL to rank 1: rank 0 fails in its next collective and torchrun SIGTERMs it;
    the manifest must say 'crashed' (written first on the way out), not 'running'. A chat
    webhook that refuses connections makes the way out long (the notifier drains its
    queue), as a real one that is slow would."""
    sets = [
        x for item in (*FAST, "train.steps=100000", "checkpoint.every=5") for x in ("--set", item)
    ]
    cmd = [*torchrun(2), "-m", "yoto.cli", "train", "--run-root", str(tmp_path)]
    cmd += ["--no-progress", "--metrics-addr", "0", *sets]
    env = subprocess_env()
    env["DS_ACCELERATOR"] = "cpu"
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        env["YOTO_NOTIFY_URLS"] = f"json://127.0.0.1:{closed.getsockname()[1]}/"
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob(f"*/{runstore.CHECKPOINTS}/step-5/COMPLETE")):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint sealed"
            time.sleep(0.1)
        os.kill(_rank_pids(proc.pid)[1], signal.SIGKILL)
        out = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out
    run = only_run(tmp_path)
    assert runstore.read_manifest(run)["status"] == "crashed", out[-3000:]
    assert runstore.summarize(run).state == "crashed"
