"""``yoto eval``: a checkpoint through lm-evaluation-harness, results into the run directory.

Tasks are lm-eval's own (``lambada_openai``, ``hellaswag``, ... wherever their datasets
are in the local Hugging Face cache), yoto's offline tasks (tasks.py: always there), or the
user's task folders (``include_path``). Nothing is downloaded: the Hugging Face libraries
are put offline before lm-eval loads them.

Each result is one row of the run's ``evals/`` table: attempt and step (of the checkpoint
evaluated: the attempt is the branch the checkpoint belongs to), task, metric, value,
stderr, n-shot, limit, backend.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from yoto import runstore
from yoto.errors import ConfigError

TABLE = runstore.EVALS  # the run directory's table of evaluation results
_OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def go_offline() -> None:
    """Before lm-eval (and with it datasets/huggingface_hub) is imported."""
    for key, value in _OFFLINE.items():
        os.environ.setdefault(key, value)


def results_rows(
    results: dict[str, Any], num_fewshot: int | None, limit: int | None
) -> list[dict[str, Any]]:
    """lm-eval's ``results`` dict as flat rows: one per (task, metric)."""
    rows = []
    shots = results.get("n-shot", {})
    for task, metrics in sorted(results["results"].items()):
        for key, value in sorted(metrics.items()):
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, _filter = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{_filter}")
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else math.nan,
                    "num_fewshot": int(shots.get(task, num_fewshot or 0) or 0),
                    "limit": -1 if limit is None else int(limit),
                }
            )
    return rows


def evaluate(
    run_dir: str | Path,
    tasks: Sequence[str],
    *,
    step: int | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    include_path: Sequence[str] = (),
    device: str = "cpu",
    write: bool = True,
    model: Any = None,
) -> tuple[int, list[dict[str, Any]]]:
    """Evaluate checkpoint ``step`` (default: the newest complete) of a run on ``tasks``;
    returns (step, rows) and appends the rows to the run's evals/ table unless ``write``
    is false. ``model`` replaces the yoto backend (e.g. lm-eval's own ``hf`` on an export)."""
    go_offline()
    import lm_eval
    from lm_eval.tasks import TaskManager

    from . import tasks as offline
    from .harness import YotoLM, newest_complete_step

    run_dir = runstore.require_run_dir(run_dir)
    step = newest_complete_step(run_dir) if step is None else step
    lm = model or YotoLM(run_dir=str(run_dir), step=step, batch_size=batch_size, device=device)
    with tempfile.TemporaryDirectory(prefix="yoto-tasks-") as folder:
        paths = [str(offline.materialize(folder)), *map(str, include_path)]
        manager = TaskManager(include_path=paths)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise ConfigError(
                f"unknown lm-eval task(s): {', '.join(unknown)}; yoto's offline tasks are "
                f"{', '.join(offline.TASKS)} (group {offline.GROUP}); lm-eval's own run "
                "where their datasets are in the local Hugging Face cache; --include-path "
                "adds your task folders"
            )
        got = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            task_manager=manager,
            log_samples=False,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
            bootstrap_iters=1000,  # perplexity stderr: the default 100k outlasts the eval
        )
    rows = [{**r, "backend": type(lm).__name__} for r in results_rows(got, num_fewshot, limit)]
    if write:
        attempt = getattr(lm, "attempt", None)
        attempt = _attempt_of(run_dir, step) if attempt is None else attempt
        runstore.append_records(run_dir, TABLE, attempt, step, rows)
    return step, rows


def _attempt_of(run_dir: Path, step: int) -> int:
    """The attempt (branch) the checkpoint of ``step`` was saved on."""
    import torch

    path = Path(run_dir) / runstore.CHECKPOINTS / runstore.tag_for(step)
    states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    client = states.get("yoto", {})
    branch = client.get("branch", client.get("state", {}))
    return int(branch.get("attempt", 0))


read_evals = runstore.read_evals  # a run's evaluation rows
