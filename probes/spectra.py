"""Layer spectra with weightwatcher, in a background process, at every ZeRO stage.

Every ``probes.spectra.every`` steps rank 0 hands a set of full weight matrices (the
model's ``nn.Linear`` weights; tied embeddings are the LM head, once) to a worker process
that runs weightwatcher on them (:func:`analyze`); the step never waits for the analysis.
Where the matrices come from (``probes.spectra.source``; ``auto`` picks by ZeRO stage):

- ``live`` (auto at ZeRO 0-2, where every rank holds every matrix): on the due step rank 0
  copies every matrix to the host (one device-to-host copy each); the analysed step is
  that step.
- ``checkpoint`` (auto at ZeRO-3; any stage if asked): on the due step rank 0 lists
  ``checkpoints/`` and ``stat``s the newest ``COMPLETE`` marker, nothing more; the
  analysed step is that of the newest complete checkpoint.

At ZeRO-3 no rank holds a full matrix, so the weights come from the checkpoints the run
saves anyway: on a due step rank 0 picks the newest checkpoint that is sealed COMPLETE
(sealing runs later than the save, in the checkpointer's thread) and that this probe has
not analysed, and hands only its path to the worker. The worker maps each rank's shard
file (:class:`~yoto.probes.consolidate.ShardedCheckpoint`, ``torch.load(mmap=True)``) and
assembles and analyses one matrix at a time, so its memory is one matrix (a few copies
of it while weightwatcher runs) whatever the model's size, and it costs training one CPU
core (the worker runs niced, single-threaded) and the page-cache reads of the fp32 master
weights. Nothing new sealed since the last analysis: the due step does nothing (it is not
a skip); a checkpoint passed over for a newer one is not analysed. At the end of the run
the newest complete checkpoint is analysed if it was not yet (within
``end_timeout_seconds``); the run's last checkpoint, saved after its last step, and those
sealed before the probe started (an earlier process of a resumed run) are left to
``yoto spectra RUN_DIR --step S``; with ``checkpoint.every=0`` none is sealed during the
run, which one info ``spectra`` event says at the first due step. A checkpoint removed
before the worker read it (``checkpoint.keep_last``, a rollback) makes that one analysis
fail cleanly: an info ``spectra`` event says so, and the probe goes on; once its files
are mapped, removing them does not disturb the worker. The rows are those of the live
path, for the checkpoint's step (the loop files them under the attempt that trained it).

When the worker answers (a later step), the probe writes one row per matrix to the run
directory's ``spectra/`` table (with the step the weights came from, and the eigenvalues
weightwatcher fitted), exports the gauges below for that step's row, and gives a
``spectra`` verdict for each matrix whose alpha left the ``[alpha_low, alpha_high]`` band.
If an analysis is still running when the next is due (and, from checkpoints, a new one is
sealed), the new one is skipped and counted. weightwatcher is imported only in the worker,
where its logging set-up cannot touch the trainer's.

| metric | type | labels | meaning |
|---|---|---|---|
| yoto_weight_alpha | gauge | layer | power-law exponent of the ESD |
| yoto_weight_alpha_weighted | gauge | layer | alpha x log10(lambda_max) |
| yoto_weight_stable_rank | gauge | layer | Frobenius^2 / spectral^2 |
| yoto_weight_log_spectral_norm | gauge | layer | log10(lambda_max) |
| yoto_weight_log_norm | gauge | layer | log10(Frobenius^2) |
| yoto_spectra_skipped_total | counter | | analyses skipped (previous one still running) |

``layer`` is the matrix's module name, e.g. ``blocks.3.mlp.fc``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from yoto import catalog, runstore
from yoto.config import SpectraConfig
from yoto.errors import ConfigError, RunDirError
from yoto.events import EventKind, Reason, Severity

from .base import MicroStepContext, Record, Sample, StepContext, StepOutput, Verdict
from .consolidate import CheckpointGone, ShardedCheckpoint

TABLE = "spectra"
COLUMNS = {  # spectra/ column -> gauge
    "alpha": catalog.WEIGHT_ALPHA,
    "alpha_weighted": catalog.WEIGHT_ALPHA_WEIGHTED,
    "stable_rank": catalog.WEIGHT_STABLE_RANK,
    "log_spectral_norm": catalog.WEIGHT_LOG_SPECTRAL_NORM,
    "log_norm": catalog.WEIGHT_LOG_NORM,
}


def weight_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> weight of every Linear layer (a tied weight once, under its first name)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            out[name] = module.weight
    return out


def weight_names(model: nn.Module) -> dict[str, str]:
    """layer -> the parameter name of its weight, as DeepSpeed's checkpoints store it (a
    tied weight under the name ``named_parameters`` gives it first, e.g. ``lm_head`` ->
    ``tok_emb.weight``). Works on a ZeRO-3 model (names only) and on the meta device."""
    names = {id(p): n for n, p in model.named_parameters()}  # tied weights: once, first name
    return {layer: names[id(w)] for layer, w in weight_matrices(model).items()}


def analyze(
    weights: Mapping[str, np.ndarray], min_evals: int, svd_method: str
) -> list[dict[str, Any]]:
    """Run weightwatcher on the given matrices; one row per analysed matrix."""
    logging.disable(logging.WARNING)  # weightwatcher logs at INFO on the root logger
    import weightwatcher as ww

    names = list(weights)
    model = nn.ModuleDict()
    for i, name in enumerate(names):
        w = torch.from_numpy(np.asarray(weights[name], dtype=np.float32))
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(w)
        model[f"m{i}"] = layer
    watcher = ww.WeightWatcher(model=model)
    frame = watcher.analyze(min_evals=min_evals, svd_method=svd_method, plot=False)
    rows = []
    for record in frame.to_dict("records"):
        name = names[int(str(record["name"]).removeprefix("m"))]
        w = np.asarray(weights[name], dtype=np.float64)
        esd = np.sort(np.linalg.svd(w, compute_uv=False) ** 2)  # the eigenvalues ww fits
        row = {"layer": name, "rows": int(w.shape[0]), "cols": int(w.shape[1])}
        for column in (*COLUMNS, "lambda_max", "num_evals", "xmin", "D", "sigma"):
            value = record.get(column)
            row[column] = float(value) if value is not None else math.nan
        row["esd"] = esd.tolist()
        rows.append(row)
    return rows


def analyze_sharded(
    ckpt: ShardedCheckpoint, layers: Mapping[str, str], min_evals: int, svd_method: str
) -> list[dict[str, Any]]:
    """:func:`analyze` on checkpoint ``ckpt``'s matrices (``layers``: layer -> parameter
    name), assembled and analysed one at a time: memory stays at one matrix."""
    rows: list[dict[str, Any]] = []
    for layer, param in layers.items():
        weight = ckpt.tensor(param).numpy()
        rows.extend(analyze({layer: weight}, min_evals, svd_method))
        del weight
    return rows


def analyze_checkpoint(
    path: str | Path, layers: Mapping[str, str], min_evals: int, svd_method: str
) -> list[dict[str, Any]]:
    """The worker's job for a checkpoint folder sealed COMPLETE: its rows, or
    :class:`CheckpointGone` when it was removed (wholly or in part: a prune under way)
    before its files were mapped. Once mapped, removing the files changes nothing."""
    path = Path(path)
    if not (path / runstore.COMPLETE).is_file():
        raise CheckpointGone(f"checkpoint {path.name} was removed before it was read")
    try:
        with ShardedCheckpoint(path) as ckpt:
            return analyze_sharded(ckpt, layers, min_evals, svd_method)
    except CheckpointGone:
        raise
    except (RunDirError, OSError) as exc:
        if _intact(path):  # a real problem with the checkpoint: said as it is
            raise
        raise CheckpointGone(f"checkpoint {path.name} was removed while it was read") from exc


def _intact(path: Path) -> bool:
    """Whether every file the COMPLETE marker lists is still there, at its size."""
    try:
        files = json.loads((path / runstore.COMPLETE).read_text())["files"]
        return all((path / rel).stat().st_size == meta["size"] for rel, meta in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """A spawned worker inherits the environment of the moment it starts: one BLAS/OpenMP
    thread, so an analysis takes at most one core from training."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARS}
    os.environ.update(dict.fromkeys(_THREAD_VARS, "1"))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _background_worker() -> None:
    """Worker initializer: yield the CPU to the training ranks, and die with the trainer
    (a SIGKILLed or crashed trainer cannot shut its pool down)."""
    with contextlib.suppress(OSError):
        os.nice(10)
    torch.set_num_threads(1)
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


@dataclass(frozen=True, slots=True)
class _Job:
    step: int  # the step the analysed weights come from
    started: float
    future: cf.Future
    checkpoint: str | None  # its folder's tag, when the weights come from a checkpoint


class SpectraProbe:
    """See the module docstring. ``checkpoints``: the run's checkpoint folder (needed when
    the weights come from checkpoints); ``checkpoint_every``: the run's checkpoint.every
    (0: none are saved during the run, which one info verdict says at the first due step)."""

    name = "spectra"

    def __init__(
        self,
        cfg: SpectraConfig,
        zero_stage: int = 0,
        checkpoints: str | Path | None = None,
        checkpoint_every: int | None = None,
    ) -> None:
        self.every = 1  # runs each step to collect results; analyses every cfg.every steps
        self.cfg = cfg
        self.zero_stage = zero_stage
        auto = "checkpoint" if zero_stage >= 3 else "live"
        self.source = auto if cfg.source == "auto" else cfg.source
        if self.source == "live" and zero_stage >= 3:
            raise ConfigError(
                "probes.spectra.source=live needs the full weights on rank 0, which ZeRO-3 "
                "partitions across ranks: use source=checkpoint (or auto)"
            )
        if self.source == "checkpoint" and checkpoints is None:
            raise ValueError("spectra from checkpoints need the run's checkpoint folder")
        self.checkpoints = Path(checkpoints) if checkpoints is not None else None
        self._no_checkpoints = self.source == "checkpoint" and checkpoint_every == 0
        self._model: nn.Module | None = None  # live, rank 0
        self._layers: dict[str, str] | None = None  # checkpoint, rank 0: layer -> parameter
        self._seen: set[tuple[int, int, int]] = set()  # checkpoints analysed or already there
        self._pool: cf.ProcessPoolExecutor | None = None
        self._job: _Job | None = None
        self.skipped = 0
        self._out: dict[str, bool] = {}  # layer -> out of the alpha band at its last analysis

    def attach(self, model: nn.Module, engine: Any) -> None:
        # rank 0 alone: it writes the run; live, the replicas' weights are equal (ZeRO 0-2)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank != 0:
            return
        if self.source == "live":
            self._model = model
            return
        self._layers = weight_names(model)
        # sealed before this probe started (an earlier process of a resumed run): left to
        # ``yoto spectra``, whose rows for them may be there already
        self._seen = {ident for _, ident in self._sealed()}

    def detach(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._model = None
        self._layers = None

    def active(self, step: int) -> None:
        pass

    def on_micro_step(self, ctx: MicroStepContext) -> Iterable[Sample]:
        return ()

    def on_step(self, ctx: StepContext) -> Iterable[StepOutput]:
        """Called every step (the runner's cadence is 1): collects a finished analysis,
        and on multiples of ``every`` starts the next one."""
        out: list[StepOutput] = list(self._collect(wait=None))
        if ctx.step % self.cfg.every:
            return out
        if self._model is not None:
            self._start_live(ctx.step, out)
        elif self._layers is not None:
            if self._no_checkpoints:
                out.append(self._nothing_to_read(ctx.step))
            self._start_checkpoint(out)
        return out

    def _nothing_to_read(self, step: int) -> Verdict:
        self._no_checkpoints = False  # said once
        return Verdict(
            EventKind.SPECTRA,
            Severity.INFO,
            step,
            step,
            f"spectra are read from checkpoints here (ZeRO stage {self.zero_stage}) and "
            "checkpoint.every=0 saves none during the run: set checkpoint.every, or run "
            "yoto spectra RUN_DIR --step S on the final checkpoint",
            {"source": self.source, "checkpoint_every": 0},
        )

    def _start_live(self, step: int, out: list[StepOutput]) -> None:
        if self._busy(out):
            return
        weights = {
            name: w.detach().to("cpu", torch.float32).numpy().copy()
            for name, w in weight_matrices(self._model).items()
        }
        future = self._submit(analyze, weights, self.cfg.min_evals, self.cfg.svd_method)
        self._job = _Job(step, time.perf_counter(), future, None)
        out.append(Sample(catalog.SPECTRA_SKIPPED.name, float(self.skipped)))

    def _start_checkpoint(self, out: list[StepOutput]) -> None:
        """The newest checkpoint sealed COMPLETE, if this probe has not analysed it: its
        path goes to the worker. Older unanalysed ones are passed over for it."""
        newest = next(iter(self._sealed()), None)
        if newest is None or newest[1] in self._seen or self._busy(out):
            return
        ckpt, ident = newest
        self._seen.add(ident)
        future = self._submit(
            analyze_checkpoint,
            str(ckpt.path),
            dict(self._layers or {}),
            self.cfg.min_evals,
            self.cfg.svd_method,
        )
        self._job = _Job(ckpt.step, time.perf_counter(), future, ckpt.tag)
        out.append(Sample(catalog.SPECTRA_SKIPPED.name, float(self.skipped)))

    def _sealed(self) -> Iterator[tuple[runstore.CheckpointDir, tuple[int, int, int]]]:
        """Complete checkpoints, newest first, each with an identity that a checkpoint of
        the same step saved again (after a rollback) does not share."""
        assert self.checkpoints is not None
        for ckpt in reversed(runstore.list_checkpoints(self.checkpoints)):
            try:
                st = (ckpt.path / runstore.COMPLETE).stat()
            except OSError:  # not sealed yet, or being removed
                continue
            yield ckpt, (ckpt.step, st.st_ino, st.st_mtime_ns)

    def _busy(self, out: list[StepOutput]) -> bool:
        """An analysis still in flight: the due one is skipped and counted."""
        if self._job is None:
            return False
        self.skipped += 1
        out.append(Sample(catalog.SPECTRA_SKIPPED.name, float(self.skipped)))
        return True

    def _submit(self, fn: Any, *args: Any) -> cf.Future:
        with _single_threaded_children():
            if self._pool is None:
                ctx_mp = multiprocessing.get_context("spawn")
                self._pool = cf.ProcessPoolExecutor(
                    max_workers=1, mp_context=ctx_mp, initializer=_background_worker
                )
            return self._pool.submit(fn, *args)

    def finish(self, timeout: float | None) -> Iterable[StepOutput]:
        """At the end of a run: wait (up to ``timeout`` s) for an analysis in flight; from
        checkpoints, then also for one of the newest complete checkpoint if it is not
        analysed yet (the one passed over while the worker was busy), in what is left."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        out = self._collect(wait=timeout)
        if self._layers is None or self._job is not None or timeout == 0:
            return out
        self._start_checkpoint(out)
        if self._job is not None:
            left = None if deadline is None else max(0.0, deadline - time.perf_counter())
            out.extend(self._collect(wait=left))
        return out

    def _collect(self, wait: float | None) -> list[StepOutput]:
        if self._job is None:
            return []
        job = self._job
        if wait is None and not job.future.done():
            return []
        try:
            rows = job.future.result(timeout=wait)
        except cf.TimeoutError:
            return []
        except CheckpointGone as exc:  # pruned or rolled back before the worker read it
            return [self._gone(job, exc)]
        finally:
            if job.future.done():
                self._job = None
        out: list[StepOutput] = [Record(TABLE, job.step, rows)]
        for row in rows:
            label = {"layer": row["layer"]}
            for column, metric in COLUMNS.items():
                if math.isfinite(row[column]):
                    out.append(Sample(metric.name, row[column], label))
            out.extend(self._band(job.step, row, time.perf_counter() - job.started))
        return out

    def _gone(self, job: _Job, exc: Exception) -> Verdict:
        return Verdict(
            EventKind.SPECTRA,
            Severity.INFO,
            job.step,
            job.step,
            f"spectra of checkpoint {job.checkpoint} not analysed: {exc} "
            "(checkpoint.keep_last or a rollback removed it); the next one will be",
            {"analysed_step": job.step, "checkpoint": job.checkpoint, "error": str(exc)},
        )

    def _band(self, step: int, row: dict[str, Any], seconds: float) -> list[Verdict]:
        """A verdict when a matrix leaves the alpha band (or is out of it at its first
        analysis), and an info one when it comes back; nothing while it stays."""
        alpha, layer = row["alpha"], row["layer"]
        if not math.isfinite(alpha):
            return []
        low, high = self.cfg.alpha_low, self.cfg.alpha_high
        out, was_out = not low <= alpha <= high, self._out.get(layer, False)
        self._out[layer] = out
        data = {
            "layer": layer,
            "alpha": alpha,
            "analysed_step": step,
            "seconds": seconds,
            "num_evals": row.get("num_evals"),
        }
        if out and not was_out:
            side = "below" if alpha < low else "above"
            small = (row.get("num_evals") or 0) < self.cfg.band_min_evals
            note = " (small matrix: the fit is noisy)" if small else ""
            return [
                Verdict(
                    EventKind.SPECTRA,
                    Severity.INFO if small else Severity.WARNING,
                    step,
                    step,
                    f"{layer}: alpha {alpha:.2f} is {side} the "
                    f"[{low:g}, {high:g}] band at step {step}{note}",
                    {**data, "in_band": False},
                    Reason.SPECTRA,
                )
            ]
        if was_out and not out:
            return [
                Verdict(
                    EventKind.SPECTRA,
                    Severity.INFO,
                    step,
                    step,
                    f"{layer}: alpha {alpha:.2f} is back in the band at step {step}",
                    {**data, "in_band": True},
                )
            ]
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "out_of_band": dict(self._out)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = state["skipped"]
        self._out = dict(state.get("out_of_band", {}))
