import json
from pathlib import Path

import pytest

from yoto import runstore
from yoto.runstore import CheckpointDir, list_checkpoints
from yoto.trainer.checkpoint import newest_valid, prune, verify, write_complete


def fake_ckpt(root: Path, step: int, complete: bool = True) -> CheckpointDir:
    path = root / f"step-{step}"
    (path / "sub").mkdir(parents=True)
    (path / "model.pt").write_bytes(bytes(range(256)) * 40)
    (path / "sub" / "optim.pt").write_bytes(b"optimizer state %d" % step)
    if complete:
        write_complete(path, step)
    return CheckpointDir(step, path)


def test_complete_marker_lists_every_file(tmp_path: Path) -> None:
    ckpt = fake_ckpt(tmp_path, 10)
    marker = json.loads((ckpt.path / "COMPLETE").read_text())
    assert marker["step"] == 10
    assert set(marker["files"]) == {"model.pt", "sub/optim.pt"}
    assert marker["files"]["model.pt"]["size"] == 10240
    assert verify(ckpt) is None
    assert not [p for p in ckpt.path.iterdir() if ".tmp" in p.name]


def test_missing_marker_is_never_valid(tmp_path: Path) -> None:
    assert "no COMPLETE marker" in verify(fake_ckpt(tmp_path, 5, complete=False))


def test_wrong_hash_same_size_is_caught(tmp_path: Path) -> None:
    ckpt = fake_ckpt(tmp_path, 5)
    data = bytearray((ckpt.path / "model.pt").read_bytes())
    data[100] ^= 0xFF
    (ckpt.path / "model.pt").write_bytes(bytes(data))
    assert "does not match its sha256" in verify(ckpt)
    assert verify(ckpt, check_hashes=False) is None  # sizes alone cannot see it


def test_truncated_or_missing_file_is_caught(tmp_path: Path) -> None:
    ckpt = fake_ckpt(tmp_path, 5)
    (ckpt.path / "model.pt").write_bytes(b"short")
    assert "has 5 bytes" in verify(ckpt)
    other = fake_ckpt(tmp_path, 6)
    (other.path / "sub" / "optim.pt").unlink()
    assert "sub/optim.pt is missing" in verify(other)


def test_marker_for_another_step_or_garbled(tmp_path: Path) -> None:
    ckpt = fake_ckpt(tmp_path, 5)
    marker = json.loads((ckpt.path / "COMPLETE").read_text())
    marker["step"] = 6
    (ckpt.path / "COMPLETE").write_text(json.dumps(marker))
    assert "for step 6" in verify(ckpt)
    (ckpt.path / "COMPLETE").write_text("{")
    assert "unreadable" in verify(ckpt)


def test_newest_valid_skips_bad_ones_with_reasons(tmp_path: Path) -> None:
    fake_ckpt(tmp_path, 10)
    bad = fake_ckpt(tmp_path, 20)
    (bad.path / "model.pt").write_bytes(b"x" * 10240)
    fake_ckpt(tmp_path, 30, complete=False)
    rejected = []
    chosen = newest_valid(tmp_path, lambda c, why: rejected.append((c.step, why)))
    assert chosen.step == 10
    assert [s for s, _ in rejected] == [30, 20]
    assert "no COMPLETE" in rejected[0][1] and "sha256" in rejected[1][1]
    assert newest_valid(tmp_path / "none", lambda c, w: None) is None


def test_prune_keeps_last_k_and_protected(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40, 50):
        fake_ckpt(tmp_path, step)
    fake_ckpt(tmp_path, 15, complete=False)  # an old unfinished save
    fake_ckpt(tmp_path, 60, complete=False)  # a save in progress
    removed = prune(tmp_path, keep_last=2, protect={20})
    assert sorted(c.step for c in removed) == [10, 15, 30]
    assert [c.step for c in list_checkpoints(tmp_path)] == [20, 40, 50, 60]


def test_fixture_run_checkpoints_are_complete_and_pruned(trained_run: Path) -> None:
    ckpts = list_checkpoints(trained_run / runstore.CHECKPOINTS)
    assert [c.step for c in ckpts] == [300, 400, 500]  # every 100, keep_last 3
    assert all(verify(c) is None for c in ckpts)
    files = set(json.loads((ckpts[-1].path / "COMPLETE").read_text())["files"])
    assert {"mp_rank_00_model_states.pt", "yoto-rank00000.pt"} <= files


@pytest.mark.parametrize("keep", [1, 3])
def test_prune_never_removes_the_newest_complete(tmp_path: Path, keep: int) -> None:
    for step in (1, 2, 3, 4):
        fake_ckpt(tmp_path, step)
    prune(tmp_path, keep_last=keep)
    assert [c.step for c in list_checkpoints(tmp_path)][-1] == 4
    assert len(list_checkpoints(tmp_path)) == keep
