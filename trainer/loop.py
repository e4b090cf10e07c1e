"""The training loop.

One optimizer step (``Trainer.step_once``), in order, and where each hook fires (DESIGN.md
"One step")::

    bs = batch.size(step, tokens, B_noise)  warmup ramp / adaptive -> engine.set_train_batch_size
    faults.begin_step(step)                 injected faults (tests, demos) fire here
    lr = learning_rate(step) x factors      batch scaling, cooldown, injected LR spike
    runner.begin_step(step)                 <- hook-based probes arm (or stay idle)
    windows = sampler.next_global_batch(bs) deterministic, resumable, skippable
    for micro in range(gas):
        loss = engine(x, y)                 forward hooks (activations) on probe steps only
        engine.backward(loss)               param hooks (micro-batch grad norms) on device
        runner.on_micro_step(ctx)           <- micro-batch hook
        engine.step()                       DeepSpeed applies the update at the boundary
    runner.on_step(ctx)                     <- step hook: probes return device tensors
    values = runner.flush()                 ONE device->host transfer for the step
    evaluate (every eval.every steps)       per-source validation loss, its own flush
    verdicts = runner.detect(values)        host-side detectors: spikes, overflow, ...
    decision = agree(policy(verdicts))      one action, the same on every rank
    sinks.write_step(values)                run directory (+ live exporters)
    apply(decision)                         alert / rollback / LR cooldown / batch / halt
    checkpoint (every checkpoint.every)     DeepSpeed save; COMPLETE sealed in background

Every rank runs the same code; rank 0 alone writes through the sinks. Decisions that all
ranks must share travel with collectives: the stop flag in a control tensor all-reduced
with the loss, the policy's action broadcast from rank 0 (only when there are several).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from yoto import catalog
from yoto.config import Config
from yoto.events import Event, EventKind, Severity, Sinks
from yoto.probes.base import MicroStepContext, Sample, StepContext, Verdict
from yoto.probes.runner import ProbeRunner

from . import distributed
from . import engine as eng
from .batch_control import BatchController
from .checkpoint import CheckpointDir, Checkpointer
from .distributed import DistInfo
from .faults import FaultInjector
from .flops import flops_per_token, mfu, peak_flops
from .policy import Action, Decision, Policy, agree
from .progress import Progress
from .rollback import RunState, find_good_checkpoint, rollback
from .sampler import Sampler
from .schedule import learning_rate


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done on the surviving branch
    tokens: int = 0  # training tokens consumed on it
    attempt: int = 0  # +1 at each rollback or replaying resume
    source_tokens: dict[str, int] = field(default_factory=dict)  # per data source


class Trainer:
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
        self.state = TrainState()
        self.stop_requested = False  # set by a signal handler; agreed by all ranks
        self.own_clipping = eng.own_clipping(cfg)
        self.fp16 = cfg.train.precision == "fp16"
        self.batch = BatchController(cfg.train, info.world)
        self.policy = Policy(cfg.policy)
        self.faults = FaultInjector(cfg.faults, info.rank, cfg.train.precision)
        self.run = RunState()  # the run's own state: survives rollbacks
        self._last_saved_step = -1
        self.verdicts: list[Verdict] = []  # of the last step
        self.decision = Decision(Action.NONE)  # of the last step
        self.b_noise: float | None = None  # latest gradient noise scale, sequences
        self.flops_per_token = flops_per_token(cfg.model, engine.module.vocab_size)
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
            at = self.state.step if step is None else step
            self.sinks.write_event(Event(at, self.state.attempt, kind, severity, message, data))

    # --- the loop ---------------------------------------------------------------------------

    def fit(self, progress: Progress | None = None) -> str:
        """Train until train.steps or an agreed stop. Returns the run status."""
        cfg = self.cfg
        progress = progress or Progress(cfg.train.steps, self.state.step, enabled=False)
        status = "finished"
        self._start_batch_schedule()
        while self.state.step < cfg.train.steps:
            values, stop = self.step_once()
            if self.run.halted:
                status = "halted"
                break
            if self.info.is_main:
                progress.update(
                    self.state.step,
                    values[catalog.TRAIN_LOSS.name],
                    values[catalog.THROUGHPUT.name],
                )
                self._report_eval(progress, values)
            self._collect_checkpoints()
            every = cfg.checkpoint.every
            if every and self.state.step % every == 0 and self.state.step < cfg.train.steps:
                self.save_checkpoint()
            if stop:
                status = "interrupted"
                break
        if status != "halted" and self._last_saved_step != self.state.step:
            self.save_checkpoint()  # a halted run keeps its last good checkpoint instead
        self.finish_checkpoints()
        return status

    def step_once(self) -> tuple[dict[str, float], bool]:
        """One optimizer step end to end: train, validate when due, hand in work still in
        flight at the end, run the detectors, record. Returns the step's values and
        whether all ranks agreed to stop."""
        cfg = self.cfg
        values, stop = self.train_step()
        last = self.state.step >= cfg.train.steps
        if last or (cfg.eval.every and self.state.step % cfg.eval.every == 0):
            values.update(self.evaluate())
        if last or stop:  # work still in flight (spectra) is handed in with the last row
            self.runner.finish(0.0 if stop else cfg.probes.spectra.end_timeout_seconds)
            values.update(self.runner.flush()[0])
        step = self.state.step
        self.verdicts = self.runner.detect(step, values)
        self.b_noise = values.get(catalog.GRADIENT_NOISE_SCALE.name, self.b_noise)
        self.run.observe(step, self.verdicts)
        self.decision = agree(
            self.policy.decide(step, self.verdicts, self.run.rollbacks),
            self.info.world,
            self.info.device,
        )
        self._record(self.verdicts)
        values.update(self._intervention_values())
        self.sinks.write_step(self.state.attempt, step, values)
        self.apply(self.decision)
        return values, stop

    def _intervention_values(self) -> dict[str, float]:
        run = self.run
        return {
            catalog.ROLLBACKS.name: float(
                len(run.rollbacks) + (self.decision.action == Action.ROLLBACK)
            ),
            catalog.SKIPPED_BATCHES.name: float(run.skipped_batches),
            catalog.BATCH_SIZE_CHANGES.name: float(run.batch_size_changes),
            catalog.FAULTS_INJECTED.name: float(run.faults_injected),
            catalog.HALTED.name: float(self.decision.action == Action.HALT),
        }

    # --- interventions --------------------------------------------------------------------

    def apply(self, decision: Decision) -> None:
        """Carry out the step's agreed decision (every rank does the same)."""
        action, step = decision.action, self.state.step
        if action >= Action.ALERT:
            self.event(
                EventKind.ALERT,
                Severity.WARNING if action < Action.ROLLBACK else Severity.CRITICAL,
                f"{decision.reason} at step {decision.onset}: {decision.message}; "
                f"action: {action.name.lower()}",
                action=action.name.lower(),
                reason=decision.reason,
                onset=decision.onset,
            )
        if action == Action.ROLLBACK and not rollback(self, decision):
            decision = Decision(
                Action.HALT,
                "no_checkpoint",
                decision.onset,
                decision.message,
                "no good checkpoint precedes the onset by "
                f"{self.cfg.policy.rollback.min_distance} steps",
            )
            action = Action.HALT
        if action == Action.HALT:
            self.run.halted = True
            self.event(
                EventKind.HALT,
                Severity.CRITICAL,
                f"run halted at step {step}: {decision.reason}. {decision.advice}",
                reason=decision.reason,
                advice=decision.advice,
                onset=decision.onset,
            )
        elif action == Action.LR_COOLDOWN:
            rb = self.cfg.policy.rollback
            self.run.lr_scale = rb.lr_cooldown_factor if rb.lr_cooldown_factor < 1 else 0.5
            self.run.lr_scale_until = step + max(1, rb.lr_cooldown_steps or 100)
            self.event(
                EventKind.LR_COOLDOWN,
                Severity.WARNING,
                f"LR x {self.run.lr_scale:g} until step {self.run.lr_scale_until}",
                factor=self.run.lr_scale,
                until=self.run.lr_scale_until,
                reason=decision.reason,
            )
        elif action == Action.BATCH_SIZE:
            self.batch.bump(2.0, step)

    def _record(self, verdicts: list[Verdict]) -> None:
        """Every verdict becomes an event (whatever the policy decided about it); records
        (spectra rows) go to their tables."""
        for v in verdicts:
            self.event(v.kind, v.severity, v.message, step=v.step, **{**v.data, "onset": v.onset})
        if self.info.is_main:
            for record in self.runner.take_records():
                attempt = self._attempt_of(record.step)
                self.sinks.write_records(record.table, attempt, record.step, record.rows)
        else:
            self.runner.take_records()

    def _attempt_of(self, step: int) -> int:
        """The attempt that trained ``step``, for a late record (a spectra analysis handed
        in steps after it was asked for, perhaps after a rollback): the current attempt
        trained the steps since the last rollback's checkpoint; a step past where it is now
        belongs to the branch that rollback abandoned; earlier steps, to earlier attempts."""
        hi, attempt = self.state.step, self.state.attempt
        for rb in reversed(self.run.rollbacks):
            if step > rb["to_step"]:
                return attempt if step <= hi else rb.get("from_attempt", rb["attempt"] - 1)
            hi, attempt = rb["to_step"], rb.get("from_attempt", rb["attempt"] - 1)
        return attempt

    def _start_batch_schedule(self) -> None:
        """Put the engine on the schedule's batch for the current position, silently; only
        later changes are events."""
        size, _ = self.batch.size(self.state.step + 1, self.state.tokens, self.b_noise)
        if size != self.engine.train_batch_size():
            self.engine.set_train_batch_size(size)
        ramp = self.batch.ramp
        if self.state.step == 0 and size != ramp.target:
            self.event(
                EventKind.BATCH_SIZE,
                Severity.INFO,
                f"batch warmup: {size} -> {ramp.target} sequences over {ramp.ramp_tokens:,} tokens",
                previous=None,
                new=size,
                reason="warmup",
                target=ramp.target,
                ramp_tokens=ramp.ramp_tokens,
            )

    def train_step(self) -> tuple[dict[str, float], bool]:
        cfg, engine, info, s = self.cfg, self.engine, self.info, self.state
        started = time.perf_counter()
        step = s.step + 1
        batch_size, why = self.batch.size(step, s.tokens, self.b_noise)
        if batch_size != engine.train_batch_size():
            previous = engine.train_batch_size()
            engine.set_train_batch_size(batch_size)
            self.run.batch_size_changes += 1
            self.event(
                EventKind.BATCH_SIZE,
                Severity.INFO,
                f"global batch {previous} -> {batch_size} sequences ({why})",
                step=step,
                previous=previous,
                new=batch_size,
                reason=why,
                tokens=batch_size * cfg.model.seq_len,
                b_noise=self.b_noise,
            )
        position = self.sampler.position
        self.run.record_position(step, position)
        for fault in self.faults.begin_step(step, engine.module, position, batch_size):
            self.run.faults_injected += 1
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
                sampler_position=position,
            )
        lr = (
            learning_rate(s.step, cfg.optim, cfg.train.steps)
            * self.batch.lr_factor()
            * self.run.lr_factor(step)
            * self.faults.lr_factor()
        )
        eng.set_lr(engine, lr)

        self.runner.begin_step(step)
        windows = self.sampler.next_global_batch(batch_size)
        n_micro = engine.gradient_accumulation_steps()
        loss_sum = torch.zeros((), device=info.device)
        grad_norm: torch.Tensor | float | None = None
        for micro in range(n_micro):
            tokens = self.sampler.micro_batch(
                windows, micro, info.rank, info.world, cfg.train.micro_batch_size
            )
            first = position + (micro * info.world + info.rank) * cfg.train.micro_batch_size
            tokens = self.faults.corrupt(tokens, first).to(info.device, non_blocking=True)
            # explicit: DeepSpeed's own micro-step counter goes out of phase when the
            # accumulation count changes (batch warmup)
            boundary = micro == n_micro - 1
            engine.set_gradient_accumulation_boundary(boundary)
            prefix = self._prefix_lengths(step, micro, tokens.size(0))
            loss = engine(tokens[:, :-1], tokens[:, 1:], prefix)
            loss = loss * self.faults.loss_factor() if self.faults.faults else loss
            poison = self.faults.poison_grads(engine.module) if self.faults.faults else None
            engine.backward(loss)
            if poison is not None:
                poison.remove()
            loss_sum += loss.detach().float()
            self.runner.on_micro_step(
                MicroStepContext(step, micro, n_micro, loss.detach(), tokens, engine)
            )
            if boundary and self.own_clipping:
                grad_norm = eng.clip_own(engine, cfg.optim.grad_clip)
            engine.step()
        if grad_norm is None:
            grad_norm = eng.reported_grad_norm(engine)
        if self.fp16 and not engine.was_step_applied():
            grad_norm = None  # a skipped fp16 step's norm is inf by design, not a spike

        loss_mean = loss_sum / n_micro
        control = None
        if info.world > 1:  # mean loss over ranks and the stop flag, in one collective
            flags = torch.tensor([1.0 if self.stop_requested else 0.0], device=info.device)
            buf = distributed.all_reduce_sum_(torch.cat([loss_mean.reshape(1), flags]))
            loss_mean, control = buf[0] / info.world, buf[1:]

        s.step += 1
        s.tokens += batch_size * cfg.model.seq_len
        per_source = (
            np.bincount(self.sampler.sources_of(windows), minlength=len(self.sampler.sources))
            * cfg.model.seq_len
        )
        for name, count in zip(self.sampler.sources, map(int, per_source), strict=True):
            s.source_tokens[name] = s.source_tokens.get(name, 0) + count
        runner = self.runner
        runner.add(Sample(catalog.TRAIN_LOSS.name, loss_mean))
        if grad_norm is not None:
            runner.add(Sample(catalog.GRAD_NORM.name, grad_norm))
        runner.add(Sample(catalog.LEARNING_RATE.name, lr))
        runner.add(
            Sample(catalog.BATCH_SIZE_TOKENS.name, engine.train_batch_size() * cfg.model.seq_len)
        )
        runner.add(Sample(catalog.STEPS.name, s.step))
        runner.add(Sample(catalog.TOKENS.name, s.tokens))
        runner.add(Sample(catalog.ATTEMPT.name, s.attempt))
        runner.on_step(
            StepContext(
                step=s.step,
                attempt=s.attempt,
                tokens_total=s.tokens,
                batch_size=batch_size,
                micro_batch_size=cfg.train.micro_batch_size,
                n_micro=n_micro,
                world=info.world,
                seq_len=cfg.model.seq_len,
                loss=loss_mean,
                grad_norm=grad_norm,
                lr=lr,
                engine=engine,
            )
        )
        values, flags = runner.flush(control)
        duration = time.perf_counter() - started
        values[catalog.STEP_DURATION.name] = duration
        values[catalog.THROUGHPUT.name] = batch_size * cfg.model.seq_len / duration
        utilisation = mfu(
            values[catalog.THROUGHPUT.name], self.flops_per_token, self.peak, info.world
        )
        if utilisation is not None:
            values[catalog.MFU.name] = utilisation
        for name, count in s.source_tokens.items():
            values[catalog.SOURCE_TOKENS.key(source=name)] = float(count)
        stop = bool(flags[0]) if flags else self.stop_requested
        return values, stop

    def _prefix_lengths(
        self, step: int, micro: int, n: int, fixed: bool = False
    ) -> torch.Tensor | None:
        """Prefix-LM: a prefix length per sequence, uniform in [1, T - 1], drawn from a
        generator seeded by (seed, step, micro, rank), so a resumed or rolled-back run
        draws the same ones; validation uses T // 2 for every sequence."""
        if self.cfg.model.attention.pattern != "prefix":
            return None
        T = self.cfg.model.seq_len
        if fixed:
            return torch.full((n,), T // 2, device=self.info.device)
        seed = hash((self.cfg.train.seed, step, micro, self.info.rank)) % 2**63
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(1, T, (n,), generator=gen).to(self.info.device)

    # --- validation ---------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss per source over all ranks' shares (one flush)."""
        engine, info = self.engine, self.info
        engine.eval()
        sums = torch.zeros(len(self.val_batches), 2, dtype=torch.float64, device=info.device)
        for i, batches in enumerate(self.val_batches.values()):
            for batch in batches:
                batch = batch.to(info.device, non_blocking=True)
                prefix = self._prefix_lengths(0, 0, batch.size(0), fixed=True)
                loss = engine(batch[:, :-1], batch[:, 1:], prefix)
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

    def _report_eval(self, progress: Progress, values: dict[str, float]) -> None:
        val = {
            catalog.parse_series_key(k)[1]["source"]: v
            for k, v in values.items()
            if k.startswith(catalog.VAL_LOSS.name + "{")
        }
        if val:
            parts = ", ".join(f"{src} {v:.4f}" for src, v in val.items())
            progress.note(f"step {self.state.step}: val loss {parts}")

    # --- checkpoints ----------------------------------------------------------------------

    def client_state(self) -> dict[str, Any]:
        return {
            "yoto": {
                "state": asdict(self.state),
                "sampler": self.sampler.state_dict(),
                "probes": self.runner.state_dict(),
                "batch_size": self.engine.train_batch_size(),
                # the run's own state: read back on resume, never by a rollback
                "run": self.run.state_dict(),
                "batch": self.batch.state_dict(),
                "faults": self.faults.state_dict(),
            }
        }

    def save_checkpoint(self) -> None:
        if self.checkpointer is None:
            return
        if self.info.is_main:  # pruning after this save must keep the newest good one
            good = find_good_checkpoint(self, self.state.step)
            self.checkpointer.protect = {good.step} if good is not None else set()
        self.checkpointer.save(self.engine, self.state.step, self.client_state())
        self._last_saved_step = self.state.step

    def restore(self, ckpt: CheckpointDir, resume: bool = False) -> None:
        """Load a checkpoint on every rank: model, optimizer, sampler, probes, counters.
        On ``resume`` also the run's own state (rollback history, batch control, faults);
        a rollback keeps the one it has."""
        assert self.checkpointer is not None
        client = self.checkpointer.load(self.engine, ckpt).get("yoto", {})
        self.state = TrainState(**client["state"])
        self.sampler.load_state_dict(client["sampler"])
        self.runner.load_state_dict(client.get("probes", {}))
        if resume:
            for part, key in ((self.run, "run"), (self.batch, "batch"), (self.faults, "faults")):
                if key in client:
                    part.load_state_dict(client[key])
            self.run.max_attempt = max(self.run.max_attempt, self.state.attempt)
        self._last_saved_step = self.state.step

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
