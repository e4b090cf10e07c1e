"""The TensorBoard sink, read back with TensorBoard's own reader (EventAccumulator).

A short real training run with a rollback writes event files that must hold exactly the
run directory's values, per attempt, per layer; hand-made rows pin down the tags, the
attempt layout, the purge on resume and the errors."""

from __future__ import annotations

import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from tests.helpers import train_in_process
from yoto import catalog, runstore
from yoto.dashboards.live.tensorboard import TensorBoardSink, attempt_dir, tag_of
from yoto.errors import ConfigError
from yoto.events import Event, EventKind, Severity

LOSS = catalog.TRAIN_LOSS.name
ROW_COLUMNS = {"attempt", "step", "time"}
# a tiny run that rolls back once: a NaN gradient at step 20 is non-finite at once, and
# small rollback settings let a checkpoint of this short run be a good one
ROLLBACK_RUN = [
    "train.device=cpu",
    "train.steps=26",
    "train.batch_warmup.start=null",
    "data.max_bytes_per_source=1000000",
    "eval.every=10",
    "eval.batches=1",
    "checkpoint.every=8",
    "checkpoint.keep_last=3",
    "policy.rollback.min_distance=4",
    "policy.rollback.healthy_steps=4",
    "policy.rollback.skip_margin=4",
    "probes.layers.every=5",
    "probes.spectra.enabled=false",
]
FAULT_STEP = 20


def read(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, NaN as the string 'nan' so that it compares equal."""
    return {
        tag: {e.step: _comparable(e.value) for e in acc.Scalars(tag)}
        for tag in acc.Tags()["scalars"]
    }


def texts(acc: EventAccumulator, tag: str) -> dict[int, str]:
    return {
        e.step: tensor_util.make_ndarray(e.tensor_proto).item().decode()
        for e in acc.Tensors(f"{tag}/text_summary")
    }


def _comparable(value: float) -> float | str:
    """What a value is once TensorBoard stored it (a float32 scalar)."""
    as_stored = float(np.float32(value))
    return "nan" if math.isnan(as_stored) else as_stored


def expected_scalars(run: Path, attempt: int) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of one attempt, from the run directory: the wide metric
    columns and the long per-layer table."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    metrics = runstore.read_metrics(run).to_pylist()
    for row in (r for r in metrics if r["attempt"] == attempt):
        for key, value in row.items():
            if key not in ROW_COLUMNS and value is not None:
                out[tag_of(key)][row["step"]] = _comparable(value)
    for row in runstore.read_layers(run).to_pylist():
        if row["attempt"] == attempt:
            key = catalog.series_key(row["metric"], {"layer": row["layer"]})
            out[tag_of(key)][row["step"]] = _comparable(row["value"])
    return dict(out)


# --- a real run -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tb-runs")
    tb = root / "tensorboard"
    sets = [a for item in ROLLBACK_RUN for a in ("--set", item)]
    run = train_in_process(
        root / "runs",
        "--preset",
        "tiny",
        "--metrics-addr",
        "0",
        "--tensorboard",
        str(tb),
        "--inject",
        f"nan_grad@{FAULT_STEP}",
        *sets,
        name="tb",
    )
    return run, tb


def test_one_tensorboard_run_per_attempt_under_the_run_id(tb_run) -> None:
    run, tb = tb_run
    [rollback] = [e for e in runstore.read_events(run) if e["kind"] == EventKind.ROLLBACK]
    assert rollback["data"]["attempt"] == 1
    assert sorted(p.relative_to(tb).as_posix() for p in tb.glob("*/*")) == [
        f"{run.name}/attempt-0",
        f"{run.name}/attempt-1",
    ]
    assert runstore.read_manifest(run)["tensorboard_dir"] == str((tb / run.name).resolve())


@pytest.mark.parametrize("attempt", [0, 1])
def test_every_scalar_equals_the_run_directory(tb_run, attempt: int) -> None:
    run, tb = tb_run
    expected = expected_scalars(run, attempt)
    got = scalars(read(attempt_dir(tb, run.name, attempt)))
    assert set(got) == set(expected)  # the same series, nothing missing, nothing extra
    for tag, by_step in expected.items():
        assert got[tag] == by_step, tag
    # the series a user looks for first, under the names the module promises
    assert LOSS in got and len(got[LOSS]) >= 5
    layer_tag = tag_of(catalog.LAYER_GRAD_NORM.key(layer="1"))
    assert layer_tag == "yoto_layer_grad_norm/layer=1" and got[layer_tag]
    if attempt == 1:
        assert got[tag_of(catalog.VAL_LOSS.key(source="code"))]


def test_a_rollback_replays_steps_in_its_own_tensorboard_run(tb_run) -> None:
    run, tb = tb_run
    [rollback] = [e for e in runstore.read_events(run) if e["kind"] == EventKind.ROLLBACK]
    to_step, from_step = rollback["data"]["to_step"], rollback["data"]["from_step"]
    first = scalars(read(attempt_dir(tb, run.name, 0)))[LOSS]
    second = scalars(read(attempt_dir(tb, run.name, 1)))[LOSS]
    assert max(first) == from_step == FAULT_STEP and min(second) == to_step + 1
    replayed = set(first) & set(second)
    assert replayed == set(range(to_step + 1, from_step + 1))  # both branches kept
    assert first[FAULT_STEP] != second[FAULT_STEP]  # the retry saw other data

    events = read(attempt_dir(tb, run.name, 1))
    assert texts(events, f"events/{EventKind.ROLLBACK}") == {
        from_step: f"**{Severity.WARNING}** at step {from_step}: {rollback['message']}"
    }


# --- hand-made rows ------------------------------------------------------------------------


RUN = {"run": "20261201-000000-demo-ab12", "name": "demo"}


def test_tags_are_catalog_names_with_their_labels() -> None:
    assert tag_of(LOSS) == "yoto_train_loss"
    assert tag_of(catalog.LAYER_GRAD_NORM.key(layer="3")) == "yoto_layer_grad_norm/layer=3"
    assert tag_of(catalog.VAL_LOSS.key(source="code")) == "yoto_val_loss/source=code"
    assert tag_of('yoto_x{b="2",a="1"}') == "yoto_x/a=1,b=2"


def test_hand_made_rows_and_events_read_back(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path / "tb")
    bound = sink.bind_run(RUN)
    assert bound == {"tensorboard_dir": str((tmp_path / "tb" / RUN["run"]).resolve())}
    layer = catalog.LAYER_GRAD_NORM.key(layer="0")
    for step in (1, 2, 3):
        sink.write_step(0, step, {LOSS: 3.0 + step / 10, layer: 0.5 * step})
    sink.write_event(Event(3, 1, EventKind.ROLLBACK, Severity.WARNING, "rolled back", {}))
    sink.write_step(1, 2, {LOSS: 2.25, layer: float("nan")})
    # an event of the abandoned attempt, after the retry began: no purge of its steps
    sink.write_event(Event(2, 0, EventKind.SPIKE, Severity.WARNING, "late spike", {}))
    sink.close("finished")

    first = read(attempt_dir(tmp_path / "tb", RUN["run"], 0))
    assert scalars(first) == {
        "yoto_train_loss": {s: _comparable(3.0 + s / 10) for s in (1, 2, 3)},
        "yoto_layer_grad_norm/layer=0": {1: 0.5, 2: 1.0, 3: 1.5},
    }
    assert texts(first, "events/spike") == {2: "**warning** at step 2: late spike"}
    second = read(attempt_dir(tmp_path / "tb", RUN["run"], 1))
    assert scalars(second) == {
        "yoto_train_loss": {2: 2.25},
        "yoto_layer_grad_norm/layer=0": {2: "nan"},
    }
    assert texts(second, "events/rollback") == {3: "**warning** at step 3: rolled back"}


def test_a_resumed_attempt_replaces_what_the_crashed_process_wrote_after_its_checkpoint(
    tmp_path: Path,
) -> None:
    crashed = TensorBoardSink(tmp_path)
    crashed.bind_run(RUN)
    for step in range(1, 11):
        crashed.write_step(0, step, {LOSS: float(step)})
    crashed.close("crashed")

    resumed = TensorBoardSink(tmp_path)  # a new process, from the checkpoint at step 5
    resumed.bind_run(RUN)
    resumed.write_event(Event(5, 0, EventKind.START, Severity.INFO, "resumed", {}))
    for step in (6, 7):
        resumed.write_step(0, step, {LOSS: 100.0 + step})
    resumed.close("finished")

    got = scalars(read(attempt_dir(tmp_path, RUN["run"], 0)))[LOSS]
    assert got == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0, 6: 106.0, 7: 107.0}


def test_writing_before_the_run_is_named_is_an_error(tmp_path: Path) -> None:
    sink = TensorBoardSink(tmp_path)
    with pytest.raises(RuntimeError, match="bind_run"):
        sink.write_step(0, 1, {LOSS: 1.0})


def test_an_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    occupied = tmp_path / "a-file"
    occupied.write_text("")
    with pytest.raises(ConfigError, match="live.tensorboard=.*a-file.* is not a folder"):
        TensorBoardSink(occupied)


def test_without_the_tensorboard_package_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from yoto.cli import main

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'yoto\[tensorboard\]'"):
        TensorBoardSink(tmp_path / "tb")
    root = tmp_path / "runs"
    argv = ["train", "--run-root", str(root), "--preset", "tiny", "--metrics-addr", "0"]
    argv += ["--set", "train.device=cpu", "--set", f"live.tensorboard={tmp_path / 'tb'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "yoto: error: live.tensorboard" in err and "pip install 'yoto[tensorboard]'" in err
    assert not root.exists() or not any(root.iterdir())  # no run directory was created
