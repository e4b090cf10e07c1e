"""Offline uses of a run's record and checkpoints: ``yoto spectra RUN_DIR --step S``,
``yoto sample RUN_DIR --prompt ...``, ``yoto data batch RUN_DIR --step S`` and
``yoto diagnose RUN_DIR --step S``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from yoto import catalog, runstore
from yoto.config import Config, load_config
from yoto.errors import RunDirError
from yoto.events import EventKind
from yoto.probes.consolidate import MODEL_STATES, MODEL_STATES_ZERO3, ShardedCheckpoint
from yoto.probes.spectra import TABLE, analyze_sharded, weight_names

from .checkpoint import verify
from .data import tokenizer
from .data.corpus import load_corpus
from .data.sampler import Sampler
from .diagnose import rank_of, snippet, source_mix, trained_tokens
from .faults import FaultInjector
from .history import StepTrace
from .model import GPT, vocab_size


def run_config(run_dir: str | Path) -> Config:
    """A run's saved config, its tokenizer read from the run's own copy (the file the
    config named may have moved or changed since)."""
    cfg = load_config(file=Path(run_dir) / runstore.CONFIG)
    copy = Path(run_dir) / tokenizer.RUN_FILE
    if copy.is_file():
        cfg.data.tokenizer = str(copy)
    return cfg


def _checkpoint(run_dir: Path, step: int) -> runstore.CheckpointDir:
    """The run's checkpoint ``step-N``, complete and intact, or an error saying why not."""
    ckpts = {c.step: c for c in runstore.list_checkpoints(run_dir / runstore.CHECKPOINTS)}
    if step not in ckpts:
        have = ", ".join(str(s) for s in sorted(ckpts)) or "none"
        raise RunDirError(f"{run_dir} has no checkpoint for step {step}; it has: {have}")
    reason = verify(ckpts[step])
    if reason is not None:
        raise RunDirError(f"checkpoint step-{step} cannot be used: {reason}")
    return ckpts[step]


def checkpoint_model(run_dir: str | Path, step: int) -> tuple[GPT, dict[str, Any]]:
    """The run's model with the weights of its complete checkpoint ``step-N``, on the CPU,
    and the checkpoint's yoto client state."""
    run_dir = runstore.require_run_dir(run_dir)
    ckpt = _checkpoint(run_dir, step)
    cfg = run_config(run_dir)
    model = GPT(cfg.model, vocab_size(cfg))
    states_file = ckpt.path / MODEL_STATES  # ZeRO-3: only rank 0's partitioned one
    if not states_file.is_file():
        states_file = ckpt.path / MODEL_STATES_ZERO3
    states = torch.load(states_file, map_location="cpu", weights_only=False)
    module = states.get("module") or {}
    if not module or any(t.numel() == 0 for t in module.values()):  # ZeRO-3: partitioned
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.path.parent), tag=ckpt.tag)
    model.load_state_dict({k: v.float() for k, v in module.items()})
    return model, states.get("yoto", {})


def spectra_for_checkpoint(
    run_dir: str | Path, step: int, write: bool = True
) -> list[dict[str, Any]]:
    """weightwatcher on checkpoint ``step``'s weight matrices, the same analysis the
    spectra probe runs; appended to the run's spectra/ table unless ``write`` is false.
    The matrices are read one at a time from the checkpoint's shards (any ZeRO stage: the
    fp32 master weights at 1-3), so memory stays at one matrix, not the model."""
    run_dir = runstore.require_run_dir(run_dir)
    ckpt = _checkpoint(run_dir, step)
    cfg = run_config(run_dir)
    with torch.device("meta"):  # the names of the matrices only: no memory
        layers = weight_names(GPT(cfg.model, vocab_size(cfg)))
    spectra = cfg.probes.spectra
    with ShardedCheckpoint(ckpt.path) as shards:
        rows = analyze_sharded(shards, layers, spectra.min_evals, spectra.svd_method)
        client = shards.client_state
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
    cfg = run_config(run_dir)
    tok = tokenizer.for_run(run_dir, cfg.data.eos)
    ids = tok.encode(prompt) if prompt else np.array([tok.eos_id])
    idx = torch.from_numpy(ids.astype(np.int64))[None, :]
    torch.manual_seed(seed)
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k)
    return step, tok.decode(out[0, idx.size(1) :].numpy())


# --- the data a step trained on, and a diagnosis after the fact -----------------------------


class _StepRows:
    """A run's recorded steps, by (attempt, step), and which attempt's row is the one on a
    branch's line of descent (a later attempt's rows take over from its first step)."""

    def __init__(self, run_dir: Path) -> None:
        table = runstore.read_metrics(run_dir).to_pydict()
        columns = list(table)
        self.rows: dict[tuple[int, int], dict[str, Any]] = {}
        for i, (a, s) in enumerate(zip(table["attempt"], table["step"], strict=True)):
            self.rows[(int(a), int(s))] = {c: table[c][i] for c in columns}
        self.firsts: dict[int, int] = {}
        for a, s in self.rows:
            self.firsts[a] = min(self.firsts.get(a, s), s)

    def attempt_for(self, step: int, attempt: int | None) -> int:
        """The attempt whose row of ``step`` lies on ``attempt``'s line (default: the
        newest attempt that trained the step)."""
        if attempt is None:
            having = [a for a, s in self.rows if s == step]
            if not having:
                raise RunDirError(f"no attempt of this run recorded step {step}")
            return max(having)
        for b in sorted((b for b in self.firsts if b <= attempt), reverse=True):
            later = [self.firsts[c] for c in self.firsts if b < c <= attempt]
            if (b, step) in self.rows and (not later or step < min(later)):
                return b
        raise RunDirError(f"attempt {attempt} has no recorded step {step} on its line")

    def trace(self, step: int, attempt: int, cfg: Config) -> StepTrace:
        row = self.rows[(attempt, step)]
        position = row.get(catalog.SAMPLER_POSITION.name)
        if position is None or (isinstance(position, float) and math.isnan(position)):
            raise RunDirError(
                f"step {step} (attempt {attempt}) was recorded without "
                f"{catalog.SAMPLER_POSITION.name} (a run from before it existed): its data "
                "position is unknown"
            )
        seq_len = int(row.get(catalog.SEQ_LEN.name) or cfg.model.seq_len)
        norm = row.get(catalog.GRAD_NORM.name)
        return StepTrace(
            position=int(position),
            batch=round(row[catalog.BATCH_SIZE_TOKENS.name] / seq_len),
            seq_len=seq_len,
            lr=float(row[catalog.LEARNING_RATE.name]),
            loss=float(row[catalog.TRAIN_LOSS.name]),
            grad_norm=None if norm is None or math.isnan(norm) else float(norm),
            rank_losses=(),  # not in the rows: after the fact no rank can be named
        )


def _run_data(run_dir: Path, cfg: Config) -> tuple[Sampler, FaultInjector, list[dict[str, Any]]]:
    corpus = load_corpus(cfg.data, min_tokens=cfg.model.seq_len + 1)
    sampler = Sampler(corpus, cfg.model.seq_len, cfg.train.seed, cfg.data.alpha)
    events = runstore.read_events(run_dir)
    faults = FaultInjector(cfg.faults, 0, cfg.train.precision)
    faults.recall(events)
    return sampler, faults, events


def data_batch(
    run_dir: str | Path, step: int, attempt: int | None = None, snippet_chars: int = 80
) -> dict[str, Any]:
    """``yoto data batch``: the sequences step ``step`` of ``attempt`` (default: the newest
    attempt that trained it) trained on, as spike forensics names them: sampler position,
    the rank that held it, source, document, offset, a snippet of the tokens as trained
    (``replaced``: a bad_batch fault put random bytes there); and the batch's tokens per
    source beside the mixture's expected share."""
    run_dir = runstore.require_run_dir(run_dir)
    cfg = run_config(run_dir)
    world = int(runstore.read_manifest(run_dir).get("world_size") or 1)
    steps = _StepRows(run_dir)
    attempt = steps.attempt_for(step, attempt)
    trace = steps.trace(step, attempt, cfg)
    sampler, faults, _ = _run_data(run_dir, cfg)
    decode = tokenizer.for_run(run_dir, cfg.data.eos).decode
    micro = cfg.train.micro_batch_size
    windows = sampler.windows_at(trace.position, trace.batch)
    replaced = set(faults.corrupted(trace.position, trace.batch))
    sequences = []
    for i, window in enumerate(map(int, windows)):
        place = sampler.place(window, trace.seq_len)
        tokens = trained_tokens(sampler, faults, trace, i, world=world, micro_size=micro)
        sequences.append(
            {
                "index": i,
                "position": trace.position + i,
                "rank": rank_of(i, world=world, micro_size=micro),
                "source": place.source,
                "doc_id": place.doc_id,
                "offset": place.offset,
                "documents": place.documents,
                "replaced": trace.position + i in replaced,
                "snippet": snippet(tokens, snippet_chars, decode),
            }
        )
    return {
        "step": step,
        "attempt": attempt,
        "sampler_position": trace.position,
        "batch": trace.batch,
        "seq_len": trace.seq_len,
        "sequences": sequences,
        **source_mix(sampler, trace),
    }


def _spike_at(events: list[dict[str, Any]], step: int) -> dict[str, Any]:
    """The acted-on spike event whose onset (or own step) is ``step``; the newest attempt's."""
    spikes = [e for e in events if e["kind"] == EventKind.SPIKE]
    at = [e for e in spikes if step in (e["data"].get("onset"), e["step"])]
    if not at:
        onsets = sorted({e["data"].get("onset") for e in spikes} - {None})
        raise RunDirError(
            f"no spike was recorded at step {step}; spike onsets of this run: "
            f"{', '.join(map(str, onsets)) or 'none'}"
        )
    return max(at, key=lambda e: (e["attempt"], e["step"]))


def _on_line(
    rows: _StepRows, events: list[dict[str, Any]], step: int, saved_by: int, attempt: int
) -> bool:
    """Whether the checkpoint of ``step`` saved by attempt ``saved_by`` holds the state of
    ``attempt``'s line at that step: saved on that line, or saved by a branch a rollback
    started there from a checkpoint of that line (the same state, renumbered)."""
    try:
        ours = rows.attempt_for(step, attempt)
    except RunDirError:
        return False
    if saved_by == ours:
        return True
    for e in events:
        data = e["data"]
        if e["kind"] == EventKind.ROLLBACK and data.get("attempt") == saved_by:
            if data.get("to_step") != step:
                return False
            try:
                return rows.attempt_for(step, int(data["from_attempt"])) == ours
            except RunDirError:
                return False
    return False


def diagnose_after(run_dir: str | Path, step: int) -> Any:
    """``yoto diagnose``: the replay diagnosis of the recorded spike at ``step`` (its onset),
    from the newest checkpoint before it on the spike's line of descent, as a rollback
    would have run it; writes nothing into the run. Needs the run's world size (a
    multi-rank run under torchrun with as many ranks). Returns the Diagnosis."""
    from types import SimpleNamespace

    from yoto.events import Sinks

    from . import run as run_mod
    from .checkpoint import CheckpointDir
    from .diagnose import Diagnoser

    run_dir = runstore.require_run_dir(run_dir)
    cfg = run_config(run_dir)
    events = runstore.read_events(run_dir)
    spike = _spike_at(events, step)
    onset, attempt = int(spike["data"].get("onset", spike["step"])), int(spike["attempt"])
    rollback = next(
        (
            e
            for e in events
            if e["kind"] == EventKind.ROLLBACK
            and e["data"].get("onset") == onset
            and e["data"].get("from_attempt") == attempt
        ),
        None,
    )
    end_step = int(rollback["data"]["from_step"]) if rollback else int(spike["step"])
    rows = _StepRows(run_dir)
    ckpts = [
        c
        for c in runstore.list_checkpoints(run_dir / runstore.CHECKPOINTS)
        if c.complete and c.step < onset
    ]
    if not ckpts:
        raise RunDirError(
            f"no complete checkpoint of this run precedes the spike at step {onset} any more "
            "(checkpoint.keep_last prunes old ones): nothing to replay from"
        )
    prepared = run_mod.prepare(cfg)
    world = int(runstore.read_manifest(run_dir).get("world_size") or 1)
    if prepared.info.world != world:
        raise RunDirError(
            f"the run trained on {world} rank(s); run yoto diagnose on as many "
            f"(torchrun --nproc-per-node {world} -m yoto.cli diagnose ...)"
        )
    trainer = run_mod.assemble(cfg, prepared, run_dir, Sinks())
    try:
        chosen: CheckpointDir | None = None
        for ckpt in reversed(ckpts):  # the newest one on the spike's line of descent
            _, client = checkpoint_model(run_dir, ckpt.step)
            branch = client.get("branch", client.get("state", {}))
            if _on_line(rows, events, ckpt.step, int(branch.get("attempt", 0)), attempt):
                chosen = ckpt
                break
        if chosen is None:
            raise RunDirError(f"no checkpoint before step {onset} lies on attempt {attempt}'s line")
        for s in range(max(1, chosen.step - 16), end_step + 1):  # the level before, too
            try:
                trainer.history.record_trace(s, rows.trace(s, rows.attempt_for(s, attempt), cfg))
            except (RunDirError, KeyError):
                continue
        trainer.faults.recall(events)
        trainer.restore(chosen)
        trainer.faults.rolled_back()
        onset_trace = trainer.history.traces.get(onset)
        if onset_trace is None:
            raise RunDirError(f"step {onset} of attempt {attempt} has no recorded row")
        skip_to = (
            int(rollback["data"]["sampler_position_resume"])
            if rollback
            else onset_trace.position + cfg.policy.rollback.skip_margin * onset_trace.batch
        )
        plan = SimpleNamespace(checkpoint=chosen, onset=onset, from_step=end_step, skip_to=skip_to)
        return Diagnoser(trainer, prepared.info.device.type).run(plan)
    finally:
        trainer.runner.detach()
