"""Runs the probes and detectors; moves each step's values to the host in one transfer.

Per step the loop calls, in order: ``begin_step`` (tells hook-based probes whether this is
one of their steps), ``on_micro_step`` after each backward (at the accumulation boundary
``take_summed``: what probes want summed over ranks rides in the loop's all-reduce of the
loss), ``on_step`` after the optimizer step, ``flush`` (the one device-to-host copy), then
``detect`` (host-side detectors -> verdicts). A probe that raises, directly or inside one
of its hooks, is isolated: its samples for that step are dropped, the error comes back as
a verdict (an event), and after ``max_failures`` failures in a row the probe is switched
off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from yoto import catalog
from yoto.events import EventKind, Reason, Severity

from .base import (
    Attaches,
    Carry,
    Detector,
    Finishes,
    Guarded,
    MicroStepContext,
    Probe,
    Record,
    Sample,
    StepContext,
    StepOutput,
    Summed,
    Verdict,
)


def _take_hook_error(probe: Probe) -> BaseException | None:
    return probe.guard.take() if isinstance(probe, Guarded) else None


class ProbeRunner:
    """Collects :class:`Sample` objects during a step; :meth:`flush` returns them as
    ``{series key: float}`` after a single device-to-host copy of all tensor values.

    The loop's own numbers (loss, grad norm, LR, ...) go through the same path, so a step
    costs one synchronisation whatever the number of probes.
    """

    def __init__(
        self,
        probes: Iterable[Probe] = (),
        detectors: Iterable[Detector] = (),
        max_failures: int = 3,
    ) -> None:
        self.probes = list(probes)
        self.detectors = list(detectors)
        self.max_failures = max_failures
        self.failures: dict[str, int] = {}  # in a row
        self.failed_total: dict[str, int] = {}
        self.disabled: set[str] = set()
        self._pending: list[tuple[str, float | torch.Tensor]] = []
        self._verdicts: list[Verdict] = []
        self._records: list[Record] = []
        self._carried: list[Carry] = []
        self._summed: list[Summed] = []
        self._step = 0

    # --- samples --------------------------------------------------------------------------

    def add(self, sample: Sample) -> None:
        metric = catalog.CATALOG.get(sample.name)
        if metric is None:
            raise KeyError(f"{sample.name!r} is not in the metric catalog (yoto/catalog.py)")
        if set(sample.labels) != set(metric.labels):
            raise ValueError(
                f"{sample.name} takes labels {metric.labels}, got {tuple(sample.labels)}"
            )
        self._pending.append((catalog.series_key(sample.name, dict(sample.labels)), sample.value))

    def extend(self, samples: Iterable[Sample]) -> None:
        for sample in samples:
            self.add(sample)

    # --- probes ---------------------------------------------------------------------------

    def _live(self, step: int) -> list[Probe]:
        return [p for p in self.probes if p.name not in self.disabled and step % p.every == 0]

    def attach(self, model: torch.nn.Module, engine: Any) -> None:
        for probe in self.probes:
            if isinstance(probe, Attaches):
                self._guarded(probe, lambda p=probe: p.attach(model, engine))

    def detach(self) -> None:
        for probe in self.probes:
            if isinstance(probe, Attaches):
                probe.detach()

    def begin_step(self, step: int) -> None:
        """``step`` is the optimizer step about to run (1-based)."""
        self._step = step
        self._summed = []  # a step cut short (an exception) leaves nothing behind
        for probe in self.probes:
            if isinstance(probe, Attaches) and probe.name not in self.disabled:
                probe.active(step if step % probe.every == 0 else -1)

    def idle(self) -> None:
        """Disarm every hook-based probe until the next ``begin_step``: a forward or a
        backward outside training (spike forensics, a diagnosis's replay) is not seen."""
        for probe in self.probes:
            if isinstance(probe, Attaches) and probe.name not in self.disabled:
                probe.active(-1)

    def on_micro_step(self, ctx: MicroStepContext) -> None:
        for probe in self._live(ctx.step):
            self._guarded(probe, lambda p=probe: self._collect(p, p.on_micro_step(ctx)))

    def on_step(self, ctx: StepContext) -> None:
        """A probe's step succeeds when neither its hooks nor its ``on_step`` raised; only
        then does its run of failures end. A probe whose hooks failed is not asked for
        samples (its accumulators may be half-filled)."""
        for probe in self._live(ctx.step):
            hook_error = _take_hook_error(probe)
            if hook_error is not None:
                self._failed(probe, hook_error)
                continue
            if self._guarded(probe, lambda p=probe: self._collect(p, p.on_step(ctx))):
                self.failures[probe.name] = 0
        for probe in self.probes:  # hook errors of probes that were not live this step
            error = _take_hook_error(probe)
            if error is not None and probe.name not in self.disabled:
                self._failed(probe, error)

    def _collect(self, probe: Probe, items: Iterable[StepOutput]) -> None:
        items = list(items)  # a generator raising half-way drops all of its samples
        self.extend(i for i in items if isinstance(i, Sample))
        self._verdicts.extend(i for i in items if isinstance(i, Verdict))
        self._records.extend(i for i in items if isinstance(i, Record))
        self._carried.extend(i for i in items if isinstance(i, Carry))
        self._summed.extend(i for i in items if isinstance(i, Summed))

    def finish(self, timeout: float | None) -> None:
        """End of a run: probes with work in flight (spectra) may hand it in now."""
        for probe in self.probes:
            if isinstance(probe, Finishes) and probe.name not in self.disabled:
                self._guarded(probe, lambda p=probe: self._collect(p, p.finish(timeout)))

    def take_summed(self) -> list[Summed]:
        """The tensors probes asked to have summed over ranks this step (the loop adds
        them to its all-reduce at the accumulation boundary and hands the sums back)."""
        summed, self._summed = self._summed, []
        return summed

    def take_records(self) -> list[Record]:
        records, self._records = self._records, []
        return records

    def _guarded(self, probe: Probe, call: Callable[[], Any]) -> bool:
        try:
            call()
        except Exception as exc:
            self._failed(probe, exc)
            return False
        return True

    def _failed(self, probe: Probe, exc: BaseException) -> None:
        count = self.failures.get(probe.name, 0) + 1
        self.failures[probe.name] = count
        self.failed_total[probe.name] = self.failed_total.get(probe.name, 0) + 1
        off = count >= self.max_failures
        if off:
            self.disabled.add(probe.name)
            if isinstance(probe, Attaches):
                probe.detach()
        what = f"{type(exc).__name__}: {exc}"
        self._verdicts.append(
            Verdict(
                EventKind.PROBE,
                Severity.WARNING,
                self._step,
                self._step,
                f"probe {probe.name} failed ({what})"
                + (f"; disabled after {count} failures in a row" if off else "; the step goes on"),
                {"probe": probe.name, "error": what, "failures": count, "disabled": off},
                Reason.PROBE_FAILURE,
            )
        )

    # --- the one transfer -----------------------------------------------------------------

    def flush(self, control: torch.Tensor | None = None) -> tuple[dict[str, float], list[float]]:
        """All pending values as floats, plus ``control`` (a 1-d tensor of flags the loop
        needs on the host, e.g. agreed stop/rollback codes) in the same transfer. Tensors
        probes carried (:class:`Carry`) ride along and are handed back to them here."""
        pending, self._pending = self._pending, []
        carried, self._carried = self._carried, []
        tensors = [(i, v) for i, (_, v) in enumerate(pending) if isinstance(v, torch.Tensor)]
        parts = [v.detach().reshape(-1)[:1].to(torch.float64) for _, v in tensors]
        sizes = [c.tensor.numel() for c in carried]
        parts += [c.tensor.detach().reshape(-1).to(torch.float64) for c in carried]
        n_control = 0
        if control is not None:
            parts.append(control.detach().reshape(-1).to(torch.float64))
            n_control = control.numel()
        if parts:
            device = parts[0].device
            host = torch.cat([p.to(device) for p in parts]).cpu().tolist()
        else:
            host = []
        values: dict[str, float] = {}
        for key, value in pending:
            values[key] = float(value) if not isinstance(value, torch.Tensor) else math.nan
        for (i, _), value in zip(tensors, host, strict=False):
            values[pending[i][0]] = value
        at = len(tensors)
        for carry, size in zip(carried, sizes, strict=True):
            carry.receive(host[at : at + size])
            at += size
        controls = host[len(host) - n_control :] if n_control else []
        return values, controls

    # --- host side ------------------------------------------------------------------------

    def detect(self, step: int, values: dict[str, float]) -> list[Verdict]:
        """Run the detectors on the step's host values; their own metrics (counters,
        scores) are added to ``values``. Returns this step's verdicts, probe failures
        included."""
        verdicts, self._verdicts = self._verdicts, []
        for detector in self.detectors:
            verdicts.extend(detector.observe(step, values))
            for sample in detector.metrics():
                values[catalog.series_key(sample.name, dict(sample.labels))] = float(sample.value)
        for name, count in self.failed_total.items():
            values[catalog.PROBE_FAILURES.key(probe=name)] = float(count)
        return verdicts

    def state_dict(self) -> dict[str, Any]:
        return {
            "probes": {p.name: p.state_dict() for p in self.probes},
            "detectors": {d.name: d.state_dict() for d in self.detectors},
            "failed_total": dict(self.failed_total),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.failed_total = dict(state.get("failed_total", {}))
        for group, items in (("probes", self.probes), ("detectors", self.detectors)):
            saved = state.get(group, {})
            for item in items:
                if item.name in saved:
                    item.load_state_dict(saved[item.name])
