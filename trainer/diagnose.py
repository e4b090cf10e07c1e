"""Why did it spike: spike forensics and replay diagnosis.

Two questions a user woken by a page asks before touching anything, answered from what a
run already has (a sampler whose sequence k is a pure function of the seed, checkpoints
that restore bit-exactly on CPU, each step's record):

**Which sequences?** (:func:`spike_forensics`) At a spike verdict the onset step's batch
is scored again with the current weights: a no-grad forward of each rank's own
micro-batches (the data as trained, faults included), one all-reduce of a vector of
per-sequence losses, one host read. This runs only at a spike, never on an ordinary step.
The spike event then names the top sequences by loss (source, document id, token offset
in the document, a snippet of what was trained on) and the batch's tokens per source
beside the mixture's expected share.

**Data, state or machine?** (:class:`Diagnoser`) A rollback has restored its good
checkpoint; before it skips data, the recorded steps from the checkpoint to the onset plus
``after_onset`` are replayed with the recorded batch sizes, context lengths and learning
rates (an LR spike is replayed, as the schedule would replay it) on the same data:

- the replay does not reproduce the recorded losses and grad norms (beyond a tolerance:
  0 on CPU, where a replay is bit-exact; 1e-3 relative on CUDA, whose kernels are not
  deterministic, an unmeasured default) -> ``nondeterministic``: suspect the hardware or
  silent data corruption. Each step's record keeps every rank's local loss (it rides in
  the loss all-reduce), so the rank whose own loss differs at the first differing step is
  named, with its host;
- reproduced -> replayed again with the batches from the onset on replaced by data from
  past the rollback's skip: the spike gone (its peak, the log ratio of loss or grad norm
  to the pre-onset median, below ``gone_fraction`` of the original's) -> ``data``; still
  there -> ``state`` (optimizer or LR dynamics).

Each replay starts from the checkpoint (loaded again), writes no rows and arms no probe,
and the checkpoint is restored once more at the end, so the branch that survives is the
one the rollback would have trained without a diagnosis, bit-exact on CPU, unless the
policy acts on the verdict (``policy.rollback.diagnose.on_*``). A step budget and a time
budget bound it: over the first the diagnosis is not run, past the second it is cut short
(``inconclusive``). The time check rides in the replayed steps' own all-reduce.

Dropout draws from the RNG state the checkpoint restores, so replays with dropout are
reproducible too.
"""

from __future__ import annotations

import math
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import numpy as np

from yoto.config import Config

from . import distributed
from .data.sampler import Sampler
from .faults import FaultInjector
from .history import History, StepTrace

_BASELINE_STEPS = 16  # recorded steps before the onset whose median is the normal level
CUDA_TOLERANCE = 1e-3


class Cause(StrEnum):
    DATA = "data"  # reproduced, and gone without the onset batches
    STATE = "state"  # reproduced, and still there on other data
    NONDETERMINISTIC = "nondeterministic"  # the same steps on the same data differ
    INCONCLUSIVE = "inconclusive"  # cut short (time budget, a stop), or no spike replayed
    NOT_RUN = "not_run"  # over the step budget, or the steps' record is gone


ADVICE = {
    Cause.DATA: "the onset batches are the cause: skipping them is the remedy; the spike "
    "event names their sequences (yoto data batch RUN_DIR --step ONSET)",
    Cause.STATE: "the spike comes back on other data: optimizer or learning-rate dynamics. "
    "Try a lower LR after the rollback (policy.rollback.lr_cooldown_factor), a longer "
    "warmup, z-loss (model.z_loss) or skip-step (optim.skip_step.enabled)",
    Cause.NONDETERMINISTIC: "the same steps on the same data did not spike again: suspect "
    "the hardware or silent data corruption on the named rank (check its GPU: ECC errors, "
    "nvidia-smi -q, dcgmi diag) and replace the host if it happens again",
    Cause.INCONCLUSIVE: "the replay could not decide; look at the spike event's sequences",
    Cause.NOT_RUN: "no replay: raise policy.rollback.diagnose.max_steps or checkpoint more "
    "often (checkpoint.every) to have one",
}


# --- the record of a trajectory -------------------------------------------------------------


@dataclass
class Trajectory:
    """Losses and grad norms of consecutive steps: recorded, or replayed."""

    label: str  # recorded | replay | without_onset
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float | None] = field(default_factory=list)
    rank_losses: list[list[float]] = field(default_factory=list)
    complete: bool = True  # False: cut short

    def add(self, step: int, loss: float, grad_norm: float | None, ranks: Sequence[float]) -> None:
        self.steps.append(step)
        self.loss.append(loss)
        self.grad_norm.append(grad_norm)
        self.rank_losses.append([float(x) for x in ranks])

    @classmethod
    def recorded(cls, traces: dict[int, StepTrace], steps: Sequence[int]) -> Trajectory:
        out = cls("recorded")
        for s in steps:
            t = traces[s]
            out.add(s, t.loss, t.grad_norm, t.rank_losses)
        return out

    def to_data(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "steps": self.steps,
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "complete": self.complete,
        }


def same(a: float | None, b: float | None, tolerance: float) -> bool:
    """Equal within ``tolerance`` relative (0: bit-equal); NaN equals NaN, None None."""
    if a is None or b is None:
        return a is None and b is None
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if a == b:
        return True
    return abs(a - b) <= tolerance * max(abs(a), abs(b))


def first_difference(
    recorded: Trajectory, replay: Trajectory, tolerance: float
) -> tuple[int, list[int]] | None:
    """The first step whose loss or grad norm the replay did not reproduce, and the ranks
    whose own local loss differs there (empty when they all agree: the difference arose in
    the backward pass or the reduction, which no rank's loss shows); None: reproduced."""
    for i, step in enumerate(replay.steps):
        j = recorded.steps.index(step)
        if same(recorded.loss[j], replay.loss[i], tolerance) and same(
            recorded.grad_norm[j], replay.grad_norm[i], tolerance
        ):
            continue
        if len(replay.rank_losses[i]) == 1:  # one rank: it is the machine in question
            return step, [0]
        ranks = [
            r
            for r, (a, b) in enumerate(
                zip(recorded.rank_losses[j], replay.rank_losses[i], strict=False)
            )
            if not same(a, b, tolerance)
        ]
        return step, ranks
    return None


def _log_ratio(value: float | None, level: float | None) -> float:
    if value is None or level is None or level <= 0:
        return 0.0
    if not math.isfinite(value):
        return math.inf
    return math.log(max(value, 1e-30) / level)


def peak(traj: Trajectory, onset: int, level: tuple[float | None, float | None]) -> float:
    """The spike's size from the onset on: the largest log ratio of loss or grad norm to
    the pre-onset level (inf for a non-finite value, 0 for none above it)."""
    out = 0.0
    for step, loss, norm in zip(traj.steps, traj.loss, traj.grad_norm, strict=True):
        if step >= onset:
            out = max(out, _log_ratio(loss, level[0]), _log_ratio(norm, level[1]))
    return out


def baseline(traces: dict[int, StepTrace], onset: int) -> tuple[float | None, float | None]:
    """The normal level before the onset: medians of the recorded loss and grad norm of up
    to 16 steps before it."""
    before = [traces[s] for s in sorted(traces) if s < onset][-_BASELINE_STEPS:]
    losses = [t.loss for t in before if math.isfinite(t.loss)]
    norms = [t.grad_norm for t in before if t.grad_norm is not None and math.isfinite(t.grad_norm)]
    return (
        statistics.median(losses) if losses else None,
        statistics.median(norms) if norms else None,
    )


# --- the verdict ----------------------------------------------------------------------------


@dataclass
class Diagnosis:
    """One diagnosis: its verdict and its evidence (the ``diagnosis`` event's data)."""

    cause: Cause
    onset: int
    checkpoint_step: int
    end: int  # the last step replayed
    finding: str  # what the replays showed, in a sentence
    tolerance: float
    first_difference: int | None = None
    ranks: list[int] = field(default_factory=list)  # named by a nondeterministic verdict
    hosts: list[str] = field(default_factory=list)
    peaks: dict[str, float] = field(default_factory=dict)  # trajectory label -> its peak
    trajectories: list[Trajectory] = field(default_factory=list)
    replayed_steps: int = 0
    seconds: float = 0.0

    @property
    def advice(self) -> str:
        return ADVICE[self.cause]

    def summary(self) -> dict[str, Any]:
        """The short form a rollback event and its chat message carry."""
        return {
            "cause": str(self.cause),
            "finding": self.finding,
            "ranks": self.ranks,
            "hosts": self.hosts,
            "replayed_steps": self.replayed_steps,
            "seconds": round(self.seconds, 3),
        }

    def to_data(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "onset": self.onset,
            "checkpoint_step": self.checkpoint_step,
            "end": self.end,
            "tolerance": self.tolerance,
            "first_difference": self.first_difference,
            "peaks": {k: (v if math.isfinite(v) else None) for k, v in self.peaks.items()},
            "advice": self.advice,
            "trajectories": [t.to_data() for t in self.trajectories],
        }


def classify(
    *,
    recorded: Trajectory,
    replay: Trajectory,
    without: Trajectory | None,
    onset: int,
    level: tuple[float | None, float | None],
    tolerance: float,
    gone_fraction: float,
    hosts: Sequence[str],
) -> tuple[Cause, str, int | None, list[int]]:
    """The verdict from the trajectories: (cause, message, first differing step, ranks)."""
    differs = first_difference(recorded, replay, tolerance)
    if differs is not None:
        step, ranks = differs
        who = (
            ", ".join(f"rank {r} ({hosts[r] if r < len(hosts) else '?'})" for r in ranks)
            if ranks
            else "no single rank (every rank's own loss agrees; the gradients or their "
            "reduction differed)"
        )
        return (
            Cause.NONDETERMINISTIC,
            f"the replay from the checkpoint differs from the recorded run at step {step}: {who}",
            step,
            ranks,
        )
    if not replay.complete:
        return Cause.INCONCLUSIVE, "the replay was cut short (time budget or a stop)", None, []
    original = peak(replay, onset, level)
    if original <= 0:
        return (
            Cause.INCONCLUSIVE,
            f"the replay reproduced the record, but no step from the onset ({onset}) on rose "
            "above the level before it",
            None,
            [],
        )
    if without is None or not without.complete:
        return Cause.INCONCLUSIVE, "the replay without the onset batches was cut short", None, []
    other = peak(without, onset, level)
    if other < gone_fraction * original:
        return (
            Cause.DATA,
            f"reproduced on the same data (peak {original:.3g}), gone without the onset "
            f"batches (peak {other:.3g})",
            None,
            [],
        )
    return (
        Cause.STATE,
        f"reproduced on the same data (peak {original:.3g}) and still there without the "
        f"onset batches (peak {other:.3g})",
        None,
        [],
    )


# --- replays --------------------------------------------------------------------------------


class Replays(Protocol):
    """What a diagnosis needs of the trainer (``Trainer`` is one)."""

    cfg: Config
    history: History
    stop_requested: bool

    def restore(self, ckpt: Any, resume: bool = False) -> None:
        """Load the checkpoint: model, optimizer, sampler, probes, the branch."""

    def replay_step(
        self, step: int, trace: StepTrace, position: int, deadline: float
    ) -> tuple[float, float | None, list[float], bool]:
        """Train ``step`` again as ``trace`` recorded it, on the data at ``position``;
        writes nothing. Returns (loss, grad norm, every rank's loss, whether to stop)."""


def replay_tolerance(cfg: Config, device_type: str) -> float:
    given = cfg.policy.rollback.diagnose.tolerance
    if given is not None:
        return given
    return 0.0 if device_type == "cpu" else CUDA_TOLERANCE


def hostnames() -> list[str]:
    """Every rank's host name, in rank order (one small gather, on the diagnosis path)."""
    return distributed.all_gather_object(socket.gethostname())


class Diagnoser:
    """Runs one diagnosis for a rollback's plan on every rank (see the module docstring).
    The trainer has restored ``plan.checkpoint`` before; the diagnosis leaves it restored."""

    def __init__(self, trainer: Replays, device_type: str) -> None:
        self.trainer = trainer
        self.cfg = trainer.cfg.policy.rollback.diagnose
        self.tolerance = replay_tolerance(trainer.cfg, device_type)

    def run(self, plan: Any) -> Diagnosis:
        started = time.perf_counter()
        t, cfg = self.trainer, self.cfg
        traces = t.history.traces
        ckpt, onset = plan.checkpoint.step, plan.onset
        end = min(plan.from_step, onset + cfg.after_onset)
        steps = list(range(ckpt + 1, end + 1))
        base = Diagnosis(Cause.NOT_RUN, onset, ckpt, end, "", self.tolerance)
        missing = [s for s in steps if s not in traces]
        if missing:
            base.finding = f"the record of steps {missing[0]}..{missing[-1]} is gone"
            return base
        if 2 * len(steps) > cfg.max_steps:
            base.finding = (
                f"a replay from the checkpoint at step {ckpt} to step {end} takes "
                f"{2 * len(steps)} steps, over policy.rollback.diagnose.max_steps="
                f"{cfg.max_steps}"
            )
            return base
        hosts = hostnames()
        deadline = started + cfg.max_seconds
        level = baseline(traces, onset)
        recorded = Trajectory.recorded(traces, steps)
        replay = self._replay("replay", steps, deadline, shift=None)
        trajectories, without = [recorded, replay], None
        if first_difference(recorded, replay, self.tolerance) is None and replay.complete:
            t.restore(plan.checkpoint)
            skip_to = plan.skip_to - traces[onset].position  # where fresh data begin
            without = self._replay("without_onset", steps, deadline, shift=(onset, skip_to))
            trajectories.append(without)
        t.restore(plan.checkpoint)  # the rollback proper starts from here
        cause, finding, step, ranks = classify(
            recorded=recorded,
            replay=replay,
            without=without,
            onset=onset,
            level=level,
            tolerance=self.tolerance,
            gone_fraction=cfg.gone_fraction,
            hosts=hosts,
        )
        diagnosis = Diagnosis(
            cause,
            onset,
            ckpt,
            end,
            finding,
            self.tolerance,
            first_difference=step,
            ranks=ranks,
            hosts=[hosts[r] for r in ranks if r < len(hosts)],
            peaks={
                tr.label: peak(tr, onset, level) for tr in trajectories if tr.label != "recorded"
            },
            trajectories=trajectories,
            replayed_steps=sum(len(tr.steps) for tr in trajectories[1:]),
            seconds=time.perf_counter() - started,
        )
        return distributed.broadcast_object(diagnosis)  # rank 0's verdict, on every rank

    def _replay(
        self, label: str, steps: Sequence[int], deadline: float, shift: tuple[int, int] | None
    ) -> Trajectory:
        """Replay ``steps``; with ``shift`` (onset, offset), steps from the onset on take
        the data ``offset`` sequences further on (past the rollback's skip)."""
        t = self.trainer
        out = Trajectory(label)
        for step in steps:
            trace = t.history.traces[step]
            position = trace.position
            if shift is not None and step >= shift[0]:
                position += shift[1]
            loss, norm, ranks, stop = t.replay_step(step, trace, position, deadline)
            out.add(step, loss, norm, ranks)
            if stop:
                out.complete = step == steps[-1]
                break
        return out


# --- forensics ------------------------------------------------------------------------------


class Scores(Protocol):
    """What forensics needs of the trainer."""

    cfg: Config
    sampler: Sampler
    history: History

    def sequence_losses(self, step: int, trace: StepTrace) -> np.ndarray:
        """The mean loss of each of the step's sequences with the current weights."""

    def trained_tokens(self, trace: StepTrace, index: int) -> np.ndarray:
        """The tokens sequence ``index`` of the step's batch was trained on (faults in)."""


def trained_tokens(
    sampler: Sampler,
    faults: FaultInjector,
    trace: StepTrace,
    index: int,
    *,
    world: int,
    micro_size: int,
) -> np.ndarray:
    """The tokens sequence ``index`` of a step's global batch was trained on, faults
    included, recomputed from the sampler and the faults (both pure functions of the
    position): the micro-batch and rank that held it, as the loop split the batch."""
    windows = sampler.windows_at(trace.position, trace.batch)
    group, row = divmod(index, micro_size)  # group = micro * world + rank
    micro, rank = divmod(group, world)
    tokens = sampler.micro_batch(windows, micro, rank, world, micro_size, length=trace.seq_len)
    tokens = faults.corrupt(tokens, trace.position + group * micro_size, rank=rank)
    return tokens[row].numpy()


def rank_of(index: int, *, world: int, micro_size: int) -> int:
    """The rank that trained sequence ``index`` of a global batch."""
    return index // micro_size % world


def snippet(tokens: np.ndarray, chars: int, decode: Any) -> str:
    """The start of a sequence as printable text (control characters shown as dots)."""
    text = decode(tokens)[: max(0, chars)]
    return "".join(c if c.isprintable() or c == " " else "·" for c in text)


def spike_forensics(trainer: Scores, onset: int, decode: Any) -> dict[str, Any] | None:
    """The onset step's batch scored again: top sequences by loss, and tokens per source
    against the mixture's share. None when the onset step's record is gone. Every rank
    must call it (one all-reduce)."""
    trace = trainer.history.traces.get(onset)
    if trace is None:
        return None
    started = time.perf_counter()
    cfg = trainer.cfg.policy.forensics
    sampler = trainer.sampler
    losses = trainer.sequence_losses(onset, trace)
    windows = sampler.windows_at(trace.position, trace.batch)
    order = np.argsort(-np.nan_to_num(losses, nan=np.inf), kind="stable")[: cfg.top_k]
    finite = losses[np.isfinite(losses)]
    median = float(np.median(finite)) if len(finite) else math.nan  # nan: weights blown
    top = []
    for i in map(int, order):
        place = sampler.place(int(windows[i]), trace.seq_len)
        top.append(
            {
                "index": i,  # in the step's global batch
                "position": trace.position + i,  # sequence number of the run
                "loss": float(losses[i]),
                "source": place.source,
                "doc_id": place.doc_id,
                "offset": place.offset,
                "documents": place.documents,
                "snippet": snippet(trainer.trained_tokens(trace, i), cfg.snippet_chars, decode),
            }
        )
    return {
        "onset": onset,
        "sampler_position": trace.position,
        "batch": trace.batch,
        "seq_len": trace.seq_len,
        "median_loss": median,
        "top": top,
        **source_mix(sampler, trace),
        "seconds": time.perf_counter() - started,
    }


def source_mix(sampler: Sampler, trace: StepTrace) -> dict[str, dict[str, float]]:
    """A step's tokens per source, and what the mixture (size^alpha) expects of a batch."""
    windows = sampler.windows_at(trace.position, trace.batch)
    counts = np.bincount(sampler.sources_of(windows), minlength=len(sampler.sources))
    tokens = trace.batch * trace.seq_len
    return {
        "source_tokens": {
            name: int(c) * trace.seq_len for name, c in zip(sampler.sources, counts, strict=True)
        },
        "expected_source_tokens": {
            name: float(p) * tokens for name, p in zip(sampler.sources, sampler.probs, strict=True)
        },
    }
