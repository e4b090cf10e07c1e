"""The full fp32 weights of a DeepSpeed checkpoint, one parameter at a time.

DeepSpeed's ``zero_to_fp32`` rebuilds a whole state dict (every rank's optimizer file read,
every parameter assembled) before it hands back the first tensor; for a 100B model that is
hundreds of GB of host memory. :class:`ShardedCheckpoint` maps each rank's file instead
(``torch.load(..., mmap=True)``: nothing is read until touched) and assembles only the
parameter asked for, from the slices of it that each rank holds, so memory stays at one
parameter (plus the page cache) whatever the model's size. The layout it reads, per stage:

- stage 0: ``mp_rank_00_model_states.pt``'s ``module`` holds every tensor whole (in the
  training dtype; cast to fp32).
- stages 1 and 2: each rank's ``*_optim_states.pt`` holds its partition of each parameter
  group ``g``, ``single_partition_of_fp32_groups[g]``; the ranks' partitions end to end
  are the group's flat fp32 vector, in which parameter ``p`` (``n`` entries) starts at the
  sum of the sizes (and ``param_alignment_paddings``) of the parameters before it in
  ``param_shapes[g]``.
- stage 3: each rank's ``*_optim_states.pt`` holds ``fp32_flat_groups`` (its sub-groups,
  end to end one flat vector); with ``W`` ranks every rank holds ``ceil(n / W)`` entries
  of ``p`` at the same offset of its flat (the sum of ``ceil(n_q / W)`` over the
  parameters ``q`` before ``p`` in ``param_shapes``, groups merged); the ranks' pieces end
  to end, cut to ``n`` (the last rank's padding), are ``p``.

``param_shapes`` and ``shared_params`` (tied weights: alias -> the name stored) come from
rank 0's model-states file. Stage 1-3 checkpoints give the fp32 master weights (what
``zero_to_fp32`` gives, bit for bit). At stage 0 the module's weights are used, in the
training dtype: DeepSpeed saves no ``param_shapes`` there that would place a master copy
(fp16's optimizer saves none; bf16's optimizer, on accelerators that have it, keeps its
flat fp32 partitions in ``bf16_zero_pp_rank_*`` files without them, which this reader
leaves aside).

It lives in ``probes`` (not ``trainer``) because the spectra probe's worker reads
checkpoints with it, and the layer rules let probes import only the kernel.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from yoto.errors import RunDirError

MODEL_STATES = "mp_rank_00_model_states.pt"  # stages 0-2 (stage 3: rank 0's file below)
MODEL_STATES_ZERO3 = "zero_pp_rank_0_mp_rank_00_model_states.pt"
_OPTIM_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


class CheckpointGone(RunDirError):
    """The checkpoint folder, or one of its files, is not there (any more): removed by
    ``checkpoint.keep_last`` or a rollback while it was about to be read."""


@dataclass(frozen=True, slots=True)
class _Slot:
    """Where one parameter lives in the flat partitions."""

    group: int  # stage 1/2: its flat group (stage 3: unused, the ranks' flats are one range)
    offset: int  # stage 1/2: in the group's full flat; stage 3: in every rank's flat
    numel: int
    shape: torch.Size


def _load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except FileNotFoundError as exc:
        raise CheckpointGone(f"{path} is missing (the checkpoint was removed?)") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise RunDirError(f"{path} cannot be read as a torch checkpoint file ({exc})") from exc


def _pieces(flats: list[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
    """The entries [start, stop) of the tensors ``flats`` laid end to end, as views."""
    out, base = [], 0
    for flat in flats:
        n = flat.numel()
        lo, hi = max(start, base), min(stop, base + n)
        if lo < hi:
            out.append(flat[lo - base : hi - base])
        base += n
        if base >= stop:
            break
    if sum(p.numel() for p in out) != stop - start:
        raise RunDirError(f"entries {start}:{stop} lie past the end of the flat partition ({base})")
    return out


class ShardedCheckpoint:
    """One DeepSpeed checkpoint folder (``checkpoints/step-N``), read one parameter at a
    time: ``tensor(name)`` / ``tensors(names)`` give fp32 tensors of the full shape in their
    own memory. ``close()`` (or ``with``) unmaps the files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointGone(f"checkpoint folder {self.path} does not exist")
        candidates = (self.path / MODEL_STATES, self.path / MODEL_STATES_ZERO3)
        states_file = next((f for f in candidates if f.is_file()), None)
        if states_file is None:
            raise RunDirError(
                f"{self.path} holds neither {MODEL_STATES} nor {MODEL_STATES_ZERO3}: "
                "not a DeepSpeed checkpoint"
            )
        self._states: dict[str, Any] = _load(states_file)
        if not isinstance(self._states, dict) or "module" not in self._states:
            raise RunDirError(f"{states_file} is not a DeepSpeed model-states file")
        self.shared: dict[str, str] = dict(self._states.get("shared_params") or {})
        self._flats: list[list[torch.Tensor]] = []  # rank -> its flat tensors
        self._slots: dict[str, _Slot] = {}
        self.stage, self.world = 0, 1
        if self._states.get("param_shapes"):  # saved by a ZeRO optimizer (stages 1-3)
            self._index(self._optim_files())
        else:  # stage 0: the module's weights, whole
            self._index_module(states_file)

    # --- reading the layout ---------------------------------------------------------------

    def _optim_files(self) -> list[Path]:
        found: dict[int, Path] = {}
        try:
            entries = list(self.path.iterdir())
        except FileNotFoundError as exc:
            raise CheckpointGone(f"checkpoint folder {self.path} was removed") from exc
        for file in entries:
            match = _OPTIM_FILE.match(file.name)
            if match is None:
                continue
            if int(match.group(2)) != 0:
                raise RunDirError(
                    f"{file.name}: a model-parallel checkpoint (mp_rank > 0) is not supported"
                )
            found[int(match.group(1))] = file
        if not found:
            raise RunDirError(
                f"{self.path} is a ZeRO checkpoint without its *_optim_states.pt files, "
                "which hold the fp32 weights"
            )
        missing = sorted(set(range(max(found) + 1)) - set(found))
        if missing:
            raise RunDirError(
                f"{self.path}: the optimizer file of rank {missing[0]} is missing "
                f"(found ranks {sorted(found)})"
            )
        return [found[r] for r in range(len(found))]

    def _index_module(self, states_file: Path) -> None:
        module = self._states["module"]
        empty = [k for k, v in module.items() if isinstance(v, torch.Tensor) and v.numel() == 0]
        if empty:  # partitioned, yet no param_shapes to say where the partitions are
            raise RunDirError(
                f"{self.path}: {states_file.name} holds partitioned (empty) parameters "
                f"({empty[0]}, ...) but no param_shapes"
            )

    def _index(self, files: list[Path]) -> None:
        osds = []
        for file in files:
            sd = _load(file)
            osd = sd.get("optimizer_state_dict") if isinstance(sd, dict) else None
            if not isinstance(osd, dict) or "zero_stage" not in osd:
                raise RunDirError(f"{file} is not a ZeRO optimizer-state file (no zero_stage)")
            osds.append(osd)
        self.stage = int(osds[0]["zero_stage"])
        count = osds[0].get("partition_count")
        count = max(count) if isinstance(count, list | tuple) else int(count)
        if count != len(files):
            raise RunDirError(
                f"{self.path}: the checkpoint was saved by {count} ranks but holds "
                f"{len(files)} optimizer files"
            )
        self.world = count
        shapes = self._states["param_shapes"]
        if self.stage <= 2:
            self._flats = [list(o["single_partition_of_fp32_groups"]) for o in osds]
            self._index_zero12(shapes, osds[0].get("param_alignment_paddings"))
        elif self.stage == 3:
            self._flats = [list(o["fp32_flat_groups"]) for o in osds]
            self._index_zero3(shapes)
        else:
            raise RunDirError(f"{self.path}: unknown ZeRO stage {self.stage}")

    def _index_zero12(self, shapes: list[Mapping[str, Any]], paddings: Any) -> None:
        if len(shapes) != len(self._flats[0]):
            raise RunDirError(
                f"{self.path}: {len(shapes)} parameter groups but {len(self._flats[0])} flat "
                "fp32 groups"
            )
        for g, group in enumerate(shapes):
            available = sum(rank[g].numel() for rank in self._flats)
            offset = 0
            for i, (name, shape) in enumerate(group.items()):
                numel = math.prod(shape)
                self._slots[name] = _Slot(g, offset, numel, torch.Size(shape))
                offset += numel + (int(paddings[g][i]) if paddings is not None else 0)
            if offset > available:
                raise RunDirError(
                    f"{self.path}: group {g}'s parameters need {offset} entries, its "
                    f"partitions hold {available}"
                )

    def _index_zero3(self, shapes: list[Mapping[str, Any]]) -> None:
        offset = 0
        for group in shapes:
            for name, shape in group.items():
                numel = math.prod(shape)
                self._slots[name] = _Slot(0, offset, numel, torch.Size(shape))
                offset += math.ceil(numel / self.world)
        for rank, flats in enumerate(self._flats):
            held = sum(f.numel() for f in flats)
            if held != offset:
                raise RunDirError(
                    f"{self.path}: rank {rank}'s fp32 partition holds {held} entries, its "
                    f"parameters' shares add up to {offset}"
                )

    # --- parameters -------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every parameter the checkpoint holds, tied aliases included."""
        own = list(self._slots) if self._slots else list(self._states["module"])
        return own + [a for a, src in self.shared.items() if src in own and a not in own]

    def _resolve(self, name: str) -> str:
        own = self._slots if self._slots else self._states["module"]
        if name in own:
            return name
        if self.shared.get(name) in own:
            return self.shared[name]
        have = list(own)
        raise RunDirError(
            f"{name!r} is not a parameter of checkpoint {self.path} "
            f"(it has {len(have)}: {', '.join(have[:6])}{', ...' if len(have) > 6 else ''})"
        )

    def shape(self, name: str) -> torch.Size:
        name = self._resolve(name)
        if self._slots:
            return self._slots[name].shape
        return self._states["module"][name].shape

    def tensor(self, name: str) -> torch.Tensor:
        """Parameter ``name`` (a tied alias gives the weight it shares), fp32, full shape."""
        name = self._resolve(name)
        if not self._slots:
            return self._states["module"][name].detach().to(torch.float32, copy=True)
        slot = self._slots[name]
        if self.stage <= 2:
            group = [rank[slot.group] for rank in self._flats]
            pieces = _pieces(group, slot.offset, slot.offset + slot.numel)
        else:
            share = math.ceil(slot.numel / self.world)
            pieces = [
                p for rank in self._flats for p in _pieces(rank, slot.offset, slot.offset + share)
            ]
        if len(pieces) == 1:  # a view of the mapped file: copied out
            flat = pieces[0][: slot.numel].to(torch.float32, copy=True)
        else:  # cat gives new memory already
            flat = torch.cat(pieces)[: slot.numel].to(torch.float32)
        return flat.detach().view(slot.shape)  # the saved partitions require grad

    def tensors(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` one at a time; each is assembled only when asked for."""
        for name in names:
            yield name, self.tensor(name)

    @property
    def client_state(self) -> dict[str, Any]:
        """yoto's client state saved with the checkpoint (``client_state["yoto"]``)."""
        return dict(self._states.get("yoto") or {})

    def close(self) -> None:
        self._states, self._flats, self._slots = {"module": {}}, [], {}

    def __enter__(self) -> ShardedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
