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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from yoto import runstore
from yoto.config import Config
from yoto.errors import DataError, RunFailed, YotoError
from yoto.evaluator import CheckpointEvaluator
from yoto.events import Event, EventKind, LiveSink, Severity, Sinks
from yoto.probes.suite import build_runner
from yoto.runstore import RunStore

from . import distributed
from . import engine as eng
from .checkpoint import CheckpointDir, Checkpointer, newest_valid
from .data import tokenizer as tokenizers
from .data.corpus import Corpus, load_corpus
from .data.sampler import Sampler, validation_batches
from .faults import FaultInjector
from .history import Branch
from .loop import Trainer
from .model import GPT, vocab_size
from .progress import Progress


class Prepared(NamedTuple):
    """What :func:`prepare` made: everything a run needs before its run directory."""

    info: distributed.DistInfo
    corpus: Corpus
    sampler: Sampler
    val: dict[str, list[torch.Tensor]]  # source -> this rank's validation batches
    model: GPT
    tokenizer: tokenizers.Tokenizer


def prepare(cfg: Config) -> Prepared:
    """Everything before the run directory: checks, process group, data, model."""
    device = distributed.choose_device(cfg.train.device)
    eng.check_precision(cfg, device)
    eng.check_model(cfg, device)
    info = distributed.setup(device)
    eng.deepspeed_config(cfg, info.world)  # batch divisibility for this world size
    tok = tokenizers.load(cfg.data.tokenizer, cfg.data.eos)
    vocab = vocab_size(cfg, tok)
    corpus = load_corpus(cfg.data, min_tokens=cfg.model.seq_len + 1, tok=tok)
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
    return Prepared(info, corpus, sampler, val, GPT(cfg.model, vocab), tok)


def assemble(
    cfg: Config, prepared: Prepared, run_dir: Path, sinks: Sinks, probes: tuple = ()
) -> Trainer:
    """The DeepSpeed engine, the probes (attached) and the checkpointer around a prepared
    model and data, as a Trainer writing to ``run_dir``. ``probes`` are added to the
    configured set (tests add failing ones)."""
    engine = eng.build_engine(prepared.model, cfg, prepared.info)
    runner = build_runner(cfg, checkpoints=Path(run_dir) / runstore.CHECKPOINTS)
    runner.probes.extend(probes)
    runner.attach(engine.module, engine)
    checkpointer = Checkpointer(
        Path(run_dir) / runstore.CHECKPOINTS, cfg.checkpoint.keep_last, prepared.info.rank
    )
    trainer = Trainer(
        cfg, engine, prepared.sampler, prepared.val, prepared.info, sinks, checkpointer, runner
    )
    trainer.tokenizer = prepared.tokenizer
    return trainer


def make_trainer(
    cfg: Config, run_root: str | Path, name: str = "run", probes: tuple = ()
) -> tuple[Trainer, RunStore]:
    """A Trainer over a new run directory, built as :func:`train` builds one but without
    live sinks, signal handlers or a final record: for tests and benchmarks that step a
    real run themselves (``trainer.step_once()``, ``trainer.fit()``) and close the store."""
    prepared = prepare(cfg)
    store = RunStore.create(run_root, name, cfg.to_yaml())
    return assemble(cfg, prepared, store.path, Sinks(durable=store), probes), store


class Trained(NamedTuple):
    run_dir: Path
    status: str  # finished, halted or interrupted (a crash raises)


def train(
    cfg: Config,
    run_root: str | Path = "runs",
    name: str = "run",
    resume: str | Path | None = None,
    argv: list[str] | None = None,
    live: Callable[[], list[LiveSink]] | None = None,
    manifest_extra: dict[str, Any] | None = None,
    evaluator: Callable[[Config], CheckpointEvaluator | None] | None = None,
) -> Trained:
    """Train one run (or resume one); returns its run directory and how it ended (the
    same on every rank). ``live`` makes the live
    sinks (the Prometheus exporter, the chat notifier) on rank 0 once the config and data
    have passed their checks, before the run directory exists; they are bound to the run
    and closed with it. ``manifest_extra`` adds fields to the manifest (``yoto sweep``
    tags its runs this way). ``evaluator`` makes rank 0's background few-shot evaluator
    (eval.harness; the CLI passes yoto.evals', the trainer never imports it)."""
    prepared = prepare(cfg)
    record = RecordRequest(run_root, name, resume, argv or [], manifest_extra or {})
    store, sinks = _open_record(cfg, prepared, record, live)
    run_dir = Path(distributed.broadcast_object(str(store.path) if store else None))
    trainer: Trainer | None = None
    try:
        trainer = assemble(cfg, prepared, run_dir, sinks)
        if evaluator is not None and prepared.info.is_main and cfg.eval.harness.every:
            trainer.evaluator = evaluator(cfg)
        status = _run(trainer, run_dir, resume=resume is not None, store=store)
    except BaseException as exc:
        _record_crash(exc, trainer, store, sinks)
        raise
    finally:
        eng.restore_torch_linear()  # ZeRO-3 swapped it for the whole process
        if trainer is not None:
            trainer.runner.detach()  # hooks off, the spectra worker stopped
            if trainer.evaluator is not None:
                trainer.evaluator.close(0.0)  # a crash does not wait for an evaluation
    if store is not None:
        _record_end(trainer, status, sinks, run_dir)
    distributed.barrier()
    return Trained(run_dir, status)


def _run(trainer: Trainer, run_dir: Path, resume: bool, store: RunStore | None) -> str:
    """Resume if asked, then train to the end or an agreed stop; returns the status."""
    cfg, info = trainer.cfg, trainer.info
    if resume:
        _resume(trainer, run_dir)
    trainer.event(
        EventKind.START,
        Severity.INFO,
        f"training on {info.world} rank(s), {info.device.type}, "
        f"{trainer.engine.module.num_params():,} non-embedding parameters",
        world=info.world,
        device=info.device.type,
        resumed=resume,
    )
    with _graceful_stop(trainer, store), contextlib.ExitStack() as stack:
        progress = Progress(
            cfg.train.steps, trainer.branch.step, enabled=info.is_main and cfg.log.progress
        )
        stack.callback(progress.close)
        return trainer.fit(progress)


def _record_crash(
    exc: BaseException, trainer: Trainer | None, store: RunStore | None, sinks: Sinks
) -> None:
    """The way out for an exception. Rank 0 first writes how the run ended into the
    manifest (crashed, interrupted, or, for a resume refused for bad input, the status the
    run had before); then checkpoints still sealing are handed in, the end event written
    and the sinks closed."""
    status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "crashed"
    refused = store is not None and isinstance(exc, YotoError) and store.previous_status
    if refused:  # a resume refused for bad input leaves the run as it was
        status = store.previous_status
    if store is not None:  # first: the launcher's SIGKILL may be seconds away
        with contextlib.suppress(Exception):
            store.mark_ended(status)
    if trainer is not None:
        with contextlib.suppress(Exception):
            trainer.finish_checkpoints()
    if store is None:
        return
    detail = (
        str(exc)  # its message is the whole story
        if isinstance(exc, RunFailed)
        else "".join(traceback.format_exception_only(type(exc), exc)).strip()
    )
    branch = trainer.branch if trainer is not None else Branch()
    sinks.write_event(
        Event(
            branch.step,
            branch.attempt,
            EventKind.END,
            Severity.WARNING if refused else Severity.CRITICAL,
            f"resume refused: {exc}" if refused else f"run {status}: {detail}",
            {"status": status},
        )
    )
    sinks.close(status)


def _record_end(trainer: Trainer, status: str, sinks: Sinks, run_dir: Path) -> None:
    """Rank 0, after a run that ended without an exception: the end event, the sinks
    closed, and the story told on the terminal."""
    trainer.event(
        EventKind.END,
        Severity.INFO,
        f"run {status} at step {trainer.branch.step}",
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


def describe_interventions(events: list[dict[str, Any]]) -> list[str]:
    """What happened to the run, in a few lines: faults, what caught them, what was done."""
    lines = []
    for e in events:
        kind, data = e.get("kind"), e.get("data", {})
        if kind == EventKind.FAULT_INJECTED:
            lines.append(f"step {e['step']}: {e['message']}")
        elif kind == EventKind.SPIKE and (
            data.get("persistent") or e.get("severity") == Severity.CRITICAL
        ):
            lines.append(f"step {e['step']}: detected: {e['message']}")
        elif kind in (EventKind.ROLLBACK, EventKind.HALT):
            lines.append(f"step {e['step']}: {e['message']}")
    return lines


@dataclass(frozen=True)
class RecordRequest:
    """Where and how :func:`train` records the run."""

    run_root: str | Path  # a new run directory goes under it
    name: str
    resume: str | Path | None  # or this run directory is reopened
    argv: list[str]  # the command line, for the manifest
    manifest_extra: dict[str, Any]  # more manifest fields (yoto sweep's tag)


def _open_record(
    cfg: Config,
    prepared: Prepared,
    record: RecordRequest,
    live: Callable[[], list[LiveSink]] | None,
) -> tuple[RunStore | None, Sinks]:
    """Rank 0: the live sinks (their ports bound now), then the run directory, new or
    reopened, and the live sinks told which run they serve. Other ranks write nothing."""
    if not prepared.info.is_main:
        return None, Sinks()
    live_sinks = live() if live is not None else []
    try:
        store = _open_store(cfg, prepared, record)
    except BaseException:
        for sink in live_sinks:
            sink.close("crashed")
        raise
    run = {
        "run": store.manifest["id"],
        "name": store.manifest.get("name", record.name),
        "dir": str(store.path),  # where a live sink may keep its own record (chat's outbox)
    }
    for sink in live_sinks:
        store.update_manifest(**sink.bind_run(run))
    return store, Sinks(durable=store, live=live_sinks)


def _open_store(cfg: Config, prepared: Prepared, record: RecordRequest) -> RunStore:
    info, model = prepared.info, prepared.model
    extra = {
        **record.manifest_extra,
        "world_size": info.world,
        "device": info.device.type,
        "argv": record.argv,
        "parameters": model.num_params(non_embedding=False),
        "non_embedding_parameters": model.num_params(),
        "data": prepared.corpus.token_counts(),
        "tokenizer": tokenizers.describe(prepared.tokenizer),
        # which targets yoto_val_loss counts (runs before this field: all of them)
        "val_loss_targets": "after the first seq_len // 2 tokens",
    }
    kwargs = {
        "flush_every_steps": cfg.log.flush_every_steps,
        "flush_every_seconds": cfg.log.flush_every_seconds,
    }
    if record.resume is not None:
        _same_tokenizer(record.resume, prepared.tokenizer)
        store = RunStore.reopen(record.resume, extra=extra, **kwargs)
        runstore.atomic_write_bytes(store.path / runstore.CONFIG, cfg.to_yaml().encode())
        return store
    store = RunStore.create(record.run_root, record.name, cfg.to_yaml(), extra=extra, **kwargs)
    kept = prepared.tokenizer.file_bytes()
    if kept is not None:  # resume, yoto sample and evaluation read this copy
        runstore.atomic_write_bytes(store.path / tokenizers.RUN_FILE, kept)
    return store


def _same_tokenizer(run_dir: str | Path, tok: tokenizers.Tokenizer) -> None:
    """A resume must tokenize as the run did: refused (nothing written) otherwise."""
    manifest = runstore.read_manifest(run_dir)
    then = manifest.get("tokenizer") or {"spec": "bytes", "digest": "bytes"}
    if then["digest"] != tok.digest:
        raise DataError(
            f"resume refused: {run_dir} trained with tokenizer {then['spec']!r} "
            f"({then['digest']}), but data.tokenizer is now {tok.spec!r} ({tok.digest}); "
            f"resume with data.tokenizer={Path(run_dir) / tokenizers.RUN_FILE} (the run's "
            "copy) or start a new run"
        )


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
    from_step = trainer.branch.step
    # steps after the checkpoint that are already recorded will be replayed: a new attempt
    replay = recorded is not None and recorded[1] > from_step
    if replay:
        trainer.branch.attempt = trainer.history.new_attempt(after=recorded[0])
    trainer.branch.attempt = distributed.broadcast_object(trainer.branch.attempt)
    trainer.history.saw_attempt(trainer.branch.attempt)
    where = f"checkpoint {chosen.tag}" if chosen else "the beginning (no usable checkpoint)"
    trainer.event(
        EventKind.RESUME,
        Severity.INFO if chosen else Severity.WARNING,
        f"resumed from {where}, attempt {trainer.branch.attempt}",
        checkpoint=chosen.tag if chosen else None,
        from_step=from_step,
        replayed_steps=(recorded[1] - from_step) if replay else 0,
        rejected=rejected,
        sampler_position=trainer.sampler.position,
    )


@contextlib.contextmanager
def _graceful_stop(trainer: Trainer, store: RunStore | None) -> Iterator[None]:
    """SIGTERM (scheduler preemption) or a first Ctrl-C: the manifest says 'interrupted'
    at once (a launcher's SIGKILL may follow within seconds, and a rank stuck in a
    collective with a dead peer never finishes its step), then finish the step,
    checkpoint and record the end. A second Ctrl-C stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum: int, frame: Any) -> None:
        if trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first = not trainer.stop_requested
        trainer.stop_requested = True
        if store is not None and first:
            # on its own thread: this handler may have interrupted a manifest write that
            # holds the manifest's lock on this very thread
            threading.Thread(
                target=store.mark_ended,
                args=("interrupted",),
                kwargs={"if_running": True},
                name="yoto-mark-ended",
            ).start()
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
