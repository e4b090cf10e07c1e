"""Few-shot evaluation during training: ``yoto.evaluator.CheckpointEvaluator`` in a
background process, the way the spectra probe analyses weights.

The trainer hands in a complete checkpoint's step (``submit``) and goes on; one spawned
worker process (niced, one thread, killed with the trainer) loads that checkpoint from
disk and runs lm-eval on it (evaluate.py), writing the rows into the run's evals/ table
under the checkpoint's own step and attempt. While it runs, later checkpoints are skipped
and counted: training never waits for an evaluation. ``poll`` hands finished ones back to
the trainer, which puts the scores on the step's record (``yoto_eval_score``) and in an
event.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from yoto import runstore
from yoto.config import HarnessConfig
from yoto.evaluator import EvalResult
from yoto.probes.spectra import _background_worker, _single_threaded_children

LOG = "harness.log"  # in evals/: what lm-eval printed while evaluating in the background


def evaluate_checkpoint(run_dir: str, step: int, cfg: dict[str, Any]) -> EvalResult:
    """The worker's job: one checkpoint through lm-eval, its rows written to evals/; the
    harness's own output (progress bars, logging) goes to evals/harness.log, not to the
    training terminal."""
    started = time.perf_counter()
    _output_to(Path(run_dir) / runstore.EVALS / LOG)
    print(f"--- checkpoint step-{step}", flush=True)
    return _evaluate(run_dir, step, cfg, started)


def _output_to(log: Path) -> None:
    """This worker process's stdout and stderr (file descriptors, so the loggers and
    progress bars of libraries follow) appended to ``log``, once."""
    global _redirected
    if _redirected == log:
        return
    log.parent.mkdir(exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _redirected = log


_redirected: Path | None = None


def _evaluate(run_dir: str, step: int, cfg: dict[str, Any], started: float) -> EvalResult:
    try:
        from .evaluate import evaluate
        from .harness import YotoLM

        lm = YotoLM(run_dir=run_dir, step=step, batch_size=cfg["batch_size"], device=cfg["device"])
        _, rows = evaluate(
            run_dir,
            cfg["tasks"],
            step=step,
            num_fewshot=cfg["num_fewshot"] or None,
            limit=cfg["limit"],
            batch_size=cfg["batch_size"],
            model=lm,
        )
        return EvalResult(step, int(lm.attempt or 0), rows, time.perf_counter() - started)
    except Exception as exc:  # reported as an event; training goes on
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return EvalResult(step, -1, [], time.perf_counter() - started, detail[-500:])


class BackgroundEvaluator:
    """One evaluation at a time, in a spawned worker (module docstring). ``job`` is the
    worker's function (a module-level callable; tests slow it down)."""

    def __init__(
        self,
        cfg: HarnessConfig,
        job: Callable[[str, int, dict[str, Any]], EvalResult] = evaluate_checkpoint,
    ) -> None:
        self.cfg = cfg
        self.every = cfg.every
        self.job = job
        self._pool: cf.ProcessPoolExecutor | None = None
        self._future: cf.Future | None = None
        self._finished: list[EvalResult] = []  # done, not yet polled
        self.submitted: list[int] = []  # steps handed to the worker, in order

    def submit(self, run_dir: Path, step: int) -> bool:
        if self._future is not None and not self._future.done():
            return False
        if self._pool is None:
            with _single_threaded_children():
                self._pool = cf.ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_background_worker,
                )
        self._finished += self._pending_done()
        self._future = self._pool.submit(self.job, str(run_dir), step, self.cfg.model_dump())
        self.submitted.append(step)
        return True

    def _pending_done(self) -> list[EvalResult]:
        if self._future is None or not self._future.done():
            return []
        future, self._future = self._future, None
        try:
            return [future.result()]
        except Exception as exc:  # the worker died (killed, out of memory)
            return [EvalResult(-1, -1, [], 0.0, f"the evaluator process failed: {exc!r}")]

    def poll(self) -> list[EvalResult]:
        out, self._finished = self._finished + self._pending_done(), []
        return out

    def wait(self, timeout: float | None) -> list[EvalResult]:
        if self._future is not None:
            with contextlib.suppress(Exception):  # a timeout, or the worker's own failure
                self._future.result(timeout=timeout)
        return self.poll()

    def close(self, timeout: float | None) -> list[EvalResult]:
        out = self.wait(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        return out
