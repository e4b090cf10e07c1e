"""``yoto train``: set up everything a run needs, in the order that fails cheapest first.

config checks -> process group -> data -> model -> DeepSpeed config check -> run directory
(rank 0) -> engine -> resume -> loop -> final record. A bad config or a bad data path
fails before a run directory exists; once it exists, every way out (finished, interrupted
by a signal, crashed) is written into its manifest and events.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from yoto import runstore
from yoto.config import Config
from yoto.errors import YotoError
from yoto.events import Event, EventKind, LiveSink, Severity, Sinks
from yoto.probes.runner import ProbeRunner
from yoto.probes.suite import build_runner
from yoto.runstore import RunStore

from . import distributed
from . import engine as eng
from .checkpoint import CheckpointDir, Checkpointer, newest_valid
from .corpus import Corpus, load_corpus
from .faults import FaultInjector
from .loop import Trainer
from .model import GPT, vocab_size
from .progress import Progress
from .sampler import Sampler, validation_batches


def prepare(
    cfg: Config,
) -> tuple[distributed.DistInfo, Corpus, Sampler, dict[str, list[torch.Tensor]], GPT]:
    """Everything before the run directory: checks, process group, data, model."""
    device = distributed.choose_device(cfg.train.device)
    eng.check_precision(cfg, device)
    eng.check_model(cfg, device)
    info = distributed.setup(device)
    eng.deepspeed_config(cfg, info.world)  # batch divisibility for this world size
    vocab = vocab_size(cfg)
    corpus = load_corpus(cfg.data, min_tokens=cfg.model.seq_len + 1)
    sampler = Sampler(corpus, cfg.model.seq_len, cfg.train.seed, cfg.data.alpha)
    val = {
        source: validation_batches(
            split.val,
            cfg.model.seq_len,
            cfg.train.micro_batch_size,
            cfg.eval.batches,
            info.rank,
            info.world,
        )
        for source, split in corpus.sources.items()
    }
    FaultInjector(cfg.faults, info.rank, cfg.train.precision)  # bad --inject specs fail now
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    return info, corpus, sampler, val, GPT(cfg.model, vocab)


def assemble(
    cfg: Config, prepared: tuple, run_dir: Path, sinks: Sinks, probes: tuple = ()
) -> Trainer:
    """The DeepSpeed engine, the probes (attached) and the checkpointer around a prepared
    model and data, as a Trainer writing to ``run_dir``. ``probes`` are added to the
    configured set (tests add failing ones)."""
    info, _, sampler, val, model = prepared
    engine = eng.build_engine(model, cfg, info)
    runner = build_runner(cfg)
    runner.probes.extend(probes)
    runner.attach(engine.module, engine)
    checkpointer = Checkpointer(
        Path(run_dir) / runstore.CHECKPOINTS, cfg.checkpoint.keep_last, info.rank
    )
    return Trainer(cfg, engine, sampler, val, info, sinks, checkpointer, runner)


def train(
    cfg: Config,
    run_root: str | Path = "runs",
    name: str = "run",
    resume: str | Path | None = None,
    argv: list[str] | None = None,
    live: Callable[[], list[LiveSink]] | None = None,
    manifest_extra: dict[str, Any] | None = None,
) -> Path:
    """Train one run (or resume one); returns its run directory. ``live`` makes the live
    sinks (the Prometheus exporter, the chat notifier) on rank 0 once the config and data
    have passed their checks, before the run directory exists; they are bound to the run
    and closed with it. ``manifest_extra`` adds fields to the manifest (``yoto sweep``
    tags its runs this way)."""
    info, corpus, sampler, val, model = prepare(cfg)
    live_sinks = live() if live is not None and info.is_main else []  # binds the port now
    try:
        store = (
            _open_store(cfg, info, run_root, name, resume, argv, model, corpus, manifest_extra)
            if info.is_main
            else None
        )
    except BaseException:
        for sink in live_sinks:
            sink.close("crashed")
        raise
    run_dir = Path(distributed.broadcast_object(str(store.path) if store else None))
    sinks = Sinks(durable=store, live=live_sinks)
    if store is not None:
        run = {"run": store.manifest["id"], "name": store.manifest.get("name", name)}
        for sink in sinks.live:
            store.update_manifest(**sink.bind_run(run))

    status = "crashed"
    trainer: Trainer | None = None
    runner: ProbeRunner | None = None
    try:
        trainer = assemble(cfg, (info, corpus, sampler, val, model), run_dir, sinks)
        runner = trainer.runner
        if resume is not None:
            _resume(trainer, run_dir)
        trainer.event(
            EventKind.START,
            Severity.INFO,
            f"training on {info.world} rank(s), {info.device.type}, "
            f"{model.num_params():,} non-embedding parameters",
            world=info.world,
            device=info.device.type,
            resumed=resume is not None,
        )
        with _graceful_stop(trainer), contextlib.ExitStack() as stack:
            progress = Progress(
                cfg.train.steps, trainer.state.step, enabled=info.is_main and cfg.log.progress
            )
            stack.callback(progress.close)
            status = trainer.fit(progress)
    except BaseException as exc:
        if trainer is not None:
            with contextlib.suppress(Exception):
                trainer.finish_checkpoints()
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "crashed"
        refused = isinstance(exc, YotoError) and store is not None and store.previous_status
        if refused:  # a resume refused for bad input leaves the run as it was
            status = store.previous_status
        if store is not None:
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            step = trainer.state.step if trainer else 0
            attempt = trainer.state.attempt if trainer else 0
            message = f"resume refused: {exc}" if refused else f"run {status}: {detail}"
            sinks.write_event(
                Event(
                    step,
                    attempt,
                    EventKind.END,
                    Severity.WARNING if refused else Severity.CRITICAL,
                    message,
                    {"status": status},
                )
            )
            sinks.close(status)
        raise
    finally:
        if runner is not None:
            runner.detach()  # hooks off, the spectra worker stopped
    if store is not None:
        assert trainer is not None
        trainer.event(
            EventKind.END,
            Severity.INFO,
            f"run {status} at step {trainer.state.step}",
            status=status,
        )
        sinks.close(status)
        story = describe_interventions(runstore.read_events(run_dir))
        print(
            f"\nrun {status}: {run_dir}"
            + "".join(f"\n  {line}" for line in story)
            + f"\n  details: yoto runs show {run_dir}",
            file=sys.stderr,
        )
    distributed.barrier()
    return run_dir


def describe_interventions(events: list[dict[str, Any]]) -> list[str]:
    """What happened to the run, in a few lines: faults, what caught them, what was done."""
    lines = []
    for e in events:
        kind, data = e.get("kind"), e.get("data", {})
        if kind == "fault_injected":
            lines.append(f"step {e['step']}: {e['message']}")
        elif kind == "spike" and (data.get("persistent") or e.get("severity") == "critical"):
            lines.append(f"step {e['step']}: detected: {e['message']}")
        elif kind in ("rollback", "halt"):
            lines.append(f"step {e['step']}: {e['message']}")
    return lines


def _open_store(
    cfg: Config,
    info: distributed.DistInfo,
    run_root: str | Path,
    name: str,
    resume: str | Path | None,
    argv: list[str] | None,
    model: GPT,
    corpus: Corpus,
    manifest_extra: dict[str, Any] | None = None,
) -> RunStore:
    extra = {
        **(manifest_extra or {}),
        "world_size": info.world,
        "device": info.device.type,
        "argv": argv or [],
        "parameters": model.num_params(non_embedding=False),
        "non_embedding_parameters": model.num_params(),
        "data": corpus.token_counts(),
    }
    kwargs = {
        "flush_every_steps": cfg.log.flush_every_steps,
        "flush_every_seconds": cfg.log.flush_every_seconds,
    }
    if resume is not None:
        store = RunStore.reopen(resume, extra=extra, **kwargs)
        runstore.atomic_write_bytes(store.path / runstore.CONFIG, cfg.to_yaml().encode())
        return store
    return RunStore.create(run_root, name, cfg.to_yaml(), extra=extra, **kwargs)


def _resume(trainer: Trainer, run_dir: Path) -> None:
    """Load the newest complete, intact checkpoint on every rank (rank 0 chooses)."""
    info = trainer.info
    rejected: list[dict[str, Any]] = []
    chosen: CheckpointDir | None = None
    if info.is_main:

        def reject(ckpt: CheckpointDir, reason: str) -> None:
            rejected.append({"checkpoint": ckpt.tag, "reason": reason})
            trainer.event(
                EventKind.CHECKPOINT,
                Severity.WARNING,
                f"skipping checkpoint {ckpt.tag}: {reason}",
                checkpoint=ckpt.tag,
                reason=reason,
                rejected=True,
            )

        chosen = newest_valid(run_dir / runstore.CHECKPOINTS, reject)
    chosen = distributed.broadcast_object(chosen)
    if chosen is not None:
        trainer.restore(chosen, resume=True)
    recorded = runstore.last_recorded(run_dir) if info.is_main else None
    from_step = trainer.state.step
    # steps after the checkpoint that are already recorded will be replayed: a new attempt
    replay = recorded is not None and recorded[1] > from_step
    if replay:
        trainer.state.attempt = max(recorded[0], trainer.run.max_attempt) + 1
        trainer.run.max_attempt = trainer.state.attempt
    trainer.state.attempt = distributed.broadcast_object(trainer.state.attempt)
    where = f"checkpoint {chosen.tag}" if chosen else "the beginning (no usable checkpoint)"
    trainer.event(
        EventKind.RESUME,
        Severity.INFO if chosen else Severity.WARNING,
        f"resumed from {where}, attempt {trainer.state.attempt}",
        checkpoint=chosen.tag if chosen else None,
        from_step=from_step,
        replayed_steps=(recorded[1] - from_step) if replay else 0,
        rejected=rejected,
        sampler_position=trainer.sampler.position,
    )


@contextlib.contextmanager
def _graceful_stop(trainer: Trainer) -> Iterator[None]:
    """SIGTERM (scheduler preemption) or a first Ctrl-C: finish the step, checkpoint,
    record 'interrupted'. A second Ctrl-C stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum: int, frame: Any) -> None:
        if trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_requested = True
        if trainer.info.is_main:
            print(
                f"\n{signal.Signals(signum).name}: stopping after this step "
                f"(checkpoint first); Ctrl-C again to stop now",
                file=sys.stderr,
            )

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
