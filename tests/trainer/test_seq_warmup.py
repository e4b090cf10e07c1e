"""Sequence-length warmup (train.seq_warmup): the schedule, the loop that follows it, a
resume in the middle of it, and the rewarm after a rollback (policy.rollback.rewarm)."""

import itertools
import math
from pathlib import Path

import pytest

from tests.helpers import FAST, make_trainer, train_in_process
from yoto import catalog, runstore
from yoto.config import load_config
from yoto.errors import ConfigError
from yoto.trainer.schedule import BatchRamp, SeqRamp

LOSS, GNORM = catalog.TRAIN_LOSS.name, catalog.GRAD_NORM.name
SEQ, TOKENS = catalog.SEQ_LEN.name, catalog.TOKENS.name


def fast(*extra: str) -> list[str]:
    args = []
    for item in (*FAST, *extra):
        args += ["--set", item]
    return args


def metrics(run: Path) -> dict:
    return runstore.read_metrics(run).to_pydict()


# --- the schedule ---------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "root"])
def test_the_ramp_is_monotone_in_multiples_of_8_and_ends_on_the_full_length(schedule) -> None:
    ramp = SeqRamp(20, 128, 10_000, schedule)
    lengths = [ramp.length_at(t) for t in range(0, 10_001, 50)]
    assert lengths[0] == 16  # 20 rounded down to a multiple of 8
    assert lengths[-1] == 128 and ramp.length_at(10**9) == 128
    assert all(b >= a for a, b in itertools.pairwise(lengths))
    assert all(n % 8 == 0 for n in lengths)
    assert {16, 24, 64, 120, 128} <= set(lengths)  # passes through the steps between
    for t in (1000, 2500, 5000, 9000):
        progress = t / 10_000 if schedule == "linear" else math.sqrt(t / 10_000)
        exact = 16 + (128 - 16) * progress
        assert ramp.length_at(t) == int(exact) - int(exact) % 8, t


def test_root_is_longer_sooner_than_linear() -> None:
    linear, root = SeqRamp(16, 256, 8000, "linear"), SeqRamp(16, 256, 8000, "root")
    assert all(root.length_at(t) >= linear.length_at(t) for t in range(0, 8000, 100))
    assert root.length_at(2000) > linear.length_at(2000)


def test_an_odd_model_length_is_reached_exactly_and_no_warmup_is_constant() -> None:
    assert SeqRamp(8, 100, 1000).length_at(999) == 96
    assert SeqRamp(8, 100, 1000).length_at(1000) == 100
    assert SeqRamp.constant(128).length_at(0) == 128


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["train.seq_warmup.start=256"], "must not exceed model.seq_len=128"),
        (["train.seq_warmup.start=16"], "train.seq_warmup.tokens must be > 0"),
        (["policy.rollback.rewarm=true"], "set train.seq_warmup.start"),
    ],
)
def test_bad_settings_are_refused_with_what_would_be_valid(overrides, says) -> None:
    with pytest.raises(ConfigError, match=says):
        load_config(preset="tiny", overrides=overrides)


# --- the loop -------------------------------------------------------------------------------


def expected_schedule(steps: int, seq: SeqRamp, batch: BatchRamp) -> list[tuple[int, int]]:
    """(batch, length) of each step on the one token clock."""
    consumed, out = 0, []
    for _ in range(steps):
        size, length = batch.size_at(consumed), seq.length_at(consumed)
        out.append((size, length))
        consumed += size * length
    return out


@pytest.mark.parametrize("batch_warmup", [False, True], ids=["seq", "seq+batch"])
def test_each_step_trains_at_its_length_and_counts_its_tokens(tmp_path: Path, batch_warmup):
    extra = (
        ["train.micro_batch_size=4", "train.batch_warmup.start=4", "train.batch_warmup.tokens=2000"]
        if batch_warmup
        else []
    )
    run = train_in_process(
        tmp_path,
        *fast(
            "train.steps=14",
            "train.seq_warmup.start=16",
            "train.seq_warmup.tokens=12000",
            "train.seq_warmup.schedule=root",
            *extra,
        ),
    )
    t = metrics(run)
    batch = BatchRamp(4, 16, 2000, 4) if batch_warmup else BatchRamp.constant(16, 8)
    want = expected_schedule(14, SeqRamp(16, 128, 12000, "root"), batch)
    assert [int(n) for n in t[SEQ]] == [length for _, length in want]
    assert [int(b) for b in t[catalog.BATCH_SIZE_TOKENS.name]] == [b * n for b, n in want]
    consumed = [sum(b * n for b, n in want[: i + 1]) for i in range(14)]
    assert [int(x) for x in t[TOKENS]] == consumed
    per_source = [
        sum(t[catalog.SOURCE_TOKENS.key(source=s)][i] for s in ("code", "prose")) for i in range(14)
    ]
    assert per_source == consumed  # the per-source counts add up to the same tokens
    assert len({n for _, n in want}) >= 4 and want[0][1] == 16  # it grew within the run
    if batch_warmup:
        assert {b for b, _ in want} == {4, 8, 12, 16}  # both ramps moved within the run
    (start,) = [e for e in runstore.read_events(run) if e["kind"] == "seq_len"]
    assert start["data"]["start"] == 16 and start["data"]["target"] == 128


def test_resume_in_the_middle_of_the_warmup_is_bit_exact(tmp_path: Path) -> None:
    warm = ("train.seq_warmup.start=16", "train.seq_warmup.tokens=8000")
    whole = train_in_process(tmp_path / "a", *fast("train.steps=12", *warm))
    part = train_in_process(tmp_path / "b", *fast("train.steps=6", "optim.decay_steps=12", *warm))
    train_in_process(tmp_path / "b", "--resume", str(part), *fast("train.steps=12"))
    a, b = metrics(whole), metrics(part)
    assert b["step"] == list(range(1, 13)) and set(b["attempt"]) == {0}
    assert 16 < a[SEQ][5] < a[SEQ][11] < 128  # resumed while the length was still growing
    assert a[SEQ] == b[SEQ] and a[TOKENS] == b[TOKENS]
    assert a[LOSS] == b[LOSS]  # bit-exact, not approximately
    assert a[GNORM] == b[GNORM]


def test_a_rewarming_rollback_starts_the_length_over_from_its_checkpoint(tmp_path: Path) -> None:
    """nan_grad at step 50 rolls back to step-20; with rewarm the context goes back to 32
    tokens and grows again over the same ramp, from that checkpoint's token count; the
    shorter context's higher loss is not taken for a new spike."""
    trainer, store = make_trainer(
        tmp_path,
        "train.steps=60",
        "checkpoint.every=20",
        "probes.layers.every=1000",
        "probes.spectra.enabled=false",
        "train.seq_warmup.start=32",
        "train.seq_warmup.tokens=12000",
        "policy.rollback.rewarm=true",
        "faults=[nan_grad@50]",
    )
    status = trainer.fit()
    store.close(status)
    assert status == "finished"
    run = store.path
    (rollback,) = [e for e in runstore.read_events(run) if e["kind"] == "rollback"]
    to_step = rollback["data"]["to_step"]
    assert to_step in (20, 40)
    t = metrics(run)
    rows = [
        (s, int(n), int(x))
        for a, s, n, x in zip(t["attempt"], t["step"], t[SEQ], t[TOKENS], strict=True)
        if a == rollback["data"]["attempt"]
    ]
    ramp = SeqRamp(32, 128, 12000)
    origin = rows[0][2] - rows[0][1] * 16  # the checkpoint's tokens: before its first step
    consumed = origin
    for step, length, tokens in rows:
        assert length == ramp.length_at(consumed - origin), step
        consumed += 16 * length
        assert tokens == consumed
    assert rows[0][0] == to_step + 1 and rows[0][1] == 32
    assert rows[-1][1] > 32  # growing again
    before = {s: n for a, s, n in zip(t["attempt"], t["step"], t[SEQ], strict=True) if a == 0}
    assert before[to_step] == 128 > rows[0][1]  # the checkpoint itself was past the warmup
    kinds = [(e["kind"], e["data"].get("rewarm")) for e in runstore.read_events(run)]
    assert ("seq_len", True) in kinds and ("seq_len", False) in kinds
    again = [
        e
        for e in runstore.read_events(run)
        if e["kind"] in ("spike", "skip_step") and e["attempt"] == rollback["data"]["attempt"]
    ]
    # the shorter context's loss is a new level, not a spike
    assert again == [] and kinds.count(("rollback", None)) == 1


def test_a_shorter_context_restarts_the_spike_windows_instead_of_raising_a_spike() -> None:
    """A rewarm's jump in loss is a new level: the detector starts its windows over when
    yoto_seq_len drops (and still judges the same jump a spike when the length did not)."""
    from yoto.config import SpikesConfig
    from yoto.probes.spikes import SpikeDetector

    def run(drop: bool) -> list:
        detector, verdicts = SpikeDetector(SpikesConfig()), []
        for step in range(1, 80):
            short = step > 60
            loss = 3.0 + 0.01 * (step % 3) + (0.6 if short else 0.0)
            values = {LOSS: loss, GNORM: 1.0 + 0.01 * (step % 5)}
            values[SEQ] = 32.0 if short and drop else 128.0
            verdicts += list(detector.observe(step, values))
        return verdicts

    assert 61 in [v.step for v in run(drop=False)]
    assert run(drop=True) == []


def test_the_skip_gate_forgets_its_window_on_restart() -> None:
    import torch

    from yoto.config import SkipStepConfig
    from yoto.trainer.skip_step import SkipGate

    gate = SkipGate(SkipStepConfig(enabled=True, window=8), torch.device("cpu"))

    def step(loss: float) -> bool:
        gate.begin(torch.tensor(loss), torch.tensor(1.0))
        verdict = bool(gate.skip())
        gate.end()
        return verdict

    assert not any(step(3.0 + 0.01 * (i % 2)) for i in range(8))
    assert step(4.0)  # an outlier against the full window
    gate.restart()
    assert not step(4.0)  # judged again only once half the window has refilled
