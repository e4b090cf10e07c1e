"""Layer spectra with weightwatcher, in a background process.

Every ``probes.spectra.every`` steps the probe copies the weight matrices (the model's
``nn.Linear`` weights; tied embeddings are the LM head) to the host and hands them to a
worker process that runs ``weightwatcher.WeightWatcher(model).analyze(...)``. The step
does not wait: the copy is the only cost it pays. When the worker answers (a later step),
the probe writes one row per matrix to the run directory's ``spectra/`` table (with the
step the weights came from, and the eigenvalues weightwatcher fitted), exports the gauges
below for that step's row, and gives a ``spectra`` verdict for each matrix whose alpha left
the ``[alpha_low, alpha_high]`` band. If an analysis is still running when the next is due,
the new one is skipped and counted. weightwatcher is imported only in the worker, where
its logging set-up cannot touch the trainer's.

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
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from yoto import catalog
from yoto.config import SpectraConfig
from yoto.events import EventKind, Reason, Severity

from .base import MicroStepContext, Record, Sample, StepContext, StepOutput, Verdict

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


class SpectraProbe:
    """See the module docstring."""

    name = "spectra"

    def __init__(self, cfg: SpectraConfig, zero_stage: int = 0) -> None:
        self.every = 1  # runs each step to collect results; analyses every cfg.every steps
        self.cfg = cfg
        self.zero_stage = zero_stage
        self._model: nn.Module | None = None
        self._pool: cf.ProcessPoolExecutor | None = None
        self._job: tuple[int, float, cf.Future] | None = None  # (step, started, future)
        self.skipped = 0
        self._out: dict[str, bool] = {}  # layer -> out of the alpha band at its last analysis

    def attach(self, model: nn.Module, engine: Any) -> None:
        # rank 0 alone: the replicas' weights are equal (ZeRO 0-2) and rank 0 writes the run
        rank = dist.get_rank() if dist.is_initialized() else 0
        if self.zero_stage < 3 and rank == 0:
            self._model = model

    def detach(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self._model = None

    def active(self, step: int) -> None:
        pass

    def on_micro_step(self, ctx: MicroStepContext) -> Iterable[Sample]:
        return ()

    def on_step(self, ctx: StepContext) -> Iterable[StepOutput]:
        """Called every step (the runner's cadence is 1): collects a finished analysis,
        and on multiples of ``every`` starts the next one."""
        out: list[StepOutput] = list(self._collect(wait=None))
        if self._model is None or ctx.step % self.cfg.every:
            return out
        if self._job is not None:
            self.skipped += 1
            out.append(Sample(catalog.SPECTRA_SKIPPED.name, float(self.skipped)))
            return out
        weights = {
            name: w.detach().to("cpu", torch.float32).numpy().copy()
            for name, w in weight_matrices(self._model).items()
        }
        with _single_threaded_children():
            if self._pool is None:
                ctx_mp = multiprocessing.get_context("spawn")
                self._pool = cf.ProcessPoolExecutor(
                    max_workers=1, mp_context=ctx_mp, initializer=_background_worker
                )
            future = self._pool.submit(analyze, weights, self.cfg.min_evals, self.cfg.svd_method)
        self._job = (ctx.step, time.perf_counter(), future)
        out.append(Sample(catalog.SPECTRA_SKIPPED.name, float(self.skipped)))
        return out

    def finish(self, timeout: float | None) -> Iterable[StepOutput]:
        """At the end of a run: wait (up to ``timeout`` s) for an analysis in flight."""
        return self._collect(wait=timeout)

    def _collect(self, wait: float | None) -> list[StepOutput]:
        if self._job is None:
            return []
        step, started, future = self._job
        if wait is None and not future.done():
            return []
        try:
            rows = future.result(timeout=wait)
        except cf.TimeoutError:
            return []
        finally:
            if future.done():
                self._job = None
        out: list[StepOutput] = [Record(TABLE, step, rows)]
        for row in rows:
            label = {"layer": row["layer"]}
            for column, metric in COLUMNS.items():
                if math.isfinite(row[column]):
                    out.append(Sample(metric.name, row[column], label))
            out.extend(self._band(step, row, time.perf_counter() - started))
        return out

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
