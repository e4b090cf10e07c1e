"""Helpers shared by the tests (fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# small, fast runs for loop mechanics (the fixture run uses the preset itself)
FAST = [
    "train.device=cpu",  # the mechanics tests compare bits; keep them on the CPU everywhere
    "data.max_bytes_per_source=2000000",
    "train.batch_warmup.start=null",
    "eval.every=0",
    "eval.batches=1",
    "checkpoint.every=0",
    "log.progress=false",
    # a rollback's replay diagnosis costs two replays; tests about it turn it back on
    "policy.rollback.diagnose.enabled=false",
]


def yoto_bin() -> str:
    return str(VENV_BIN / "yoto")


def subprocess_env() -> dict[str, str]:
    """The environment for a child ``yoto``/``torchrun``: without the process-group
    variables this test process set for its own in-process runs."""
    from yoto.trainer.distributed import child_env

    return child_env()


def only_run(root: Path) -> Path:
    runs = [p for p in Path(root).iterdir() if (p / "manifest.json").is_file()]
    assert len(runs) == 1, f"expected one run under {root}, found {runs}"
    return runs[0]


def train_in_process(root: Path, *args: str, name: str = "t", status: str = "finished") -> Path:
    """``yoto train`` in this process; the exit code must be the one for ``status``."""
    from yoto.cli import EXIT_CODES, main

    before = set(Path(root).iterdir()) if Path(root).exists() else set()
    rc = main(["train", "--run-root", str(root), "--name", name, "--no-progress", *args])
    assert rc == EXIT_CODES[status], f"exit code {rc}, expected {EXIT_CODES[status]} ({status})"
    new = [p for p in Path(root).iterdir() if p not in before]
    return new[0] if new else Path(args[args.index("--resume") + 1])


def make_trainer(root: Path, *overrides: str, probes=(), preset: str = "tiny"):
    """An in-process Trainer over a fresh run directory, for tests that need to reach
    inside a real DeepSpeed run (register a hook, add a probe). Returns (trainer, store)."""
    from yoto.config import load_config
    from yoto.trainer import run

    cfg = load_config(preset=preset, overrides=[*FAST, *overrides])
    return run.make_trainer(cfg, root, "t", tuple(probes))


def torchrun(nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` for ``nproc`` local ranks on a free port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
    ]


def run_benchmark(script: str, *args: str) -> str:
    """Run ``benchmarks/<script>`` as a user would; returns its stdout (fails on an error)."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@functools.cache
def _benchmarks_common() -> ModuleType:
    """benchmarks/_common.py (the benchmarks import it by file name, as scripts)."""
    path = ROOT / "benchmarks" / "_common.py"
    spec = importlib.util.spec_from_file_location("yoto_benchmarks_common", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def counting_host_reads(counts: Counter) -> contextlib.AbstractContextManager[None]:
    """Count reads of tensor values on the host (.item(), float(t), .cpu(), ...) into
    ``counts`` by method: the benchmarks' own counter (benchmarks/_common.py), so tests
    and benchmarks count the same reads."""
    return _benchmarks_common().counting_host_reads(counts)
