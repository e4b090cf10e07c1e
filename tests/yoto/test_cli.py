"""The yoto command: summaries of real runs, and the promised errors for bad input."""

import json
from pathlib import Path

import pytest

from yoto.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_runs_list_and_show(trained_run: Path, capsys) -> None:
    rc, out, _ = run_cli(capsys, "runs", "list", str(trained_run.parent))
    assert rc == 0
    header, row = out.splitlines()[:2]
    assert header.split()[:4] == ["RUN", "STATUS", "STEP", "TOKENS"]
    assert trained_run.name in row and "finished" in row and " 500 " in row

    rc, out, _ = run_cli(capsys, "runs", "show", str(trained_run))
    assert rc == 0
    assert "status   finished" in out and "val      code" in out and "val      prose" in out
    assert "checkpoints step-300, step-400, step-500" in out

    rc, out, _ = run_cli(capsys, "runs", "show", str(trained_run), "--json")
    info = json.loads(out)
    assert info["summary"]["last_step"] == 500 and info["manifest"]["world_size"] == 1
    assert {c["step"] for c in info["checkpoints"]} == {300, 400, 500}
    rc, out, _ = run_cli(capsys, "runs", "list", str(trained_run.parent), "--json")
    assert json.loads(out)[0]["status"] == "finished"


def test_saved_config_is_the_resolved_one(trained_run: Path, capsys) -> None:
    # the fixture trained with --no-progress, which is part of the resolved config
    rc, out, _ = run_cli(capsys, "config", "--preset", "tiny", "--set", "log.progress=false")
    assert rc == 0
    assert (trained_run / "config.yaml").read_text() == out


def test_presets_command(capsys) -> None:
    rc, out, _ = run_cli(capsys, "presets")
    assert rc == 0 and "tiny" in out and "gpt2-124m" in out and "gpt-1.3b" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.stpes=5"], "unknown field 'train.stpes' (did you mean 'steps'?)"),
        (["--set", "train.precision=fp17"], "train.precision: Input should be 'fp32', 'bf16' or"),
        (["--set", "optim.lr=-1"], "optim.lr: Input should be greater than 0 (got -1)"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (
            ["--config", "/nonexistent/cfg.yaml"],
            "config file '/nonexistent/cfg.yaml' does not exist",
        ),
        (
            ["--set", "model.vocab_size=100"],
            "model.vocab_size=100 is smaller than the byte tokenizer",
        ),
        (["--set", "train.device=cuda"], "train.device='cuda' but CUDA is not available"),
        (
            ["--set", "data.paths=[/nonexistent/corpus]"],
            "data path '/nonexistent/corpus' (data.paths) does not exist",
        ),
        (
            ["--set", "model.seq_len=100000", "--set", "data.paths=[{tmp}/small.txt]"],
            "data source 'small' has",
        ),
        (["--resume", "{tmp}/not-a-run"], "does not exist"),
    ],
)
def test_bad_input_fails_before_training(tmp_path: Path, capsys, args, message) -> None:
    import torch

    if "train.device=cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    (tmp_path / "small.txt").write_text("hello " * 100)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    root = tmp_path / "runs"
    rc, _, err = run_cli(capsys, "train", "--run-root", str(root), *args)
    assert rc == 2
    assert err.startswith("yoto: error: ") and message in err, err
    assert "Traceback" not in err
    assert not root.exists() or not any(root.iterdir())  # no run directory was created


def test_resume_refuses_a_new_preset(trained_run: Path, capsys) -> None:
    rc, _, err = run_cli(capsys, "train", "--resume", str(trained_run), "--preset", "tiny")
    assert rc == 2 and "--resume continues with the run's saved config.yaml" in err


def test_runs_show_on_a_non_run(tmp_path: Path, capsys) -> None:
    rc, _, err = run_cli(capsys, "runs", "show", str(tmp_path))
    assert rc == 2 and "is not a run directory (no manifest.json)" in err
