"""Process group set-up and the few collectives yoto needs, on CPU (gloo) or CUDA (nccl).

One process or many: under the ``deepspeed`` launcher, ``torchrun`` or SLURM the
environment already names the rank and world; a bare ``yoto train`` is a world of one that
listens on no network interface (an in-process store, the collective backend's socket on
loopback). Nothing here is a home-made distributed layer: it is torch.distributed as
DeepSpeed initialises it.

What a many-host job needs open: the rendezvous port (``MASTER_ADDR:MASTER_PORT``, torch's
TCPStore on rank 0, which listens on every interface) and the backend's own connections
between ranks (gloo or NCCL on the interface ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``
names, on ephemeral ports); the launcher sets those up, yoto adds no port of its own beyond
``--metrics-addr`` (127.0.0.1 unless asked).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
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


# environment variables setup() set for this process alone (child_env leaves them out)
_SET_HERE: set[str] = set()


def _loopback_interface() -> str | None:
    """The loopback interface's name (``lo`` on Linux, ``lo0`` on macOS), if there is one."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n in ("lo", "lo0")), None)


def _init_world_of_one(backend: str) -> None:
    """A world of one needs no rendezvous: an in-process store replaces torch's TCPStore
    (which would listen on every interface for peers that do not exist), and the backend's
    own socket goes on the loopback interface unless the user chose one."""
    loopback = _loopback_interface()
    variable = "GLOO_SOCKET_IFNAME" if backend == "gloo" else "NCCL_SOCKET_IFNAME"
    if loopback is not None and variable not in os.environ:
        os.environ[variable] = loopback
        _SET_HERE.add(variable)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def setup(device: torch.device) -> DistInfo:
    """Initialise (once) the default process group the way DeepSpeed expects it."""
    if device.type == "cpu":
        # DeepSpeed picks its accelerator at import; make it the CPU one, quietly
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    alone = "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ
    if alone:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    backend = "nccl" if device.type == "cuda" else "gloo"
    if alone and not dist.is_initialized():
        _init_world_of_one(backend)  # DeepSpeed then adopts this group as it is
    if not dist.is_initialized() or not _deepspeed_has_backend():
        # DeepSpeed prints a line each time it loads its (cached) CPU comm op; keep the
        # terminal for yoto's own output unless something goes wrong
        chatter = io.StringIO()
        try:
            with contextlib.redirect_stdout(chatter):
                deepspeed.init_distributed(dist_backend=backend, verbose=False)
        except BaseException:
            sys.stdout.write(chatter.getvalue())
            raise
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        torch.set_num_threads(cpu_threads(world))
    return DistInfo(rank, world, local_rank, device)


def _deepspeed_has_backend() -> bool:
    from deepspeed.comm import comm  # the module: its ``cdb`` is rebound at init

    return comm.cdb is not None


def cpu_threads(world: int) -> int:
    """Threads per rank on the CPU: ``OMP_NUM_THREADS`` when the user set it (torch read it
    at start-up; a job sharing the machine says its share that way), else the CPUs this
    process may use (:func:`usable_cpus`) split between this machine's ranks
    (oversubscription makes gloo crawl)."""
    chosen = os.environ.get("OMP_NUM_THREADS", "").strip()
    if chosen:
        try:
            return max(1, int(chosen))
        except ValueError:
            raise ConfigError(
                f"OMP_NUM_THREADS={chosen!r} is not a whole number of threads (e.g. 4)"
            ) from None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    return max(1, usable_cpus() // max(1, local))


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"


def usable_cpus(cpu_max: Path | None = None) -> int:
    """The CPUs this process may run on: its affinity (``taskset``, a Slurm or cgroup
    cpuset), and no more than its cgroup's CPU quota (``docker --cpus``, a Kubernetes CPU
    limit), rounded up. ``os.cpu_count()`` counts the whole host and ignores both."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = (cpu_max or CGROUP_CPU_MAX).read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 quota here
        pass
    return max(1, cpus)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (pickled: off the hot path only)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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
    drop = set(_PROCESS_GROUP_VARIABLES) | _SET_HERE
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONUNBUFFERED"] = "1"
    return env
