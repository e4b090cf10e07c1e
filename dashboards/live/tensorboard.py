"""TensorBoard: the run's scalars and events as TensorBoard event files.

A live :class:`~yoto.events.LiveSink`, beside the Prometheus exporter, for people whose
tools (Megatron, DeepSpeed, torchtitan, OLMo) already log to TensorBoard. It is on when
``live.tensorboard`` names a folder (``yoto train --tensorboard DIR``) and needs the
``tensorboard`` package (``pip install 'yoto[tensorboard]'``). Point TensorBoard at the
same folder: ``tensorboard --logdir DIR``.

Layout: one TensorBoard run per attempt of each yoto run::

    DIR/<run id>/attempt-0/events.out.tfevents...
    DIR/<run id>/attempt-1/...      after the first rollback

A rollback replays steps from its checkpoint; in one TensorBoard run the replayed steps
would be drawn over the abandoned ones. As separate runs the abandoned branch stays
visible and the retry is drawn beside it, which is how TensorBoard compares restarts.
The run id level keeps the runs of a sweep, or several ``yoto train`` into one DIR,
apart. The first time a process writes to an attempt it marks the first step it will
write (``SummaryWriter(purge_step=...)``): TensorBoard then drops what an earlier process
wrote there from that step on, so after ``yoto train --resume`` the steps a crash lost
are not drawn under their replay. In a new attempt's empty folder the mark is a no-op.

Tags are the catalog's series keys, written the TensorBoard way:

=====================================  ==============================================
series key (run directory, Prometheus)  TensorBoard tag
=====================================  ==============================================
``yoto_train_loss``                    ``yoto_train_loss``
``yoto_layer_grad_norm{layer="3"}``    ``yoto_layer_grad_norm/layer=3``
``yoto_val_loss{source="code"}``       ``yoto_val_loss/source=code``
``m{a="x",b="y"}``                     ``m/a=x,b=y``
=====================================  ==============================================

TensorBoard groups tags by what comes before the first ``/``, so a per-layer metric is
one section with a chart per layer, and the per-source validation losses one section
with a chart per source. Every layer is written (the exporter's ``layer_series_max`` is
for Prometheus' series count; an event file has no such limit). The global step is the
optimizer step. Each event (rollback, spike, checkpoint, ...) is a text summary under
``events/<kind>`` at its step, in its attempt's run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from yoto import catalog
from yoto.errors import ConfigError
from yoto.events import Event

log = logging.getLogger("yoto.live")

INSTALL_HINT = "pip install 'yoto[tensorboard]'"
EVENTS_TAG = "events"
# an event file is flushed when this many summaries are queued or this often, whichever is
# first: a step's few dozen scalars do not each touch the disk, and TensorBoard (which
# reloads every few seconds) is never more than a few seconds behind
_MAX_QUEUE = 1000
_FLUSH_SECONDS = 5


def tag_of(key: str) -> str:
    """The TensorBoard tag of a series key (see the module's table)."""
    name, labels = catalog.parse_series_key(key)
    if not labels:
        return name
    return name + "/" + ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def attempt_dir(root: Path, run_id: str, attempt: int) -> Path:
    return root / run_id / f"attempt-{attempt}"


def _summary_writer_class() -> type:
    try:
        import tensorboard  # noqa: F401  torch.utils.tensorboard writes through it
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError(
            f"live.tensorboard (--tensorboard) needs the tensorboard package: {INSTALL_HINT}, "
            "or leave live.tensorboard empty"
        ) from exc
    return SummaryWriter


class TensorBoardSink:
    """Writes each step's values as scalars and each event as text, one SummaryWriter
    per attempt, under ``root/<run id>/attempt-N`` once :meth:`bind_run` names the run."""

    def __init__(self, root: str | Path) -> None:
        self._writer_class = _summary_writer_class()
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"live.tensorboard={str(root)!r} is not a folder yoto can write: {exc}"
            ) from exc
        self.run_id: str | None = None
        self._writers: dict[int, Any] = {}

    # --- LiveSink ------------------------------------------------------------------------

    def bind_run(self, run: Mapping[str, str]) -> dict[str, Any]:
        self.run_id = run["run"]
        return {"tensorboard_dir": str(self.root / self.run_id)}

    def write_step(self, attempt: int, step: int, values: Mapping[str, float]) -> None:
        writer = self._writer(attempt, purge_from=step)
        for key, value in values.items():
            writer.add_scalar(tag_of(key), float(value), global_step=step)

    def write_event(self, event: Event) -> None:
        text = f"**{event.severity}** at step {event.step}: {event.message}"
        self._writer(event.attempt, purge_from=event.step + 1).add_text(
            f"{EVENTS_TAG}/{event.kind}", text, global_step=event.step, walltime=event.time
        )

    def write_records(
        self, table: str, attempt: int, step: int, rows: list[Mapping[str, Any]]
    ) -> None:
        pass  # spectra reach TensorBoard as their per-layer scalars in write_step

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self, status: str) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    # --- writers -------------------------------------------------------------------------

    def _writer(self, attempt: int, purge_from: int) -> Any:
        """The attempt's writer, made on first use; ``purge_from`` is the first step this
        process will write to it (a resume replays from there). Writers stay open until
        close(): a late event may still belong to an earlier attempt."""
        writer = self._writers.get(attempt)
        if writer is None:
            if self.run_id is None:
                raise RuntimeError("TensorBoardSink: bind_run() names the run before writing")
            path = attempt_dir(self.root, self.run_id, attempt)
            writer = self._writer_class(
                log_dir=str(path),
                purge_step=purge_from,
                max_queue=_MAX_QUEUE,
                flush_secs=_FLUSH_SECONDS,
            )
            self._writers[attempt] = writer
            log.info("TensorBoard: attempt %d of run %s in %s", attempt, self.run_id, path)
        return writer
