"""The seam between training and few-shot evaluation: the trainer evaluates checkpoints in
the background through this protocol only; ``yoto.evals.inloop`` implements it and the CLI
wires it in (the trainer never imports yoto.evals)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class EvalResult:
    """A finished evaluation of one checkpoint: its step and the attempt (branch) it was
    saved on, the result rows (task, metric, value, stderr, ...), or the error."""

    step: int
    attempt: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None


class CheckpointEvaluator(Protocol):
    every: int  # steps between evaluated checkpoints

    def submit(self, run_dir: Path, step: int) -> bool:
        """Start evaluating complete checkpoint ``step`` of ``run_dir``; False (and
        nothing started) while an evaluation is still running. Never blocks."""
        ...

    def poll(self) -> list[EvalResult]:
        """Evaluations finished since the last call. Never blocks."""
        ...

    def wait(self, timeout: float | None) -> list[EvalResult]:
        """Wait up to ``timeout`` s for the one in flight; what finished (poll's)."""
        ...

    def close(self, timeout: float | None) -> list[EvalResult]:
        """``wait``, then stop the evaluator."""
        ...
