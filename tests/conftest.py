"""Shared fixtures. The expensive one, ``trained_run``, trains the tiny preset exactly as
the demo does, once per session; many tests read its run directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from yoto.cli import share_cpus_gracefully

share_cpus_gracefully()  # as `yoto` does, before anything loads torch (in-process runs)

from tests.helpers import train_in_process  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_linear_as_it_was():
    """DeepSpeed's ZeRO-3 engine replaces ``torch.nn.functional.linear`` with its own for the
    whole process ("persists unless manually reset"). A ZeRO-3 engine built in this process
    by one test would otherwise change the bits of every later in-process run, and a
    resume would no longer repeat its original branch exactly."""
    import torch.nn.functional as F

    original = F.linear
    yield
    F.linear = original


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's job: the tiny preset, its own steps, default corpus, one rank."""
    root = tmp_path_factory.mktemp("fixture-runs")
    return train_in_process(root, "--preset", "tiny", name="fixture")


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the fixture run that a test may damage or extend."""
    target = tmp_path / "runs" / trained_run.name
    shutil.copytree(trained_run, target)
    return target
