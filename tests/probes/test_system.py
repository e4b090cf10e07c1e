"""Per-rank health and system health (probes/system.py): the straggler detector on
synthetic numbers, the interval means, the runner's carried transfer, the exporter's rank
series, the slow_rank fault, system health on every step's record, NVML absent; and two
CPU ranks under torchrun, one made slow on purpose: one all-gather per interval, and the
straggler verdict for the slow rank only."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist

from tests.helpers import (
    FAST,
    ROOT,
    counting_host_reads,
    subprocess_env,
    torchrun,
    train_in_process,
)
from yoto import catalog, runstore
from yoto.config import PolicyConfig, SystemConfig
from yoto.dashboards.live.exporter import Exporter
from yoto.events import EventKind, Reason, Severity
from yoto.probes import system
from yoto.probes.base import Carry, Sample, StepContext
from yoto.probes.runner import ProbeRunner
from yoto.probes.system import (
    NvmlSampler,
    RankHealthProbe,
    StepClock,
    StragglerDetector,
    SystemHealthProbe,
    shown_ranks,
)
from yoto.trainer.faults import FaultInjector, FaultKind, parse_fault
from yoto.trainer.policy import Action, Policy

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def detector(**kw) -> StragglerDetector:
    return StragglerDetector(SystemConfig(**kw))


def feed(det: StragglerDetector, rows: list[list[float]], every: int = 10) -> list:
    """Intervals of step times (one list per interval, index = rank) -> all verdicts."""
    out = []
    for i, times in enumerate(rows, start=1):
        out += det.judge(i * every, times)
    return out


# --- the detector, on synthetic numbers --------------------------------------------------------


def test_a_rank_past_the_margin_for_n_intervals_is_a_straggler() -> None:
    det = detector(straggler_margin=0.2, straggler_intervals=3)
    slow = [1.0, 1.0, 1.0, 1.3]  # rank 3 at 1.3x the median (1.0)
    assert det.judge(10, slow) == [] and det.judge(20, slow) == []
    [v] = det.judge(30, slow)
    assert (v.kind, v.reason, v.severity) == (
        EventKind.STRAGGLER,
        Reason.STRAGGLER,
        Severity.WARNING,
    )
    assert (v.step, v.onset) == (30, 10)  # onset: the first slow interval
    assert v.data["rank"] == 3 and v.data["intervals"] == 3
    assert v.data["slowdown"] == pytest.approx(1.3) and v.data["median_seconds"] == 1.0
    assert det.judge(40, slow) == []  # once per stretch, not once per interval
    assert det.flagged == {3}


def test_within_the_margin_is_never_a_straggler() -> None:
    det = detector(straggler_margin=0.2, straggler_intervals=1)
    assert feed(det, [[1.0, 1.0, 1.19]] * 20) == []  # 19% slower: inside the margin
    assert feed(det, [[0.05, 0.05, 0.05, 0.05]] * 20) == []  # equal ranks
    assert feed(det, [[0.0, 0.0]] * 5) == []  # nothing timed
    assert feed(det, [[0.7]] * 20) == []  # one rank is its own median
    assert det.judge(1, [1.0, 1.21, 1.0])[0].data["rank"] == 1  # the margin itself works


def test_an_interval_back_within_the_margin_restarts_the_count() -> None:
    det = detector(straggler_margin=0.2, straggler_intervals=3)
    slow, ok = [1.0, 2.0, 1.0], [1.0, 1.1, 1.0]
    assert feed(det, [slow, slow, ok, slow, slow]) == []
    [v] = det.judge(60, slow)
    assert v.onset == 40  # the count began again at the fourth interval


def test_a_straggler_that_recovers_is_news_and_must_stay_slow_again_to_return() -> None:
    det = detector(straggler_margin=0.2, straggler_intervals=2)
    slow, ok = [1.0, 2.0, 1.0], [1.0, 1.0, 1.0]
    [flag] = feed(det, [slow, slow])
    assert flag.reason == Reason.STRAGGLER and det.flagged == {1}
    [back] = det.judge(30, ok)
    assert back.kind == EventKind.STRAGGLER and back.reason is None  # no action
    assert back.severity == Severity.INFO and back.data["rank"] == 1
    assert det.flagged == set() and det.slow == {}
    assert det.judge(40, slow) == []
    [again] = det.judge(50, slow)
    assert again.onset == 40


def test_the_detector_state_survives_a_checkpoint() -> None:
    slow = [1.0, 1.0, 3.0]
    det = detector(straggler_intervals=3)
    feed(det, [slow, slow])
    saved = det.state_dict()
    restored = detector(straggler_intervals=3)
    restored.load_state_dict(saved)
    [v] = restored.judge(30, slow)  # the third interval in a row, across the checkpoint
    assert v.onset == 10 and v.data["rank"] == 2
    again = detector(straggler_intervals=3)
    again.load_state_dict(restored.state_dict())
    assert again.judge(40, slow) == []  # flagged already: no second verdict after a resume
    assert again.flagged == {2}


def test_a_rollback_keeps_the_live_state() -> None:
    """The machines do not roll back with the model: a detector that has judged intervals
    keeps its own state when a rollback restores an older checkpoint's."""
    slow = [1.0, 1.0, 3.0]
    det = detector(straggler_intervals=2)
    old = det.state_dict()  # the checkpoint, before the rank was slow
    [v] = feed(det, [slow, slow])
    assert v.data["rank"] == 2
    det.load_state_dict(old)  # the rollback
    assert det.flagged == {2} and det.judge(30, slow) == []  # not paged a second time


def test_a_straggler_is_its_own_page_not_an_instability() -> None:
    """Its warning event pages (chat; YotoStragglerRank in Prometheus); the policy takes no
    action by default, so no instability episode opens for a slow rank."""
    assert Policy(PolicyConfig()).action_for(Reason.STRAGGLER) == Action.NONE


def test_per_rank_series_are_capped_to_the_slowest_ranks() -> None:
    times = [0.1] * 40
    times[7], times[30], times[2] = 0.5, 0.4, 0.3
    assert shown_ranks(times, flagged=(), limit=3) == [2, 7, 30]
    assert shown_ranks(times, flagged={11}, limit=3) == [7, 11, 30]  # a straggler first
    assert shown_ranks([0.1, 0.2], flagged=(), limit=3) == [0, 1]


# --- the probe's interval means, with one rank (no collective) ---------------------------------


def ctx(step: int, clock: StepClock, world: int = 1) -> StepContext:
    loss = torch.zeros(())
    return StepContext(step, 0, 0, 8, 4, 1, world, 16, loss, None, 1e-3, None, clock)


def test_the_interval_is_the_mean_over_its_steps_and_reaches_the_detector() -> None:
    cfg = SystemConfig(every=2)
    probe = RankHealthProbe(cfg)
    det = StragglerDetector(cfg, probe)
    clock = StepClock("cpu")
    for step, wait in enumerate((0.2, 0.4, 1.0, 3.0), start=1):
        clock.data(wait)  # data wait counts in the rank's own time too
        clock.step_done()
        if step % cfg.every == 0:
            assert list(probe.on_step(ctx(step, clock))) == []  # one rank: nothing to carry
            det.observe(step, {})
            got = {s.name: s.value for s in det.metrics()}
            mean = (0.2 + 0.4) / 2 if step == 2 else (1.0 + 3.0) / 2
            assert got[catalog.RANK_STEP.name] == pytest.approx(mean)
            assert got[catalog.RANK_DATA_WAIT.name] == pytest.approx(mean)
            assert got[catalog.RANK_MEDIAN_STEP.name] == pytest.approx(mean)
            assert got[catalog.STRAGGLERS.name] == 0
            assert catalog.RANK_PEAK_MEMORY.name not in got  # CUDA only
            assert {s.labels.get("rank") for s in det.metrics() if s.labels} == {"0"}
        else:
            det.observe(step, {})
            assert list(det.metrics()) == []  # per-rank series only at interval steps
    assert probe.gathers == 0


def test_forwards_are_timed_on_the_host_off_cuda() -> None:
    clock = StepClock("cpu")
    mark = clock.forward_begin()
    clock.forward_end(mark)
    clock.step_done()
    steps, own, wait = clock.totals()
    assert steps == 1 and own > 0 and wait == 0


# --- the runner carries a probe's tensor in its one transfer ------------------------------------


class _Carrier:
    name, every = "carrier", 1

    def __init__(self) -> None:
        self.got: list[float] | None = None

    def on_micro_step(self, ctx):
        return ()

    def on_step(self, ctx):
        yield Sample(catalog.GRAD_NORM.name, torch.tensor(2.5))
        yield Carry(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), self.receive)

    def receive(self, values: list[float]) -> None:
        self.got = values

    def state_dict(self):
        return {}

    def load_state_dict(self, state) -> None:
        pass


def _flush_reads(runner: ProbeRunner, probe_step: bool) -> tuple[Counter, dict, list]:
    runner.add(Sample(catalog.TRAIN_LOSS.name, torch.tensor(3.0)))
    if probe_step:
        runner.on_step(ctx(1, StepClock("cpu")))
    counts: Counter = Counter()
    with counting_host_reads(counts):
        values, flags = runner.flush(torch.tensor([1.0, 0.0]))
    return counts, values, flags


def test_a_carried_tensor_comes_back_in_the_steps_one_transfer() -> None:
    carrier = _Carrier()
    runner = ProbeRunner([carrier])
    counts, values, flags = _flush_reads(runner, probe_step=True)
    assert carrier.got == [1.0, 2.0, 3.0, 4.0]
    assert values[catalog.TRAIN_LOSS.name] == 3.0 and values[catalog.GRAD_NORM.name] == 2.5
    assert flags == [1.0, 0.0]  # the control flags still come last
    plain, _, _ = _flush_reads(ProbeRunner(), probe_step=False)
    assert counts == plain  # the carried values cost no read of their own


# --- the exporter shows each interval's ranks only ---------------------------------------------


def test_the_exporter_shows_the_latest_intervals_ranks_only() -> None:
    exporter = Exporter("tiny")
    key = catalog.RANK_STEP.key
    exporter.write_step(0, 10, {key(rank="0"): 0.1, key(rank="5"): 0.2, key(rank="9"): 0.3})
    exporter.write_step(0, 11, {catalog.TRAIN_LOSS.name: 2.0})  # no interval: ranks stay
    scraped = _ranks_scraped(exporter)
    assert scraped == {"0": 0.1, "5": 0.2, "9": 0.3}
    exporter.write_step(0, 20, {key(rank="0"): 0.1, key(rank="9"): 0.4})
    assert _ranks_scraped(exporter) == {"0": 0.1, "9": 0.4}  # rank 5 left the slowest set


def _ranks_scraped(exporter: Exporter) -> dict[str, float]:
    [family] = [f for f in exporter.collect() if f.name == catalog.RANK_STEP.name]
    return {s.labels["rank"]: s.value for s in family.samples}


# --- the slow_rank fault ------------------------------------------------------------------------


def test_slow_rank_waits_on_its_rank_for_its_steps_only(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = "slow_rank@2:seconds=0.25,steps=2,rank=1"
    fault = parse_fault(spec)
    assert (fault.kind, fault.seconds, fault.steps, fault.rank) == (FaultKind.SLOW_RANK, 0.25, 2, 1)
    slept: list[float] = []
    monkeypatch.setattr("yoto.trainer.faults.time.sleep", slept.append)
    model = torch.nn.Module()
    waits = {}
    for rank in (0, 1):
        faults = FaultInjector([spec], rank, "fp32")
        for step in range(1, 6):
            faults.begin_step(step, model, 0, 8)
            waits[rank, step] = faults.stall()
    assert [waits[1, s] for s in range(1, 6)] == [0, 0.25, 0.25, 0, 0]
    assert all(waits[0, s] == 0 for s in range(1, 6))
    assert slept == [0.25, 0.25]


# --- system health ------------------------------------------------------------------------------


def test_nvml_absent_is_nothing_and_no_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: the import fails
    assert NvmlSampler.start(0) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU")
def test_nvml_without_a_gpu_is_nothing_and_no_error() -> None:
    pytest.importorskip("pynvml")
    assert NvmlSampler.start(0, 0.01) is None


def test_system_health_on_the_cpu_is_the_process_rss() -> None:
    probe = SystemHealthProbe(SystemConfig())
    probe.attach(torch.nn.Linear(2, 2), None)
    samples = list(probe.on_step(ctx(1, StepClock("cpu"))))
    assert [s.name for s in samples] == [catalog.PROCESS_RSS.name]
    rss = psutil.Process().memory_info().rss
    assert 0.5 * rss < samples[0].value < 2 * rss
    assert probe.nvml is None  # no NVML thread off CUDA


def test_every_step_records_rss_and_one_rank_gathers_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: Counter = Counter()  # collectives called from probes/system.py

    def counted(name: str, original):
        def call(*args, **kwargs):
            if sys._getframe(1).f_code.co_filename == system.__file__:
                calls[name] += 1
            return original(*args, **kwargs)

        return call

    for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast"):
        monkeypatch.setattr(dist, name, counted(name, getattr(dist, name)))
    sets = [
        a for item in (*FAST, "train.steps=6", "probes.system.every=3") for a in ("--set", item)
    ]
    run = train_in_process(tmp_path, *sets)
    t = runstore.read_metrics(run).to_pydict()
    assert t["step"] == [1, 2, 3, 4, 5, 6]
    assert all(v is not None and v > 1e6 for v in t[catalog.PROCESS_RSS.name])  # > 1 MB
    own = t[catalog.RANK_STEP.key(rank="0")]
    assert [v is not None for v in own] == [False, False, True, False, False, True]
    assert all(v > 0 for v in own if v is not None)
    assert catalog.RANK_STEP.key(rank="1") not in t
    assert calls == Counter()  # one rank: no collective at all
    assert not [e for e in runstore.read_events(run) if e["kind"] == EventKind.STRAGGLER]


@pytest.mark.gpu
@cuda
def test_cuda_memory_and_gpu_readings() -> None:
    probe = SystemHealthProbe(SystemConfig(nvml_interval_seconds=0.05))
    device = torch.device("cuda", torch.cuda.current_device())
    probe.attach(torch.nn.Linear(2, 2).to(device), None)  # starts the NVML thread
    keep = torch.ones(1 << 20, device=device)
    c = ctx(1, StepClock(device))
    c.loss = torch.zeros((), device=device)
    got = {s.name: s.value for s in probe.on_step(c)}
    assert got[catalog.CUDA_ALLOCATED.name] >= keep.numel() * 4
    assert got[catalog.CUDA_RESERVED.name] >= got[catalog.CUDA_ALLOCATED.name]
    assert got[catalog.CUDA_PEAK.name] >= got[catalog.CUDA_ALLOCATED.name]
    assert got[catalog.CUDA_ALLOC_RETRIES.name] >= 0
    if probe.nvml is not None:  # nvidia-ml-py installed
        for _ in range(100):
            if probe.nvml.samples:
                break
            time.sleep(0.05)
        got = {s.name: s.value for s in probe.on_step(c)}
        assert got[catalog.GPU_TEMPERATURE.name] > 0
        assert 0 <= got[catalog.GPU_UTILIZATION.name] <= 1
    probe.detach()
    assert probe.nvml is None


@pytest.mark.gpu
@cuda
def test_cuda_forwards_are_timed_by_events_once_done() -> None:
    clock = StepClock("cuda")
    x = torch.randn(2048, 2048, device="cuda")
    mark = clock.forward_begin()
    for _ in range(10):
        x = x @ x
        x = x / x.norm()
    clock.forward_end(mark)
    torch.cuda.synchronize()
    clock.step_done()
    steps, own, _ = clock.totals()
    assert steps == 1 and own > 0


# --- two CPU ranks under torchrun ---------------------------------------------------------------

STEPS, EVERY = 30, 5
SLOW = "slow_rank@1:seconds=0.1,steps=1000,rank=1"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One torchrun, two runs in one process group: equal ranks, then rank 1 slowed."""
    root = tmp_path_factory.mktemp("rank-health")
    variants = {"equal": {}, "slow": {"faults": [SLOW]}}
    cmd = [
        *torchrun(2),
        str(ROOT / "tests" / "probes" / "rank_health_harness.py"),
        str(root / "runs"),
        str(root / "out"),
        json.dumps(variants),
        *FAST,
        f"train.steps={STEPS}",
        f"probes.system.every={EVERY}",
    ]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((root / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    runs = {name: Path(ranks[0][name]["run_dir"]) for name in variants}
    return {"ranks": ranks, "runs": runs}


def _straggler_events(run: Path) -> list[dict]:
    return [e for e in runstore.read_events(run) if e["kind"] == EventKind.STRAGGLER]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["equal", "slow"])
def test_one_all_gather_per_interval(two_ranks: dict, variant: str) -> None:
    for rank in (0, 1):
        collectives = two_ranks["ranks"][rank][variant]["collectives"]
        assert collectives == {"all_gather": STEPS // EVERY}, (rank, collectives)
    t = runstore.read_metrics(two_ranks["runs"][variant]).to_pydict()
    for r in ("0", "1"):
        own = t[catalog.RANK_STEP.key(rank=r)]
        at = [step for step, v in zip(t["step"], own, strict=True) if v is not None]
        assert at == list(range(EVERY, STEPS + 1, EVERY))


@pytest.mark.slow
def test_a_slow_rank_is_a_straggler(two_ranks: dict) -> None:
    run = two_ranks["runs"]["slow"]
    [event] = _straggler_events(run)
    assert event["severity"] == Severity.WARNING and event["data"]["rank"] == 1
    assert event["step"] == 3 * EVERY and event["data"]["onset"] == EVERY  # 3 intervals in a row
    assert event["data"]["slowdown"] > 1.2
    t = runstore.read_metrics(run).to_pydict()
    flagged = [v for v in t[catalog.STRAGGLERS.name] if v is not None]
    assert flagged == [0, 0, 1, 1, 1, 1]
    slow = [v for v in t[catalog.RANK_STEP.key(rank="1")] if v is not None]
    assert len(slow) == STEPS // EVERY and all(s >= 0.1 for s in slow)  # 0.1 s per forward


@pytest.mark.slow
def test_equal_ranks_raise_no_straggler(two_ranks: dict) -> None:
    run = two_ranks["runs"]["equal"]
    assert _straggler_events(run) == []
    t = runstore.read_metrics(run).to_pydict()
    assert [v for v in t[catalog.STRAGGLERS.name] if v is not None] == [0] * (STEPS // EVERY)
    median = [v for v in t[catalog.RANK_MEDIAN_STEP.name] if v is not None]
    assert all(m > 0 and math.isfinite(m) for m in median)
