"""Few-shot evaluation during training (eval.harness): a real lm-eval evaluation of each due
checkpoint in a background process, never waited for by the step loop."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from tests.helpers import make_trainer
from yoto import catalog, runstore
from yoto.evals.inloop import BackgroundEvaluator, evaluate_checkpoint
from yoto.evaluator import EvalResult

HARNESS = [
    "eval.harness.tasks=[stdlib_next_line]",
    "eval.harness.limit=8",
    "eval.harness.batch_size=8",
]
SLOW_SECONDS = 30.0  # longer than the 30 steps take on a 2-core machine


def slow_evaluation(run_dir: str, step: int, cfg: dict) -> EvalResult:
    """The real evaluation, started late: an evaluator slower than many steps."""
    time.sleep(SLOW_SECONDS)
    return evaluate_checkpoint(run_dir, step, cfg)


def eval_events(run: Path) -> list[dict]:
    return [e for e in runstore.read_events(run) if e["kind"] == "eval"]


@pytest.mark.slow
def test_a_slow_evaluator_never_holds_up_a_step_and_results_keep_their_attempt(
    tmp_path: Path,
) -> None:
    """One run: the evaluator is slower than many steps, and a NaN gradient at step 34 is
    rolled back. The loop goes on while it evaluates, skips what comes while it is busy,
    and each result lands under its checkpoint's own step and attempt."""
    trainer, store = make_trainer(
        tmp_path,
        "train.steps=48",
        "checkpoint.every=6",
        "checkpoint.keep_last=10",  # the slow job loads step-6 late; a rollback goes 20 back
        "eval.harness.every=6",
        "faults=[nan_grad@34]",
        *HARNESS,
    )
    trainer.evaluator = BackgroundEvaluator(trainer.cfg.eval.harness, job=slow_evaluation)
    submitted = []
    real_submit = trainer.evaluator.submit

    def submit(run_dir, step):
        ok = real_submit(run_dir, step)
        if ok:
            submitted.append((step, time.time()))
        return ok

    trainer.evaluator.submit = submit
    assert trainer.fit() == "finished"
    store.flush()
    run = store.path
    (first_step, sent), *_ = submitted
    assert first_step == 6
    # the step loop went on while the evaluation of step-6 ran: steps trained after it
    # was handed over, before its scores came back
    [first] = [e for e in eval_events(run) if e["data"]["evaluated_step"] == 6]
    rows = runstore.read_metrics(run).to_pydict()
    times = zip(rows["step"], rows["time"], strict=True)
    during = [s for s, t in times if sent < t < first["time"]]
    assert len(during) >= 10, during
    # later checkpoints came while it was busy: skipped and counted, not waited for
    assert trainer.eval_skipped >= 2 and max(rows[catalog.EVAL_SKIPPED.name]) >= 1
    # the rollback, and every result under the branch its checkpoint was saved on
    [rollback] = [e for e in runstore.read_events(run) if e["kind"] == "rollback"]
    back_to = rollback["data"]["to_step"]
    assert back_to < 34 and rollback["data"]["attempt"] == 1
    recorded = {(r["step"], r["attempt"]) for r in runstore.read_evals(run)}
    assert {s for s, _ in recorded} == {s for s, _ in submitted}
    for step, attempt in recorded:
        assert (attempt == 0 and step < 34) or (attempt == 1 and step > back_to), recorded
    assert (6, 0) in recorded and (48, 1) in recorded  # the newest, evaluated at the end
    scores = [e for e in eval_events(run) if e["severity"] == "info"]
    assert {(e["data"]["evaluated_step"], e["data"]["evaluated_attempt"]) for e in scores} == (
        recorded
    )
    log = (run / runstore.EVALS / "harness.log").read_text()
    assert log.count("--- checkpoint") == len(submitted)
    # a result that comes back during training goes onto that step's record (and /metrics)
    [row] = [r for r in runstore.read_evals(run) if r["metric"] == "acc"][:1]
    values = trainer._eval_results([EvalResult(row["step"], row["attempt"], [row], 1.0)])
    key = catalog.series_key(catalog.EVAL_SCORE.name, {"task": "stdlib_next_line", "metric": "acc"})
    assert values[key] == row["value"] and catalog.EVAL_SKIPPED.name in values
    store.close("finished")
