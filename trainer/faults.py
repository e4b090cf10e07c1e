"""Fault injection, for tests and demos: ``yoto train --inject KIND@STEP[:key=value,...]``.

| kind | what happens at STEP | options (default) |
|---|---|---|
| ``lr_spike`` | LR x factor for a few steps | factor (100), steps (3) |
| ``bad_batch`` | the next batches are random bytes (a corrupt shard) | steps (8), sequences, rank |
| ``nan_grad`` | one parameter's gradient becomes NaN | rank |
| ``weight_blowup`` | one block's weights are multiplied by factor | factor (30), layer (0) |
| ``fp16_overflow`` | the loss is scaled past fp16's range (fp16 engines only) | steps (3), rank |
| ``flaky`` | loss, gradient x factor; not in a replay (a bad GPU) | factor (10), steps (1), rank |
| ``slow_rank`` | forwards wait (a straggler); not in a replay | seconds (0.1), steps (100), rank |

A fault fires once, the first time its step is reached, and is recorded as a
``fault_injected`` event, so detection delay is the gap to the first verdict. It stays
fired after a rollback (the injector's state is the run's, not the checkpoint's): a
rolled-back run does not meet it again, as a real transient fault would not recur. A bad
batch is tied to the data position it replaced, which the rollback skips past; with
``sequences=K`` only K sequences of each bad batch (a seeded choice) are replaced, the
rest stay real data. ``rank=N`` confines a fault to one data-parallel rank (the others stay
clean).

Replay diagnosis (trainer/diagnose.py) re-runs steps from a checkpoint: there a bad batch
is bad again (the data are), an LR spike is repeated (the recorded LR is replayed), but
nothing that acts "this step" fires again: ``flaky``, ``nan_grad``, ``weight_blowup`` and
``fp16_overflow`` belong to the first pass, as a hardware fault would. ``slow_rank`` (give it
a ``rank``, or every rank is slow and none is a straggler) makes the rank's own step time
longer, which the per-rank health probe (probes/system.py) compares with the median.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import torch

from yoto.errors import ConfigError
from yoto.events import EventKind


class FaultKind(StrEnum):
    LR_SPIKE = "lr_spike"
    BAD_BATCH = "bad_batch"
    NAN_GRAD = "nan_grad"
    WEIGHT_BLOWUP = "weight_blowup"
    FP16_OVERFLOW = "fp16_overflow"
    FLAKY = "flaky"  # test-only nondeterminism: the first pass is wrong, a replay is not
    SLOW_RANK = "slow_rank"  # test-only straggler: a rank's forwards wait ``seconds``


KINDS = {  # kind -> its options and their defaults
    FaultKind.LR_SPIKE: {"factor": 100.0, "steps": 3},
    FaultKind.BAD_BATCH: {"steps": 8, "sequences": 0},
    FaultKind.NAN_GRAD: {},
    FaultKind.WEIGHT_BLOWUP: {"factor": 30.0, "layer": 0},
    FaultKind.FP16_OVERFLOW: {"steps": 3},
    FaultKind.FLAKY: {"factor": 10.0, "steps": 1},
    FaultKind.SLOW_RANK: {"seconds": 0.1, "steps": 100},
}
_FLOATS = ("factor", "seconds")  # options that take a fraction; the others are counts
_SPEC = re.compile(r"^(?P<kind>[a-z0-9_]+)@(?P<step>\d+)(?::(?P<opts>.*))?$")


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    step: int
    rank: int | None = None
    factor: float = 1.0
    steps: int = 1
    layer: int = 0
    sequences: int = 0  # bad_batch: sequences replaced per batch (0: all)
    seconds: float = 0.0  # slow_rank: the wait added to each forward pass

    @property
    def spec(self) -> str:
        return f"{self.kind}@{self.step}"


def parse_fault(spec: str) -> Fault:
    match = _SPEC.match(spec.strip())
    if not match:
        raise ConfigError(
            f"fault {spec!r}: expected KIND@STEP[:key=value,...], e.g. "
            f"lr_spike@300 or bad_batch@200:steps=10,rank=1"
        )
    kind = match.group("kind")
    if kind not in KINDS:
        raise ConfigError(f"fault {spec!r}: unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    options: dict[str, Any] = dict(KINDS[kind])
    for item in filter(None, (match.group("opts") or "").split(",")):
        key, _, value = item.partition("=")
        allowed = {*KINDS[kind], "rank"}
        if key not in allowed:
            raise ConfigError(
                f"fault {spec!r}: {kind} takes {', '.join(sorted(allowed))}, not {key!r}"
            )
        try:
            options[key] = float(value) if key in _FLOATS else int(value)
        except ValueError:
            raise ConfigError(f"fault {spec!r}: {key}={value!r} is not a number") from None
    step = int(match.group("step"))
    if step < 1:
        raise ConfigError(f"fault {spec!r}: steps are counted from 1")
    return Fault(FaultKind(kind), step, **options)


class FaultInjector:
    """Applies the configured faults inside the loop; see the module docstring."""

    def __init__(self, specs: list[str], rank: int, precision: str) -> None:
        self.faults = [parse_fault(s) for s in specs]
        for fault in self.faults:
            if fault.kind == FaultKind.FP16_OVERFLOW and precision != "fp16":
                raise ConfigError(
                    f"fault {fault.spec}: fp16_overflow needs "
                    f"train.precision=fp16 (a GPU); here it is {precision}"
                )
        self.rank = rank
        self.fired: set[str] = set()
        # bad data: (first, end) sampler positions, sequences per batch, replaced per batch
        self.bad_positions: list[tuple[int, int, int, int]] = []
        self.windows: dict[str, tuple[int, int]] = {}  # spec -> steps it acts on, this branch
        self._active: list[Fault] = []  # acting this step

    def _mine(self, fault: Fault, rank: int | None = None) -> bool:
        return fault.rank is None or fault.rank == (self.rank if rank is None else rank)

    def begin_step(
        self, step: int, model: torch.nn.Module, position: int, batch: int
    ) -> list[Fault]:
        """Called before step ``step`` (1-based); returns the faults that fire now."""
        fired = []
        for fault in self.faults:
            if fault.step != step or fault.spec in self.fired:
                continue
            self.fired.add(fault.spec)
            self.windows[fault.spec] = (step, step + max(1, fault.steps))
            fired.append(fault)
            if fault.kind == FaultKind.BAD_BATCH:
                end = position + fault.steps * batch
                self.bad_positions.append((position, end, batch, fault.sequences))
            elif fault.kind == FaultKind.WEIGHT_BLOWUP:  # every rank: replicas must stay equal
                with torch.no_grad():
                    for p in model.blocks[fault.layer].parameters():
                        if p.dim() >= 2:
                            p.mul_(fault.factor)
        self._active = [
            f
            for f in self.faults
            if f.spec in self.windows and self.windows[f.spec][0] <= step < self.windows[f.spec][1]
        ]
        return fired

    def rolled_back(self) -> None:
        """The branch a fault acted on was abandoned: nothing acts any more (a bad data
        range stays bad, but the rollback skipped past it)."""
        self.windows.clear()
        self._active = []

    def lr_factor(self) -> float:
        factor = 1.0
        for fault in self._active:
            if fault.kind == FaultKind.LR_SPIKE:
                factor *= fault.factor
        return factor

    def corrupted(self, position: int, count: int) -> list[int]:
        """The sampler positions in [position, position + count) whose data are replaced."""
        out = []
        for lo, hi, batch, sequences in self.bad_positions:
            for p in range(max(lo, position), min(hi, position + count)):
                if sequences == 0:
                    out.append(p)
                    continue
                start = lo + (p - lo) // batch * batch  # the bad batch p belongs to
                chosen = np.random.default_rng([start, 7]).permutation(batch)[:sequences]
                if p - start in chosen:
                    out.append(p)
        return sorted(set(out))

    def corrupt(
        self, tokens: torch.Tensor, first_position: int, rank: int | None = None
    ) -> torch.Tensor:
        """Random bytes in place of the sequences of a micro-batch (its first at sampler
        position ``first_position``) whose data lie in a bad range; as ``rank`` (default
        this one) would have them."""
        if not self.bad_positions or not any(
            f.kind == FaultKind.BAD_BATCH and self._mine(f, rank) for f in self.faults
        ):
            return tokens
        if all(sequences == 0 for *_, sequences in self.bad_positions):  # whole batches
            if not any(lo <= first_position < hi for lo, hi, _, _ in self.bad_positions):
                return tokens
            gen = torch.Generator().manual_seed(first_position)
            return torch.randint(0, 256, tokens.shape, generator=gen, dtype=tokens.dtype)
        bad = self.corrupted(first_position, len(tokens))
        if not bad:
            return tokens
        tokens = tokens.clone()
        for p in bad:  # each replaced sequence its own random bytes
            gen = torch.Generator().manual_seed(p)
            row = torch.randint(0, 256, tokens.shape[1:], generator=gen, dtype=tokens.dtype)
            tokens[p - first_position] = row
        return tokens

    def loss_factor(self) -> float:
        factor = 1.0
        for f in self._active:
            if self._mine(f) and f.kind == FaultKind.FP16_OVERFLOW:
                factor = float("inf")
            elif self._mine(f) and f.kind == FaultKind.FLAKY:
                factor *= f.factor
        return factor

    def stall(self) -> float:
        """For slow_rank: wait before a forward pass on the slow rank (the loop calls it
        inside the forward's timing, never in a replay). Returns the seconds waited."""
        wait = sum(
            f.seconds for f in self._active if f.kind == FaultKind.SLOW_RANK and self._mine(f)
        )
        if wait > 0:
            time.sleep(wait)
        return wait

    def poison_grads(self, model: torch.nn.Module) -> Any:
        """For nan_grad: a one-shot hook on one weight; returns its handle (or None)."""
        if not any(f.kind == FaultKind.NAN_GRAD and self._mine(f) for f in self._active):
            return None
        weight = model.blocks[0].mlp.fc.weight
        return weight.register_hook(lambda g: g * float("nan"))

    def recall(self, events: list[dict[str, Any]]) -> None:
        """The bad data ranges from a run's ``fault_injected`` events (offline tools: the
        data a step trained on, a replay after the fact). Nothing acts "this step" then."""
        for e in events:
            data = e.get("data", {})
            if e.get("kind") != EventKind.FAULT_INJECTED:
                continue
            if data.get("fault") != FaultKind.BAD_BATCH:
                continue
            position, batch = int(data["sampler_position"]), int(data.get("batch") or 0)
            if batch < 1:
                raise ConfigError(
                    f"the bad_batch fault at step {e.get('step')} was recorded without its "
                    "batch size (an older run): its data cannot be reconstructed"
                )
            end = position + int(data.get("steps") or 1) * batch
            self.bad_positions.append((position, end, batch, int(data.get("sequences") or 0)))
            self.fired.add(f"{FaultKind.BAD_BATCH}@{e.get('step')}")

    def state_dict(self) -> dict[str, Any]:
        return {
            "fired": sorted(self.fired),
            "bad_positions": list(self.bad_positions),
            "windows": dict(self.windows),
            "faults": [asdict(f) for f in self.faults],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fired = set(state["fired"])
        # older checkpoints: (first, end) ranges, whole batches
        ranges = state["bad_positions"]
        self.bad_positions = [(*r, 1, 0) if len(r) == 2 else tuple(r) for r in ranges]
        self.windows = {k: tuple(v) for k, v in state.get("windows", {}).items()}
