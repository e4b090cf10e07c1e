"""The yoto command: summaries of real runs, and the promised errors for bad input."""

import json
from itertools import takewhile
from pathlib import Path

import pytest

from yoto import catalog, runstore
from yoto.cli import main
from yoto.events import Event, EventKind, Severity

LOSS, TOKENS = catalog.TRAIN_LOSS.name, catalog.TOKENS.name


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
            "model.vocab_size=100 is smaller than the vocabulary of data.tokenizer",
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


def _run(root: Path, name: str) -> Path:
    """A finished run of 12 steps with an event each (a spike at 7), by the run store."""
    store = runstore.RunStore.create(root, name, "model:\n  seq_len: 8\n", flush_every_steps=5)
    for step in range(1, 13):
        store.write_step(0, step, {LOSS: 5.0 - 0.1 * step, TOKENS: 64.0 * step})
        kind = EventKind.SPIKE if step == 7 else EventKind.CHECKPOINT
        store.write_event(Event(step, 0, kind, Severity.WARNING, f"event {step}", {}))
    store.close("finished")
    return store.path


def _row(out: str, run: Path) -> list[str]:
    """The run's row of 'runs list' and the notes under it."""
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(run.name))
    return [lines[at], *takewhile(lambda line: line.startswith("  ! "), lines[at + 1 :])]


def test_runs_list_and_show_name_what_they_skipped(tmp_path: Path, capsys) -> None:
    gone, garbage, bad_config = (_run(tmp_path, n) for n in ("gone", "garbage", "config"))
    (gone / runstore.MANIFEST).unlink()
    lines = (garbage / runstore.EVENTS).read_text().splitlines()
    lines.insert(6, "garbage{{")  # line 7
    (garbage / runstore.EVENTS).write_text("\n".join(lines) + "\n")
    (bad_config / runstore.CONFIG).write_text("model:\n  seq_len: 8\n bad: [\n")

    rc, out, _ = run_cli(capsys, "runs", "list", str(tmp_path))
    assert rc == 0
    row, note = _row(out, gone)
    assert row.split()[1:3] == ["damaged", "12"]
    assert note == "  ! no manifest.json (deleted, or never written)"
    row, note = _row(out, garbage)
    assert row.split()[1:3] == ["finished", "12"]
    assert note == "  ! 1 unreadable event line skipped (line 7 of events.jsonl)"
    row, note = _row(out, bad_config)
    assert row.split()[1:3] == ["finished", "12"]
    assert note.startswith("  ! config.yaml is not valid YAML: line 3, column 2: expected")

    rc, out, _ = run_cli(capsys, "runs", "show", str(gone))
    assert rc == 0
    assert "problem  no manifest.json (deleted, or never written)" in out
    assert "status   damaged (no readable manifest" in out
    assert "progress step 12, 768 tokens" in out and "record   no gap" in out
    assert "events   checkpoint 11, spike 1" in out and "spike: event 7" in out
    rc, out, _ = run_cli(capsys, "runs", "show", str(gone), "--json")
    info = json.loads(out)
    assert info["manifest"] is None and info["summary"]["state"] == "damaged"
    assert len(info["events"]) == 12

    rc, out, _ = run_cli(capsys, "runs", "show", str(garbage))
    assert "problem  1 unreadable event line skipped (line 7 of events.jsonl)" in out
    assert "events   checkpoint 11, spike 1" in out  # every readable event still counted
    rc, out, _ = run_cli(capsys, "runs", "show", str(bad_config))
    assert "problem  config.yaml is not valid YAML: line 3, column 2" in out


def test_runs_list_shows_a_lone_run_without_its_manifest(tmp_path: Path, capsys) -> None:
    """It used to say 'no runs under ROOT' although the run's record was intact."""
    run = _run(tmp_path, "alone")
    (run / runstore.MANIFEST).unlink()
    rc, out, _ = run_cli(capsys, "runs", "list", str(tmp_path))
    assert rc == 0 and "no runs under" not in out
    assert _row(out, run)[0].split()[1] == "damaged"


def test_runs_show_lists_the_newest_few_shot_scores(tmp_path: Path, capsys) -> None:
    """Each task/metric's newest score with its step, attempt and n-shot; one a rollback
    undid (attempt 0's step 10, re-trained by attempt 1 from step 9) says so."""
    store = runstore.RunStore.create(tmp_path, "scored", "model:\n  seq_len: 8\n")
    for attempt, steps in ((0, range(1, 11)), (1, range(9, 13))):
        for step in steps:
            store.write_step(attempt, step, {LOSS: 5.0 - 0.1 * step, TOKENS: 64.0 * step})
    store.close("finished")
    run = store.path
    rc, out, _ = run_cli(capsys, "runs", "show", str(run))
    assert rc == 0 and "few-shot" not in out  # no evaluations: no section
    assert json.loads(run_cli(capsys, "runs", "show", str(run), "--json")[1])["evals"] == []

    def row(task: str, metric: str, value: float, stderr: float, shots: int) -> dict:
        return {"task": task, "metric": metric, "value": value, "stderr": stderr,
                "num_fewshot": shots, "limit": -1, "backend": "YotoLM"}  # fmt: skip

    runstore.append_records(run, runstore.EVALS, 0, 4, [row("cloze", "acc", 0.5, 0.05, 0)])
    runstore.append_records(run, runstore.EVALS, 0, 8, [row("cloze", "acc", 0.6, 0.04, 0)])
    runstore.append_records(
        run, runstore.EVALS, 0, 10, [row("next", "bits_per_byte", 2.5, float("nan"), 5)]
    )
    runstore.append_records(run, runstore.EVALS, 1, 12, [row("cloze", "acc", 0.7, 0.03, 0)])
    rc, out, _ = run_cli(capsys, "runs", "show", str(run))
    assert rc == 0
    lines = [line for line in out.splitlines() if line.startswith(("few-shot", "         "))]
    assert lines == [
        "few-shot cloze/acc           0.7000 ± 0.0300  step 12, attempt 1, 0-shot",
        "         next/bits_per_byte  2.5000  step 10, attempt 0, 5-shot, on an abandoned "
        "branch (a later attempt re-trained this step)",
    ]
    info = json.loads(run_cli(capsys, "runs", "show", str(run), "--json")[1])
    assert info["evals"] == [
        {"task": "cloze", "metric": "acc", "value": 0.7, "stderr": 0.03, "step": 12,
         "attempt": 1, "num_fewshot": 0, "limit": None, "tokens": 768.0,
         "branch": "surviving"},
        {"task": "next", "metric": "bits_per_byte", "value": 2.5, "stderr": None, "step": 10,
         "attempt": 0, "num_fewshot": 5, "limit": None, "tokens": 640.0,
         "branch": "abandoned"},
    ]  # fmt: skip
