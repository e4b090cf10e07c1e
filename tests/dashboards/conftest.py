"""The explorer's recorded run: a real short training run of the tiny preset with an
injected fault, rolled back by the policy (so it has an abandoned branch), with layer
statistics, precision details, validation losses and spectra recorded often enough to
fill every page.

It is its own session fixture rather than the shared ``trained_run``: that one is the
demo's clean 500-step job, and several tests rely on it having no spike, exactly 500
metric rows and checkpoints 300/400/500, which a rolled-back run cannot give."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import train_in_process

EXPLORER_RUN = [
    "train.device=cpu",
    "train.steps=90",
    "checkpoint.every=20",
    "checkpoint.keep_last=2",
    "probes.layers.every=10",
    "probes.precision.detail_every=10",
    "probes.spectra.every=30",
    "probes.spectra.svd_method=fast",
    "eval.every=30",
    "eval.batches=1",
    "data.max_bytes_per_source=1000000",
    "policy.rollback.diagnose.enabled=true",
]


@pytest.fixture(scope="session")
def explorer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("explorer-runs")
    sets = [a for item in EXPLORER_RUN for a in ("--set", item)]
    return train_in_process(
        root, "--preset", "tiny", "--inject", "lr_spike@60", *sets, name="explorer"
    )


@pytest.fixture
def yoto_runs(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Set YOTO_RUNS (the explorer's input) for one test."""

    def set_(*paths: Path) -> None:
        monkeypatch.setenv("YOTO_RUNS", os.pathsep.join(str(p) for p in paths))

    return set_


@pytest.fixture
def run_dir_copy(explorer_run: Path, tmp_path: Path) -> Path:
    """A private copy of the explorer's run (without checkpoints) a test may change."""
    target = tmp_path / "runs" / explorer_run.name
    shutil.copytree(explorer_run, target, ignore=shutil.ignore_patterns("checkpoints"))
    return target
