"""Shared by the benchmark scripts: a Trainer built the way ``yoto train`` builds it, and a
counter of host reads of tensor values."""

from __future__ import annotations

import contextlib
import tempfile
from collections import Counter
from collections.abc import Iterator

import torch

from yoto.config import load_config
from yoto.trainer import run
from yoto.trainer.loop import Trainer

SHAPES = {  # the shapes the CPU benchmarks compare
    "tiny": [],
    "wide": [
        "model.n_layer=8",
        "model.d_model=256",
        "model.n_head=8",
        "model.seq_len=256",
        "train.micro_batch_size=4",
        "train.global_batch_size=8",
    ],
}
COMMON = [
    "train.batch_warmup.start=null",
    "data.max_bytes_per_source=4000000",
    "eval.every=0",
    "checkpoint.every=0",
    "log.progress=false",
    "train.steps=1000000000",  # never the last step: no end-of-run work inside the timing
]
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__bool__", "__int__")


def make_trainer(preset: str, overrides: list[str], root: str | None = None) -> Trainer:
    """A Trainer over a throw-away run directory; step it with ``trainer.step_once()``."""
    cfg = load_config(preset=preset, overrides=[*COMMON, *overrides])
    trainer, _ = run.make_trainer(cfg, root or tempfile.mkdtemp(prefix="yoto-bench-"), "bench")
    return trainer


@contextlib.contextmanager
def counting_host_reads(counts: Counter) -> Iterator[None]:
    """Count ``.item()``, ``.tolist()``, ``.cpu()``, ``float(t)``, ... on tensors: the CPU
    stand-in for host-device synchronisations."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            counts[name] += 1
            return fn(self, *args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
