"""The DeepSpeed loop, trained for real on CPU (gloo)."""

import math
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import FAST, only_run, subprocess_env, train_in_process, yoto_bin
from yoto import catalog, runstore
from yoto.cli import EXIT_CODES
from yoto.config import load_config
from yoto.trainer.schedule import BatchRamp

LOSS, GNORM = catalog.TRAIN_LOSS.name, catalog.GRAD_NORM.name


def metrics(run: Path) -> dict:
    return runstore.read_metrics(run).to_pydict()


def losses_by_step(run: Path, attempt: int | None = None) -> dict[int, float]:
    t = metrics(run)
    return {
        s: v
        for a, s, v in zip(t["attempt"], t["step"], t[LOSS], strict=True)
        if attempt is None or a == attempt
    }


def test_tiny_preset_learns_and_records_val_loss_per_source(trained_run: Path) -> None:
    t = metrics(trained_run)
    steps = load_config(preset="tiny").train.steps
    assert t["step"] == list(range(1, steps + 1))  # one row per step, no duplicates
    first, last = t[LOSS][0], sum(t[LOSS][-20:]) / 20
    assert first > 5.0  # ~ln(320) at init
    assert last < first - 2.0, f"loss {first:.3f} -> {last:.3f}"
    for source in ("code", "prose"):
        key = catalog.VAL_LOSS.key(source=source)
        vals = [(s, v) for s, v in zip(t["step"], t[key], strict=True) if v is not None]
        assert [s for s, _ in vals] == list(range(50, 501, 50))
        assert vals[-1][1] < vals[0][1] and all(math.isfinite(v) for _, v in vals)
    for name in (
        GNORM,
        catalog.LEARNING_RATE.name,
        catalog.THROUGHPUT.name,
        catalog.STEP_DURATION.name,
        catalog.TOKENS.name,
    ):
        assert all(v is not None and math.isfinite(v) and v > 0 for v in t[name]), name
    m = runstore.read_manifest(trained_run)
    assert m["status"] == "finished" and m["summary"]["last_step"] == steps
    kinds = [e["kind"] for e in runstore.read_events(trained_run)]
    assert kinds[0] == "start" and kinds[-1] == "end" and "checkpoint" in kinds


def test_tiny_preset_batch_warmup_follows_its_schedule(trained_run: Path) -> None:
    cfg = load_config(preset="tiny")
    t, seq = metrics(trained_run), cfg.model.seq_len
    ramp = BatchRamp(
        cfg.train.batch_warmup.start,
        cfg.train.global_batch_size,
        cfg.train.batch_warmup.tokens,
        cfg.train.micro_batch_size,
    )
    consumed = 0
    for step, batch_tokens, total in zip(
        t["step"], t[catalog.BATCH_SIZE_TOKENS.name], t[catalog.TOKENS.name], strict=True
    ):
        assert batch_tokens == ramp.size_at(consumed) * seq, f"step {step}"
        consumed += batch_tokens
        assert total == consumed
    assert t[catalog.BATCH_SIZE_TOKENS.name][0] == 8 * seq
    assert t[catalog.BATCH_SIZE_TOKENS.name][-1] == 16 * seq


def test_batch_warmup_drives_the_engine(tmp_path: Path) -> None:
    """A longer ramp in coarse steps: the engine's batch (and accumulation) at each step."""
    run = train_in_process(
        tmp_path,
        *fast(
            "train.steps=12",
            "train.micro_batch_size=4",
            "train.global_batch_size=16",
            "train.batch_warmup.start=4",
            "train.batch_warmup.tokens=4096",
        ),
    )
    t = metrics(run)
    sizes = [b // 128 for b in t[catalog.BATCH_SIZE_TOKENS.name]]
    ramp, consumed, expected = BatchRamp(4, 16, 4096, 4), 0, []
    for _ in range(12):
        expected.append(ramp.size_at(consumed))
        consumed += expected[-1] * 128
    assert sizes == expected
    assert {4, 8, 12, 16} <= set(sizes)  # passes through the intermediate sizes
    changes = [e for e in runstore.read_events(run) if e["kind"] == "batch_size"]
    distinct = [s for i, s in enumerate(sizes) if i == 0 or s != sizes[i - 1]]
    assert [e["data"]["new"] for e in changes] == distinct


def fast(*extra: str) -> list[str]:
    args = []
    for item in (*FAST, *extra):
        args += ["--set", item]
    return args


@pytest.mark.parametrize(
    "variant",
    [
        ["train.zero_stage=0"],
        ["train.zero_stage=2", "train.micro_batch_size=4"],
    ],
)
def test_resume_is_bit_exact(tmp_path: Path, variant: list[str]) -> None:
    whole = train_in_process(tmp_path / "a", *fast("train.steps=12", *variant))
    part = train_in_process(
        tmp_path / "b", *fast("train.steps=6", "optim.decay_steps=12", *variant)
    )
    train_in_process(tmp_path / "b", "--resume", str(part), *fast("train.steps=12"))
    a, b = metrics(whole), metrics(part)
    assert b["step"] == list(range(1, 13)) and set(b["attempt"]) == {0}
    assert a[LOSS] == b[LOSS]  # bit-exact, not approximately
    assert a[GNORM] == b[GNORM]
    resume = [e for e in runstore.read_events(part) if e["kind"] == "resume"]
    assert resume[0]["data"]["checkpoint"] == "step-6"
    assert resume[0]["data"]["replayed_steps"] == 0


def test_corrupt_newest_checkpoint_is_skipped_and_replay_is_a_new_attempt(run_copy: Path) -> None:
    newest = run_copy / "checkpoints" / "step-500" / "mp_rank_00_model_states.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    (run_copy / "checkpoints" / "step-400" / "COMPLETE").unlink()
    train_in_process(
        run_copy.parent,
        "--resume",
        str(run_copy),
        "--set",
        "train.steps=305",
        "--set",
        "optim.decay_steps=500",  # the original schedule
        "--set",
        "eval.every=0",
    )
    events = runstore.read_events(run_copy)
    skipped = [e for e in events if e["data"].get("rejected") is True]
    assert [e["data"]["checkpoint"] for e in skipped] == ["step-500", "step-400"]
    assert "sha256" in skipped[0]["message"] and "COMPLETE" in skipped[1]["message"]
    resume = [e for e in events if e["kind"] == "resume"][-1]
    assert resume["data"]["checkpoint"] == "step-300" and resume["attempt"] == 1
    assert resume["data"]["replayed_steps"] == 200
    before, after = losses_by_step(run_copy, 0), losses_by_step(run_copy, 1)
    assert sorted(after) == list(range(301, 306))
    # the replay from step-300 reproduces the original branch exactly
    assert all(after[s] == before[s] for s in after)


def test_fp16_on_this_cpu_is_a_config_error_before_any_run(tmp_path: Path, capsys) -> None:
    import torch

    from yoto.cli import main

    try:
        fp16_ok = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        fp16_ok = False
    if fp16_ok or torch.cuda.is_available():
        pytest.skip("this machine supports fp16")
    rc = main(["train", "--run-root", str(tmp_path), "--set", "train.precision=fp16"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train.precision='fp16' is not supported on this CPU" in err and "bf16" in err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("stage", "precision"), [(1, "fp32"), (2, "bf16"), (3, "fp32"), (3, "bf16")]
)
def test_zero_stages_and_bf16_train(tmp_path: Path, stage: int, precision: str) -> None:
    run = train_in_process(
        tmp_path,
        *fast("train.steps=4", f"train.zero_stage={stage}", f"train.precision={precision}"),
    )
    t = metrics(run)
    assert len(t[LOSS]) == 4 and all(math.isfinite(v) for v in t[LOSS] + t[GNORM])
    assert t[LOSS][-1] < t[LOSS][0]
    reference = train_in_process(tmp_path / "ref", *fast("train.steps=4"))
    ref = metrics(reference)
    tol = 1e-5 if precision == "fp32" else 2e-2  # ZeRO is the same maths; bf16 rounds
    assert t[GNORM][0] == pytest.approx(ref[GNORM][0], rel=tol)
    assert t[LOSS][-1] == pytest.approx(ref[LOSS][-1], rel=tol)


def test_sigterm_checkpoints_and_marks_interrupted(tmp_path: Path) -> None:
    """A scheduler's SIGTERM: the step finishes, a checkpoint is sealed, status says so,
    and the run resumes from there."""
    args = [
        yoto_bin(),
        "train",
        "--run-root",
        str(tmp_path),
        "--name",
        "sig",
        *fast("train.steps=100000", "log.flush_every_steps=1"),
    ]
    proc = subprocess.Popen(
        args, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            runs = list(tmp_path.glob("*/manifest.json"))
            if runs and (runstore.last_recorded(runs[0].parent) or (0, 0))[1] >= 3:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_CODES["interrupted"] == 75, out  # EX_TEMPFAIL: resume it
    run = only_run(tmp_path)
    summary = runstore.summarize(run)
    assert summary.status == "interrupted"
    ckpts = runstore.list_checkpoints(run / "checkpoints")
    assert ckpts and ckpts[-1].step == summary.last_step and ckpts[-1].complete
    end = [e for e in runstore.read_events(run) if e["kind"] == "end"][-1]
    assert end["data"]["status"] == "interrupted"


def test_resume_on_changed_data_is_refused_and_the_run_kept(run_copy: Path, capsys) -> None:
    from yoto.cli import main

    before = runstore.read_manifest(run_copy)
    rc = main(
        [
            "train",
            "--resume",
            str(run_copy),
            "--no-progress",
            "--set",
            "data.max_bytes_per_source=1000000",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "yoto: error: the training data differ from the checkpoint's" in err
    after = runstore.read_manifest(run_copy)
    assert after["status"] == before["status"] == "finished"
    assert runstore.read_metrics(run_copy).num_rows == 500  # nothing lost or added
    assert [c.step for c in runstore.list_checkpoints(run_copy / "checkpoints")] == [300, 400, 500]
    last = runstore.read_events(run_copy)[-1]
    assert last["kind"] == "end" and last["message"].startswith("resume refused")


def test_a_zero3_run_gives_torch_its_linear_back(tmp_path: Path) -> None:
    """DeepSpeed's ZeRO-3 engine swaps torch.nn.functional.linear for the whole process; a
    later run in it (yoto sweep's next) must not train through DeepSpeed's linear."""
    import torch

    original = torch.nn.functional.linear
    train_in_process(tmp_path, *fast("train.steps=2", "train.zero_stage=3", "probes.enabled=false"))
    assert torch.nn.functional.linear is original
