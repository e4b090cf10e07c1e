"""Offline uses of a run's checkpoints: ``yoto spectra RUN_DIR --step S`` and
``yoto sample RUN_DIR --prompt ...``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from yoto import runstore
from yoto.config import load_config
from yoto.errors import RunDirError
from yoto.probes.spectra import TABLE, analyze, weight_matrices

from . import tokenizer
from .checkpoint import verify
from .model import GPT, vocab_size


def checkpoint_model(run_dir: str | Path, step: int) -> tuple[GPT, dict[str, Any]]:
    """The run's model with the weights of its complete checkpoint ``step-N``, on the CPU,
    and the checkpoint's yoto client state."""
    run_dir = runstore.require_run_dir(run_dir)
    ckpts = {c.step: c for c in runstore.list_checkpoints(run_dir / runstore.CHECKPOINTS)}
    if step not in ckpts:
        have = ", ".join(str(s) for s in sorted(ckpts)) or "none"
        raise RunDirError(f"{run_dir} has no checkpoint for step {step}; it has: {have}")
    reason = verify(ckpts[step])
    if reason is not None:
        raise RunDirError(f"checkpoint step-{step} cannot be used: {reason}")
    cfg = load_config(file=run_dir / runstore.CONFIG)
    model = GPT(cfg.model, vocab_size(cfg))
    states = torch.load(
        ckpts[step].path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    module = states.get("module") or {}
    if not module or any(t.numel() == 0 for t in module.values()):  # ZeRO-3: partitioned
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(
            str(ckpts[step].path.parent), tag=ckpts[step].tag
        )
    model.load_state_dict({k: v.float() for k, v in module.items()})
    return model, states.get("yoto", {})


def spectra_for_checkpoint(
    run_dir: str | Path, step: int, write: bool = True
) -> list[dict[str, Any]]:
    """weightwatcher on checkpoint ``step``'s weight matrices, the same analysis the
    spectra probe runs; appended to the run's spectra/ table unless ``write`` is false."""
    model, client = checkpoint_model(run_dir, step)
    cfg = load_config(file=Path(run_dir) / runstore.CONFIG)
    weights = {n: w.detach().numpy().copy() for n, w in weight_matrices(model).items()}
    rows = analyze(weights, cfg.probes.spectra.min_evals, cfg.probes.spectra.svd_method)
    if write:
        branch = client.get("branch", client.get("state", {}))  # "state": older checkpoints
        attempt = int(branch.get("attempt", 0))
        runstore.append_records(run_dir, TABLE, attempt, step, rows)
    return rows


def sample(
    run_dir: str | Path,
    prompt: str,
    step: int | None = None,
    tokens: int = 200,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
) -> tuple[int, str]:
    """Continue ``prompt`` with the model of checkpoint ``step`` (default: the newest
    complete one); a prefix-LM reads the prompt as its prefix. Returns (step, text)."""
    run_dir = runstore.require_run_dir(run_dir)
    if step is None:
        complete = [
            c.step for c in runstore.list_checkpoints(run_dir / runstore.CHECKPOINTS) if c.complete
        ]
        if not complete:
            raise RunDirError(f"{run_dir} has no complete checkpoint to sample from")
        step = complete[-1]
    model, _ = checkpoint_model(run_dir, step)
    model.eval()
    ids = tokenizer.encode(prompt) if prompt else np.array([tokenizer.EOS])
    idx = torch.from_numpy(ids.astype(np.int64))[None, :]
    torch.manual_seed(seed)
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k)
    return step, tokenizer.decode(out[0, idx.size(1) :].numpy())
