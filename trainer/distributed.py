"""Process group set-up and the few collectives yoto needs, on CPU (gloo) or CUDA (nccl).

One process or many: under the ``deepspeed`` launcher, ``torchrun`` or SLURM the
environment already names the rank and world; a bare ``yoto train`` is a world of one on
127.0.0.1. Nothing here is a home-made distributed layer: it is torch.distributed as
DeepSpeed initialises it.
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from yoto.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_device(preference: str) -> torch.device:
    cuda = torch.cuda.is_available()
    if preference == "cuda" and not cuda:
        raise ConfigError(
            "train.device='cuda' but CUDA is not available here (torch "
            f"{torch.__version__}); use train.device=auto or cpu"
        )
    return torch.device(
        "cuda" if preference == "cuda" or (preference == "auto" and cuda) else "cpu"
    )


def setup(device: torch.device) -> DistInfo:
    """Initialise (once) the default process group the way DeepSpeed expects it."""
    if device.type == "cpu":
        # DeepSpeed picks its accelerator at import; make it the CPU one, quietly
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    if not dist.is_initialized():
        # DeepSpeed prints a line each time it loads its (cached) CPU comm op; keep the
        # terminal for yoto's own output unless something goes wrong
        chatter = io.StringIO()
        try:
            with contextlib.redirect_stdout(chatter):
                deepspeed.init_distributed(
                    dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False
                )
        except BaseException:
            sys.stdout.write(chatter.getvalue())
            raise
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        # ranks on one machine share its cores; oversubscription makes gloo crawl
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    return DistInfo(rank, world, local_rank, device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no host transfer)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from ``src`` (no host transfer)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


_PROCESS_GROUP_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "ROLE_RANK",
)


def child_env() -> dict[str, str]:
    """The environment for a child ``yoto``/``torchrun`` started by this process: without
    the process-group variables that :func:`setup` may have set for this one (the child
    would join this process's group instead of making its own)."""
    env = {k: v for k, v in os.environ.items() if k not in _PROCESS_GROUP_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    return env
