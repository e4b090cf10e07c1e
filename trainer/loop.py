"""The training loop.

One optimizer step (``Trainer.step_once``), in order, and where each hook fires (DESIGN.md
"One step"). ``train_step`` is the first block, in four phases, one method each::

    set_batch_and_lr(step)
      bs = batch.size(step, tokens, B_noise)  warmup ramp / adaptive -> engine.set_train_batch_size
      faults.begin_step(step)                 injected faults (tests, demos) fire here
      lr = learning_rate(step) x factors      batch scaling, cooldown, injected LR spike
      runner.begin_step(step)                 <- hook-based probes arm (or stay idle)
      windows = sampler.next_global_batch(bs) deterministic, resumable, skippable
    forward_backward(work)
      for micro in range(gas):                clock: the rank's data wait and forward time
          loss = engine(x, y)                 forward hooks (activations) on probe steps only
          engine.backward(loss)               param hooks (micro-batch grad norms) on device
          runner.on_micro_step(ctx)           <- micro-batch hook
      (boundary) mean loss + stop flag        one all-reduce, before the update (+ the
                                              probes' sums over ranks: runner.take_summed)
      skip_gate.begin(loss, grad_norm)        skip-step: the outlier test, on device
          engine.step()                       DeepSpeed applies the update at the boundary
      skip_gate.end()                         (the update was skipped or applied)
    reduce_and_count(work)                    the branch's counters
    emit_samples(work)                        the loop's numbers; runner.on_step(ctx) <- step hook
    flush(work)                               ONE device->host transfer for the step
    evaluate (every eval.every steps)         per-source validation loss, its own flush
    verdicts = runner.detect(values)          host-side detectors: spikes, overflow, ...
    decision = agree(policy(verdicts))        one action, the same on every rank
    notices = episodes.observe(decision)      one page per instability episode (episodes.py)
    sinks.write_step(values)                  run directory (+ live exporters)
    announce(notices)                         the episode's alert page / info updates
    apply(decision)                           rollback / LR cooldown / batch / halt
    checkpoint (every checkpoint.every)       rows flushed; DeepSpeed save; COMPLETE sealed later

Every rank runs the same code; rank 0 alone writes through the sinks. Decisions that all
ranks must share travel with collectives: the stop flag in a control tensor all-reduced
with the loss, the policy's action broadcast from rank 0 (only when there are several),
a rollback's plan broadcast from rank 0.

State comes in two kinds (trainer/history.py): ``Trainer.branch``, which a rollback
restores from the checkpoint, and ``Trainer.history``, which survives it.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from yoto import catalog
from yoto.config import Config
from yoto.evaluator import CheckpointEvaluator, EvalResult
from yoto.events import Event, EventKind, Reason, Rollback, Severity, Sinks
from yoto.probes.base import MicroStepContext, Sample, StepContext, Verdict
from yoto.probes.runner import ProbeRunner
from yoto.probes.system import StepClock
from yoto.runstore import list_checkpoints

from . import distributed
from . import engine as eng
from .batch_control import BatchController, BatchReason
from .checkpoint import CheckpointDir, Checkpointer
from .data import tokenizer as tokenizers
from .data.sampler import Sampler
from .diagnose import Cause, Diagnoser, Diagnosis, spike_forensics, trained_tokens
from .distributed import DistInfo
from .episodes import EpisodeTracker, Notice, Outcome
from .faults import FaultInjector
from .flops import flops_per_token, mfu, peak_flops
from .history import Branch, History, StepTrace
from .model import outside_prefix
from .policy import Action, Decision, Policy, agree
from .progress import Progress
from .rollback import good_checkpoint, hide_abandoned, plan_rollback
from .schedule import SeqRamp, learning_rate


@dataclass
class StepWork:
    """One optimizer step in flight: what its phases hand each other."""

    step: int  # the step being trained (1-based)
    batch_size: int  # global batch, sequences
    seq_len: int  # this step's context length, tokens (short during a sequence warmup)
    lr: float
    position: int  # the sampler's position before this step's batch
    windows: np.ndarray  # the global batch's window starts
    started: float  # perf_counter at the start of the step
    n_micro: int = 0  # micro-batches per rank
    loss: torch.Tensor | None = None  # mean over the global batch, on device
    z_loss: torch.Tensor | None = None  # model.z_loss's term, the same mean; None when off
    grad_norm: torch.Tensor | float | None = None  # global, before clipping; None: skipped
    control: torch.Tensor | None = None  # the stop flags, all-reduced (several ranks only)
    update_skipped: torch.Tensor | None = None  # skip-step's verdict, on device (when on)
    rank_losses: list[float] = field(default_factory=list)  # every rank's own loss, host


class Trainer:
    """One run's training on this rank. ``branch`` is the current line of training (a
    rollback or resume restores it from a checkpoint); ``history`` is the run's own record,
    which no rollback touches (trainer/history.py)."""

    def __init__(
        self,
        cfg: Config,
        engine: Any,
        sampler: Sampler,
        val_batches: dict[str, list[torch.Tensor]],
        info: DistInfo,
        sinks: Sinks,
        checkpointer: Checkpointer | None,
        runner: ProbeRunner | None = None,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.sampler = sampler
        self.val_batches = val_batches
        self.info = info
        self.sinks = sinks
        self.checkpointer = checkpointer
        self.runner = runner or ProbeRunner()
        self.tokenizer: tokenizers.Tokenizer = tokenizers.ByteTokenizer()  # run.assemble sets it
        # few-shot evaluation of checkpoints in the background (rank 0; the CLI wires it)
        self.evaluator: CheckpointEvaluator | None = None
        self._evaluated_step = 0  # the newest checkpoint handed to the evaluator
        self._unevaluated: int | None = None  # a due checkpoint skipped while it was busy
        self.eval_skipped = 0
        self.branch = Branch()  # rolled back with the checkpoint
        self.history = History()  # survives rollbacks
        self.stop_requested = False  # set by a signal handler; agreed by all ranks
        self.own_clipping = eng.own_clipping(cfg)
        self.skip_gate = eng.skip_gate(engine)  # None unless optim.skip_step.enabled
        self.fp16 = cfg.train.precision == "fp16"
        self.batch = BatchController(cfg.train, info.world)
        warm = cfg.train.seq_warmup
        self.seq_ramp = (
            SeqRamp(warm.start, cfg.model.seq_len, warm.tokens, warm.schedule)
            if warm.start is not None
            else SeqRamp.constant(cfg.model.seq_len)
        )
        self.policy = Policy(cfg.policy)
        self.episodes = EpisodeTracker(cfg.policy.episode)  # run history, like self.history
        self.faults = FaultInjector(cfg.faults, info.rank, cfg.train.precision)
        self.clock = StepClock(info.device)  # this rank's own time per step (probes/system.py)
        self._last_saved_step = -1
        self._warned_disk = False  # the "next checkpoint will not fit" warning is out
        self.verdicts: list[Verdict] = []  # of the last step
        self.decision = Decision(Action.NONE)  # of the last step
        self.diagnosis: Diagnosis | None = None  # of the last rollback
        self.b_noise: float | None = None  # latest gradient noise scale, sequences
        self._flops: dict[int, float] = {}  # per token, by context length
        self.replay_deadline: float | None = None  # set while a diagnosis replays steps
        self._forensics: dict[int, dict[str, Any]] = {}  # onset -> its spike forensics
        self.peak = peak_flops(cfg.train.peak_tflops, info.device)

    # --- events ---------------------------------------------------------------------------

    def event(
        self,
        kind: EventKind,
        severity: Severity,
        message: str,
        step: int | None = None,
        **data: Any,
    ) -> None:
        if self.info.is_main:
            at = self.branch.step if step is None else step
            self.sinks.write_event(Event(at, self.branch.attempt, kind, severity, message, data))

    # --- the loop ---------------------------------------------------------------------------

    def fit(self, progress: Progress | None = None) -> str:
        """Train until train.steps or an agreed stop. Returns the run status."""
        cfg = self.cfg
        progress = progress or Progress(cfg.train.steps, self.branch.step, enabled=False)
        status = "finished"
        self._start_batch_schedule()
        while self.branch.step < cfg.train.steps:
            values, stop = self.step_once()
            if self.history.halted:
                status = "halted"
                break
            if self.info.is_main:  # the step trained, which a rollback has since undone
                trained = int(values[catalog.STEPS.name])
                progress.update(
                    self.branch.step,
                    values[catalog.TRAIN_LOSS.name],
                    values[catalog.THROUGHPUT.name],
                )
                self._report_eval(progress, trained, values)
            self._collect_checkpoints()
            every = cfg.checkpoint.every
            due = every and self.branch.step % every == 0 and self.branch.step < cfg.train.steps
            if due and self._last_saved_step != self.branch.step:  # not the one rolled back to
                self.save_checkpoint()
            if stop:
                status = "interrupted"
                break
        if status == "finished":  # an episode still open is summed up with the run
            self._announce([self.episodes.close(Outcome.UNFINISHED, self.branch.step)])
        if status != "halted" and self._last_saved_step != self.branch.step:
            self.save_checkpoint()  # a halted run keeps its last good checkpoint instead
        self.finish_checkpoints()
        self.finish_evaluations()
        return status

    def step_once(self) -> tuple[dict[str, float], bool]:
        """One optimizer step end to end: train, validate when due, hand in work still in
        flight at the end, run the detectors, record, act. Returns the step's values and
        whether all ranks agreed to stop."""
        cfg = self.cfg
        values, stop = self.train_step()
        last = self.branch.step >= cfg.train.steps
        if last or (cfg.eval.every and self.branch.step % cfg.eval.every == 0):
            values.update(self.evaluate())
        if last or stop:  # work still in flight (spectra) is handed in with the last row
            self.runner.finish(0.0 if stop else cfg.probes.spectra.end_timeout_seconds)
            values.update(self.runner.flush()[0])
        step = self.branch.step
        skipped = values.get(catalog.STEP_SKIPPED.name) == 1.0
        if skipped:
            self._skipped_update(step, values)
        self.verdicts = self._with_forensics(self.runner.detect(step, values))
        self.b_noise = values.get(catalog.GRADIENT_NOISE_SCALE.name, self.b_noise)
        self.history.observe(step, self.verdicts)
        self.decision = agree(
            self.policy.decide(step, self.verdicts, self.history.rollbacks, skipped),
            self.info.world,
            self.info.device,
        )
        self._record(self.verdicts)
        notices = self.episodes.observe(step, self.decision, values)  # what pages
        values.update(self._intervention_values())
        values.update(self._eval_results(self.evaluator.poll() if self.evaluator else []))
        self.sinks.write_step(self.branch.attempt, step, values)
        self._announce(notices)
        self.apply(self.decision)
        return values, stop

    # --- one training step, in the order of the diagram above ------------------------------

    def train_step(self) -> tuple[dict[str, float], bool]:
        """Train one optimizer step; returns its values (host floats, one transfer) and
        whether all ranks agreed to stop."""
        started = time.perf_counter()
        work = self.set_batch_and_lr(self.branch.step + 1, started)
        self.forward_backward(work)
        self.clock.step_done()
        control = self.reduce_and_count(work)
        self.emit_samples(work)
        values, stop = self.flush(work, control)
        self.history.record_trace(
            work.step,
            StepTrace(
                position=work.position,
                batch=work.batch_size,
                seq_len=work.seq_len,
                lr=work.lr,
                loss=values[catalog.TRAIN_LOSS.name],
                grad_norm=values.get(catalog.GRAD_NORM.name),
                rank_losses=tuple(work.rank_losses),
            ),
        )
        return values, stop

    def set_batch_and_lr(self, step: int, started: float) -> StepWork:
        """The step's global batch (schedule -> engine), injected faults, its LR, the
        probes armed, and its data drawn."""
        engine, branch = self.engine, self.branch
        batch_size, why = self.batch.size(step, branch.tokens, self.b_noise)
        if batch_size != engine.train_batch_size():
            self._change_batch(step, batch_size, why)
        position = self.sampler.position
        for fault in self.faults.begin_step(step, engine.module, position, batch_size):
            self.history.faults_injected += 1
            self.event(
                EventKind.FAULT_INJECTED,
                Severity.WARNING,
                f"fault injected: {fault.kind} at step {step}",
                step=step,
                fault=fault.kind,
                rank=fault.rank,
                factor=fault.factor,
                steps=fault.steps,
                layer=fault.layer,
                sequences=fault.sequences,
                seconds=fault.seconds,
                sampler_position=position,
                batch=batch_size,
            )
        lr = (
            learning_rate(branch.step, self.cfg.optim, self.cfg.train.steps)
            * self.batch.lr_factor()
            * self.history.lr_factor(step)
            * self.faults.lr_factor()
        )
        eng.set_lr(engine, lr)
        self.runner.begin_step(step)
        fetch = time.perf_counter()
        windows = self.sampler.next_global_batch(batch_size)
        self.clock.data(time.perf_counter() - fetch)  # the rank's data wait (probes/system.py)
        return StepWork(step, batch_size, self.seq_len_now(), lr, position, windows, started)

    def seq_len_now(self) -> int:
        """The next step's context length: the length ramp at the tokens trained since it
        began (the run's start, or a rewarming rollback's checkpoint)."""
        return self.seq_ramp.length_at(self.branch.tokens - self.history.seq_ramp_origin)

    def _change_batch(self, step: int, batch_size: int, why: BatchReason) -> None:
        previous = self.engine.train_batch_size()
        self.engine.set_train_batch_size(batch_size)
        self.history.batch_size_changes += 1
        self.event(
            EventKind.BATCH_SIZE,
            Severity.INFO,
            f"global batch {previous} -> {batch_size} sequences ({why})",
            step=step,
            previous=previous,
            new=batch_size,
            reason=why,
            tokens=batch_size * self.seq_len_now(),
            b_noise=self.b_noise,
        )

    def forward_backward(self, work: StepWork) -> None:
        """Accumulate this rank's micro-batches; DeepSpeed applies the update at the last
        one. Leaves this rank's mean loss (on device) and the global grad norm in ``work``."""
        cfg, engine, info, faults = self.cfg, self.engine, self.info, self.faults
        work.n_micro = n_micro = engine.gradient_accumulation_steps()
        loss_sum = torch.zeros((), device=info.device)
        work.z_loss = torch.zeros((), device=info.device) if cfg.model.z_loss else None
        grad_norm: torch.Tensor | float | None = None
        timed = self.replay_deadline is None  # a diagnosis's replay is no step of the clock's
        for micro in range(n_micro):
            fetch = time.perf_counter()
            tokens = self.sampler.micro_batch(
                work.windows,
                micro,
                info.rank,
                info.world,
                cfg.train.micro_batch_size,
                length=work.seq_len,
            )
            first = work.position + (micro * info.world + info.rank) * cfg.train.micro_batch_size
            tokens = faults.corrupt(tokens, first).to(info.device, non_blocking=True)
            # explicit: DeepSpeed's own micro-step counter goes out of phase when the
            # accumulation count changes (batch warmup)
            boundary = micro == n_micro - 1
            engine.set_gradient_accumulation_boundary(boundary)
            prefix = self._prefix_lengths(work.step, micro, tokens.size(0), work.seq_len)
            # loss: what to back-propagate; lm: its cross-entropy; z: the z-loss or None
            if timed:  # data wait: sampler + host-to-device copy; then the forward's own time
                self.clock.data(time.perf_counter() - fetch)
                mark = self.clock.forward_begin()
                if faults.faults:
                    faults.stall()  # slow_rank: a straggler, on purpose
            loss, lm, z = engine(tokens[:, :-1], tokens[:, 1:], prefix, terms=True)
            if timed:
                self.clock.forward_end(mark)
            if faults.faults:
                loss, lm = loss * faults.loss_factor(), lm * faults.loss_factor()
            poison = faults.poison_grads(engine.module) if faults.faults else None
            engine.backward(loss)
            if poison is not None:
                poison.remove()
            loss_sum += lm
            if z is not None:
                work.z_loss += z / n_micro
            if self.replay_deadline is None:  # a diagnosis's replay arms no probe
                self.runner.on_micro_step(
                    MicroStepContext(work.step, micro, n_micro, lm, tokens, engine)
                )
            if boundary and self.own_clipping:
                grad_norm = eng.clip_own(engine, cfg.optim.grad_clip)
            if boundary:
                self._reduce_loss(work, loss_sum / n_micro)
                if self.skip_gate is not None:
                    own = grad_norm if isinstance(grad_norm, torch.Tensor) else None
                    self.skip_gate.begin(work.loss, own)
            engine.step()
        if self.skip_gate is not None:
            work.update_skipped = self.skip_gate.end()
        if grad_norm is None:
            grad_norm = eng.reported_grad_norm(engine)
        if self.fp16 and not engine.was_step_applied():
            grad_norm = None  # a skipped fp16 step's norm is inf by design, not a spike
        work.grad_norm = grad_norm

    def _reduce_loss(self, work: StepWork, loss: torch.Tensor) -> None:
        """Mean loss over ranks and the stop flag in one collective (only with several
        ranks; the flags stay on device), before the update: skip-step's test needs the
        global loss. Every rank's own loss rides along (``world`` more floats), for the
        step's record: a replay diagnosis names the rank whose loss it does not repeat.
        So do the probes' sums over ranks (``runner.take_summed``: the noise scale's
        micro-batch norms, underflow counts), so that they cost no collective of their own;
        the buffer is fp64 for them, the loss goes back to its own dtype."""
        info = self.info
        work.loss = loss
        summed = self.runner.take_summed()
        if info.world > 1:
            flags = torch.tensor([1.0 if self._stopping() else 0.0], device=info.device)
            means = [loss] if work.z_loss is None else [loss, work.z_loss]  # z-loss rides along
            own = torch.zeros(info.world, device=info.device, dtype=loss.dtype)
            own[info.rank] = loss.detach()
            head = torch.cat([torch.stack(means), flags, own])
            probes = [s.tensor.detach().reshape(-1).to(info.device, torch.float64) for s in summed]
            buf = distributed.all_reduce_sum_(torch.cat([head.double(), *probes]))
            total, at = buf[len(head) :], 0
            buf = buf[: len(head)].to(loss.dtype)
            work.loss, work.control = buf[0] / info.world, buf[len(means) :]  # flag, losses
            if work.z_loss is not None:
                work.z_loss = buf[1] / info.world
            for item, part in zip(summed, probes, strict=True):
                item.receive(total[at : at + part.numel()].reshape(item.tensor.shape))
                at += part.numel()
        else:
            for item in summed:
                item.receive(item.tensor.detach().double())

    def _stopping(self) -> bool:
        """A stop was asked for, or a diagnosis's replay ran past its time budget."""
        late = self.replay_deadline is not None and time.perf_counter() > self.replay_deadline
        return self.stop_requested or late

    def reduce_and_count(self, work: StepWork) -> torch.Tensor | None:
        """The branch's counters; returns the stop flags reduced with the loss."""
        branch, seq_len = self.branch, work.seq_len
        branch.step += 1
        branch.tokens += work.batch_size * seq_len
        sources = self.sampler.sources
        per_source = np.bincount(self.sampler.sources_of(work.windows), minlength=len(sources))
        for name, count in zip(sources, map(int, per_source * seq_len), strict=True):
            branch.source_tokens[name] = branch.source_tokens.get(name, 0) + count
        return work.control

    def emit_samples(self, work: StepWork) -> None:
        """The loop's own numbers, then the probes' step hook; all stay on device."""
        cfg, runner, branch = self.cfg, self.runner, self.branch
        runner.add(Sample(catalog.TRAIN_LOSS.name, work.loss))
        if work.z_loss is not None:
            runner.add(Sample(catalog.Z_LOSS.name, work.z_loss))
        if work.grad_norm is not None:
            runner.add(Sample(catalog.GRAD_NORM.name, work.grad_norm))
        runner.add(Sample(catalog.LEARNING_RATE.name, work.lr))
        if work.update_skipped is not None:
            runner.add(Sample(catalog.STEP_SKIPPED.name, work.update_skipped.float()))
        tokens_per_step = self.engine.train_batch_size() * work.seq_len
        runner.add(Sample(catalog.BATCH_SIZE_TOKENS.name, tokens_per_step))
        runner.add(Sample(catalog.SEQ_LEN.name, work.seq_len))
        runner.add(Sample(catalog.SAMPLER_POSITION.name, work.position))
        runner.add(Sample(catalog.STEPS.name, branch.step))
        runner.add(Sample(catalog.TOKENS.name, branch.tokens))
        runner.add(Sample(catalog.ATTEMPT.name, branch.attempt))
        runner.on_step(
            StepContext(
                step=branch.step,
                attempt=branch.attempt,
                tokens_total=branch.tokens,
                batch_size=work.batch_size,
                micro_batch_size=cfg.train.micro_batch_size,
                n_micro=work.n_micro,
                world=self.info.world,
                seq_len=work.seq_len,
                loss=work.loss,
                grad_norm=work.grad_norm,
                lr=work.lr,
                engine=self.engine,
                clock=self.clock,
            )
        )

    def flush(self, work: StepWork, control: torch.Tensor | None) -> tuple[dict[str, float], bool]:
        """The step's one device-to-host transfer (samples and control flags together),
        then the host-side numbers: duration, throughput, MFU, tokens per source."""
        values, flags = self.runner.flush(control)
        duration = time.perf_counter() - work.started
        throughput = work.batch_size * work.seq_len / duration
        values[catalog.STEP_DURATION.name] = duration
        values[catalog.THROUGHPUT.name] = throughput
        utilisation = mfu(throughput, self._flops_at(work.seq_len), self.peak, self.info.world)
        if utilisation is not None:
            values[catalog.MFU.name] = utilisation
        for name, count in self.branch.source_tokens.items():
            values[catalog.SOURCE_TOKENS.key(source=name)] = float(count)
        stop = bool(flags[0]) if flags else self.stop_requested
        work.rank_losses = flags[1:] if flags else [values[catalog.TRAIN_LOSS.name]]
        return values, stop

    def _flops_at(self, seq_len: int) -> float:
        """Model FLOPs per token at this context length (MFU counts the current one)."""
        if seq_len not in self._flops:
            vocab = self.engine.module.vocab_size
            self._flops[seq_len] = flops_per_token(self.cfg.model, vocab, seq_len=seq_len)
        return self._flops[seq_len]

    def _start_batch_schedule(self) -> None:
        """Put the engine on the schedule's batch for the current position, silently; only
        later changes are events."""
        size, _ = self.batch.size(self.branch.step + 1, self.branch.tokens, self.b_noise)
        if size != self.engine.train_batch_size():
            self.engine.set_train_batch_size(size)
        ramp = self.batch.ramp
        if self.branch.step == 0 and size != ramp.target:
            self.event(
                EventKind.BATCH_SIZE,
                Severity.INFO,
                f"batch warmup: {size} -> {ramp.target} sequences over {ramp.ramp_tokens:,} tokens",
                previous=None,
                new=size,
                reason=BatchReason.WARMUP,
                target=ramp.target,
                ramp_tokens=ramp.ramp_tokens,
            )
        length = self.seq_len_now()
        if self.branch.step == 0 and length != self.seq_ramp.target:
            self._seq_warmup_event(length, rewarm=False)

    def _seq_warmup_event(self, length: int, rewarm: bool) -> None:
        seq = self.seq_ramp
        self.event(
            EventKind.SEQ_LEN,
            Severity.INFO,
            f"sequence warmup{' again after the rollback' if rewarm else ''}: "
            f"{length} -> {seq.target} tokens over {seq.ramp_tokens:,} training tokens "
            f"({seq.schedule})",
            start=length,
            target=seq.target,
            ramp_tokens=seq.ramp_tokens,
            schedule=seq.schedule,
            rewarm=rewarm,
            origin_tokens=self.history.seq_ramp_origin,
        )

    # --- records ----------------------------------------------------------------------------

    def _record(self, verdicts: list[Verdict]) -> None:
        """Every verdict becomes an event (whatever the policy decided about it); records
        (spectra rows) go to their tables, under the attempt that trained their step."""
        for v in verdicts:
            self.event(v.kind, v.severity, v.message, step=v.step, **{**v.data, "onset": v.onset})
        records = self.runner.take_records()
        if self.info.is_main:
            for record in records:
                attempt = self.history.attempt_of(record.step, self.branch)
                self.sinks.write_records(record.table, attempt, record.step, record.rows)

    def _skipped_update(self, step: int, values: dict[str, float]) -> None:
        """Skip-step left this step's update out (decided on the device; known here from
        the step's one transfer): counted, and one event."""
        self.history.skipped_steps += 1
        loss, norm = values.get(catalog.TRAIN_LOSS.name), values.get(catalog.GRAD_NORM.name)
        self.event(
            EventKind.SKIP_STEP,
            Severity.WARNING,
            f"update of step {step} skipped: loss {loss:.4g}, grad norm "
            f"{'n/a' if norm is None else format(norm, '.4g')} "
            f"(an outlier beyond {self.cfg.optim.skip_step.sigma:g} sigma of the last "
            f"{self.cfg.optim.skip_step.window} steps, or not finite)",
            step=step,
            loss=loss,
            grad_norm=norm,
        )

    def _intervention_values(self) -> dict[str, float]:
        history, action = self.history, self.decision.action
        return {  # this step's rollback is counted in its own row (applied after it)
            catalog.ROLLBACKS.name: float(len(history.rollbacks) + (action == Action.ROLLBACK)),
            catalog.SKIPPED_BATCHES.name: float(history.skipped_batches),
            catalog.BATCH_SIZE_CHANGES.name: float(history.batch_size_changes),
            catalog.FAULTS_INJECTED.name: float(history.faults_injected),
            catalog.SKIPPED_STEPS.name: float(history.skipped_steps),
            catalog.HALTED.name: float(action == Action.HALT),
            # observed before the row: a rollback's or halt's episode is paged already
            catalog.EPISODES.name: float(self.episodes.count),
            catalog.PAGED_EPISODES.name: float(self.episodes.paged),
        }

    # --- interventions --------------------------------------------------------------------

    def apply(self, decision: Decision) -> None:
        """Carry out the step's agreed decision (every rank does the same). Its page, if
        any, is already out (``_announce``), except a rollback's or halt's: their own event
        is the page, and it ends the episode."""
        action = decision.action
        if action == Action.ROLLBACK and self.roll_back(decision) is None:
            decision = Decision(
                Action.HALT,
                Reason.NO_CHECKPOINT,
                decision.onset,
                decision.message,
                "no good checkpoint precedes the onset by "
                f"{self.cfg.policy.rollback.min_distance} steps",
            )
            action = Action.HALT
        elif action == Action.ROLLBACK and self._halts_after_diagnosis():
            diagnosis = self.diagnosis
            assert diagnosis is not None
            decision = Decision(
                Action.HALT,
                Reason.NONDETERMINISTIC,
                decision.onset,
                diagnosis.finding,
                f"{diagnosis.finding}; {diagnosis.advice}",
            )
            action = Action.HALT
        if action == Action.HALT:
            self._halt(decision)
        elif action == Action.ROLLBACK:  # done: the replayed branch starts afresh
            self._announce([self.episodes.close(Outcome.ROLLED_BACK)])
        elif action == Action.LR_COOLDOWN:
            self._cool_lr(decision)
        elif action == Action.BATCH_SIZE:
            self.batch.bump(2.0, self.branch.step)

    def _halts_after_diagnosis(self) -> bool:
        d = self.diagnosis
        return (
            d is not None
            and d.cause == Cause.NONDETERMINISTIC
            and self.cfg.policy.rollback.diagnose.on_nondeterministic == "halt"
        )

    def _announce(self, notices: list[Notice | None]) -> None:
        """Write what the episode tracker says: an episode's one ``alert`` page (sent to
        chat), its info ``episode`` updates and closing summary."""
        for n in notices:
            if n is not None:
                data = dict(n.data)
                if n.kind == EventKind.ALERT:  # the page names the suspect sequences
                    episode = data.get("episode") or {}
                    data.setdefault("forensics", _brief(self.forensics_of(episode.get("onset"))))
                self.event(n.kind, n.severity, n.message, step=n.step, **data)

    def _halt(self, decision: Decision) -> None:
        self.history.halted = True
        self.event(
            EventKind.HALT,
            Severity.CRITICAL,
            f"run halted at step {self.branch.step}: {decision.reason}. {decision.advice}"
            f"{self.episodes.mention()}",
            reason=decision.reason,
            advice=decision.advice,
            onset=decision.onset,
            episode=self.episodes.summary(),  # the halt is the episode's page
        )
        self._announce([self.episodes.close(Outcome.HALTED)])

    def _cool_lr(self, decision: Decision) -> None:
        rb = self.cfg.policy.rollback
        factor = rb.lr_cooldown_factor if rb.lr_cooldown_factor < 1 else 0.5
        self.history.cool_lr(factor, self.branch.step + max(1, rb.lr_cooldown_steps or 100))
        self.event(
            EventKind.LR_COOLDOWN,
            Severity.WARNING,
            f"LR x {self.history.lr_scale:g} until step {self.history.lr_scale_until}",
            factor=self.history.lr_scale,
            until=self.history.lr_scale_until,
            reason=decision.reason,
        )

    def roll_back(self, decision: Decision) -> Rollback | None:
        """Roll back on every rank as rank 0 plans it (trainer/rollback.py); None when no
        good checkpoint precedes the onset."""
        started = time.perf_counter()
        self.finish_checkpoints()  # a save of this branch may still be sealing
        plan = None
        if self.info.is_main and self.checkpointer is not None:
            plan = plan_rollback(
                history=self.history,
                branch=self.branch,
                checkpoints=list_checkpoints(self.checkpointer.root),
                onset=decision.onset,
                reason=decision.reason,
                trigger=decision.message,
                batch=self.engine.train_batch_size(),
                position=self.sampler.position,
                cfg=self.cfg,
            )
        plan = distributed.broadcast_object(plan)
        if plan is None:
            return None
        self.restore(plan.checkpoint)  # model, optimizer, sampler, probes, branch
        self.faults.rolled_back()  # nothing acts "this step" in a replay or after
        plan, diagnosis = self._diagnose(plan)  # replays; leaves the checkpoint restored
        checkpoint_position = self.sampler.position
        self.sampler.skip(max(0, plan.skip_to - checkpoint_position))
        self.branch.attempt = plan.attempt  # rank 0's history numbered it
        self.history.saw_attempt(plan.attempt)
        if self.info.is_main:
            hide_abandoned(plan)
        distributed.barrier()
        done = plan.record(checkpoint_position, seconds=time.perf_counter() - started)
        self.history.record_rollback(done)
        if plan.batch_factor > 1.0:
            self.batch.bump(plan.batch_factor, done.to_step, reason=BatchReason.ROLLBACK)
        if self.cfg.policy.rollback.rewarm:  # short contexts first again, from here
            self.history.seq_ramp_origin = self.branch.tokens
            if self.skip_gate is not None:  # a shorter context's loss is a new level
                self.skip_gate.restart()
        said = ""
        if diagnosis is not None:
            self._diagnosis_event(diagnosis, done.from_step)
            said = f"; diagnosis: {diagnosis.cause} ({diagnosis.finding})"
        self.diagnosis = diagnosis
        forensics = self.forensics_of(done.onset)
        self.event(
            EventKind.ROLLBACK,
            Severity.WARNING,
            f"rolled back from step {done.from_step} to checkpoint {done.checkpoint} "
            f"({done.reason} from step {done.onset}); skipped {done.skipped_batches} batches "
            f"({done.skipped_sequences} sequences); attempt {done.attempt}"
            f"{self.episodes.mention()}{said}",
            step=done.from_step,
            **done.to_data(),
            episode=self.episodes.summary(),  # the rollback is the episode's page
            diagnosis=diagnosis.summary() if diagnosis is not None else None,
            forensics=_brief(forensics),
        )
        if self.cfg.policy.rollback.rewarm:
            self._seq_warmup_event(self.seq_len_now(), rewarm=True)
        self._forensics = {}  # of the abandoned branch: its onset steps will be trained anew
        return done

    # --- diagnosis (trainer/diagnose.py) -------------------------------------------------

    def _with_forensics(self, verdicts: list[Verdict]) -> list[Verdict]:
        """Spike verdicts carry the forensics of their onset step's batch (computed once
        per onset, on every rank: the verdicts are the same everywhere)."""
        if not self.cfg.policy.forensics.enabled:
            return verdicts
        out = []
        for v in verdicts:
            if v.kind == EventKind.SPIKE and v.reason is not None:
                if v.onset not in self._forensics:
                    found = spike_forensics(self, v.onset, self.tokenizer.decode)
                    if found is None:
                        out.append(v)
                        continue
                    self._forensics = {v.onset: found}  # the newest onset's only
                v = replace(v, data={**v.data, "forensics": self._forensics[v.onset]})
            out.append(v)
        return out

    def forensics_of(self, onset: int) -> dict[str, Any] | None:
        return self._forensics.get(onset)

    @torch.no_grad()
    def sequence_losses(self, step: int, trace: StepTrace) -> np.ndarray:
        """Each of step ``step``'s sequences' mean loss with the current weights: every
        rank scores its own micro-batches (the data as trained), one all-reduce of the
        (batch,) vector, one host read. Only at a spike (this is a sync point)."""
        cfg, info, engine, faults = self.cfg, self.info, self.engine, self.faults
        micro_size = cfg.train.micro_batch_size
        windows = self.sampler.windows_at(trace.position, trace.batch)
        out = torch.zeros(trace.batch, dtype=torch.float64, device=info.device)
        self.runner.idle()  # no probe sees this forward
        engine.eval()
        for micro in range(trace.batch // (micro_size * info.world)):
            tokens = self.sampler.micro_batch(
                windows, micro, info.rank, info.world, micro_size, length=trace.seq_len
            )
            first = (micro * info.world + info.rank) * micro_size
            tokens = faults.corrupt(tokens, trace.position + first).to(info.device)
            prefix = self._prefix_lengths(step, micro, tokens.size(0), trace.seq_len)
            logits = engine(tokens[:, :-1], None, prefix)  # (B, T, V)
            targets = tokens[:, 1:]
            if prefix is not None:
                targets = outside_prefix(targets, prefix)
            ce = F.cross_entropy(
                logits.float().transpose(1, 2), targets, ignore_index=-100, reduction="none"
            )  # (B, T)
            valid = (targets != -100).sum(1).clamp(min=1)
            out[first : first + micro_size] = ce.sum(1).double() / valid
        engine.train()
        distributed.all_reduce_sum_(out)
        return out.cpu().numpy()

    def trained_tokens(self, trace: StepTrace, index: int) -> np.ndarray:
        """The tokens sequence ``index`` of a step's global batch was trained on."""
        return trained_tokens(
            self.sampler,
            self.faults,
            trace,
            index,
            world=self.info.world,
            micro_size=self.cfg.train.micro_batch_size,
        )

    def replay_step(
        self, step: int, trace: StepTrace, position: int, deadline: float
    ) -> tuple[float, float | None, list[float], bool]:
        """Train ``step`` again as recorded (batch, context, LR) on the data at
        ``position``: the probes stay idle and nothing is written or counted. Returns its
        loss, grad norm and every rank's loss (one host read), and whether to stop (the
        time budget or a stop request, agreed in the loss all-reduce)."""
        engine = self.engine
        if trace.batch != engine.train_batch_size():
            engine.set_train_batch_size(trace.batch)
        eng.set_lr(engine, trace.lr)
        self.runner.idle()
        windows = self.sampler.windows_at(position, trace.batch)
        work = StepWork(
            step, trace.batch, trace.seq_len, trace.lr, position, windows, time.perf_counter()
        )
        self.replay_deadline = deadline
        try:
            self.forward_backward(work)
        finally:
            self.replay_deadline = None
        parts = [work.loss.detach().reshape(1).double()]
        norm = work.grad_norm
        has_norm = norm is not None
        if isinstance(norm, torch.Tensor):
            parts.append(norm.detach().reshape(1).double().to(parts[0].device))
        elif has_norm:
            parts.append(torch.tensor([float(norm)], dtype=torch.float64, device=parts[0].device))
        if work.control is not None:
            parts.append(work.control.detach().double())
        host = torch.cat(parts).cpu().tolist()
        loss = host[0]
        grad_norm = host[1] if has_norm else None
        rest = host[1 + has_norm :]
        if rest:
            return loss, grad_norm, rest[1:], bool(rest[0])
        return loss, grad_norm, [loss], self.stop_requested or time.perf_counter() > deadline

    def _diagnose(self, plan: Any) -> tuple[Any, Diagnosis | None]:
        """Replay diagnosis before the rollback skips (trainer/diagnose.py); returns the
        plan as the verdict changes it (``policy.rollback.diagnose.on_*``)."""
        cfg = self.cfg.policy.rollback
        if not cfg.diagnose.enabled:
            return plan, None
        batch_size = self.engine.train_batch_size()  # replays set the recorded ones
        diagnosis = Diagnoser(self, self.info.device.type).run(plan)
        if self.engine.train_batch_size() != batch_size:
            self.engine.set_train_batch_size(batch_size)
        if diagnosis.cause == Cause.DATA and cfg.diagnose.on_data == "skip_onset":
            last = self.history.traces.get(plan.from_step)
            if last is not None:  # only the batches from the onset to the rollback
                plan = replace(plan, skip_to=last.position + last.batch)
        if diagnosis.cause == Cause.STATE and cfg.diagnose.on_state == "lr_cooldown":
            factor = cfg.lr_cooldown_factor if cfg.lr_cooldown_factor < 1 else 0.5
            steps = cfg.lr_cooldown_steps or 100
            plan = replace(plan, lr_cooldown=(factor, plan.checkpoint.step + steps))
        return plan, diagnosis

    def _diagnosis_event(self, diagnosis: Diagnosis, step: int) -> None:
        self.event(
            EventKind.DIAGNOSIS,
            Severity.INFO,  # the rollback's event (the page) carries its summary
            f"diagnosis of the spike from step {diagnosis.onset}: {diagnosis.cause}. "
            f"{diagnosis.finding}",
            step=step,  # the rollback's
            **diagnosis.to_data(),
        )

    def _prefix_lengths(
        self, step: int, micro: int, n: int, seq_len: int | None = None, fixed: bool = False
    ) -> torch.Tensor | None:
        """Prefix-LM: a prefix length per sequence, uniform in [1, T - 1] for the step's
        context T, drawn from a generator seeded by (seed, step, micro, rank), so a resumed
        or rolled-back run draws the same ones; validation uses T // 2 for every sequence."""
        if self.cfg.model.attention.pattern != "prefix":
            return None
        T = seq_len or self.cfg.model.seq_len
        if fixed:
            return torch.full((n,), T // 2, device=self.info.device)
        seed = hash((self.cfg.train.seed, step, micro, self.info.rank)) % 2**63
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(1, T, (n,), generator=gen).to(self.info.device)

    # --- validation ---------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss per source over all ranks' shares (one flush).

        Every attention pattern is scored on the same positions: the targets after the
        first T // 2 tokens, the fixed prefix a prefix-LM validates with. A causal and a
        prefix run are then compared on equal terms (the Compare page, scaling fits): the
        same tokens predicted from the same context length, none of them visible."""
        engine, info = self.engine, self.info
        engine.eval()
        sums = torch.zeros(len(self.val_batches), 2, dtype=torch.float64, device=info.device)
        for i, batches in enumerate(self.val_batches.values()):
            for batch in batches:
                batch = batch.to(info.device, non_blocking=True)
                prefix = self._prefix_lengths(0, 0, batch.size(0), fixed=True)
                half = torch.full((batch.size(0),), self.cfg.model.seq_len // 2, device=info.device)
                targets = outside_prefix(batch[:, 1:], half)
                loss = engine(batch[:, :-1], targets, prefix, terms=True).lm  # no z-loss
                sums[i, 0] += loss.double() * batch.size(0)
                sums[i, 1] += batch.size(0)
        engine.train()
        distributed.all_reduce_sum_(sums)
        for i, source in enumerate(self.val_batches):
            self.runner.add(
                Sample(
                    catalog.VAL_LOSS.name, sums[i, 0] / sums[i, 1].clamp(min=1), {"source": source}
                )
            )
        values, _ = self.runner.flush()
        return values

    def _report_eval(self, progress: Progress, step: int, values: dict[str, float]) -> None:
        val = {
            catalog.parse_series_key(k)[1]["source"]: v
            for k, v in values.items()
            if k.startswith(catalog.VAL_LOSS.name + "{")
        }
        if val:
            parts = ", ".join(f"{src} {v:.4f}" for src, v in val.items())
            progress.note(f"step {step}: val loss {parts}")

    # --- checkpoints ----------------------------------------------------------------------

    def client_state(self) -> dict[str, Any]:
        return {
            "yoto": {
                # the branch: what a rollback or a resume restores
                "branch": asdict(self.branch),
                "sampler": self.sampler.state_dict(),
                "probes": self.runner.state_dict(),
                "skip_step": self.skip_gate.state_dict() if self.skip_gate else {},
                "batch_size": self.engine.train_batch_size(),
                # the run's history: read back on resume, never by a rollback
                "history": self.history.state_dict(),
                "batch": self.batch.state_dict(),
                "faults": self.faults.state_dict(),
                "episodes": self.episodes.state_dict(),
            }
        }

    def save_checkpoint(self) -> None:
        if self.checkpointer is None:
            return
        if self.info.is_main:
            # The record is at least as durable as the checkpoint: every row up to this
            # step is on disk before the checkpoint can be sealed, so a resume from it
            # never leaves a gap (one Parquet segment per checkpoint, fsync'd).
            self.sinks.flush()
            self._warn_if_checkpoint_will_not_fit()
            # pruning after this save must keep the newest good one (for an anomaly
            # beginning at the next step, the earliest one could)
            good = good_checkpoint(
                list_checkpoints(self.checkpointer.root),
                self.history,
                onset=self.branch.step + 1,
                now=self.branch.step,
                cfg=self.cfg,
            )
            self.checkpointer.protect = {good.step} if good is not None else set()
        self.checkpointer.save(self.engine, self.branch.step, self.client_state())
        self._last_saved_step = self.branch.step

    def _warn_if_checkpoint_will_not_fit(self) -> None:
        """Rank 0, before a save: a warning event when the free space at the checkpoint
        folder is less than the last checkpoint took (once, until there is room again)."""
        assert self.checkpointer is not None
        needed = self.checkpointer.last_size()
        free = shutil.disk_usage(self.checkpointer.root).free
        short = needed is not None and free < needed
        if short and not self._warned_disk:
            self.event(
                EventKind.CHECKPOINT,
                Severity.WARNING,
                f"the next checkpoint (~{needed / 2**20:.1f} MB) will not fit: "
                f"{free / 2**20:.1f} MB free at {self.checkpointer.root}; free space or "
                "lower checkpoint.keep_last",
                needed_bytes=needed,
                free_bytes=free,
            )
        self._warned_disk = short

    def restore(self, ckpt: CheckpointDir, resume: bool = False) -> None:
        """Load a checkpoint on every rank: model, optimizer, sampler, probes, the branch.
        On ``resume`` also the run's history, batch control, faults and episodes; a
        rollback keeps the ones it has."""
        assert self.checkpointer is not None
        client = self.checkpointer.load(self.engine, ckpt).get("yoto", {})
        self.branch = Branch(**client.get("branch", client.get("state")))  # state: older
        self.sampler.load_state_dict(client["sampler"])
        self.runner.load_state_dict(client.get("probes", {}))
        if self.skip_gate is not None:
            self.skip_gate.load_state_dict(client.get("skip_step", {}))
        if resume:
            history = client.get("history", client.get("run"))  # run: older checkpoints
            if history is not None:
                self.history.load_state_dict(history)
            parts = ((self.batch, "batch"), (self.faults, "faults"), (self.episodes, "episodes"))
            for part, key in parts:
                if key in client:
                    part.load_state_dict(client[key])
            self.history.saw_attempt(self.branch.attempt)
        self._last_saved_step = self.branch.step
        # the new branch's checkpoints are other models: due for evaluation again
        self._evaluated_step = min(self._evaluated_step, self.branch.step)
        if self._unevaluated is not None and self._unevaluated > self.branch.step:
            self._unevaluated = None  # a checkpoint of the abandoned branch

    def _collect_checkpoints(self) -> None:
        if self.checkpointer is None or not self.info.is_main:
            return
        for result in self.checkpointer.poll():
            if result.error:
                self.event(
                    EventKind.CHECKPOINT,
                    Severity.WARNING,
                    f"checkpoint step-{result.step} could not be sealed: {result.error}",
                    step=result.step,
                    path=str(result.path),
                    error=result.error,
                )
                continue
            self._maybe_evaluate(result.step)
            self.event(
                EventKind.CHECKPOINT,
                Severity.INFO,
                f"checkpoint step-{result.step} complete "
                f"({result.bytes / 2**20:.1f} MiB in {result.seconds:.1f} s)",
                step=result.step,
                path=str(result.path),
                bytes=result.bytes,
                seconds=result.seconds,
                removed=result.removed,
            )

    def finish_checkpoints(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.wait()
            self._collect_checkpoints()

    # --- few-shot evaluation in the background (eval.harness) ---------------------------

    def _maybe_evaluate(self, step: int) -> None:
        """A checkpoint just sealed: hand it to the evaluator when one is due. Never waits:
        a busy evaluator skips it (counted in yoto_eval_skipped_total)."""
        ev = self.evaluator
        if ev is None or not ev.every or step < self._evaluated_step + ev.every:
            return
        assert self.checkpointer is not None
        if ev.submit(self.checkpointer.root.parent, step):
            self._evaluated_step, self._unevaluated = step, None
        else:
            self.eval_skipped += 1
            self._unevaluated = step

    def _eval_results(self, results: list[EvalResult]) -> dict[str, float]:
        """Finished evaluations onto this step's record (the scores of the newest) and one
        event each; their rows are already in evals/ under their own step and attempt."""
        values: dict[str, float] = {}
        if self.evaluator is not None:
            values[catalog.EVAL_SKIPPED.name] = float(self.eval_skipped)
        for r in results:
            if r.error is not None:
                self.event(
                    EventKind.EVAL,
                    Severity.WARNING,
                    f"evaluation of checkpoint step-{r.step} failed: {r.error}",
                    evaluated_step=r.step,
                    error=r.error,
                )
                continue
            scores = {f"{row['task']}/{row['metric']}": row["value"] for row in r.rows}
            for row in r.rows:
                labels = {"task": row["task"], "metric": row["metric"]}
                values[catalog.series_key(catalog.EVAL_SCORE.name, labels)] = row["value"]
            self.event(
                EventKind.EVAL,
                Severity.INFO,
                f"few-shot scores of checkpoint step-{r.step} (attempt {r.attempt}): "
                + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()),
                evaluated_step=r.step,
                evaluated_attempt=r.attempt,
                seconds=r.seconds,
                scores=scores,
            )
        return values

    def finish_evaluations(self) -> None:
        """The end of the run (after the last checkpoint): wait for the evaluation still
        running, then evaluate the newest checkpoint if it was skipped, within
        eval.harness.end_timeout_seconds in all; record what finished. Rows of one that
        outlasts the wait are still written to evals/ if its process finishes."""
        ev = self.evaluator
        if ev is None:
            return
        deadline = time.perf_counter() + self.cfg.eval.harness.end_timeout_seconds
        results = ev.wait(max(0.0, deadline - time.perf_counter()))
        last, root = self._unevaluated, self.checkpointer and self.checkpointer.root.parent
        if last is not None and root is not None and ev.submit(root, last):
            self._evaluated_step, self._unevaluated = last, None
        results += ev.close(max(0.0, deadline - time.perf_counter()))
        self._eval_results(results)


def _brief(forensics: dict[str, Any] | None, top: int = 3) -> dict[str, Any] | None:
    """A page's share of a spike's forensics: the top sequences, not the source table."""
    if forensics is None:
        return None
    return {"onset": forensics["onset"], "top": forensics["top"][:top]}
