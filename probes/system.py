"""Per-rank health (step time, data wait, peak memory; the straggler verdict) and system
health (process memory, CUDA allocator, GPU power/temperature/utilisation/clock).

**Per-rank health.** The loop keeps a :class:`StepClock` per rank (trainer/loop.py): the
rank's *own* time in each step, the parts no other rank is waited for: fetching the batch
from the sampler, the host-to-device copy, and the forward passes. Backward is left out
because it ends in the gradient reduction, where every rank waits for the slowest: timed
whole, a straggler and its waiting peers would show the same step time. (At ZeRO-3 the
forward gathers parameters, so a slow rank also makes the others' forwards wait there: the
contrast is weaker; data wait stays per rank at every stage.) On CUDA the forwards are
timed by CUDA events on the compute stream, read once they have completed (never waited
for: a step still running counts in the next interval); on the CPU by the wall clock.

:class:`RankHealthProbe` runs every ``probes.system.every`` steps (the same steps on every
rank): it takes each rank's mean own time and data wait over the steps since its last
interval, with the peak CUDA memory allocated (``torch.cuda.max_memory_allocated``, a host
call), and makes **one all-gather** of those three numbers per rank. That all-gather is
a collective, a sync point of all ranks, once per interval (none with one rank). Its result
stays a tensor: it reaches the host in the runner's one transfer of the step
(:class:`~yoto.probes.base.Carry`), so the interval adds no device-to-host copy of its own.

:class:`StragglerDetector` (host side, after that transfer) compares every rank with the
median: a rank slower than ``median x (1 + straggler_margin)`` for ``straggler_intervals``
intervals in a row is a straggler, one ``straggler`` verdict (warning, class
``straggler``, onset the first slow interval) and an info verdict when it is back within
the margin. Ranks equal within the margin never raise it. Every rank judges the same
gathered numbers, so every rank reaches the same verdicts.

Emits, every ``probes.system.every`` steps (per-rank series: every rank while the world has
at most ``rank_series_max`` ranks, else the slowest that many of the interval, stragglers
first; the verdict judges all):

| metric | type | labels | meaning |
|---|---|---|---|
| yoto_rank_step_seconds | gauge | rank | the rank's own time per step (mean over the interval) |
| yoto_rank_data_wait_seconds | gauge | rank | its batch fetch + host-to-device copy per step |
| yoto_rank_peak_memory_bytes | gauge | rank | its peak CUDA memory allocated (CUDA only) |
| yoto_rank_median_step_seconds | gauge | | median over ranks of yoto_rank_step_seconds |
| yoto_stragglers | gauge | | ranks flagged as stragglers and still slow |

**System health.** :class:`SystemHealthProbe` runs every step on rank 0 (the rank whose
values the record keeps), with host calls only (no device sync):

| metric | type | when | meaning |
|---|---|---|---|
| yoto_process_resident_memory_bytes | gauge | always | the process' RSS (psutil) |
| yoto_cuda_memory_allocated_bytes | gauge | CUDA | memory held by tensors |
| yoto_cuda_memory_reserved_bytes | gauge | CUDA | memory held by the caching allocator |
| yoto_cuda_memory_peak_bytes | gauge | CUDA | peak memory held by tensors |
| yoto_cuda_alloc_retries_total | counter | CUDA | cudaMalloc retries (read each interval) |
| yoto_gpu_power_watts | gauge | NVML | power draw |
| yoto_gpu_temperature_celsius | gauge | NVML | core temperature |
| yoto_gpu_utilization_ratio | gauge | NVML | fraction of time a kernel ran |
| yoto_gpu_sm_clock_hertz | gauge | NVML | SM clock |

The GPU readings come from :class:`NvmlSampler`, a daemon thread that queries NVML every
``probes.system.nvml_interval_seconds`` into a dict; the step only copies the latest dict
(never an NVML call on the step path). No ``nvidia-ml-py`` (``pip install 'yoto[gpu]'``),
no driver or no GPU: no GPU readings, and no error.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import torch
import torch.distributed as dist

from yoto import catalog
from yoto.config import SystemConfig
from yoto.events import EventKind, Reason, Severity

from .base import Carry, MicroStepContext, Sample, StepContext, StepOutput, Verdict

_FIELDS = 3  # per rank in the all-gather: own step seconds, data wait seconds, peak bytes


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


# --- the rank's own time per step ------------------------------------------------------------


class StepClock:
    """The rank's own time per step, kept by the training loop (trainer/loop.py) and read
    by :class:`RankHealthProbe` as totals (it takes differences between its intervals).

    The loop calls :meth:`data` with the wall time of each batch fetch and copy,
    :meth:`forward_begin` / :meth:`forward_end` around each forward pass, and
    :meth:`step_done` once per optimizer step trained (replays of a diagnosis are not
    counted). Each call is a ``perf_counter`` read or, on CUDA, one event recorded on the
    current stream: no host read of the device, no sync point. CUDA events are read once
    their ``query()`` says they completed, which the step's own transfer guarantees for
    every step before the current one.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.steps = 0
        self.data_seconds = 0.0
        self.busy_seconds = 0.0  # data, plus the forwards timed on the host (CPU)
        self._events: deque[tuple[Any, Any]] = deque()  # CUDA forwards not read yet

    def data(self, seconds: float) -> None:
        self.data_seconds += seconds
        self.busy_seconds += seconds

    def forward_begin(self) -> Any:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return start
        return time.perf_counter()

    def forward_end(self, mark: Any) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((mark, end))
        else:
            self.busy_seconds += time.perf_counter() - mark

    def step_done(self) -> None:
        self.steps += 1
        self._harvest()

    def _harvest(self) -> None:
        """Add the completed CUDA forwards (in stream order: stop at the first pending)."""
        while self._events and self._events[0][1].query():
            start, end = self._events.popleft()
            self.busy_seconds += start.elapsed_time(end) / 1000.0

    def totals(self) -> tuple[int, float, float]:
        """(steps, own seconds, data wait seconds) since the clock began."""
        self._harvest()
        return self.steps, self.busy_seconds, self.data_seconds


# --- per-rank health --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Interval:
    """Every rank's numbers for one interval, on the host (index = rank)."""

    step: int  # the step the all-gather ran at
    steps: int  # optimizer steps the means are over
    step_seconds: tuple[float, ...]
    data_wait_seconds: tuple[float, ...]
    peak_memory_bytes: tuple[float, ...]  # NaN off CUDA


class RankHealthProbe:
    """Per-rank step time, data wait and peak memory, one all-gather per interval; see the
    module docstring. Its numbers reach the host in the step's one transfer and wait there
    for :class:`StragglerDetector` (:meth:`take`)."""

    name = "rank_health"

    def __init__(self, cfg: SystemConfig) -> None:
        self.every = cfg.every
        self.gathers = 0  # all-gathers made (collectives this probe issued)
        self._last = (0, 0.0, 0.0)  # the clock's totals at the last interval
        self._received: Interval | None = None

    def on_micro_step(self, ctx: MicroStepContext) -> Iterable[Sample]:
        return ()

    def on_step(self, ctx: StepContext) -> Iterable[StepOutput]:
        """At an interval step: the means since the last interval and ONE all-gather of
        them (a collective: every rank gets here at the same step). Nothing in front of
        the collective may raise, or the ranks would part ways: a value that cannot be
        read is sent as NaN."""
        clock = ctx.clock
        if clock is None:
            return ()
        steps, busy, data = clock.totals()
        n = steps - self._last[0]
        if n <= 0:  # the same on every rank: they train the same steps
            return ()
        own, wait = (busy - self._last[1]) / n, (data - self._last[2]) / n
        self._last = (steps, busy, data)
        device = ctx.loss.device
        peak = math.nan
        if device.type == "cuda":
            try:
                peak = float(torch.cuda.max_memory_allocated(device))
            except Exception:  # never before the collective
                peak = math.nan
        mine = [own, wait, peak]
        receive = self._receiver(ctx.step, n, ctx.world)
        if ctx.world <= 1:
            receive(mine)  # no collective, no tensor
            return ()
        local = torch.tensor(mine, dtype=torch.float64)
        if device.type == "cuda":  # pinned: the copy up is asynchronous, no stream sync
            local = local.pin_memory().to(device, non_blocking=True)
        gathered = torch.empty(ctx.world * _FIELDS, dtype=torch.float64, device=device)
        dist.all_gather(list(gathered.view(ctx.world, _FIELDS).unbind(0)), local)
        self.gathers += 1
        return (Carry(gathered, receive),)

    def _receiver(self, step: int, steps: int, world: int):
        def receive(host: Sequence[float]) -> None:
            rows = [host[i * _FIELDS : (i + 1) * _FIELDS] for i in range(world)]
            self._received = Interval(
                step,
                steps,
                tuple(r[0] for r in rows),
                tuple(r[1] for r in rows),
                tuple(r[2] for r in rows),
            )

        return receive

    def take(self, step: int) -> Interval | None:
        """The interval gathered at ``step``, once (None on other steps)."""
        got = self._received
        if got is None or got.step != step:
            return None
        self._received = None
        return got

    def state_dict(self) -> dict[str, Any]:
        # nothing to keep: the means are differences of this process' clock, which a
        # rollback does not rewind and a resume starts afresh with the probe
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def shown_ranks(times: Sequence[float], flagged: Iterable[int], limit: int) -> list[int]:
    """The ranks whose series are recorded: all of them up to ``limit``; else the flagged
    ones, then the slowest others, ``limit`` in all (ties: the lower rank)."""
    if len(times) <= limit:
        return list(range(len(times)))
    flagged = set(flagged)
    order = sorted(range(len(times)), key=lambda r: (r not in flagged, -_finite(times[r]), r))
    return sorted(order[:limit])


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


class StragglerDetector:
    """The straggler verdict (host side); see the module docstring. Its state (the run of
    slow intervals of each rank, the flagged ranks) is about the machines, not the model:
    a resume takes it from the checkpoint, a rollback keeps the live one (a detector that
    has judged intervals in this process is newer than any checkpoint), so a straggler is
    neither forgotten nor paged twice by a rollback."""

    name = "stragglers"

    def __init__(self, cfg: SystemConfig, health: RankHealthProbe | None = None) -> None:
        self.margin = cfg.straggler_margin
        self.intervals = cfg.straggler_intervals
        self.series_max = cfg.rank_series_max
        self.health = health
        self.slow: dict[int, int] = {}  # rank -> slow intervals in a row
        self.onset: dict[int, int] = {}  # rank -> step of the first of them
        self.flagged: set[int] = set()
        self.judged = 0  # intervals judged by this process
        self._samples: list[Sample] = []

    def observe(self, step: int, values: Mapping[str, float]) -> Iterable[Verdict]:
        self._samples = []
        interval = self.health.take(step) if self.health is not None else None
        if interval is None:
            return []
        verdicts = self.judge(step, interval.step_seconds, interval.data_wait_seconds)
        self._samples = self._series(interval)
        return verdicts

    def judge(
        self, step: int, times: Sequence[float], waits: Sequence[float] | None = None
    ) -> list[Verdict]:
        """One interval's step time per rank (index = rank) -> this interval's verdicts."""
        self.judged += 1
        finite = [t for t in times if math.isfinite(t)]
        if not finite:
            return []
        median = statistics.median(finite)
        limit = median * (1.0 + self.margin)
        verdicts = []
        for rank, seconds in enumerate(times):
            if math.isfinite(seconds) and median > 0 and seconds > limit:
                self.slow[rank] = self.slow.get(rank, 0) + 1
                self.onset.setdefault(rank, step)
                if self.slow[rank] >= self.intervals and rank not in self.flagged:
                    self.flagged.add(rank)
                    wait = waits[rank] if waits is not None else math.nan
                    verdicts.append(self._flag(step, rank, seconds, median, wait))
                continue
            if rank in self.flagged:
                verdicts.append(self._cleared(step, rank, seconds, median))
            self.flagged.discard(rank)
            self.slow.pop(rank, None)
            self.onset.pop(rank, None)
        return verdicts

    def _flag(self, step: int, rank: int, seconds: float, median: float, wait: float) -> Verdict:
        slowdown = seconds / median
        return Verdict(
            EventKind.STRAGGLER,
            Severity.WARNING,
            step,
            self.onset[rank],
            f"rank {rank} is a straggler: {seconds * 1000:.1f} ms of its own per step, "
            f"{slowdown:.2f}x the median {median * 1000:.1f} ms, for {self.slow[rank]} "
            f"intervals since step {self.onset[rank]} (data wait {wait * 1000:.1f} ms)",
            {
                "rank": rank,
                "step_seconds": seconds,
                "median_seconds": median,
                "slowdown": slowdown,
                "data_wait_seconds": wait,
                "intervals": self.slow[rank],
                "margin": self.margin,
            },
            Reason.STRAGGLER,
        )

    def _cleared(self, step: int, rank: int, seconds: float, median: float) -> Verdict:
        return Verdict(
            EventKind.STRAGGLER,
            Severity.INFO,
            step,
            self.onset.get(rank, step),
            f"rank {rank} is no straggler any more: {seconds * 1000:.1f} ms per step, median "
            f"{median * 1000:.1f} ms",
            {"rank": rank, "step_seconds": seconds, "median_seconds": median, "cleared": True},
            None,  # news, no action
        )

    def _series(self, interval: Interval) -> list[Sample]:
        times = interval.step_seconds
        finite = [t for t in times if math.isfinite(t)]
        out = [Sample(catalog.STRAGGLERS.name, float(len(self.flagged)))]
        if finite:
            out.append(Sample(catalog.RANK_MEDIAN_STEP.name, statistics.median(finite)))
        for rank in shown_ranks(times, self.flagged, self.series_max):
            labels = {"rank": str(rank)}
            for metric, column in (
                (catalog.RANK_STEP, interval.step_seconds),
                (catalog.RANK_DATA_WAIT, interval.data_wait_seconds),
                (catalog.RANK_PEAK_MEMORY, interval.peak_memory_bytes),
            ):
                if math.isfinite(column[rank]):
                    out.append(Sample(metric.name, column[rank], labels))
        return out

    def metrics(self) -> Iterable[Sample]:
        return list(self._samples)

    def state_dict(self) -> dict[str, Any]:
        return {
            "slow": sorted(self.slow.items()),
            "onset": sorted(self.onset.items()),
            "flagged": sorted(self.flagged),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.judged:  # a rollback: what this process saw is newer than the checkpoint
            return
        self.slow = {int(r): int(n) for r, n in state.get("slow", [])}
        self.onset = {int(r): int(s) for r, s in state.get("onset", [])}
        self.flagged = {int(r) for r in state.get("flagged", [])}


# --- system health ----------------------------------------------------------------------------


def _nvml_handle(nvml: Any, index: int) -> Any:
    """The NVML handle of CUDA device ``index``: by its UUID (NVML counts every GPU of the
    machine, CUDA only the visible ones, maybe in another order), else by position in
    CUDA_VISIBLE_DEVICES, else by index."""
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:
        pass
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
    if index < len(visible):
        if visible[index].isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(visible[index]))
        return nvml.nvmlDeviceGetHandleByUUID(visible[index])
    return nvml.nvmlDeviceGetHandleByIndex(index)


class NvmlSampler:
    """GPU power, temperature, utilisation and SM clock from NVML, read by a daemon thread
    every ``interval`` seconds into a dict (series key -> value); :meth:`latest` is all a
    step does (a dict copy under a lock). Each reading a GPU does not support is left out.

    :meth:`start` returns None, without raising, when NVML cannot be used: ``pynvml``
    (package ``nvidia-ml-py``) not installed, no driver, no such GPU."""

    def __init__(self, nvml: Any, handle: Any, interval: float) -> None:
        self._nvml, self._handle, self.interval = nvml, handle, interval
        self._lock = threading.Lock()
        self._values: dict[str, float] = {}
        self.samples = 0  # readings taken (tests, health)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="yoto-nvml", daemon=True)

    @classmethod
    def start(cls, index: int, interval: float = 1.0) -> NvmlSampler | None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded, ...
            return None
        try:
            handle = _nvml_handle(pynvml, index)
        except Exception:
            pynvml.nvmlShutdown()
            return None
        sampler = cls(pynvml, handle, interval)
        sampler._thread.start()
        return sampler

    def _read(self) -> dict[str, float]:
        nvml, h = self._nvml, self._handle
        readings = (
            (catalog.GPU_POWER, lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),  # mW
            (
                catalog.GPU_TEMPERATURE,
                lambda: float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)),
            ),
            (catalog.GPU_UTILIZATION, lambda: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0),
            (
                catalog.GPU_SM_CLOCK,
                lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM) * 1e6,  # MHz
            ),
        )
        out = {}
        for metric, read in readings:
            try:
                out[metric.name] = float(read())
            except Exception:  # not supported on this GPU, or a transient NVML error
                continue
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            values = self._read()
            with self._lock:
                self._values = values
                self.samples += 1
            self._stop.wait(self.interval)

    def latest(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


class SystemHealthProbe:
    """Process and device memory every step, GPU readings from NVML; see the module
    docstring. Host calls only: psutil's RSS (a read of /proc), the caching allocator's
    counters, the NVML thread's latest dict; ``torch.cuda.memory_stats`` (a larger dict)
    once per ``probes.system.every`` steps. On ranks other than 0 it does nothing (only
    rank 0's values are recorded)."""

    name = "system"
    every = 1

    def __init__(self, cfg: SystemConfig) -> None:
        self.stats_every = cfg.every
        self.nvml_interval = cfg.nvml_interval_seconds
        self._process = psutil.Process()
        self.nvml: NvmlSampler | None = None
        self._retries: float | None = None

    # Attaches: the NVML thread starts once the engine exists (before the first step: its
    # nvmlInit is never on a step's path) and stops with the run's hooks (runner.detach)
    def attach(self, model: torch.nn.Module, engine: Any) -> None:
        device = getattr(engine, "device", None)
        if device is None:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
        device = torch.device(device)
        if device.type == "cuda" and _is_main() and self.nvml is None:
            index = device.index if device.index is not None else torch.cuda.current_device()
            self.nvml = NvmlSampler.start(index, self.nvml_interval)

    def active(self, step: int) -> None:
        pass

    def detach(self) -> None:
        if self.nvml is not None:
            self.nvml.close()
            self.nvml = None

    def on_micro_step(self, ctx: MicroStepContext) -> Iterable[Sample]:
        return ()

    def on_step(self, ctx: StepContext) -> Iterable[Sample]:
        if not _is_main():
            return []
        out = [Sample(catalog.PROCESS_RSS.name, float(self._process.memory_info().rss))]
        device = ctx.loss.device
        if device.type != "cuda":
            return out
        out += [
            Sample(catalog.CUDA_ALLOCATED.name, float(torch.cuda.memory_allocated(device))),
            Sample(catalog.CUDA_RESERVED.name, float(torch.cuda.memory_reserved(device))),
            Sample(catalog.CUDA_PEAK.name, float(torch.cuda.max_memory_allocated(device))),
        ]
        if self._retries is None or ctx.step % self.stats_every == 0:
            stats = torch.cuda.memory_stats(device)
            self._retries = float(stats.get("num_alloc_retries", 0))
        out.append(Sample(catalog.CUDA_ALLOC_RETRIES.name, self._retries))
        if self.nvml is not None:
            out += [Sample(name, value) for name, value in self.nvml.latest().items()]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
