"""kill -9 drills: the record survives what the checkpoints survive.

A real ``yoto train`` is killed (SIGKILL, no chance to clean up) at a few fixed points:
just as a checkpoint is sealed, and a few steps after one; each time it is resumed. At the
end the run has exactly one row per (attempt, step), every step from 1 to the last is
recorded, and ``yoto runs show`` reports no gap."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers import FAST, VENV_BIN, only_run, subprocess_env
from yoto import runstore
from yoto.cli import main
from yoto.events import EventKind

pytestmark = pytest.mark.slow

STEPS = 60
SETS = [
    x
    for item in (
        *FAST,
        f"train.steps={STEPS}",
        "checkpoint.every=10",
        "checkpoint.keep_last=2",
        "probes.spectra.enabled=false",
    )
    for x in ("--set", item)
]
# (checkpoint whose COMPLETE marker we wait for, seconds after it before the kill)
KILLS = [(10, 0.0), (30, 0.3), (40, 0.0)]


def _yoto(*args: str) -> subprocess.Popen:
    cmd = [str(VENV_BIN / "yoto"), *args, "--no-progress", "--metrics-addr", "0", *SETS]
    return subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _kill_after_seal(proc: subprocess.Popen, marker: Path, delay: float) -> None:
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {marker} was sealed:\n{proc.communicate()[0]}")
        assert time.monotonic() < deadline, f"{marker} never appeared"
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the drill must kill a live run"


def test_kill_9_then_resume_leaves_no_gap(tmp_path: Path, capsys) -> None:
    proc = _yoto("train", "--run-root", str(tmp_path), "--name", "drill")
    run: Path | None = None
    for step, delay in KILLS:
        while run is None:  # the run directory exists before the first step
            try:
                run = only_run(tmp_path)
            except (AssertionError, FileNotFoundError):
                time.sleep(0.05)
        _kill_after_seal(proc, run / runstore.CHECKPOINTS / f"step-{step}" / "COMPLETE", delay)
        # killed without a word, the manifest still says running; the list does not
        assert runstore.read_manifest(run)["status"] == "running"
        assert main(["runs", "list", str(tmp_path)]) == 0
        [row] = [line for line in capsys.readouterr().out.splitlines() if run.name in line]
        assert row.split()[1] == runstore.CRASHED_MAYBE
        proc = _yoto("train", "--resume", str(run))
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out
    assert run is not None

    t = pq.read_table(runstore.segment_files(run), columns=["attempt", "step"])
    pairs = list(zip(t["attempt"].to_pylist(), t["step"].to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)), "a (attempt, step) recorded twice"
    assert {step for _, step in pairs} == set(range(1, STEPS + 1))
    assert runstore.find_gaps(run) == []
    resumes = [e for e in runstore.read_events(run) if e["kind"] == EventKind.RESUME]
    assert len(resumes) == len(KILLS)

    show = subprocess.run(
        [str(VENV_BIN / "yoto"), "runs", "show", str(run)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert show.returncode == 0, show.stderr
    assert f"record   no gap (every step from 1 to {STEPS} recorded)" in show.stdout


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 25 MiB tmpfs (two tiny checkpoints and change); skipped where none can be mounted
    (it takes root, or a user namespace)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    got = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=25m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if got.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here for the disk-full drill: {got.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_one_message_a_crashed_run_and_a_resume(small_disk: Path) -> None:
    cmd = [str(VENV_BIN / "yoto"), "train", "--run-root", str(small_disk), "--no-progress"]
    proc = subprocess.run(
        [*cmd, "--metrics-addr", "0", *SETS, "--set", "checkpoint.keep_last=5"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [line] = proc.stderr.strip().splitlines()  # one line, no traceback
    assert re.fullmatch(
        r"yoto: error: no space left on device while writing checkpoint step-30 "
        r"\(\d+\.\d MB free at .*/checkpoints; \d+\.\d MB once the unsealed checkpoint was "
        r"removed\)\. .*then resume: yoto train --resume RUN_DIR",
        line,
    ), line
    run = only_run(small_disk)
    assert runstore.read_manifest(run)["status"] == "crashed"
    events = runstore.read_events(run)
    [warned] = [e for e in events if "will not fit" in e["message"]]
    assert warned["step"] == 30 and warned["severity"] == "warning"
    [end] = [e for e in events if e["kind"] == EventKind.END]
    assert end["message"].startswith("run crashed: no space left on device")
    steps = pq.read_table(runstore.segment_files(run), columns=["step"])["step"].to_pylist()
    assert steps == list(range(1, 31))  # the rows up to the failed save are kept
    ckpts = runstore.list_checkpoints(run / runstore.CHECKPOINTS)
    assert [(c.step, c.complete) for c in ckpts] == [(10, True), (20, True)]

    subprocess.run(["mount", "-o", "remount,size=100m", str(small_disk)], check=True)
    resumed = _yoto("train", "--resume", str(run))
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert runstore.read_manifest(run)["status"] == "finished"
    assert runstore.find_gaps(run) == []
